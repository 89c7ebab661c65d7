"""The expert review gate: the flow pauses with a typed form until a reviewer answers (issue 21).

Prefect pauses only a flow (``pause_flow_run`` must run in the flow, not in a task), so the
review is split: the `annotate_*` task writes the sample, this gate runs at flow level just
before the `review_*` task, and the `review_*` task applies the decision log. run_stages
(flows/stage_task.py) calls ``review_gate`` before every stage named in GATES.

The gate does nothing when the review stage's version is already committed, or when every
sampled item already has a decision in the log (same content hash: the same items coming
again are not asked again; a Label Studio import counts). Otherwise it publishes the pending
items as the markdown artifact ``<stage>-batch`` and pauses; in the UI the flow run page shows
Resume, which opens the form (reviewer; per item: decision, reason, relabel as LABEL=VALUE).
An answer that does not parse (an unknown label) pauses again with the problem at the top of
the form. The answer is written to the decision log and summarised in ``<stage>-decisions``.

Timeout (``on_timeout``): keep_paused waits 30 days (Prefect needs a number); with
proceed_machine_labels the gate waits ``timeout_s``, puts the run back to Running, and logs a
batch with source "timeout", the policy and the unanswered items: the review stage then keeps
every item with its machine labels, and its decisions.json says so.
"""
from __future__ import annotations

from typing import Any, Literal

from prefect import get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Running
from pydantic import Field, create_model

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import StageSpec
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.tasks.review.decisions import Batch, Decision, check_decision, latest_decisions, read_batches, write_batch
from lmfoundry.tasks.review.labels import DOCS, LABELS, PAIRS, parse_relabel
from lmfoundry.tasks.review.stages import read_sample

GATES = {"review_docs": DOCS, "review_pairs": PAIRS}
KEEP_PAUSED_S = 30 * 24 * 3600
MAX_ATTEMPTS = 5  # answers that do not parse before the gate gives up (the flow fails, naming them)


def field(n: int, part: str = "") -> str:
    return f"item_{n:02d}{'_' + part if part else ''}"


def review_form(items: list[dict[str, Any]], kind: str, description: str) -> type[RunInput]:
    """A RunInput with the reviewer's name and, per item, decision / reason / relabel fields."""
    names = "|".join(LABELS[kind])
    pair = rf"\s*({names})\s*=\s*[^,=\s][^,=]*"
    fields: dict[str, Any] = {
        "reviewer": (str, Field(..., min_length=1, title="Reviewer", description="your name or e-mail, recorded with every decision")),
    }
    for it in items:
        n = it["n"]
        fields[field(n)] = (Literal["approve", "reject", "relabel"], Field("approve", title=f"{n:02d} decision", description=f"{it['item_id']}: {summary(it, 80)}"))
        fields[field(n, "reason")] = (str, Field("", title=f"{n:02d} reason"))
        fields[field(n, "relabel")] = (str, Field("", title=f"{n:02d} relabel", pattern=rf"^\s*({pair}(\s*,{pair})*)?\s*$", description=f"with relabel: LABEL=VALUE, labels: {', '.join(LABELS[kind])}"))
    model = create_model(f"Review{kind.title()}", __base__=RunInput, **fields)
    return model.with_initial_data(description=description)


def decisions_from(answer: RunInput, items: list[dict[str, Any]], kind: str) -> list[Decision]:
    """The form's answer as decisions; a ValueError names every item that does not parse."""
    out, problems = [], []
    for it in items:
        where = f"item {it['n']:02d} ({it['item_id']})"
        try:
            labels = parse_relabel(getattr(answer, field(it["n"], "relabel")), kind, where)
            d = Decision(item_id=it["item_id"], content_hash=it["content_hash"], decision=getattr(answer, field(it["n"])),
                         labels=labels, reason=getattr(answer, field(it["n"], "reason")).strip(), reviewer=answer.reviewer.strip())
            check_decision(d, kind, where)
            out.append(d)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return out


