"""A sweep's results as plots and tables: the Prefect artifacts of flows/sweep.py and a section of
`lmf report` draw them from the same record, ``<store>/sweeps/<study>/results.json``:

    {"study", "pipeline", "stage", "objective": {"metric", "direction"}, "storage", "space",
     "trials": [{"trial", "state", "value", "params", "version", "stage", "seconds", "retry_of",
                 "last_reported", "error"}],
     "best": {"trial", "value", "params", "version"} | null, "importances": {param: share},
     "importance_note", "best_config", "updated_at"}

Plots: the objective of every trial against its number (completed trials as dots, pruned ones
as crosses at their last reported value, the best so far as a step line) and Optuna's parameter
importances as bars.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lmfoundry.infra.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SWEEPS = "sweeps"
RESULTS = "results.json"


def results_path(store: Store, study: str) -> str:
    return store.path(SWEEPS, study, RESULTS)


def write_results(store: Store, record: dict[str, Any]) -> str:
    path = results_path(store, record["study"])
    store.write_bytes_atomic(path, json.dumps(record, indent=1, default=str).encode())
    return path


def read_sweeps(store: Store, pipeline: str | None = None) -> list[dict[str, Any]]:
    """Every sweep record in the store (of `pipeline` when given), newest first."""
    records = []
    for path in store.fs.glob(store.path(SWEEPS, "*", RESULTS)):
        with store.fs.open(path, "rb") as f:
            record = json.loads(f.read())
        if pipeline is None or record.get("pipeline") == pipeline:
            records.append(record)
    return sorted(records, key=lambda r: str(r.get("updated_at", "")), reverse=True)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a table: trial, state, value, one column per parameter, stage version, ran/reused."""
    names = list(record.get("space") or {})
    rows = []
    for t in record["trials"]:
        row = {"trial": t["trial"], "state": t["state"], record["objective"]["metric"]: format_value(t["value"])}
        row.update({name: format_value(t["params"].get(name)) for name in names})
        row.update({"version": t.get("version") or "-", "stage": t.get("stage") or "-", "seconds": format_value(t.get("seconds"))})
        note = t.get("error") or (f"retry of trial {t['retry_of']}" if t.get("retry_of") is not None else "")
        row["note"] = (note[:117] + "...") if len(note) > 120 else note
        rows.append(row)
    return rows


def objective_figure(record: dict[str, Any]) -> Figure:
    from matplotlib.figure import Figure

    metric, direction = record["objective"]["metric"], record["objective"]["direction"]
    done = [(t["trial"], t["value"]) for t in record["trials"] if t["state"] == "COMPLETE" and t["value"] is not None]
    pruned = [(t["trial"], t["last_reported"]) for t in record["trials"] if t["state"] == "PRUNED" and t.get("last_reported") is not None]
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    if done:
        ax.plot([n for n, _ in done], [v for _, v in done], "o", color="#3b7dd8", label="completed")
        best, steps = None, []
        for n, v in done:
            best = v if best is None or (v < best if direction == "minimize" else v > best) else best
            steps.append((n, best))
        ax.step([n for n, _ in steps], [b for _, b in steps], where="post", color="#d8703b", label="best so far")
    if pruned:
        ax.plot([n for n, _ in pruned], [v for _, v in pruned], "x", color="gray", label="pruned (last reported)")
    if not done and not pruned:
        ax.text(0.5, 0.5, "no trial has a value yet", ha="center", va="center")
    ax.set_title(f"sweep {record['study']}: {metric} per trial ({direction})")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    if done or pruned:
        ax.legend(fontsize=8)
    return fig


def importance_figure(record: dict[str, Any]) -> Figure | None:
    from lmfoundry.infra.report import bar_figure

    shares = record.get("importances") or {}
    if not shares:
        return None
    fig = bar_figure(list(shares), [100.0 * v for v in shares.values()], f"sweep {record['study']}: parameter importances", "% of the objective's variation (PED-ANOVA)")
    return fig


def figures(record: dict[str, Any]) -> list[tuple[str, Figure]]:
    """(alt text, figure) for each plot the record supports."""
    out = [("objective per trial", objective_figure(record))]
    importance = importance_figure(record)
    if importance is not None:
        out.append(("parameter importances", importance))
    return out


def report_sections(store: Store, pipeline: str) -> list[dict[str, Any]]:
    """What `lmf report` shows of each sweep of `pipeline`: heading facts, the trial table, plots."""
    from lmfoundry.infra.report import png_data_uri

    sections = []
    for record in read_sweeps(store, pipeline):
        rows = table_rows(record)
        best = record.get("best")
        sections.append({
            "study": record["study"],
            "stage": record["stage"],
            "objective": f"{record['objective']['direction']} {record['objective']['metric']}",
            "best": f"trial {best['trial']}: {format_value(best['value'])} with {best['params']}" if best else "no completed trial",
            "best_config": record.get("best_config") or "-",
            "note": record.get("importance_note") or "",
            "columns": list(rows[0]) if rows else [],
            "rows": [list(row.values()) for row in rows],
            "plots": [{"alt": alt, "src": png_data_uri(fig)} for alt, fig in figures(record)],
        })
    return sections
