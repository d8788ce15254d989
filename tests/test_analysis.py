"""Analysis on synthetic grids with known effects: intervals and their coverage, verdicts, collapsed runs,
the paper table's rows, power-law recovery and fits that cannot be made."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_study import analysis
from scaling_study.errors import UserError

SIZES = {"small": 30_000_000, "base": 110_000_000, "large": 340_000_000}
VOLUMES = {"1%": 22_000_000, "10%": 220_000_000, "100%": 2_200_000_000}
TASKS = {"bc5cdr_ner": ("ner", "biomedicine", 80.0), "scierc_re": ("re", "computer_science", 60.0),
         "paper_field_cls": ("cls", "multi", 70.0)}


def synthetic(*, size_gain=3.0, data_gain=0.2, steps_gain=0.0, epochs_gain=0.5, noise=0.5, seeds=5,
              rng=None, sizes=SIZES, volumes=VOLUMES, steps=(1000, 2000), epochs=(1, 3), tasks=TASKS,
              externals=("allenai/scibert",), control_gap: float | None = None) -> pd.DataFrame:
    """A results.load-shaped frame: F1 = base + size_gain per size level + data_gain per volume level
    + steps_gain per steps level + epochs_gain per epochs level + N(0, noise) per job (fractions).
    `control_gap`: a control arm too (steps 0, named as results.load names it), that much below the
    largest steps level."""
    rng = rng or np.random.default_rng(0)
    rows = []

    def add(model, source, size, vol, step, epoch, task, f1_mean):
        ttype, domain, _ = tasks[task]
        for seed in range(seeds):
            rows.append({
                "run_id": f"r{len(rows)}", "node_id": f"ft-{len(rows)}", "study": "synthetic", "model": model,
                "model_source": source, "model_size": size, "parameters": sizes.get(size),
                "data_volume": vol, "tokens": volumes.get(vol),
                "pretrain_tokens": None if step is None else step * 256 * 128,
                "pretrain_flops": None if size is None else 6.0 * sizes[size] * step * 256 * 128,
                "steps": step, "epochs": epoch, "task": task, "task_type": ttype, "domain": domain,
                "seed": seed, "test_f1": (f1_mean + rng.normal(0, noise)) / 100,
                "dev_f1": (f1_mean + rng.normal(0, noise)) / 100, "collapsed": False})

    for task, (_, _, base) in tasks.items():
        for i, size in enumerate(sizes):
            for j, vol in enumerate(volumes):
                for k, step in enumerate(steps):
                    for m, epoch in enumerate(epochs):
                        mean = base + i * size_gain + j * data_gain + k * steps_gain + m * epochs_gain
                        add(f"{size}-{vol}", "pretrained", size, vol, step, epoch, task, mean)
                        if control_gap is not None and k == len(steps) - 1:
                            add(f"{size}-{vol} | no pretraining", "pretrained", size, vol, 0, epoch, task,
                                mean - control_gap)
        for model in externals:
            for m, epoch in enumerate(epochs):
                add(model, "external", None, None, None, epoch, task, base + 1.0 + m * epochs_gain)
    df = pd.DataFrame(rows)
    for col in ("parameters", "tokens", "pretrain_tokens", "steps", "epochs", "seed"):
        df[col] = df[col].astype("Int64")
    df["model_size"] = df["model_size"].astype("string")
    df["data_volume"] = df["data_volume"].astype("string")
    return df


def test_cell_stats_shape_and_values():
    df = synthetic(noise=0.0)
    cells = analysis.cell_stats(df)
    assert len(cells) == len(df) / 5 and (cells["n"] == 5).all() and (cells["n_collapsed"] == 0).all()
    top = cells[(cells.task == "bc5cdr_ner") & (cells.model_size == "large") & (cells.data_volume == "100%")
                & (cells.steps == 2000) & (cells.epochs == 3)]
    assert top["mean"].item() == pytest.approx(80 + 6 + 0.4 + 0.5)
    assert top["sd"].item() == pytest.approx(0.0, abs=1e-9)
    # five identical seeds: no zero-width interval, a reason instead
    assert math.isnan(top["ci_low"].item()) and top["ci_note"].item() == "no variation over seeds"
    ext = cells[cells.model_source == "external"]
    assert len(ext) == 6 and ext["model_size"].isna().all() and ext["parameters"].isna().all()


def test_cell_interval_is_students_t_and_clipped():
    y = [60.0, 62.0, 64.0]                                 # mean 62, sd 2, t_{0.975, 2} = 4.303
    iv = analysis.mean_interval(y)
    assert (iv.estimate, iv.n, iv.dof, iv.method) == (62.0, 3, 2.0, "t")
    assert (iv.low, iv.high) == pytest.approx((62 - 4.3027 * 2 / math.sqrt(3), 62 + 4.3027 * 2 / math.sqrt(3)),
                                              abs=1e-3)
    near_zero = analysis.mean_interval([0.0, 0.5, 3.0])   # t band reaches below 0: clipped to the metric's range
    assert near_zero.low == 0.0 and near_zero.high < 100
    near_top = analysis.mean_interval([100.0, 99.0, 93.0])
    assert near_top.high == 100.0 and near_top.low > 0
    two = analysis.mean_interval([10.0, 70.0])           # two seeds: a t band of +-381 points; none at all
    assert math.isnan(two.low) and two.reason == "too few seeds (2; need 3)" and two.estimate == 40.0


def test_compare_pairs_by_seed_or_uses_welch():
    before, after = [60.0, 65.0, 70.0, 62.0], [61.0, 66.2, 70.8, 63.1]   # big seed effect, steady +1 gain
    paired = analysis.compare(before, after, before_seeds=[0, 1, 2, 3], after_seeds=[0, 1, 2, 3])
    welch = analysis.compare(before, after)
    assert paired.method == "paired t" and welch.method == "Welch t"
    assert paired.estimate == pytest.approx(1.025) == pytest.approx(welch.estimate)
    assert paired.low > 0.5 and welch.low < -3          # pairing removes the seed effect
    assert analysis.compare(before, after, before_seeds=[0, 1, 2, 3], after_seeds=[0, 1, 2, 3],
                            paired=False).method == "Welch t"
    # pairing over the shared seeds only (3 of 4): the estimate is theirs
    part = analysis.compare(before, after, before_seeds=[0, 1, 2, 3], after_seeds=[0, 1, 2, 9])
    assert part.method == "paired t" and part.n == 3 and part.estimate == pytest.approx((1 + 1.2 + 0.8) / 3)
    few = analysis.compare(before, after, before_seeds=[0, 1, 2, 3], after_seeds=[0, 1, 8, 9], paired=True)
    assert few.reason == "too few seeds (2; need 3)"
    assert analysis.compare([1.0, 2.0], [5.0, 6.0, 7.0]).reason == "too few seeds (2; need 3)"
    with pytest.raises(ValueError, match="paired=True needs"):
        analysis.compare(before, after, paired=True)
    # a confidence level is a parameter: a 99% interval holds the 95% one
    wide = analysis.compare(before, after, before_seeds=range(4), after_seeds=range(4), confidence=0.99)
    assert wide.low < paired.low and wide.high > paired.high


@pytest.mark.parametrize("low, high, expected", [
    (1.5, 4.0, "significant gain"), (-0.5, 0.8, "gain below threshold"), (-3.0, 0.9, "gain below threshold"),
    (0.2, 2.5, "inconclusive"), (-4.0, -1.5, "significant loss"), (-2.0, 1.5, "inconclusive")])
def test_verdict_reads_the_interval(low, high, expected):
    iv = analysis.Interval((low + high) / 2, low, high, 0.5, 4.0, 5, "t")
    assert analysis.verdict(iv, 1.0) == expected


def test_verdicts_on_known_effects():
    df = synthetic(rng=np.random.default_rng(1))
    size = analysis.diminishing_returns(df, "model_size")
    # 3 tasks x 3 volumes x 2 steps x 2 epochs x 2 consecutive pairs, externals left out
    assert len(size) == 72 and (size["verdict"] == "significant gain").all()
    assert list(size.loc[0, ["from", "to"]]) == ["small", "base"] and size["paired"].all()
    assert size["change"].mean() == pytest.approx(3.0, abs=0.1)
    data = analysis.diminishing_returns(df, "data_volume")    # +0.2: never shown to buy 1 point
    assert set(data["verdict"]) == {"gain below threshold", "inconclusive"}
    assert (data.loc[data.verdict == "gain below threshold", "ci_high"] < 1.0).all()
    assert (data.loc[data.verdict == "inconclusive", "ci_high"] >= 1.0).all()
    assert set(zip(data["from"], data["to"])) == {("1%", "10%"), ("10%", "100%")}
    epochs = analysis.diminishing_returns(df, "epochs", threshold=0.0)
    assert (epochs[epochs.model_size.isna()]["model"] == "allenai/scibert").all()
    assert len(epochs) == 3 * (3 * 3 * 2 + 1)
    # A real loss: fewer epochs are better by 3 points.
    loss = analysis.diminishing_returns(synthetic(epochs_gain=-3.0, rng=np.random.default_rng(2)), "epochs")
    assert (loss["verdict"] == "significant loss").all()


def test_threshold_is_the_papers_question():
    """A sure +0.6 gain is significant at threshold 0, not against the paper's 1 point."""
    df = synthetic(size_gain=0.6, noise=0.05, rng=np.random.default_rng(3))
    assert (analysis.diminishing_returns(df, "model_size", threshold=0.0)["verdict"] == "significant gain").all()
    assert (analysis.diminishing_returns(df, "model_size")["verdict"] == "gain below threshold").all()


