"""The `scaling-study` command line: thin verbs over library functions.

    scaling-study plan experiments/smoke.yaml                  # cells, FLOPs, device-hours, storage
    scaling-study run experiments/smoke.yaml                   # the whole study: local Ray + local MLflow
    scaling-study results smoke --format csv                   # one row per finetune job
    scaling-study status smoke | scaling-study ui smoke
    scaling-study report smoke -o smoke.html                   # tables, plots, verdicts: one HTML file
    scaling-study submit experiments/x.yaml --address http://127.0.0.1:8265 --follow   # a Ray job; idempotent
    scaling-study status --address http://127.0.0.1:8265      # study jobs on a cluster (docs/cluster.md)
    scaling-study plan experiments/scholarbert.yaml --device a100 --format json
    scaling-study plan experiments/scholarbert.yaml --cpus 256   # corpus builds' wall time on 256 CPUs
    scaling-study validate experiments/*.yaml                   # check specs, write nothing
    scaling-study tasks list | scaling-study tasks show scierc_re
    scaling-study tasks check --data-dir ../shared/datasets     # load every task's data: sizes, labels
    scaling-study presets                                       # model sizes, devices, corpus build rates
    scaling-study spec-reference > docs/spec.md                 # every spec field, documented

Bad input (a spec, a task folder) prints one line per problem, `FILE:LINE: FIELD: ...`, and exits
with code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

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


def _bytes(value: float | None) -> str:
    if value is None:
        return "?"
    for suffix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f} B"


def _hours(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g}" if value >= 0.01 else f"{value * 3600:.3g} s"


def _cpu_time(hours: float | None) -> str:
    if hours is None:
        return "? CPU-hours"
    return f"{hours:.3g} CPU-hours" if hours >= 0.01 else f"{hours * 3600:.3g} CPU-seconds"


def _wall(hours: float | None) -> str:
    """A wall time: h, min or s."""
    if hours is None:
        return "?"
    if hours >= 1:
        return f"{hours:.3g} h"
    return f"{hours * 60:.3g} min" if hours >= 1 / 60 else f"{hours * 3600:.3g} s"


def _plan_cpus(args: argparse.Namespace) -> tuple[int | None, str | None]:
    """The CPUs corpus builds spread over (`--cpus`, `--address`) and where the number comes from;
    (None, None): this machine's (`costs.estimate`'s default)."""
    if args.cpus is not None:
        if args.cpus < 1:
            raise UserError(f"--cpus {args.cpus}: must be positive; allowed: an integer >= 1, the cluster's CPUs, "
                            "e.g. 256")
        return args.cpus, "--cpus"
    if args.address:
        from scaling_study.raycluster import cluster_cpus

        return cluster_cpus(args.address), f"the Ray cluster at {args.address}, now"
    return None, None


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scaling_study.costs import estimate
    from scaling_study.grid import expand
    from scaling_study.spec import load_spec

    if args.mfu is not None and not 0 < args.mfu <= 1:  # nan fails the comparison too
        raise UserError(f"--mfu {args.mfu:g}: out of range; allowed: a fraction of the device's peak in (0, 1], "
                        "e.g. 0.4")
    study = load_spec(args.spec)
    plan = expand(study)
    cpus, cpus_source = _plan_cpus(args)
    try:
        report = estimate(study, plan, device=args.device, mfu=args.mfu, cpus=cpus, cpus_source=cpus_source)
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
    if report.corpus_builds:
        console.print(_corpus_table(report))
    if report.pretrain_runs:
        console.print(_pretrain_table(report))
    console.print(_finetune_table(report))
    _print_totals(console, report, args)
    return 0


def _print_totals(console, report, args: argparse.Namespace) -> None:
    """`plan`'s last lines: totals, adaptive seeds, storage, node disks, assumptions."""
    dev, t, s, cpu = report.device, report.totals, report.storage, report.cpu
    corpus = (f"; corpus builds {_cpu_time(t.corpus_cpu_hours)}, {_wall(t.corpus_wall_hours)} wall on "
              f"{cpu.cpus} CPUs" if report.corpus_builds else "")
    console.print(f"[bold]Totals[/bold]: {t.flops:.3g} FLOPs = {_hours(t.device_hours)} {dev.name}-hours "
                  f"(pretraining {_hours(t.pretrain_device_hours)}, finetuning {_hours(t.finetune_device_hours)})"
                  + corpus)
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
    if report.corpus_builds:
        hint = "" if args.cpus or args.address else "; --cpus N or --address for a cluster's"
        console.print(
            f"Corpus builds: {cpu.cpus} CPUs ({cpu.cpus_source}{hint}), per core "
            f"scan {_bytes(cpu.scan_rate)}/s, pack {_bytes(cpu.pack_rate)}/s, tokenizer training "
            f"{_bytes(cpu.train_rate)}/s (one process per volume); {cpu.rates_source}.")


