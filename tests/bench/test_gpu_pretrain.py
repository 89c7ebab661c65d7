"""bench/gpu_pretrain.py's options and bench/gpu_check.sh, the one script a lent GPU session runs:
on CPU the smoke sweep runs for real and the GPU steps fail cleanly (no CUDA here)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from lmfoundry.bench.gpu_pretrain import micro_batches, parse
from lmfoundry.infra.config import REPO_ROOT


def test_micro_batch_sweep_argument():
    assert micro_batches("16") == [16] and micro_batches("8,16,32") == [8, 16, 32]
    for bad in ("0", "8,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--micro-batch"):
            micro_batches(bad)
    args = parse(["--size", "1b", "--micro-batch", "8,16", "--compile", "off", "--attention", "cudnn", "--baseline-compile", "blocks"])
    assert (args.size, args.micro_batch, args.compile, args.attention, args.baseline_compile) == ("1b", [8, 16], "off", "cudnn", "blocks")


def test_gpu_check_script_on_cpu(tmp_path):
    # a fresh process picks its own rendezvous port (an earlier test may hold this process's one)
    rendezvous = {"MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]  # the two GPU steps fail, the smoke step does not
    assert "== smoke: ok" in proc.stderr and "no CUDA device" in proc.stderr and (tmp_path / "smoke.log").exists()
    lines = [line.split(" ", 1) for line in proc.stdout.splitlines() if line.strip()]
    assert [name for name, _ in lines] == ["smoke", "smoke"]
    results = [json.loads(text) for _, text in lines]
    assert [r["settings"]["ours"]["micro_batch"] for r in results] == [2, 4]  # the sweep: one line per micro batch
    for r in results:
        assert r["bench"] == "gpu_pretrain" and r["ours"] > 0 and r["baseline"] > 0 and r["quality"]["loss_falls"]
        assert r["quality"]["flop_convention"].startswith("6N + 12*L*T*d") and r["quality"]["mfu_ours"] is None  # no MFU on cpu
