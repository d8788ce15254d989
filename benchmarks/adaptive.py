"""Adaptive seeds against the fixed grid at `max` seeds, on synthetic studies with known effects.

    .venv/bin/python benchmarks/adaptive.py                       # the paper's grid, 20 synthetic studies
    .venv/bin/python benchmarks/adaptive.py --spec experiments/smoke.yaml --studies 50
    .venv/bin/python benchmarks/adaptive.py --max 10 --futility 0  # the rule without futility stops

Each synthetic study takes the spec's plan (its cells, seed groups and comparisons, as the study
driver sees them: `adaptive.design_from_plan`), draws true cell means with effects around the
threshold (`adaptive.synthetic_truth`) and every seed's score up to `max` with seed noise by task
type (`adaptive.synthetic_draw`: sd 0.7 points for NER, 2.0 for relation and sentence tasks). The
adaptive rule (`adaptive.simulate`) then sees the first seeds of those same draws, in waves; the
fixed grid sees all `max` seeds of every cell, with `analysis.compare`'s 95% interval (what
`diminishing_returns` reports). Printed: finetune jobs (result cells) each spent, the share of
comparisons whose verdicts are identical, and wrong verdicts (a verdict the true change
contradicts: a significant gain where it is at most the threshold, a gain below the threshold
where it is at least the threshold, a significant loss where it is at least minus the threshold)
as a share of all comparisons, against the nominal 1 - confidence. Goal (issue 18): at least 40%
fewer jobs, at least 95% identical verdicts, wrong verdicts within the nominal rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def truth_of(comparison, truth: dict) -> float:
    return truth[comparison.cells[1]] - truth[comparison.cells[0]]


def wrong(verdict: str, change: float, threshold: float) -> bool:
    return ((verdict == "significant gain" and change <= threshold)
            or (verdict == "gain below threshold" and change >= threshold)
            or (verdict == "significant loss" and change >= -threshold))


def fixed_verdicts(design, scores: dict, rule, confidence: float = 0.95) -> list[str]:
    """The fixed grid's verdict of each comparison: every seed up to `max`, 95% paired t."""
    from scaling_study import analysis

    out = []
    seeds = list(range(rule.max))
    for comp in design.comparisons:
        lo, hi = ([scores[design.group_of[c]][s][c][0] for s in seeds] for c in comp.cells)
        iv = analysis.compare(lo, hi, before_seeds=seeds, after_seeds=seeds, confidence=confidence)
        out.append(analysis.verdict(iv, rule.threshold))
    return out


def one_study(design, rule, rng, *, centre: float = 0.3, spread: float = 1.2, seed_sd: dict | None = None) -> dict:
    from scaling_study import adaptive

    truth = adaptive.synthetic_truth(design, rng, rule.threshold, centre=centre, spread=spread)
    draw = adaptive.synthetic_draw(design, truth, rng, seed_sd)
    scores = {g: {s: draw(g, s) for s in range(rule.max)} for g in design.groups}
    waves = adaptive.simulate(design, rule, lambda g, s: scores[g][s])
    got = waves.comparisons()["verdict"].tolist()
    fixed = fixed_verdicts(design, scores, rule)
    changes = [truth_of(c, truth) for c in design.comparisons]
    cells_per_group = design.cells.groupby("group", sort=False).size().to_dict()
    return {"jobs_adaptive": sum(k * cells_per_group[g] for g, k in waves.seeds_run().items()),
            "jobs_fixed": rule.max * len(design.cells), "comparisons": len(got),
            "identical": sum(a == b for a, b in zip(got, fixed)),
            "wrong_adaptive": sum(wrong(v, d, rule.threshold) for v, d in zip(got, changes)),
            "wrong_fixed": sum(wrong(v, d, rule.threshold) for v, d in zip(fixed, changes)),
            "settled_adaptive": sum(v in adaptive.SETTLED for v in got),
            "settled_fixed": sum(v in adaptive.SETTLED for v in fixed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(REPO / "experiments" / "scholarbert.yaml"),
                        help="whose plan the synthetic studies take (default: the paper's grid)")
    parser.add_argument("--studies", type=int, default=20, help="synthetic studies (default 20)")
    parser.add_argument("--min", type=int, default=2)
    parser.add_argument("--max", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--futility", type=float, default=None, help="default: the spec field's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from scaling_study import adaptive
    from scaling_study.grid import expand
    from scaling_study.spec import spec_from_data
    from scaling_study.yamlio import read_yaml

    data, _ = read_yaml(args.spec)
    rule = {"min": args.min, "max": args.max, "threshold": args.threshold, "confidence": args.confidence}
    if args.futility is not None:
        rule["futility"] = args.futility
    data["finetune"]["seeds"] = {"adaptive": rule}
    study = spec_from_data(data, args.spec)
    rule = study.spec.finetune.adaptive
    design = adaptive.design_from_plan(study, expand(study))
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = [one_study(design, rule, rng) for _ in range(args.studies)]
    total = {k: sum(r[k] for r in rows) for k in rows[0]}
    n = total["comparisons"]
    print(f"{args.studies} synthetic studies on the plan of {Path(args.spec).name}: {len(design.groups)} seed groups, "
          f"{len(design.cells)} cells, {len(design.comparisons)} comparisons each; rule min {rule.min}, max "
          f"{rule.max}, threshold {rule.threshold:g}, confidence {rule.confidence:g}, futility {rule.futility:g} "
          f"({time.perf_counter() - start:.0f} s)")
    print()
    print("| | fixed grid, max seeds | adaptive |")
    print("|---|---|---|")
    print(f"| finetune jobs (per study) | {total['jobs_fixed'] / args.studies:,.0f} | "
          f"{total['jobs_adaptive'] / args.studies:,.0f} ({1 - total['jobs_adaptive'] / total['jobs_fixed']:.0%} fewer) |")
    print(f"| comparisons settled | {total['settled_fixed'] / n:.1%} | {total['settled_adaptive'] / n:.1%} |")
    print(f"| verdicts identical to the fixed grid's | | {total['identical'] / n:.1%} |")
    print(f"| wrong verdicts (nominal <= {1 - rule.confidence:.0%}) | {total['wrong_fixed'] / n:.2%} | "
          f"{total['wrong_adaptive'] / n:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
