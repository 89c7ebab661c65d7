"""Tokens: train a byte-level BPE tokenizer, then write packed, memory-mappable Arrow token shards."""
