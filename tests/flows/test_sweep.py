"""The sweep flow (flows/sweep.py) on a toy problem: a tiny model pretrained a few steps on a Markov
chain, where lr 3e-3 clearly beats lr 1e-5. Real DeepSpeed trainings through the stage store, a real
Optuna study in SQLite, under the Prefect test harness; a `lmf sweep` subprocess killed with
SIGKILL mid-sweep and a rerun that continues the study.

Run: .venv/bin/pytest -q tests/flows/test_sweep.py
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from lmfoundry.flows import sweep_study as studies
from lmfoundry.cli import main
from lmfoundry.flows.stage_task import artifact_key
from lmfoundry.flows.sweep import TrialMonitor, sweep
from lmfoundry.infra.config import ConfigError, load_config
from lmfoundry.infra.config_sweep import SweepConfig
from lmfoundry.infra.report import build_report
from lmfoundry.infra.store import Store
from lmfoundry.infra.sweep_report import read_sweeps, report_sections
from tests.model.token_fixtures import commit_tokenizer, commit_tokens, markov_tokens

VOCAB, SEQ = 48, 16
LOW, HIGH = 1e-5, 3e-3


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """One store for the file: tiny committed token and tokenizer stages under pipeline 'toy'; a
    trial one test trained is reused by the next (as across real sweeps)."""
    store = Store(str(tmp_path_factory.mktemp("sweeps") / "store"))
    tokens = commit_tokens(store, markov_tokens(128, SEQ, VOCAB, seed=0), markov_tokens(16, SEQ, VOCAB, seed=1), VOCAB)
    tokenizer = commit_tokenizer(store, VOCAB)
    for ref in (tokens, tokenizer):
        store.set_ref("toy", ref.stage, ref.version)
    return store


def preset(tmp_path, store: Store, **sweep) -> str:
    """A preset that pretrains on the store's data for 20 steps (a validation pass every 5)."""
    pipeline = "toy"
    data = {
        "store": {"url": store.url, "pipeline": pipeline, "lease_ttl_s": 4},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2},
        "pretrain": {
            "steps": 20, "global_batch_size": 8, "lr": HIGH, "min_lr": 1e-6, "warmup_steps": 2, "export_hf": False,
            "log_every": 5, "eval_every": 5, "checkpoint_every": 10, "eval_samples": 16, "stability": {"enabled": False},
            "distributed": {"launcher": "torchrun"},  # one interpreter fewer to start per trial than deepspeed's launcher
        },
        "sweep": {
            "objective": {"metric": "val_loss", "direction": "minimize"}, "sampler": "random", "pruner": "none", "seed": 0,
            "heartbeat_s": 2, "space": {"pretrain.lr": {"type": "categorical", "choices": [LOW, HIGH]}}, **sweep,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def study_trials(path: str) -> list[optuna.trial.FrozenTrial]:
    summaries = optuna.get_all_study_summaries(storage=f"sqlite:///{path}")
    if not summaries:  # the sweep has made the file but not the study yet
        return []
    return optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{path}").get_trials()


def test_finds_the_better_learning_rate_and_reuses_a_repeated_trial(prefect_harness, store, tmp_path):
    from prefect import get_client

    path = preset(tmp_path, store, trials=3, concurrency=2)
    data = yaml.safe_load(open(path))
    data["compute"] = {"gpu_concurrency_limit": "sweep-test-slots"}  # trials hold it like training stages
    open(path, "w").write(yaml.safe_dump(data))
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("sweep-test-slots", 2)
    slots = SlotWatch("sweep-test-slots")
    best_file = tmp_path / "best.yaml"
    with slots:
        result = sweep(preset=path, best_config=str(best_file))
    assert slots.most == 2 and slots.last == 0  # both trainings held a slot at once, and gave it back
    assert result["trials"] == {"COMPLETE": 3}
    assert result["best"]["params"] == {"pretrain.lr": HIGH}
    (record,) = [r for r in read_sweeps(store, "toy") if r["study"] == result["study"]]
    by_lr: dict[float, list[dict]] = {}
    for row in record["trials"]:
        by_lr.setdefault(row["params"]["pretrain.lr"], []).append(row)
    assert set(by_lr) == {LOW, HIGH}  # seed 0 draws 3e-3, 1e-5, then 3e-3 again
    high, low = min(r["value"] for r in by_lr[HIGH]), min(r["value"] for r in by_lr[LOW])
    assert high < low - 0.5, (high, low)  # 20 steps at 1e-5 barely move the loss off log(48) = 3.87
    # the repeated value is the same stage version, reused from the store, not trained again
    repeated = next(rows for rows in by_lr.values() if len(rows) == 2)
    assert repeated[0]["version"] == repeated[1]["version"]
    assert sorted(r["stage"] for r in repeated) == ["ran", "reused"]
    assert len({r["version"] for r in record["trials"]}) == 2
    # concurrency 2: the first two trials (two trainings) ran at the same time
    first, second, _ = study_trials(str(Path(store.root) / "sweeps" / result["study"] / "optuna.db"))
    assert second.datetime_start < first.datetime_complete and first.datetime_start < second.datetime_complete
    # trial stages live under their own pipeline name: the pipeline's pretrain ref is untouched
    assert store.get_ref("toy", "pretrain") is None and store.get_ref(f"toy-sweep-{result['study']}", "pretrain") in {r["version"] for r in record["trials"]}
    # the best config is a preset `lmf run --config` loads, with the best value and no sweep section
    best = load_config(best_file)
    assert best.pretrain.lr == HIGH and best.sweep.space == {} and best.store.pipeline == "toy"
    assert (Path(store.root) / "sweeps" / result["study"] / "best.yaml").read_text() == best_file.read_text()
    # lmf report's section: the table and the objective plot
    (section,) = [s for s in report_sections(store, "toy") if s["study"] == result["study"]]
    assert section["columns"][:4] == ["trial", "state", "val_loss", "pretrain.lr"] and len(section["rows"]) == 3
    assert record["importances"] == {"pretrain.lr": 1.0}  # Optuna's importances: the only parameter explains it all
    assert [p["alt"] for p in section["plots"]] == ["objective per trial", "parameter importances"]
    assert section["plots"][0]["src"].startswith("data:image/png;base64,")
    # the Prefect artifacts: the trial table and the plots
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(f"sweep-{result['study']}-trials")])))
        plots = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(f"sweep-{result['study']}-plots")])))
    assert len(json.loads(table[0].data)) == 3 and plots[0].data.count("](data:image/png;base64,") == 2
    page = build_report(store, "toy", ["pretrain"], versions={})
    assert f"Sweep {result['study']}" in page and "<b>pretrain.lr</b>" in page


