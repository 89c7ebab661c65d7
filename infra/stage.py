"""Running one stage through the store: version, skip-if-committed, lease, run, commit.

A stage is a pure function ``run_x(cfg, inputs, out) -> stats`` living in ``tasks/<phase>/x.py``
beside a ``CODE_VERSION`` string (bump it when the stage's output changes for the same
config). Optionally the module defines ``input_fingerprint(cfg) -> str`` for inputs that
are not stages (files on disk, URLs). Nothing here imports Prefect: the same call runs
under a Prefect task, a Dask worker or a plain script.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel

from lmfoundry.infra.config import PipelineConfig, Section
from lmfoundry.infra.config_base import Sections
from lmfoundry.infra.files import InputError
from lmfoundry.infra.store import StageRef, Store, stage_version
from lmfoundry.infra.verify import describe, finish_repair, pending_repair, size_damage, uncommit

log = logging.getLogger("lmfoundry.stage")


@dataclass(frozen=True)
class StageSpec:
    """One row of a pipeline's table of contents: everything the runner and the flows need to know."""

    name: str
    run: str  # "lmfoundry.tasks.dedup.exact_dedup:run_exact_dedup"
    # the config section the stage receives, or several (then as one Sections: cfg.model, cfg.pretrain)
    section: str | tuple[str, ...]
    inputs: tuple[str, ...] = ()
    # fields of the section this stage never reads: held at their defaults, so changing them
    # (e.g. the quality threshold) does not re-run it
    unused: tuple[str, ...] = ()
    # trains on accelerators: waits for a slot of the GPU concurrency limit, runs in the GPU pool
    gpu: bool = False

    def module(self):
        return importlib.import_module(self.run.split(":")[0])

    def function(self) -> Callable[..., Any]:
        return getattr(self.module(), self.run.split(":")[1])

    def code_version(self) -> str:
        return str(getattr(self.module(), "CODE_VERSION"))

    def config(self, root: PipelineConfig) -> Section:
        if isinstance(self.section, tuple):
            return Sections(**{name: getattr(root, name) for name in self.section})
        cfg = getattr(root, self.section)
        if self.unused:
            fields = type(cfg).model_fields
            cfg = cfg.model_copy(update={name: fields[name].default for name in self.unused})
        return cfg

    def enabled(self, root: PipelineConfig) -> bool:
        """A section with `enabled: false` turns its stage into a pass-through of its first input
        (a stage reading several sections is off when any of them is, e.g. `sft.enabled`)."""
        names = self.section if isinstance(self.section, tuple) else (self.section,)
        return all(getattr(getattr(root, name), "enabled", True) for name in names)

    def external_fingerprint(self, cfg: Section) -> str:
        fingerprint = getattr(self.module(), "input_fingerprint", None)
        return fingerprint(cfg) if fingerprint else ""

    def version(self, root: PipelineConfig, input_digests: list[str], salt: str = "") -> str:
        cfg = self.config(root)
        digests = list(input_digests) + ([f"external:{self.external_fingerprint(cfg)}"] if self.external_fingerprint(cfg) else [])
        return stage_version(self.name, self.code_version(), cfg.identity(), digests, salt)


class StageOutcome(BaseModel):
    ref: StageRef
    status: Literal["ran", "skipped"]
    stats: dict[str, Any]


def stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    if isinstance(stats, BaseModel):
        return stats.model_dump(mode="json")
    return dict(stats)


def run_stage(
    store: Store,
    spec: StageSpec,
    root: PipelineConfig,
    inputs: list[StageRef],
    *,
    salt: str = "",
    run_id: str | None = None,
) -> StageOutcome:
    """Run one stage unless this exact version is committed (and intact); returns the committed ref.

    A committed version whose files are missing or of the wrong size is un-committed first
    (infra/verify.py), so this call recomputes just those files.
    """
    cfg = spec.config(root)
    version = spec.version(root, [ref.digest for ref in inputs], salt)
    manifest = store.manifest(spec.name, version)
    if manifest is not None and (damaged := size_damage(store, spec.name, version, manifest)):
        uncommit(store, spec.name, version, damaged, manifest)
        manifest = None
    if manifest is None:
        with store.lease(spec.name, version) as lease:
            # another writer may have committed while we waited for the lease
            if not store.is_committed(spec.name, version):
                return _run_and_commit(store, spec, cfg, root, inputs, version, salt, run_id, lease)
        manifest = store.manifest(spec.name, version)
    log.info("stage %s version %s is committed: reusing it", spec.name, version)
    store.set_ref(root.store.pipeline, spec.name, version, run_id)
    ref = StageRef(stage=spec.name, version=version, store_url=store.url, digest=manifest["digest"])
    return StageOutcome(ref=ref, status="skipped", stats=manifest.get("stats", {}))


