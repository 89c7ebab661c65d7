"""Stage `pretrain`: train the Transformer on the token shards with DeepSpeed, in a subprocess.

Inputs: the `tokenize` stage (the one holding ``index.json``) and the `train_tokenizer` stage
(holding ``tokenizer.json``, shipped with the export). The stage receives the ``model`` and
``pretrain`` config sections (``cfg.model``, ``cfg.pretrain``).

What happens (tasks/train/launch.py, shared by every training stage):
1. A local work directory gets the newest checkpoint committed by an earlier, interrupted
   attempt of this same stage version (engine state, loader position, RNG), if any.
2. ``model/train.py`` runs under the configured launcher (``deepspeed --num_gpus N`` or
   ``torchrun``, a hostfile for several nodes) with the ``pretrain`` objective; its output goes
   to the ``lmfoundry`` logger. Any rank failing fails the stage with the trainer's error.
3. While it trains, each complete checkpoint is uploaded into the stage directory
   (``COMPLETE.json`` last) with the metrics so far, keeping the newest ``keep_checkpoints``.
   A killed run therefore resumes from the newest uploaded checkpoint when the stage runs again.
4. At the end: ``metrics.jsonl``, ``plots/loss.png``, fp32 weights in our format (``model/``)
   and, for dense models, a Hugging Face ``LlamaForCausalLM`` export with the tokenizer
   (``hf/``): ``AutoModelForCausalLM.from_pretrained(<stage dir>/hf)``.

Run alone: ``lmf run --until pretrain``; several CPU ranks: ``--set pretrain.distributed.procs=2``;
GPUs: ``--set pretrain.distributed.accelerator=cuda`` (bf16, nccl and compiled blocks follow).
"""
from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_base import Sections
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.token_format import INDEX_FILE
from lmfoundry.tasks.train.launch import (  # noqa: F401  (launch helpers re-exported for older imports)
    TOKENIZER_FILE,
    CheckpointSync,
    Training,
    TrainInputError,
    committed_checkpoints,
    export_policy,
    free_port,
    launch_command,
    launch_env,
    plot_curves,
    training,
    upload_final,
)

CODE_VERSION = "1"

log = logging.getLogger("lmfoundry.pretrain")


# the stage reads two sections (flows/pipeline.py: section=("model", "pretrain")): the runner
# hands them over as one Sections with cfg.model (ModelConfig) and cfg.pretrain (PretrainConfig)
PretrainJob = Sections


class PretrainInputError(TrainInputError):
    pass


class PretrainError(RuntimeError):
    pass


class PretrainStats(BaseModel):
    steps: int
    resumed_from_step: int | None
    parameters: int
    flops_per_token: float
    seq_len: int
    vocab_size: int
    world_size: int
    tokens_trained: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    unigram_val_ppl: float | None  # the baseline a model that ignores context reaches
    val_ppl_vs_unigram: float | None  # val_ppl / unigram_val_ppl: below 1 means context is used
    first_val_ppl: float | None
    mean_tokens_per_s: float | None
    mean_mfu: float | None  # of the logging intervals; on CPU against a nominal 1 TFLOP/s (mfu_peak says)
    tokens_per_s_wall: float | None = None  # the whole run: evaluation and checkpoints included
    mfu_wall: float | None = None
    mfu_peak: str | None = None  # where the peak came from (device table, configured, cpu nominal)
    mfu_flops: str | None = None  # the FLOP convention of every MFU (model/accel.py FLOP_CONVENTION)
    train_seconds: float
    checkpoints_committed: int
    exported: str  # "hf" or why not
    loss_curve: list[list[float]]  # [step, train loss], at most 20 points


# ---------------------------------------------------------------------- inputs


def split_inputs(out: StageDir, inputs: list[StageRef]) -> tuple[StageRef, StageRef | None]:
    """(token shards ref, tokenizer ref or None), told apart by the files they hold."""
    tokens = [r for r in inputs if INDEX_FILE in out.store.reader(r).manifest["files"]]
    tokenizers = [r for r in inputs if TOKENIZER_FILE in out.store.reader(r).manifest["files"]]
    if len(tokens) != 1:
        raise PretrainInputError(
            f"pretrain needs exactly one input with token shards ({INDEX_FILE}, from the tokenize stage); "
            f"got {len(tokens)} among {[r.stage for r in inputs]}. List 'tokenize' in the stage's inputs."
        )
    if len(tokenizers) > 1:
        raise PretrainInputError(f"pretrain got {len(tokenizers)} tokenizer inputs {[r.stage for r in tokenizers]}; list one")
    return tokens[0], (tokenizers[0] if tokenizers else None)