def _corpus_table(report):
    from rich.table import Table

    cpu = report.cpu
    table = Table(title=f"Corpus builds (CPU-hours; one scan of the corpus for all volumes; wall on {cpu.cpus} CPUs)",
                  title_justify="left")
    for col in ("volume", "text", "tokenizer sample", "scan share", "training", "pack", "CPU-hours", "wall"):
        table.add_column(col, justify="left" if col == "volume" else "right")
    for r in report.corpus_builds:
        table.add_row(r.data_volume, _bytes(r.volume_bytes), _bytes(r.tokenizer_sample_bytes),
                      _hours(r.scan_cpu_hours), _hours(r.train_cpu_hours), _hours(r.pack_cpu_hours),
                      _hours(r.cpu_hours), _wall(r.wall_hours))
    return table


def _pretrain_table(report):
    from rich.table import Table

    table = Table(title="Pretraining runs", title_justify="left")
    for col in ("size", "params", "volume", "volume tokens", "steps", "checkpoints at", "tokens",
                "epochs", "train FLOPs", f"{report.device.name}-hours"):
        table.add_column(col, justify="left" if col in ("size", "volume", "checkpoints at") else "right")
    for r in report.pretrain_runs:
        table.add_row(r.model_size, _si(r.parameters), r.data_volume, _si(r.volume_tokens),
                      f"{r.steps:,}", ", ".join("0 (control)" if s == 0 else f"{s:,}" for s in r.checkpoints),
                      _si(r.tokens),
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


def _registry(args: argparse.Namespace):
    from scaling_study.tasks.registry import discover

    return discover([Path(p) for p in args.registry_path])


def _dump_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _known(registry, ids: list[str], verb: str) -> None:
    unknown = [t for t in ids if t not in registry.tasks]
    if unknown:
        raise UserError(f"tasks {verb}: unknown task(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(registry.tasks))}")


def cmd_tasks_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.format == "json":
        keys = ("id", "name", "type", "domain", "metric", "version", "suites")
        _dump_json({"tasks": [{k: getattr(t, k) for k in keys} for _, t in sorted(registry.tasks.items())],
                    "suites": registry.suites})
        return 0
    for tid, t in sorted(registry.tasks.items()):
        suites = f"  [{', '.join(t.suites)}]" if t.suites else ""
        print(f"{tid:20s} {t.type:4s} {t.domain:18s} {t.metric:10s} {t.name}{suites}")
    print()
    for suite, ids in registry.suites.items():
        print(f"suite {suite}: {', '.join(ids)}")
    return 0


def cmd_tasks_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    _known(registry, args.ids, "show")
    if args.format == "json":
        _dump_json([{**dataclasses.asdict(registry.tasks[tid]), "folder": registry.tasks[tid].folder}
                    for tid in args.ids])
        return 0
    for tid in args.ids:
        t = registry.tasks[tid]
        print(f"{t.id}: {t.name} ({t.type}, {t.domain}), metric {t.metric}, version {t.version}")
        print(f"  {t.description}")
        print(f"  format {t.format} {t.format_options or ''}, labels ({t.label_scheme}): {', '.join(t.labels)}")
        for split, info in t.splits.items():
            print(f"  {split}: {info.file}, {info.num_examples or '?'} examples, {info.url or 'no direct URL'}")
        print(f"  folder {t.folder}; homepage {t.homepage}")
    return 0


def _check_task(task, dirs, *, offline: bool) -> dict:
    """One task's data, loaded: per split its size, label counts, file and reader notes (`tasks check`)."""
    from collections import Counter

    from scaling_study.metrics import entity_spans
    from scaling_study.tasks.data import DataNotFound, load_task_data
    from scaling_study.tasks.loaders import check_options

    check_options(task)
    try:
        data = load_task_data(task, dirs, allow_download=not offline)
    except DataNotFound as exc:
        return {"task": task.id, "loaded": False, "reason": str(exc).split(": ", 2)[-1]}
    splits = {}
    for split, examples in data.splits.items():
        if task.type == "ner":
            counts = Counter(kind for ex in examples for kind, _, _ in entity_spans(ex["tags"]))
            size = {"sentences": len(examples), "words": sum(len(ex["tokens"]) for ex in examples),
                    "entities": sum(counts.values())}
        else:
            counts = Counter(ex["label"] for ex in examples)
            size = {"examples": len(examples)}
        expected = task.splits[split].num_examples
        splits[split] = {**size, "labels": {k: counts[k] for k in task.labels if counts.get(k)},
                         "absent": [k for k in task.labels if not counts.get(k)], "file": str(data.files[split]),
                         "expected": expected, "mismatch": expected is not None and expected != len(examples),
                         "notes": dict(sorted(data.notes[split].items()))}
    return {"task": task.id, "loaded": True, "type": task.type, "format": task.format,
            "label_scheme": task.label_scheme, "metric": task.metric, "splits": splits}


def _print_check(record: dict) -> None:
    if not record["loaded"]:
        print(f"{record['task']}: skipped, data not found ({record['reason']})")
        return
    print(f"{record['task']} ({record['type']}, {record['format']}, {record['label_scheme']}, "
          f"metric {record['metric']})")
    for split, info in record["splits"].items():
        size = (f"{info['sentences']:>6} sentences, {info['words']:>7} words, {info['entities']:>6} entities"
                if "sentences" in info else f"{info['examples']:>6} examples")
        labels = ", ".join(f"{k} {n}" for k, n in info["labels"].items()) or "(none)"
        absent = f"  absent: {', '.join(info['absent'])}" if info["absent"] else ""
        flag = f"  MISMATCH: task.yaml says {info['expected']}" if info["mismatch"] else ""
        print(f"  {split:5s} {size}  [{labels}]{absent}{flag}")
        print(f"        {info['file']}")
        for note, n in info["notes"].items():
            print(f"        {n} x {note}")


def cmd_tasks_check(args: argparse.Namespace) -> int:
    """Load every task whose data can be found; print split sizes and label sets. A malformed file raises.
    Exit 1 when a split's size differs from its task.yaml."""
    from scaling_study.tasks.data import mirror_dirs

    registry = _registry(args)
    _known(registry, args.ids, "check")
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise UserError(f"--data-dir {args.data_dir}: no such folder; allowed: a folder holding one folder per "
                        "task id with its split files")
    dirs = mirror_dirs(args.data_dir)
    if args.format != "json":
        print(f"Data folders: {', '.join(map(str, dirs)) or '(none)'}; then the download cache"
              + (" (offline: no downloads)" if args.offline else ""))
    records = []
    for tid in args.ids or sorted(registry.tasks):
        records.append(_check_task(registry.tasks[tid], dirs, offline=args.offline))
        if args.format != "json":
            _print_check(records[-1])
    mismatched = [f"{r['task']}/{split}" for r in records if r["loaded"]
                  for split, info in r["splits"].items() if info["mismatch"]]
    if args.format == "json":
        _dump_json({"data_dirs": [str(d) for d in dirs], "tasks": records})
    else:
        loaded = sum(r["loaded"] for r in records)
        print(f"{loaded} task(s) loaded, {len(records) - loaded} skipped (no data)"
              + (f", split sizes differ from task.yaml: {', '.join(mismatched)}" if mismatched else ""))
    return 1 if mismatched else 0


def cmd_presets(args: argparse.Namespace) -> int:
    from scaling_study.models import count_parameters, load_corpus_rates, load_devices, load_presets

    if args.vocab_size < 1:
        raise UserError(f"--vocab-size {args.vocab_size}: must be positive; allowed: an integer >= 1, e.g. 30522")
    print(f"Model sizes (parameters of the MLM model at vocab {args.vocab_size:,}):")
    for name, p in load_presets().items():
        print(f"  {name:8s} {p.num_layers:3d} layers, hidden {p.hidden_size:5d}, {p.num_heads:3d} heads, "
              f"FFN {p.ffn_size:5d}: {_si(count_parameters(p, args.vocab_size)):>7s}  {p.description}")
    print("Devices:")
    for name, d in load_devices().items():
        print(f"  {name:5s} {_si(d.peak_flops, 'FLOP/s'):>13s} {d.peak_precision}, assumed MFU {d.assumed_mfu:.2f}: "
              f"{d.description}")
    print("Corpus build rates (bytes of text per CPU core-second):")
    for name, r in load_corpus_rates().items():
        print(f"  {name}: scan {_bytes(r.scan_rate)}/s, pack {_bytes(r.pack_rate)}/s, tokenizer training "
              f"{_bytes(r.train_rate)}/s: {r.source}")
    return 0


def cmd_spec_reference(args: argparse.Namespace) -> int:
    from scaling_study.spec import spec_reference_markdown

    sys.stdout.write(spec_reference_markdown())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scaling_study import studies
    from scaling_study.artifacts import Layout
    from scaling_study.lifecycle import check_free
    from scaling_study.orchestration import prepare, run_study
    from scaling_study.raycluster import check_local_resources
    from scaling_study.spec import check_local_paths, load_spec
    from scaling_study.studystate import quiet_terminal

    study = load_spec(args.spec)
    check_free(Layout.of(study).root)  # a second driver learns it now, not after the input checks
    check_local_paths(study)
    check_local_resources(study, args.address)
    prepared = prepare(study)
    studies.check(study, prepared.layout, extend=args.extend)  # before any input is read or anything written
    _check_inputs(prepared)
    for nid, why in prepared.damaged.items():
        node = prepared.plan.nodes[nid]
        print(f"scaling-study: warning: {node.kind} {nid} ({prepared.layout.rel(prepared.plan, node)}) is damaged: "
              f"{why}; it is computed again", file=sys.stderr)
    log = prepared.layout.root / "logs" / "driver.log"
    # on a terminal, only the live table: Ray's and Tune's notices go to the study's log
    with quiet_terminal(log, enabled=sys.stdout.isatty()) as quiet:
        summary = run_study(study, address=args.address, progress=not args.quiet, prepared=prepared,
                            extend=args.extend)
    console = Console(soft_wrap=True)
    done = {k: f"{v['done']}/{sum(v.values())}" for k, v in summary.counts.items()}
    console.print(f"[bold]{summary.study}[/bold]: {summary.seconds / 60:.1f} min, {summary.trained} nodes computed; "
                  f"done: corpus {done['corpus']}, pretrain {done['pretrain']}, checkpoints {done['checkpoint']}, "
                  f"finetune jobs {done['finetune']}")
    console.print(f"Storage: {summary.root}" + (f"   Ray and Tune messages: {quiet}" if quiet else ""))
    _print_failures(console, summary.failures)
    # the embedded server stops with this command: say how to open the UI, not where it was
    name = _study_name(study, prepared.layout)
    tracked = studies.tracking_uri(study)
    console.print(f"Tracking: {summary.tracking_uri}   " if tracked else "", end="")
    if summary.stopped:
        console.print(f"[red]STOPPED[/red]: {summary.stopped.reason} (exit {summary.exit_code}); "
                      f"run it again to finish: scaling-study run {args.spec}")
    console.print(f"UI: scaling-study ui {name}   Results: scaling-study results {name}   "
                  f"Report: scaling-study report {name}")
    return summary.exit_code


def _print_failures(console, failures) -> None:
    blocked: dict[str, int] = {}
    for f in failures:
        if f.reason.startswith("not run"):
            blocked[f"{f.reason}  log: {f.log}"] = blocked.get(f"{f.reason}  log: {f.log}", 0) + 1
        else:
            console.print(f"[red]FAILED[/red] {f.kind} {f.node} ({f.what}): {f.reason}" + (f"  log: {f.log}" if f.log else ""))
    for reason, count in blocked.items():
        console.print(f"[yellow]blocked[/yellow] {count} nodes, {reason}")


def _study_name(study, layout) -> str:
    """The study's name where a bare name finds this study (`studies.root_of`), else its spec file."""
    from scaling_study import studies
    from scaling_study.artifacts import Layout

    name = study.spec.name
    with contextlib.suppress(UserError):
        if Layout.named(name, studies.root_of(name, None)).store.location == layout.store.location:
            return name
    return study.file


def _check_inputs(prepared) -> None:
    """Bad corpus files, task data and external model sources stop `run` here, before anything is
    started or written."""
    from scaling_study.artifacts import external_source
    from scaling_study.corpus import check_corpus
    from scaling_study.tasks.data import check_task_data

    plan, done = prepared.plan, prepared.done
    for model in plan.of_kind("external"):  # a missing folder or a source that reads two ways
        external_source(prepared.study, model.inputs["source"])
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

        with _writing(output):
            Path(output).write_text(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)


def _check_output(output: str | None) -> None:
    """An -o FILE that cannot be written is refused before any work (a folder there, no folder for it)."""
    from scaling_study.errors import output_problem

    problem = output_problem(output) if output else None
    if problem:
        raise UserError(f"-o {output}: {problem}; allowed: a file path in an existing folder")


@contextlib.contextmanager
def _writing(output: str):
    try:
        yield
    except OSError as exc:  # a full disk, a read-only folder
        raise UserError(f"-o {output}: cannot write it ({exc.strerror or exc}); allowed: a writable file path") \
            from None


def cmd_results(args: argparse.Namespace) -> int:
    from scaling_study import results
    from scaling_study.errors import UserError

    if args.format == "parquet" and not args.output:
        raise UserError("--format parquet: needs -o FILE (Parquet is binary); allowed: -o results.parquet, "
                        "or --format table|csv|json for stdout")
    _check_output(args.output)
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
        with _writing(args.output):
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

    _note_reaped(_layout(args.study, args.root).root)
    table = results.status(args.study, tracking_uri=args.tracking_uri, root=args.root)
    if args.format == "json":  # {kind: {status: count}}
        _dump_json({row["kind"]: {k: int(v) for k, v in row.items() if k != "kind"}
                    for row in table.to_dict(orient="records")})
    else:
        print(table.to_string(index=False))
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
        if args.format == "json":
            _dump_json([])
        else:
            print(f"no study jobs{' of ' + name if name else ''} on {client.get_address()}")
        return 0
    import pandas as pd

    df = pd.DataFrame(rows)
    df["started"] = pd.to_datetime(df.pop("start_time"), unit="ms").dt.strftime("%Y-%m-%d %H:%M")
    df["seconds"] = df["seconds"].map(lambda s: "" if s is None or s != s else f"{s:.0f}")
    df = df[["submission_id", "study", "status", "started", "seconds", "message"]]
    if args.format == "json":
        _dump_json(df.to_dict(orient="records"))
    else:
        print(df.to_string(index=False))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaling_study.spec import load_spec
    from scaling_study.submit import TERMINAL, connect, follow, submit

    study = load_spec(args.spec)  # bad input fails here, before anything reaches the cluster
    client = connect(args.address)
    root = Path(args.working_dir) if args.working_dir else None
    job = submit(client, study, root=root, tracking_uri=args.tracking_uri, retry=args.retry, extend=args.extend)
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


def _layout(study: str, root: str):
    """The study's storage layout, from its name (under `root`, a folder or URI) or its spec file."""
    return _located(study, root)[0]


def _located(study: str, root: str):
    """(storage layout, MLflow experiment) of a study given by name or spec file; a spec is read once."""
    from scaling_study.artifacts import Layout

    if study.endswith((".yaml", ".yml")):
        from scaling_study.spec import load_spec

        loaded = load_spec(study)
        return Layout.of(loaded), loaded.spec.tracking.experiment or loaded.spec.name
    from scaling_study import studies

    return Layout.named(study, studies.root_of(study, root)), study  # the name is checked there: no `../`


def _note_reaped(folder) -> None:
    """After a SIGKILLed driver: end what it left running (its MLflow server, its local Ray), and say so."""
    from scaling_study.lifecycle import reap_if_free

    ended = reap_if_free(folder)
    if ended:
        print(f"scaling-study: note: ended what a killed driver of this study left running: {', '.join(ended)}",
              file=sys.stderr)


def cmd_ui(args: argparse.Namespace) -> int:
    from scaling_study.artifacts import pull_tracking
    from scaling_study.lifecycle import StudyLock
    from scaling_study.tracking import LocalMlflowServer, check_sqlite_store

    layout, experiment = _located(args.study, args.root)
    live = LocalMlflowServer.live(layout.mlflow)
    if live:  # a running study's server: open it, never start a second one over its store
        return _attach_ui(args.study, live)
    folder = pull_tracking(layout)  # an object-store root: the db the driver uploaded, downloaded here
    db = folder / "mlflow.db"
    if not db.exists():
        raise UserError(f"ui: no tracking database at {db}; allowed: a study run with the "
                        "embedded server (scaling-study run), or --root for another storage root")
    check_sqlite_store(db, f"sqlite:///{db}")  # an empty file would be made a store, a damaged one fail later
    with StudyLock(layout.root, "ui") as lock, \
            LocalMlflowServer(folder, port=args.port, on_start=lock.own) as server:
        page = _runs_page(server.uri, experiment)
        try:  # from the line on: a Ctrl-C that comes as soon as it is read still ends here (exit 0)
            print(f"MLflow UI for {args.study}: {page}  (Ctrl-C to stop)", flush=True)
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def _attach_ui(study: str, live: dict) -> int:
    from scaling_study.tracking import LocalMlflowServer

    try:  # the line inside: a Ctrl-C as soon as it is read ends here too
        print(f"MLflow UI for {study}: {live['uri']}  (the server of process {live.get('owner')}, which runs the "
              "study; it stops with it; Ctrl-C here leaves it running)", flush=True)
        while LocalMlflowServer.live_pid(live):
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    print(f"scaling-study: the MLflow server of {study} stopped (its run ended); `scaling-study ui {study}` "
          "serves the store again", file=sys.stderr)
    return 0


def _runs_page(uri: str, experiment: str) -> str:
    """The experiment's runs table in the UI (`records.ui_url`), else the server's front page."""
    from mlflow.tracking import MlflowClient

    from scaling_study.records import ui_url

    with contextlib.suppress(Exception):
        found = MlflowClient(uri).get_experiment_by_name(experiment)
        if found is not None:
            return ui_url(uri, found.experiment_id)
    return uri


def _verb(sub, name: str, func, help: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A verb's parser: a one-line `help` for the verb list, a `description` and `examples` for its --help."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 100), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _study_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("study", nargs="?" if optional else None,
                   help="a study's name, or its spec file (then its storage.root and tracking.uri apply)")
    p.add_argument("--root", default=None,
                   help="storage root holding the study: a folder, or an s3://, gs:// or file:// URI (default: "
                        "./studies when the study is there, else the root it last ran under, from the user's "
                        "index; see `scaling_study.studies`)")
    p.add_argument("--tracking-uri", default=None,
                   help="read the runs from this MLflow server (default: the spec's tracking.uri, then "
                        "$MLFLOW_TRACKING_URI, then the embedded server's database in the study's folder)")


def _format_arg(p: argparse.ArgumentParser, choices=("table", "json")) -> None:
    p.add_argument("--format", choices=choices, default=choices[0],
                   help=f"output format: {', '.join(choices)} (default {choices[0]})")


def _plan_and_run(sub) -> None:
    p = _verb(sub, "plan", cmd_plan, "show a study's plan and cost before anything runs",
              "Expand a study spec into its plan (corpus builds, pretraining runs, checkpoints, finetune jobs) and "
              "estimate its FLOPs, device-hours, corpus-build CPU-hours and storage. Writes nothing.",
              ["scaling-study plan experiments/smoke.yaml --device cpu",
               "scaling-study plan experiments/scholarbert.yaml --device a100 --mfu 0.35 --cpus 256",
               "scaling-study plan experiments/smoke.yaml --format json --nodes > plan.json"])
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--device", default="h100", help="device for the estimate: h100, h200, a100, cpu (default h100; "
                   "`scaling-study presets` lists them)")
    p.add_argument("--mfu", type=float, default=None, help="override the device's assumed MFU (0-1)")
    cpus = p.add_mutually_exclusive_group()
    cpus.add_argument("--cpus", type=int, default=None,
                      help="CPUs the corpus builds spread over (default: this machine's)")
    cpus.add_argument("--address", default=None,
                      help="a Ray cluster (as `run --address`): its CPUs now, for the corpus builds' wall time")
    _format_arg(p)
    p.add_argument("--nodes", action="store_true", help="with --format json: include every node of the DAG")

    p = _verb(sub, "run", cmd_run, "run a study on Ray (local by default), tracked in MLflow; idempotent",
              "Run every unfinished node of a study's plan: corpus builds, pretraining (Ray Train), finetuning "
              "(Ray Tune), each tracked as an MLflow run. A finished study trains nothing; an interrupted one "
              "resumes. A study's name is its identity: a different spec under a name already run is refused "
              "unless --extend. On a terminal only the live table shows; Ray's and Tune's messages go to "
              "<root>/<study>/logs/driver.log. Exit 1 when a node failed, 2 for bad input.",
              ["scaling-study run experiments/smoke.yaml",
               "scaling-study run experiments/x.yaml --address ray://head:10001",
               "scaling-study run experiments/smoke-more-seeds.yaml --extend"])
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--quiet", action="store_true", help="no live view of the grid")
    p.add_argument("--extend", action="store_true",
                   help="this spec extends the study of the same name (more seeds, tasks, levels): record it "
                        "beside the study's first spec instead of refusing it")


def _results_verb(sub) -> None:
    p = _verb(sub, "results", cmd_results, "a study's finetune results from MLflow: one row per job, filters, pivots",
              "Print one row per finished finetune job (model x task x epochs x seed), read from MLflow and cached "
              "as Parquet in the study's folder. --pivot prints the paper table's definition for any two columns.",
              ["scaling-study results smoke", "scaling-study results smoke --pivot task model",
               "scaling-study results smoke --where task=scierc_re --where model_size=tiny,base --format json",
               "scaling-study results experiments/smoke.yaml --format parquet -o smoke.parquet"])
    _study_args(p)
    p.add_argument("--pivot", nargs=2, metavar=("ROW", "COL"), default=None,
                   help="a ROW x COL table of --value: mean over seeds, every other factor at its largest level, "
                        "scores in points (the report's table is --pivot task model)")
    p.add_argument("--value", default="test_f1", help="the column --pivot averages (default test_f1)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=V1[,V2]",
                   help="keep rows whose COLUMN is one of the values; repeat for more columns "
                        "(e.g. --where task=scierc_re --where model_size=tiny,base)")
    _format_arg(p, ("table", "csv", "json", "parquet"))
    p.add_argument("--output", "-o", default=None, help="write to this file instead of stdout (parquet needs it)")
    p.add_argument("--no-refresh", action="store_true",
                   help="read the results cache (<root>/<study>/cache/) only; do not ask MLflow")
    p.add_argument("--include-collapsed", action="store_true", help="--pivot counts collapsed runs too")

    p = _verb(sub, "report", cmd_report, "a study's results as one self-contained HTML page (tables, plots, verdicts)",
              "Write one HTML page: a summary of where scaling paid, the paper's table, collapsed shares, F1 "
              "against each factor with 95% bands, verdicts, power-law fits and loss curves; the figures also as "
              "SVG and 300-dpi PNG beside it (report-figures/).",
              ["scaling-study report smoke", "scaling-study report smoke -o smoke.html --threshold 0.5"])
    _study_args(p)
    p.add_argument("--output", "-o", default=None, help="HTML file to write (default: ROOT/STUDY/report.html)")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="F1 points a step of a factor must surely buy to count as a gain (default 1.0, the paper's)")
    p.add_argument("--include-collapsed", action="store_true",
                   help="count collapsed runs in the table, verdicts and fits (left out by default)")

    p = _verb(sub, "status", cmd_status, "a study's MLflow runs by kind and status; with --address, its Ray jobs",
              "Count a study's MLflow runs by node kind and status (RUNNING, FINISHED, FAILED, KILLED); with "
              "--address, list the study jobs on a Ray cluster instead.",
              ["scaling-study status smoke", "scaling-study status smoke --format json",
               "scaling-study status --address http://127.0.0.1:8265"])
    _study_args(p, optional=True)
    p.add_argument("--address", default=None,
                   help="a Ray cluster's dashboard URL: list the study jobs there (all of them without STUDY)")
    _format_arg(p)


