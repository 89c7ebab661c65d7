"""Stage `dpo`: direct preference optimisation of the SFT model, with DeepSpeed.

Inputs: the `preference_data` stage (pairs, index.json format "preference"), the `sft` stage (its
``model/`` is both the starting policy and the frozen reference) and `train_tokenizer` (shipped
with the export). Config: the ``dpo`` section (the shared training recipe plus ``enabled`` and
``beta``).

Before the first step the starting model computes the summed log-probs of every reply (train and
val) once; they are stored in the stage as ``reference/{train,val}.arrow`` (id, chosen,
rejected), uploaded as soon as they exist, so a resumed run reads them instead of keeping a
second model in memory or recomputing them. The loss is the sigmoid DPO loss
-log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r))). Launch, checkpoints and
resume are shared with the other training stages (tasks/train/launch.py).

Outputs: ``metrics.jsonl`` (train loss, implicit-reward accuracy and margin per step; held-out
``val_accuracy``, ``val_margin``, ``val_chosen_reward``, ``val_rejected_reward``),
``plots/loss.png``, ``reference/``, the weights (``model/``) and a Hugging Face
``LlamaForCausalLM`` export with the tokenizer and chat template (``hf/``).

Run alone: ``lmf run --until dpo``.
"""
from __future__ import annotations

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.train.launch import TrainStats, check_splits, export_policy, model_dir, pick_inputs, plot_curves, section_of, train_stats, training, upload_final

CODE_VERSION = "1"

REFERENCE = "reference"  # model/objectives.py REFERENCE_DIR: the frozen model's log-probs


class DpoError(RuntimeError):
    pass


class DpoStats(TrainStats):
    beta: float
    val_accuracy: float | None  # held-out pairs whose chosen reply gains more implicit reward
    first_val_accuracy: float | None
    val_margin: float | None  # mean implicit-reward margin on held-out pairs
    val_chosen_reward: float | None  # mean beta * (log pi - log ref) of chosen replies
    val_rejected_reward: float | None
    pairs: int | None  # in the preference_data stage (train + val)


def run_dpo(cfg, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> DpoStats:
    dpo = section_of(cfg, "dpo")
    refs = pick_inputs(out, inputs, required=("preference_data", "policy"), optional=("tokenizer",), section="dpo")
    index = check_splits(out, refs["preference_data"], "preference_data")
    job = {"objective": "dpo", "data": refs["preference_data"], "init_from": model_dir(out, refs["policy"]), "options": {"beta": dpo.beta}}
    with training(out, dpo, job, "dpo", DpoError, pinned=(REFERENCE,)) as run:
        upload_final(out, run.work)
        exported = export_policy(out, run.work, dpo, refs["tokenizer"], run.summary["seq_len"], "dpo")
        panels = [("DPO loss", "loss", "val_loss"), ("implicit-reward accuracy", "accuracy", "val_accuracy"), ("implicit-reward margin", "margin", "val_margin")]
        plot = plot_curves(run.records, run.work / "loss.png", panels)
        if plot:
            out.put_file(plot, "plots/loss.png")
        val_rows = run.rows("val")
        last = val_rows[-1] if val_rows else {}
        return DpoStats(
            **train_stats(run, exported),
            beta=dpo.beta,
            val_accuracy=last.get("val_accuracy"),
            first_val_accuracy=val_rows[0]["val_accuracy"] if val_rows else None,
            val_margin=last.get("val_margin"),
            val_chosen_reward=last.get("val_chosen_reward"),
            val_rejected_reward=last.get("val_rejected_reward"),
            pairs=index.get("pairs"),
        )
