"""`lmf report`: one self-contained HTML file describing a version of the pipeline.

    lmf report [--config F] [--set k=v] [--snapshot LABEL] [--out report.html]

It reads only manifests (and a training metrics file where one exists), so it is cheap and
works on a local or s3:// store. Sections appear when their data exists, so it works on a
half-built pipeline:

- lineage: every stage version and the inputs it was built from (inline SVG);
- documents and tokens at each stage (a funnel): ``stats.docs_out`` (else the manifest's row
  count) and ``stats.tokens`` (a number, or a mapping such as {train, val} that is summed),
  else the first of ``tokens_out / total_tokens / train_tokens`` that holds a number;
- a dedup cluster-size histogram: any stats entry named ``*cluster_size*`` holding a mapping
  {cluster size: count};
- PII found per type: in stages named ``pii*``, a stats mapping named ``entities`` or
  ``by_type`` (else any ``*type*`` mapping of counts);
- training curves: a ``metrics.jsonl`` among a stage's files, one JSON object per line with
  ``step`` and any of ``loss``, ``train_loss``, ``val_loss``, ``eval_loss`` (one panel), and a
  small panel per metric ending in ``accuracy``, ``margin`` or ``ppl`` (``val_accuracy``,
  ``reward_margin``...) and for PPO's ``reward`` / ``val_reward`` and ``kl``; a
  ``unigram_<metric>`` is drawn as a dashed reference line;
- every stage's stats as a table;
- each hyperparameter sweep of the pipeline (``<store>/sweeps/*/results.json``, infra/sweep_report.py):
  its trials as a table, the objective per trial and the parameter importances.

The page is rendered from Jinja2 templates in infra/templates/ (report.html.j2, which includes
lineage.svg.j2), autoescaped; this module only reads and plots. Plots are PNGs embedded as
base64, so the file opens anywhere without a server. The same figure functions draw the
Prefect artifacts (flows/stage_task.py) and a training stage's own plots (``png_bytes``).
"""
from __future__ import annotations

import base64
import functools
import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jinja2

from lmfoundry.infra.store import StageRef, Store
from lmfoundry.infra.sweep_report import report_sections

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_KEYS = ("loss", "train_loss", "val_loss", "eval_loss")
PANEL_SUFFIXES = ("accuracy", "margin", "ppl")  # SFT / reward model / DPO metrics: a small panel each
PANEL_METRICS = ("reward", "kl")  # PPO's: a panel for exactly these (and their val_ forms), not for every *_reward
SPLIT_PREFIXES = ("train_", "val_", "eval_")  # train and val of one metric share a panel
BASELINE_PREFIX = "unigram_"  # a reference level, drawn as a dashed line
TOKEN_KEYS = ("tokens_out", "total_tokens", "train_tokens")
METRICS_FILE = "metrics.jsonl"


@dataclass
class StageInfo:
    name: str
    version: str
    manifest: dict[str, Any]

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.get("stats") or {}

    @property
    def input_stages(self) -> list[str]:
        return [i["stage"] for i in self.manifest.get("inputs", []) if isinstance(i, dict) and "stage" in i]


# ------------------------------------------------------------------ reading


