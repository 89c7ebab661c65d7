"""What a training run optimises: pretrain, sft, reward, dpo. The run loop (model/train.py) owns
everything else: DeepSpeed engine, checkpoints, exact resume, metrics, divergence stop, cadence.

An objective is built from the job and the running Trainer (ranks, device, collectives) and
provides, in the order the loop calls them::

    loaders(store) -> (train, val)       train: next() per micro batch, state_dict/load_state_dict;
                                          val: eval_batches()
    build_model() -> nn.Module           after torch.manual_seed(recipe.seed); .cfg is a ModelConfig
    prepare(engine)                      before training and before a resume (DPO: reference log-probs)
    begin_step(batches)                  the step's micro batches on this rank (SFT: token normaliser)
    loss(engine, batch) -> (total, metrics)   per micro batch; metrics names are `metrics` + "tokens"
    evaluate(engine) -> dict             held-out numbers, reduced over ranks
    finalize(engine) -> dict             after training, on every rank (reward mean / std)
    save(state_dict, directory, extra)   rank 0: the final fp32 weights in our format

Per-step metrics are averaged over micro batches and ranks, except "tokens", which is summed.
Run a job with ``python -m lmfoundry.model.train --job job.json`` (see model/train.py).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmfoundry.infra.store import Store
from lmfoundry.model.chat_loader import PreferenceLoader, SftLoader, segment_ids
from lmfoundry.model.heads import RewardModel, save_reward_model
from lmfoundry.model.loader import LoaderError, TokenLoader
from lmfoundry.model.losses import (
    IGNORE_INDEX, CESums, cross_entropy, dpo_loss, fused_cross_entropy, lm_loss_from_sums, masked_targets, reward_loss, sequence_logprobs, split_batch,
)
from lmfoundry.model.transformer import Transformer, load_model, resolve, save_model
from lmfoundry.model.parallel import local_slice, sp_lm_loss

REFERENCE_DIR = "reference"  # DPO: the frozen model's log-probs, beside the checkpoints in the work dir
COMPLETE = "COMPLETE.json"


class Objective:
    name = ""
    metrics: tuple[str, ...] = ("loss",)

    def __init__(self, job, trainer):
        self.job, self.t, self.cfg = job, trainer, job.recipe
        self.options = job.options

    # ------------------------------------------------------------------ defaults
    def prepare(self, engine) -> None:
        pass

    def begin_step(self, batches: list) -> None:
        pass

    def finalize(self, engine) -> dict[str, Any]:
        return {}

    def save(self, state: dict[str, torch.Tensor], directory: Path, extra: dict[str, Any]) -> None:
        save_model(state, self.model_cfg, directory)

    # ------------------------------------------------------------------ shared pieces
    def init_model(self) -> Transformer:
        """The model to start from (a directory in our format), checked against the data's vocabulary."""
        if not self.job.init_from:
            raise ValueError(f"the {self.name} objective starts from a trained model: the job needs init_from (a directory with model.safetensors)")
        model = load_model(self.job.init_from)
        data_vocab = self.loader.index.get("vocab_size")
        if data_vocab and data_vocab > model.cfg.vocab_size:
            raise ValueError(
                f"{self.job.data.stage}/{self.job.data.version} uses a vocabulary of {data_vocab} tokens but the model in "
                f"{self.job.init_from} has {model.cfg.vocab_size}: train both from the same train_tokenizer stage"
            )
        return model

    def capped(self, loader, eval_samples: int):
        """loader.eval_batches() up to eval_samples samples; every rank stops at the same batch."""
        seen = 0
        for batch in loader.eval_batches():
            if seen >= eval_samples:
                break
            seen += loader.global_batch
            yield batch

    @property
    def aux_weight(self) -> float:
        return self.model_cfg.moe_aux_weight if self.model_cfg.moe_experts else 0.0


# ---------------------------------------------------------------------- pretraining


def unigram_log_probs(blocks: list[np.ndarray], vocab_size: int, pad_id: int | None, max_tokens: int = 50_000_000) -> torch.Tensor:
    """log p(token) from training-token frequencies (add-one smoothed): the context-free baseline."""
    counts = np.ones(vocab_size, dtype=np.float64)
    seen = 0
    for block in blocks:
        if seen >= max_tokens:
            break
        flat = np.asarray(block).ravel()[: max_tokens - seen]
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        seen += flat.size
    if pad_id is not None and pad_id < vocab_size:
        counts[pad_id] = 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


