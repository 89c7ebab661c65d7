"""The `lmf` command line.

    lmf run [--config F] [--until STAGE] [--force STAGE] [--set a.b=v] [--plan]
    lmf status [--config F] [--set a.b=v]
    lmf verify [STAGE] [--config F] [--report-only]
    lmf show STAGE [--version V]
    lmf bench NAME [ARGS...]
    lmf serve [--config F] [--only NAME] [--schedule NAME=CRON|SECONDS]   (deployments/README.md)
    lmf deploy [--config F] [--gpu-pool-type process|kubernetes] [--gpu-slots N]
    lmf report [--config F] [--snapshot LABEL] [--out report.html]
    lmf sweep [--config F] [--set sweep.trials=N] [--best-config PATH]   (the preset's `sweep` section; flows/sweep.py)
    lmf generate --model STAGE|DIR --prompt TEXT [--raw] [--temperature T] [--seed S]   (lmfoundry/talk.py)
    lmf chat --model STAGE|DIR [--system TEXT]
    lmf review export|import|show review_docs|review_pairs ...   (lmfoundry/review_cli.py: Label Studio)

Exit codes: 0 ok, 1 a stage failed (or `lmf verify` found damage), 2 invalid config or input named in the message.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def _prefect_env() -> None:
    # before prefect is imported: forward our loggers into Prefect run logs, no telemetry
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmfoundry")
    # the temporary server needs longer than Prefect's default on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _config(args):
    from lmfoundry.infra.config import load_config

    return load_config(args.config, args.set)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. near_dedup.threshold=0.85")


def cmd_run(args) -> int:
    cfg = _config(args)
    from lmfoundry.flows.pipeline import stage, stages_until
    from lmfoundry.infra.stage import check_inputs

    for name in ([args.until] if args.until else []) + args.force:
        stage(name)  # unknown names fail before anything starts
    check_inputs(stages_until(args.until), cfg)  # so does a configured input that cannot be read
    if args.plan:
        return cmd_status(args, cfg)
    if not args.force:
        from lmfoundry.flows.summary import answer_if_committed

        if answer_if_committed(cfg, args.until) is not None:
            return 0  # everything is committed: answered without starting Prefect
    from lmfoundry.flows.end_to_end import end_to_end

    end_to_end(config=cfg, until=args.until, force=args.force)  # the flow prints the run's summary
    return 0


def cmd_status(args, cfg=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmfoundry.flows.pipeline import STAGES
    from lmfoundry.infra.stage import plan
    from lmfoundry.infra.report import StageInfo, size_label
    from lmfoundry.infra.store import Store

    cfg = cfg or _config(args)
    store = Store.from_config(cfg.store)
    table = Table(title=f"pipeline '{cfg.store.pipeline}' in {cfg.store.url}: the versions this config produces")
    for column in ("stage", "a run would", "version", "ref (when other)", "state", "holds", "created", "run id"):
        table.add_column(column)
    for row in plan(store, STAGES, cfg, set(getattr(args, "force", []) or [])):
        # what this config produces, never another run's version; the ref is shown beside it
        manifest = store.manifest(row.stage, row.version) if row.version else None
        table.add_row(
            row.stage,
            WOULD[row.action],
            row.version or "-",
            row.current if row.current and row.current != row.version else "",
            state_of(row),
            size_label(StageInfo(row.stage, row.version, manifest)) if manifest else "-",
            manifest["created_at"] if manifest else "-",
            (manifest.get("run_id") or "-")[:8] if manifest else "-",
        )
    Console(width=180).print(table)
    return 0


WOULD = {"skip": "reuse", "run": "run", "run (upstream changes)": "may run", "disabled": "pass through"}


def state_of(row) -> str:
    """fresh: the committed version is what this config would produce; stale: it would change."""
    if row.action == "disabled":
        return "disabled (passes its input through)"
    if row.action == "skip":
        return "fresh" if row.current == row.version else "fresh (committed; the ref points at another run)"
    if row.action == "run (upstream changes)":
        return row.reason  # "may change": depends on what the upstream stage produces
    # the ref's own version without a usable manifest is "not committed" or "damaged", not stale
    return f"stale: {row.reason}" if row.current and row.current != row.version else row.reason


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_show(args) -> int:
    from lmfoundry.infra.store import Store

    cfg = _config(args)
    store = Store.from_config(cfg.store)
    version = args.version or config_versions(store, cfg).get(args.stage)
    if version is None:  # this config's version is not committed: the pipeline's ref, said as such
        version = store.get_ref(cfg.store.pipeline, args.stage)
        if version:
            print(f"this config's version of {args.stage} is not committed; showing the pipeline's ref {version} (another run's)", file=sys.stderr)
    manifest = store.manifest(args.stage, version) if version else None
    if manifest is None:
        print(f"stage '{args.stage}' has no committed version{' ' + version if version else ''} in {cfg.store.url}; run `lmf run` first", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0


def config_versions(store, cfg) -> dict[str, str]:
    """stage -> the committed version this config produces (what `lmf status` calls fresh)."""
    from lmfoundry.flows.pipeline import STAGES
    from lmfoundry.infra.stage import plan

    return {row.stage: row.version for row in plan(store, STAGES, cfg) if row.action == "skip" and row.version}


def cmd_verify(args) -> int:
    """Check every file of every committed version (or one stage's) against its manifest:
    size and xxh3 checksum. Damaged versions are un-committed so the next `lmf run` recomputes
    only their damaged files (unless --report-only). Exit 0 clean, 1 damaged."""
    from lmfoundry.infra.store import Store
    from lmfoundry.infra.verify import verify_store

    cfg = _config(args)
    store = Store.from_config(cfg.store)
    stages = [args.stage] if args.stage else None
    if args.stage and args.stage not in store.stages():
        print(f"lmf verify: stage '{args.stage}' has nothing in {cfg.store.url}; stages there: {', '.join(store.stages()) or 'none'}", file=sys.stderr)
        return 2
    checks = verify_store(store, stages, repair=not args.report_only)
    damaged = [check for check in checks if check.damaged]
    for check in damaged:
        for relpath, why in sorted(check.damaged.items()):
            print(f"DAMAGED {cfg.store.url.rstrip('/')}/stages/{check.stage}/{check.version}/{relpath}: {why}")
        if check.uncommitted:
            print(f"  -> stage '{check.stage}' version {check.version} is no longer committed; `lmf run` recomputes only these files")
    files, size = sum(c.files for c in checks), sum(c.bytes for c in checks)
    print(f"checked {files} files ({_human(size)}) in {len(checks)} committed versions: "
          + (f"{sum(len(c.damaged) for c in damaged)} damaged in {len(damaged)} versions" if damaged else "all intact"))
    return 1 if damaged else 0


def cmd_bench(args) -> int:
    try:
        module = importlib.import_module(f"lmfoundry.bench.{args.name}")
    except ModuleNotFoundError:
        import pkgutil

        from lmfoundry import bench

        names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
        print(f"unknown benchmark '{args.name}'; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return module.main(args.args) or 0


def cmd_eval(args) -> int:
    """`lmf eval NAME ...` runs tasks/<NAME>/evaluate.py's main(argv), e.g. `lmf eval pii labelled.jsonl`."""
    try:
        module = importlib.import_module(f"lmfoundry.tasks.{args.name}.evaluate")
    except ModuleNotFoundError:
        print(f"unknown evaluation '{args.name}'", file=sys.stderr)
        return 2
    return module.main(args.args) or 0


def _deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefect-file", default=None, help="deployment file (default: deployments/prefect.yaml)")
    p.add_argument("--config", help="YAML preset the deployments' forms default to (default: the file's own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default override for the forms, e.g. near_dedup.threshold=0.85")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="only this deployment (repeatable)")
    p.add_argument("--schedule", action="append", default=[], metavar="NAME=CRON|SECONDS", help="replace a deployment's schedule timing, e.g. data-refresh='0 */6 * * *'")
    p.add_argument("--no-schedules", action="store_true", help="register without schedules (trigger from the UI only)")


