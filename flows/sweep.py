"""Hyperparameter search as a flow: an Optuna study whose trials are short trainings through the stage store.

    lmf sweep --config my-sweep.yaml [--set sweep.trials=30] [--best-config best.yaml]
    lmf serve        # Deployments -> sweep -> Run (the preset's `sweep` section says what to search)

The preset's ``sweep`` section (infra/config_sweep.py) names the training stage (pretrain or sft),
the objective (a number in that stage's stats), the search space (dotted config paths, checked
against the config tree before anything runs), the sampler (TPE, random), the pruner (median,
ASHA) and how many trials run at once.

Each trial is the base config with the sampled values applied, run by the normal stage runner:
a trial whose values were run before (by this sweep, another one, or `lmf run`) is the same stage
version and is reused from the store, not recomputed. Trials run concurrently as Prefect task
runs (``sweep.concurrency``), each holding the gpu-slots limit like a training stage. Beside each
trial a monitor reads the trainer's metrics.jsonl as it grows, reports every validation value to
Optuna and, when the pruner says so, creates the work directory's STOP file: the training stops
and the trial is PRUNED. Trial stage refs go under the pipeline ``<pipeline>-sweep-<study>``, so
a sweep never moves the pipeline's own pretrain ref.

The study lives in a database (sweep.storage: any SQLAlchemy URL; default an SQLite file at
``<store>/sweeps/<study>/optuna.db``). Running the same sweep again continues it: finished trials
are kept and count toward ``sweep.trials``; a trial left RUNNING by a killed sweep stops sending
heartbeats, is marked FAIL after 2 x ``sweep.heartbeat_s`` and re-run with the same values (its
stage resumes from its last committed checkpoint).

At the end: a table of every trial and plots (objective per trial, parameter importances) as
Prefect artifacts and in ``<store>/sweeps/<study>/results.json`` (``lmf report`` shows them), and
the best config as a YAML preset at ``<store>/sweeps/<study>/best.yaml`` (and ``best_config``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from lmfoundry.flows import sweep_study as studies
from lmfoundry.flows.params import DEFAULT_PRESET, Override, load_run_config, resolve_preset
from lmfoundry.flows.pipeline import stage
from lmfoundry.flows.stage_task import artifact_key, current_ref, gpu_slot
from lmfoundry.infra import sweep_report
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.report import png_data_uri
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import StageRef, Store, utc_now
from lmfoundry.tasks.train.launch import METRICS, STOP

POLL_S = 1.0  # how often the flow and each trial's monitor look around


# ------------------------------------------------------------------ the flow


@flow(name="sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def sweep(preset: str = DEFAULT_PRESET, overrides: list[Override] = [], best_config: str = "") -> dict[str, Any]:
    """Search the preset's `sweep.space` with an Optuna study; each trial a training stage run.

    Args:
        preset: YAML config preset with a `sweep` section, relative to the repository or absolute
        overrides: config edits KEY.PATH=VALUE like `lmf sweep --set`, e.g. sweep.trials=30
        best_config: also write the best config (a YAML preset for `lmf run --config`) to this path
    """
    config = load_run_config(preset, overrides)
    studies.check_space(config)  # a wrong path or range fails here, before any trial
    store = Store.from_config(config.store)
    spec = stage(config.sweep.stage)
    inputs = [ref for ref in (current_ref(store, config, name) for name in spec.inputs) if ref is not None]
    print_id = studies.fingerprint(config, spec.config(config).identity(), [ref.digest for ref in inputs])
    name = config.sweep.study_name or f"{config.store.pipeline}-{spec.name}-{print_id[:8]}"
    study, storage = studies.open_study(config, store, name, print_id)
    print(f"study '{name}' in {studies.public_url(storage.url)}: {len(study.trials)} trial(s) so far, {config.sweep.trials} wanted")
    section = getattr(config, spec.name)
    own_work = section.distributed.work_dir is None  # trial work dirs are ours to remove
    work_root = tempfile.mkdtemp(prefix="lmf-sweep-") if own_work else section.distributed.work_dir
    try:
        run_trials(study, storage, config, name, inputs, work_root, own_work)
    finally:
        if own_work:
            shutil.rmtree(work_root, ignore_errors=True)
    return publish(study, studies.public_url(storage.url), config, store, name, resolve_preset(preset), list(overrides), best_config)


def run_trials(study: optuna.Study, storage, config: PipelineConfig, name: str, inputs: list[StageRef], work_root: str, own_work: bool) -> None:
    """Keep `concurrency` trials running until the study holds `trials` finished ones; wait for
    RUNNING trials of a killed sweep to go stale, then run their retries."""
    sweep = config.sweep
    logger = get_run_logger()
    dists = studies.distributions(sweep)
    run_id = str(get_run_context().flow_run.id)
    running: dict[int, Any] = {}  # trial number -> its task run's future
    running_ids: dict[int, int] = {}  # trial number -> Optuna's trial id (for heartbeats)
    # a sweep killed between asking for a trial and its first heartbeat leaves a RUNNING trial that
    # never goes stale (Optuna only fails trials whose heartbeat stopped): one beat for it from
    # here, and it goes stale unless its own sweep is alive and beating
    adopted: set[int] = set()
    beat = 0.0
    while True:
        if time.monotonic() - beat >= sweep.heartbeat_s / 2:
            # this process is alive, so are its trials (task runs are threads of it): a killed
            # sweep's trials fall silent, and the next sweep fails them (FAIL + a WAITING retry)
            for trial_id in running_ids.values():
                storage.record_heartbeat(trial_id)
            beat = time.monotonic()
        fail_stale_trials(study)
        for number, future in list(running.items()):
            if future.state.is_final():
                running.pop(number)
                running_ids.pop(number)
                if not future.state.is_completed():
                    logger.error("trial %d: its task ended %s", number, future.state.name)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if len(running) < sweep.concurrency and (waiting or studies.budget_used(trials) < sweep.trials):
            trial = study.ask(dists)  # a WAITING retry first, with its own values
            storage.record_heartbeat(trial._trial_id)  # from now on, silence means a dead sweep
            running_ids[trial.number] = trial._trial_id
            task_run = sweep_trial.with_options(name=f"trial-{trial.number}")
            running[trial.number] = task_run.submit(study, trial, config, name, inputs, work_root, own_work, run_id)
            continue
        others = [t for t in trials if t.state == TrialState.RUNNING and t.number not in running]
        if not running and not waiting and not others:
            return
        for t in others:  # see `adopted` above
            if t.number not in adopted and (datetime.now() - t.datetime_start).total_seconds() > 2 * sweep.heartbeat_s:
                storage.record_heartbeat(t._trial_id)
                adopted.add(t.number)
        time.sleep(POLL_S)


# ------------------------------------------------------------------ one trial


@task(cache_policy=NO_CACHE, persist_result=False)
def sweep_trial(
    study: optuna.Study, trial: optuna.Trial, config: PipelineConfig, name: str, inputs: list[StageRef], work_root: str, own_work: bool, run_id: str
) -> dict[str, Any]:
    """Run one trial's training through the store; tell the study its value, PRUNED or FAIL."""
    logger = get_run_logger()
    sweep, spec = config.sweep, stage(config.sweep.stage)
    params = dict(trial.params)
    work: Path | None = None
    monitor = TrialMonitor(trial, None, studies.intermediate_key(sweep.objective.metric)).start()
    started = time.monotonic()
    try:
        extra = [f"store.pipeline={config.store.pipeline}-sweep-{name}", f"{spec.name}.distributed.work_dir={json.dumps(work_root)}"]
        cfg = studies.trial_config(config, params, f"sweep trial {trial.number}", extra)
        store = Store.from_config(cfg.store)
        version = spec.version(cfg, [ref.digest for ref in inputs])
        trial.set_user_attr("version", version)
        work = monitor.work = Path(work_root) / version
        logger.info("trial %d: %s -> %s version %s", trial.number, params, spec.name, version)
        committed = store.is_committed(spec.name, version)
        with nullcontext() if committed else gpu_slot(spec, cfg.compute):
            outcome = run_stage(store, spec, cfg, inputs, run_id=run_id)
    except Exception as exc:  # noqa: BLE001  (any failure of a trial is that trial's, not the sweep's)
        monitor.stop()
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        if monitor.pruned:
            study.tell(trial, state=TrialState.PRUNED)
            logger.info("trial %d: pruned at step %s", trial.number, max(monitor.reported, default=None))
            return {"trial": trial.number, "state": "PRUNED"}
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        logger.error("trial %d failed: %s", trial.number, exc)
        return {"trial": trial.number, "state": "FAIL", "error": str(exc)}
    finally:
        monitor.stop()
        if own_work and work is not None:
            shutil.rmtree(work, ignore_errors=True)
    # the committed curve completes what the monitor saw (all of it for a reused trial)
    monitor.report(read_rows(store.reader(outcome.ref).read_bytes(METRICS).decode()), prune=False)
    value = outcome.stats.get(sweep.objective.metric)
    trial.set_user_attr("stage_status", "reused" if outcome.status == "skipped" else "ran")
    trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
    if value is None:
        trial.set_user_attr("error", f"the stage's stats have no value for {sweep.objective.metric}")
        study.tell(trial, state=TrialState.FAIL)
        return {"trial": trial.number, "state": "FAIL"}
    study.tell(trial, float(value))
    logger.info("trial %d: %s = %.5g (%s)", trial.number, sweep.objective.metric, value, trial.user_attrs["stage_status"])
    return {"trial": trial.number, "state": "COMPLETE", "value": float(value)}


