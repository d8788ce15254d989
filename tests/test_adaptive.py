"""Adaptive seeds: the spent levels, wrong verdicts on synthetic studies with known effects, the
waves, and a study's runs (scaling_study.adaptive). All pure: no Ray, no torch."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest

from scaling_study import adaptive, analysis
from scaling_study.grid import expand
from scaling_study.spec import AdaptiveSeeds, spec_from_data

from conftest import BASE_SPEC


def one_step_design(tasks: int) -> adaptive.Design:
    """`tasks` independent comparisons: model size small -> large on each task, one epochs level."""
    rows = [{"cell": (t, size), "group": (t, size), "label": f"{size} | t{t}", "model_source": "pretrained",
             "model": f"{size} | 100%", "model_size": size, "parameters": params, "data_volume": "100%",
             "steps": 10, "epochs": 1, "task": f"t{t}", "task_type": "ner"}
            for t in range(tasks) for size, params in (("small", 1), ("large", 2))]
    return adaptive.Design.from_cells(pd.DataFrame(rows))


def two_level_design(tasks: int) -> adaptive.Design:
    """Model size small -> large at epochs 1 and 2 on each task, one run per size scoring both epochs:
    4 comparisons per task over 2 groups, so a comparison that stops asking still gets the seeds
    the other comparisons of its groups ask for."""
    rows = [{"cell": (t, size, e), "group": (t, size), "label": f"{size} | t{t}", "model_source": "pretrained",
             "model": f"{size} | 100%", "model_size": size, "parameters": params, "data_volume": "100%",
             "steps": 10, "epochs": e, "task": f"t{t}", "task_type": "ner"}
            for t in range(tasks) for size, params in (("small", 1), ("large", 2)) for e in (1, 2)]
    return adaptive.Design.from_cells(pd.DataFrame(rows))


def normal_draw(truth: dict, rng, sd: float = 1.0, design: adaptive.Design | None = None):
    """Normal seed noise of sd `sd` per cell; with a `design`, half its variance shared by a run's cells."""
    if design is None:
        return lambda group, seed: {group: (truth[group] + sd * rng.standard_normal(), False)}
    cells = {}
    for cell, group in design.group_of.items():
        cells.setdefault(group, []).append(cell)

    def draw(group, seed):
        run = rng.standard_normal()
        return {c: (truth[c] + sd * (run + rng.standard_normal()) / 2**0.5, False) for c in cells[group]}

    return draw


def wrong_share(rule, *, tasks: int, change: float, seed: int, naive: bool = False,
                shared: bool = False) -> tuple[float, float]:
    """(share of wrong verdicts, mean seeds per group) when every comparison's true change is `change`;
    `shared`: on `two_level_design` (comparisons share groups), else on `one_step_design`."""
    if shared:
        design = two_level_design(tasks)
        truth = {cell: 50.0 + change * ((cell[1] == "large") + (cell[2] == 2)) for cell in design.group_of}
    else:
        design = one_step_design(tasks)
        truth = {(t, size): 50.0 + (change if size == "large" else 0.0) for t in range(tasks)
                 for size in ("small", "large")}
    waves = adaptive.SeedWaves(design, rule)
    if naive:  # the uncorrected rule: a fixed 95% interval at every wave
        waves.levels = dict.fromkeys(waves.levels, 0.95)
    draw, todo = normal_draw(truth, np.random.default_rng(seed), design=design if shared else None), waves.step()
    while todo:
        for group, s in todo:
            waves.record(group, s, draw(group, s))
        todo = waves.step()
    verdicts = waves.comparisons()["verdict"]
    tau = rule.threshold
    wrong = ((verdicts == "significant gain") & (change <= tau)) | ((verdicts == "gain below threshold") & (change >= tau)) \
        | ((verdicts == "significant loss") & (change >= -tau))
    return float(wrong.mean()), float(np.mean(list(waves.seeds_run().values())))