def flat_stats(stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, dict) and value:
            out.update(flat_stats(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def doc_count(info: StageInfo) -> float | None:
    docs = _number(info.stats.get("docs_out"))
    if docs is not None:
        return docs
    has_docs = any(p.startswith("data/") and p.endswith(".parquet") for p in info.manifest.get("files", {}))
    return float(info.manifest.get("rows", 0)) if has_docs else None


def token_count(info: StageInfo) -> float | None:
    tokens = info.stats.get("tokens")
    if _number(tokens) is not None:
        return _number(tokens)
    if count_mapping(tokens):
        return sum(count_mapping(tokens).values())
    for key in TOKEN_KEYS:
        if _number(info.stats.get(key)) is not None:
            return _number(info.stats[key])
    return None


def count_mapping(value: Any) -> dict[str, float] | None:
    """{label: count} when every value is a number."""
    if isinstance(value, dict) and value and all(_number(v) is not None for v in value.values()):
        return {str(k): float(v) for k, v in value.items()}
    return None


def find_mapping(stats: dict[str, Any], want) -> dict[str, float] | None:
    """The first nested mapping of counts whose key satisfies `want(key)`."""
    for key, value in stats.items():
        if want(key) and count_mapping(value):
            return count_mapping(value)
        if isinstance(value, dict):
            found = find_mapping(value, want)
            if found:
                return found
    return None


def cluster_sizes(info: StageInfo) -> dict[str, float] | None:
    return find_mapping(info.stats, lambda key: "cluster_size" in key)


def pii_by_type(info: StageInfo) -> dict[str, float] | None:
    if "pii" not in info.name:
        return None
    return find_mapping(info.stats, lambda key: key in ("entities", "by_type")) or find_mapping(info.stats, lambda key: "type" in key)


def training_metrics(store: Store, ref: StageRef) -> list[dict[str, float]]:
    """Rows of a committed stage's metrics.jsonl ({step, loss, ...}); empty when it has none."""
    manifest = store.manifest(ref.stage, ref.version) or {}
    files = [p for p in manifest.get("files", {}) if posixpath.basename(p) == METRICS_FILE]
    if not files:
        return []
    rows = []
    for line in store.reader(ref).read_bytes(sorted(files)[0]).decode().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run must not hide the rest
        if isinstance(row, dict) and _number(row.get("step")) is not None:
            rows.append(row)
    return rows


def pipeline_versions(store: Store, pipeline: str, stage_order: list[str], snapshot: str | None = None) -> dict[str, str]:
    """stage -> version: from a snapshot, else the pipeline's current refs (known stages first)."""
    if snapshot is not None:
        from lmfoundry.infra.snapshots import list_snapshots, read_snapshot

        body = read_snapshot(store, pipeline, snapshot)
        if body is None:
            known = ", ".join(list_snapshots(store, pipeline)) or "none yet"
            raise ValueError(f"snapshot '{snapshot}' does not exist for pipeline '{pipeline}' in {store.url} (snapshots: {known})")
        return dict(body["stages"])
    try:
        present = sorted(posixpath.basename(p.rstrip("/")) for p in store.fs.ls(store.path("refs", pipeline), detail=False))
    except FileNotFoundError:
        present = []
    names = [n for n in stage_order if n in present] + [n for n in present if n not in stage_order]
    versions = {}
    for name in names:
        version = store.get_ref(pipeline, name)
        if version:
            versions[name] = version
    return versions


def collect(store: Store, versions: dict[str, str]) -> list[StageInfo]:
    infos = []
    for name, version in versions.items():
        manifest = store.manifest(name, version)
        if manifest is not None:
            infos.append(StageInfo(name, version, manifest))
    return infos


# ------------------------------------------------------------------ plots


def png_bytes(fig: Figure, dpi: int = 96) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def png_data_uri(fig: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode()


def bar_figure(labels: list[str], values: list[float], title: str, xlabel: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.45 * len(labels) + 1.2))
    ax = fig.subplots()
    ax.barh(labels[::-1], values[::-1], color="#3b7dd8")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    return fig


def _leading_number(label: str) -> tuple[float, str]:
    """'3-4' -> (3, '3-4'): size buckets sort by their lower bound."""
    match = re.match(r"\d+(\.\d+)?", label)
    return (float(match.group()) if match else float("inf"), label)


def histogram_figure(counts: dict[str, float], title: str, xlabel: str) -> Figure:
    from matplotlib.figure import Figure

    items = sorted(counts.items(), key=lambda kv: _leading_number(kv[0]))
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.bar([k for k, _ in items], [v for _, v in items], color="#d8703b")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return fig


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if _number(r.get(key)) is not None]


def metric_family(key: str) -> str:
    """'val_accuracy' -> 'accuracy', 'unigram_loss' -> 'loss': the panel a metric is drawn on."""
    for prefix in SPLIT_PREFIXES + (BASELINE_PREFIX,):
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix):]
    return key