def read_rows(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a half-written last line (the trainer is appending) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class TrialMonitor:
    """Beside a running trial: its validation values reported to Optuna as they appear in the work
    directory's metrics.jsonl, and the STOP file once the pruner says so."""

    def __init__(self, trial: optuna.Trial, work: Path | None, key: str):
        self.trial, self.work, self.key = trial, work, key
        self.reported: set[int] = set()
        self.pruned = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name=f"sweep-trial-{trial.number}")

    def start(self) -> "TrialMonitor":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()

    def loop(self) -> None:
        while not self.done.wait(POLL_S):
            metrics = self.work / METRICS if self.work else None
            if metrics is not None and metrics.exists():
                self.report(read_rows(metrics.read_text()))
            if self.pruned and self.work is not None and self.work.exists():
                (self.work / STOP).touch()  # again each time: a resumed attempt removes an earlier STOP

    def report(self, rows: list[dict[str, Any]], prune: bool = True) -> None:
        """Report each new value in step order and ask the pruner after each: ASHA records a
        trial's rungs only when asked (so a finished or reused trial is asked too, `prune=False`)."""
        for row in sorted((r for r in rows if isinstance(r.get("step"), int)), key=lambda r: r["step"]):
            step, value = row["step"], row.get(self.key)
            if self.pruned or not isinstance(value, (int, float)) or step in self.reported:
                continue
            self.trial.report(float(value), step)
            self.reported.add(step)
            if self.trial.should_prune() and prune:
                self.pruned = True


