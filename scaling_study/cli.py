"""The `scaling-study` command line: thin verbs over library functions.

    scaling-study plan experiments/smoke.yaml                  # cells, FLOPs, device-hours, storage
    scaling-study plan experiments/scholarbert.yaml --device a100 --format json
    scaling-study validate experiments/*.yaml                   # check specs, write nothing
    scaling-study tasks list | scaling-study tasks show scierc_re
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
    from rich.table import Table

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
        if args.nodes:
            report["nodes"] = plan.to_dict()["nodes"]
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    console = Console(width=max(Console().width, 120), soft_wrap=True)  # prose unwrapped; tables fit the width
    dev = report["device"]
    c = report["counts"]
    console.print(f"[bold]Study {study.spec.name}[/bold]  ({args.spec})")
    if study.spec.description:
        console.print(study.spec.description.strip())
    console.print(
        f"{c['corpus']} corpus builds, {c['pretrain']} pretraining runs, {c['checkpoint']} checkpoints, "
        f"{c['external']} external models, {len(study.tasks)} tasks, "
        f"{c['finetune_run']} finetune runs -> {c['finetune']} finetune jobs (result cells)")
    if report["corpus"]:
        console.print(f"Corpus: {_si(report['corpus']['tokens'])} tokens ({report['corpus']['source']})")

    if report["pretrain_runs"]:
        table = Table(title="Pretraining runs", title_justify="left")
        for col in ("size", "params", "volume", "volume tokens", "steps", "checkpoints at", "tokens",
                    "epochs", "train FLOPs", f"{dev['name']}-hours"):
            table.add_column(col, justify="left" if col in ("size", "volume", "checkpoints at") else "right")
        for r in report["pretrain_runs"]:
            table.add_row(r["model_size"], _si(r["parameters"]), r["data_volume"], _si(r["volume_tokens"]),
                          f"{r['steps']:,}", ", ".join(f"{s:,}" for s in r["checkpoints"]), _si(r["tokens"]),
                          f"{r['epochs_over_data']:.2g}" if r["epochs_over_data"] else "?",
                          f"{r['flops']:.3g}", _hours(r["device_hours"]))
        console.print(table)

    table = Table(title="Finetune jobs per task", title_justify="left")
    for col in ("task", "type", "train ex.", "test ex.", "runs", "jobs", "train FLOPs", f"{dev['name']}-hours"):
        table.add_column(col, justify="left" if col in ("task", "type") else "right")
    for r in report["finetune_by_task"]:
        if r["flops_unknown"] == r["runs"]:
            flops = hours = "?"
        else:
            unknown = " (+?)" if r["flops_unknown"] else ""
            flops, hours = f"{r['flops']:.3g}{unknown}", _hours(r["device_hours"]) + unknown
        table.add_row(r["task"], r["type"], _si(r["train_examples"]), _si(r["test_examples"]), str(r["runs"]),
                      str(r["jobs"]), flops, hours)
    console.print(table)

    t, s = report["totals"], report["storage"]
    console.print(f"[bold]Totals[/bold]: {t['flops']:.3g} FLOPs = {_hours(t['device_hours'])} {dev['name']}-hours "
                  f"(pretraining {_hours(t['pretrain_device_hours'])}, finetuning {_hours(t['finetune_device_hours'])})")
    if t["finetune_jobs_without_flops"]:
        console.print(f"  {t['finetune_jobs_without_flops']} finetune runs not costed (unknown split sizes or "
                      "external models without num_parameters)")
    console.print(f"Storage: checkpoints {_bytes(s['checkpoint_weights_bytes'])} weights + "
                  f"{_bytes(s['checkpoint_optimizer_bytes'])} optimizer state, corpus shards "
                  f"<= {_bytes(s['corpus_shards_bytes'])}; total {_bytes(s['total_bytes'])}")
    console.print(
        f"Assumed: {dev['name']} ({dev['description']}) at {_si(dev['peak_flops'], 'FLOP/s')} {dev['peak_precision']} "
        f"peak x MFU {dev['assumed_mfu']:.2f} = {_si(dev['throughput_flops'], 'FLOP/s')}. FLOPs count every matmul "
        "of the forward and backward pass (3x forward): the encoder on every token, the MLM head only at masked "
        "positions; finetuning at max_seq_len per example plus dev/test scoring.")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from scaling_study import __version__

    parser = argparse.ArgumentParser(prog="scaling-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"scaling-study {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="show a study's plan and cost before anything runs")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--device", default="h100", help="device for the estimate: h100, h200, a100, cpu (default h100)")
    p.add_argument("--mfu", type=float, default=None, help="override the device's assumed MFU (0-1)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--nodes", action="store_true", help="with --format json: include every node of the DAG")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("validate", help="check study specs; write nothing")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("tasks", help="the task registry")
    p.add_argument("action", choices=("list", "show"))
    p.add_argument("ids", nargs="*", help="task ids (show)")
    p.add_argument("--registry-path", action="append", default=[], help="extra folder of task folders")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("spec-reference", help="every spec field with its type, default and meaning (Markdown)")
    p.set_defaults(func=cmd_spec_reference)

    p = sub.add_parser("presets", help="model-size presets and devices")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.set_defaults(func=cmd_presets)
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


if __name__ == "__main__":
    sys.exit(main())
