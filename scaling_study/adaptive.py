"""Adaptive seeds: give a cell more finetuning seeds only while one of its comparisons is unsettled.

    # spec: finetune.seeds: {adaptive: {min: 2, max: 10, threshold: 1.0, confidence: 0.95}}
    from scaling_study import adaptive
    design = adaptive.design_from_plan(study, plan)      # the cells, their seed groups, the comparisons
    waves = adaptive.SeedWaves(design, study.spec.finetune.adaptive)
    waves.record(group, seed, {cell: (f1_points, collapsed)})   # a finished finetune run
    waves.step()                                         # -> [(group, seed), ...] to run next
    waves.log()                                          # per wave: comparisons settled, groups given a seed
    adaptive.simulate(design, rule, draw)                # the same rule on synthetic scores (benchmarks, plan)
    seeds = adaptive.StudySeeds(study, plan, done_ids, read)   # the study driver's view: plan nodes, DONE.json

Seeds are numbered 0, 1, ...: a cell's seeds are always a prefix 0..k-1, and the plan holds every
seed up to `max` with the ids a fixed list of them has, so an adaptive study, run again or turned
into a fixed one, reuses every finished job. A *group* is what one seed of a finetune run buys:
its model, task and (with the `independent` protocol) epochs level; a *cell* is one result of it
(an epochs level). The comparisons are those `analysis.diminishing_returns` makes (consecutive
levels of model size, data volume, steps and epochs, everything else held fixed), between cells.

The rule, in waves: every group gets seeds 0..min-1. A comparison whose two groups both have
seeds 0..n-1 finished is judged at wave n (n from max(min, 3): a t interval needs 3 seeds) on
exactly those seeds, paired by seed (`analysis.compare`). It is *settled* when its verdict
(`analysis.verdict` against `threshold`) is "significant gain", "gain below threshold" or
"significant loss"; it is *futile* when the predictive chance that its interval at `max` seeds
settles it is below `futility` (`SeedWaves.chance_to_settle`: stopping without a verdict costs
no error, only seeds the study would spend on a comparison that stays inconclusive anyway); else
both its groups get seed n, until `max`. A group keeps getting seeds while any of its comparisons
is open, which is what bounds the saving in a full factorial: a group sits in 15-23 comparisons
along every factor, and at its last seed it is mostly one comparison, settled late, that held it
(`benchmarks/adaptive.py --bound`). A comparison that stopped asking (futile, or a gain below the
threshold whose interval still reaches below minus it) is still judged on the seeds both its groups
get for other comparisons: free seeds, which turn futile comparisons into settled ones and gains
below the threshold into significant losses where the fixed grid at `max` seeds would find them
(up to 3 points more identical verdicts on the benchmark, no seed more). Comparisons are judged as
results arrive, inside the running study (`searcher.ReadyFinetunes` asks `StudySeeds.release`
after every finished run), not after a barrier; a re-run replays the finished runs wave by wave and
takes the same decisions.

Honest statistics. Judging an interval after every wave and stopping at the first settled one
inflates the error rate of a fixed 95% interval (at a true change equal to the threshold, a naive
rule with looks at 3..10 seeds settles wrongly about 3 times as often as it should:
`tests/test_adaptive.py`). Here each wave n has its own, wider, level `look_confidences(...)[n]`,
from an alpha-spending schedule (Lan and DeMets 1983) with the power family alpha(n) = (1 -
confidence) x (n / max)^RHO: the chance that the interval misses the true change for the first
time at wave n is alpha(n) - alpha(n - 1), so the chance that any wave's interval misses is 1 -
confidence, and with it the chance of any wrong verdict, whatever the stopping rule. The levels
are exact for normal seed noise: the paired t statistics of waves 3..max have one joint law
whatever the change and the noise, so the boundaries are computed once from DRAWS simulated
sequences (seeded: the same levels on every machine). A comparison's verdict is that of the
intersection of its intervals so far (each covers with the joint guarantee, so their intersection
does). Collapsed runs are left out, as everywhere; a wave's interval then rests on fewer seeds
than its level was computed for, which the guarantee does not cover exactly (close while few
runs collapse).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Iterable

import numpy as np
import pandas as pd

from scaling_study import analysis

RHO = 1.0
"""Shape of the spending schedule: (n / max)^RHO of the error is spent by wave n. 1 spends about
evenly (Pocock-like: early stops easier, the last wave a little stricter than a fixed 95%); larger
values save more for the last waves (O'Brien-Fleming-like). On `benchmarks/adaptive.py`'s synthetic
studies 1 saved the most jobs for the same agreement with the fixed grid (0.7-6 tried)."""
DRAWS = 200_000
"""Simulated sequences behind the levels (the error they spend is within 0.001 of the nominal)."""
SETTLED = ("significant gain", "gain below threshold", "significant loss")


@functools.lru_cache(maxsize=32)
def look_confidences(first: int, last: int, confidence: float, rho: float = RHO, draws: int = DRAWS) -> dict[int, float]:
    """Wave n (first..last seeds) -> the two-sided level of its paired t interval (see the module docstring)."""
    from scipy.special import stdtr

    alpha = 1.0 - confidence
    rng = np.random.default_rng(20_231_018)
    x = rng.standard_normal((draws, last))
    n = np.arange(1, last + 1)
    mean = x.cumsum(axis=1) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        var = ((x**2).cumsum(axis=1) - n * mean**2) / (n - 1)
        t = np.abs(mean) * np.sqrt(n / var)
    alive = np.ones(draws, dtype=bool)
    out, spent = {}, 0
    for look in range(first, last + 1):
        k = round(alpha * (look / last) ** rho * draws) - spent  # sequences allowed to miss first here
        scores = t[alive, look - 1]
        c = math.inf if k <= 0 else float(np.partition(scores, len(scores) - k - 1)[len(scores) - k - 1])
        alive &= ~(t[:, look - 1] > c)
        spent = draws - int(alive.sum())
        out[look] = 1.0 if math.isinf(c) else float(2 * stdtr(look - 1, c) - 1)
    return out


# ----------------------------------------------------------------------------------- the design


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two cells at consecutive levels of a factor, everything else held fixed."""

    factor: str
    held: dict
    """The levels held fixed (task, model, ...), as `diminishing_returns` names them."""
    low: str
    """The smaller level."""
    high: str
    cells: tuple[Hashable, Hashable]
    """(cell at `low`, cell at `high`)."""

    @property
    def label(self) -> str:
        held = ", ".join(f"{analysis.FACTOR_NAMES.get(k, k)} {v}" for k, v in self.held.items()
                         if k not in ("task", "model_source"))
        return f"{self.held.get('task', '')}: {analysis.FACTOR_NAMES[self.factor]} {self.low} -> {self.high}" + (
            f" ({held})" if held else "")


@dataclasses.dataclass(frozen=True)
class Design:
    """What the rule works on: each cell's group, each group's label, the comparisons."""

    group_of: dict[Hashable, Hashable]
    """Cell -> its group (one finetune run per seed)."""
    labels: dict[Hashable, str]
    """Group -> a name for people ("tiny | 10% | 200 steps | scierc_re")."""
    comparisons: list[Comparison]
    cells: pd.DataFrame = dataclasses.field(repr=False, default_factory=pd.DataFrame)
    """The rows it was made from (`from_cells`)."""

    @classmethod
    def from_cells(cls, cells: pd.DataFrame) -> Design:
        """From one row per cell: the factor columns `results.load` has (model_source, model, model_size,
        data_volume, steps, epochs, task and the order columns parameters, tokens) plus `cell`,
        `group` and `label` (the group's)."""
        cells = cells.reset_index(drop=True).assign(_y=0.0)
        comparisons = []
        for factor in analysis.FACTOR_ORDER:
            if factor not in cells or cells[factor].notna().sum() < 2:
                continue
            data = cells[cells[factor].notna()].reset_index(drop=True)
            fixed = analysis.held_fixed(data, factor)
            for key, _, pairs in analysis.comparison_pairs(data, factor):
                held = {k: v for k, v in zip(fixed, key) if not pd.isna(v)}
                for (_, lo_name, lo), (_, hi_name, hi) in pairs:
                    comparisons.append(Comparison(factor, held, str(lo_name), str(hi_name),
                                                  (data["cell"].iat[lo[0]], data["cell"].iat[hi[0]])))
        return cls(dict(zip(cells["cell"], cells["group"])), dict(zip(cells["group"], cells["label"])), comparisons,
                   cells.drop(columns="_y"))

    @property
    def groups(self) -> list[Hashable]:
        return list(self.labels)


def design_from_plan(study, plan) -> Design:
    """The design of a study's plan: a group is (model node, task, total epochs), a cell adds the
    epochs level; factors as `results.load` will have them (parameters at the spec's vocabulary)."""
    from scaling_study.grid import cell_factors

    volumes = {v.label: v for v in study.volumes}
    vocab = study.spec.corpus.vocab_size if study.spec.corpus else None
    rows, first = [], study.spec.finetune.seed_levels[0]
    for cell in plan.of_kind("finetune"):
        run = plan.nodes[cell.parents[0]]
        if run.inputs["seed"] != first:
            continue
        model, f = plan.nodes[run.parents[0]], cell.factors
        group = (model.id, f["task"], run.inputs["total_epochs"])
        external = model.kind == "external"
        row = {"cell": (*group, f["epochs"]), "group": group, "model_source": "external" if external else "pretrained",
               "model": f["model"] if external else f"{f['model_size']} | {f['data_volume']}",
               "model_size": None if external else f["model_size"],
               "data_volume": None if external else f["data_volume"], "steps": f.get("steps"),
               "epochs": f["epochs"], "task": f["task"]}
        derived = cell_factors(study, plan, cell, vocab_size=vocab)
        row.update(parameters=derived.get("parameters"), task_type=derived["task_type"])
        if not external:
            volume = volumes[f["data_volume"]]
            row["tokens"] = volume.tokens or volume.fraction  # orders the volumes, as tokens would
        epochs = f" | {run.inputs['total_epochs']} ep" if study.spec.finetune.protocol == "independent" else ""
        row["label"] = f"{row['model']}" + (f" | {f['steps']} steps" if not external else "") + f" | {f['task']}{epochs}"
        rows.append(row)
    return Design.from_cells(pd.DataFrame(rows))


# ----------------------------------------------------------------------------------- the rule


@dataclasses.dataclass
class _Judged:
    """A comparison's state: its last wave, the intersection of its intervals, its verdict."""

    wave: int = 0
    low: float = -math.inf
    high: float = math.inf
    estimate: float = math.nan
    verdict: str = "too few seeds"
    settled_after: int | None = None
    futile_after: int | None = None
    """The wave after which more seeds were judged unlikely to settle it (`futility`)."""
    note: str = ""
    iv: analysis.Interval | None = None
    """This wave's own interval (before the intersection)."""

    @property
    def ended(self) -> bool:
        return self.settled_after is not None or self.futile_after is not None


class SeedWaves:
    """The adaptive rule's state for one study (see the module docstring). Not thread-safe: the study
    driver calls it from its Tune search algorithm only."""

    def __init__(self, design: Design, rule):
        self.design, self.rule = design, rule
        self.first = max(rule.min, analysis.MIN_SEEDS)
        self.levels = look_confidences(self.first, rule.max, rule.confidence, RHO)
        self.scores: dict[Hashable, dict[int, tuple[float, bool]]] = {c: {} for c in design.group_of}
        self.finished: dict[Hashable, set[int]] = {g: set() for g in design.groups}
        self.lost: dict[Hashable, int] = {}  # group -> its first seed that will never finish
        self.target = dict.fromkeys(design.groups, rule.min)  # seeds 0..target-1 are wanted
        self.released = dict.fromkeys(design.groups, 0)
        self.judged = [_Judged() for _ in design.comparisons]
        self.waves: dict[int, dict[str, list]] = {}
        self._by_group: dict[Hashable, list[int]] = {g: [] for g in design.groups}
        for i, comp in enumerate(design.comparisons):
            for g in {design.group_of[c] for c in comp.cells}:
                self._by_group[g].append(i)
        self._dirty = set(range(len(design.comparisons)))

    def record(self, group: Hashable, seed: int, scores: dict[Hashable, tuple[float, bool]]) -> None:
        """A finished run: the F1 points and collapsed flag of each of its cells."""
        for cell, value in scores.items():
            self.scores[cell][seed] = value
        self.finished[group].add(seed)
        self._dirty.update(self._by_group[group])

    def lose(self, group: Hashable, seed: int) -> None:
        """A run that will not finish (failed, or its model will never exist): its group stops there."""
        self.lost[group] = min(seed, self.lost.get(group, seed))
        self._dirty.update(self._by_group[group])

    def prefix(self, group: Hashable) -> int:
        """Seeds 0..k-1 of the group are finished: k."""
        k = 0
        while k in self.finished[group]:
            k += 1
        return k

    def step(self) -> list[tuple[Hashable, int]]:
        """Judge the comparisons that have a new wave; returns the (group, seed) runs to start now."""
        for i in sorted(self._dirty):
            self._judge(i)
        self._dirty.clear()
        out = []
        for g in self.design.groups:
            upto = min(self.target[g], self.lost.get(g, self.rule.max))
            out += [(g, s) for s in range(self.released[g], upto)]
            self.released[g] = max(self.released[g], upto)
        return out

    def _judge(self, i: int) -> None:
        comp, state = self.design.comparisons[i], self.judged[i]
        groups = [self.design.group_of[c] for c in comp.cells]
        n = min(min(self.prefix(g) for g in groups), self.rule.max)
        if self._final(state) or n <= state.wave or n < self.rule.min:
            return
        before = dataclasses.replace(state)
        state.wave = n
        if n >= self.first:
            self._interval(comp, state, n)
            if before.settled_after is not None and state.verdict not in SETTLED:
                self.judged[i] = dataclasses.replace(before, wave=n)  # a settled verdict stays settled
                return
            if state.verdict in SETTLED and state.settled_after is None:
                state.settled_after = n
                self._wave(n)["settled"].append(i)
            if before.ended or state.verdict in SETTLED:  # judged on free seeds only from here on
                return
            if n < self.rule.max and self.chance_to_settle(state.iv) < self.rule.futility:
                state.futile_after = n
                self._wave(n)["futile"].append(i)
                return
        if n < self.rule.max:
            for g in groups:
                if self.target[g] <= n:
                    self.target[g] = n + 1
                    self._wave(n)["given_another_seed"].append(g)

    def _final(self, state: _Judged) -> bool:
        """No further wave can change its verdict: settled, and not a gain below the threshold whose
        interval still reaches below minus it (more seeds may show a significant loss)."""
        return state.settled_after is not None and not (
            state.verdict == "gain below threshold" and state.low <= -self.rule.threshold)

    def _interval(self, comp: Comparison, state: _Judged, n: int) -> None:
        lo, hi = ([(s, y) for s, (y, collapsed) in sorted(self.scores[c].items()) if s < n and not collapsed]
                  for c in comp.cells)
        iv = analysis.compare([y for _, y in lo], [y for _, y in hi], before_seeds=[s for s, _ in lo],
                              after_seeds=[s for s, _ in hi], confidence=self.levels[n])
        state.estimate, state.note, state.iv = iv.estimate, iv.reason, iv
        if not iv.ok:
            state.verdict = analysis.verdict(iv, self.rule.threshold)
            return
        low, high = max(state.low, iv.low), min(state.high, iv.high)
        if low > high:  # the intervals disagree: some wave's missed (a chance of 1 - confidence)
            low, high = iv.low, iv.high
        state.low, state.high = low, high
        state.verdict = analysis.verdict(dataclasses.replace(iv, low=low, high=high), self.rule.threshold)

    def chance_to_settle(self, iv: analysis.Interval | None) -> float:
        """The predictive chance that the comparison's interval at `max` seeds settles it, given this
        wave's estimate and spread (the change's uncertainty included, the spread taken as known);
        1 without an interval (no grounds to stop)."""
        if iv is None or not iv.ok or iv.method != "paired t" or iv.n >= self.rule.max:
            return 1.0
        from scipy.special import ndtr, stdtrit

        last, tau = self.rule.max, self.rule.threshold
        sd = iv.se * math.sqrt(iv.n)
        half = float(stdtrit(last - 1, 0.5 + self.levels[last] / 2)) * sd / math.sqrt(last)
        spread = sd * math.sqrt((last - iv.n) / (iv.n * last))  # of the mean at `last`, given this one
        return float(ndtr((iv.estimate - tau - half) / spread) + ndtr((tau - half - iv.estimate) / spread))

    def _wave(self, n: int) -> dict[str, list]:
        return self.waves.setdefault(n, {"settled": [], "futile": [], "given_another_seed": []})

    # ------------------------------------------------------------------------------- reading it

    def comparisons(self) -> pd.DataFrame:
        """One row per comparison: factor, held levels, from, to, its verdict, interval and seeds."""
        rows = []
        for comp, state in zip(self.design.comparisons, self.judged):
            status = ("settled" if state.settled_after is not None else "futile" if state.futile_after is not None
                      else "max seeds" if state.wave >= self.rule.max
                      else "stopped" if any(self.design.group_of[c] in self.lost for c in comp.cells) else "open")
            rows.append({**{k: _plain(v) for k, v in comp.held.items()}, "factor": comp.factor, "from": comp.low,
                         "to": comp.high,
                         "comparison": comp.label, "verdict": state.verdict, "change": state.estimate,
                         "ci_low": state.low if math.isfinite(state.low) else math.nan,
                         "ci_high": state.high if math.isfinite(state.high) else math.nan,
                         "seeds": state.wave, "settled_after": state.settled_after,
                         "futile_after": state.futile_after, "status": status,
                         "note": state.note})
        return pd.DataFrame(rows).astype({"settled_after": "Int64", "futile_after": "Int64"}) if rows else \
            pd.DataFrame(rows)

    def seeds_run(self) -> dict[Hashable, int]:
        """Group -> seeds finished."""
        return {g: len(s) for g, s in self.finished.items()}

    def log(self) -> dict:
        """The decisions as plain JSON-able data (`artifacts.SEEDS_FILE`: a file in the study folder and an artifact of the study's MLflow run): the rule, each wave's levels,
        settled comparisons and groups given another seed, every comparison's state, seeds per group."""
        comps = self.design.comparisons
        table = [{k: _plain(v) for k, v in row.items()} for row in self.comparisons().to_dict(orient="records")]
        return {
            "rule": {"min": self.rule.min, "max": self.rule.max, "threshold": self.rule.threshold,
                     "confidence": self.rule.confidence, "spending": f"alpha (n / max)^{RHO:g}"},
            "levels": {str(n): level for n, level in self.levels.items()},
            "waves": [{"seeds": n, "level": self.levels.get(n),
                       "settled": [{"comparison": comps[i].label, "verdict": self.judged[i].verdict}
                                   for i in wave["settled"]],
                       "futile": [comps[i].label for i in wave["futile"]],
                       "given_another_seed": [self.design.labels[g] for g in wave["given_another_seed"]]}
                      for n, wave in sorted(self.waves.items())],
            "comparisons": table,
            "groups": [{"group": self.design.labels[g], "seeds": k} for g, k in self.seeds_run().items()],
        }


def _plain(value):
    """JSON's kind of value: None for NaN, int for a whole count."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return value


def simulate(design: Design, rule, draw: Callable[[Hashable, int], dict]) -> SeedWaves:
    """Run the rule to its end on synthetic scores, wave by wave: `draw(group, seed)` gives a run's
    {cell: (F1 points, collapsed)}. Used by benchmarks/adaptive.py, the tests and `plan`."""
    waves = SeedWaves(design, rule)
    todo = waves.step()
    while todo:
        for group, seed in todo:
            waves.record(group, seed, draw(group, seed))
        todo = waves.step()
    return waves


# ----------------------------------------------------------------------------------- a study's runs


def run_group(run) -> tuple:
    """The group of a finetune_run node (`design_from_plan`'s key): model node, task, total epochs."""
    return (run.parents[0], run.factors["task"], run.inputs["total_epochs"])


def run_scores(run, saved: dict) -> dict[Hashable, tuple[float, bool]]:
    """A finished run's cells from its DONE.json (`artifacts.write_done`): test F1 points, collapsed."""
    return {(*run_group(run), int(r["epochs"])): (100.0 * float(r["test"]["f1"]), bool(r.get("collapse")))
            for r in saved["results"]}


class StudySeeds:
    """Which finetune runs of a study to start: with a fixed list of seeds every unfinished one at
    once; with an adaptive rule, wave by wave (`SeedWaves`) from the finished runs' DONE.json.

        seeds = StudySeeds(study, plan, done_ids, read=lambda run: read_done(layout.read(plan, run, DONE_FILE)))
        seeds.release()          # runs to start now (each once)
        seeds.finished(run)      # it wrote its DONE.json: maybe more runs to release
        seeds.failed(run)        # it will not finish: its comparisons stop there
        seeds.unreleased()       # at the end: the runs the rule did not need
    """

    def __init__(self, study, plan, done: Iterable[str], read: Callable):
        self.plan, self.read, self.rule = plan, read, study.spec.finetune.adaptive
        self.runs = plan.of_kind("finetune_run")
        self.handed = {n.id for n in self.runs if n.id in set(done)}
        self.waves = None
        if self.rule is None:
            return
        self.waves = SeedWaves(design_from_plan(study, plan), self.rule)
        self.by_key = {(run_group(n), n.inputs["seed"]): n for n in self.runs}
        self.wanted: list = []
        # a re-run replays the finished runs wave by wave, as they came (a seed after the one
        # before it), so its decisions are those of the first run; what they want and lack is released
        for seed in range(self.rule.max):
            for run in self.runs:
                if run.id in self.handed and run.inputs["seed"] == seed:
                    self.finished(run)
            self.wanted += self.waves.step()

    def release(self) -> list:
        if self.waves is None:
            todo = [n for n in self.runs if n.id not in self.handed]
        else:
            self.wanted += self.waves.step()
            todo = [self.by_key[key] for key in self.wanted if self.by_key[key].id not in self.handed]
            self.wanted = []
        self.handed.update(n.id for n in todo)
        return todo

    def finished(self, run) -> None:
        if self.waves is None:
            return
        saved = self.read(run)
        if not saved or not saved.get("results"):  # unreadable: as good as lost
            self.failed(run)
            return
        self.waves.record(run_group(run), run.inputs["seed"], run_scores(run, saved))

    def failed(self, run) -> None:
        if self.waves is not None:
            self.waves.lose(run_group(run), run.inputs["seed"])

    def unreleased(self) -> list:
        return [n for n in self.runs if n.id not in self.handed]

    def log(self) -> dict | None:
        """The decisions (`SeedWaves.log`), None for a fixed list of seeds."""
        return self.waves.log() if self.waves is not None else None

    def close(self, state, layout):
        """At the study's end: the jobs of unreleased runs are `skipped` in `state`; with an adaptive
        rule, its decisions are written to the study folder (`artifacts.SEEDS_FILE`, uploaded on an
        object store). Returns that file's local path, or None."""
        import json

        from scaling_study.artifacts import SEEDS_FILE
        from scaling_study.storage import write_atomic

        unreleased = {run.id for run in self.unreleased()}
        for cell in self.plan.of_kind("finetune"):
            if cell.parents[0] in unreleased and state.state[cell.id] == "pending":
                state.set(cell.id, "skipped")
        decisions = self.log()
        if decisions is None:
            return None
        text = json.dumps(decisions, indent=1, default=str)
        write_atomic(layout.root / SEEDS_FILE, text)
        if layout.store.remote:
            layout.store.write_text(SEEDS_FILE, text)
        return layout.root / SEEDS_FILE


# ----------------------------------------------------------------------------------- synthetic studies

SEED_SD = {"ner": 0.7, "re": 2.0, "cls": 2.0}
"""Seed-to-seed sd of F1 points assumed for synthetic studies, by task type: NER moves by about a
point between seeds, relation and sentence classification by up to 5 (the finetuning numbers of
the shared REFERENCE.md, tiny models on this machine's smoke tasks)."""
SHARED_SEED = 0.2
"""Share of a cell's seed variance that the same seed brings to every cell of its task (data order)."""
SAME_RUN = 0.6
"""Share that a run brings to every epochs level it scores (one run, several results)."""


def synthetic_truth(design: Design, rng: np.random.Generator, threshold: float = 1.0, *, spread: float = 1.2,
                    centre: float = 0.3, losses: float = 0.1, interaction: float = 0.3) -> dict[Hashable, float]:
    """True mean F1 points of every cell of a synthetic study with effects around `threshold`.

    Additive per task: a base in [40, 70], plus for each factor a gain per step between consecutive
    levels of threshold x exp(N(centre, spread)) (a loss instead with chance `losses`), plus
    N(0, interaction x threshold) per cell, so the same step differs a little between cells."""
    cells = design.cells
    truth = pd.Series(0.0, index=cells.index)
    for task, idx in cells.groupby("task").indices.items():
        truth.iloc[idx] = rng.uniform(40, 70)
        for factor in analysis.FACTOR_ORDER:
            if factor not in cells or cells[factor].iloc[idx].notna().sum() == 0:
                continue
            sub = cells.iloc[idx]
            levels = analysis.sorted_levels(sub, factor)
            gains = threshold * np.exp(rng.normal(centre, spread, len(levels)))
            gains *= np.where(rng.random(len(levels)) < losses, -1.0, 1.0)
            gains[0] = 0.0
            offset = dict(zip(levels, np.cumsum(gains)))
            truth.iloc[idx] += sub[factor].map(offset).fillna(0.0).to_numpy()
    truth += rng.normal(0.0, interaction * threshold, len(truth))
    return dict(zip(cells["cell"], truth.clip(0, 100)))


def synthetic_draw(design: Design, truth: dict, rng: np.random.Generator,
                   seed_sd: dict[str, float] | None = None) -> Callable[[Hashable, int], dict]:
    """`draw(group, seed)` for `simulate`: each cell's truth plus seed noise (`SEED_SD` by task type),
    a share of it common to the seed across the task (`SHARED_SEED`) and across the run (`SAME_RUN`)."""
    sd = {**SEED_SD, **(seed_sd or {})}
    by_group: dict[Hashable, list] = {}
    for cell, group, task, kind in design.cells[["cell", "group", "task", "task_type"]].itertuples(index=False):
        by_group.setdefault(group, []).append((cell, task, sd.get(kind, 2.0)))
    task_seed: dict = {}
    own = math.sqrt(max(1.0 - SHARED_SEED - SAME_RUN, 0.0))

    def draw(group: Hashable, seed: int) -> dict:
        run = rng.standard_normal()
        out = {}
        for cell, task, cell_sd in by_group[group]:
            common = task_seed.setdefault((task, seed), rng.standard_normal())
            noise = math.sqrt(SHARED_SEED) * common + math.sqrt(SAME_RUN) * run + own * rng.standard_normal()
            out[cell] = (min(max(truth[cell] + cell_sd * noise, 0.0), 100.0), False)
        return out

    return draw