def test_levels_ordered_by_parameters_and_tokens_not_names():
    sizes = {"zeta": 10_000_000, "alpha": 900_000_000}        # alphabetical order is the wrong order
    volumes = {"2.2B": 2_200_000_000, "300M": 300_000_000}
    df = synthetic(sizes=sizes, volumes=volumes, rng=np.random.default_rng(4))
    size = analysis.diminishing_returns(df, "model_size")
    assert set(zip(size["from"], size["to"])) == {("zeta", "alpha")}
    assert (size["verdict"] == "significant gain").all()
    data = analysis.diminishing_returns(df, "data_volume", threshold=0.0)
    assert set(zip(data["from"], data["to"])) == {("300M", "2.2B")}


def test_binomial_tolerance():
    """The coverage tests below accept [lo, hi]: 99.9% of counts of a true 95% rate over 200 draws."""
    cdf = np.cumsum([math.comb(200, k) * 0.95**k * 0.05 ** (200 - k) for k in range(201)])
    lo, hi = np.searchsorted(cdf, 0.0005) / 200, np.searchsorted(cdf, 0.9995) / 200
    assert (lo, hi) == (0.895, 0.99)


@pytest.mark.parametrize("kind, seeds", [("cell", 5), ("cell", 3), ("paired", 5), ("paired", 3),
                                         ("independent", 5), ("macro", 3)])
