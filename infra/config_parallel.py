"""Checks of a tensor / sequence parallel layout (``distributed.tp``, ``distributed.sp``).

    problems = layout_problems(tp=2, sp=1, ranks=4, section="pretrain")            # rank count only
    problems = layout_problems(tp=2, sp=1, n_heads=4, n_kv_heads=2, seq_len=256)    # against the model
    # -> [] when the layout fits, else one message per problem, naming the config fields

Pure functions: the config tree calls them as soon as it knows the numbers (infra/config_train.py
for ranks on one node, infra/config.py for the model and seq_len); model/parallel.py calls them
again at run time with the real world size (a hostfile's nodes are known only then).
The layout itself (groups, sharding, the all-to-all) is DeepSpeed's: model/parallel.py.
"""
from __future__ import annotations

# objectives whose loss and loaders know about tp / sp (model/parallel.py); the others refuse it
PARALLEL_SECTIONS = ("pretrain",)


def layout_problems(
    tp: int,
    sp: int,
    *,
    ranks: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    seq_len: int | None = None,
    section: str | None = "pretrain",
    moe: bool = False,
    attention: str = "dense",
    share_layers: int = 1,
    zero_stage: int = 0,
) -> list[str]:
    """What is wrong with tp x sp for this rank count, model shape and sequence length (None: unknown;
    section None: the distributed block alone, whose section is not known yet)."""
    if tp == 1 and sp == 1:
        return []
    d = f"{section}.distributed" if section else "distributed"
    out: list[str] = []
    if section is not None and section not in PARALLEL_SECTIONS:
        out.append(f"{d}.tp / {d}.sp are supported for {', '.join(PARALLEL_SECTIONS)} only; set both to 1 for {section} (its data-parallel ranks still scale)")
    if tp > 1 and sp > 1:
        out.append(
            f"{d}.tp {tp} and {d}.sp {sp} together are not supported: DeepSpeed 0.19.8's AutoTP sets its own "
            "tensor-parallel groups as the engine's mpu, which replaces the sequence-parallel one; use one of them"
        )
    if zero_stage == 3:
        out.append(
            f"{d}.zero_stage 3 with {d}.tp / sp is not supported here (with sp the final fp32 export from the ZeRO-3 "
            "checkpoint failed in a trial run; with tp it is untested): use zero_stage 1 or 2"
        )
    if ranks is not None and ranks % (tp * sp):
        out.append(
            f"{ranks} ranks (procs x nodes) are not divisible by {d}.tp x {d}.sp = {tp * sp}: "
            f"the data-parallel size is ranks / (tp x sp); change {d}.procs or tp / sp"
        )
    if n_heads is not None and n_heads % (tp * sp):
        out.append(f"model.n_heads {n_heads} is not divisible by {d}.tp x {d}.sp = {tp * sp}: each rank needs whole query heads")
    if n_kv_heads is not None and n_kv_heads % (tp * sp):
        out.append(f"model.n_kv_heads {n_kv_heads} is not divisible by {d}.tp x {d}.sp = {tp * sp}: each rank needs whole key/value heads")
    if seq_len is not None and seq_len % sp:
        out.append(f"tokenize.seq_len {seq_len} is not divisible by {d}.sp {sp}: each rank holds seq_len / sp tokens")
    if moe and tp > 1:
        out.append(f"model.moe_experts with {d}.tp {tp}: AutoTP's llama layout does not shard the expert layers; use sp or data parallelism")
    if attention != "dense":
        out.append(f"model.attention {attention!r} with {d}.tp / sp: only dense attention has the tensor / sequence parallel path")
    if share_layers > 1 and tp > 1:
        out.append(f"model.share_layers {share_layers} with {d}.tp {tp}: AutoTP would shard one shared block once per use; set share_layers 1")
    return out
