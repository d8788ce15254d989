"""The `scaling-study` command line: thin verbs over library functions.

    scaling-study plan experiments/smoke.yaml                  # cells, FLOPs, device-hours, storage
    scaling-study run experiments/smoke.yaml                   # the whole study: local Ray + local MLflow
    scaling-study results smoke --format csv                   # one row per finetune job
    scaling-study status smoke | scaling-study ui smoke
    scaling-study report smoke -o smoke.html                   # tables, plots, verdicts: one HTML file
    scaling-study submit experiments/x.yaml --address http://127.0.0.1:8265 --follow   # a Ray job; idempotent
    scaling-study status --address http://127.0.0.1:8265      # study jobs on a cluster (docs/cluster.md)
    scaling-study plan experiments/scholarbert.yaml --device a100 --format json
    scaling-study validate experiments/*.yaml                   # check specs, write nothing
    scaling-study tasks list | scaling-study tasks show scierc_re
    scaling-study tasks check --data-dir ../shared/datasets     # load every task's data: sizes, labels
    scaling-study presets                                       # model sizes and devices
    scaling-study spec-reference > docs/spec.md                 # every spec field, documented

Bad input (a spec, a task folder) prints one line per problem, `FILE:LINE: FIELD: ...`, and exits
with code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from scaling_study.errors import UserError


def _si(value: float | None, unit: str = "") -> str:
    """3 significant digits with a suffix: counts use B for billions, rates (FLOP/s) use SI's G and P."""
    if value is None:
        return "?"
    scales = ((("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if unit
              else (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)))
    for suffix, scale in scales:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}{unit}" if unit else f"{value / scale:.3g}{suffix}"
    return f"{value:.3g} {unit}".rstrip()


def _bytes(value: float) -> str:
    for suffix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f} B"


def _hours(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value * 3600:.3g} s"


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scaling_study.costs import estimate
    from scaling_study.grid import expand
    from scaling_study.spec import load_spec

    study = load_spec(args.spec)
    plan = expand(study)
    try:
        report = estimate(study, plan, device=args.device, mfu=args.mfu)
    except ValueError as exc:
        raise UserError(f"--device/--mfu: {exc}") from None
    if args.format == "json":
        data = report.to_dict()
        if args.nodes:
            data["nodes"] = plan.to_dict()["nodes"]
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    console = Console(width=max(Console().width, 120), soft_wrap=True)  # prose unwrapped; tables fit the width
    dev, c = report.device, report.counts
    console.print(f"[bold]Study {study.spec.name}[/bold]  ({args.spec})")
    if study.spec.description:
        console.print(study.spec.description.strip())
    console.print(
        f"{c['corpus']} corpus builds, {c['pretrain']} pretraining runs, {c['checkpoint']} checkpoints, "
        f"{c['external']} external models, {len(study.tasks)} tasks, "
        f"{c['finetune_run']} finetune runs -> {c['finetune']} finetune jobs (result cells)")
    if report.corpus:
        console.print(f"Corpus: {_si(report.corpus.tokens)} tokens ({report.corpus.source})")
    if report.pretrain_runs:
        console.print(_pretrain_table(report))
    console.print(_finetune_table(report))

    t, s = report.totals, report.storage
    console.print(f"[bold]Totals[/bold]: {t.flops:.3g} FLOPs = {_hours(t.device_hours)} {dev.name}-hours "
                  f"(pretraining {_hours(t.pretrain_device_hours)}, finetuning {_hours(t.finetune_device_hours)})")
    if report.adaptive_seeds:
        a = report.adaptive_seeds
        console.print(f"[bold]Adaptive seeds[/bold] ({a.min_seeds}-{a.max_seeds} per cell): finetune jobs "
                      f"{a.jobs_min:,} at least, about {a.jobs_expected:,.0f} expected, {a.jobs_max:,} at most; "
                      f"finetuning about {_hours(a.finetune_device_hours_expected)} {dev.name}-hours expected, "
                      f"{_hours(a.finetune_device_hours_max)} at most. Expected: {a.assumption}.")
    if t.finetune_jobs_without_flops:
        console.print(f"  {t.finetune_jobs_without_flops} finetune runs not costed (unknown split sizes or "
                      "external models without num_parameters)")
    console.print(f"Storage: checkpoints {_bytes(s.checkpoint_weights_bytes)} weights + "
                  f"{_bytes(s.checkpoint_optimizer_bytes)} optimizer state, corpus shards "
                  f"<= {_bytes(s.corpus_shards_bytes)}; total {_bytes(s.total_bytes)}")
    disk = {node: _bytes(d["total"]) for node, d in s.node_disk.items()}
    console.print(f"Cluster node disks (docs/cluster.md, Disks): head {disk['head']}, pretraining node "
                  f"{disk['pretrain_node']}, finetuning node {disk['finetune_node']}")
    console.print(
        f"Assumed: {dev.name} ({dev.description}) at {_si(dev.peak_flops, 'FLOP/s')} {dev.peak_precision} "
        f"peak x MFU {dev.assumed_mfu:.2f} = {_si(dev.throughput_flops, 'FLOP/s')}. FLOPs count every matmul "
        "of the forward and backward pass (3x forward): the encoder on every token, the MLM head only at masked "
        "positions; finetuning at max_seq_len per example plus dev/test scoring.")
    return 0


