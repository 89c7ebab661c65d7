"""Benchmark: greedy generation tokens/s, our KV cache vs Hugging Face ``generate`` and vs recomputing.

    lmf bench generate [--new-tokens 256] [--batch 8] [--prompt-len 32] [--d-model 128] [--layers 2] [--rounds 5]

One model (random weights, our format; by default the demo preset's shape, the size PPO
rollouts run at on CPU) is generated from three ways in this one process, on
the same left-padded batch of prompts (lengths from prompt-len/2 to prompt-len), greedy, no
stop tokens, so every side makes exactly batch * new-tokens tokens:
- ours: ``lmfoundry.model.generate.generate`` with its preallocated KV cache;
- hf-generate: ``LlamaForCausalLM.generate`` (its own cache, SDPA attention) on the same weights
  exported by ``model/export.py``, attention mask given, ``do_sample=False``;
- recompute: our ``generate(use_cache=False)``, the whole prefix through the model each step.
Rounds alternate the sides (median seconds each); the recompute side runs in fewer rounds
(``--recompute-rounds``) because it is the slow one. ``quality`` says what share of greedy
tokens each baseline made identically to ours (random weights give near-ties, so float noise
can flip an argmax; 1.0 is the expectation). The JSON line's main baseline is HF; the
recompute ratio is in ``recompute_ratio``. Every side runs on the same core and thread count;
with one thread (the default) a run's time is the process's CPU time, which other programs
on a shared machine do not inflate.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmfoundry.bench._common import alternating_rounds, pin_one_core, print_result


def make_model(args):
    from lmfoundry.infra.config import ModelConfig
    from lmfoundry.model.transformer import Transformer, resolve

    cfg = resolve(
        ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, init_std=args.init_std),
        args.vocab,
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def make_prompts(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.linspace(max(1, args.prompt_len // 2), args.prompt_len, args.batch).round().long().tolist()
    return [torch.randint(3, args.vocab, (n,), generator=generator).tolist() for n in lengths]


def hf_model(model, directory: Path, max_len: int):
    from transformers import LlamaForCausalLM

    from lmfoundry.model.export import export_llama
    from lmfoundry.model.transformer import save_model

    save_model(model.state_dict(), model.cfg, directory / "ours")
    export_llama(directory / "ours", directory / "hf", max_len)
    return LlamaForCausalLM.from_pretrained(directory / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmf bench generate", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; the shortest is half of it")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--init-std", type=float, default=0.1, help="weight scale: larger makes greedy choices less tied")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of ours and HF")
    parser.add_argument("--recompute-rounds", type=int, default=1, help="rounds of the recompute side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every side (1: pinned to one core)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.recompute_rounds, args.new_tokens, args.batch) < 1:
        parser.error("--rounds, --recompute-rounds, --new-tokens and --batch must be at least 1")
    core = pin_one_core() if args.threads == 1 else None
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter

    from lmfoundry.model.generate import GREEDY, generate, left_pad

    model = make_model(args)
    prompts = make_prompts(args)
    pad_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, Path(tmp), args.prompt_len + args.new_tokens)
    input_ids, attention_mask = left_pad(prompts, pad_id)
    outputs: dict[str, torch.Tensor] = {}

    def ours(_round: int, use_cache: bool = True) -> float:
        began = clock()
        out = generate(model, prompts, max_new_tokens=args.new_tokens, pad_id=pad_id, sampling=GREEDY, use_cache=use_cache, return_logprobs=False)
        seconds = clock() - began
        outputs["ours" if use_cache else "recompute"] = out.response
        return seconds

    @torch.no_grad()
    def hugging_face(_round: int) -> float:
        began = clock()
        out = hf.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            do_sample=False, pad_token_id=pad_id, eos_token_id=None,
        )
        seconds = clock() - began
        outputs["hf"] = out[:, input_ids.shape[1] :]
        return seconds

    ours(0), hugging_face(0)  # warm-up: first calls allocate and pick kernels
    timed = alternating_rounds({"ours": ours, "hf": hugging_face}, args.rounds)
    recompute = alternating_rounds({"recompute": lambda r: ours(r, use_cache=False)}, args.recompute_rounds)["recompute"]
    tokens = args.batch * args.new_tokens
    ours_tps = tokens / statistics.median(timed["ours"])
    hf_tps = tokens / statistics.median(timed["hf"])
    recompute_tps = tokens / statistics.median(recompute)

    def same_share(name: str) -> float:
        return round((outputs[name] == outputs["ours"]).float().mean().item(), 4)

    same = {
        "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "batch": args.batch, "prompt_lengths": [len(p) for p in prompts],
        "new_tokens": args.new_tokens, "greedy": True, "precision": "fp32", "threads": torch.get_num_threads(), "pinned_core": core,
        "clock": "process CPU time" if clock is time.process_time else "wall time",
    }
    print_result(
        "generate", "tokens_per_s", ours_tps, "hf-generate", hf_tps,
        n=tokens,
        settings={
            "ours": {"cache": "preallocated KV cache", "logprobs": False, "rounds": args.rounds, **same},
            "hf-generate": {"cache": "transformers default (DynamicCache)", "attention": "sdpa", "rounds": args.rounds, **same},
            "recompute": {"cache": "none: whole prefix each step", "rounds": args.recompute_rounds, **same},
        },
        quality={"same_tokens_hf": same_share("hf"), "same_tokens_recompute": same_share("recompute"), "parameters": model.num_parameters()},
        recompute_tokens_per_s=round(recompute_tps, 1),
        recompute_ratio=round(ours_tps / recompute_tps, 3),
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