def test_intervals_cover_the_truth(kind, seeds):
    """200 independent replicates of a `seeds`-seed experiment (200 tasks of one synthetic study); the
    95% interval must cover the true value at a rate inside the binomial band of test_binomial_tolerance
    (0.895-0.99). At 3 seeds, the fewest that get an interval, a normal-quantile interval would cover
    only about 0.81 and fail this; Student's t is exact for normal noise."""
    rng = np.random.default_rng({"cell": 10, "paired": 11, "independent": 12, "macro": 13}[kind] + seeds)
    tasks = {f"t{i:03d}": ("cls", "d", 70.0) for i in range(200 if kind != "macro" else 400)}
    df = synthetic(rng=rng, tasks=tasks, sizes=dict(list(SIZES.items())[:2]), volumes={"10%": 1},
                   steps=(1000,), epochs=(1,), externals=(), noise=0.5, seeds=seeds)
    if kind == "cell":
        rows = analysis.cell_stats(df)
        rows, truth = rows[rows.model_size == "small"], 70.0
    elif kind == "macro":    # pairs of tasks averaged: 200 macro rows per size
        df["task_type"] = df["task"].map(lambda t: f"g{int(t[1:]) // 2}")
        rows = analysis.macro_average(df, "task_type")
        rows, truth = rows[rows.model_size == "small"], 70.0
        assert (rows["n_tasks"] == 2).all()
    else:
        if kind == "independent":    # different seed ids: no pairing possible
            df.loc[df.model_size == "base", "seed"] += 100
        rows, truth = analysis.diminishing_returns(df, "model_size"), 3.0
        assert (rows["paired"] == (kind == "paired")).all()
    assert len(rows) == 200 and rows["ci_low"].notna().all()
    coverage = ((rows["ci_low"] <= truth) & (truth <= rows["ci_high"])).mean()
    assert 0.895 <= coverage <= 0.99, coverage