def check_splits(out: StageDir, tokens_ref: StageRef) -> None:
    """Fail before launching anything when a split the trainer reads is empty."""
    index = out.store.reader(tokens_ref).read_json(INDEX_FILE)
    for split, advice in (("train", "add documents"), ("val", "raise tokenize.val_fraction (e.g. 0.1 for a small corpus)")):
        if not sum(entry["samples"] for entry in index["splits"].get(split, [])):
            raise PretrainInputError(f"the {split} split of {tokens_ref.stage}/{tokens_ref.version} has no samples: {advice}")


# ---------------------------------------------------------------------- the stage


def run_pretrain(cfg: PretrainJob, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> PretrainStats:
    tokens_ref, tokenizer_ref = split_inputs(out, inputs)
    check_splits(out, tokens_ref)
    job = {"objective": "pretrain", "model": cfg.model, "data": tokens_ref}
    with training(out, cfg.pretrain, job, "pretrain", PretrainError) as run:
        return finish(cfg, out, run, tokenizer_ref)


def finish(cfg: PretrainJob, out: StageDir, run: Training, tokenizer_ref: StageRef | None) -> PretrainStats:
    records, summary, work = run.records, run.summary, run.work
    upload_final(out, work)
    exported = export(cfg, out, work, tokenizer_ref, summary["seq_len"])
    plot = plot_curves(records, work / "loss.png", [("pretrain: cross-entropy (nats/token)", "ce", "val_loss")])
    if plot:
        out.put_file(plot, "plots/loss.png")
    train_rows = [r for r in records if r["kind"] == "train"]
    val_rows = [r for r in records if r["kind"] == "val"]
    last_val = val_rows[-1] if val_rows else {}
    throughput = [r["tokens_per_s"] for r in train_rows]
    mfu = [r["mfu"] for r in train_rows if r.get("mfu") is not None]  # None: a GPU of unknown peak
    unigram = last_val.get("unigram_ppl")
    stride = max(1, len(train_rows) // 20)
    return PretrainStats(
        steps=summary["steps"],
        resumed_from_step=run.resumed_from_step,
        parameters=summary["parameters"],
        flops_per_token=summary["flops_per_token"],
        seq_len=summary["seq_len"],
        vocab_size=summary["vocab_size"],
        world_size=summary["world_size"],
        tokens_trained=summary["steps"] * cfg.pretrain.global_batch_size * summary["seq_len"],
        train_loss=train_rows[-1]["loss"] if train_rows else None,
        val_loss=last_val.get("val_loss"),
        val_ppl=last_val.get("val_ppl"),
        unigram_val_ppl=unigram,
        val_ppl_vs_unigram=last_val["val_ppl"] / unigram if unigram else None,
        first_val_ppl=val_rows[0]["val_ppl"] if val_rows else None,
        mean_tokens_per_s=sum(throughput) / len(throughput) if throughput else None,
        mean_mfu=sum(mfu) / len(mfu) if mfu else None,
        tokens_per_s_wall=summary.get("tokens_per_s_wall"),
        mfu_wall=summary.get("mfu_wall"),
        mfu_peak=(summary.get("fast_path") or {}).get("peak_source"),
        mfu_flops=(summary.get("fast_path") or {}).get("flop_convention"),
        train_seconds=summary["seconds"],
        checkpoints_committed=run.checkpoints_committed,
        exported=exported,
        loss_curve=[[r["step"], round(r["loss"], 4)] for r in train_rows[::stride]],
    )


def export(cfg: PretrainJob, out: StageDir, work: Path, tokenizer_ref: StageRef | None, seq_len: int) -> str:
    if cfg.pretrain.export_hf and cfg.model.moe_experts:
        return "skipped: mixture-of-experts has no LlamaForCausalLM form (weights are in model/)"
    return export_policy(out, work, cfg.pretrain, tokenizer_ref, seq_len, "pretrain")