def summary(it: dict[str, Any], chars: int) -> str:
    p = it["preview"]
    text = p["text"] if "text" in p else f"{p['prompt']} => chosen: {p['chosen']} | rejected: {p['rejected']}"
    text = " ".join(text.split())
    return text[:chars] + ("…" if len(text) > chars else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def batch_markdown(stage: str, items: list[dict[str, Any]], population: int, problem: str = "") -> str:
    head = f"**Problem with the last answer:** {_cell(problem)}\n\n" if problem else ""
    lines = [
        f"{head}### {stage}: {len(items)} item(s) to review of {population}",
        "Highest risk first, then a random share (share = random) that estimates the error rate of everything not reviewed. "
        "Press **Resume** on this flow run: per item choose approve / reject / relabel, add a reason, and for relabel "
        "write the corrected labels as `LABEL=VALUE`.",
        "",
        "| # | share | risk | why | machine labels | item |",
        "|---|---|---|---|---|---|",
    ]
    for it in items:
        labels = ", ".join(f"{k}={v}" for k, v in it["labels"].items())
        lines.append(f"| {it['n']:02d} | {it['share']} | {it['risk']:.3f} | {_cell('; '.join(it['why']) or '-')} | {_cell(labels)} | "
                     f"`{_cell(it['item_id'])}` {_cell(summary(it, 300))} |")
    return "\n".join(lines)


def review_gate(store: Store, spec: StageSpec, config: PipelineConfig, inputs: list[StageRef], salt: str = "") -> str:
    """Pause for a reviewer when needed; returns what happened: committed, reused, answered, timeout."""
    logger = get_run_logger()
    kind = GATES[spec.name]
    version = spec.version(config, [ref.digest for ref in inputs], salt)
    if store.is_committed(spec.name, version):
        return "committed"
    sample = read_sample(store, inputs, kind)
    known = latest_decisions(read_batches(store, kind))
    pending = [it for it in sample["items"] if it["content_hash"] not in known]
    if not pending:
        logger.info("%s: all %d sampled items already have decisions in the log: not pausing", spec.name, len(sample["items"]))
        return "reused"
    cfg = spec.config(config)
    flow_run_id = str(get_run_context().flow_run.id)
    key = spec.name.replace("_", "-")
    timeout = cfg.timeout_s if cfg.on_timeout == "proceed_machine_labels" else KEEP_PAUSED_S
    problem = ""
    for attempt in range(MAX_ATTEMPTS):
        text = batch_markdown(spec.name, pending, sample["population"], problem)
        create_markdown_artifact(key=f"{key}-batch", markdown=text, description=f"{spec.name}: items to review")
        form = review_form(pending, kind, text)
        logger.info("%s: %d item(s) await review: open this flow run in the Prefect UI and press Resume", spec.name, len(pending))
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=cfg.poll_s, key=f"{key}-{version}-{attempt}")
        except FlowPauseTimeout:
            if cfg.on_timeout != "proceed_machine_labels":
                raise
            return _timed_out(store, spec, kind, version, flow_run_id, pending, cfg.timeout_s)
        try:
            decisions = decisions_from(answer, pending, kind)
            break
        except ValueError as exc:
            problem = str(exc)
            logger.warning("%s: the answer does not parse, pausing again: %s", spec.name, problem)
    else:
        raise ValueError(f"{spec.name}: {MAX_ATTEMPTS} answers did not parse; the last problem: {problem}")
    batch = Batch(kind=kind, source="prefect-ui", reviewer=answer.reviewer.strip(), stage=spec.name, version=version, flow_run_id=flow_run_id, decisions=decisions)
    path = write_batch(store, batch)
    counts = {name: sum(d.decision == name for d in decisions) for name in ("approve", "reject", "relabel")}
    create_markdown_artifact(
        key=f"{key}-decisions",
        markdown=f"**{spec.name}**: {batch.reviewer} decided {len(decisions)} item(s): {counts}.\n\nDecision log: `{path}`",
        description=f"{spec.name}: decisions",
    )
    return "answered"


def _timed_out(store, spec, kind, version, flow_run_id, pending, timeout_s) -> str:
    with get_client(sync_client=True) as client:  # the pause expired: back to Running so the flow may go on
        client.set_flow_run_state(flow_run_id, Running(), force=True)
    batch = Batch(kind=kind, source="timeout", reviewer="(nobody)", stage=spec.name, version=version, flow_run_id=flow_run_id,
                  policy="proceed_machine_labels", unanswered=[it["content_hash"] for it in pending])
    path = write_batch(store, batch)
    get_run_logger().warning("%s: nobody answered within %d s: going on with the machine labels only (recorded in %s)", spec.name, timeout_s, path)
    create_markdown_artifact(
        key=f"{spec.name.replace('_', '-')}-decisions",
        markdown=f"**{spec.name}**: no answer within {timeout_s} s; policy proceed_machine_labels: {len(pending)} item(s) kept with machine labels only.\n\nDecision log: `{path}`",
        description=f"{spec.name}: decisions (timeout)",
    )
    return "timeout"