def _cluster_verbs(sub) -> None:
    """A Ray cluster and the MLflow UI: submit, ui."""
    p = _verb(sub, "submit", cmd_submit, "run a study on a Ray cluster as a Ray job; idempotent",
              "Submit `scaling-study run SPEC` as a Ray job (this source checkout as its working directory). "
              "Submitting the same study again attaches to its job; a changed spec is a new job. See docs/cluster.md.",
              ["scaling-study submit experiments/scholarbert.yaml --address http://127.0.0.1:8265 --follow",
               "scaling-study submit experiments/x.yaml --retry"])
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 if it fails")
    p.add_argument("--tracking-uri", default=None,
                   help="log to this MLflow server instead of the spec's tracking.uri (as seen from the cluster; "
                        "'${MLFLOW_TRACKING_URI}' expands there)")
    p.add_argument("--retry", action="store_true", help="start a new attempt if the study's last job failed or stopped")
    p.add_argument("--extend", action="store_true", help="the job runs with --extend (see `run --help`)")
    p.add_argument("--working-dir", default=None,
                   help="folder uploaded as the job's working directory (default: this source checkout)")

    p = _verb(sub, "ui", cmd_ui, "serve the MLflow UI over a study run with the embedded server",
              "Start an MLflow server on 127.0.0.1 over the study's embedded tracking database and keep it until "
              "Ctrl-C. The experiment opens on its runs table: one run per node, nested study > pretraining "
              "run > finetune job.",
              ["scaling-study ui smoke", "scaling-study ui experiments/smoke.yaml --port 5001",
               "scaling-study ui smoke --root s3://bucket/studies"])
    p.add_argument("study", help="a study's name, or its spec file")
    p.add_argument("--root", default=None, help="storage root holding the study: a folder or an s3://, gs:// URI "
                   "(default: ./studies when the study is there, else the root it last ran under)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")