def test_macro_average_by_type_and_domain():
    df = synthetic(noise=0.0)
    by_type = analysis.macro_average(df, "task_type")
    top = by_type[(by_type.task_type == "ner") & (by_type.model_size == "large") & (by_type.data_volume == "100%")
                  & (by_type.steps == 2000) & (by_type.epochs == 3)]
    assert top["mean"].item() == pytest.approx(86.9) and top["n_tasks"].item() == 1
    two = synthetic(noise=0.0, tasks={**TASKS, "jnlpba_ner": ("ner", "biomedicine", 70.0)})
    by_domain = analysis.macro_average(two, "domain")
    row = by_domain[(by_domain.domain == "biomedicine") & (by_domain.model == "allenai/scibert")
                    & (by_domain.epochs == 1)]
    assert row["mean"].item() == pytest.approx(76.0) and row["tasks"].item() == "bc5cdr_ner,jnlpba_ner"


def test_one_or_two_seeds_and_missing_cells():
    for seeds in (1, 2):
        df = synthetic(seeds=seeds)
        assert analysis.cell_stats(df)["ci_low"].isna().all()
        size = analysis.diminishing_returns(df, "model_size")
        assert (size["verdict"] == "too few seeds").all() and size["ci_low"].isna().all()
        assert size["change"].notna().all() and (size["note"] == f"too few seeds ({seeds}; need 3)").all()
        assert analysis.macro_average(df, "task_type")["ci_low"].isna().all()
    # Drop the middle size for one task: that task compares small -> large directly.
    df = synthetic(rng=np.random.default_rng(5))
    df = df[~((df.task == "scierc_re") & (df.model_size == "base"))]
    size = analysis.diminishing_returns(df, "model_size")
    re_rows = size[size.task == "scierc_re"]
    assert set(zip(re_rows["from"], re_rows["to"])) == {("small", "large")}
    assert re_rows["change"].mean() == pytest.approx(6.0, abs=0.2)
    # One seed missing in one cell: paired over the 4 seeds both cells have.
    df = synthetic(rng=np.random.default_rng(6))
    df = df.drop(df[(df.model_size == "base") & (df.seed == 0)].index)
    size = analysis.diminishing_returns(df, "model_size")
    assert size["paired"].all() and size["ci_low"].notna().all()
    assert set(size.loc[size["from"] == "base", "n_from"]) == {4}


def test_collapsed_runs_are_left_out_and_counted():
    """A collapsed seed scoring 0 would sink a cell; by default it is left out, counted, and can be let in."""
    df = synthetic(rng=np.random.default_rng(9), tasks={"scierc_re": TASKS["scierc_re"]}, externals=(), noise=0.2)
    hit = (df.model_size == "large") & (df.seed.isin([0, 1]))      # two of five seeds of every large cell
    df.loc[hit, "test_f1"], df.loc[hit, "collapsed"] = 0.0, True
    cells = analysis.cell_stats(df)
    large = cells[cells.model_size == "large"]
    assert (large["n"] == 3).all() and (large["n_collapsed"] == 2).all() and (large["n_jobs"] == 5).all()
    assert (large["mean"] > 60).all()
    assert (analysis.cell_stats(df, include_collapsed=True).query("model_size == 'large'")["mean"] < 50).all()
    size = analysis.diminishing_returns(df, "model_size")
    up = size[size["to"] == "large"]
    assert (up["verdict"] == "significant gain").all() and (up["n_collapsed_to"] == 2).all() and up["paired"].all()
    with_them = analysis.diminishing_returns(df, "model_size", include_collapsed=True)
    assert not (with_them.loc[with_them["to"] == "large", "verdict"] == "significant gain").any()
    # three collapsed seeds leave two: too few to decide, and the row says collapsed runs were left out
    df.loc[(df.model_size == "large") & (df.seed == 2), "collapsed"] = True
    up = analysis.diminishing_returns(df, "model_size").query("to == 'large'")
    assert (up["verdict"] == "too few seeds").all() and (up["n_collapsed_to"] == 3).all()
    table = analysis.table_rows(df)
    assert table.n_collapsed == 3 * 3 and len(table.jobs) == 9 * 5 and len(table.rows) == 45 - 9   # 3 large models
    assert "collapsed runs left out (9 of 45 jobs; --include-collapsed counts them)" in table.definition()