def test_levels_spend_the_error_over_the_waves():
    """Fresh sequences of paired normal differences (any change, any spread): the share whose interval
    misses the truth at some wave 3..10 is the nominal 5% with the spent levels, ~3x that without."""
    from scipy.special import stdtrit

    levels = adaptive.look_confidences(3, 10, 0.95)
    assert list(levels) == list(range(3, 11)) and all(0.95 < c < 1 for c in levels.values())
    rng = np.random.default_rng(7)
    n_seq, last = 40_000, 10
    loc, scale = rng.uniform(-5, 5, n_seq), rng.uniform(0.5, 3, n_seq)
    x = loc[:, None] + scale[:, None] * rng.standard_normal((n_seq, last))
    n = np.arange(1, last + 1)
    mean = x.cumsum(axis=1) / n
    sd = np.sqrt(((x**2).cumsum(axis=1) - n * mean**2) / np.maximum(n - 1, 1))
    miss_spent = np.zeros(n_seq, dtype=bool)
    miss_naive = np.zeros(n_seq, dtype=bool)
    for k in range(3, last + 1):
        err = np.abs(mean[:, k - 1] - loc) / (sd[:, k - 1] / np.sqrt(k))
        miss_spent |= err > stdtrit(k - 1, 0.5 + levels[k] / 2)
        miss_naive |= err > stdtrit(k - 1, 0.975)
    assert 0.044 < miss_spent.mean() < 0.056, miss_spent.mean()
    assert miss_naive.mean() > 0.10, miss_naive.mean()


RULE = AdaptiveSeeds(min=2, max=10)


@pytest.mark.parametrize("futility", [0.0, RULE.futility])
def test_wrong_verdicts_stay_within_the_nominal_rate(futility):
    """1,200 comparisons whose true change is exactly the threshold, where every settled verdict is
    wrong (the hardest case): the rule's wrong share stays within 5% (plus 2.5 binomial sd); the same
    waves with an uncorrected 95% interval at each go well beyond it."""
    rule = dataclasses.replace(RULE, futility=futility)
    share, _ = wrong_share(rule, tasks=1200, change=rule.threshold, seed=1)
    assert share <= 0.05 + 2.5 * (0.05 * 0.95 / 1200) ** 0.5, share
    naive, _ = wrong_share(rule, tasks=1200, change=rule.threshold, seed=1, naive=True)
    assert naive > 0.08, naive


def test_free_seeds_keep_the_error_within_the_nominal_rate():
    """Comparisons that share groups (`two_level_design`, every true change on the threshold): the
    ones that stopped asking are judged again on the seeds the others get, more looks than they
    asked for; the wrong share still stays within 5% (plus 2.5 binomial sd over the 600 tasks: a
    task's 4 comparisons share runs), and the waves with uncorrected 95% intervals go well beyond it."""
    share, _ = wrong_share(RULE, tasks=600, change=RULE.threshold, seed=2, shared=True)
    assert share <= 0.05 + 2.5 * (0.05 * 0.95 / 600) ** 0.5, share
    naive, _ = wrong_share(RULE, tasks=600, change=RULE.threshold, seed=2, shared=True, naive=True)
    assert naive > 0.08, naive


def test_stopped_comparisons_are_judged_on_free_seeds():
    """A futile comparison is judged on every seed both its groups got for other comparisons (some
    then settle), a gain below the threshold reaching below minus it too; a settled verdict never
    turns back to inconclusive; the seeds spent are those of the comparisons that asked."""
    design = two_level_design(100)
    rng = np.random.default_rng(2)
    truth = adaptive.synthetic_truth(design, rng)
    waves = adaptive.simulate(design, RULE, adaptive.synthetic_draw(design, truth, rng, {"ner": 2.0}))
    table, seeds = waves.comparisons(), waves.seeds_run()
    free = pd.Series([min(min(seeds[design.group_of[c]] for c in comp.cells), RULE.max) for comp in design.comparisons])
    refinable = (table["verdict"] == "gain below threshold") & (table["ci_low"] <= -RULE.threshold)
    futile = table["status"] == "futile"
    assert futile.sum() > 50 and (table["seeds"][futile] > table["futile_after"][futile]).sum() > 20
    assert (table["seeds"][futile | refinable] == free[futile | refinable]).all()
    assert (table["settled_after"] > table["futile_after"]).fillna(False).any()
    assert table["verdict"][table["status"] == "settled"].isin(adaptive.SETTLED).all()
    # what the groups got is what the open comparisons asked for: seed n + 1 only after a wave n
    # at which one of the group's comparisons was neither settled nor futile
    asked = dict.fromkeys(design.groups, RULE.min)
    for wave in waves.waves.values():
        for g in wave["given_another_seed"]:
            asked[g] += 1
    assert asked == seeds


