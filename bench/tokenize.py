"""Benchmark: the tokenize stage and the token loader against their raw building blocks.

    lmf bench tokenize [--data /work/shared/data] [--source warc|stdlib] [--seq-len 1024] ...

Text: by default the HTML pages of the WARC files in --data, reduced to their main text with
resiliparse inside this benchmark (``--source stdlib``: the .py files of Python's standard
library instead). The documents are committed as document shards in a temporary store and a
tokenizer is trained on them with the train_tokenizer stage (its time is reported, not compared).

1. tokens/s: the whole ``tokenize`` stage (read document shards, encode, split, pack, write and
   commit Arrow shards; run through the stage runner) vs ``Tokenizer.encode_batch_fast`` on the
   same texts already in memory, in the same batches, with the same tokenizer. The stage uses
   encode_batch_fast itself (no offsets), so the ratio is what reading, packing and writing cost;
   the slower ``encode_batch`` (with offsets) rate is reported in quality for reference.
2. samples/s: ``TokenLoader`` batches vs the same samples gathered from one flat file through
   ``numpy.memmap`` (as a plain ndarray view, which skips the memmap subclass's per-index
   overhead: the stronger baseline), with the same permutation, batch size and int64 tensors.
   Both sides are single-threaded, so they are timed in CPU seconds (``time.process_time``),
   which other processes on a shared machine disturb far less than wall time. Every round of
   either side starts cold: the loader is built afresh outside the clock (no permutation or
   sample-start table kept from the round before), as the baseline computes its permutation
   anew in every round.

The process is pinned to the same --cores CPUs for both sides (the stage's workers and the
tokenizer's threads included). Each side runs --rounds times, alternating, and the median round
counts. Tokenize: "ratio" is the median over rounds of the paired wall-time ratio (a round's
two runs see similar load on a shared machine); "cpu_ratio" compares CPU seconds of all
threads, i.e. exactly what reading, packing and writing add. The last stdout line is the benchmark JSON for the first comparison,
carrying the loader comparison in "quality"; a line before it is the loader's own JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmfoundry.bench._common import DEFAULT_DATA, alternating_rounds, commit_doc_shards, median_rate, pin_cores, result_line, rounds_arg, warc_paths, warc_texts
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.loader import TokenLoader
from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer

TOKENIZER = StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer")
TOKENIZE = StageSpec("tokenize", "lmfoundry.tasks.tokens.tokenize:run_tokenize", section="tokenize")


# ---------------------------------------------------------------- input text


def stdlib_texts(max_docs: int) -> list[str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
        if len(texts) >= max_docs:
            break
    return texts


def commit_documents(store: Store, texts: list[str], n_shards: int) -> tuple[StageRef, list[list[str]]]:
    """Texts as document shards of a committed stage; returns the ref and the texts per shard."""
    per_shard = [texts[i::n_shards] for i in range(n_shards)]
    rows = ([{"id": f"s{i}-{j}", "text": t, "source": "bench"} for j, t in enumerate(shard)] for i, shard in enumerate(per_shard))
    return commit_doc_shards(store, rows), per_shard


# ---------------------------------------------------------------- timed sides


def raw_encode(tokenizer, shards: list[list[str]], batch_docs: int, fast: bool = True) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of all threads, tokens) of encoding the texts in memory."""
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for texts in shards:
        for i in range(0, len(texts), batch_docs):
            tokens += sum(len(e.ids) for e in encode(texts[i : i + batch_docs], add_special_tokens=False))
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def stage_run(store: Store, cfg: PipelineConfig, inputs: list[StageRef], salt: str):
    """(wall seconds, CPU seconds, outcome) of one fresh version of the tokenize stage."""
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = run_stage(store, TOKENIZE, cfg, inputs, salt=salt)
    return time.perf_counter() - wall, time.process_time() - cpu, outcome


