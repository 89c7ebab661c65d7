"""Stage `reward_model`: a Bradley-Terry reward model on the SFT model, with DeepSpeed.

Inputs: the `preference_data` stage (pairs, index.json format "preference") and the `sft` stage
(its ``model/`` is the body; its ``hf/`` tokenizer files ship with the export). Config: the
``reward_model`` section (the shared training recipe plus ``enabled``, ``margin``, ``center_coef``).

The model is the SFT transformer without its output projection and a scalar head on the final
hidden state, read at each side's last token (the reply's closing ``<|end|>``). The loss is
-log sigmoid(r_chosen - r_rejected - margin), plus center_coef * mean((r_c + r_r)^2) when set.
Launch, checkpoints and resume are shared with the other training stages (tasks/train/launch.py).

Outputs: ``metrics.jsonl`` (train loss / accuracy / margin per step; held-out ``val_accuracy``,
``val_margin`` and the length-only baseline's accuracy), ``plots/loss.png``, the weights
(``model/``: model.safetensors, model_config.json and ``reward.json`` with the mean and std of
the final model's rewards over the training replies, for normalising rewards later) and a
Hugging Face ``LlamaForSequenceClassification`` export (``hf/``, num_labels=1)::

    AutoModelForSequenceClassification.from_pretrained("<stage dir>/hf")   # logits [B, 1]: the reward

Run alone: ``lmf run --until reward_model``.
"""
from __future__ import annotations

from pathlib import Path

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.train.launch import TrainStats, check_splits, model_dir, pick_inputs, plot_curves, section_of, train_stats, training, upload_final

CODE_VERSION = "1"

# what the SFT stage's hf/ holds besides the tokenizer
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


class RewardModelError(RuntimeError):
    pass


class RewardModelStats(TrainStats):
    val_accuracy: float | None  # held-out pairs whose chosen reply scores higher
    first_val_accuracy: float | None
    val_margin: float | None  # mean r_chosen - r_rejected on held-out pairs
    length_baseline_accuracy: float | None  # "the longer reply wins" on the same pairs (a tie counts half)
    train_accuracy: float | None  # of the final model over every training pair
    reward_mean: float  # over every training reply (both sides), saved in model/reward.json
    reward_std: float
    pairs: int | None  # in the preference_data stage (train + val)


def run_reward_model(cfg, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> RewardModelStats:
    rm = section_of(cfg, "reward_model")
    refs = pick_inputs(out, inputs, required=("preference_data", "policy"), optional=(), section="reward_model")
    index = check_splits(out, refs["preference_data"], "preference_data")
    job = {
        "objective": "reward",
        "data": refs["preference_data"],
        "init_from": model_dir(out, refs["policy"]),
        "options": {"margin": rm.margin, "center_coef": rm.center_coef},
    }
    with training(out, rm, job, "reward_model", RewardModelError) as run:
        upload_final(out, run.work)
        exported = export(rm, out, run.work, refs["policy"], index)
        panels = [("pairwise loss", "loss", "val_loss"), ("accuracy", "accuracy", "val_accuracy"), ("margin r_c - r_r", "margin", "val_margin")]
        plot = plot_curves(run.records, run.work / "loss.png", panels)
        if plot:
            out.put_file(plot, "plots/loss.png")
        val_rows, s = run.rows("val"), run.summary
        last = val_rows[-1] if val_rows else {}
        return RewardModelStats(
            **train_stats(run, exported),
            val_accuracy=last.get("val_accuracy"),
            first_val_accuracy=val_rows[0]["val_accuracy"] if val_rows else None,
            val_margin=last.get("val_margin"),
            length_baseline_accuracy=last.get("val_length_baseline_accuracy"),
            train_accuracy=s.get("train_accuracy"),
            reward_mean=s["reward_mean"],
            reward_std=s["reward_std"],
            pairs=index.get("pairs"),
        )


def export(rm, out: StageDir, work: Path, sft_ref: StageRef, index: dict) -> str:
    """hf/: LlamaForSequenceClassification plus the SFT export's tokenizer files (same tokenizer, same chat template)."""
    if not rm.export_hf:
        return "off (reward_model.export_hf)"
    import json

    if json.loads((work / "final" / "model_config.json").read_text()).get("moe_experts"):
        return "skipped: mixture-of-experts has no LlamaForSequenceClassification form (weights are in model/)"
    if json.loads((work / "final" / "model_config.json").read_text()).get("attention", "dense") != "dense":
        return "skipped: LSH attention (model.attention) has no LlamaForSequenceClassification form (weights are in model/)"
    from lmfoundry.model.export import export_reward_model

    special = {role: index.get(f"{role}_id") for role in ("bos", "eos", "pad")}
    files = export_reward_model(work / "final", work / "hf", index["seq_len"] + 1, None, {k: v for k, v in special.items() if v is not None})
    for name in files:
        out.put_file(work / "hf" / name, f"hf/{name}")
    reader = out.store.reader(sft_ref)
    tokenizer = [f for f in reader.files("hf/") if f.split("/", 1)[1] not in MODEL_FILES]
    for rel in tokenizer:
        out.write_bytes(rel, reader.read_bytes(rel))
    return "hf" if tokenizer else "hf (the sft stage exported no tokenizer: weights and config only)"