def loss_chunk(cfg) -> int:
    """Tokens per chunk of the fused projection + cross-entropy, 0 for full logits (loss_chunk_tokens;
    -1: 4096 on cuda, 0 on cpu). ZeRO-3 always takes full logits: its lm_head weight is gathered
    only inside lm_head's own forward."""
    if cfg.distributed.zero_stage >= 3:
        return 0
    if cfg.loss_chunk_tokens < 0:
        return 4096 if cfg.distributed.accelerator == "cuda" else 0
    return cfg.loss_chunk_tokens


def lm_sums(engine, inputs, targets, label_smoothing: float, chunk: int, *args) -> tuple[CESums, torch.Tensor]:
    """The model's summed next-token CE on inputs [B, T] (args: positions, segments) and its aux
    loss: with chunk > 0 the model fuses lm_head with the cross-entropy (no logits), else one
    pass over the full logits. Smoothed and plain CE come from the same pass either way."""
    if chunk:
        return engine(inputs, *args, targets=targets, label_smoothing=label_smoothing, loss_chunk=chunk)
    logits, aux = engine(inputs, *args)
    return fused_cross_entropy(logits, targets, label_smoothing), aux


def lm_batch_loss(engine, batch: torch.Tensor, pad_id: int | None, label_smoothing: float, aux_weight: float, chunk: int = 0):
    """Next-token loss of one token batch [B, T + 1] (padding targets ignored) -> (total, metrics);
    every metric stays a device tensor (no host read)."""
    inputs, targets = split_batch(batch.to(engine.device, non_blocking=True), pad_id)  # pinned batches copy asynchronously
    loss = lm_loss_from_sums(*lm_sums(engine, inputs, targets, label_smoothing, chunk), aux_weight)
    return loss.total, {"loss": loss.total.detach(), "ce": loss.ce, "aux": loss.aux, "tokens": inputs.numel()}


class Pretrain(Objective):
    """Next-token prediction on the tokenize stage's shards, from random weights (job.model's shape)."""

    name = "pretrain"
    metrics = ("loss", "ce", "aux")

    def loaders(self, store: Store):
        t = self.t
        # split by data-parallel rank: the ranks of a TP or SP group read the same batch (model/parallel.py)
        rank, world = t.layout.dp_rank, t.layout.dp
        self.loader = TokenLoader.from_stage(store, self.job.data, "train", batch_size=t.micro, seed=self.cfg.seed, rank=rank, world_size=world)
        self.val = TokenLoader.from_stage(store, self.job.data, "val", batch_size=t.micro, rank=rank, world_size=world, shuffle=False)
        self.pad_id, self.seq_len = self.loader.pad_id, self.loader.seq_len
        return self.loader, self.val

    def build_model(self) -> Transformer:
        if self.job.model is None:
            raise ValueError("a pretrain job needs the model's shape (job.model)")
        self.model_cfg = resolve(self.job.model, self.loader.index["vocab_size"])
        model = Transformer(self.model_cfg)
        self.unigram = unigram_log_probs(self.loader.blocks, self.model_cfg.vocab_size, self.pad_id).to(self.t.device)
        return model

    def loss(self, engine, batch):
        if self.t.layout.sp > 1:  # this rank's slice of the sequence, the loss weighted over the SP group
            return sp_lm_loss(engine, batch, self.t.layout, self.pad_id, self.cfg.label_smoothing, self.job.model.moe_aux_weight)
        return lm_batch_loss(engine, batch, self.pad_id, self.cfg.label_smoothing, self.job.model.moe_aux_weight, loss_chunk(self.cfg))

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Token-weighted cross-entropy over up to eval_samples validation samples."""
        device = self.t.device
        total = torch.zeros(3, dtype=torch.float64, device=device)  # summed CE, tokens, summed unigram CE
        lay = self.t.layout
        for batch in self.capped(self.val, self.cfg.eval_samples):
            inputs, targets = split_batch(batch.to(device), self.pad_id)
            inputs, targets = local_slice(inputs, lay), local_slice(targets, lay)  # sequence parallel: this rank's slice
            logits, _ = engine(inputs)  # runs even on an empty batch: ZeRO-3 gathers need every rank
            if targets.numel():
                flat = cross_entropy(logits, targets, reduction="sum")
                scored = targets[targets != IGNORE_INDEX]
                total += torch.stack([flat.double(), torch.tensor(float(scored.numel()), dtype=torch.float64, device=device), -self.unigram[scored].sum()])
        if not lay.reports:  # tensor parallel: the group's other ranks computed the same sums
            total.zero_()
        self.t.dist.all_reduce(total)
        val_loss = (total[0] / total[1].clamp(min=1)).item()
        unigram_loss = (total[2] / total[1].clamp(min=1)).item()
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "unigram_loss": unigram_loss,
            "unigram_ppl": math.exp(min(unigram_loss, 50.0)),
            "val_tokens": int(total[1].item()),
        }


# ---------------------------------------------------------------------- supervised fine-tuning


def assistant_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, T, V], targets [B, T], mask [B, T] (1 = assistant target) -> summed cross-entropy
    over the masked targets; every other target contributes nothing and gets zero gradient."""
    return cross_entropy(logits, masked_targets(targets, mask), label_smoothing, reduction="sum")