def test_table_rows_hold_other_factors_at_their_largest_level():
    df = synthetic(noise=0.0)
    table = analysis.table_rows(df, ("task", "model"))
    assert table.fixed == {"steps": 2000, "epochs": 3}
    assert set(table.rows["epochs"]) == {3} and set(table.rows["steps"].dropna()) == {2000}
    assert (table.rows["model_source"] == "external").sum() == 3 * 5          # 3 tasks x 5 seeds, no steps
    assert table.definition().startswith("test_f1 in points (100 x the fraction), mean over seeds; every factor "
                                         "not in the table at the study's largest level (pretraining steps 2000, "
                                         "finetuning epochs 3")
    by_size = analysis.table_rows(df, ("task", "model_size"))
    assert by_size.fixed == {"data_volume": "100%", "steps": 2000, "epochs": 3}
    assert analysis.model_order(table.rows) == [*(f"{s}-{v}" for s in SIZES for v in VOLUMES), "allenai/scibert"]


def test_pretraining_vs_none_compares_the_control_with_the_largest_steps_level():
    df = synthetic(control_gap=4.0, steps_gain=0.5, size_gain=0.0, data_gain=0.0, epochs_gain=0.0,
                   sizes={"small": SIZES["small"]}, volumes={"1%": VOLUMES["1%"]}, noise=0.5)
    out = analysis.pretraining_vs_none(df)
    assert len(out) == 3 * 2  # per task and epochs level, for the one size and volume
    assert set(out["factor"]) == {analysis.CONTROL} and set(out["from"]) == {"none"} and set(out["to"]) == {"2,000 steps"}
    assert (out["from_x"] == 0).all() and (out["to_x"] == 2000).all() and out["paired"].all()
    assert out["change"].to_numpy() == pytest.approx(4.0, abs=1.5)
    assert set(out["verdict"]) == {"significant gain"}
    # the control is no steps level: steps compare 1000 -> 2000 only
    steps = analysis.diminishing_returns(df, "steps")
    assert set(zip(steps["from"], steps["to"])) == {(1000, 2000)}
    # model size, volume and epochs compare the control arm's cells among themselves too
    assert analysis.is_control(df).sum() == 3 * 2 * 5
    assert analysis.pretraining_vs_none(synthetic()).empty  # no control arm: no rows, the same columns
    assert list(analysis.pretraining_vs_none(synthetic()).columns) == list(out.columns)
    small_gap = analysis.pretraining_vs_none(synthetic(control_gap=0.0, noise=0.3, sizes={"small": 1},
                                                       volumes={"1%": 1}))
    assert set(small_gap["verdict"]) == {"gain below threshold"}


def test_table_rows_keep_the_control_arm_as_a_model_of_its_own():
    df = synthetic(control_gap=3.0, noise=0.0)
    table = analysis.table_rows(df, ("task", "model"))
    assert set(table.rows["steps"].dropna()) == {0, 2000} and table.control
    assert "pretraining steps 2000 (0 for the control arm: no pretraining)" in table.definition()
    assert "small-1% | no pretraining" in analysis.model_order(table.rows)
    by_size = analysis.table_rows(df, ("task", "model_size"))  # a size column would mix both arms: not kept
    assert set(by_size.rows["steps"].dropna()) == {2000} and not by_size.control


def test_bad_input_is_one_clear_error():
    df = synthetic()
    with pytest.raises(UserError, match="fraction in"):
        analysis.cell_stats(df.assign(test_f1=df["test_f1"] * 100))
    with pytest.raises(UserError, match="allowed: model_size, data_volume, steps, epochs"):
        analysis.diminishing_returns(df, "task")
    with pytest.raises(UserError, match="threshold must be F1 points >= 0; got -1"):
        analysis.diminishing_returns(df, "epochs", threshold=-1)
    with pytest.raises(UserError, match="no column 'f1'"):
        analysis.cell_stats(df, metric="f1")


