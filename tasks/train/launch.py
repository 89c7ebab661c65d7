"""What every training stage shares: launching the ranks, syncing checkpoints into the stage
directory, resuming from the newest committed one, and the outputs at the end.

A training stage (pretrain, sft, reward_model, dpo) picks its inputs, then::

    with training(out, cfg.sft, {"objective": "sft", "data": ref, "init_from": model_dir}, "sft", SftError) as run:
        upload_final(out, run.work)                  # metrics.jsonl, model/
        ...                                          # exports, plots, stats from run.summary / run.records

What ``training`` does:
1. A local work directory (``distributed.work_dir``/<version>, or a temporary one) gets the newest
   checkpoint committed by an earlier, interrupted attempt of this same stage version (engine
   state, loader position, RNG), and any pinned directory (DPO's ``reference/``), if any.
2. ``model/train.py`` runs under the configured launcher (``deepspeed --num_gpus N`` or
   ``torchrun``, a hostfile for several nodes) with a ``job.json`` (model/train.py's TrainJob);
   every output line goes to the ``lmfoundry`` logger, so Prefect shows it in the run log. Any
   rank failing fails the stage with the trainer's error and the launcher's last lines.
3. While it trains, each checkpoint that rank 0 marks complete is uploaded into the stage
   directory (files first, ``COMPLETE.json`` last) with the metrics so far; older committed
   checkpoints beyond ``keep_checkpoints`` are removed. A killed run therefore resumes from the
   newest uploaded checkpoint when the stage runs again.
"""
from __future__ import annotations

import collections
import contextvars
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from lmfoundry.infra.config import REPO_ROOT
from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.infra.files import InputError
from lmfoundry.infra.heartbeat import StallWatch
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.shm import extensions_dir, remove_shm_buffers, shm_op_built

log = logging.getLogger("lmfoundry.train")

TOKENIZER_FILE = "tokenizer.json"  # the train_tokenizer stage's
SPECIAL_TOKENS_FILE = "special_tokens.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
PROTECTED = "PROTECTED.json"  # the trainer marks the last checkpoint before a loss/grad-norm spike
METRICS = "metrics.jsonl"
STOP = "STOP"  # a file in the work directory that stops the training (a sweep pruning a trial: flows/sweep.py)
ERROR_LINE = re.compile(r"\[(\w+)\] ERROR:")  # what model/train.py prints before exiting on divergence


class TrainInputError(InputError):
    """A training stage's inputs or launch settings cannot work (named in the message)."""


# ---------------------------------------------------------------------- launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(dist: TrainRecipe.Distributed, job_path: str | Path, port: int, section: str = "pretrain", module: str = "lmfoundry.model.train") -> list[str]:
    """The launcher command line that starts every rank of model/train.py (or another rank ``module``: model/ppo_train.py)."""
    trainer = ["-m", module, "--job", str(job_path)]
    if dist.launcher == "torchrun":
        if dist.hostfile:
            raise TrainInputError(f"{section}.distributed.hostfile needs launcher 'deepspeed'; torchrun takes one node per command")
        return [sys.executable, "-u", "-m", "torch.distributed.run", *(["--standalone"] if dist.nnodes == 1 else [f"--nnodes={dist.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={dist.rdzv_endpoint}"]), f"--nproc_per_node={dist.procs}", *trainer]  # several nodes: c10d rendezvous
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", str(dist.procs)]
    if dist.hostfile:
        cmd += ["--hostfile", dist.hostfile]
    return [*cmd, "--module", *trainer[1:]]


