"""Statistics of a study's results: cells over seeds, diminishing returns, macro averages, power laws.

    from scaling_study import analysis, results
    df = results.load("scholarbert")
    analysis.cell_stats(df)                                   # mean, sd, n, 95% t-interval per cell
    analysis.diminishing_returns(df, factor="model_size")     # change between consecutive sizes, verdict
    analysis.macro_average(df, by="task_type")                # NER / RE / CLS averages per model
    analysis.fit_power_law(df, x="pretrain_flops")            # err = E + A x^-alpha, cost of the next point
    analysis.table_rows(df, keep=("task", "model"))           # the paper table's rows and its definition
    analysis.compare([61.2, 60.8, 61.5], [63.0, 62.1, 62.9])  # one comparison of two cells' seed scores

Every function is pure: a DataFrame in (one row per finetune job, as `results.load` returns it,
metrics as fractions in [0, 1]), a DataFrame out, F1 in points (100 x the fraction). A cell is one
combination of every factor except the seed.

Intervals are Student's t intervals over seeds (Student 1908; any statistics text): a cell's mean
with n - 1 degrees of freedom; a change between two cells as a paired t interval on the per-seed
differences when the cells share at least `MIN_SEEDS` seeds (the same seed shares data order and
head initialisation, so pairing removes that noise), else Welch's t interval (Welch 1947) with the
Welch-Satterthwaite degrees of freedom, which also serves macro averages (a weighted sum of
independent task means). They are exact for normal seed noise, need no random draws, and
`tests/test_analysis.py` checks their coverage over repeated synthetic studies. Bounds are clipped
to the metric's range ([0, 100] for a cell, [-100, 100] for a change). Below `MIN_SEEDS` (3) usable
seeds, or when every seed scored the same, there is no interval (NaN bounds, a `reason`): two seeds
give a t interval of ±9 sd (12.7 standard errors), which says nothing.

Collapsed runs (`collapsed`: the model predicted one class) are left out of every statistic by
default, and counted (`n_collapsed`); `include_collapsed=True` counts them like any other run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from scaling_study.errors import UserError

#: Columns that identify a cell (with the seed: a finetune job). Missing columns are ignored.
CELL_KEYS = ("model_source", "model", "model_size", "data_volume", "steps", "epochs", "task")
#: Columns carried along with a cell: functions of its keys.
CELL_ATTRIBUTES = ("task_type", "domain", "parameters", "tokens", "pretrain_tokens", "pretrain_flops")
#: The factors `diminishing_returns` compares, with the column that orders their levels.
FACTOR_ORDER = {"model_size": "parameters", "data_volume": "tokens", "steps": "steps", "epochs": "epochs"}
#: The factors' names in prose.
FACTOR_NAMES = {"model_size": "model size", "data_volume": "data volume", "steps": "pretraining steps",
                "epochs": "finetuning epochs"}
#: The `factor` of the control arm's verdicts (`pretraining_vs_none`).
CONTROL = "pretraining"
#: Factors a table column or row stands for (a model is a size and a data volume).
IMPLIED = {"model": ("model_size", "data_volume"), "parameters": ("model_size",), "tokens": ("data_volume",),
           "pretrain_tokens": ("steps",), "pretrain_flops": ("model_size", "data_volume", "steps")}
VERDICTS = ("significant gain", "gain below threshold", "inconclusive", "significant loss", "too few seeds")
LEVEL = 0.95
MIN_SEEDS = 3
#: Distinct x values a power-law fit needs (3 parameters and some noise).
MIN_POINTS = 4
_SCORE = re.compile(r"(^|_)(f1|precision|recall|accuracy|acc)$")


def is_score(metric: str) -> bool:
    """Whether `metric` is a score logged as a fraction (F1, precision, recall, accuracy): shown in points."""
    return bool(_SCORE.search(metric))


def _points(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows with a value of `metric`, its value in F1 points in column `_y`."""
    if metric not in df:
        raise UserError(f"analysis: no column {metric!r} in the results; "
                        f"allowed: one of {sorted(map(str, df.columns))}")
    values = pd.to_numeric(df[metric], errors="coerce").astype(float)
    bad = values[(values < 0) | (values > 1)]
    if len(bad):
        raise UserError(f"analysis: {metric} must be a fraction in [0, 1] (results.load's unit); "
                        f"got {bad.iloc[0]!r} in row {bad.index[0]}")
    out = df.loc[values.notna()].copy()
    out["_y"] = values[values.notna()] * 100.0
    return out