def _pretrain_table(report):
    from rich.table import Table

    table = Table(title="Pretraining runs", title_justify="left")
    for col in ("size", "params", "volume", "volume tokens", "steps", "checkpoints at", "tokens",
                "epochs", "train FLOPs", f"{report.device.name}-hours"):
        table.add_column(col, justify="left" if col in ("size", "volume", "checkpoints at") else "right")
    for r in report.pretrain_runs:
        table.add_row(r.model_size, _si(r.parameters), r.data_volume, _si(r.volume_tokens),
                      f"{r.steps:,}", ", ".join(f"{s:,}" for s in r.checkpoints), _si(r.tokens),
                      f"{r.epochs_over_data:.2g}" if r.epochs_over_data else "?",
                      f"{r.flops:.3g}", _hours(r.device_hours))
    return table


def _finetune_table(report):
    from rich.table import Table

    table = Table(title="Finetune jobs per task", title_justify="left")
    for col in ("task", "type", "train ex.", "test ex.", "runs", "jobs", "train FLOPs", f"{report.device.name}-hours"):
        table.add_column(col, justify="left" if col in ("task", "type") else "right")
    for r in report.finetune_by_task:
        if r.flops_unknown == r.runs:
            flops = hours = "?"
        else:
            unknown = " (+?)" if r.flops_unknown else ""
            flops, hours = f"{r.flops:.3g}{unknown}", _hours(r.device_hours) + unknown
        table.add_row(r.task, r.type, _si(r.train_examples), _si(r.test_examples), str(r.runs), str(r.jobs),
                      flops, hours)
    return table