def _power_frame(e, a, alpha, xs, noise, rng, seeds=3):
    rows = [{"task": "t", "task_type": "ner", "domain": "d", "model_source": "pretrained", "model": f"m{x:g}",
             "model_size": f"s{x:g}", "parameters": x, "seed": s,
             "test_f1": (100 - e - a * x ** -alpha + rng.normal(0, noise)) / 100}
            for x in xs for s in range(seeds)]
    return pd.DataFrame(rows)


def test_power_law_recovers_known_parameters():
    e, a, alpha = 8.0, 3000.0, 0.35
    xs = np.geomspace(1e5, 1e9, 9)
    fit = analysis.fit_power_law(_power_frame(e, a, alpha, xs, 0.05, np.random.default_rng(7)), x="parameters")
    row = fit.iloc[0]
    assert row["status"] == "ok"
    assert row["E"] == pytest.approx(e, abs=4 * row["E_se"] + 0.05)
    assert row["alpha"] == pytest.approx(alpha, abs=4 * row["alpha_se"] + 0.01)
    assert row["A"] == pytest.approx(a, rel=0.2)
    reducible = a * xs.max() ** -alpha                    # 2.1 points left to gain at 1e9
    expected = ((reducible - 1.0) / reducible) ** (-1 / alpha)   # 6.2x more parameters for the next one
    assert row["next_gain_x"] == pytest.approx(expected, rel=0.25)
    assert row["next_gain_x_low"] <= row["next_gain_x"] <= row["next_gain_x_high"]


def test_power_law_says_never_near_the_asymptote():
    rng = np.random.default_rng(8)
    fit = analysis.fit_power_law(_power_frame(10.0, 30.0, 0.5, np.geomspace(1e2, 1e6, 7), 0.01, rng),
                                 x="parameters").iloc[0]
    assert fit["next_gain_x"] == math.inf            # reducible error at 1e6 is 0.03 points
    fit = analysis.fit_power_law(_power_frame(10.0, 30.0, 0.5, np.geomspace(1, 100, 7), 0.01, rng),
                                 x="parameters").iloc[0]
    assert 1 < fit["next_gain_x"] < math.inf          # reducible error at 100 is 3 points: 1.78x more


def test_power_law_needs_enough_points_and_skips_externals():
    df = synthetic()
    fit = analysis.fit_power_law(df, x="parameters")        # 3 sizes: not enough for 3 parameters + noise
    assert (fit["status"].str.startswith("too few points")).all() and len(fit) == 3
    fit = analysis.fit_power_law(df, x="pretrain_flops")   # 3 sizes x 2 steps = 6 compute levels
    assert (fit["n_points"] == 6).all() and not fit["status"].str.startswith("too few").any()


def test_flat_frontier_is_not_estimable_not_an_error():
    """Best F1 31.8-32.8 over 4 compute levels (a study seen in the wild): no overflow, no made-up
    numbers; the status says why, and no estimate with a standard error above it is returned."""
    rows = [{"task": "t", "model_source": "pretrained", "model": f"m{i}", "model_size": f"s{i}", "seed": s,
             "pretrain_flops": flops, "test_f1": f1 + 0.002 * (s - 1)}
            for i, (flops, f1) in enumerate(zip((1e15, 1e16, 1e17, 1e18), (0.318, 0.328, 0.321, 0.325)))
            for s in range(3)]
    fit = analysis.fit_power_law(pd.DataFrame(rows)).iloc[0]
    assert fit["status"].startswith("not estimable: ") and "frontier F1 31.8-32.8 over 4 levels" in fit["status"]
    assert "standard errors above the estimates" in fit["status"]
    assert pd.isna(fit["next_gain_x"]) and pd.isna(fit["f1_limit"])


@pytest.mark.parametrize("log_a0, alpha", [(1e4, 5.0), (50.0, 1e-9), (-1e4, 3.0), (50.0, 0.0), (3.0, -2.0)])
def test_next_gain_multiple_never_overflows(log_a0, alpha):
    """Draws from a loose fit's covariance reach parameters like these; each gives a number."""
    multiple = analysis.next_gain_multiple(10.0, log_a0, alpha, 1e20, 1e15, 1.0)
    assert multiple >= 1.0 or math.isnan(multiple)
    assert analysis.next_gain_multiple(10.0, 2.0, 0.5, 1e15, 1e15, 0.0) == 1.0     # threshold 0: any more x