def _keys(df: pd.DataFrame, names: Sequence[str]) -> list[str]:
    return [c for c in names if c in df.columns]


def is_control(df: pd.DataFrame) -> np.ndarray:
    """Rows of the control arm: `steps` 0, the initial weights (`pretrain.random_init`), never pretrained."""
    if "steps" not in df:
        return np.zeros(len(df), dtype=bool)
    return (pd.to_numeric(df["steps"], errors="coerce") == 0).fillna(False).to_numpy(dtype=bool)


def _collapsed(df: pd.DataFrame) -> np.ndarray:
    return (df["collapsed"].fillna(False).astype(bool).to_numpy() if "collapsed" in df
            else np.zeros(len(df), dtype=bool))


# ---------------------------------------------------------------------------------------------------
# Intervals: small pure functions on arrays of seed scores (issue 18's adaptive seeds reuse them with
# a spent alpha as `confidence`).

@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate and its two-sided `confidence` interval. Without an interval, low and high are NaN
    and `reason` says why ("too few seeds (2; need 3)", "no variation over seeds")."""

    estimate: float
    low: float
    high: float
    se: float
    dof: float
    n: int
    """Seeds behind the interval (pairs for a paired change; the smallest sample otherwise)."""
    method: str
    """"t" (one cell), "paired t" or "Welch t"."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def weighted_interval(samples: Sequence[Sequence[float]], weights: Sequence[float], *, confidence: float = LEVEL,
                      min_seeds: int = MIN_SEEDS, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """sum_i w_i mean(samples_i), samples independent: Student's t for one sample, else Welch's t with
    Welch-Satterthwaite degrees of freedom; bounds clipped to `bounds`."""
    from scipy.special import stdtrit   # Student's t quantiles, without scipy.stats' import time

    samples = [np.asarray(s, dtype=float) for s in samples]
    w = np.asarray(weights, dtype=float)
    n_each = np.array([len(s) for s in samples])
    n = int(n_each.min()) if len(samples) else 0
    method = "t" if len(samples) == 1 else "Welch t"
    estimate = float(sum(wi * s.mean() for wi, s in zip(w, samples))) if n else math.nan
    nan = math.nan
    if n < min_seeds:
        return Interval(estimate, nan, nan, nan, nan, n, method, f"too few seeds ({n}; need {min_seeds})")
    v = w**2 * np.array([s.var(ddof=1) for s in samples]) / n_each
    se = math.sqrt(v.sum())
    if not se > 0:
        return Interval(estimate, nan, nan, 0.0, nan, n, method, "no variation over seeds")
    dof = float(v.sum() ** 2 / (v**2 / (n_each - 1)).sum())
    half = float(stdtrit(dof, 0.5 + confidence / 2)) * se
    return Interval(estimate, max(estimate - half, bounds[0]), min(estimate + half, bounds[1]), se, dof, n, method)


def mean_interval(values: Sequence[float], *, confidence: float = LEVEL, min_seeds: int = MIN_SEEDS,
                  bounds: tuple[float, float] = (0.0, 100.0)) -> Interval:
    """The mean of one cell's seed scores (points) with its Student's t interval, clipped to `bounds`."""
    return weighted_interval([values], [1.0], confidence=confidence, min_seeds=min_seeds, bounds=bounds)


def compare(before: Sequence[float], after: Sequence[float], *, before_seeds: Sequence | None = None,
            after_seeds: Sequence | None = None, paired: bool | None = None, confidence: float = LEVEL,
            min_seeds: int = MIN_SEEDS, bounds: tuple[float, float] = (-100.0, 100.0)) -> Interval:
    """The change mean(after) - mean(before) of two cells' seed scores, with its `confidence` interval.

    Paired (Student's t on the per-seed differences, over the seeds both cells have) when both seed
    lists are given, no seed repeats within a cell and at least `min_seeds` seeds are shared, or when
    `paired=True` (then fewer shared seeds mean no interval); else, or with `paired=False`, Welch's t
    on the two independent samples. A paired estimate is the mean difference over the shared seeds.
    """
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    kw = dict(confidence=confidence, min_seeds=min_seeds, bounds=bounds)
    if paired is not False and before_seeds is not None and after_seeds is not None:
        by_b, by_a = dict(zip(before_seeds, b)), dict(zip(after_seeds, a))
        unique = len(by_b) == len(b) and len(by_a) == len(a)
        shared = [s for s in by_b if s in by_a] if unique else []
        if paired or len(shared) >= min_seeds:
            diff = [by_a[s] - by_b[s] for s in shared]
            return dataclasses.replace(weighted_interval([diff], [1.0], **kw), method="paired t")
    elif paired:
        raise ValueError("compare: paired=True needs both cells' seeds")
    return weighted_interval([a, b], [1.0, -1.0], **kw)