def cmd_validate(args: argparse.Namespace) -> int:
    from scaling_study.grid import expand
    from scaling_study.spec import load_spec

    for spec in args.specs:
        plan = expand(load_spec(spec))
        print(f"{spec}: ok ({len(plan.of_kind('finetune'))} finetune jobs)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaling_study.tasks.registry import discover

    registry = discover([Path(p) for p in args.registry_path])
    if args.action == "check":
        return _tasks_check(registry, args)
    if args.action == "list":
        for tid, t in sorted(registry.tasks.items()):
            suites = f"  [{', '.join(t.suites)}]" if t.suites else ""
            print(f"{tid:20s} {t.type:4s} {t.domain:18s} {t.metric:10s} {t.name}{suites}")
        print()
        for suite, ids in registry.suites.items():
            print(f"suite {suite}: {', '.join(ids)}")
        return 0
    for tid in args.ids:
        if tid not in registry.tasks:
            raise UserError(f"tasks show: unknown task {tid!r}; allowed: {', '.join(sorted(registry.tasks))}")
        t = registry.tasks[tid]
        print(f"{t.id}: {t.name} ({t.type}, {t.domain}), metric {t.metric}, version {t.version}")
        print(f"  {t.description}")
        print(f"  format {t.format} {t.format_options or ''}, labels ({t.label_scheme}): {', '.join(t.labels)}")
        for split, info in t.splits.items():
            print(f"  {split}: {info.file}, {info.num_examples or '?'} examples, {info.url or 'no direct URL'}")
        print(f"  folder {t.folder}; homepage {t.homepage}")
    return 0


def _tasks_check(registry, args: argparse.Namespace) -> int:
    """Load every task whose data can be found; print split sizes and label sets. A malformed file raises."""
    from collections import Counter
    from pathlib import Path

    from scaling_study.metrics import entity_spans
    from scaling_study.tasks.data import DataNotFound, load_task_data, mirror_dirs
    from scaling_study.tasks.loaders import check_options

    unknown = [t for t in args.ids if t not in registry.tasks]
    if unknown:
        raise UserError(f"tasks check: unknown task(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(registry.tasks))}")
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise UserError(f"--data-dir {args.data_dir}: no such folder; allowed: a folder holding one folder per "
                        "task id with its split files")
    dirs = mirror_dirs(args.data_dir)
    print(f"Data folders: {', '.join(map(str, dirs)) or '(none)'}; then the download cache"
          + (" (offline: no downloads)" if args.offline else ""))
    loaded, missing, mismatched = 0, [], []
    for tid in args.ids or sorted(registry.tasks):
        task = registry.tasks[tid]
        check_options(task)
        try:
            data = load_task_data(task, dirs, allow_download=not args.offline)
        except DataNotFound as exc:
            missing.append(tid)
            print(f"{tid}: skipped, data not found ({str(exc).split(': ', 2)[-1]})")
            continue
        loaded += 1
        print(f"{tid} ({task.type}, {task.format}, {task.label_scheme}, metric {task.metric})")
        for split, examples in data.splits.items():
            expected = task.splits[split].num_examples
            flag = "" if expected is None or expected == len(examples) else f"  MISMATCH: task.yaml says {expected}"
            if flag:
                mismatched.append(f"{tid}/{split}")
            if task.type == "ner":
                counts = Counter(kind for ex in examples for kind, _, _ in entity_spans(ex["tags"]))
                words = sum(len(ex["tokens"]) for ex in examples)
                size = f"{len(examples):>6} sentences, {words:>7} words, {sum(counts.values()):>6} entities"
            else:
                counts = Counter(ex["label"] for ex in examples)
                size = f"{len(examples):>6} examples"
            labels = ", ".join(f"{k} {counts.get(k, 0)}" for k in task.labels if counts.get(k, 0)) or "(none)"
            absent = [k for k in task.labels if not counts.get(k)]
            print(f"  {split:5s} {size}  [{labels}]" + (f"  absent: {', '.join(absent)}" if absent else "") + flag)
            print(f"        {data.files[split]}")
            for note, n in sorted(data.notes[split].items()):
                print(f"        {n} x {note}")
    print(f"{loaded} task(s) loaded, {len(missing)} skipped (no data)"
          + (f", split sizes differ from task.yaml: {', '.join(mismatched)}" if mismatched else ""))
    return 1 if mismatched else 0


def cmd_presets(args: argparse.Namespace) -> int:
    from scaling_study.models import count_parameters, load_devices, load_presets

    print(f"Model sizes (parameters of the MLM model at vocab {args.vocab_size:,}):")
    for name, p in load_presets().items():
        print(f"  {name:8s} {p.num_layers:3d} layers, hidden {p.hidden_size:5d}, {p.num_heads:3d} heads, "
              f"FFN {p.ffn_size:5d}: {_si(count_parameters(p, args.vocab_size)):>7s}  {p.description}")
    print("Devices:")
    for name, d in load_devices().items():
        print(f"  {name:5s} {_si(d.peak_flops, 'FLOP/s'):>13s} {d.peak_precision}, assumed MFU {d.assumed_mfu:.2f}: "
              f"{d.description}")
    return 0


def cmd_spec_reference(args: argparse.Namespace) -> int:
    from scaling_study.spec import spec_reference_markdown

    sys.stdout.write(spec_reference_markdown())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scaling_study.orchestration import prepare, run_study
    from scaling_study.spec import load_spec

    study = load_spec(args.spec)
    prepared = prepare(study)
    _check_inputs(prepared)
    summary = run_study(study, address=args.address, progress=not args.quiet, prepared=prepared)
    console = Console(soft_wrap=True)
    c = summary.counts
    done = {k: f"{v['done']}/{sum(v.values())}" for k, v in c.items()}
    console.print(f"[bold]{summary.study}[/bold]: {summary.seconds / 60:.1f} min, {summary.trained} nodes computed; "
                  f"done: corpus {done['corpus']}, pretrain {done['pretrain']}, checkpoints {done['checkpoint']}, "
                  f"finetune jobs {done['finetune']}")
    console.print(f"Storage: {summary.root}   Tracking: {summary.tracking_uri}")
    blocked: dict[str, int] = {}
    for f in summary.failures:
        if f.reason.startswith("not run"):
            blocked[f"{f.reason}  log: {f.log}"] = blocked.get(f"{f.reason}  log: {f.log}", 0) + 1
        else:
            console.print(f"[red]FAILED[/red] {f.kind} {f.node} ({f.what}): {f.reason}" + (f"  log: {f.log}" if f.log else ""))
    for reason, count in blocked.items():
        console.print(f"[yellow]blocked[/yellow] {count} nodes, {reason}")
    if summary.ok:
        console.print(f"Results: scaling-study results {args.spec}   UI: scaling-study ui {args.spec}")
    return 0 if summary.ok else 1


def _check_inputs(prepared) -> None:
    """Bad corpus files and task data stop `run` here, before anything is started or written."""
    from scaling_study.corpus import check_corpus
    from scaling_study.tasks.data import check_task_data

    plan, done = prepared.plan, prepared.done
    if not all(n.id in done for n in plan.of_kind("corpus")):
        check_corpus(prepared.study)
    pending = {n.factors["task"] for n in plan.of_kind("finetune_run") if n.id not in done}
    for tid, why in check_task_data(prepared.study, pending).items():
        print(f"scaling-study: warning: {why}; its finetune runs will fail", file=sys.stderr)


def _write_frame(df, fmt: str, output: str | None) -> None:
    if fmt == "table":
        text = df.to_string(index=False) if len(df) else "(no finished finetune jobs yet)"
    elif fmt == "csv":
        text = df.to_csv(index=False)
    else:
        text = df.to_json(orient="records", indent=1)
    if output:
        from pathlib import Path

        Path(output).write_text(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)


def cmd_results(args: argparse.Namespace) -> int:
    from scaling_study import results
    from scaling_study.errors import UserError

    if args.format == "parquet" and not args.output:
        raise UserError("--format parquet: needs -o FILE (Parquet is binary); allowed: -o results.parquet, "
                        "or --format table|csv|json for stdout")
    where = results.parse_where(args.where)
    df = results.load(args.study, tracking_uri=args.tracking_uri, root=args.root, refresh=not args.no_refresh)
    if where:
        df = results.select(df, where)
    if args.pivot:
        df = results.pivot(df, args.pivot[0], args.pivot[1], args.value, include_collapsed=args.include_collapsed)
        # the table's definition heads a printed table; machine formats keep stdout parseable
        print(f"# {df.attrs['definition']}", file=sys.stdout if args.format == "table" and not args.output
              else sys.stderr)
    elif args.format == "table" and len(df):
        keep = [c for c in ("model", "steps", "task", "epochs", "seed", "test_f1", "dev_f1", "collapsed") if c in df]
        df = df[keep]
    if args.format == "parquet":
        df.to_parquet(args.output, index=False)
        return 0
    _write_frame(df, args.format, args.output)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scaling_study import report

    out = report.build(args.study, tracking_uri=args.tracking_uri, root=args.root, out=args.output,
                       threshold=args.threshold, include_collapsed=args.include_collapsed)
    print(f"report: {out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.address:
        return _jobs_status(args)
    if not args.study:
        raise UserError("status: missing STUDY; allowed: a study name or spec file, or --address URL for the "
                        "study jobs on a Ray cluster")
    from scaling_study import results

    print(results.status(args.study, tracking_uri=args.tracking_uri, root=args.root).to_string(index=False))
    return 0


def _jobs_status(args: argparse.Namespace) -> int:
    """The study jobs on a Ray cluster (`status --address`), optionally of one study (name or spec file)."""
    from scaling_study.submit import connect, study_jobs

    name = args.study
    if name and name.endswith((".yaml", ".yml")):
        from scaling_study.spec import load_spec

        name = load_spec(name).spec.name
    client = connect(args.address)
    rows = study_jobs(client, name)
    if not rows:
        print(f"no study jobs{' of ' + name if name else ''} on {client.get_address()}")
        return 0
    import pandas as pd

    df = pd.DataFrame(rows)
    df["started"] = pd.to_datetime(df.pop("start_time"), unit="ms").dt.strftime("%Y-%m-%d %H:%M")
    df["seconds"] = df["seconds"].map(lambda s: "" if s is None or s != s else f"{s:.0f}")
    print(df[["submission_id", "study", "status", "started", "seconds", "message"]].to_string(index=False))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaling_study.spec import load_spec
    from scaling_study.submit import TERMINAL, connect, follow, submit

    study = load_spec(args.spec)  # bad input fails here, before anything reaches the cluster
    client = connect(args.address)
    root = Path(args.working_dir) if args.working_dir else None
    job = submit(client, study, root=root, tracking_uri=args.tracking_uri, retry=args.retry)
    address = client.get_address()
    if job.new:
        print(f"submitted {job.submission_id} to {address}")
    else:
        print(f"already submitted: {job.submission_id} ({job.status}); attached, nothing new started"
              + ("; --retry starts a new attempt" if job.status in ("FAILED", "STOPPED") else ""))
    if not args.follow:
        print(f"watch: scaling-study status {study.spec.name} --address {address}   "
              f"logs: ray job logs {job.submission_id} --address {address} --follow")
        return 0
    status = follow(client, job.submission_id, lambda text: print(text, end="", flush=True))
    print(f"{job.submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1 if status in TERMINAL else 0


def cmd_ui(args: argparse.Namespace) -> int:
    import time

    from scaling_study.artifacts import Layout, pull_tracking
    from scaling_study.tracking import LocalMlflowServer

    if args.study.endswith((".yaml", ".yml")):
        from scaling_study.spec import load_spec

        layout = Layout.of(load_spec(args.study))
    else:
        layout = Layout.named(args.study, args.root)
    folder = pull_tracking(layout)  # an object-store root: the db the driver uploaded, downloaded here
    if not (folder / "mlflow.db").is_file():
        raise UserError(f"ui: no tracking database at {folder / 'mlflow.db'}; allowed: a study run with the "
                        "embedded server (scaling-study run), or --root for another storage root")
    with LocalMlflowServer(folder, port=args.port) as server:
        print(f"MLflow UI for {args.study}: {server.uri}  (Ctrl-C to stop)", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def _study_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("study", nargs="?" if optional else None, help="study name (under --root) or its spec file")
    p.add_argument("--root", default="studies",
                   help="storage root of the embedded default: a folder or s3://, gs:// URI (default: ./studies)")
    p.add_argument("--tracking-uri", default=None, help="read from this MLflow server instead")


def _study_verbs(sub) -> None:
    """The study's lifecycle: plan, run, results, report, status."""
    p = sub.add_parser("plan", help="show a study's plan and cost before anything runs")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--device", default="h100", help="device for the estimate: h100, h200, a100, cpu (default h100)")
    p.add_argument("--mfu", type=float, default=None, help="override the device's assumed MFU (0-1)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--nodes", action="store_true", help="with --format json: include every node of the DAG")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a study on Ray (local by default), tracked in MLflow; idempotent")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--quiet", action="store_true", help="no live view of the grid")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("results", help="a study's finetune results from MLflow: one row per job, filters, pivots")
    _study_args(p)
    p.add_argument("--pivot", nargs=2, metavar=("ROW", "COL"), default=None,
                   help="a ROW x COL table of --value: mean over seeds, every other factor at its largest level, "
                        "scores in points (the report's table is --pivot task model)")
    p.add_argument("--value", default="test_f1", help="the column --pivot averages (default test_f1)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=V1[,V2]",
                   help="keep rows whose COLUMN is one of the values; repeat for more columns "
                        "(e.g. --where task=scierc_re --where model_size=tiny,base)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="parquet needs -o")
    p.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    p.add_argument("--no-refresh", action="store_true",
                   help="read the results cache (<root>/<study>/cache/) only; do not ask MLflow")
    p.add_argument("--include-collapsed", action="store_true", help="--pivot counts collapsed runs too")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="a study's results as one self-contained HTML page (tables, plots, verdicts)")
    _study_args(p)
    p.add_argument("--output", "-o", default=None, help="HTML file to write (default: ROOT/STUDY/report.html)")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="F1 points a step of a factor must surely buy to count as a gain (default 1.0, the paper's)")
    p.add_argument("--include-collapsed", action="store_true",
                   help="count collapsed runs in the table, verdicts and fits (left out by default)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="a study's MLflow runs by kind and status; with --address, its Ray jobs")
    _study_args(p, optional=True)
    p.add_argument("--address", default=None,
                   help="a Ray cluster's dashboard URL: list the study jobs there (all of them without STUDY)")
    p.set_defaults(func=cmd_status)



def _cluster_verbs(sub) -> None:
    """A Ray cluster and the MLflow UI: submit, ui."""
    p = sub.add_parser("submit", help="run a study on a Ray cluster as a Ray job; idempotent")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 if it fails")
    p.add_argument("--tracking-uri", default=None,
                   help="log to this MLflow server instead of the spec's tracking.uri (as seen from the cluster; "
                        "'${MLFLOW_TRACKING_URI}' expands there)")
    p.add_argument("--retry", action="store_true", help="start a new attempt if the study's last job failed or stopped")
    p.add_argument("--working-dir", default=None,
                   help="folder uploaded as the job's working directory (default: this source checkout)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ui", help="serve the MLflow UI over a study run with the embedded server")
    p.add_argument("study", help="study name (under --root) or its spec file")
    p.add_argument("--root", default="studies", help="storage root: a folder or s3://, gs:// URI (default: ./studies)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)



def _registry_verbs(sub) -> None:
    """Specs, tasks and presets: validate, tasks, spec-reference, presets."""
    p = sub.add_parser("validate", help="check study specs; write nothing")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("tasks", help="the task registry")
    p.add_argument("action", choices=("list", "show", "check"),
                   help="list the registry; show tasks; check: load each task's data, print sizes and labels")
    p.add_argument("ids", nargs="*", help="task ids (show; check: default all)")
    p.add_argument("--registry-path", action="append", default=[], help="extra folder of task folders")
    p.add_argument("--data-dir", default=None,
                   help="check: local mirror, <DIR>/<task id>/<file> (then $SCALING_STUDY_DATA_DIR, then the cache)")
    p.add_argument("--offline", action="store_true", help="check: never download; use mirrors and the cache only")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("spec-reference", help="every spec field with its type, default and meaning (Markdown)")
    p.set_defaults(func=cmd_spec_reference)

    p = sub.add_parser("presets", help="model-size presets and devices")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.set_defaults(func=cmd_presets)


def build_parser() -> argparse.ArgumentParser:
    from scaling_study import __version__

    parser = argparse.ArgumentParser(prog="scaling-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"scaling-study {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _study_verbs(sub)
    _cluster_verbs(sub)
    _registry_verbs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"scaling-study: error: {line}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT, no traceback
        print("scaling-study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
