"""The Optuna side of a sweep (flows/sweep.py): the search space against the config tree, the study
in its database, the trial budget, and the results record. No Prefect here.

    space = check_space(config)                       # ConfigError naming the path, before anything runs
    study, storage = open_study(config, store, fingerprint, name)
    trial = study.ask(distributions(config.sweep))    # a WAITING retry of a killed trial comes first
    trial_config(config, trial.params)                # the base config with the sampled values
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lmfoundry.infra.config import ConfigError, PipelineConfig, apply_override, build_config
from lmfoundry.infra.config_sweep import Choice, FloatRange, IntRange, SweepConfig
from lmfoundry.infra.store import Store
from lmfoundry.infra.sweep_report import SWEEPS  # <store>/sweeps/<study>/: results.json, best.yaml (and optuna.db for a local store)
from lmfoundry.tasks.train.pretrain import PretrainStats
from lmfoundry.tasks.train.sft import SftStats

# what a trial of each stage may change: the sections that stage reads (sft starts from the
# pretrained model, so the model's shape is not its to change)
SWEEPABLE = {"pretrain": ("model", "pretrain"), "sft": ("sft",)}
STATS = {"pretrain": PretrainStats, "sft": SftStats}
MAX_RETRIES = 3  # a trial killed with its sweep is re-run this often, then counted as failed

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log says what each trial did
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, constant_liar
# we ask and tell (trials are Prefect task runs) and write the heartbeats ourselves (flows/sweep.py)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# ------------------------------------------------------------------ the space against the config


def override_text(path: str, value: Any) -> str:
    """'pretrain.lr=1.0e-05': a float written so YAML reads it back as a float (YAML 1.1 reads '1e-05' as text)."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e")
    return f"{path}={text}"


def base_data(config: PipelineConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude={"sweep"})


def trial_config(config: PipelineConfig, params: dict[str, Any], origin: str = "sweep trial", extra: list[str] = ()) -> PipelineConfig:
    """The base config with sweep.trial_overrides, a trial's values and then `extra` applied,
    checked like `--set` (ConfigError names the path)."""
    values = [override_text(path, value) for path, value in sorted(params.items())]
    return build_config(base_data(config), list(config.sweep.trial_overrides) + values + list(extra), origin)


def range_ends(dist: FloatRange | IntRange | Choice) -> list[Any]:
    return list(dist.choices) if isinstance(dist, Choice) else [dist.low, dist.high]


