"""Analysis on synthetic grids with known effects: verdicts, interval coverage, power-law recovery."""

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
              externals=("allenai/scibert",)) -> pd.DataFrame:
    """A results.load-shaped frame: F1 = base + size_gain per size level + data_gain per volume level
    + steps_gain per steps level + epochs_gain per epochs level + N(0, noise) per job (fractions)."""
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
    assert len(cells) == len(df) / 5 and (cells["n"] == 5).all()
    top = cells[(cells.task == "bc5cdr_ner") & (cells.model_size == "large") & (cells.data_volume == "100%")
                & (cells.steps == 2000) & (cells.epochs == 3)]
    assert top["mean"].item() == pytest.approx(80 + 6 + 0.4 + 0.5)
    assert top["sd"].item() == pytest.approx(0.0, abs=1e-9)
    assert top["ci_low"].item() == pytest.approx(top["mean"].item())
    ext = cells[cells.model_source == "external"]
    assert len(ext) == 6 and ext["model_size"].isna().all() and ext["parameters"].isna().all()


def test_verdicts_on_known_effects():
    df = synthetic(rng=np.random.default_rng(1))
    size = analysis.diminishing_returns(df, "model_size")
    # 3 tasks x 3 volumes x 2 steps x 2 epochs x 2 consecutive pairs, externals left out
    assert len(size) == 72 and (size["verdict"] == "significant gain").all()
    assert list(size.loc[0, ["from", "to"]]) == ["small", "base"] and size["paired"].all()
    assert size["change"].mean() == pytest.approx(3.0, abs=0.1)
    data = analysis.diminishing_returns(df, "data_volume")
    assert (data["verdict"] == "no significant gain").all()
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
    assert (analysis.diminishing_returns(df, "model_size")["verdict"] == "no significant gain").all()


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


@pytest.mark.parametrize("kind", ["cell", "paired", "independent"])
def test_intervals_cover_the_truth(kind):
    """200 independent replicates of a 5-seed experiment (200 tasks of one synthetic study); the 95%
    interval must cover the true value at a rate inside the binomial band of test_binomial_tolerance
    (0.895-0.99; a plain percentile bootstrap of 5 seeds lands near 0.85 and fails this)."""
    rng = np.random.default_rng({"cell": 10, "paired": 11, "independent": 12}[kind])
    tasks = {f"t{i:03d}": ("cls", "d", 70.0) for i in range(200)}
    df = synthetic(rng=rng, tasks=tasks, sizes=dict(list(SIZES.items())[:2]), volumes={"10%": 1},
                   steps=(1000,), epochs=(1,), externals=(), noise=0.5)
    if kind == "cell":
        rows = analysis.cell_stats(df, n_boot=1000)
        rows, truth = rows[rows.model_size == "small"], 70.0
    else:
        if kind == "independent":    # different seed ids: no pairing possible
            df.loc[df.model_size == "base", "seed"] += 100
        rows, truth = analysis.diminishing_returns(df, "model_size", n_boot=1000), 3.0
        assert (rows["paired"] == (kind == "paired")).all()
    assert len(rows) == 200
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


def test_one_seed_and_missing_cells():
    df = synthetic(seeds=1)
    assert analysis.cell_stats(df)["ci_low"].isna().all()
    assert (analysis.diminishing_returns(df, "model_size")["verdict"] == "too few seeds").all()
    # Drop the middle size for one task: that task compares small -> large directly.
    df = synthetic(rng=np.random.default_rng(5))
    df = df[~((df.task == "scierc_re") & (df.model_size == "base"))]
    size = analysis.diminishing_returns(df, "model_size")
    re_rows = size[size.task == "scierc_re"]
    assert set(zip(re_rows["from"], re_rows["to"])) == {("small", "large")}
    assert re_rows["change"].mean() == pytest.approx(6.0, abs=0.2)
    # One seed missing in one cell: no pairing, still an interval.
    df = synthetic(rng=np.random.default_rng(6))
    df = df.drop(df[(df.model_size == "base") & (df.seed == 0)].index)
    size = analysis.diminishing_returns(df, "model_size")
    assert not size["paired"].any() and size["ci_low"].notna().all()


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
    assert (fit["status"] == "ok").all() and (fit["n_points"] == 6).all()