def curve_panels(rows: list[dict[str, Any]], keys: Sequence[str] = CURVE_KEYS) -> dict[str, list[str]]:
    """Panel -> the metrics drawn on it as curves: "loss" (those of `keys` that were logged)
    first, then one panel per family of logged keys ending in PANEL_SUFFIXES (train and val
    of a metric share one), in the order they first appear."""
    logged = list(dict.fromkeys(k for r in rows for k, v in r.items() if _number(v) is not None))
    panels: dict[str, list[str]] = {"loss": [k for k in keys if k in logged]}
    for key in logged:
        if (key.endswith(PANEL_SUFFIXES) or metric_family(key) in PANEL_METRICS) and not key.startswith(BASELINE_PREFIX) and key not in keys:
            panels.setdefault(metric_family(key), []).append(key)
    return {panel: curves for panel, curves in panels.items() if curves}


def training_curve_figure(
    rows: list[dict[str, Any]],
    title: str,
    keys: Sequence[str] = CURVE_KEYS,
    labels: Mapping[str, str] | None = None,
    ylabel: str = "loss",
) -> Figure:
    """Loss curves (`keys`, legend names from `labels`) and a small panel per accuracy/margin/ppl
    family, against ``step``. A logged ``unigram_<family>`` is a dashed reference line (its last
    value) on that family's panel. Save with ``png_bytes(fig)`` or ``png_data_uri(fig)``."""
    from matplotlib.figure import Figure

    panels = curve_panels(rows, keys)
    baselines = {metric_family(k): k for r in rows for k in r if k.startswith(BASELINE_PREFIX) and _number(r[k]) is not None}
    widths = [2.0 if panel == "loss" else 1.0 for panel in panels] or [1.0]
    fig = Figure(figsize=(7 + 3.2 * (len(widths) - 1), 3.2), layout="constrained")  # panels' labels never overlap
    axes = fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0]
    fig.suptitle(title)
    if not panels:
        axes[0].text(0.5, 0.5, "no loss, accuracy or margin logged", ha="center", va="center")
    for ax, (panel, curves) in zip(axes, panels.items()):
        for key in curves:
            points = _points(rows, key)
            ax.plot([p[0] for p in points], [p[1] for p in points], label=(labels or {}).get(key, key), marker="." if len(points) < 50 else None)
        if panel in baselines:
            key = baselines[panel]
            ax.axhline(_points(rows, key)[-1][1], linestyle="--", color="gray", label=(labels or {}).get(key, key))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel if panel == "loss" else panel)
        ax.legend(fontsize=8)
    return fig


def metrics_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step (the train and val records of a step merged, ``kind`` dropped), every
    column in every row (None where the step did not log it), floats to 5 significant digits:
    rows for a Prefect table artifact."""
    by_step: dict[Any, dict[str, Any]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "kind"})
    columns = list(dict.fromkeys(k for row in by_step.values() for k in row))
    rounded = lambda v: float(f"{v:.5g}") if isinstance(v, float) else v  # noqa: E731
    return [{c: rounded(row.get(c)) for c in columns} for row in by_step.values()]


def size_label(info: StageInfo) -> str:
    docs, tokens = doc_count(info), token_count(info)
    if docs is not None:
        return f"{docs:,.0f} docs"
    if tokens is not None:
        return f"{tokens:,.0f} tokens"
    return f"{len(info.manifest.get('files', {}))} files, {info.manifest.get('bytes', 0):,} bytes"


def lineage_layout(infos: list[StageInfo]) -> dict[str, Any]:
    """Where templates/lineage.svg.j2 draws each stage box and each input arrow: one row per
    depth (inputs above), siblings side by side."""
    by_name = {info.name: info for info in infos}
    depth: dict[str, int] = {}

    def depth_of(name: str, seen: frozenset = frozenset()) -> int:
        if name not in depth:
            parents = [s for s in by_name[name].input_stages if s in by_name and s not in seen]
            depth[name] = 1 + max((depth_of(s, seen | {name}) for s in parents), default=-1)
        return depth[name]

    for info in infos:
        depth_of(info.name)
    rows: dict[int, list[str]] = {}
    for info in infos:
        rows.setdefault(depth[info.name], []).append(info.name)
    box_w, box_h, gap_x, gap_y = 190, 58, 30, 30
    pos = {name: (20 + col * (box_w + gap_x), 20 + d * (box_h + gap_y)) for d, names in rows.items() for col, name in enumerate(names)}
    edges = []
    for info in infos:
        x, y = pos[info.name]
        for source in info.input_stages:
            if source in pos:
                sx, sy = pos[source]
                if depth[info.name] - depth[source] == 1 or sx != x:
                    edges.append({"x1": sx + box_w / 2, "y1": sy + box_h, "x2": x + box_w / 2, "y2": y, "bend": None})
                else:  # skips rows in the same column: bend around the boxes in between
                    x1 = sx + box_w
                    edges.append({"x1": x1, "y1": sy + box_h / 2, "x2": x1, "y2": y + box_h / 2, "bend": x1 + 60})
    boxes = [{"x": x, "y": y, "name": name, "version": by_name[name].version, "size": size_label(by_name[name])} for name, (x, y) in pos.items()]
    return {
        "width": 100 + max((len(v) for v in rows.values()), default=1) * (box_w + gap_x),
        "height": 40 + (max(rows, default=0) + 1) * (box_h + gap_y),
        "box_w": box_w,
        "box_h": box_h,
        "boxes": boxes,
        "edges": edges,
    }


# ------------------------------------------------------------------ html


@functools.cache
def templates() -> jinja2.Environment:
    """The templates in infra/templates, found through the installed package (wheel or checkout)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lmfoundry.infra", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails loudly instead of rendering empty
    )