def test_clear_changes_settle_early_and_right():
    """A 10-point gain with 1 point of seed noise settles after 3 seeds mostly, always as a gain; a
    change on the threshold keeps asking for seeds until futility stops it."""
    design = one_step_design(200)
    truth = {(t, size): 50.0 + (10.0 if size == "large" else 0.0) for t in range(200) for size in ("small", "large")}
    table = adaptive.simulate(design, RULE, normal_draw(truth, np.random.default_rng(3))).comparisons()
    assert (table["verdict"] == "significant gain").all()
    assert table["settled_after"].mean() < 3.5 and table["settled_after"].max() <= 5
    _, seeds = wrong_share(RULE, tasks=200, change=RULE.threshold, seed=4)
    assert 3 < seeds < RULE.max


def test_waves_release_a_prefix_only_where_a_comparison_is_open():
    """Task 0 has a clear gain, task 1 a change on the threshold with much noise: both get seeds 0-1,
    then seed 2 (the first interval needs 3); then only task 1's cells get more, one wave at a time."""
    design = one_step_design(2)
    rule = dataclasses.replace(RULE, futility=0.0, max=6)
    waves = adaptive.SeedWaves(design, rule)
    truth = {(0, "small"): 50.0, (0, "large"): 60.0, (1, "small"): 50.0, (1, "large"): 51.0}
    rng = np.random.default_rng(5)

    def draw(group, seed):
        return {group: (truth[group] + (0.1 if group[0] == 0 else 8.0) * rng.standard_normal(), False)}

    released = []
    todo = waves.step()
    assert sorted(todo) == sorted((g, s) for g in design.groups for s in (0, 1))
    while todo:
        released += todo
        for group, s in sorted(todo, key=lambda x: -x[1]):  # out of order: the prefix decides, not arrival
            waves.record(group, s, draw(group, s))
        todo = waves.step()
    seeds = waves.seeds_run()
    assert seeds[(0, "small")] == seeds[(0, "large")] == 3 and seeds[(1, "small")] == seeds[(1, "large")] == 6
    for group in design.groups:  # a prefix, each seed once
        assert sorted(s for g, s in released if g == group) == list(range(seeds[group]))
    log = waves.log()
    assert [w["seeds"] for w in log["waves"]] == [2, 3, 4, 5]
    assert [s["verdict"] for s in log["waves"][1]["settled"]] == ["significant gain"]
    assert sorted(log["waves"][1]["given_another_seed"]) == ["large | t1", "small | t1"]
    assert {c["status"] for c in log["comparisons"]} == {"settled", "max seeds"}


def test_a_lost_run_stops_its_comparisons():
    design = one_step_design(1)
    waves = adaptive.SeedWaves(design, dataclasses.replace(RULE, futility=0.0))
    for group, s in waves.step():
        waves.record(group, s, {group: (50.0 + s, False)})
    assert sorted(waves.step()) == [((0, "large"), 2), ((0, "small"), 2)]
    waves.lose((0, "large"), 2)
    waves.record((0, "small"), 2, {(0, "small"): (50.0, False)})
    assert waves.step() == [] and waves.comparisons()["status"].tolist() == ["stopped"]


def adaptive_spec(**rule) -> dict:
    spec = copy.deepcopy(BASE_SPEC)
    spec["finetune"]["seeds"] = {"adaptive": {"min": 2, "max": 4, **rule}}
    return spec


def test_the_plan_holds_every_seed_with_the_fixed_ids():
    """An adaptive study's plan is that of `seeds: [0 .. max-1]`: re-running it, or turning it into that
    fixed study, reuses every finished job."""
    fixed = copy.deepcopy(BASE_SPEC)
    fixed["finetune"]["seeds"] = [3, 1, 0, 2]
    assert set(expand(spec_from_data(adaptive_spec())).nodes) == set(expand(spec_from_data(fixed)).nodes)


def test_design_from_plan_matches_diminishing_returns():
    """The comparisons judged while a study runs are those `diminishing_returns` makes of its results."""
    study = spec_from_data(adaptive_spec())
    plan = expand(study)
    design = adaptive.design_from_plan(study, plan)
    assert len(design.groups) == len(plan.of_kind("finetune_run")) // 4  # runs per group: max seeds
    cells = design.cells.assign(test_f1=0.5, seed=0)
    expected = sum(len(analysis.diminishing_returns(cells, factor)) for factor in analysis.FACTOR_ORDER)
    assert len(design.comparisons) == expected > 0
    by_factor = pd.Series([c.factor for c in design.comparisons]).value_counts().to_dict()
    # 2 sizes x 2 volumes x 2 steps x 2 epochs x 3 tasks: 8 comparisons of each factor per task
    assert by_factor == {"model_size": 24, "data_volume": 24, "steps": 24, "epochs": 24}


