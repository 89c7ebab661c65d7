"""Typed flow parameters: what the Prefect UI turns into a form with defaults and validation.

Flows take a config *preset* (a YAML file from configs/) plus ``--set``-style overrides rather
than the whole config tree, so a scheduled run stays a one-line change and a form stays
short. Secrets (store credentials, tokens) are never parameters: they come from the worker's
environment (AWS_* variables, ~/.aws, Prefect Secret blocks read by the code that needs them).
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from lmfoundry.flows.pipeline import STAGE_NAMES, data_stages, posttrain_stages
from lmfoundry.infra.config import REPO_ROOT, PipelineConfig, load_config

DEFAULT_PRESET = "configs/demo.yaml"

# a dropdown of the pipeline's stages in the UI form
StageName = StrEnum("StageName", {name: name for name in STAGE_NAMES})

Override = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*=.*$",
        description="KEY.PATH=VALUE like `lmf run --set`, e.g. near_dedup.threshold=0.85",
    ),
]

SnapshotLabel = Annotated[
    str,
    Field(
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})?$",
        description="names this version of the data (letters, digits, . _ -); empty: the run's scheduled time",
    ),
]


class Rerun(BaseModel):
    """Start part-way through the pipeline, optionally recomputing what is already committed."""

    model_config = ConfigDict(extra="forbid")

    from_stage: StageName | None = Field(
        None,
        description="start at this stage; the stages before it are read from the pipeline's current refs instead of being checked",
    )
    force: bool = Field(
        False,
        description="recompute from_stage and everything downstream even if committed (a new version beside the old)",
    )


def rerun_for(title: str, names: list[str]) -> type[Rerun]:
    """A Rerun whose stage dropdown in the UI form offers only `names`: the stages that flow runs."""
    choice = StrEnum(f"{title}Stage", {name: name for name in names})
    return create_model(title, __base__=Rerun, __doc__=Rerun.__doc__, from_stage=(choice | None, Rerun.model_fields["from_stage"]))


DataRerun = rerun_for("DataRerun", [spec.name for spec in data_stages()])
PretrainRerun = rerun_for("PretrainRerun", ["pretrain"])
PosttrainRerun = rerun_for("PosttrainRerun", [spec.name for spec in posttrain_stages()])


def resolve_preset(preset: str) -> Path:
    """A preset path as given, else relative to the repository (workers run from any directory)."""
    path = Path(preset).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def load_run_config(preset: str, overrides: list[str]) -> PipelineConfig:
    return load_config(resolve_preset(preset), list(overrides))


def start_deployment(name: str, parameters: dict[str, Any], reason: str) -> str | None:
    """Start (do not wait for) deployment `name` with `parameters`; returns its flow run id.
    How one flow chains the next (data refresh -> pretrain -> post-train). A deployment that is
    not registered (e.g. `lmf serve --only pretrain`) is reported and skipped, never an error:
    the work of this run is committed either way."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(name, parameters=parameters, timeout=0, as_subflow=False)
    except ObjectNotFound:
        print(f"not starting {name}: it is not deployed (lmf serve / lmf deploy register it)")
        return None
    print(f"started {name} run {run.id} because {reason}")
    return str(run.id)
