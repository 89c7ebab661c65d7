"""What a run did, without Prefect: the stage loop's result, its printed summary, and the
answer to a run that has nothing to do.

A fully committed rerun (`lmf run` when every stage would be reused) needs no flow run and no
temporary Prefect server (~10 s of its 13-20 s): `answer_if_committed` asks the store the
same questions the flow would (the plan: manifests, file sizes, input fingerprints), and when
the answer is "reuse everything" prints the usual summary and returns. Anything to run, a
--force, or a damaged file goes through the flow as before.

    python -c "from lmfoundry.flows.summary import answer_if_committed; ..."   # used by lmfoundry/cli.py
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from lmfoundry.flows.pipeline import stages_until
from lmfoundry.infra import report
from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import PlanRow, plan
from lmfoundry.infra.store import StageRef, Store

log = logging.getLogger("lmfoundry.stage")


@dataclass
class StagesResult:
    refs: dict[str, StageRef | None] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)  # ran / skipped / disabled / from ref
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage this run executed
    plan: list[PlanRow] | None = None

    def ran(self) -> list[str]:
        return [name for name, action in self.actions.items() if action == "ran"]


def model_location(store: Store, result: StagesResult) -> str | None:
    """The Hugging Face export of the last training stage in this run, if it wrote one."""
    for name in reversed(list(result.refs)):
        ref = result.refs[name]
        manifest = store.manifest(ref.stage, ref.version) if ref else None
        if manifest and str(manifest.get("stats", {}).get("exported", "")).startswith("hf"):
            return f"{store.version_path(ref.stage, ref.version)}/hf"
    return None


def summary_table(store: Store, result: StagesResult) -> list[dict[str, str]]:
    """One row per stage: what ran or was reused, how much it holds, how long it took."""
    table = []
    for name, action in result.actions.items():
        ref = result.refs.get(name)
        manifest = store.manifest(ref.stage, ref.version) if ref else None
        table.append(
            {
                "stage": name,
                "action": action,
                "version": ref.version if ref else "-",
                "holds": report.size_label(report.StageInfo(name, ref.version, manifest)) if manifest else "-",
                "seconds": f"{result.seconds[name]:.1f}" if name in result.seconds else "-",
                "committed_by_run": (manifest.get("run_id") or "-") if manifest else "-",
            }
        )
    return table


def print_summary(store: Store, table: list[dict[str, str]], result: StagesResult) -> None:
    for row in table:
        print(f"{row['stage']:<24} {row['action']:<9} {row['version']:<18} {row['holds']:<28} {row['seconds']:>7} s")
    model = model_location(store, result)
    if model:
        print(f"model: {model} (Hugging Face format: transformers' from_pretrained loads it)")


def answer_if_committed(config: PipelineConfig, until: str | None) -> StagesResult | None:
    """When every stage up to `until` is committed (and intact) for this config, point the
    pipeline's refs at those versions, print the summary and return the result; else None."""
    store = Store.from_config(config.store)
    rows = plan(store, stages_until(until), config)
    if any(row.action not in ("skip", "disabled") for row in rows):
        return None
    result = StagesResult(plan=rows)
    for row, spec in zip(rows, stages_until(until), strict=True):
        if row.action == "disabled":
            result.refs[row.stage] = result.refs.get(spec.inputs[0]) if spec.inputs else None
            result.actions[row.stage] = "disabled"
            continue
        manifest = store.manifest(row.stage, row.version)
        result.refs[row.stage] = StageRef(stage=row.stage, version=row.version, store_url=store.url, digest=manifest["digest"])
        result.actions[row.stage] = "skipped"
        if row.current != row.version:  # the ref points at another run's version: point it here
            store.set_ref(config.store.pipeline, row.stage, row.version)
        print(f"{row.stage} reused version {row.version}", file=sys.stderr)
    print("every stage is committed with this config and inputs: nothing to run (no flow run started)", file=sys.stderr)
    print_summary(store, summary_table(store, result), result)
    return result