class Sft(Objective):
    """Cross-entropy on assistant tokens only, packed conversations isolated by segment masks.

    The loss of a step is the mean over all assistant tokens of the global batch (every micro
    batch and rank), like a single big batch: begin_step counts them once per step."""

    name = "sft"
    metrics = ("loss", "ce", "aux")

    def loaders(self, store: Store):
        t = self.t
        self.loader = SftLoader.from_stage(store, self.job.data, "train", batch_size=t.micro, seed=self.cfg.seed, rank=t.rank, world_size=t.world)
        self.val = SftLoader.from_stage(store, self.job.data, "val", batch_size=t.micro, rank=t.rank, world_size=t.world, shuffle=False)
        self.seq_len = self.loader.seq_len
        return self.loader, self.val

    def build_model(self) -> Transformer:
        model = self.init_model()
        self.model_cfg = model.cfg
        return model

    def begin_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        targets = float(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches))
        total = self.t.all_sum([targets])[0]
        # DeepSpeed averages micro batches and ranks: scale each micro batch's sum so the result is the global mean
        self.normaliser = max(total, 1.0) / (len(batches) * self.t.world)

    def forward(self, engine, batch: dict[str, torch.Tensor]):
        device = self.t.device
        tokens, mask, positions = (batch[k].to(device) for k in ("tokens", "loss_mask", "positions"))
        inputs, pos = tokens[:, :-1], positions[:, :-1]
        logits, aux = engine(inputs, pos, segment_ids(pos))
        return logits, aux, tokens[:, 1:], mask[:, 1:], inputs.numel()

    def loss(self, engine, batch):
        """Smoothed and plain assistant CE from one pass (fused with lm_head unless ZeRO-3), as sums
        over the micro batch divided by the step's normaliser; no host read."""
        tokens, mask, positions = (batch[k].to(self.t.device, non_blocking=True) for k in ("tokens", "loss_mask", "positions"))
        inputs, pos = tokens[:, :-1], positions[:, :-1]
        targets = masked_targets(tokens[:, 1:], mask[:, 1:])
        sums, aux = lm_sums(engine, inputs, targets, self.cfg.label_smoothing, loss_chunk(self.cfg), pos, segment_ids(pos))
        smoothed = sums.smoothed / self.normaliser
        total = smoothed + self.aux_weight * aux if self.aux_weight else smoothed
        return total, {"loss": total.detach(), "ce": sums.plain / self.normaliser, "aux": aux.detach(), "tokens": inputs.numel()}

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Held-out cross-entropy per assistant token (and its perplexity)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.t.device)  # summed CE, assistant tokens
        for batch in self.capped(self.val, self.cfg.eval_samples):
            logits, _, targets, mask, _ = self.forward(engine, batch)
            if targets.numel():
                total += torch.stack([assistant_ce(logits, targets, mask).double(), mask.sum().double()])
        self.t.dist.all_reduce(total)
        val_loss = (total[0] / total[1].clamp(min=1)).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(total[1].item())}


# ---------------------------------------------------------------------- preference objectives