def _run_and_commit(store, spec, cfg, root, inputs, version, salt, run_id, lease=None) -> StageOutcome:
    out = store.open_for_write(spec.name, version, lease)
    resumed = len(out.marked_files())
    repair = pending_repair(store, spec.name, version)
    if repair:
        log.warning("stage %s version %s: recomputing %d damaged file(s), reusing the %d intact ones (%s)",
                    spec.name, version, len(repair["files"]), resumed, describe(repair["files"]))
    else:
        log.info("stage %s version %s: running%s", spec.name, version, f" (resuming, {resumed} files already done)" if resumed else "")
    stats = stats_dict(spec.function()(cfg, inputs, out, compute=root.compute))
    ref = store.commit(
        out,
        {
            "code_version": spec.code_version(),
            "config": cfg.model_dump(mode="json"),
            "identity": cfg.identity(),
            "inputs": [r.model_dump() for r in inputs],
            "external_inputs": spec.external_fingerprint(cfg),
            "salt": salt,
            "run_id": run_id,
            "resumed_files": resumed,
            "repaired_files": sorted(repair["files"]) if repair else [],
            "stats": stats,
        },
    )
    if repair:
        finish_repair(store, spec.name, version)
    store.set_ref(root.store.pipeline, spec.name, version, run_id)
    return StageOutcome(ref=ref, status="ran", stats=stats)


class PlanRow(BaseModel):
    stage: str
    version: str | None  # None when an upstream stage must run first
    action: Literal["skip", "run", "run (upstream changes)", "disabled"]
    current: str | None  # the version the pipeline's ref points at now
    reason: str


def plan(store: Store, stages: list[StageSpec], root: PipelineConfig, forced: set[str] = frozenset()) -> list[PlanRow]:
    """What a run with this config would do, stage by stage, without running anything."""
    digests: dict[str, str | None] = {}  # None: a disabled stage with no input
    rows = []
    for spec in stages:
        current = store.get_ref(root.store.pipeline, spec.name)
        if not spec.enabled(root):
            digests[spec.name] = digests.get(spec.inputs[0]) if spec.inputs else None
            rows.append(PlanRow(stage=spec.name, version=None, action="disabled", current=current, reason="disabled in config: passes its first input through"))
            continue
        if any(name not in digests for name in spec.inputs):
            rows.append(PlanRow(stage=spec.name, version=None, action="run (upstream changes)", current=current, reason="may change: an input will be recomputed (if its output comes out identical, this stage is reused)"))
            continue
        version = spec.version(root, [digests[name] for name in spec.inputs if digests[name] is not None])
        manifest = store.manifest(spec.name, version)
        damaged = size_damage(store, spec.name, version, manifest) if manifest is not None else {}
        if spec.name in forced:
            rows.append(PlanRow(stage=spec.name, version=version, action="run", current=current, reason="forced"))
        elif manifest is not None and not damaged:
            digests[spec.name] = manifest["digest"]
            rows.append(PlanRow(stage=spec.name, version=version, action="skip", current=current, reason="committed with this config and inputs"))
        else:
            reason = why_run(store, spec.name, version, current, damaged)
            if reason.startswith("config, code or inputs changed") and current:
                reason = what_changed(store.manifest(spec.name, current), current, spec, root, [digests[name] for name in spec.inputs if digests[name] is not None]) or reason
            rows.append(PlanRow(stage=spec.name, version=version, action="run", current=current, reason=reason))
    return rows


def why_run(store: Store, stage: str, version: str, current: str | None, damaged: dict[str, str]) -> str:
    """Why a stage version that is not (or no longer) usable will run."""
    redo = "a run recomputes only those files and reuses the rest"
    if damaged:
        return f"{describe(damaged)}; {redo}"
    repair = pending_repair(store, stage, version)
    if repair:
        return f"not committed: {describe(repair['files'])}; {redo}"
    if current == version:
        return "not committed: no manifest (a run stopped before its commit, or the manifest is unreadable); a run resumes it"
    return "never run" if current is None else f"config, code or inputs changed since {current}"


def what_changed(old: dict | None, old_version: str, spec: StageSpec, root: PipelineConfig, input_digests: list[str]) -> str | None:
    """'changed since V: near_dedup.threshold 0.8 -> 0.85; code 1 -> 2; inputs' against the
    manifest of the version the ref points at (None when that manifest cannot be read)."""
    if not old:
        return None
    prefix = f"{spec.section}." if isinstance(spec.section, str) else ""
    changes = [f"{path} {before!r} -> {after!r}" for path, before, after in identity_diff(old.get("identity") or {}, spec.config(root).identity(), prefix)]
    if str(old.get("code_version")) != spec.code_version():
        changes.append(f"code version {old.get('code_version')} -> {spec.code_version()}")
    if sorted(ref.get("digest", "") for ref in old.get("inputs", [])) != sorted(input_digests):
        changes.append("its inputs are other versions")
    if old.get("external_inputs", "") != spec.external_fingerprint(spec.config(root)):
        changes.append("its input files changed")
    return f"changed since {old_version}: " + "; ".join(changes) if changes else None


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaf fields that differ between two identity dicts, as (dotted path, old, new)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_inputs(stages: list[StageSpec], root: PipelineConfig) -> None:
    """Raise one InputError naming every configured input (files, globs, models named in the
    config) of the enabled `stages` that cannot be read, before anything runs."""
    problems = []
    for spec in stages:
        if spec.enabled(root):
            try:
                spec.external_fingerprint(spec.config(root))
            except InputError as exc:
                problems.append(f"{spec.name}: {exc}")
    if problems:
        raise InputError(problems[0] if len(problems) == 1 else "inputs that cannot be read:\n  " + "\n  ".join(problems))


def downstream(stages: list[StageSpec], names: set[str]) -> set[str]:
    """The given stages plus everything that depends on them."""
    closed = set(names)
    for spec in stages:  # stages are listed in topological order
        if closed.intersection(spec.inputs):
            closed.add(spec.name)
    return closed
