"""The PPO / GRPO run: one DeepSpeed rank per process, an actor and (for GAE) a critic engine.

Normally started by the `ppo` stage (tasks/train/ppo.py), which writes the job file (a
``PpoJob``: the ``ppo`` section, the SFT and reward model directories, the prompts as token ids)
and uploads what this leaves in the work directory. By hand::

    python -m lmfoundry.model.ppo_train --job job.json                                   # one rank
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module lmfoundry.model.ppo_train --job job.json

Models: the actor (DeepSpeed engine, ZeRO stage from ``ppo.distributed``) starts from the SFT
policy; the critic (engine, GAE only) from the reward model with its head read at every token
(model/heads.py ValueModel); the reference (the SFT policy) and the reward model are frozen
plain modules in eval mode, in the training precision. Under ZeRO-3 the actor generates
inside ``GatheredParameters``.

One iteration (model/ppo.py holds the tensors, model/rl.py the math):
1. the next rollout_batch_size / group_size prompts of a seeded order (each rank its slice;
   GRPO repeats each prompt group_size times, side by side);
2. sampling with a generator seeded by (seed, iteration, rank) and stop ids {<|end|>, <|eos|>};
3. one no-grad forward each: old and reference log-probs, values, reward-model scores
   (normalised with reward.json's mean/std, missing-EOS penalty, clipped), per-token KL;
4. advantages: GAE over KL-shaped rewards, whitened; or GRPO's group-normalised scores;
5. ppo_epochs over seeded minibatches: clipped policy loss (and the critic's clipped value
   loss); DeepSpeed clips gradients and steps the warmup + cosine schedule;
6. the KL controller (fixed, or adaptive toward kl_target) sees the batch's mean KL.
Every random choice is drawn from generators seeded by (seed, iteration, rank), so a resumed
run repeats exactly what an uninterrupted one does.

Work directory, written by rank 0 (other ranks add their checkpoint shards)::

    metrics.jsonl                 one JSON object per iteration ("train") and per evaluation ("val",
                                  the first at step 0: the SFT policy's greedy reward)
    samples.jsonl                 sample responses as token ids, every sample_every iterations
    checkpoints/step-0000004/     actor/, critic/ (DeepSpeed), rng_rankNNNNN.pt, samples.jsonl,
                                  COMPLETE.json last (iteration, KL controller, prompt position)
    final/                        the actor's fp32 weights in our format
    DONE.json                     summary, written last
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from lmfoundry.infra import faults
from lmfoundry.infra.config_posttrain import PpoConfig
from lmfoundry.infra.heartbeat import beat
from lmfoundry.model import ppo
from lmfoundry.model.generate import GREEDY, Sampling, generate
from lmfoundry.model.heads import ValueModel, load_reward_model, reward_stats
from lmfoundry.model.rl import KLController
from lmfoundry.model.train import COMPLETE, DONE, METRICS, DivergenceError, run_rank, keep_metrics_until, rng_state, set_rng_state, step_tag, write_json_atomic
from lmfoundry.model.engine import build_engine, lr_at, micro_steps
from lmfoundry.model.cluster import init_distributed, rank_device
from lmfoundry.model.transformer import load_model, save_model

SECTION = "ppo"
SAMPLES = "samples.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PpoJob(BaseModel):
    recipe: PpoConfig
    store_url: str = ""
    storage_options: dict[str, Any] = {}
    init_from: str  # the SFT policy's model/ directory: the actor's start and the frozen reference
    reward_from: str  # the reward model's model/ directory (with reward.json): scorer and critic start
    prompts: list[list[int]]  # training prompts, templated, ending with <|assistant|>
    val_prompts: list[list[int]] = []  # for the greedy-reward evaluation
    pad_id: int
    stop_ids: list[int]  # <|end|> and <|eos|>
    work_dir: str
    resume_tag: str | None = None


def seed_for(*parts: int) -> int:
    """A generator seed from (seed, iteration, rank, purpose): independent streams, no state to save."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start .. start + count - 1 of an endless stream of prompt indices: a fresh
    seeded permutation of range(n) per pass, so position p alone says which prompt comes."""
    out, perms = [], {}
    for position in range(start, start + count):
        epoch = position // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed % 2**32, epoch]).permutation(n)
        out.append(int(perms[epoch][position % n]))
    return out


class PpoTrainer:
    """The run; ``scorer`` replaces the reward model's score (a rule reward: tests, verifiable tasks)."""

    def __init__(self, job: PpoJob, scorer: ppo.Scorer | None = None):
        import torch.distributed as dist

        self.job, self.cfg, self.dist = job, job.recipe, dist
        cfg = self.cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        init_distributed(cfg.distributed)  # with distributed.collective_timeout_s
        self.world = dist.get_world_size()
        self.device = rank_device(cfg.distributed, self.local_rank)
        self.work = Path(job.work_dir)
        self.checkpoints = self.work / "checkpoints"
        self.metrics_path, self.samples_path = self.work / METRICS, self.work / SAMPLES
        if self.rank == 0:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.check_batches()

        dtype = DTYPES[cfg.precision]
        torch.manual_seed(cfg.seed)
        policy = load_model(job.init_from)
        self.model_cfg = policy.cfg
        self.check_inputs()
        self.reference = load_model(job.init_from, dtype).to(self.device).eval().requires_grad_(False)
        self.reward_stats = reward_stats(job.reward_from)
        if cfg.reward_normalize and not (self.reward_stats.get("std") or 0) > 0:
            raise ValueError(f"{job.reward_from}/reward.json has no positive std to normalise rewards with: set ppo.reward_normalize: false")
        if scorer is None:
            scorer = ppo.RewardModelScorer(load_reward_model(job.reward_from, dtype).to(self.device).eval().requires_grad_(False))
        self.scorer = scorer
        self.aux_weight = self.model_cfg.moe_aux_weight if self.model_cfg.moe_experts else 0.0

        # the schedule counts optimizer steps: updates_per_iteration of them per iteration
        u = cfg.updates_per_iteration
        self.schedule = cfg.model_copy(update={"steps": cfg.steps * u, "warmup_steps": cfg.warmup_steps * u})
        policy.activation_checkpointing = cfg.distributed.activation_checkpointing
        self.n_params = policy.num_parameters()
        self.actor = build_engine(policy, self.schedule, self.world, SECTION)
        self.critic = None
        if cfg.advantage == "gae":
            critic = load_reward_model(job.reward_from, cls=ValueModel)
            critic.activation_checkpointing = cfg.distributed.activation_checkpointing
            scale = cfg.critic_lr / cfg.lr
            self.critic = build_engine(critic, self.schedule.model_copy(update={"lr": cfg.critic_lr, "min_lr": cfg.min_lr * scale}), self.world, SECTION)
        self.ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.iteration = 0
        if job.resume_tag:
            self.resume(job.resume_tag)
        if self.rank == 0:
            keep_metrics_until(self.metrics_path, self.iteration)
            keep_metrics_until(self.samples_path, self.iteration)

    # ------------------------------------------------------------------ checks
    def check_batches(self) -> None:
        cfg, w = self.cfg, self.world
        if cfg.rollout_batch_size % (w * cfg.group_size):
            raise ValueError(f"ppo.rollout_batch_size {cfg.rollout_batch_size} does not split into {w} rank(s) x groups of ppo.group_size {cfg.group_size}")
        if not self.job.prompts:
            raise ValueError("the PPO job has no training prompts")

    def check_inputs(self) -> None:
        vocab = self.model_cfg.vocab_size
        top = max(max(p) for p in self.job.prompts + self.job.val_prompts if p)
        if top >= vocab:
            raise ValueError(f"a prompt holds token id {top} but the policy in {self.job.init_from} has {vocab} tokens: use the tokenizer the SFT model was trained with")
        rm_cfg = json.loads((Path(self.job.reward_from) / "model_config.json").read_text())
        if rm_cfg.get("vocab_size") != vocab:
            raise ValueError(f"the reward model in {self.job.reward_from} has a vocabulary of {rm_cfg.get('vocab_size')}, the policy {vocab}: train both from the same tokenizer")

    # ------------------------------------------------------------------ collectives and logs
    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{SECTION}] {text}", flush=True)

    def append(self, path: Path, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        names = sorted(values)
        tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(tensor)
        return dict(zip(names, (tensor / self.world).tolist()))

    def gathered(self):
        """Generation reads every weight of the actor: under ZeRO-3 gather them for the duration."""
        if self.cfg.distributed.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.actor.module.parameters()))
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one iteration
    def local_prompts(self, iteration: int) -> list[list[int]]:
        cfg = self.cfg
        per_iteration = cfg.rollout_batch_size // cfg.group_size  # prompts over all ranks
        per_rank = per_iteration // self.world
        order = prompt_order(len(self.job.prompts), cfg.seed, iteration * per_iteration + self.rank * per_rank, per_rank)
        return [self.job.prompts[i] for i in order for _ in range(cfg.group_size)]

    def generate(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator | None):
        with self.gathered():
            if not prompts:
                return None
            return generate(
                self.actor.module, prompts, max_new_tokens=self.cfg.max_new_tokens, pad_id=self.job.pad_id,
                stop_ids=self.job.stop_ids, sampling=sampling, generator=generator,
            )

    def step(self) -> tuple[dict[str, float], ppo.Rollout]:
        cfg = self.cfg
        lr = lr_at(self.iteration * cfg.updates_per_iteration, self.schedule)
        started = time.perf_counter()
        sampler = torch.Generator(device=self.device).manual_seed(seed_for(cfg.seed, self.iteration, self.rank, 0))
        gen = self.generate(self.local_prompts(self.iteration), Sampling(temperature=cfg.temperature), sampler)
        generated = time.perf_counter()
        rollout = ppo.score_rollout(gen, self.actor, self.reference, self.critic, self.scorer, cfg, self.reward_stats)
        ppo.add_advantages(rollout, cfg, self.ctl.coef)
        scored = time.perf_counter()

        shuffle = torch.Generator().manual_seed(seed_for(cfg.seed, self.iteration, self.rank, 1))
        per_rank = cfg.global_batch_size // self.world
        micro = cfg.distributed.micro_batch_size or per_rank
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            for rows in ppo.minibatches(len(rollout), per_rank, shuffle):
                chunks = [rollout.rows(part) for part in rows.split(micro)]
                stats = micro_steps(self.actor, chunks, lambda engine, mb: ppo.actor_loss(engine, mb, cfg, self.ctl.coef, self.aux_weight))
                stats["actor_grad_norm"] = stats.pop("grad_norm")
                if self.critic is not None:
                    critic_stats = micro_steps(self.critic, chunks, lambda engine, mb: ppo.critic_loss(engine, mb, cfg, self.aux_weight))
                    stats.update(critic_stats, critic_grad_norm=critic_stats.pop("grad_norm"))
                for name, value in stats.items():
                    if value is not None:
                        sums[name] = sums.get(name, 0.0) + value
                updates += 1
        trained = time.perf_counter()

        local = {**ppo.rollout_metrics(rollout), **{name: value / updates for name, value in sums.items()}}
        metrics = self.all_mean(local)
        for name in ("reward", "loss"):
            if not math.isfinite(metrics[name]):
                raise DivergenceError(
                    f"{name} became {metrics[name]} at iteration {self.iteration + 1}: training diverged. The last good checkpoint is kept; "
                    "lower ppo.lr, raise ppo.kl_coef or clip rewards (ppo.reward_clip), then run again."
                )
        coef = self.ctl.coef
        self.ctl.update(metrics["kl"], cfg.rollout_batch_size)
        metrics.update(
            kl_coef=coef, lr=lr, time_generate=generated - started, time_score=scored - generated, time_train=trained - scored,
            rollouts=cfg.rollout_batch_size,
        )
        return metrics, rollout

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to the first eval_samples validation prompts (split across ranks):
        their mean raw score, length and EOS rate."""
        prompts = self.job.val_prompts[: self.cfg.eval_samples][self.rank :: self.world]
        gen = self.generate(prompts, GREEDY, None)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        if gen is not None:
            raw = self.scorer(gen).double()
            sums += torch.stack([raw.sum(), gen.lengths.double().sum(), gen.stopped.double().sum(), torch.tensor(float(len(prompts)), dtype=torch.float64, device=self.device)])
        self.dist.all_reduce(sums)
        n = max(sums[3].item(), 1.0)
        return {"val_reward": sums[0].item() / n, "val_response_length": sums[1].item() / n, "val_eos_rate": sums[2].item() / n, "val_prompts": int(sums[3].item())}

    def log_val(self, val: dict[str, float]) -> None:
        self.append(self.metrics_path, {"kind": "val", "step": self.iteration, **val})
        self.log(f"iteration {self.iteration} greedy val_reward {val['val_reward']:.3f} length {val['val_response_length']:.1f} eos {val['val_eos_rate']:.2f}")

    def write_samples(self, rollout: ppo.Rollout) -> None:
        for b in range(min(self.cfg.samples_logged, len(rollout))):
            prompt = rollout.tokens[b, : rollout.width][rollout.mask[b, : rollout.width].bool()].tolist()
            response = rollout.response[b][rollout.response_mask[b].bool()].tolist()
            self.append(self.samples_path, {
                "step": self.iteration, "prompt": prompt, "response": response, "reward": rollout.raw_scores[b].item(),
                "score": rollout.scores[b].item(), "stopped": bool(rollout.stopped[b]),
            })

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        tag = step_tag(self.iteration)
        directory = self.checkpoints / tag
        client = {"iteration": self.iteration, "kl": self.ctl.state_dict(), "prompt_position": self.iteration * (self.cfg.rollout_batch_size // self.cfg.group_size)}
        self.actor.save_checkpoint(str(directory), tag="actor", client_state=client)
        if self.critic is not None:
            self.critic.save_checkpoint(str(directory), tag="critic")
        torch.save(rng_state(), directory / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0 and self.samples_path.exists():
            shutil.copyfile(self.samples_path, directory / SAMPLES)  # travels with the checkpoint to a new work dir
        self.dist.barrier()
        if self.rank == 0:
            marker = {"step": self.iteration, "world_size": self.world, "zero_stage": self.cfg.distributed.zero_stage, "kl_coef": self.ctl.coef, "advantage": self.cfg.advantage}
            write_json_atomic(directory / COMPLETE, marker)
            self.log(f"checkpoint {tag} saved")
            faults.hit(SECTION, "after_checkpoint", self.iteration)

    def resume(self, tag: str) -> None:
        directory = self.checkpoints / tag
        marker = json.loads((directory / COMPLETE).read_text())
        if (marker["world_size"], marker["zero_stage"]) != (self.world, self.cfg.distributed.zero_stage):
            raise RuntimeError(
                f"checkpoint {tag} was written by {marker['world_size']} ranks with ZeRO stage {marker['zero_stage']}; this run has {self.world} "
                f"ranks and stage {self.cfg.distributed.zero_stage}. Resume with the same ppo.distributed.procs and zero_stage, or change the config to start afresh."
            )
        path, client = self.actor.load_checkpoint(str(directory), tag="actor")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no actor checkpoint under {directory}")
        if self.critic is not None and self.critic.load_checkpoint(str(directory), tag="critic")[0] is None:
            raise RuntimeError(f"DeepSpeed found no critic checkpoint under {directory}")
        self.iteration = int(client["iteration"])
        self.ctl = KLController.from_state(client["kl"])
        set_rng_state(torch.load(directory / f"rng_rank{self.rank:05d}.pt", weights_only=False))
        if self.rank == 0 and (directory / SAMPLES).exists():
            shutil.copyfile(directory / SAMPLES, self.samples_path)
        self.log(f"resumed from {tag} at iteration {self.iteration} (KL coefficient {self.ctl.coef:.4g})")

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(
            f"{cfg.advantage}: {self.n_params / 1e6:.2f}M parameters, {self.world} rank(s), {cfg.steps} iterations of {cfg.rollout_batch_size} rollouts "
            f"(group {cfg.group_size}), {cfg.ppo_epochs} epochs x minibatch {cfg.global_batch_size}, {len(self.job.prompts)} prompts, "
            f"{len(self.job.val_prompts)} val prompts, up to {cfg.max_new_tokens} new tokens"
        )
        started = time.perf_counter()
        last_saved = self.iteration
        if self.iteration == 0 and self.job.val_prompts:  # the SFT policy's greedy reward: the baseline
            self.log_val(self.evaluate())
        while self.iteration < cfg.steps:
            metrics, rollout = self.step()
            self.iteration += 1
            k = self.iteration
            if self.rank == 0:
                beat(self.work, k)  # progress for the stage watchdog (infra/heartbeat.py)
            if k % cfg.log_every == 0 or k == cfg.steps:
                self.append(self.metrics_path, {"kind": "train", "step": k, **metrics})
                self.log(
                    f"iteration {k}/{cfg.steps} reward {metrics['reward']:.3f} kl {metrics['kl']:.3f} (coef {metrics['kl_coef']:.3g}) "
                    f"entropy {metrics['entropy']:.2f} length {metrics['response_length']:.1f} eos {metrics['eos_rate']:.2f} "
                    f"clip {metrics['clip_fraction']:.2f} ratio {metrics['ratio_mean']:.3f} | generate {metrics['time_generate']:.1f}s "
                    f"score {metrics['time_score']:.1f}s train {metrics['time_train']:.1f}s"
                )
            if cfg.samples_logged and (k % cfg.sample_every == 0 or k == cfg.steps):
                self.write_samples(rollout)
            if self.job.val_prompts and (k % cfg.eval_every == 0 or k == cfg.steps):
                self.log_val(self.evaluate())
            if k % cfg.checkpoint_every == 0 or k == cfg.steps:
                self.save()
                last_saved = k
        if last_saved != self.iteration:  # resumed at the final iteration: nothing left to do
            self.save()
        return self.finish(time.perf_counter() - started)

    def finish(self, seconds: float) -> dict[str, Any]:
        """The actor's fp32 weights (ZeRO >= 1: from the checkpoint's master copy) and a summary."""
        tag = step_tag(self.iteration)
        if self.cfg.distributed.zero_stage == 0:
            state = self.actor.module.state_dict() if self.rank == 0 else None
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints / tag), tag="actor") if self.rank == 0 else None
        summary: dict[str, Any] = {}
        if self.rank == 0:
            save_model({k: v.float() for k, v in state.items()}, self.model_cfg, self.work / "final")
            summary = {
                "objective": "ppo", "advantage": self.cfg.advantage, "steps": self.iteration, "seconds": seconds, "parameters": self.n_params,
                "world_size": self.world, "seq_len": self.cfg.prompt_max_len + self.cfg.max_new_tokens, "kl_coef": self.ctl.coef,
                "prompts": len(self.job.prompts), "val_prompts": len(self.job.val_prompts),
            }
            write_json_atomic(self.work / DONE, summary)
            self.log(f"done: {self.iteration} iterations in {seconds:.1f}s")
        self.dist.barrier()
        return summary


def main(argv: list[str] | None = None) -> int:
    return run_rank(argv, PpoJob, PpoTrainer, lambda job: SECTION)


if __name__ == "__main__":
    sys.exit(main())
