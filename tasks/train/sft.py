"""Stage `sft`: supervised fine-tuning of the pretrained model on packed chat data, with DeepSpeed.

Inputs: the `sft_data` stage (packed rows, index.json format "sft"), the `pretrain` stage (its
``model/`` is where training starts) and `train_tokenizer` (shipped with the export). Config:
the ``sft`` section (infra/config_posttrain.py: the shared training recipe plus ``enabled``).

The loss is cross-entropy on assistant tokens only (their content and closing ``<|end|>``),
averaged over every such token of the global batch. Conversations packed into one row restart
their positions and attend only within themselves (block-diagonal causal attention), so
packing changes nothing a conversation sees. Launch, checkpoint sync and resume are the
pretrain stage's (tasks/train/launch.py): a killed run continues from its newest committed
checkpoint and ends bit-identical to an uninterrupted one.

Outputs: ``metrics.jsonl`` (train loss per step; held-out assistant-token ``val_loss`` and
``val_ppl``), ``plots/loss.png``, fp32 weights in our format (``model/``) and a Hugging Face
``LlamaForCausalLM`` export with the tokenizer and its chat template (``hf/``)::

    AutoModelForCausalLM.from_pretrained("<stage dir>/hf"); AutoTokenizer.from_pretrained("<stage dir>/hf")

Run alone: ``lmf run --until sft``; GPUs: ``--set sft.distributed.accelerator=cuda`` (bf16, nccl and compiled blocks follow).
"""
from __future__ import annotations

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.train.launch import TrainStats, check_splits, export_policy, model_dir, pick_inputs, plot_curves, section_of, train_stats, training, upload_final

CODE_VERSION = "1"


class SftError(RuntimeError):
    pass


class SftStats(TrainStats):
    val_ppl: float | None  # perplexity of held-out assistant tokens
    first_val_ppl: float | None
    rows: int  # packed training rows
    conversations: int | None  # in the sft_data stage (train + val)


def run_sft(cfg, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> SftStats:
    sft = section_of(cfg, "sft")
    refs = pick_inputs(out, inputs, required=("sft_data", "policy"), optional=("tokenizer",), section="sft")
    index = check_splits(out, refs["sft_data"], "sft_data")
    job = {"objective": "sft", "data": refs["sft_data"], "init_from": model_dir(out, refs["policy"])}
    with training(out, sft, job, "sft", SftError) as run:
        upload_final(out, run.work)
        exported = export_policy(out, run.work, sft, refs["tokenizer"], run.summary["seq_len"], "sft")
        plot = plot_curves(run.records, run.work / "loss.png", [("assistant-token loss (nats)", "ce", "val_loss")])
        if plot:
            out.put_file(plot, "plots/loss.png")
        val_rows = run.rows("val")
        return SftStats(
            **train_stats(run, exported),
            val_ppl=val_rows[-1]["val_ppl"] if val_rows else None,
            first_val_ppl=val_rows[0]["val_ppl"] if val_rows else None,
            rows=sum(entry["samples"] for entry in index["splits"]["train"]),
            conversations=index.get("conversations"),
        )
