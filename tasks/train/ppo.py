"""Stage `ppo`: reinforcement learning from the reward model (PPO, or GRPO), with DeepSpeed.

Inputs: the `sft` stage (its ``model/`` is where the actor starts and the frozen reference), the
`reward_model` stage (its ``model/`` scores responses and is where the critic starts), the
`preference_data` stage (its prompts; not needed with ``ppo.prompts_file``) and `train_tokenizer`
(shipped with the export; encodes a prompts file; decodes samples). Config: the ``ppo`` section
(infra/config_posttrain.py).

Each iteration generates responses to a batch of prompts with the current policy, scores them
(reward-model score at the end of the response, normalised with the mean/std in
``reward.json``, clipped, minus an optional missing-EOS penalty), penalises the per-token KL to
the reference (fixed or adaptive coefficient), and runs a few epochs of clipped PPO updates:
GAE against the critic (``advantage: gae``) or group-normalised rewards without a critic
(``advantage: grpo``). The run itself is model/ppo_train.py; launch, checkpoint sync and resume
are the other training stages' (tasks/train/launch.py): a killed run continues from its newest
committed checkpoint (engines, KL controller, iteration; every random draw is seeded by the
iteration) and ends bit-identical to an uninterrupted one.

Outputs: ``metrics.jsonl`` (per iteration: reward, KL, KL coefficient, entropy, policy and value
loss, clip fractions, approx-KL, ratio mean, log-prob drift, explained variance, response length,
EOS rate, seconds generating / scoring / training; greedy ``val_reward`` every eval_every),
``samples.jsonl`` (prompts and responses as text with their rewards), ``plots/ppo.png``, the
final policy (``model/``) and a Hugging Face ``LlamaForCausalLM`` export with the tokenizer and
chat template (``hf/``). Talk to it: ``lmf chat --model ppo``.

Run alone: ``lmf run --until ppo``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.ppo_train import SAMPLES, PpoJob
from lmfoundry.tasks.train.launch import TrainInputError, export_policy, model_dir, pick_inputs, plot_curves, section_of, training, upload_final
from lmfoundry.tasks.train.ppo_prompts import file_prompts, preference_prompts, prompts_fingerprint

CODE_VERSION = "1"


class PpoError(RuntimeError):
    pass


class PpoStats(BaseModel):
    steps: int  # iterations
    resumed_from_step: int | None
    advantage: str
    parameters: int
    world_size: int
    prompts: int  # training prompts (distinct, within prompt_max_len)
    val_prompts: int
    prompts_too_long: int  # left out: longer than ppo.prompt_max_len
    reward_first: float  # mean raw score of the first iteration's samples
    reward_last: float
    val_reward_first: float | None  # greedy responses to validation prompts, before the first iteration (the SFT policy)
    val_reward_last: float | None
    kl_last: float  # per response, summed over its tokens
    kl_coef_last: float
    response_length_first: float
    response_length_last: float
    eos_rate_last: float
    train_seconds: float
    seconds_generate: float  # summed over the logged iterations
    seconds_score: float
    seconds_train: float
    checkpoints_committed: int
    exported: str  # "hf" or why not
    reward_curve: list[list[float]]  # [iteration, reward], at most 20 points


def input_fingerprint(cfg) -> str:
    """The prompts file, when one is configured (it is not a stage: changes to it re-run ppo)."""
    return prompts_fingerprint(section_of(cfg, "ppo"))


def load_prompts(out: StageDir, cfg, refs: dict[str, StageRef | None]) -> dict[str, Any]:
    """Prompts, pad and stop ids for the job, from ppo.prompts_file or the preference data."""
    if cfg.prompts_file:
        if refs["tokenizer"] is None:
            raise TrainInputError("ppo.prompts_file needs the train_tokenizer input to encode the prompts; add it to the stage's inputs in flows/pipeline.py")
        from lmfoundry.tasks.chat.common import ChatTokenizer

        tok = ChatTokenizer.from_inputs(out.store, [refs["tokenizer"]], "ppo")
        train, val = file_prompts(cfg, tok)
        special = tok.special
        ids = {"pad_id": special["pad"], "stop_ids": [special["end"], special["eos"]]}
    else:
        ref = refs["preference_data"]
        if ref is None:
            raise TrainInputError(
                "ppo needs prompts: an input with preference pairs (index.json format 'preference', from the preference_data stage) "
                "or ppo.prompts_file (JSONL/Parquet rows with 'prompt' or 'messages')"
            )
        train, val = preference_prompts(out.store, ref)
        index = out.store.reader(ref).read_json("index.json")
        ids = {"pad_id": index["pad_id"], "stop_ids": [index["end_id"], index["eos_id"]], "data_seq_len": index.get("seq_len", 0)}
    kept = [p for p in train if len(p) <= cfg.prompt_max_len]
    if not kept:
        longest = min(len(p) for p in train) if train else 0
        raise TrainInputError(f"no training prompt fits ppo.prompt_max_len {cfg.prompt_max_len} (the shortest has {longest} tokens): raise ppo.prompt_max_len")
    return {"prompts": kept, "val_prompts": [p for p in val if len(p) <= cfg.prompt_max_len], "too_long": len(train) - len(kept), **ids}


def run_ppo(cfg, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> PpoStats:
    ppo = section_of(cfg, "ppo")
    refs = pick_inputs(out, inputs, required=("policy", "reward"), optional=("preference_data", "tokenizer"), section="ppo")
    prompts = load_prompts(out, ppo, refs)
    job = {
        "init_from": model_dir(out, refs["policy"]), "reward_from": model_dir(out, refs["reward"]), "prompts": prompts["prompts"],
        "val_prompts": prompts["val_prompts"], "pad_id": prompts["pad_id"], "stop_ids": prompts["stop_ids"],
    }
    with training(out, ppo, job, "ppo", PpoError, job_class=PpoJob) as run:
        upload_final(out, run.work)
        seq_len = max(run.summary["seq_len"], prompts.get("data_seq_len", 0))
        exported = export_policy(out, run.work, ppo, refs["tokenizer"], seq_len, "ppo")
        write_samples(out, run.work, refs["tokenizer"])
        # the actor loss panel, then infra/report's panels for reward / val_reward and KL
        plot = plot_curves(run.records, run.work / "ppo.png", [("ppo: actor loss, reward, KL", "loss", "val_loss")])
        if plot:
            out.put_file(plot, "plots/ppo.png")
        return ppo_stats(run, exported, prompts)


def write_samples(out: StageDir, work: Path, tokenizer_ref: StageRef | None) -> None:
    """samples.jsonl with the prompts and responses decoded (when there is a tokenizer)."""
    path = work / SAMPLES
    if not path.exists():
        return
    decode = None
    if tokenizer_ref is not None:
        from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer

        tokenizer, _ = load_tokenizer(out.store, tokenizer_ref)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    lines = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if decode:
            row.update(prompt_text=decode(row["prompt"]), response_text=decode(row["response"]))
        lines.append(json.dumps(row, sort_keys=True, ensure_ascii=False))
    out.write_bytes(SAMPLES, ("\n".join(lines) + "\n").encode())


def ppo_stats(run, exported: str, prompts: dict[str, Any]) -> PpoStats:
    train_rows, val_rows, s = run.rows("train"), run.rows("val"), run.summary
    first, last = train_rows[0], train_rows[-1]
    stride = max(1, len(train_rows) // 20)
    return PpoStats(
        steps=s["steps"], resumed_from_step=run.resumed_from_step, advantage=s["advantage"], parameters=s["parameters"], world_size=s["world_size"],
        prompts=len(prompts["prompts"]), val_prompts=len(prompts["val_prompts"]), prompts_too_long=prompts["too_long"],
        reward_first=first["reward"], reward_last=last["reward"],
        val_reward_first=val_rows[0]["val_reward"] if val_rows else None, val_reward_last=val_rows[-1]["val_reward"] if val_rows else None,
        kl_last=last["kl"], kl_coef_last=s["kl_coef"], response_length_first=first["response_length"], response_length_last=last["response_length"],
        eos_rate_last=last["eos_rate"], train_seconds=s["seconds"],
        seconds_generate=sum(r["time_generate"] for r in train_rows), seconds_score=sum(r["time_score"] for r in train_rows),
        seconds_train=sum(r["time_train"] for r in train_rows), checkpoints_committed=run.checkpoints_committed, exported=exported,
        reward_curve=[[r["step"], round(r["reward"], 4)] for r in train_rows[::stride]],
    )
