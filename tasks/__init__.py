"""The stages, one package per pipeline phase; each stage is a pure `run_<stage>(cfg, inputs, out, compute)`.

acquire/ crawl, WARC ingest, HTML extraction, file ingest -> dedup/ exact and MinHash near-dedup
-> filter/ heuristic rules and the fastText quality classifier -> pii/ detection and scrubbing
-> tokens/ BPE tokenizer and packed token shards -> chat/ conversation and preference data
-> train/ pretraining and post-training on DeepSpeed.
"""
