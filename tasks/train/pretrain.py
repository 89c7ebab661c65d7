"""Stage `pretrain`: train the Transformer on the token shards with DeepSpeed, in a subprocess.

Inputs: the `tokenize` stage (the one holding ``index.json``) and the `train_tokenizer` stage
(holding ``tokenizer.json``, shipped with the export). The stage's section combines the
``model`` and ``pretrain`` config sections (``pretrain_section``).

What happens:
1. A local work directory gets the newest checkpoint committed by an earlier, interrupted
   attempt of this same stage version (engine state, loader position, RNG), if any.
2. ``model/train.py`` runs under the configured launcher (``deepspeed --num_gpus N`` or
   ``torchrun``, a hostfile for several nodes); every output line goes to the ``lmfoundry``
   logger, so Prefect shows it in the run log. Any rank failing fails the stage with the
   trainer's error and the launcher's last lines.
3. While it trains, each checkpoint that rank 0 marks complete is uploaded into the stage
   directory (files first, ``COMPLETE.json`` last) with the metrics so far; older committed
   checkpoints beyond ``keep_checkpoints`` are removed. A killed run therefore resumes from
   the newest uploaded checkpoint when the stage runs again.
4. At the end: ``metrics.jsonl``, ``plots/loss.png``, fp32 weights in our format (``model/``)
   and, for dense models, a Hugging Face ``LlamaForCausalLM`` export with the tokenizer
   (``hf/``): ``AutoModelForCausalLM.from_pretrained(<stage dir>/hf)``.

Run alone: ``lmf run --until pretrain``; several CPU ranks: ``--set pretrain.distributed.procs=2``;
GPUs: ``--set pretrain.distributed.accelerator=cuda --set pretrain.distributed.backend=nccl``.
"""
from __future__ import annotations

import collections
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
from pathlib import Path

from pydantic import BaseModel

from lmfoundry.infra.files import InputError
from lmfoundry.infra.config import REPO_ROOT, ComputeConfig, ModelConfig, PipelineConfig, PretrainConfig, Section
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.model.token_format import INDEX_FILE

CODE_VERSION = "1"

log = logging.getLogger("lmfoundry.pretrain")

TOKENIZER_FILE = "tokenizer.json"  # the train_tokenizer stage's
SPECIAL_TOKENS_FILE = "special_tokens.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"


class PretrainJob(Section):
    """The pretrain stage's section: the model's shape and how to train it."""

    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()


def pretrain_section(root: PipelineConfig) -> PretrainJob:
    """StageSpec(..., section=pretrain_section): both sections are part of the stage's identity."""
    return PretrainJob(model=root.model, pretrain=root.pretrain)


class PretrainInputError(InputError):
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
    mean_mfu: float | None
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


# ---------------------------------------------------------------------- launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(dist: PretrainConfig.Distributed, job_path: str | Path, port: int) -> list[str]:
    """The launcher command line that starts every rank of model/train.py."""
    trainer = ["-m", "lmfoundry.model.train", "--job", str(job_path)]
    if dist.launcher == "torchrun":
        if dist.hostfile:
            raise PretrainInputError("pretrain.distributed.hostfile needs launcher 'deepspeed'; torchrun takes one node per command")
        return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dist.procs}", *trainer]
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", str(dist.procs)]
    if dist.hostfile:
        cmd += ["--hostfile", dist.hostfile]
    return [*cmd, "--module", *trainer[1:]]


def launch_env(dist: PretrainConfig.Distributed) -> dict[str, str]:
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
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self.tail.append(line)
            if "[pretrain] ERROR:" in line:
                self.errors.append(line.split("[pretrain] ERROR:", 1)[1].strip())
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


