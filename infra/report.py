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
  ``step`` and any of ``loss``, ``train_loss``, ``val_loss``, ``eval_loss``, ``lr``;
- every stage's stats as a table.

Plots are PNGs embedded as base64, so the file opens anywhere without a server.
"""
from __future__ import annotations

import base64
import html
import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmfoundry.infra.store import StageRef, Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_KEYS = ("loss", "train_loss", "val_loss", "eval_loss")
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


def png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


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


def training_curve_figure(rows: list[dict[str, float]], title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    for key in CURVE_KEYS:
        points = [(r["step"], r[key]) for r in rows if _number(r.get(key)) is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def size_label(info: StageInfo) -> str:
    docs, tokens = doc_count(info), token_count(info)
    if docs is not None:
        return f"{docs:,.0f} docs"
    if tokens is not None:
        return f"{tokens:,.0f} tokens"
    return f"{len(info.manifest.get('files', {}))} files, {info.manifest.get('bytes', 0):,} bytes"


def lineage_svg(infos: list[StageInfo]) -> str:
    """Stages as boxes, one row per depth (inputs above), arrows from each input."""
    by_name = {info.name: info for info in infos}
    depth: dict[str, int] = {}

    def depth_of(name: str, seen: frozenset = frozenset()) -> int:
        if name not in depth:
            parents = [s for s in by_name[name].input_stages if s in by_name and s not in seen]
            depth[name] = 1 + max((depth_of(s, seen | {name}) for s in parents), default=-1)
        return depth[name]

    for info in infos:
        depth_of(info.name)
    rows: dict[int, list[str]] = {}  # depth -> stages; drawn top to bottom, siblings side by side
    for info in infos:
        rows.setdefault(depth[info.name], []).append(info.name)
    box_w, box_h, gap_x, gap_y = 190, 58, 30, 30
    pos = {name: (20 + col * (box_w + gap_x), 20 + d * (box_h + gap_y)) for d, names in rows.items() for col, name in enumerate(names)}
    width = 100 + max((len(v) for v in rows.values()), default=1) * (box_w + gap_x)
    height = 40 + (max(rows, default=0) + 1) * (box_h + gap_y)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    for info in infos:
        x, y = pos[info.name]
        for source in info.input_stages:
            if source in pos:
                sx, sy = pos[source]
                if depth[info.name] - depth[source] == 1 or sx != x:
                    parts.append(f'<line x1="{sx + box_w / 2}" y1="{sy + box_h}" x2="{x + box_w / 2}" y2="{y}" stroke="#555" marker-end="url(#arrow)"/>')
                else:  # skips rows in the same column: bend around the boxes in between
                    x1, y1, y2 = sx + box_w, sy + box_h / 2, y + box_h / 2
                    parts.append(f'<path d="M{x1},{y1} C{x1 + 60},{y1} {x1 + 60},{y2} {x1},{y2}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')
    for name, (x, y) in pos.items():
        info = by_name[name]
        parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="#eef3fb" stroke="#3b7dd8"/>')
        parts.append(f'<text x="{x + 8}" y="{y + 18}" font-weight="bold">{html.escape(name)}</text>')
        parts.append(f'<text x="{x + 8}" y="{y + 34}" fill="#444">{html.escape(info.version)}</text>')
        parts.append(f'<text x="{x + 8}" y="{y + 50}" fill="#444">{html.escape(size_label(info))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ------------------------------------------------------------------ html


def _short(value: Any, limit: int = 300) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


def stats_table(info: StageInfo) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_short(v))}</td></tr>" for k, v in flat_stats(info.stats).items())
    meta = f"version <code>{html.escape(info.version)}</code>, created {html.escape(str(info.manifest.get('created_at', '?')))}, run <code>{html.escape(str(info.manifest.get('run_id') or '-'))}</code>"
    return f"<h3>{html.escape(info.name)}</h3><p>{meta}</p><table>{rows or '<tr><td>(no stats)</td></tr>'}</table>"


def render_html(store: Store, pipeline: str, infos: list[StageInfo], title: str) -> str:
    sections = [f"<h2>Lineage</h2>{lineage_svg(infos)}" if infos else "<p>No committed stages yet: run <code>lmf run</code> first.</p>"]
    docs = [(i.name, doc_count(i)) for i in infos if doc_count(i) is not None]
    if docs:
        fig = bar_figure([n for n, _ in docs], [v for _, v in docs], "documents after each stage", "documents")
        sections.append(f'<h2>Documents per stage</h2><img alt="documents funnel" src="{png_data_uri(fig)}">')
    tokens = [(i.name, token_count(i)) for i in infos if token_count(i) is not None]
    if tokens:
        fig = bar_figure([n for n, _ in tokens], [v for _, v in tokens], "tokens after each stage", "tokens")
        sections.append(f'<h2>Tokens per stage</h2><img alt="tokens funnel" src="{png_data_uri(fig)}">')
    for info in infos:
        sizes = cluster_sizes(info)
        if sizes:
            fig = histogram_figure(sizes, f"{info.name}: duplicate cluster sizes", "documents in cluster")
            sections.append(f'<h2>Duplicate clusters ({html.escape(info.name)})</h2><img alt="cluster sizes" src="{png_data_uri(fig)}">')
        pii = pii_by_type(info)
        if pii:
            fig = bar_figure(list(pii), list(pii.values()), f"{info.name}: PII found per type", "occurrences")
            sections.append(f'<h2>PII per type ({html.escape(info.name)})</h2><img alt="pii counts" src="{png_data_uri(fig)}">')
        curve = training_metrics(store, StageRef(stage=info.name, version=info.version, store_url=store.url, digest=info.manifest.get("digest", "")))
        if curve:
            fig = training_curve_figure(curve, f"{info.name} {info.version}")
            sections.append(f'<h2>Training curve ({html.escape(info.name)})</h2><img alt="training curve" src="{png_data_uri(fig)}">')
    sections.append("<h2>Stage stats</h2>" + "".join(stats_table(i) for i in infos))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1em}td{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
        "code{background:#f3f3f3;padding:0 3px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>store <code>{html.escape(store.url)}</code>, pipeline <code>{html.escape(pipeline)}</code></p>"
        + "\n".join(sections)
        + "</body></html>"
    )


def build_report(store: Store, pipeline: str, stage_order: list[str], snapshot: str | None = None) -> str:
    versions = pipeline_versions(store, pipeline, stage_order, snapshot)
    title = f"lmfoundry report: {pipeline}" + (f" snapshot {snapshot}" if snapshot else " (current refs)")
    return render_html(store, pipeline, collect(store, versions), title)