def _tasks_verbs(sub) -> None:
    tasks = sub.add_parser("tasks", help="the task registry: list, show, check", allow_abbrev=False,
                           description="The downstream tasks: one folder each (task.yaml and a README card).",
                           epilog="examples:\n  scaling-study tasks list\n  scaling-study tasks show scierc_re\n"
                                  "  scaling-study tasks check --data-dir ../shared/datasets",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")

    def registry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry-path", action="append", default=[], metavar="DIR",
                       help="extra folder of task folders (<DIR>/<id>/task.yaml); repeat for more")
        _format_arg(p)

    p = _verb(actions, "list", cmd_tasks_list, "every task and suite",
              "List every task (id, type, domain, metric, name, suites) and every suite.",
              ["scaling-study tasks list", "scaling-study tasks list --format json",
               "scaling-study tasks list --registry-path my_tasks"])
    registry(p)
    p = _verb(actions, "show", cmd_tasks_show, "one or more tasks in full",
              "Show tasks in full: description, format, labels, splits with sizes and URLs, folder.",
              ["scaling-study tasks show scierc_re", "scaling-study tasks show bc5cdr_ner chemprot_re --format json"])
    p.add_argument("ids", nargs="+", help="task ids")
    registry(p)
    p = _verb(actions, "check", cmd_tasks_check, "load each task's data: sizes and labels",
              "Load each task's data from the local mirrors (then the download cache): split sizes, label counts, "
              "reader notes. Exit 1 when a split's size differs from its task.yaml.",
              ["scaling-study tasks check --data-dir ../shared/datasets",
               "scaling-study tasks check scierc_re --offline --format json"])
    p.add_argument("ids", nargs="*", help="task ids (default: all)")
    registry(p)
    p.add_argument("--data-dir", default=None,
                   help="local mirror, <DIR>/<task id>/<file> (then $SCALING_STUDY_DATA_DIR, then the cache)")
    p.add_argument("--offline", action="store_true", help="never download; use mirrors and the cache only")