def upload_checkpoint(out: StageDir, work: Path, tag: str) -> None:
    """Files first, COMPLETE.json last: a checkpoint counts only once it is whole in the store."""
    local = work / CHECKPOINTS / tag
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE):
        out.put_file(path, f"{CHECKPOINTS}/{tag}/{path.relative_to(local).as_posix()}")
    if (work / "metrics.jsonl").exists():
        # the trainer may be appending right now: upload whole lines only
        data = (work / "metrics.jsonl").read_bytes()
        out.write_bytes("metrics.jsonl", data[: data.rfind(b"\n") + 1])
    out.put_file(local / COMPLETE, f"{CHECKPOINTS}/{tag}/{COMPLETE}")


def download_checkpoint(out: StageDir, tag: str, work: Path) -> None:
    prefix = f"{CHECKPOINTS}/{tag}/"
    for rel in out.marked_files():
        if rel.startswith(prefix) or rel == "metrics.jsonl":
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(out.read_bytes(rel))


class CheckpointSync:
    """Uploads each newly completed local checkpoint and keeps the newest `keep` in the store."""

    def __init__(self, out: StageDir, work: Path, keep: int):
        self.out, self.work, self.keep = out, work, keep
        self.committed = committed_checkpoints(out)
        self.uploaded = 0

    def sync(self) -> None:
        local = local_complete_checkpoints(self.work)
        if not local or (self.committed and local[-1] <= self.committed[-1]):
            return
        tag = local[-1]  # older local ones that were never uploaded are superseded
        upload_checkpoint(self.out, self.work, tag)
        self.committed.append(tag)
        self.uploaded += 1
        log.info("checkpoint %s committed to the stage", tag)
        for old in self.committed[: -self.keep]:
            self.out.remove(f"{CHECKPOINTS}/{old}/")
        self.committed = self.committed[-self.keep :]
        for stale in local[:-1]:
            shutil.rmtree(self.work / CHECKPOINTS / stale, ignore_errors=True)


# ---------------------------------------------------------------------- the stage


def run_pretrain(cfg: PretrainJob, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> PretrainStats:
    from lmfoundry.model.train import DONE, TrainJob

    tokens_ref, tokenizer_ref = split_inputs(out, inputs)
    check_splits(out, tokens_ref)
    dist = cfg.pretrain.distributed
    temporary = dist.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="lmf-pretrain-")) if temporary else Path(dist.work_dir) / out.version
    work.mkdir(parents=True, exist_ok=True)
    try:
        sync = CheckpointSync(out, work, dist.keep_checkpoints)
        sync.sync()  # a kept work_dir may hold a newer whole checkpoint than the store
        resume_tag = sync.committed[-1] if sync.committed else None
        if resume_tag and not (work / CHECKPOINTS / resume_tag / COMPLETE).exists():
            log.info("resuming from committed checkpoint %s", resume_tag)
            download_checkpoint(out, resume_tag, work)
        job = TrainJob(
            model=cfg.model,
            pretrain=cfg.pretrain,
            store_url=out.store.url,
            storage_options=out.store.storage_options,
            tokens=tokens_ref,
            work_dir=str(work),
            resume_tag=resume_tag,
        )
        (work / "job.json").write_text(job.model_dump_json(indent=2))
        (work / DONE).unlink(missing_ok=True)
        train(dist, work, sync)
        summary = json.loads((work / DONE).read_text())
        return finish(cfg, out, work, tokenizer_ref, summary, sync, resume_tag)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def train(dist: PretrainConfig.Distributed, work: Path, sync: CheckpointSync) -> None:
    """Run the launcher to completion, uploading checkpoints as they appear."""
    launch = Launch(launch_command(dist, work / "job.json", dist.master_port or free_port()), launch_env(dist), REPO_ROOT)
    deadline = time.monotonic() + dist.timeout_s if dist.timeout_s else None
    try:
        while launch.poll() is None:
            sync.sync()
            if deadline and time.monotonic() > deadline:
                launch.stop()
                raise PretrainError(f"training exceeded pretrain.distributed.timeout_s={dist.timeout_s}; the last checkpoint is kept, run again to resume")
            time.sleep(0.5)
    except BaseException:
        launch.stop()
        raise
    rc = launch.finish()
    sync.sync()  # a checkpoint completed just before the end (or before a crash) still counts
    if rc != 0:
        tail = "\n".join(launch.tail)
        reason = launch.errors[0] if launch.errors else last_exception(launch.tail) or f"the launcher exited with code {rc}"
        kept = f"committed checkpoint {sync.committed[-1]} is kept: run again to resume from it" if sync.committed else "no checkpoint was committed"
        raise PretrainError(f"pretraining failed: {reason}\n{kept}.\nlast output lines:\n{tail}")