class _Pairs(Objective):
    def loaders(self, store: Store):
        t = self.t
        self.loader = PreferenceLoader.from_stage(store, self.job.data, "train", batch_size=t.micro, seed=self.cfg.seed, rank=t.rank, world_size=t.world)
        self.val = PreferenceLoader.from_stage(store, self.job.data, "val", batch_size=t.micro, rank=t.rank, world_size=t.world, shuffle=False)
        self.seq_len = self.loader.seq_len
        return self.loader, self.val

    def reduce_pairs(self, sums: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
        """Per-pair sums (the last one the pair count), all-reduced -> held-out means named val_<name>."""
        self.t.dist.all_reduce(sums)
        count = max(sums[-1].item(), 1.0)
        out = {f"val_{name}": (sums[i] / count).item() for i, name in enumerate(names)}
        out["val_pairs"] = int(sums[-1].item())
        return out


class Reward(_Pairs):
    """Bradley-Terry reward model: body from the SFT model, a scalar head at each side's last token."""

    name = "reward"
    metrics = ("loss", "accuracy", "margin", "aux")

    def build_model(self) -> RewardModel:
        policy = self.init_model()
        self.model_cfg = policy.cfg
        return RewardModel.from_policy(policy)  # the head draws from the seeded torch RNG

    def scores(self, engine, batch):
        tokens, lengths = batch["tokens"].to(self.t.device), batch["lengths"].to(self.t.device)
        scores, aux = engine(tokens, lengths)  # [2n]
        n = tokens.shape[0] // 2
        return scores[:n], scores[n:], aux, tokens.numel()

    def pair_loss(self, chosen, rejected):
        margin = self.options.get("margin", 0.0)
        return reward_loss(chosen, rejected, margin if margin else None, self.options.get("center_coef", 0.0))

    def loss(self, engine, batch):
        chosen, rejected, aux, n_tokens = self.scores(engine, batch)
        loss = self.pair_loss(chosen, rejected)
        total = loss + self.aux_weight * aux if self.aux_weight else loss
        diff = (chosen - rejected).detach()
        return total, {"loss": total.detach(), "accuracy": (diff > 0).float().mean(), "margin": diff.mean(), "aux": aux.detach(), "tokens": n_tokens}

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Held-out pairwise accuracy (chosen scored above rejected), mean margin, and the accuracy
        of the length-only baseline (the longer reply wins, a tie counts half)."""
        sums = torch.zeros(7, dtype=torch.float64, device=self.t.device)
        for batch in self.capped(self.val, self.cfg.eval_samples):
            chosen, rejected, _, _ = self.scores(engine, batch)
            n = chosen.numel()
            if n:
                lengths = batch["lengths"].to(self.t.device)
                longer = torch.sign(lengths[:n] - lengths[n:]).double()
                # every term of the loss is a mean over pairs: times n it is the per-pair sum
                sums += torch.stack([
                    self.pair_loss(chosen, rejected).double() * n, (chosen > rejected).double().sum(), (chosen - rejected).double().sum(),
                    chosen.double().sum(), rejected.double().sum(), ((longer + 1) / 2).sum(), torch.tensor(float(n), dtype=torch.float64, device=sums.device),
                ])
        return self.reduce_pairs(sums, ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "length_baseline_accuracy"))

    @torch.no_grad()
    def finalize(self, engine) -> dict[str, Any]:
        """Mean and std of the final model's rewards over every training reply (both sides), saved
        with the model so later stages (PPO) can normalise rewards."""
        engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.t.device)  # sum r, sum r^2, count, correct pairs
        for batch in self.loader.eval_batches():
            chosen, rejected, _, _ = self.scores(engine, batch)
            both = torch.cat([chosen, rejected]).double()
            sums += torch.stack([both.sum(), both.pow(2).sum(), torch.tensor(float(both.numel()), dtype=torch.float64, device=sums.device), (chosen > rejected).double().sum()])
        self.t.dist.all_reduce(sums)
        engine.train()
        count = max(sums[2].item(), 1.0)
        mean = sums[0].item() / count
        std = math.sqrt(max(sums[1].item() / count - mean * mean, 0.0))
        return {"reward_mean": mean, "reward_std": std, "reward_samples": int(sums[2].item()), "train_accuracy": sums[3].item() / max(count / 2, 1.0)}

    def save(self, state, directory, extra) -> None:
        stats = {"mean": extra.get("reward_mean"), "std": extra.get("reward_std"), "samples": extra.get("reward_samples")}
        save_reward_model(state, self.model_cfg, directory, stats)


class Dpo(_Pairs):
    """Sigmoid DPO against reference log-probs that the starting (SFT) model computes once, before
    any step, and that are stored with the run (work_dir/reference/, uploaded into the stage)."""

    name = "dpo"
    metrics = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "aux")

    def build_model(self) -> Transformer:
        model = self.init_model()
        self.model_cfg = model.cfg
        return model

    def logps(self, engine, batch):
        tokens, mask = batch["tokens"].to(self.t.device), batch["mask"].to(self.t.device)
        logits, aux = engine(tokens[:, :-1])  # right padding never reaches a real token (causal)
        logps = sequence_logprobs(logits, tokens[:, 1:], mask[:, 1:])  # [2n]
        n = tokens.shape[0] // 2
        return logps[:n], logps[n:], aux, tokens.numel()

    # ------------------------------------------------------------------ reference log-probs
    def prepare(self, engine) -> None:
        """Reference log-probs of both splits: read from work_dir/reference when an earlier attempt
        (or the stage, from the store) left them, else computed now by the untrained engine."""
        ref_dir = Path(self.job.work_dir) / REFERENCE_DIR
        if not (ref_dir / COMPLETE).exists():
            self.compute_reference(engine, ref_dir)
        for loader, split in ((self.loader, "train"), (self.val, "val")):
            loader.reference = read_reference(ref_dir / f"{split}.arrow", loader.ids())

    @torch.no_grad()
    def compute_reference(self, engine, ref_dir: Path) -> None:
        engine.eval()
        computed = {}
        for loader, split in ((self.loader, "train"), (self.val, "val")):
            mine = []
            for batch in loader.eval_batches():
                chosen, rejected, _, _ = self.logps(engine, batch)
                mine += zip(batch["index"].tolist(), chosen.tolist(), rejected.tolist())
            gathered: list = [None] * self.t.world
            self.t.dist.all_gather_object(gathered, mine)
            values = np.zeros((loader.num_samples, 2), dtype=np.float32)
            for index, chosen, rejected in (row for part in gathered for row in part):
                values[index] = (chosen, rejected)
            computed[split] = (values, loader.ids())
        engine.train()
        if self.t.rank == 0:
            ref_dir.mkdir(parents=True, exist_ok=True)
            for split, (values, ids) in computed.items():
                write_reference(ref_dir / f"{split}.arrow", ids, values)
            tmp = ref_dir / (COMPLETE + ".tmp")
            tmp.write_text(json.dumps({"pairs": {s: len(v[1]) for s, v in computed.items()}}))
            os.replace(tmp, ref_dir / COMPLETE)
            self.t.log(f"reference log-probs of {sum(len(v[1]) for v in computed.values())} pairs computed")
        self.t.dist.barrier()

    def loss(self, engine, batch):
        chosen, rejected, aux, n_tokens = self.logps(engine, batch)
        ref = batch["reference"].to(self.t.device)
        out = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.options["beta"])
        total = out.loss + self.aux_weight * aux if self.aux_weight else out.loss
        cr, rr = out.chosen_rewards, out.rejected_rewards
        return total, {
            "loss": total.detach(), "accuracy": (cr > rr).float().mean(), "margin": (cr - rr).mean(),
            "chosen_reward": cr.mean(), "rejected_reward": rr.mean(), "aux": aux.detach(), "tokens": n_tokens,
        }

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Held-out DPO loss, implicit-reward accuracy and margin, mean implicit rewards per side."""
        sums = torch.zeros(6, dtype=torch.float64, device=self.t.device)
        for batch in self.capped(self.val, self.cfg.eval_samples):
            chosen, rejected, _, _ = self.logps(engine, batch)
            n = chosen.numel()
            if n:
                ref = batch["reference"].to(self.t.device)
                out = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.options["beta"])
                cr, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
                sums += torch.stack([out.loss.double() * n, (cr > rr).double().sum(), (cr - rr).sum(), cr.sum(), rr.sum(), torch.tensor(float(n), dtype=torch.float64, device=sums.device)])
        return self.reduce_pairs(sums, ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"))


def write_reference(path: Path, ids: list[str], values: np.ndarray) -> None:
    """Reference log-probs, one row per pair in the data's order: id, chosen, rejected (float32)."""
    import pyarrow as pa

    table = pa.table({"id": pa.array(ids, type=pa.string()), "chosen": pa.array(values[:, 0]), "rejected": pa.array(values[:, 1])})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_reference(path: Path, ids: list[str]) -> np.ndarray:
    """[N, 2] float32 log-probs, checked to belong to exactly these pairs in this order."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    if table.column("id").to_pylist() != ids:
        raise LoaderError(f"{path} holds reference log-probs of other pairs than the preference data; delete it to recompute")
    return np.stack([table.column("chosen").to_numpy(), table.column("rejected").to_numpy()], axis=1).astype(np.float32)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Pretrain, Sft, Reward, Dpo)}
