"""Config section `sweep`: a hyperparameter search over any config fields (flows/sweep.py).

    sweep:
      stage: pretrain                 # each trial is a short run of this training stage
      objective: {metric: val_loss, direction: minimize}
      trials: 20
      concurrency: 2                  # trials at once (each also holds the gpu-slots limit)
      trial_overrides: ["pretrain.steps=100"]   # short trials; the best config keeps the full run
      sampler: tpe                    # or random
      pruner: median                  # or asha, none
      space:
        pretrain.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        pretrain.warmup_steps: {type: int, low: 0, high: 50}
        model.d_model: {type: categorical, choices: [64, 128]}

The keys of `space` are dotted config paths, exactly what `lmf run --set` takes; the flow checks
each of them (and both ends of each range) against the config tree before any trial runs, so a
typo fails with "did you mean". No stage reads this section: changing it never re-runs a stage.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmfoundry.infra.config_base import Section, execution

Scalar = str | int | float | bool | None


class FloatRange(Section):
    """A float drawn from [low, high]: uniformly, log-uniformly (`log`), or on a grid of `step`."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="sample log-uniformly (learning rates, weight decay)")
    step: float | None = Field(None, gt=0, description="a grid low, low + step, ... (not with log)")

    @model_validator(mode="after")
    def _check_range(self) -> "FloatRange":
        return check_range(self)


class IntRange(Section):
    """An integer drawn from [low, high] (both included), every `step`-th, optionally log-uniform."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = Field(False, description="sample log-uniformly (e.g. widths 64..1024)")
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_range(self) -> "IntRange":
        return check_range(self)


class Choice(Section):
    """One of `choices` (numbers, strings, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> "Choice":
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices {self.choices} repeat a value")
        return self


def check_range(dist: FloatRange | IntRange) -> FloatRange | IntRange:
    if dist.low >= dist.high:
        raise ValueError(f"low {dist.low} must be below high {dist.high}")
    if dist.log and dist.low <= 0:
        raise ValueError(f"log: true needs low > 0 (got low {dist.low})")
    if dist.log and dist.step not in (None, 1):
        raise ValueError("log and step cannot be combined: drop one")
    return dist


Distribution = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class Objective(Section):
    """What a trial scores: a number in the training stage's stats (`lmf show pretrain`)."""

    metric: str = Field("val_loss", description="a stats field of the stage, e.g. val_loss, val_ppl, train_loss")
    direction: Literal["minimize", "maximize"] = "minimize"


class SweepConfig(Section):
    """An Optuna study over `space`; each trial a run of `stage` through the stage store."""

    stage: Literal["pretrain", "sft"] = Field("pretrain", description="the training stage every trial runs")
    objective: Objective = Objective()
    trials: int = Field(20, ge=1, description="trials the study should hold in the end (a rerun continues up to this many)")
    concurrency: int = Field(1, ge=1, le=64, description="trials running at once, each a Prefect task run holding its gpu-slots")
    sampler: Literal["tpe", "random"] = Field("tpe", description="how the next values are chosen (TPE: from the trials so far)")
    pruner: Literal["median", "asha", "none"] = Field(
        "median", description="stop a trial early from its validation curve: worse than the median of others at that step (median), or not in the best quarter at a rung of eval_every x 4^k steps (asha)"
    )
    pruner_startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")
    pruner_warmup_steps: int = Field(0, ge=0, description="median: training steps before a trial can be pruned")
    seed: int = Field(0, description="the sampler's seed (trials running at once make the order, and so the draws, vary)")
    storage: str | None = Field(
        None, description="SQLAlchemy URL of the study database; None: an SQLite file beside the store (sweeps/<study>/optuna.db)"
    )
    study_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="None: <pipeline>-<stage>-<hash of the space, base config and inputs>"
    )
    heartbeat_s: int = execution(
        30, ge=1, description="a running trial writes a heartbeat this often; one silent for 2x this is failed and retried (a killed sweep)"
    )
    space: dict[str, Distribution] = Field(default_factory=dict, description="dotted config path -> distribution")
    trial_overrides: list[str] = Field(
        default_factory=list, description="KEY.PATH=VALUE edits every trial gets (e.g. pretrain.steps=100 for short trials); not in the best config"
    )
