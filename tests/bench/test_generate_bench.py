"""bench/generate.py at a tiny size: the result line, and Hugging Face ``generate`` on the exported
model making the same greedy tokens as ours for a left-padded batch (an outside check of our
padding, positions and cache).

    .venv/bin/pytest -q tests/bench/test_generate_bench.py
"""
from __future__ import annotations

import json

import torch

from lmfoundry.bench import generate as bench


def test_generate_bench_agrees_with_hugging_face_token_for_token(capsys):
    threads = torch.get_num_threads()
    try:  # two threads: the bench pins a one-thread run to a core, which would outlive it here
        code = bench.main([
            "--new-tokens", "12", "--batch", "3", "--prompt-len", "9", "--d-model", "32", "--layers", "2",
            "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--init-std", "0.3", "--rounds", "1", "--threads", "2",
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["bench"] == "generate" and result["baseline_name"] == "hf-generate"
    assert result["n"] == 36 and result["settings"]["ours"]["prompt_lengths"] == [4, 6, 9]
    assert result["quality"]["same_tokens_hf"] == 1.0 and result["quality"]["same_tokens_recompute"] == 1.0
    assert result["ratio"] > 0 and result["recompute_ratio"] > 0