def finish(cfg: PretrainJob, out: StageDir, work: Path, tokenizer_ref, summary: dict, sync: CheckpointSync, resume_tag: str | None) -> PretrainStats:
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out.put_file(work / "metrics.jsonl", "metrics.jsonl")
    for name in sorted(os.listdir(work / "final")):
        out.put_file(work / "final" / name, f"model/{name}")
    exported = export(cfg, out, work, tokenizer_ref, summary["seq_len"])
    plot = plot_losses(records, work / "loss.png")
    if plot:
        out.put_file(plot, "plots/loss.png")
    train_rows = [r for r in records if r["kind"] == "train"]
    val_rows = [r for r in records if r["kind"] == "val"]
    last_val = val_rows[-1] if val_rows else {}
    throughput = [r["tokens_per_s"] for r in train_rows]
    mfu = [r["mfu"] for r in train_rows]
    unigram = last_val.get("unigram_ppl")
    stride = max(1, len(train_rows) // 20)
    return PretrainStats(
        steps=summary["steps"],
        resumed_from_step=int(resume_tag.split("-")[1]) if resume_tag else None,
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
        train_seconds=summary["seconds"],
        checkpoints_committed=sync.uploaded,
        exported=exported,
        loss_curve=[[r["step"], round(r["loss"], 4)] for r in train_rows[::stride]],
    )


def export(cfg: PretrainJob, out: StageDir, work: Path, tokenizer_ref: StageRef | None, seq_len: int) -> str:
    if not cfg.pretrain.export_hf:
        return "off (pretrain.export_hf)"
    if cfg.model.moe_experts:
        return "skipped: mixture-of-experts has no LlamaForCausalLM form (weights are in model/)"
    from lmfoundry.model.export import export_llama

    tokenizer_json, special = None, {}
    if tokenizer_ref is not None:
        reader = out.store.reader(tokenizer_ref)
        tokenizer_json = reader.local_path(TOKENIZER_FILE)
        special = reader.read_json(SPECIAL_TOKENS_FILE) if SPECIAL_TOKENS_FILE in reader.manifest["files"] else {}
    files = export_llama(work / "final", work / "hf", seq_len, tokenizer_json, special)
    for name in files:
        out.put_file(work / "hf" / name, f"hf/{name}")
    return "hf" if tokenizer_json else "hf (no tokenizer input: weights and config only)"


def metrics_table(store, ref: StageRef) -> list[dict]:
    """The logged steps of a committed pretrain stage as table rows (for a Prefect table artifact)."""
    text = store.reader(ref).read_bytes("metrics.jsonl").decode()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    val = {r["step"]: r for r in records if r["kind"] == "val"}
    rows = []
    for r in (r for r in records if r["kind"] == "train"):
        v = val.get(r["step"], {})
        rows.append({
            "step": r["step"], "loss": round(r["loss"], 4), "val_loss": round(v["val_loss"], 4) if v else None,
            "val_ppl": round(v["val_ppl"], 2) if v else None, "lr": r["lr"], "grad_norm": r["grad_norm"],
            "tokens_per_s": round(r["tokens_per_s"]), "mfu": round(r["mfu"], 5),
        })
    return rows


def plot_losses(records: list[dict], path: Path) -> Path | None:
    train_rows = [r for r in records if r["kind"] == "train"]
    if not train_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in train_rows], [r["ce"] for r in train_rows], label="train CE")
    val_rows = [r for r in records if r["kind"] == "val"]
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val CE")
        if val_rows[-1].get("unigram_loss") is not None:
            ax.axhline(val_rows[-1]["unigram_loss"], linestyle="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
