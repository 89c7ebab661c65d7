"""Resume a checkpoint written by another number of ranks or another ZeRO stage, through
DeepSpeed's universal checkpoint format.

    from lmfoundry.model.universal import load_resharded
    if needs_reshard(marker, world, zero_stage):
        path, client = load_resharded(engine, work, checkpoints, tag, marker, world, zero_stage, rank, barrier, section)

model/train.py's ``Trainer.resume`` calls this when the checkpoint's ``COMPLETE.json`` names a
world size or ZeRO stage other than the job's. Rank 0 converts the checkpoint once
(``deepspeed.checkpoint.ds_to_universal``: every parameter's fp32 master weight and Adam moments
as whole tensors) into ``<work>/universal/<tag>/`` (a finished conversion is renamed into place,
so a crashed one is redone, a finished one reused); every rank then loads it with DeepSpeed's
``load_universal`` switched on for this one load, which re-partitions the tensors for this
world and stage. The work directory must be shared by the ranks of several nodes (model/cluster.py
checks it).

What carries over exactly: the fp32 weights, Adam's moments and step count, the learning-rate
schedule's step, the global data position (model/loader.py's position is global, so the same
global batch is drawn, split over the new ranks), the stability monitor's state. Not exactly:
the loss is summed in another order over another split of the batch (float rounding, ~1e-6
relative), and each rank's RNG state comes from rank ``r mod old_world`` of the checkpoint (new
ranks copy an old rank's; only dropout-like randomness would notice, and the models have none).
Both sides need ZeRO >= 1 (a ZeRO-0 run keeps no partitioned fp32 master for the converter, and
loads none).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Callable

UNIVERSAL = "universal"  # <work>/universal/<tag>/: converted checkpoints


class ReshardError(RuntimeError):
    """A checkpoint cannot be resumed with this rank count / ZeRO stage (the message says why)."""


def needs_reshard(marker: dict[str, Any], world: int, zero_stage: int) -> bool:
    return (int(marker["world_size"]), int(marker["zero_stage"])) != (world, zero_stage)


def check_reshardable(marker: dict[str, Any], tag: str, world: int, zero_stage: int, section: str) -> None:
    if int(marker["zero_stage"]) == 0 or zero_stage == 0:
        raise ReshardError(
            f"checkpoint {tag} was written by {marker['world_size']} ranks with ZeRO stage {marker['zero_stage']}; this run has {world} ranks "
            f"and stage {zero_stage}. Changing ranks or stage goes through DeepSpeed universal checkpoints, which need ZeRO >= 1 on both sides: "
            f"set {section}.distributed.zero_stage to 1-3 (and, for a ZeRO-0 checkpoint, resume it once with its own procs and stage)."
        )


def convert(checkpoint: Path, target: Path) -> Path:
    """``target`` as the universal form of DeepSpeed checkpoint directory ``checkpoint`` (converted once)."""
    if target.exists():
        return target
    from deepspeed.checkpoint import ds_to_universal

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # one worker each: the converter's process pools would compete with the ranks for cores;
    # our checkpoints carry no universal-info block, so the converter adds the default one
    options = dict(num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(argparse.Namespace(input_folder=str(checkpoint), output_folder=str(partial), **options))
    os.replace(partial, target)
    return target


def load_resharded(
    engine, work: Path, checkpoints: Path, tag: str, marker: dict[str, Any], world: int, zero_stage: int, rank: int, barrier: Callable[[], None], section: str
):
    """DeepSpeed's (path, client state) of checkpoint ``tag`` loaded into ``engine`` (``world`` ranks,
    ZeRO ``zero_stage``) through its universal form; every rank calls it."""
    check_reshardable(marker, tag, world, zero_stage, section)
    root = work / UNIVERSAL
    if rank == 0:
        print(
            f"[{section}] checkpoint {tag} has {marker['world_size']} ranks, ZeRO {marker['zero_stage']}; this run {world} ranks, ZeRO {zero_stage}: "
            f"loading its universal form ({root / tag})", flush=True,
        )
        root.mkdir(parents=True, exist_ok=True)
        convert(checkpoints / tag, root / tag)
    barrier()
    if not (root / tag).exists():
        raise ReshardError(f"rank {rank} does not see {root / tag}, which rank 0 converted: several nodes need a shared {section}.distributed.work_dir")
    # the switch is read at load time only; later loads (a rollback) read this run's own checkpoints
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(str(root), tag=tag)
    finally:
        config.load_universal_checkpoint = False


def rng_file(checkpoint: Path, rank: int, old_world: int) -> Path:
    """This rank's RNG state in a checkpoint of `old_world` ranks: its own, or rank (rank mod old_world)'s."""
    return checkpoint / f"rng_rank{rank % old_world:05d}.pt"
