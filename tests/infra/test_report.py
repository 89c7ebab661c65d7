"""infra/report.py: templates that ship with the package, training-curve panels, the metrics table.

    .venv/bin/pytest -q tests/infra/test_report.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmfoundry.infra.report import build_report, curve_panels, metrics_table, training_curve_figure
from lmfoundry.infra.store import Store

REPO = Path(__file__).resolve().parents[2]
# loss and accuracy for train (every step) and val (every other step); one baseline level
ROWS = [{"kind": "train", "step": s, "loss": 3.0 - 0.25 * s, "accuracy": 0.4 + 0.1 * s, "lr": 0.01} for s in (1, 2, 3, 4)] + [
    {"kind": "val", "step": s, "val_loss": 3.1 - 0.25 * s, "val_accuracy": 0.35 + 0.1 * s, "unigram_loss": 2.9} for s in (2, 4)
]


def commit_metrics_stage(store: Store, name: str, rows: list[dict], stats: dict) -> None:
    out = store.open_for_write(name, "v1")
    out.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    store.set_ref("test", name, store.commit(out, {"stats": stats, "inputs": []}).version)


def images(html: str) -> list[str]:
    return re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)


def test_panels_group_train_and_val_of_a_metric():
    rows = ROWS + [{"kind": "val", "step": 4, "reward_margin": 0.5, "val_margin": 0.2, "val_ppl": 9.0, "ok": True}]
    assert curve_panels(rows) == {
        "loss": ["loss", "val_loss"],
        "accuracy": ["accuracy", "val_accuracy"],
        "reward_margin": ["reward_margin"],
        "margin": ["val_margin"],
        "ppl": ["val_ppl"],
    }
    assert curve_panels(rows, keys=("val_loss",))["loss"] == ["val_loss"]
    assert curve_panels([{"step": 1, "lr": 0.1}]) == {}


def test_figure_plots_the_logged_values_and_the_baseline():
    fig = training_curve_figure(ROWS, "sft v1", labels={"loss": "train CE"})
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_ax.lines}
    assert lines["train CE"] == ([1, 2, 3, 4], [2.75, 2.5, 2.25, 2.0])
    assert lines["val_loss"] == ([2, 4], [2.6, 2.1])
    assert lines["unigram_loss"][1] == [2.9, 2.9]  # a horizontal reference line
    acc = {line.get_label(): list(line.get_ydata()) for line in acc_ax.lines}
    assert acc == {"accuracy": pytest.approx([0.5, 0.6, 0.7, 0.8]), "val_accuracy": pytest.approx([0.55, 0.75])}
    assert acc_ax.get_ylabel() == "accuracy" and fig.get_suptitle() == "sft v1"


def test_metrics_table_merges_a_step_and_fills_every_column():
    table = metrics_table(ROWS + [{"kind": "train", "step": 5, "loss": 1.0 / 3}])
    assert [r["step"] for r in table] == [1, 2, 3, 4, 5]
    assert table[1] == {"step": 2, "loss": 2.5, "accuracy": 0.6, "lr": 0.01, "val_loss": 2.6, "val_accuracy": 0.55, "unigram_loss": 2.9}
    assert table[0]["val_loss"] is None and table[4]["accuracy"] is None
    assert table[4]["loss"] == 0.33333  # 5 significant digits


def test_report_escapes_what_it_shows(tmp_path):
    store = Store(str(tmp_path / "store"))
    commit_metrics_stage(store, "sft", ROWS, {"note": "<script>alert('x')</script> & more"})
    html = build_report(store, "test", ["sft"])
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in html
    assert images(html) == ["training curve"]


INSTALLED_CHECK = """
import json, sys, tempfile
from lmfoundry.infra import report
from lmfoundry.infra.store import Store
assert report.__file__.startswith(sys.argv[1]), report.__file__  # the unpacked wheel, not the checkout
sys.path.insert(0, sys.argv[2])
from test_report import ROWS, commit_metrics_stage
root = tempfile.mkdtemp()
empty = report.build_report(Store(root + "/empty"), "demo", [])
store = Store(root + "/one")
commit_metrics_stage(store, "reward_model", ROWS, {"steps": 4})
print(json.dumps({"empty": empty, "one": report.build_report(store, "test", ["reward_model"])}))
"""


def test_templates_ship_in_the_wheel_and_render_from_it(tmp_path):
    """Build the wheel from a copy of the sources, unpack it, and render a report from there."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("lmfoundry", "infra", "model", "tasks", "flows", "bench"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("lmfoundry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"lmfoundry/infra/templates/report.html.j2", "lmfoundry/infra/templates/lineage.svg.j2"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel unpacked is an install
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout's finder
    run = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(site), str(Path(__file__).parent)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    pages = json.loads(run.stdout.strip().splitlines()[-1])
    assert "No committed stages yet" in pages["empty"] and images(pages["empty"]) == []
    assert images(pages["one"]) == ["training curve"] and ">reward_model</text>" in pages["one"]