def launch_env(dist: TrainRecipe.Distributed) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR=dist.accelerator)
    if dist.accelerator == "cpu":
        # ranks on one machine share its cores; more threads than free cores spin and thrash
        env["OMP_NUM_THREADS"] = str(dist.cpu_threads or max(1, (os.cpu_count() or 1) // dist.procs))
    return env


def last_exception(lines) -> str | None:
    """The last 'SomeError: message' line of a rank's traceback, without the launcher's prefix."""
    for line in reversed(list(lines)):
        text = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", text):
            return text
    return None


class Launch:
    """A running launcher: its output lines go to the logger and a tail kept for errors."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path):
        log.info("launching: %s", " ".join(cmd))
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.errors: list[str] = []
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
        )
        # the reader runs in a copy of this context, so its log lines stay attached to the
        # caller's run (an orchestrator's run id lives in a context variable)
        self.reader = threading.Thread(target=contextvars.copy_context().run, args=(self._pump,), daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self.tail.append(line)
            found = ERROR_LINE.search(line)
            if found:
                self.errors.append(line[found.end() :].strip())
            log.info("%s", line)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """Kill every rank: the launcher runs in its own process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()

    def finish(self) -> int:
        rc = self.proc.wait()
        self.reader.join(timeout=10)
        return rc


# ---------------------------------------------------------------------- checkpoints <-> store


def committed_checkpoints(out: StageDir) -> list[str]:
    """Tags of whole checkpoints already in the stage directory, oldest first."""
    tags = {p.split("/")[1] for p in out.marked_files() if p.startswith(f"{CHECKPOINTS}/") and p.endswith(f"/{COMPLETE}")}
    return sorted(tags)


def local_complete_checkpoints(work: Path) -> list[str]:
    root = work / CHECKPOINTS
    return sorted(p.parent.name for p in root.glob(f"*/{COMPLETE}")) if root.exists() else []


def upload_directory(out: StageDir, local: Path, prefix: str) -> None:
    """Files first, COMPLETE.json last: a directory counts only once it is whole in the store."""
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp")):
        out.put_file(path, f"{prefix}/{path.relative_to(local).as_posix()}")
    out.put_file(local / COMPLETE, f"{prefix}/{COMPLETE}")


def upload_checkpoint(out: StageDir, work: Path, tag: str) -> None:
    if (work / METRICS).exists():
        # the trainer may be appending right now: upload whole lines only
        data = (work / METRICS).read_bytes()
        out.write_bytes(METRICS, data[: data.rfind(b"\n") + 1])
    upload_directory(out, work / CHECKPOINTS / tag, f"{CHECKPOINTS}/{tag}")


def download_prefix(out: StageDir, prefix: str, work: Path, also: tuple[str, ...] = ()) -> None:
    for rel in out.marked_files():
        if rel.startswith(prefix) or rel in also:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(out.read_bytes(rel))


def download_checkpoint(out: StageDir, tag: str, work: Path) -> None:
    download_prefix(out, f"{CHECKPOINTS}/{tag}/", work, also=(METRICS,))


def protected_checkpoints(out: StageDir) -> set[str]:
    """Committed checkpoints marked as the last good one before a spike (never rotated away)."""
    return {p.split("/")[1] for p in out.marked_files() if p.startswith(f"{CHECKPOINTS}/") and p.endswith(f"/{PROTECTED}")}


class CheckpointSync:
    """Uploads each newly completed local checkpoint and keeps the newest `keep` in the store, plus
    every checkpoint the trainer marked PROTECTED.json (the last one before a spike); `pinned`
    directories of the work dir (complete once their COMPLETE.json exists) are uploaded once and
    kept: they belong to the stage's output."""

    def __init__(self, out: StageDir, work: Path, keep: int, pinned: tuple[str, ...] = ()):
        self.out, self.work, self.keep, self.pinned = out, work, keep, pinned
        self.committed = committed_checkpoints(out)
        marked = out.marked_files()
        self.pinned_done = {name for name in pinned if f"{name}/{COMPLETE}" in marked}
        self.protected = protected_checkpoints(out)
        self.uploaded = 0

    def sync_protected(self, local: list[str]) -> None:
        """Commit what the trainer protected since: the marker of an uploaded checkpoint, or the whole
        checkpoint when it was superseded before it was uploaded (a fast run saves several per poll)."""
        for tag in local:
            marker = self.work / CHECKPOINTS / tag / PROTECTED
            if tag in self.protected or not marker.exists():
                continue
            if tag in self.committed:
                self.out.put_file(marker, f"{CHECKPOINTS}/{tag}/{PROTECTED}")
            else:
                upload_checkpoint(self.out, self.work, tag)
                self.committed = sorted({*self.committed, tag})
                self.uploaded += 1
            self.protected.add(tag)
            log.warning("checkpoint %s is protected: the last one before a training spike", tag)

    def restore_pinned(self) -> None:
        """Committed pinned directories that the work dir lacks (a new attempt) come back."""
        for name in self.pinned_done:
            if not (self.work / name / COMPLETE).exists():
                download_prefix(self.out, f"{name}/", self.work)

    def sync(self) -> None:
        for name in self.pinned:
            if name not in self.pinned_done and (self.work / name / COMPLETE).exists():
                upload_directory(self.out, self.work / name, name)
                self.pinned_done.add(name)
                log.info("%s/ committed to the stage", name)
        local = local_complete_checkpoints(self.work)
        # markers are read after the listing: the trainer protects a checkpoint before it saves a newer one
        self.sync_protected(local)
        if not local or (self.committed and local[-1] <= self.committed[-1]):
            return
        tag = local[-1]  # older local ones that were never uploaded are superseded
        upload_checkpoint(self.out, self.work, tag)
        self.committed.append(tag)
        if (self.work / CHECKPOINTS / tag / PROTECTED).exists():  # uploaded with it
            self.protected.add(tag)
        self.uploaded += 1
        log.info("checkpoint %s committed to the stage", tag)
        removed = [old for old in self.committed[: -self.keep] if old not in self.protected]
        for old in removed:
            self.out.remove(f"{CHECKPOINTS}/{old}/")
        self.committed = [t for t in self.committed if t not in removed]
        for stale in local[:-1]:
            if not (self.work / CHECKPOINTS / stale / PROTECTED).exists():
                shutil.rmtree(self.work / CHECKPOINTS / stale, ignore_errors=True)


# ---------------------------------------------------------------------- one training run


def train(
    dist: TrainRecipe.Distributed, work: Path, sync: CheckpointSync, section: str = "pretrain", error: type[Exception] = RuntimeError, module: str = "lmfoundry.model.train"
) -> None:
    """Run the launcher to completion, uploading checkpoints as they appear."""
    if dist.accelerator == "cpu" and not shm_op_built():
        log.info("first DeepSpeed launch on this machine: compiling its CPU communication op once (about 30 s to 2 min, silent; cached in %s)", extensions_dir())
    port = dist.master_port or free_port()
    launch = Launch(launch_command(dist, work / "job.json", port, section, module), launch_env(dist), REPO_ROOT)
    deadline = time.monotonic() + dist.timeout_s if dist.timeout_s else None
    watch = StallWatch(work, dist.stall_timeout_s, section, error)  # no heartbeat for stall_timeout_s: stop every rank
    try:
        while launch.poll() is None:
            sync.sync()
            if (work / STOP).exists():
                launch.stop()
                raise error(f"{section} training stopped: {work / STOP} was created (a pruned sweep trial, or by hand)")
            watch.check(launch.stop, sync.committed, launch.tail)
            if deadline and time.monotonic() > deadline:
                launch.stop()
                raise error(f"training exceeded {section}.distributed.timeout_s={dist.timeout_s}; the last checkpoint is kept, run again to resume")
            time.sleep(0.5)
    except BaseException:
        launch.stop()
        raise
    finally:
        remove_shm_buffers(port)  # DeepSpeed leaves each CPU rank's allreduce buffer in /dev/shm (model/shm.py)
    rc = launch.finish()
    sync.sync()  # a checkpoint completed just before the end (or before a crash) still counts
    if rc != 0:
        tail = "\n".join(launch.tail)
        reason = launch.errors[0] if launch.errors else last_exception(launch.tail) or f"the launcher exited with code {rc}"
        kept = f"committed checkpoint {sync.committed[-1]} is kept: run again to resume from it" if sync.committed else "no checkpoint was committed"
        raise error(f"{section} training failed: {reason}\n{kept}.\nlast output lines:\n{tail}")


@dataclass
class Training:
    """A finished run of model/train.py, still in its work directory."""

    work: Path
    summary: dict[str, Any]  # DONE.json
    records: list[dict[str, Any]]  # metrics.jsonl
    resume_tag: str | None
    checkpoints_committed: int

    @property
    def resumed_from_step(self) -> int | None:
        return int(self.resume_tag.split("-")[1]) if self.resume_tag else None

    def rows(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def training(
    out: StageDir, recipe: TrainRecipe, job: dict[str, Any], section: str, error: type[Exception], pinned: tuple[str, ...] = (), job_class: type[BaseModel] | None = None
) -> Iterator[Training]:
    """Train to the end (resuming from the newest committed checkpoint) and yield the run; the
    work directory exists until the block ends. `job`: TrainJob fields besides the recipe,
    store and work dir (objective, data, model or init_from, options). `job_class`: another rank
    program's job model (model/ppo_train.py's PpoJob); its module is what the launcher starts."""
    from lmfoundry.model.train import DONE, TrainJob

    job_class = job_class or TrainJob

    dist = recipe.distributed
    temporary = dist.work_dir is None
    work = Path(tempfile.mkdtemp(prefix=f"lmf-{section}-")) if temporary else Path(dist.work_dir) / out.version
    work.mkdir(parents=True, exist_ok=True)
    try:
        sync = CheckpointSync(out, work, dist.keep_checkpoints, pinned)
        sync.sync()  # a kept work_dir may hold a newer whole checkpoint than the store
        sync.restore_pinned()
        resume_tag = sync.committed[-1] if sync.committed else None
        if resume_tag and not (work / CHECKPOINTS / resume_tag / COMPLETE).exists():
            log.info("resuming from committed checkpoint %s", resume_tag)
            download_checkpoint(out, resume_tag, work)
        spec = job_class(
            **job, recipe=recipe.recipe(), store_url=out.store.url, storage_options=out.store.storage_options, work_dir=str(work), resume_tag=resume_tag
        )
        (work / "job.json").write_text(spec.model_dump_json(indent=2))
        for name in (DONE, STOP):  # a stop asked of an earlier attempt does not stop this one
            (work / name).unlink(missing_ok=True)
        train(dist, work, sync, section, error, job_class.__module__)
        summary = json.loads((work / DONE).read_text())
        yield Training(work, summary, read_metrics(work / METRICS), resume_tag, sync.uploaded)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- inputs

INPUT_KINDS = {
    "sft_data": "packed conversations (index.json format 'sft', from the sft_data stage)",
    "preference_data": "preference pairs (index.json format 'preference', from the preference_data stage)",
    "policy": "a trained language model (model/model_config.json, from pretrain or sft)",
    "reward": "a trained reward model (model/reward.json, from reward_model)",
    "tokenizer": f"a tokenizer ({TOKENIZER_FILE}, from train_tokenizer)",
}


def input_kind(out: StageDir, ref: StageRef) -> str | None:
    """What a committed input stage holds, told apart by its files."""
    from lmfoundry.model.token_format import INDEX_FILE

    reader = out.store.reader(ref)
    files = reader.manifest["files"]
    if TOKENIZER_FILE in files:
        return "tokenizer"
    if "model/reward.json" in files:
        return "reward"
    if "model/model_config.json" in files:
        return "policy"
    if INDEX_FILE in files:
        fmt = reader.read_json(INDEX_FILE).get("format")
        return {"sft": "sft_data", "preference": "preference_data"}.get(fmt)
    return None


def pick_inputs(out: StageDir, inputs: list[StageRef], required: tuple[str, ...], optional: tuple[str, ...], section: str) -> dict[str, StageRef | None]:
    """{kind: ref} for the kinds a stage reads; exactly one of each required kind."""
    found: dict[str, list[StageRef]] = {}
    for ref in inputs:
        found.setdefault(input_kind(out, ref) or "other", []).append(ref)
    picked: dict[str, StageRef | None] = {}
    for kind in (*required, *optional):
        refs = found.get(kind, [])
        if len(refs) > 1 or (kind in required and not refs):
            raise TrainInputError(
                f"{section} needs exactly one input with {INPUT_KINDS[kind]}; got {len(refs)} among "
                f"{[r.stage for r in inputs]}. Check the stage's inputs in flows/pipeline.py."
            )
        picked[kind] = refs[0] if refs else None
    return picked


def check_splits(out: StageDir, ref: StageRef, data_section: str) -> dict[str, Any]:
    """Fail before launching anything when a split the trainer reads is empty; returns index.json."""
    from lmfoundry.model.token_format import INDEX_FILE

    index = out.store.reader(ref).read_json(INDEX_FILE)
    for split, advice in (("train", "add data"), ("val", f"raise {data_section}.val_fraction (e.g. 0.1 for a small data set)")):
        if not sum(entry["samples"] for entry in index["splits"].get(split, [])):
            raise TrainInputError(f"the {split} split of {ref.stage}/{ref.version} is empty: {advice}")
    return index


def section_of(cfg: Any, name: str) -> Any:
    """A stage's own section, whether the runner passes it alone or with others (cfg.model, cfg.sft)."""
    return getattr(cfg, name, cfg)


# ---------------------------------------------------------------------- outputs


def upload_final(out: StageDir, work: Path) -> None:
    """metrics.jsonl and the final weights (model/: model.safetensors, model_config.json, ...)."""
    out.put_file(work / METRICS, METRICS)
    for name in sorted(os.listdir(work / "final")):
        out.put_file(work / "final" / name, f"model/{name}")


def model_dir(out: StageDir, ref: StageRef) -> str:
    """A local directory holding a committed training stage's model/ files (S3 files are cached)."""
    reader = out.store.reader(ref)
    paths = [reader.local_path(name) for name in reader.files("model/")]
    if not paths:
        raise ValueError(f"{ref.stage}/{ref.version} holds no model/ files")
    return os.path.dirname(paths[0])


def tokenizer_inputs(out: StageDir, tokenizer_ref: StageRef | None) -> tuple[str | None, dict[str, int]]:
    """(local tokenizer.json or None, special token ids by role) of a train_tokenizer stage."""
    if tokenizer_ref is None:
        return None, {}
    reader = out.store.reader(tokenizer_ref)
    special = reader.read_json(SPECIAL_TOKENS_FILE) if SPECIAL_TOKENS_FILE in reader.manifest["files"] else {}
    return reader.local_path(TOKENIZER_FILE), special


def export_policy(out: StageDir, work: Path, recipe: TrainRecipe, tokenizer_ref: StageRef | None, seq_len: int, section: str) -> str:
    """The final weights as LlamaForCausalLM in hf/ (with the tokenizer and chat template); "hf" or why not."""
    if not recipe.export_hf:
        return f"off ({section}.export_hf)"
    if json.loads((work / "final" / "model_config.json").read_text()).get("moe_experts"):
        return "skipped: mixture-of-experts has no LlamaForCausalLM form (weights are in model/)"
    if json.loads((work / "final" / "model_config.json").read_text()).get("attention", "dense") != "dense":
        return "skipped: LSH attention (model.attention) has no LlamaForCausalLM form (weights are in model/)"
    from lmfoundry.model.export import export_llama

    tokenizer_json, special = tokenizer_inputs(out, tokenizer_ref)
    files = export_llama(work / "final", work / "hf", seq_len, tokenizer_json, special)
    for name in files:
        out.put_file(work / "hf" / name, f"hf/{name}")
    return "hf" if tokenizer_json else "hf (no tokenizer input: weights and config only)"


class TrainStats(BaseModel):
    """What every post-training stage reports (pretrain keeps its own PretrainStats)."""

    steps: int
    resumed_from_step: int | None
    parameters: int
    seq_len: int
    world_size: int
    tokens_trained: int
    train_loss: float | None
    val_loss: float | None
    first_val_loss: float | None
    mean_tokens_per_s: float | None
    train_seconds: float
    checkpoints_committed: int
    exported: str  # "hf" or why not
    loss_curve: list[list[float]]  # [step, train loss], at most 20 points


def train_stats(run: Training, exported: str) -> dict[str, Any]:
    train_rows, val_rows = run.rows("train"), run.rows("val")
    throughput = [r["tokens_per_s"] for r in train_rows]
    stride = max(1, len(train_rows) // 20)
    s = run.summary
    return dict(
        steps=s["steps"], resumed_from_step=run.resumed_from_step, parameters=s["parameters"], seq_len=s["seq_len"], world_size=s["world_size"],
        tokens_trained=s.get("tokens", 0), train_loss=train_rows[-1]["loss"] if train_rows else None,
        val_loss=val_rows[-1]["val_loss"] if val_rows else None, first_val_loss=val_rows[0]["val_loss"] if val_rows else None,
        mean_tokens_per_s=sum(throughput) / len(throughput) if throughput else None, train_seconds=s["seconds"],
        checkpoints_committed=run.checkpoints_committed, exported=exported,
        loss_curve=[[r["step"], round(r["loss"], 4)] for r in train_rows[::stride]],
    )


def plot_curves(records: list[dict], path: Path, panels: list[tuple[str, str, str]]) -> Path | None:
    """The stage's curves as a PNG, drawn by infra/report.py like every plot of the project: the
    first panel's (title, train key, val key) is the loss panel; logged accuracies, margins and
    perplexities get panels of their own (a unigram baseline as a dashed line)."""
    if not any(r["kind"] == "train" for r in records):
        return None
    from lmfoundry.infra.report import png_bytes, training_curve_figure

    title, train_key, val_key = panels[0]
    fig = training_curve_figure(records, title, keys=(train_key, val_key), labels={train_key: f"train {train_key}"})
    path.write_bytes(png_bytes(fig, dpi=100))
    return path
