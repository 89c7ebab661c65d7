"""`lmf review export / import / show`: a batch out to Label Studio's task format and its
annotations back into the decision log, where review_docs applies them."""
from __future__ import annotations

import json

import yaml

from lmfoundry.cli import main
from lmfoundry.flows.pipeline import stage
from lmfoundry.infra.config import load_config
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from lmfoundry.tasks.review.decisions import read_batches
from tests.helpers import commit_docs


def test_export_then_import_label_studio_annotations(tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"store": {"url": str(tmp_path / "store"), "pipeline": "ls"}, "review_docs": {"enabled": True, "top_k": 2, "random_k": 0}}))
    cfg = load_config(preset)
    store = Store.from_config(cfg.store)
    assert main(["review", "export", "review_docs", "--config", str(preset), "--out", str(tmp_path / "batch")]) == 2
    assert "no committed annotate_docs in pipeline 'ls'" in capsys.readouterr().err
    docs = commit_docs(store, [[{"id": "a", "text": "Alpha text here.", "meta": {"quality_score": 0.2}}, {"id": "b", "text": "Beta text.", "meta": {"quality_score": 0.9}}]])
    annotated = run_stage(store, stage("annotate_docs"), cfg, [docs]).ref
    assert main(["review", "export", "review_docs", "--config", str(preset), "--out", str(tmp_path / "batch")]) == 0
    tasks = json.loads((tmp_path / "batch" / "tasks.json").read_text())
    assert [t["data"]["item_id"] for t in tasks] == ["a", "b"] and (tmp_path / "batch" / "labeling_config.xml").read_text().startswith("<View>")

    # Label Studio's JSON export of those tasks, one rejected, one relabelled
    def choice(value):
        return {"from_name": "decision", "to_name": "text", "type": "choices", "value": {"choices": [value]}}

    tasks[0]["annotations"] = [{"completed_by": {"email": "lee@example.org"}, "result": [choice("reject")]}]
    tasks[1]["annotations"] = [{"completed_by": {"email": "lee@example.org"}, "result": [
        choice("relabel"), {"from_name": "relabel", "to_name": "text", "type": "textarea", "value": {"text": ["language=fr"]}}]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    assert main(["review", "import", "review_docs", str(export), "--config", str(preset)]) == 0
    (batch,) = read_batches(store, "docs")
    assert batch.source == "label-studio" and batch.reviewer == "lee@example.org"
    assert [(d.item_id, d.decision, d.labels) for d in batch.decisions] == [("a", "reject", {}), ("b", "relabel", {"language": "fr"})]
    assert main(["review", "show", "review_docs", "--config", str(preset)]) == 0
    assert "label-studio" in capsys.readouterr().out
    reviewed = run_stage(store, stage("review_docs"), cfg, [docs, annotated]).ref
    (kept,) = iter_docs(store, [reviewed])
    assert kept["id"] == "b" and json.loads(kept["meta"])["labels"]["language"] == "fr"

    export.write_text(json.dumps([{"id": 1, "data": {"text": "x"}}]))
    assert main(["review", "import", "review_docs", str(export), "--config", str(preset)]) == 2
    assert "task 0 (id 1): data.item_id / data.content_hash missing" in capsys.readouterr().err