# ------------------------------------------------------------------ results


def publish(study: optuna.Study, storage_url: str, config: PipelineConfig, store: Store, name: str, preset: Path, overrides: list[str], best_config: str) -> dict[str, Any]:
    """results.json, best.yaml, the Prefect artifacts and the printed table; returns the flow's result."""
    sweep = config.sweep
    rows = studies.trial_rows(study)
    shares, note = studies.importances(study)
    best = studies.best_trial(study)
    best_path = None
    if best is not None:
        header = (
            f"best trial {best.number} of sweep '{name}' ({config.store.pipeline}, {sweep.stage}): {sweep.objective.metric} = {best.value:.6g}\n"
            f"values: {json.dumps(best.params)}\nrun it: lmf run --config <this file>"
        )
        text = studies.best_preset(preset, overrides, dict(best.params), header)
        best_path = store.path(studies.SWEEPS, name, "best.yaml")
        store.write_bytes_atomic(best_path, text.encode())
        if best_config:
            Path(best_config).expanduser().parent.mkdir(parents=True, exist_ok=True)
            Path(best_config).expanduser().write_text(text)
    record = {
        "study": name, "pipeline": config.store.pipeline, "stage": sweep.stage, "objective": sweep.objective.model_dump(),
        "storage": storage_url,
        "space": {k: v.model_dump() for k, v in sweep.space.items()}, "trials": rows,
        "best": {"trial": best.number, "value": best.value, "params": best.params, "version": best.user_attrs.get("version")} if best else None,
        "importances": shares, "importance_note": note, "best_config": best_path, "updated_at": utc_now(),
    }
    sweep_report.write_results(store, record)
    publish_artifacts(record)
    counts = {state: sum(1 for r in rows if r["state"] == state) for state in sorted({r["state"] for r in rows})}
    if best is None:
        errors = [r["error"] for r in rows if r["error"]]
        raise RuntimeError(f"sweep '{name}': no trial completed ({counts}); first error: {errors[0] if errors else 'none recorded'}")
    print(f"sweep '{name}': {counts}; best trial {best.number}: {sweep.objective.metric} = {best.value:.6g} with {best.params}; best config: {best_config or best_path}")
    return {"study": name, "trials": counts, "best": record["best"], "best_config": best_config or best_path, "results": sweep_report.results_path(store, name)}


def publish_artifacts(record: dict[str, Any]) -> None:
    rows = sweep_report.table_rows(record)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    create_table_artifact(key=artifact_key(f"sweep-{record['study']}-trials"), table=rows, description=f"sweep {record['study']}: every trial")
    images = "\n\n".join(f"![{alt}]({png_data_uri(fig)})" for alt, fig in sweep_report.figures(record))
    best = record["best"]
    text = f"best trial {best['trial']}: {best['value']:.6g} with `{best['params']}`" if best else "no completed trial"
    create_markdown_artifact(
        key=artifact_key(f"sweep-{record['study']}-plots"),
        markdown=f"**sweep {record['study']}** ({record['objective']['direction']} {record['objective']['metric']}): {text}\n\n{images}\n\n{record['importance_note']}",
        description=f"sweep {record['study']}: objective per trial, parameter importances",
    )


if __name__ == "__main__":
    sweep()