def verdict(change: Interval, threshold: float) -> str:
    """What a change's interval [low, high] says about "does this step buy more than `threshold` points?".

    "significant gain" (low > threshold), "significant loss" (high < -threshold), "gain below
    threshold" (high < threshold: a gain of more than the threshold is ruled out), "inconclusive"
    (the interval holds the threshold: no evidence of a gain above it, and none against), "too few
    seeds" (no interval; a change whose seeds all scored the same is "inconclusive").
    """
    if not change.ok:
        return "too few seeds" if change.reason.startswith("too few") else "inconclusive"
    if change.low > threshold:
        return "significant gain"
    if change.high < -threshold:
        return "significant loss"
    if change.high < threshold:
        return "gain below threshold"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------------
# Cells, comparisons, macro averages.

def cell_stats(df: pd.DataFrame, metric: str = "test_f1", *, confidence: float = LEVEL, min_seeds: int = MIN_SEEDS,
               include_collapsed: bool = False) -> pd.DataFrame:
    """One row per cell: its keys and attributes, n (seeds used), n_jobs, n_collapsed, mean, sd, se,
    ci_low, ci_high (points) and ci_note (why there is no interval; empty when there is one).

    Collapsed runs are left out of n, mean, sd and the interval unless `include_collapsed`; a cell
    whose runs all collapsed keeps its row (n = 0, NaN mean) so that its collapsed share shows.
    """
    data = _points(df, metric)
    keys, attrs = _keys(data, CELL_KEYS), _keys(data, CELL_ATTRIBUTES)
    y_all, collapsed = data["_y"].to_numpy(), _collapsed(data)
    use = ~collapsed | include_collapsed
    rows = []
    # .indices and numpy instead of iterating sub-frames: 10-50x faster on a study of 10,000 jobs
    for key, idx in data.groupby(keys, dropna=False, sort=True).indices.items():
        y = y_all[idx[use[idx]]]
        iv = mean_interval(y, confidence=confidence, min_seeds=min_seeds)
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update({a: data[a].iat[idx[0]] for a in attrs})
        row.update(n=len(y), n_jobs=len(idx), n_collapsed=int(collapsed[idx].sum()), mean=iv.estimate,
                   sd=float(y.std(ddof=1)) if len(y) > 1 else math.nan, se=iv.se, ci_low=iv.low, ci_high=iv.high,
                   ci_note=iv.reason)
        rows.append(row)
    columns = [*keys, *attrs, "n", "n_jobs", "n_collapsed", "mean", "sd", "se", "ci_low", "ci_high", "ci_note"]
    return _restore_dtypes(pd.DataFrame(rows, columns=columns), data)