def test_a_bad_space_fails_naming_the_path(store, tmp_path, capsys):
    base = yaml.safe_load(open(preset(tmp_path, store)))

    def check(space, **sweep):
        data = dict(base, sweep=dict(base["sweep"]))
        data["sweep"].update(space=space, **sweep)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        studies.check_space(load_config(tmp_path / "bad.yaml"))

    with pytest.raises(ConfigError, match=r"sweep.space 'pretrain.lrr' .*did you mean 'lr'"):
        check({"pretrain.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError, match=r"sweep.space 'model.n_heads' \(value 3\).*not a multiple of model.n_heads 3"):
        check({"model.n_heads": {"type": "int", "low": 3, "high": 4}})
    with pytest.raises(ConfigError, match=r"sweep.space 'tokenize.val_fraction': the pretrain stage reads only model.\*, pretrain.\*"):
        check({"tokenize.val_fraction": {"type": "float", "low": 0.1, "high": 0.2}})
    with pytest.raises(ConfigError, match=r"sweep.space.pretrain.lr.float: .*low 0.01 must be below high 0.0001"):
        check({"pretrain.lr": {"type": "float", "low": 1e-2, "high": 1e-4}})
    with pytest.raises(ConfigError, match=r"log: true needs low > 0"):
        check({"pretrain.warmup_steps": {"type": "int", "low": 0, "high": 5, "log": True}})
    with pytest.raises(ConfigError, match=r"sweep.objective.metric 'val_los' is not a number .* val_loss"):
        check({"pretrain.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, objective={"metric": "val_los"})
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        check({})
    # `lmf sweep` says so before starting anything, exit code 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(base, sweep=dict(base["sweep"], space={"pretrain.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}))))
    assert main(["sweep", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_killed_sweep_resumes_and_the_retry_is_pruned_early(prefect_harness, prefect_api_url, store, tmp_path):
    """TPE's first (random) draws with seed 41: trial 0 = (lr 3e-3, 20 steps): committed by the test above, reused at once; and
    trial 1 = (lr 2e-5, 2000 steps): a new training. The sweep is killed while trial 1 runs; the
    rerun fails it and re-runs it, and the median pruner stops that run at its first validation
    (worse than trial 0 at the same step) instead of training 2000 steps."""
    space = {"pretrain.lr": {"type": "categorical", "choices": [HIGH, 2e-5]}, "pretrain.steps": {"type": "categorical", "choices": [20, 2000]}}
    path = preset(tmp_path, store, trials=2, concurrency=1, study_name="killed", sampler="tpe", seed=41, pruner="median", pruner_startup_trials=1, space=space)
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    log = open(tmp_path / "sweep.log", "w")
    child = subprocess.Popen([sys.executable, "-m", "lmfoundry.cli", "sweep", "--config", path], env=env, stdout=log, stderr=subprocess.STDOUT)
    db_path = Path(store.root) / "sweeps" / "killed" / "optuna.db"
    deadline = time.monotonic() + 300
    while True:  # kill as soon as one trial is finished and the next is running
        states = trial_states(db_path)
        if states.count("COMPLETE") >= 1 and "RUNNING" in states:
            break
        assert child.poll() is None and time.monotonic() < deadline, f"the sweep ended or stalled before it could be killed: {states}\n" + (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.3)
    kill_tree(child)
    before = {t.number: t for t in study_trials(str(db_path))}
    assert [t.state.name for t in before.values()] == ["COMPLETE", "RUNNING"]
    assert before[0].params == {"pretrain.lr": HIGH, "pretrain.steps": 20} and before[0].user_attrs["stage_status"] == "reused"

    result = sweep(preset=path)
    after = {t.number: t for t in study_trials(str(db_path))}
    assert result["trials"] == {"COMPLETE": 1, "FAIL": 1, "PRUNED": 1} and len(after) == 3  # nothing else was added
    assert after[0].value == before[0].value and after[0].datetime_complete == before[0].datetime_complete  # not run again
    # the killed trial is FAIL and was re-run once with its own values
    assert after[1].state.name == "FAIL" and after[2].system_attrs.get("failed_trial") == 1
    retry = after[2]
    assert retry.params == before[1].params == {"pretrain.lr": 2e-5, "pretrain.steps": 2000}
    # pruned from its validation curve: stopped long before step 2000, its stage never committed
    assert retry.state.name == "PRUNED" and max(retry.intermediate_values) < 100, retry.intermediate_values
    first = min(retry.intermediate_values)
    assert retry.intermediate_values[first] > after[0].intermediate_values[first]
    assert not store.is_committed("pretrain", retry.user_attrs["version"])


def test_a_study_name_is_refused_for_another_sweep(store, tmp_path):
    """The same study name with another space (or base config, objective, inputs) would mix trials
    that are not comparable: refused, naming the study; the same sweep loads it again."""
    config = load_config(preset(tmp_path, store, study_name="named"))
    other = config.model_copy(update={"sweep": config.sweep.model_copy(update={"space": {}})})
    identity = {"model": {}, "pretrain": {"lr": 1.0, "steps": 20}}
    one, two = studies.fingerprint(config, identity, ["d"]), studies.fingerprint(other, identity, ["d"])
    assert one != two and one == studies.fingerprint(config, {"model": {}, "pretrain": {"lr": 2.0, "steps": 20}}, ["d"])  # swept fields do not count
    assert one != studies.fingerprint(config, {"model": {}, "pretrain": {"lr": 1.0, "steps": 30}}, ["d"])  # the rest of the base does
    study, _ = studies.open_study(config, store, "named", one)
    study.enqueue_trial({"pretrain.lr": HIGH})
    assert len(studies.open_study(config, store, "named", one)[0].trials) == 1  # loaded, not new
    with pytest.raises(ConfigError, match=r"study 'named' in sqlite:///.*optuna.db was started with another search space"):
        studies.open_study(other, store, "named", two)


def test_the_sweep_deployment_runs_this_flow_with_the_demo_preset():
    from lmfoundry.flows.deploy import runner_deployments

    (deployment,) = runner_deployments(only=["sweep"])
    assert deployment.entrypoint == "lmfoundry.flows.sweep.sweep" and deployment.parameters == {"preset": "configs/demo.yaml"}
    assert set(deployment._parameter_openapi_schema.properties) == {"preset", "overrides", "best_config"}
    studies.check_space(load_config())  # the demo preset's sweep section is valid as shipped


@pytest.mark.parametrize("kind,stops", [("median", True), ("asha", True), ("none", False)])
def test_the_monitor_stops_a_worse_trial_at_its_first_validation(tmp_path, kind, stops):
    """Trial 0 finished with a falling curve; trial 1's metrics.jsonl shows a worse value at step 5:
    median and ASHA (rungs at 5, 20, ...) prune it and the monitor creates STOP; none never does."""
    sweep_cfg = SweepConfig(pruner=kind, pruner_startup_trials=1)
    study = optuna.create_study(pruner=studies.pruner(sweep_cfg, eval_every=5))
    dists = {"pretrain.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    curve = lambda *values: [{"kind": "val", "step": step, "val_loss": v} for step, v in zip((5, 10, 15, 20), values)]  # noqa: E731
    first = study.ask(dists)
    TrialMonitor(first, None, "val_loss").report(curve(3.6, 3.4, 3.3, 3.2), prune=False)  # a finished (or reused) trial
    study.tell(first, 3.2)
    monitor = TrialMonitor(study.ask(dists), tmp_path, "val_loss").start()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve(3.87, 3.86)) + '{"kind": "val", "st')  # mid-write
    deadline = time.monotonic() + 10
    while not ((tmp_path / "STOP").exists() or len(monitor.reported) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # a look or two more: nothing changes
    monitor.stop()
    assert monitor.pruned is stops and (tmp_path / "STOP").exists() is stops
    assert monitor.reported == ({5} if stops else {5, 10})  # a pruned trial reports nothing after the step that stopped it


class SlotWatch:
    """The most slots of a global concurrency limit in use at once while the block runs."""

    def __init__(self, name: str):
        self.name, self.most, self.last = name, 0, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            while not self.done.wait(0.2):
                self.most = max(self.most, client.read_global_concurrency_limit_by_name(self.name).active_slots)
            self.last = client.read_global_concurrency_limit_by_name(self.name).active_slots

    def __enter__(self) -> "SlotWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def trial_states(db_path: Path) -> list[str]:
    """The trials' states, read-only: opening the file with Optuna while the sweep creates it would
    race it to create the tables."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            return [state for (state,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # no file or no tables yet
        return []


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the sweep and every process it started (the trainers run in their own sessions)."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        try:
            os.kill(member.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
