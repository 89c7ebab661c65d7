"""Label Studio interop: a review batch out as Label Studio tasks, its annotations back as decisions.

    lmf review export review_docs --out batch/        # batch/tasks.json + batch/labeling_config.xml
    (create a Label Studio project with labeling_config.xml, import tasks.json, annotate,
     Export -> JSON)
    lmf review import review_docs export.json          # a batch in the decision log
    lmf run --set review_docs.enabled=true             # the gate finds them: no pause

tasks.json is Label Studio's task import format: ``[{"id": n, "data": {...}}]`` where data holds
the item's id, content hash, share, risk, why, machine labels and its text (documents: ``text``;
pairs: ``prompt``, ``chosen``, ``rejected``). The labeling config asks for a `decision` (Choices:
approve / reject / relabel), a `reason` and a `relabel` (TextAreas, relabel as LABEL=VALUE).
Import reads Label Studio's JSON export (the tasks with ``annotations[].result[]``: ``from_name``,
``value.choices`` or ``value.text``), takes each task's latest annotation that was not cancelled,
and names task and field of anything it cannot read.
"""
from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

from lmfoundry.tasks.review.decisions import Decision, check_decision
from lmfoundry.tasks.review.labels import DOCS, LABELS, parse_relabel


def export_tasks(sample: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = []
    for it in sample["items"]:
        data = {
            "item_id": it["item_id"], "content_hash": it["content_hash"], "share": it["share"], "risk": it["risk"],
            "why": "; ".join(it["why"]), "machine_labels": ", ".join(f"{k}={v}" for k, v in it["labels"].items()),
            **it["preview"],
        }
        tasks.append({"id": it["n"], "data": data})
    return tasks


def labeling_config(kind: str) -> str:
    """The Label Studio labeling config (XML) for a batch of this kind."""
    if kind == DOCS:
        shown = '  <Text name="text" value="$text"/>\n'
        target = "text"
    else:
        shown = '  <Header value="Prompt"/>\n  <Text name="prompt" value="$prompt"/>\n' \
                '  <Header value="Chosen"/>\n  <Text name="chosen" value="$chosen"/>\n' \
                '  <Header value="Rejected"/>\n  <Text name="rejected" value="$rejected"/>\n'
        target = "prompt"
    hint = quoteattr(f"with relabel: LABEL=VALUE, labels: {', '.join(LABELS[kind])}")
    return (
        "<View>\n"
        '  <Header value="$item_id (risk $risk: $why; machine labels: $machine_labels)"/>\n'
        f"{shown}"
        f'  <Choices name="decision" toName="{target}" choice="single" required="true">\n'
        '    <Choice value="approve"/>\n    <Choice value="reject"/>\n    <Choice value="relabel"/>\n'
        "  </Choices>\n"
        f'  <TextArea name="reason" toName="{target}" maxSubmissions="1" placeholder="reason"/>\n'
        f'  <TextArea name="relabel" toName="{target}" maxSubmissions="1" placeholder={hint}/>\n'
        "</View>\n"
    )


def _reviewer(annotation: dict[str, Any], default: str) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return default if who in (None, "") else str(who)


def import_annotations(export: Any, kind: str, origin: str, reviewer: str = "") -> list[Decision]:
    """Decisions from a Label Studio JSON export; tasks without an annotation are skipped."""
    if not isinstance(export, list):
        raise ValueError(f"{origin}: a Label Studio JSON export is a list of tasks, got {type(export).__name__}")
    out = []
    for i, task in enumerate(export):
        where = f"{origin} task {i} (id {task.get('id') if isinstance(task, dict) else '?'})"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not data.get("content_hash") or not data.get("item_id"):
            raise ValueError(f"{where}: data.item_id / data.content_hash missing: export the tasks written by `lmf review export`")
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue
        annotation = done[-1]
        fields = {}
        for r in annotation.get("result") or []:
            value = r.get("value") or {}
            fields[r.get("from_name")] = (value.get("choices") or value.get("text") or [""])[0]
        if fields.get("decision") not in ("approve", "reject", "relabel"):
            raise ValueError(f"{where}: field 'decision' is {fields.get('decision')!r}; choose approve, reject or relabel")
        d = Decision(item_id=str(data["item_id"]), content_hash=str(data["content_hash"]), decision=fields["decision"],
                     labels=parse_relabel(fields.get("relabel", ""), kind, f"{where} field 'relabel'"),
                     reason=str(fields.get("reason", "")).strip(), reviewer=_reviewer(annotation, reviewer or "label-studio"))
        check_decision(d, kind, where)
        out.append(d)
    return out