def cmd_serve(args) -> int:
    """Serve the deployments of deployments/prefect.yaml from this process (single machine)."""
    from lmfoundry.flows import deploy

    return _deployments(args, "serve", deploy.serve, limit=args.limit)


def cmd_deploy(args) -> int:
    """Register the deployments with the Prefect server at PREFECT_API_URL (work pools, GPU limit)."""
    from lmfoundry.flows import deploy

    return _deployments(args, "deploy", deploy.deploy, gpu_pool_type=args.gpu_pool_type, gpu_slots=args.gpu_slots)


def _deployments(args, verb: str, action, **extra) -> int:
    """`lmf serve` and `lmf deploy` share their arguments and their error handling."""
    from lmfoundry.flows import deploy

    try:
        action(
            args.prefect_file or deploy.PREFECT_FILE,
            preset=args.config,
            overrides=args.set,
            only=args.only,
            schedules=args.schedule,
            with_schedules=not args.no_schedules,
            **extra,
        )
    except deploy.DeploymentFileError as exc:
        print(f"lmf {verb}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_report(args) -> int:
    """Write a self-contained HTML report of the versions this config produces (or a snapshot)."""
    from pathlib import Path

    from lmfoundry.flows.pipeline import STAGE_NAMES
    from lmfoundry.infra.report import build_report
    from lmfoundry.infra.store import Store

    cfg = _config(args)
    store = Store.from_config(cfg.store)
    try:
        versions = None if args.snapshot else config_versions(store, cfg)
        text = build_report(store, cfg.store.pipeline, STAGE_NAMES, args.snapshot, versions)
    except ValueError as exc:
        print(f"lmf report: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


def cmd_sweep(args) -> int:
    """Run the sweep flow here (a temporary Prefect server unless PREFECT_API_URL names one);
    running it again continues the same study."""
    from lmfoundry.flows.params import DEFAULT_PRESET
    from lmfoundry.flows.sweep import sweep
    from lmfoundry.flows.sweep_study import check_space

    check_space(_config(args))  # an invalid preset, override or search space fails before Prefect starts
    sweep(preset=args.config or DEFAULT_PRESET, overrides=args.set, best_config=args.best_config or "")
    return 0


def main(argv: list[str] | None = None) -> int:
    _prefect_env()
    parser = argparse.ArgumentParser(prog="lmf", description="lmfoundry: raw web text to an aligned language model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the pipeline (committed stages are skipped)")
    _add_config_args(p)
    p.add_argument("--until", help="stop after this stage")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage and everything downstream")
    p.add_argument("--plan", action="store_true", help="print what would run, run nothing")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("status", help="table of stages: version, committed, fresh or stale")
    _add_config_args(p)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("verify", help="check every committed file's size and checksum (exit 1 when damaged)")
    _add_config_args(p)
    p.add_argument("stage", nargs="?", help="only this stage (default: every stage in the store)")
    p.add_argument("--report-only", action="store_true", help="only report; leave damaged versions committed")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("show", help="print a stage's manifest")
    _add_config_args(p)
    p.add_argument("stage")
    p.add_argument("--version", help="a specific version (default: the pipeline's current ref)")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("bench", help="run a benchmark from bench/")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("eval", help="run an evaluation harness, e.g. `lmf eval pii FILE`")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("serve", help="serve the Prefect deployments from this process (UI runs, schedules)")
    _deploy_args(p)
    p.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("deploy", help="register the deployments with a Prefect server for workers")
    _deploy_args(p)
    p.add_argument("--gpu-pool-type", choices=["process", "kubernetes"], default="process", help="type of the `gpu` work pool when it is created")
    p.add_argument("--gpu-slots", type=int, default=None, help="size of the gpu-slots concurrency limit (default: prefect.yaml's)")
    p.set_defaults(fn=cmd_deploy)
    p = sub.add_parser("report", help="write a self-contained HTML report of the pipeline")
    _add_config_args(p)
    p.add_argument("--snapshot", help="report this data-refresh snapshot instead of the current refs")
    p.add_argument("--out", default="lmf-report.html", help="output file (default: lmf-report.html)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("sweep", help="hyperparameter search over the preset's sweep.space (Optuna; resumable)")
    _add_config_args(p)
    p.add_argument("--best-config", help="also write the best config as a YAML preset here")
    p.set_defaults(fn=cmd_sweep)
    from lmfoundry import talk

    talk.add_commands(sub, _add_config_args)  # generate, chat
    from lmfoundry import review_cli

    review_cli.add_commands(sub, _add_config_args)  # review export / import / show (Label Studio)
    args = parser.parse_args(argv)

    from lmfoundry.infra.config import ConfigError
    from lmfoundry.infra.files import InputError
    from lmfoundry.infra.store import DamagedFile

    try:
        return args.fn(args)
    except (ConfigError, InputError) as exc:
        print(f"lmf: {exc}", file=sys.stderr)
        return 2
    except DamagedFile as exc:  # the store un-committed the damaged files: a rerun repairs them
        print(f"lmf: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