def test_study_seeds_fixed_and_adaptive():
    study = spec_from_data(copy.deepcopy(BASE_SPEC))
    plan = expand(study)
    runs = plan.of_kind("finetune_run")
    fixed = adaptive.StudySeeds(study, plan, {runs[0].id}, read=lambda run: None)
    assert [n.id for n in fixed.release()] == [n.id for n in runs[1:]] and fixed.release() == []
    assert fixed.log() is None
    study = spec_from_data(adaptive_spec())
    plan = expand(study)
    seeds = adaptive.StudySeeds(study, plan, (), read=lambda run: None)
    first = seeds.release()
    assert {n.inputs["seed"] for n in first} == {0, 1} and len(first) == len(plan.of_kind("finetune_run")) // 2
    for run in first:  # no readable DONE.json: as good as lost, its comparisons stop
        seeds.finished(run)
    assert seeds.release() == [] and len(seeds.unreleased()) == len(plan.of_kind("finetune_run")) // 2


def test_the_searcher_packs_runs_and_releases_waves():
    """orchestration.ReadyFinetunes driven as Tune drives it (suggest, results, completion), with
    finished runs' DONE.json made up: trials pack runs of one model, a task's together, at most a share of
    the ready runs per slot; each run is handed out once; the waves give every group a prefix of
    seeds; FINISHED only when nothing is left."""
    from ray.tune.search import Searcher

    from scaling_study.searcher import ReadyFinetunes
    from scaling_study.studystate import StudyState

    study = spec_from_data(adaptive_spec())
    plan = expand(study)
    rng, saved = np.random.default_rng(0), {}
    size_gain = {"debug": 0.0, "tiny": 5.0}

    def done(run):
        f1 = (50 + size_gain[run.factors["model_size"]] + rng.normal(0, 1.0)) / 100
        saved[run.id] = {"results": [{"epochs": e, "test": {"f1": f1 + e / 100}, "collapse": False}
                                     for e in (1, 2)]}

    state = StudyState(plan, {})
    seeds = adaptive.StudySeeds(study, plan, (), read=lambda run: saved.get(run.id))
    searcher = ReadyFinetunes(seeds, seeds.release(), lambda node: True, lambda pack: {"runs": pack}, state,
                              lambda: 2)
    handed, trial, mixed = [], 0, 0
    while True:
        got = searcher.suggest(str(trial))
        if got is Searcher.FINISHED:
            break
        assert got is not None  # every model is ready: nothing to wait for
        pack = got["runs"]
        assert len({n.parents[0] for n in pack}) == 1 and len(pack) <= 6
        tasks = [n.factors["task"] for n in pack]
        assert tasks == sorted(tasks)  # a task's runs one after the other: its encoding is made once
        mixed += len(set(tasks)) > 1
        handed += pack
        for node in pack:
            done(node)
            searcher.on_trial_result(str(trial), {"node": node.id, "test_f1": 0.5, "failure": ""})
        searcher.on_trial_complete(str(trial), {"node": pack[-1].id, "failure": ""})
        trial += 1
    assert len(handed) == len({n.id for n in handed}) and trial < len(handed)  # packed, each once
    assert mixed  # one process for several tasks of a model
    by_group = {}
    for node in handed:
        by_group.setdefault(adaptive.run_group(node), []).append(node.inputs["seed"])
    assert all(sorted(s) == list(range(len(s))) and len(s) >= 2 for s in by_group.values())
    assert len(handed) + len(seeds.unreleased()) == len(plan.of_kind("finetune_run"))
    assert all(state.state[c.id] == "done" for n in handed for c in plan.children(n.id))


def test_the_searcher_oversubscribes_only_when_nothing_waits_for_cpus():
    """Without max_concurrent, twice the slots are handed out (an autoscaler's demand), but not while
    a build or pretraining run still waits: a pending trial would take the CPUs it frees."""
    from scaling_study.searcher import ReadyFinetunes
    from scaling_study.studystate import StudyState

    study = spec_from_data(adaptive_spec())
    plan = expand(study)
    handed = {}
    for waiting in (True, False):
        seeds = adaptive.StudySeeds(study, plan, (), read=lambda run: None)
        searcher = ReadyFinetunes(seeds, seeds.release(), lambda node: True, lambda pack: {"runs": pack},
                                  StudyState(plan, {}), lambda: 1, reserved=lambda: waiting)
        handed[waiting] = sum(searcher.suggest(str(t)) is not None for t in range(4))
    assert handed == {True: 1, False: 2}
