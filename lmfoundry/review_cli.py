"""`lmf review export` / `lmf review import`: review a batch in Label Studio instead of the Prefect UI.

    lmf review export review_docs --out batch/      # tasks.json + labeling_config.xml of the current sample
    lmf review import review_docs export.json       # Label Studio's JSON export -> the decision log
    lmf review show review_docs                     # the decision log: batches, who, when, how many

The export reads the sample of the pipeline's current `annotate_docs` / `annotate_pairs` version
(run `lmf run --until annotate_docs --set review_docs.enabled=true` first). Imported decisions
are found by the next run's gate (no pause for those items); a review version that is already
committed is final for its inputs: `lmf run --force review_docs` applies the new decisions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

KINDS = {"review_docs": ("docs", "annotate_docs"), "review_pairs": ("pairs", "annotate_pairs")}


def add_commands(sub, add_config_args: Callable) -> None:
    p = sub.add_parser("review", help="export a review batch to Label Studio, import its annotations, show the decision log")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb, help_ in (("export", "write tasks.json + labeling_config.xml for Label Studio"),
                        ("import", "read a Label Studio JSON export into the decision log"),
                        ("show", "list the decision log's batches")):
        v = verbs.add_parser(verb, help=help_)
        add_config_args(v)
        v.add_argument("stage", choices=sorted(KINDS))
        if verb == "export":
            v.add_argument("--out", default="review-batch", help="folder for tasks.json and labeling_config.xml")
            v.add_argument("--version", help="annotate stage version (default: the pipeline's current ref)")
        if verb == "import":
            v.add_argument("file", help="Label Studio's JSON export")
            v.add_argument("--reviewer", default="", help="name recorded when an annotation does not say who completed it")
        v.set_defaults(fn=globals()[f"cmd_{verb}"])


def _store(args):
    from lmfoundry.infra.config import load_config
    from lmfoundry.infra.store import Store

    cfg = load_config(args.config, args.set)
    return cfg, Store.from_config(cfg.store)


def cmd_export(args) -> int:
    from lmfoundry.tasks.review.label_studio import export_tasks, labeling_config
    from lmfoundry.tasks.review.stages import SAMPLE_FILE

    cfg, store = _store(args)
    kind, annotate = KINDS[args.stage]
    version = args.version or store.get_ref(cfg.store.pipeline, annotate)
    if version is None or not store.is_committed(annotate, version):
        print(f"lmf review: no committed {annotate} in pipeline '{cfg.store.pipeline}'; run `lmf run --until {annotate} --set {args.stage}.enabled=true` first", file=sys.stderr)
        return 2
    sample = store.reader(store.ref(annotate, version)).read_json(SAMPLE_FILE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps(export_tasks(sample), indent=1, ensure_ascii=False))
    (out / "labeling_config.xml").write_text(labeling_config(kind))
    print(f"wrote {len(sample['items'])} tasks of {annotate}/{version} to {out / 'tasks.json'} and the labeling config to {out / 'labeling_config.xml'}")
    return 0


def cmd_import(args) -> int:
    from lmfoundry.tasks.review.decisions import Batch, write_batch
    from lmfoundry.tasks.review.label_studio import import_annotations

    cfg, store = _store(args)
    kind, _ = KINDS[args.stage]
    try:
        export = json.loads(Path(args.file).read_text())
        decisions = import_annotations(export, kind, args.file, args.reviewer)
    except (OSError, ValueError) as exc:
        print(f"lmf review: {exc}", file=sys.stderr)
        return 2
    reviewers = sorted({d.reviewer for d in decisions})
    path = write_batch(store, Batch(kind=kind, source="label-studio", reviewer=", ".join(reviewers) or "(nobody)", decisions=decisions))
    print(f"imported {len(decisions)} decision(s) from {args.file} into {path}; the next run applies them "
          f"(already committed: `lmf run --force {args.stage}`)")
    return 0


def cmd_show(args) -> int:
    from lmfoundry.tasks.review.decisions import read_batches

    _, store = _store(args)
    for b in read_batches(store, KINDS[args.stage][0]):
        counts = {name: sum(d.decision == name for d in b.decisions) for name in ("approve", "reject", "relabel")}
        print(f"{b.created_at}  {b.batch}  {b.source:<12} {b.reviewer:<20} {counts}" + (f"  policy={b.policy}, unanswered={len(b.unanswered)}" if b.policy else ""))
    return 0