def check_space(config: PipelineConfig) -> None:
    """Every path of sweep.space is a field the trial stage reads, and both ends of its range (each
    choice) pass that field's validation; also the objective is a number in the stage's stats."""
    sweep = config.sweep
    if not sweep.space:
        raise ConfigError("sweep.space is empty: give at least one field, e.g. pretrain.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    sections = SWEEPABLE[sweep.stage]
    try:
        trial_config(config, {}, origin="sweep.trial_overrides")
    except ConfigError as exc:
        raise ConfigError(f"sweep.trial_overrides: {exc}") from None
    for path, dist in sweep.space.items():
        section = path.split(".")[0]
        if section not in sections:
            raise ConfigError(
                f"sweep.space '{path}': the {sweep.stage} stage reads only {', '.join(s + '.*' for s in sections)}; "
                f"a field of '{section}' would not change its trials"
            )
        for value in range_ends(dist):
            try:
                trial_config(config, {path: value}, origin=f"sweep.space '{path}'")
            except ConfigError as exc:  # its problems without the header and the override it quotes
                problems = [re.sub(r" \(from override '.*'\)$", "", line.strip()) for line in str(exc).splitlines()[1:]]
                raise ConfigError(f"sweep.space '{path}' (value {value!r}): {'; '.join(problems) or exc}") from None
    fields = STATS[sweep.stage].model_fields
    numeric = sorted(name for name, f in fields.items() if f.annotation in (float, int, float | None, int | None))
    if sweep.objective.metric not in numeric:
        raise ConfigError(f"sweep.objective.metric '{sweep.objective.metric}' is not a number in the {sweep.stage} stage's stats; choose one of: {', '.join(numeric)}")


def distributions(sweep: SweepConfig) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for path, dist in sweep.space.items():
        if isinstance(dist, Choice):
            out[path] = CategoricalDistribution(dist.choices)
        elif isinstance(dist, IntRange):
            out[path] = IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            out[path] = FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    return out


def intermediate_key(metric: str) -> str:
    """The metrics.jsonl key that tracks the objective during training (the trainer logs `loss`)."""
    return "loss" if metric == "train_loss" else metric


def fingerprint(config: PipelineConfig, stage_identity: dict[str, Any], input_digests: list[str]) -> str:
    """What makes trials comparable: stage, objective, space, the base config outside the swept
    fields, the inputs. Raising `trials` or `concurrency` continues the same study."""
    identity = json.loads(json.dumps(stage_identity))
    for path in config.sweep.space:
        node = identity
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    sweep = config.sweep
    blob = {"stage": sweep.stage, "trial_overrides": sweep.trial_overrides, "objective": sweep.objective.model_dump(), "space": {k: v.model_dump() for k, v in sorted(sweep.space.items())}, "base": identity, "inputs": sorted(input_digests)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ the study


def sweep_dir(store: Store, study_name: str) -> Path:
    """Local directory of a study: beside a local store, else in the local cache (LMF_CACHE)."""
    if store.is_local:
        return Path(store.root) / SWEEPS / study_name
    return Path(os.environ.get("LMF_CACHE", Path.home() / ".cache" / "lmfoundry")) / SWEEPS / study_name


def storage_url(sweep: SweepConfig, store: Store, study_name: str) -> str:
    if sweep.storage:
        return sweep.storage
    path = sweep_dir(store, study_name) / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_study(config: PipelineConfig, store: Store, study_name: str, print_id: str) -> tuple[optuna.Study, RDBStorage]:
    """Create the study, or load it to continue; a study of another fingerprint is refused."""
    sweep = config.sweep
    url = storage_url(sweep, store, study_name)
    # trials run in threads of one process: SQLite waits for the write lock instead of failing
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    storage = RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_s, grace_period=2 * sweep.heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
    )
    eval_every = getattr(trial_config(config, {}), sweep.stage).eval_every  # the steps at which a trial reports
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction=sweep.objective.direction, sampler=sampler(sweep), pruner=pruner(sweep, eval_every), load_if_exists=True
    )
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", print_id)
        study.set_user_attr("objective", sweep.objective.model_dump())
    elif known != print_id:
        raise ConfigError(
            f"study '{study_name}' in {public_url(url)} was started with another search space, objective, base config or inputs "
            f"(its trials are not comparable): set another sweep.study_name, or none for a name derived from the sweep"
        )
    return study, storage


def public_url(url: str) -> str:
    """A database URL without its password, for messages and the results record."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    # constant liar: trials running at once are scored as bad guesses, so they are not all the same
    return optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=sweep.concurrency > 1, n_startup_trials=min(10, max(2, sweep.trials // 3)))


def pruner(sweep: SweepConfig, eval_every: int = 1) -> optuna.pruners.BasePruner:
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=sweep.pruner_warmup_steps)
    if sweep.pruner == "asha":
        # rungs at the first validation step x 4^k; Optuna's "auto" would wait for a finished
        # trial to guess it, and that first trial would never enter the rungs
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=4)
    return optuna.pruners.NopPruner()


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count toward sweep.trials: all but the failed ones a retry replaced (a killed sweep's)."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


# ------------------------------------------------------------------ results


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: trial, state, value, the params, stage version, ran or reused, seconds, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "version": attrs.get("version"),
            "stage": attrs.get("stage_status"),
            "seconds": attrs.get("seconds"),
            "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t),
            "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
            "error": attrs.get("error"),
        })
    return rows


def importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Optuna's parameter importances (PED-ANOVA) over the completed trials, or why there are none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}, f"parameter importances need 3 completed trials ({len(complete)} so far)"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}, ""
    except (ValueError, RuntimeError) as exc:  # e.g. every completed trial has the same values
        return {}, f"parameter importances not computed: {exc}"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def best_preset(preset: Path, overrides: list[str], params: dict[str, Any], header: str) -> str:
    """The user's own preset (overrides applied) with the best values set and the sweep section
    dropped: a small YAML file `lmf run --config` loads."""
    data = yaml.safe_load(preset.read_text()) or {}
    for path, value in [(p.split("=", 1)[0], yaml.safe_load(p.split("=", 1)[1])) for p in overrides] + sorted(params.items()):
        apply_override(data, [part for part in path.split(".") if part], value)
    data.pop("sweep", None)
    build_config(data, origin="best config")  # what we write must load
    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(data, sort_keys=False)