def _short(value: Any, limit: int = 300) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


def stats_table(info: StageInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "created": str(info.manifest.get("created_at", "?")),
        "run_id": str(info.manifest.get("run_id") or "-"),
        "rows": [(key, _short(value)) for key, value in flat_stats(info.stats).items()],
    }


def plots(store: Store, infos: list[StageInfo]) -> list[dict[str, str]]:
    """The report's figures as {heading, alt, src}: funnels first, then each stage's own."""
    out = []

    def add(heading: str, alt: str, fig: Figure) -> None:
        out.append({"heading": heading, "alt": alt, "src": png_data_uri(fig)})

    docs = [(i.name, doc_count(i)) for i in infos if doc_count(i) is not None]
    if docs:
        add("Documents per stage", "documents funnel", bar_figure([n for n, _ in docs], [v for _, v in docs], "documents after each stage", "documents"))
    tokens = [(i.name, token_count(i)) for i in infos if token_count(i) is not None]
    if tokens:
        add("Tokens per stage", "tokens funnel", bar_figure([n for n, _ in tokens], [v for _, v in tokens], "tokens after each stage", "tokens"))
    for info in infos:
        sizes = cluster_sizes(info)
        if sizes:
            add(f"Duplicate clusters ({info.name})", "cluster sizes", histogram_figure(sizes, f"{info.name}: duplicate cluster sizes", "documents in cluster"))
        pii = pii_by_type(info)
        if pii:
            add(f"PII per type ({info.name})", "pii counts", bar_figure(list(pii), list(pii.values()), f"{info.name}: PII found per type", "occurrences"))
        curve = training_metrics(store, StageRef(stage=info.name, version=info.version, store_url=store.url, digest=info.manifest.get("digest", "")))
        if curve:
            add(f"Training curve ({info.name})", "training curve", training_curve_figure(curve, f"{info.name} {info.version}"))
    return out


def render_html(store: Store, pipeline: str, infos: list[StageInfo], title: str) -> str:
    return templates().get_template("report.html.j2").render(
        title=title,
        store_url=store.url,
        pipeline=pipeline,
        layout=lineage_layout(infos) if infos else None,
        plots=plots(store, infos),
        tables=[stats_table(i) for i in infos],
        sweeps=report_sections(store, pipeline),  # hyperparameter sweeps of this pipeline (flows/sweep.py)
    )


def build_report(store: Store, pipeline: str, stage_order: list[str], snapshot: str | None = None, versions: dict[str, str] | None = None) -> str:
    """The report of a snapshot, of the given stage versions (those a config produces), else of the current refs."""
    title = f"lmfoundry report: {pipeline}" + (f" snapshot {snapshot}" if snapshot else " (this config's versions)" if versions is not None else " (current refs)")
    versions = pipeline_versions(store, pipeline, stage_order, snapshot) if snapshot is not None or versions is None else versions
    return render_html(store, pipeline, collect(store, versions), title)