def _restore_dtypes(out: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """Give factor columns built from row dicts back their input dtypes (Int64 steps, not 2000.0)."""
    for col in out.columns.intersection(data.columns):
        try:
            out[col] = out[col].astype(data[col].dtype)
        except (TypeError, ValueError):
            pass
    return out


def level_value(factor: str, level: object, order_value: object) -> float:
    """The number that orders a factor's level: parameters, tokens, steps, epochs (a percentage as fallback)."""
    if order_value is not None and not pd.isna(order_value):
        return float(order_value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*(%?)\s*", str(level))
    if match:
        return float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    return math.nan


def sorted_levels(df: pd.DataFrame, factor: str) -> list:
    """The factor's levels present in `df`, smallest first (model size by parameters, volume by tokens)."""
    order = FACTOR_ORDER[factor]
    seen = {}
    for level, sub in df[df[factor].notna()].groupby(factor, sort=True):
        value = level_value(factor, level, sub[order].iloc[0] if order in sub else None)
        seen[level] = -math.inf if math.isnan(value) else value
    return sorted(seen, key=seen.get)


def held_fixed(df: pd.DataFrame, factor: str) -> list[str]:
    """Columns held fixed when `factor` varies: every cell key but the factor (and the model name,
    which changes with size, volume and steps of a pretrained model)."""
    drop = {factor, "model_source"} | ({"model"} if factor != "epochs" else set())
    return [c for c in _keys(df, CELL_KEYS) if c not in drop]


def comparison_pairs(data: pd.DataFrame, factor: str) -> Iterator[tuple[tuple, np.ndarray, list]]:
    """The comparisons `diminishing_returns` makes, as row positions of `data` (rows with a `factor`
    level): per combination of the other factors (`held_fixed`), its key, its rows, and each pair of
    consecutive levels ((x, level, rows), (x, level, rows)), smallest first. Also what
    `scaling_study.adaptive` judges while a study runs."""
    order = data[FACTOR_ORDER[factor]].to_numpy() if FACTOR_ORDER[factor] in data else None
    fixed = held_fixed(data, factor)
    groups: dict[tuple, list] = {}
    # one groupby over (fixed..., factor): far faster than a groupby per combination
    for key, pos in data.groupby([*fixed, factor], dropna=False, sort=True).indices.items():
        *held, value = key if isinstance(key, tuple) else (key,)
        x = level_value(factor, value, order[pos[0]] if order is not None else None)
        groups.setdefault(tuple(held), []).append((x, value, pos))
    for key, levels in groups.items():
        levels.sort(key=lambda item: item[0])
        yield key, np.sort(np.concatenate([pos for _, _, pos in levels])), list(zip(levels, levels[1:]))


def diminishing_returns(df: pd.DataFrame, factor: str = "model_size", threshold: float = 1.0,
                        metric: str = "test_f1", *, confidence: float = LEVEL, min_seeds: int = MIN_SEEDS,
                        include_collapsed: bool = False) -> pd.DataFrame:
    """Does one more level of `factor` buy more than `threshold` F1 points? One row per comparison.

    For each task and each combination of the other factors, the cells are ordered by the factor
    (model size by parameters, data volume by tokens, steps and epochs by value) and each level is
    compared with the next one present (`compare`: paired by seed where the cells share seeds).
    `change` is the estimate in points, [ci_low, ci_high] its interval, `verdict` what that says
    (`verdict`); `n_from`/`n_to` count the seeds used, `n_collapsed_from`/`n_collapsed_to` the
    collapsed runs left out, `note` why there is no interval. External models (no size, volume or
    steps) take part only in `factor="epochs"`; the control arm (steps 0) is no steps level here
    (`pretraining_vs_none` compares it), but its sizes, volumes and epochs are compared like any.
    """
    if factor not in FACTOR_ORDER:
        raise UserError(f"diminishing_returns: factor {factor!r} is not one; allowed: {', '.join(FACTOR_ORDER)}")
    _check_comparable(df, factor, threshold, "diminishing_returns")
    data = _points(df, metric)
    keep = data[factor].notna().to_numpy()
    if factor == "steps":  # the control arm is no level of pretraining: pretraining_vs_none compares it
        keep = keep & ~is_control(data)
    data = data[keep]
    return _changes(data.reset_index(drop=True), factor, threshold, confidence=confidence, min_seeds=min_seeds,
                    include_collapsed=include_collapsed)


def pretraining_vs_none(df: pd.DataFrame, threshold: float = 1.0, metric: str = "test_f1", *,
                        confidence: float = LEVEL, min_seeds: int = MIN_SEEDS,
                        include_collapsed: bool = False) -> pd.DataFrame:
    """Does pretraining buy more than `threshold` F1 points over none at all? One row per comparison.

    For each task, model size, data volume and epochs level, the control arm (`steps` 0: the
    initial weights, `pretrain.random_init`) against the same size and volume at the largest steps
    level present, as `diminishing_returns` compares levels (same columns, paired by seed); `factor`
    is `CONTROL`, `from` "none", `to` the steps ("2000 steps"). No rows without a control arm.
    """
    _check_comparable(df, "steps", threshold, "pretraining_vs_none")
    data = _points(df, metric)
    data = data[data["steps"].notna()].reset_index(drop=True)
    control = is_control(data)
    if not control.any():
        return _changes(data.iloc[:0], "steps", threshold).assign(factor=CONTROL)
    largest = data.groupby(held_fixed(data, "steps"), dropna=False)["steps"].transform("max")
    data = data[control | (data["steps"] == largest).fillna(False).to_numpy()].reset_index(drop=True)
    out = _changes(data, "steps", threshold, confidence=confidence, min_seeds=min_seeds,
                   include_collapsed=include_collapsed)
    return out.assign(factor=CONTROL, **{"from": "none", "to": [f"{int(s):,} steps" for s in out["to"]]})


def _check_comparable(df: pd.DataFrame, factor: str, threshold: float, what: str) -> None:
    if not threshold >= 0:
        raise UserError(f"{what}: threshold must be F1 points >= 0; got {threshold!r}")
    if factor not in df:
        raise UserError(f"{what}: no column {factor!r} in the results")
    if "seed" not in df:
        raise UserError(f"{what}: no column 'seed' in the results")


def _changes(data: pd.DataFrame, factor: str, threshold: float, *, confidence: float = LEVEL,
             min_seeds: int = MIN_SEEDS, include_collapsed: bool = False) -> pd.DataFrame:
    """Each level of `factor` against the next one present, every other cell key held fixed (`_points` rows)."""
    fixed, attrs = held_fixed(data, factor), _keys(data, ("task_type", "domain"))
    y_all, seeds_all, collapsed = data["_y"].to_numpy(), data["seed"].to_numpy(), _collapsed(data)
    use = ~collapsed | include_collapsed
    rows = []
    for key, idx, pairs in comparison_pairs(data, factor):
        for (lo_x, lo_name, lo_all), (hi_x, hi_name, hi_all) in pairs:
            lo, hi = lo_all[use[lo_all]], hi_all[use[hi_all]]
            lo_c, hi_c = int(collapsed[lo_all].sum()), int(collapsed[hi_all].sum())
            iv = compare(y_all[lo], y_all[hi], before_seeds=seeds_all[lo], after_seeds=seeds_all[hi],
                         confidence=confidence, min_seeds=min_seeds)
            row = dict(zip(fixed, key))
            row.update({a: data[a].iat[idx[0]] for a in attrs})
            row.update({"factor": factor, "from": lo_name, "to": hi_name, "from_x": lo_x, "to_x": hi_x,
                        "n_from": len(lo), "n_to": len(hi), "n_collapsed_from": lo_c, "n_collapsed_to": hi_c,
                        "paired": iv.method == "paired t",
                        "from_mean": y_all[lo].mean() if len(lo) else math.nan,
                        "to_mean": y_all[hi].mean() if len(hi) else math.nan,
                        "change": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                        "verdict": verdict(iv, threshold), "note": iv.reason})
            rows.append(row)
    columns = [*fixed, *attrs, "factor", "from", "to", "from_x", "to_x", "n_from", "n_to", "n_collapsed_from",
               "n_collapsed_to", "paired", "from_mean", "to_mean", "change", "ci_low", "ci_high", "verdict", "note"]
    return _restore_dtypes(pd.DataFrame(rows, columns=columns), data)


def macro_average(df: pd.DataFrame, by: str = "task_type", metric: str = "test_f1", *, confidence: float = LEVEL,
                  min_seeds: int = MIN_SEEDS, include_collapsed: bool = False) -> pd.DataFrame:
    """Mean over the tasks of each `by` group (task_type, domain) of the per-task mean F1, per model.

    Each task weighs the same whatever its number of seeds; the interval is Welch's t over the tasks'
    independent means (none when a task has fewer than `min_seeds` seeds). `n_tasks` says how many
    tasks a row averages: compare rows only when they average the same tasks.
    """
    data = _points(df, metric)
    if by not in data:
        raise UserError(f"macro_average: no column {by!r} in the results; allowed: task_type, domain")
    if not include_collapsed:
        data = data[~_collapsed(data)]
    model_keys = [c for c in _keys(data, CELL_KEYS) if c != "task"]
    rows = []
    for key, group in data.groupby([by, *model_keys], dropna=False, sort=True):
        tasks = {task: cell["_y"].to_numpy() for task, cell in group.groupby("task", sort=True)}
        iv = weighted_interval(list(tasks.values()), [1.0 / len(tasks)] * len(tasks), confidence=confidence,
                               min_seeds=min_seeds, bounds=(0.0, 100.0))
        row = dict(zip([by, *model_keys], key))
        row.update(n_tasks=len(tasks), tasks=",".join(map(str, tasks)), mean=iv.estimate, ci_low=iv.low,
                   ci_high=iv.high, ci_note=iv.reason)
        rows.append(row)
    out = pd.DataFrame(rows, columns=[by, *model_keys, "n_tasks", "tasks", "mean", "ci_low", "ci_high", "ci_note"])
    return _restore_dtypes(out, data)


# ---------------------------------------------------------------------------------------------------
# The paper table: one definition for the report's table and `scaling-study results --pivot`.

@dataclasses.dataclass(frozen=True)
class TableRows:
    """The finetune jobs a table of the study shows (`table_rows`), and what it held fixed."""

    jobs: pd.DataFrame
    """Every job at the table's levels, collapsed ones too."""
    fixed: dict
    """Factor -> the level it is held at (the study's largest)."""
    include_collapsed: bool
    control: bool = False
    """Whether the control arm (steps 0) stays beside the largest steps level, as a model of its own."""

    @property
    def rows(self) -> pd.DataFrame:
        """The jobs the table's numbers use: collapsed runs left out unless `include_collapsed`."""
        return self.jobs if self.include_collapsed else self.jobs[~_collapsed(self.jobs)].reset_index(drop=True)

    @property
    def n_collapsed(self) -> int:
        return int(_collapsed(self.jobs).sum())

    def definition(self, value: str = "test_f1") -> str:
        """One sentence saying what the table's numbers are: the same on the CLI and in the report."""
        unit = f"{value} in points (100 x the fraction)" if is_score(value) else f"{value} as logged"
        held = ", ".join(f"{FACTOR_NAMES.get(f, f)} {lv}" + (" (0 for the control arm: no pretraining)"
                                                             if f == "steps" and self.control else "")
                         for f, lv in self.fixed.items())
        text = (f"{unit}, mean over seeds; every factor not in the table at the study's largest level"
                f"{f' ({held}; published models have no size, volume or steps)' if held else ''}; ")
        counts = f"{self.n_collapsed} of {len(self.jobs)} jobs"
        if self.include_collapsed:
            return text + f"collapsed runs included ({counts})."
        return text + f"collapsed runs left out ({counts}; --include-collapsed counts them)."


def table_rows(df: pd.DataFrame, keep: Iterable[str] = ("task", "model"), *,
               include_collapsed: bool = False) -> TableRows:
    """The jobs of a table whose rows and columns are `keep`: every factor (model size, data volume,
    pretraining steps, finetuning epochs) that `keep` neither names nor implies (a model implies its
    size and volume) at the study's largest level; external models, which have no size, volume or
    steps, stay, and so does the control arm (steps 0) where `keep` has a model: its name says it is
    one of its own ("tiny | 10% | no pretraining"). The report's results table is `keep=("task", "model")`."""
    keep = set(keep)
    control = "model" in keep and bool(is_control(df).any())
    keep |= {f for k in list(keep) for f in IMPLIED.get(k, ())}
    rows, fixed = df, {}
    for factor in FACTOR_ORDER:
        if factor in keep or factor not in rows or not rows[factor].notna().any():
            continue
        levels = sorted_levels(rows, factor)
        fixed[factor] = levels[-1]
        stays = (rows[factor] == levels[-1]).fillna(False).to_numpy() | rows[factor].isna().to_numpy()
        rows = rows[stays | (is_control(rows) if factor == "steps" and control else False)]
    return TableRows(rows.reset_index(drop=True), fixed, include_collapsed, control and "steps" in fixed)


def model_order(df: pd.DataFrame) -> list[str]:
    """Model names in table order: pretrained models by parameters then tokens, then external models."""
    external = df["model_source"].eq("external") if "model_source" in df else pd.Series(False, index=df.index)
    by = [c for c in ("parameters", "tokens") if c in df]
    ordered = df.assign(_ext=external.fillna(False).to_numpy()).sort_values(["_ext", *by, "model"], na_position="last")
    return list(dict.fromkeys(ordered["model"].astype(str)))


# ---------------------------------------------------------------------------------------------------
# Saturating power laws: err(x) = E + A * x^-alpha, err = 100 - F1 in points.

def _power(logx, e, log_a, alpha):
    return e + np.exp(log_a - alpha * logx)


def fit_curve(x: np.ndarray, err: np.ndarray, sigma: np.ndarray | None = None) -> dict:
    """Least-squares fit of err = E + A x^-alpha with 0 <= E <= min(err), 0 <= alpha <= 5.

    x is scaled by its geometric mean first (A is fitted as log A there), which keeps the problem
    well conditioned across 10 orders of magnitude. Returns E, A, alpha (A in x's own units), their
    covariance on (E, log A0, alpha) at the scaled x, `x0` the scale, and the residual sd. Raises
    ValueError when no start converges.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    x, err = np.asarray(x, dtype=float), np.asarray(err, dtype=float)
    x0 = float(np.exp(np.log(x).mean()))
    logx = np.log(x / x0)
    best = None
    for frac in (0.0, 0.5, 0.9):        # starts for E; curve fits of power laws have local minima
        e0 = frac * err.min()
        slope, intercept = np.polyfit(logx, np.log(np.maximum(err - e0, 1e-6)), 1)
        p0 = [e0, float(np.clip(intercept, -49, 49)), float(np.clip(-slope, 1e-3, 4.9))]
        try:
            with warnings.catch_warnings():   # "covariance could not be estimated": judged below, not printed
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, pcov = curve_fit(_power, logx, err, p0=p0, sigma=sigma, absolute_sigma=False,
                                       bounds=([0.0, -50.0, 0.0], [max(err.min(), 1e-9), 50.0, 5.0]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((_power(logx, *popt) - err) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, popt, pcov)
    if best is None:
        raise ValueError("the least-squares fit did not converge")
    sse, popt, pcov = best
    e, log_a0, alpha = map(float, popt)
    return {"E": e, "A": math.exp(log_a0 + alpha * math.log(x0)), "alpha": alpha, "x0": x0,
            "log_a0": log_a0, "cov": pcov, "resid_sd": math.sqrt(sse / max(len(x) - 3, 1))}


def next_gain_multiple(e: float, log_a0: float, alpha: float, x: float, x0: float, gain: float) -> float:
    """x'/x where the fit's err has dropped by `gain` points below err(x); inf when it never does.

    Works in logs, so any parameters (a draw from a loose fit's covariance) give a number, never an
    overflow: (1 - gain / reducible)^(-1/alpha), with reducible = A0 (x/x0)^-alpha.
    """
    log_reducible = log_a0 - alpha * math.log(x / x0)
    if not (math.isfinite(log_reducible) and math.isfinite(alpha)):
        return math.nan
    if gain <= 0:
        return 1.0
    if alpha <= 0 or log_reducible <= math.log(gain):
        return math.inf
    log_multiple = -math.log1p(-math.exp(math.log(gain) - log_reducible)) / alpha
    return math.exp(log_multiple) if log_multiple < 700 else math.inf   # beyond float range: never, in practice


def _loose(name: str, value: float, se: float) -> str | None:
    """"name = value ± se" when the standard error is missing or exceeds the estimate (not pinned down)."""
    if math.isfinite(se) and se <= abs(value):
        return None
    return f"{name} = {value:.3g} ± {se:.3g}" if math.isfinite(se) else f"{name} = {value:.3g} (no standard error)"


def _fit_group(xs: np.ndarray, err: np.ndarray, gain: float, confidence: float, rng: np.random.Generator,
               n_draws: int) -> dict:
    """One group's fit: status "ok" with its numbers, or "not estimable: <reason>"."""
    f1 = 100.0 - err
    frontier = f"frontier F1 {f1.min():.1f}-{f1.max():.1f} over {len(xs)} levels"
    try:
        fit = fit_curve(xs, err)
    except ValueError as exc:
        return {"status": f"not estimable: {exc} ({frontier})"}
    cov = np.asarray(fit["cov"], dtype=float)
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(3, math.nan)
    grad = np.array([1.0, math.log(fit["x0"])])     # d log A / d (log A0, alpha)
    se_a = fit["A"] * math.sqrt(max(grad @ cov[1:, 1:] @ grad, 0.0)) if np.isfinite(se).all() else math.nan
    out = {"E": fit["E"], "E_se": se[0], "A": fit["A"], "A_se": se_a, "alpha": fit["alpha"], "alpha_se": se[2],
           "resid_sd": fit["resid_sd"]}
    reasons = [r for r in (_loose("E", fit["E"], se[0]), _loose("A", fit["A"], se_a),
                           _loose("α", fit["alpha"], se[2])) if r]
    if reasons:
        return {**out, "status": f"not estimable: {', '.join(reasons)}, standard errors above the estimates "
                                  f"({frontier})"}
    x_max, params = float(xs.max()), [fit["E"], fit["log_a0"], fit["alpha"]]
    draws = rng.multivariate_normal(params, cov, size=n_draws, check_valid="ignore")
    multiples = np.array([next_gain_multiple(e, la, al, x_max, fit["x0"], gain) for e, la, al in draws])
    multiples = multiples[~np.isnan(multiples)]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(multiples, [tail, 1 - tail], method="inverted_cdf") if len(multiples) else (math.nan,) * 2
    return {**out, "status": "ok", "f1_limit": 100.0 - fit["E"],
            "f1_at_x_max": 100.0 - float(_power(math.log(x_max / fit["x0"]), *params)),
            "next_gain_x": next_gain_multiple(*params, x_max, fit["x0"], gain),
            "next_gain_x_low": lo, "next_gain_x_high": hi}


def fit_power_law(df: pd.DataFrame, x: str = "pretrain_flops", metric: str = "test_f1", *, by: str = "task",
                  reduce: str = "best", gain: float = 1.0, min_points: int = MIN_POINTS, confidence: float = LEVEL,
                  n_draws: int = 2000, seed: int = 0, include_collapsed: bool = False) -> pd.DataFrame:
    """Fit err = 100 - F1 = E + A * x^-alpha per `by` group against `x` (parameters, tokens, pretrain_flops,
    pretrain_tokens), over the pretrained models' cells.

    Cells sharing an x value (e.g. one size at several data volumes when x is parameters) are
    reduced to one point: "best" keeps the highest mean F1 (the frontier: what that much x can buy
    in this study), "mean" averages them. Each row: the fit (E, A, alpha and their standard errors
    from the fit's covariance; E is the irreducible error in points, so 100 - E is the F1 the curve
    tends to), the largest x of the study, and `next_gain_x` = how many times that x it takes to
    gain `gain` more F1 points by the fit ("inf" when 100 - E is within `gain` of the current
    prediction: more x never buys that point), with a `confidence` interval from parameter draws
    from the covariance (seeded by `seed`). `status` is "ok", "too few points (...)" with fewer than
    `min_points` distinct x values, or "not estimable: <reason>" when the fit does not converge or
    does not pin its parameters down (a standard error larger than the estimate, as on a flat
    frontier); only "ok" rows carry f1_limit and next_gain_x. Never raises on the data's shape.
    """
    if reduce not in ("best", "mean"):
        raise UserError(f"fit_power_law: reduce={reduce!r}; allowed: best, mean")
    data = _points(df, metric)
    if x not in data:
        raise UserError(f"fit_power_law: no column {x!r} in the results; allowed: parameters, tokens, "
                        "pretrain_tokens, pretrain_flops")
    if "model_source" in data:
        data = data[data["model_source"] != "external"]
    if not include_collapsed:
        data = data[~_collapsed(data)]
    data = data[pd.to_numeric(data[x], errors="coerce").astype(float) > 0]
    cells = data.groupby([by, x, *[c for c in _keys(data, CELL_KEYS) if c not in (by, x)]],
                         dropna=False, sort=True)["_y"].mean().reset_index()
    rng = np.random.default_rng(seed)
    rows = []
    for name, group in cells.groupby(by, sort=True):
        points = group.groupby(x)["_y"].agg("max" if reduce == "best" else "mean").sort_index()
        xs, err = points.index.to_numpy(dtype=float), 100.0 - points.to_numpy()
        row = {by: name, "x": x, "n_points": len(xs), "x_max": xs.max() if len(xs) else math.nan}
        if len(xs) < min_points:
            rows.append({**row, "status": f"too few points ({len(xs)} values of {x}; need {min_points})"})
        else:
            rows.append({**row, **_fit_group(xs, err, gain, confidence, rng, n_draws)})
    columns = [by, "x", "n_points", "x_max", "status", "E", "E_se", "A", "A_se", "alpha", "alpha_se", "resid_sd",
               "f1_limit", "f1_at_x_max", "next_gain_x", "next_gain_x_low", "next_gain_x_high"]
    return pd.DataFrame(rows).reindex(columns=columns)