def memmap_copy(loader: TokenLoader, path: str) -> np.ndarray:
    """The loader's samples, in sample order, as one flat file read through numpy.memmap."""
    with open(path, "wb") as fh:
        for block in loader.blocks:
            fh.write(block.tobytes())
    mapped = np.memmap(path, dtype=loader.blocks[0].dtype, mode="r", shape=(loader.num_samples, loader.seq_len + 1))
    return np.asarray(mapped)  # same mapping, without np.memmap's per-index overhead


def memmap_batches(tokens: np.ndarray, batch_size: int, steps: int, seed: int) -> float:
    """A minimal memmap loader: the same epoch permutations, gathered with one fancy index per step."""
    n, perms = len(tokens), {}

    def perm(epoch: int) -> np.ndarray:
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(seed + epoch).permutation(n)
        return perms[epoch]

    start = time.process_time()
    for step in range(steps):
        first, last = step * batch_size, (step + 1) * batch_size
        if first // n == (last - 1) // n:
            picks = perm(first // n)[first % n : first % n + batch_size]
        else:  # the step crosses an epoch boundary (batch_size <= n)
            picks = np.concatenate([perm(first // n)[first % n :], perm((last - 1) // n)[: last - (last - 1) // n * n]])
        torch.from_numpy(tokens[picks].astype(np.int64))
    return time.process_time() - start


def loader_batches(store: Store, ref: StageRef, batch_size: int, steps: int) -> float:
    """CPU seconds of `steps` batches from a loader built afresh (outside the clock), so no
    permutation or sample-start table survives from an earlier round."""
    loader = TokenLoader.from_stage(store, ref, batch_size=batch_size, seed=0)
    start = time.process_time()
    for _ in range(steps):
        next(loader)
    return time.process_time() - start


# ---------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmf bench tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of *.warc.gz files")
    p.add_argument("--source", choices=("warc", "stdlib"), default="warc")
    p.add_argument("--max-docs", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=rounds_arg, default=3, help="alternating rounds per side (at least 3; the median counts)")
    p.add_argument("--cores", type=int, default=2, help="CPUs both sides are pinned to (the lowest allowed ones)")
    p.add_argument("--batch-size", type=int, default=16, help="loader batch size")
    p.add_argument("--loader-steps", type=int, default=4000)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    cores = pin_cores(args.cores)
    texts = warc_texts(warc_paths(args.data), args.max_docs, skip_empty=True) if args.source == "warc" else stdlib_texts(args.max_docs)
    text_origin = f"resiliparse main text of {args.data}/*.warc.gz" if args.source == "warc" else "Python stdlib .py files"
    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters ({text_origin})", file=sys.stderr)
    cfg = PipelineConfig.model_validate(
        {
            "compute": {"workers": args.workers, "progress": False},
            "tokenizer": {"vocab_size": args.vocab_size},
            "tokenize": {"seq_len": args.seq_len},
        }
    )
    with tempfile.TemporaryDirectory(prefix="lmf-bench-tokenize-") as tmp:
        store = Store(os.path.join(tmp, "store"))
        docs_ref, shards = commit_documents(store, texts, args.shards)
        start = time.perf_counter()
        tok_ref = run_stage(store, TOKENIZER, cfg, [docs_ref]).ref
        train_s = time.perf_counter() - start
        tokenizer, _ = load_tokenizer(store, tok_ref)
        tokenizer.encode_special_tokens = True  # as the stage encodes

        runs = alternating_rounds(  # paired rounds: both sides of a round see similar machine load
            {
                "raw": lambda r: raw_encode(tokenizer, shards, cfg.tokenize.batch_docs),
                "stage": lambda r: stage_run(store, cfg, [docs_ref, tok_ref], salt=f"bench-round-{r}"),
            },
            args.rounds,
        )
        raw_s, raw_cpu = [run[0] for run in runs["raw"]], [run[1] for run in runs["raw"]]
        stage_s, stage_cpu = [run[0] for run in runs["stage"]], [run[1] for run in runs["stage"]]
        n_raw, outcome = runs["raw"][-1][2], runs["stage"][-1][2]
        offsets_s, _, _ = raw_encode(tokenizer, shards, cfg.tokenize.batch_docs, fast=False)
        stats = outcome.stats
        docs_out = sum(stats["docs"].values())
        stage_raw_tokens = sum(stats["tokens"].values()) - docs_out  # without the EOS the stage adds
        ours, baseline = n_raw / statistics.median(stage_s), n_raw / statistics.median(raw_s)
        paired_ratio = statistics.median(r / s for r, s in zip(raw_s, stage_s))

        loader = TokenLoader.from_stage(store, outcome.ref, batch_size=args.batch_size, seed=0)
        flat = memmap_copy(loader, os.path.join(tmp, "tokens.bin"))
        loader_runs = alternating_rounds(
            {"loader": lambda _: loader_batches(store, outcome.ref, args.batch_size, args.loader_steps), "memmap": lambda _: memmap_batches(flat, args.batch_size, args.loader_steps, seed=0)},
            args.rounds,
        )
        loader_s, memmap_s = loader_runs["loader"], loader_runs["memmap"]
        check = TokenLoader.from_stage(store, outcome.ref, batch_size=args.batch_size, seed=0)
        same_batches = all(
            torch.equal(next(check), torch.from_numpy(flat[check.samples_at(np.arange(s * args.batch_size, (s + 1) * args.batch_size))].astype(np.int64)))
            for s in range(50)
        )
        loader_ours = median_rate(args.batch_size * args.loader_steps, loader_s)
        loader_base = median_rate(args.batch_size * args.loader_steps, memmap_s)
        same = {"batch_size": args.batch_size, "steps": args.loader_steps, "seed": 0, "clock": "process_time", "rounds": args.rounds, "statistic": "median",
                "cold": "fresh permutation every round", "cores": cores}
        loader_result = result_line(
            "token_loader", "samples_per_s", loader_ours, "numpy.memmap fancy-index gather", loader_base,
            n=args.batch_size * args.loader_steps,
            quality={"identical_batches": same_batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "samples": loader.num_samples, "files": len(loader.blocks),
                     "cpu_s": {"loader": [round(x, 4) for x in loader_s], "memmap": [round(x, 4) for x in memmap_s]}},
            settings={"ours": {"reader": "TokenLoader", **same}, "memmap": {"reader": "ndarray view of one flat file", **same}},
        )
        print(json.dumps(loader_result))
        same = {"batch_docs": cfg.tokenize.batch_docs, "encode": "encode_batch_fast", "clock": "perf_counter", "rounds": args.rounds, "statistic": "median", "cores": cores}
        result = result_line(
            "tokenize", "tokens_per_s", ours, "tokenizers encode_batch_fast in memory", baseline,
            ratio=paired_ratio,
            n=n_raw,
            settings={"ours": {"stage": "tokenize", "workers": args.workers, "seq_len": args.seq_len, "shards": args.shards, **same}, "raw": same},
            quality={
                "text": text_origin,
                "docs": len(texts),
                "chars": sum(map(len, texts)),
                "token_count_matches": stage_raw_tokens == n_raw,
                "samples": stats["samples"],
                "fill": stats["fill"],
                "encode_batch_with_offsets_tokens_per_s": round(n_raw / offsets_s, 1),
                "train_tokenizer_s": round(train_s, 2),
                "ratio_is": "median over rounds of raw wall time / stage wall time (ours, baseline: median rounds)",
                "cpu_ratio": round(statistics.median(r / s for r, s in zip(raw_cpu, stage_cpu)), 3),
                "stage_s": [round(s, 3) for s in stage_s],
                "raw_s": [round(s, 3) for s in raw_s],
                "stage_cpu_s": [round(s, 3) for s in stage_cpu],
                "raw_cpu_s": [round(s, 3) for s in raw_cpu],
                "workers": args.workers,
                "threads": os.cpu_count(),
                "loader": {k: loader_result[k] for k in ("ours", "baseline", "ratio", "quality")},
            },
        )
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