def _registry_verbs(sub) -> None:
    """Specs, tasks and presets: validate, tasks, spec-reference, presets."""
    p = _verb(sub, "validate", cmd_validate, "check study specs; write nothing",
              "Validate study specs and expand their plans; one line per problem (FILE:LINE: FIELD: ...), exit 2.",
              ["scaling-study validate experiments/*.yaml"])
    p.add_argument("specs", nargs="+", help="study spec files (YAML)")
    _tasks_verbs(sub)
    _verb(sub, "spec-reference", cmd_spec_reference, "every spec field with its type, default and meaning (Markdown)",
          "Print every study spec field, its type, default and documentation, as Markdown (docs/spec.md).",
          ["scaling-study spec-reference > docs/spec.md"])
    p = _verb(sub, "presets", cmd_presets, "model-size presets, devices and corpus build rates",
              "List the model-size presets (layers, hidden size, heads, FFN, exact parameter count of the MLM model), "
              "the devices `plan` can cost and the per-core rates it costs corpus builds with.",
              ["scaling-study presets", "scaling-study presets --vocab-size 50000"])
    p.add_argument("--vocab-size", type=int, default=30522,
                   help="vocabulary size the parameter counts assume (default 30522, BERT's; ScholarBERT: 50000)")


def build_parser() -> argparse.ArgumentParser:
    from scaling_study import __version__

    parser = argparse.ArgumentParser(prog="scaling-study", description=__doc__.split("\n\n")[0],
                                     epilog="`scaling-study COMMAND --help` describes a command, with examples.")
    parser.add_argument("--version", action="version", version=f"scaling-study {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _plan_and_run(sub)
    _results_verb(sub)
    _cluster_verbs(sub)
    _registry_verbs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from scaling_study.lifecycle import Stopped, stop_on_signals

    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM, SIGHUP: `with` blocks stop their servers on the way out
            return args.func(args)
    except Stopped as stop:
        print(f"scaling-study: {stop.reason}", file=sys.stderr)
        return stop.exit_code
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
