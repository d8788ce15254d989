"""A study's results as one self-contained HTML page, with its figures beside it for a paper.

    scaling-study report scholarbert -o scholarbert.html      # the CLI; --threshold 1.0, --include-collapsed

    from scaling_study import report
    report.build("scholarbert")                               # results.load + render -> studies/scholarbert/report.html
    report.render(df, curves, "out.html", title="My study")  # from DataFrames you already have

The page needs nothing but the file: plots are SVGs embedded as base64 (matplotlib, no pyplot
state), styles are inline, there is no script, font or other request. Every figure is also written
to a folder beside the page (`out-figures/` for `out.html`), as SVG and as 300-dpi PNG, with the
tasks' display names, for a paper to use as it is. Sections: a summary generated from the verdicts,
the paper's table (`analysis.table_rows`: task x model at every other factor's largest level, mean
± sd F1 points over seeds, with macro averages by task type and domain: the same numbers as
`scaling-study results --pivot task model`), the collapsed share per task and per cell, F1 against
model size, data volume, pretraining steps and finetuning epochs per task with 95% t-interval bands,
a heatmap of the diminishing-returns verdicts, power-law fits against pretraining compute, and the
pretraining loss curves; for a study with adaptive seeds, each wave's decisions and every
comparison's ("settled after 3 seeds"). Collapsed runs are left out of the table, verdicts and fits unless
`include_collapsed`; the page says how many.

The report never stops on the data's shape: a section that cannot be computed or drawn says so,
with the error, and the rest of the page is written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from scaling_study import analysis
from scaling_study.errors import UserError, output_problem

FACTOR_NAMES = analysis.FACTOR_NAMES
#: What the verdicts compare: the factors, and pretraining against none (the control arm).
COMPARED = {**FACTOR_NAMES, analysis.CONTROL: "pretraining"}
VERDICT_COLORS = {"significant gain": "#2e7d32", "gain below threshold": "#7986cb", "inconclusive": "#d6d6d6",
                  "significant loss": "#c62828", "too few seeds": "#ffffff"}
#: Every plot the report can hold, by element id, in page order (also the figure files' names).
PLOT_IDS = ("plot-model_size", "plot-data_volume", "plot-steps", "plot-epochs", "plot-verdicts", "plot-fit",
            "plot-loss")
FIGURE_DPI = 300
_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
       "legend.fontsize": 7, "svg.fonttype": "path", "svg.hashsalt": "scaling-study", "axes.spines.top": False,
       "axes.spines.right": False}
_CSS = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1500px; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; } tr.macro td { background: #fafafa; }
td.status { text-align: left; white-space: normal; max-width: 60em; }
td small { color: #a65; } img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
div.wide { overflow-x: auto; }
.note { color: #666; font-style: italic; } .meta { color: #666; } .error { color: #b00; }
"""


# ----------------------------------------------------------------------------------- names and labels


def task_names(tasks, names: dict | None = None) -> dict:
    """Display names: `names`, else the task registry's `name`, else the id; two tasks sharing a name
    (SciERC NER and RE) get their type after it."""
    if names is None:
        try:
            from scaling_study.tasks.registry import discover

            registry = discover([]).tasks
            names = {t: registry[t].name for t in tasks if t in registry}
        except Exception:   # a registry that fails to load costs the report its names, not the report
            names = {}
    shown = {t: str(names.get(t, t)) for t in tasks}
    counts = pd.Series(list(shown.values())).value_counts()
    types = {"ner": "NER", "re": "RE", "cls": "CLS"}
    return {t: f"{n} ({types.get(t.rsplit('_', 1)[-1], t)})" if counts[n] > 1 else n for t, n in shown.items()}


def _si(x) -> str:
    if x is None or pd.isna(x):
        return ""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(float(x)) >= div:
            return f"{float(x) / div:.3g}{suffix}"
    return f"{float(x):.3g}"


def _level_labels(cells: pd.DataFrame, factor: str, levels: list) -> list[str]:
    """Tick labels: the level, with its parameter or token count for sizes and volumes."""
    count = {"model_size": "parameters", "data_volume": "tokens"}.get(factor)
    out = []
    for lv in levels:
        sub = cells.loc[cells[factor] == lv]
        n = _si(sub[count].dropna().iloc[0]) if count in sub and sub[count].notna().any() else ""
        n = "none" if factor == "steps" and str(lv) == "0" else n  # the control arm
        out.append(f"{lv}\n{n}" if n else str(lv))
    return out


def _line_rank(cells: pd.DataFrame, by: list[str]):
    """A sort key for a line's group key: factor levels in level order (small before base), models in
    table order, anything else by name."""
    orders = {c: analysis.sorted_levels(cells, c) if c in analysis.FACTOR_ORDER else
              analysis.model_order(cells) if c == "model" else sorted(cells[c].dropna().astype(str).unique())
              for c in by}
    place = {c: {str(lv): i for i, lv in enumerate(levels)} for c, levels in orders.items()}
    return lambda key: tuple(place[c].get(str(k), len(place[c]))
                             for c, k in zip(by, key if isinstance(key, tuple) else (key,)))


def _colors(labels) -> dict:
    """One color per label across every panel of a figure (a panel missing a line keeps the others' colors)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def _legend(fig, axes, title: str = "") -> None:
    """One legend for the figure, each label once (panels repeat lines)."""
    unique = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            unique.setdefault(label, handle)
    if unique:
        fig.legend(list(unique.values()), list(unique), loc="outside lower center", ncols=min(len(unique), 6),
                   title=title or None, frameon=False)


def _grid(n: int):
    from matplotlib.figure import Figure

    cols = min(4, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.7 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


# ----------------------------------------------------------------------------------- figures


def _factor_plot(cells: pd.DataFrame, factor: str, line_by: list[str], tasks: list[str], names: dict):
    """F1 (mean, 95% band) against `factor` per task, one line per combination of `line_by`; every
    other factor at its largest level. (None, note) when the factor has fewer than 2 levels."""
    pre = cells[cells["model_source"] != "external"] if factor != "epochs" else cells
    levels = analysis.sorted_levels(pre, factor)
    if len(levels) < 2:
        return None, f"{FACTOR_NAMES[factor]}: one level only ({', '.join(map(str, levels)) or 'none'}); no plot"
    fixed = [f for f in FACTOR_NAMES if f != factor and f not in line_by and f in pre]
    for f in fixed:
        present = analysis.sorted_levels(pre, f)
        if present:  # lines by model keep the control arm (steps 0), a model of its own
            pre = pre[(pre[f] == present[-1]).fillna(False).to_numpy() | pre[f].isna().to_numpy()
                      | (analysis.is_control(pre) if f == "steps" and "model" in line_by else False)]
    x_of = {lv: i for i, lv in enumerate(levels)}
    by = [c if c in pre else "model" for c in line_by]
    label_of = lambda key: " · ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if not pd.isna(k))
    rank = _line_rank(pre, by)
    colors = _colors(label_of(k) for k in sorted((k for k, _ in pre.groupby(by, dropna=False)), key=rank))
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        lines = pre[pre["task"] == task].groupby(by, dropna=False)
        for key, line in sorted(lines, key=lambda item: rank(item[0])):
            line = line.assign(_x=line[factor].map(x_of)).sort_values("_x")
            label, color = label_of(key), colors[label_of(key)]
            style = "--" if (line["model_source"] == "external").all() else "-"
            ax.plot(line["_x"], line["mean"], ls=style, color=color, lw=1.2, label=label)
            has = line["ci_low"].notna()
            ax.scatter(line["_x"][has], line["mean"][has], s=14, color=color, zorder=3)
            ax.scatter(line["_x"][~has], line["mean"][~has], s=14, facecolors="white", edgecolors=color, zorder=3)
            ax.fill_between(line["_x"], line["ci_low"], line["ci_high"], alpha=0.18, color=color, lw=0)
        ax.set_title(names.get(task, task))
        ax.set_xticks(range(len(levels)), _level_labels(pre, factor, levels))
        ax.set_xlabel(FACTOR_NAMES[factor])
        ax.set_ylabel("test F1 (points)")
        ax.grid(alpha=0.3)
    _legend(fig, axes, " · ".join(FACTOR_NAMES.get(c, c) for c in line_by))
    fixed_text = ", ".join(f"{FACTOR_NAMES[f]} at its largest level" for f in fixed)
    return fig, (f"Lines: {' · '.join(FACTOR_NAMES.get(c, c) for c in line_by)}; {fixed_text or 'nothing else fixed'}."
                 " Bands: 95% t-intervals over seeds, clipped to [0, 100]; hollow points: fewer than "
                 f"{analysis.MIN_SEEDS} usable seeds, no band; dashed: published models.")


def _top_comparisons(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Each factor's comparisons with every other factor at its largest level (pretrained models)."""
    out = []
    for factor, comps in verdicts.groupby("factor", sort=False):
        comps = comps[comps["model_source"] != "external"] if "model_source" in comps else comps
        for f in (c for c in FACTOR_NAMES if c in comps and c != factor):
            present = analysis.sorted_levels(comps, f) if comps[f].notna().any() else []
            if present:
                comps = comps[(comps[f] == present[-1]).fillna(False)]
        out.append(comps)
    return pd.concat(out, ignore_index=True) if out else verdicts.iloc[:0]


def _verdict_heatmap(verdicts: pd.DataFrame, tasks: list[str], names: dict):
    """Tasks x (factor, from -> to) at every other factor's largest level, colored by verdict,
    annotated with the change in points."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns, table = [], {}
    for (factor, lo, hi), pair in _top_comparisons(verdicts).groupby(["factor", "from", "to"], sort=False):
        name = f"{COMPARED[factor]}\n{lo} → {hi}"
        columns.append(name)
        table.update({(row["task"], name): row for _, row in pair.iterrows()})
    if not columns:
        return None
    kinds = list(VERDICT_COLORS)
    grid = np.full((len(tasks), len(columns)), kinds.index("too few seeds"))
    width = 1.8 + 1.15 * len(columns)
    ncols = len(kinds) if width >= 7.5 else 3        # a narrow heatmap stacks its legend instead of cutting it
    fig = Figure(figsize=(max(width, 4.5), 1.1 + 0.3 * len(tasks) + 0.2 * (ncols < len(kinds))), layout="constrained")
    ax = fig.subplots()
    for i, task in enumerate(tasks):
        for j, col in enumerate(columns):
            row = table.get((task, col))
            if row is not None:
                grid[i, j] = kinds.index(row["verdict"])
            change = "" if row is None or pd.isna(row["change"]) else f"{row['change']:+.1f}"
            text = ("—" if row is None else f"{change}\n(n<{analysis.MIN_SEEDS})".strip()
                    if row["verdict"] == "too few seeds" else change or "—")
            dark = row is not None and row["verdict"] in ("significant gain", "significant loss")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.imshow(grid, cmap=ListedColormap(list(VERDICT_COLORS.values())), vmin=0, vmax=len(kinds) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(tasks)), [names.get(t, t) for t in tasks])
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.grid(which="minor", color="#999", lw=0.5)
    ax.tick_params(which="both", length=0)
    ax.spines[:].set_visible(True)
    fig.legend([Patch(facecolor=c, edgecolor="#999") for c in VERDICT_COLORS.values()], kinds,
               loc="outside lower center", ncols=ncols, frameon=False)
    return fig


def _fit_plot(cells: pd.DataFrame, fits: pd.DataFrame, names: dict):
    ok = fits[fits["status"] == "ok"]
    if not len(ok):
        return None
    fig, axes = _grid(len(ok))
    for ax, (_, fit) in zip(axes, ok.iterrows()):
        pts = cells[(cells["task"] == fit["task"]) & (cells["model_source"] != "external")]
        pts = pts[pd.to_numeric(pts["pretrain_flops"], errors="coerce") > 0]
        frontier = pts.groupby("pretrain_flops")["mean"].max()
        ax.scatter(frontier.index.astype(float), 100 - frontier.to_numpy(), s=14, label="best cell")
        xs = np.geomspace(float(frontier.index.min()), float(frontier.index.max()) * 10, 100)
        ax.plot(xs, fit["E"] + fit["A"] * xs ** -fit["alpha"], color="k", lw=1, label="fit")
        ax.axhline(fit["E"], color="k", ls=":", lw=0.8, label="fitted floor E")
        ax.set_xscale("log")
        # status "ok" means every standard error is below its estimate: both print
        ax.set_title(f"{names.get(fit['task'], fit['task'])}: E = {fit['E']:.1f} ± {fit['E_se']:.1f}, "
                     f"α = {fit['alpha']:.2f} ± {fit['alpha_se']:.2f}")
        ax.set_xlabel("pretraining FLOPs")
        ax.set_ylabel("test error (100 − F1)")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


def _loss_plot(curves: pd.DataFrame | None):
    if curves is None or not len(curves) or "loss" not in curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    x = "tokens_seen" if "tokens_seen" in curves and curves["tokens_seen"].notna().any() else "step"
    keys = [c for c in ("pretrain_node_id", "model_size", "data_volume") if c in curves]
    runs = [(key if isinstance(key, tuple) else (key,), run) for key, run in
            curves.groupby(keys, dropna=False, sort=True)]
    order = lambda item: (float(item[1]["parameters"].iloc[0]) if "parameters" in item[1] and
                          item[1]["parameters"].notna().any() else 0.0,
                          analysis.level_value("data_volume", item[1]["data_volume"].iloc[0], None)
                          if "data_volume" in item[1] else 0.0)
    runs.sort(key=order)        # smallest model and volume first, as in every other legend
    labels = [" · ".join(str(k) for k in key[1:]) or str(key[0]) for key, _ in runs]
    repeated = pd.Series(labels).duplicated(keep=False)
    for (key, run), label, twice in zip(runs, labels, repeated):
        label = f"{label} ({key[0]})" if twice and len(key) > 1 else label   # two runs, one name: the node tells
        run = run.sort_values(x)
        ax.plot(run[x], run["loss"], lw=1.1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen" if x == "tokens_seen" else "step")
    ax.set_ylabel("MLM loss")
    ax.grid(alpha=0.3)
    ax.legend(ncols=2, frameon=False)
    return fig


# ----------------------------------------------------------------------------------- text


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.3g}"


def _points_word(threshold: float) -> str:
    return f"{threshold:g} F1 point{'' if threshold == 1 else 's'}"


def _where(tasks: list[str], all_tasks: list[str], names: dict) -> str:
    if len(tasks) < len(all_tasks) or len(all_tasks) == 1:
        return ", ".join(names.get(t, t) for t in tasks)
    return "both tasks" if len(all_tasks) == 2 else f"all {len(all_tasks)} tasks"


def _step_sentence(factor: str, lo, hi, pair: pd.DataFrame, threshold: float, names: dict) -> tuple[str, str]:
    """One factor step's sentence, and whether it paid ("paid", "did not pay", "undecided")."""
    counts, n, t = pair["verdict"].value_counts(), len(pair), _points_word(threshold)
    get = lambda v: int(counts.get(v, 0))
    tasks_with = lambda v: sorted(pair.loc[pair["verdict"] == v, "task"].unique())
    all_tasks = sorted(pair["task"].unique())
    parts = []
    if get("significant gain"):
        parts.append(f"a gain above {t} in {get('significant gain')} "
                     f"({_where(tasks_with('significant gain'), all_tasks, names)})")
    if get("gain below threshold"):
        parts.append(f"a gain above {t} ruled out in {get('gain below threshold')}")
    if get("inconclusive"):
        parts.append(f"no evidence of a gain above {t} (and none against) in {get('inconclusive')}")
    if get("significant loss"):
        parts.append(f"a loss of more than {t} in {get('significant loss')} "
                     f"({_where(tasks_with('significant loss'), all_tasks, names)})")
    if get("too few seeds"):
        few = pair[pair["verdict"] == "too few seeds"]
        by_collapse = int(((few["n_collapsed_from"] + few["n_collapsed_to"]) > 0).sum())
        parts.append(f"too few seeds to decide in {get('too few seeds')} (fewer than {analysis.MIN_SEEDS}"
                     + (f"; {by_collapse} of them because collapsed runs were left out)" if by_collapse else ")"))
    median = pair["change"].median()
    step = f"{COMPARED[factor]} {lo} → {hi}"
    text = (f"{step[0].upper()}{step[1:]} ({n} comparison{'s' * (n != 1)}): " + "; ".join(parts)
            + (f"; median change {median:+.1f} points." if not pd.isna(median) else "."))
    if get("significant gain") > n / 2:
        return text, "paid"
    if get("gain below threshold") + get("significant loss") > n / 2:
        return text, "did not pay"
    return text, "undecided"


def _fit_sentences(fits: pd.DataFrame, threshold: float, names: dict) -> list[str]:
    ok = fits[fits["status"] == "ok"]
    lines = []
    if len(ok):
        never = [names.get(t, t) for t in sorted(ok.loc[ok["next_gain_x"] == math.inf, "task"])]
        finite = ok[ok["next_gain_x"] < math.inf].sort_values("next_gain_x")
        # a loose fit's draws can put the interval beside its own estimate (most draws: never): say so
        parts = [f"{names.get(r.task, r.task)} {_fmt(r.next_gain_x)}x "
                 + (f"(95% {_fmt(r.next_gain_x_low)}-{_fmt(r.next_gain_x_high)})"
                    if r.next_gain_x_low <= r.next_gain_x <= r.next_gain_x_high
                    else "(the fit is too loose for an interval)") for r in finite.itertuples()]
        text = f"Power-law fits against pretraining compute: the next {_points_word(threshold)} costs"
        text += f" {', '.join(parts)} the study's largest compute" if parts else " more compute than any fit can buy"
        if never:
            text += f"; never for {', '.join(never)} (the fitted ceiling is within {_points_word(threshold)})"
        lines.append(text + ".")
    bad = fits[fits["status"] != "ok"]
    heads = {"not estimable": "No power-law estimate (not estimable) for", "too few points": "Too few compute "
             f"levels for a power-law fit ({analysis.MIN_POINTS} needed) for"}
    for kind, rows in bad.groupby(bad["status"].str.split(r" \(|:", n=1, regex=True).str[0], sort=True):
        lines.append(f"{heads.get(kind, kind)} {', '.join(names.get(t, t) for t in rows['task'])} "
                     "(the reasons are in the fits table).")
    return lines


def summary(verdicts: pd.DataFrame, fits: pd.DataFrame | None, threshold: float,
            names: dict | None = None) -> list[str]:
    """Plain sentences from the verdicts: for each factor step, what the comparisons showed, then
    where scaling paid, where a gain above `threshold` was ruled out, and where nothing was decided."""
    names = names or {}
    if not len(verdicts):
        lines = ["No factor has two levels with results: nothing to compare."]
        return lines + (_fit_sentences(fits, threshold, names) if fits is not None and len(fits) else [])
    lines, groups = [], {"paid": [], "did not pay": [], "undecided": []}
    for (factor, lo, hi), pair in verdicts.groupby(["factor", "from", "to"], sort=False):
        text, kind = _step_sentence(factor, lo, hi, pair, threshold, names)
        lines.append(text)
        groups[kind].append(f"{COMPARED[factor]} {lo} → {hi}")
    t = _points_word(threshold)
    if groups["paid"]:
        lines.append(f"Scaling paid (a gain above {t} shown in most comparisons): {'; '.join(groups['paid'])}.")
    if groups["did not pay"]:
        lines.append(f"Scaling did not pay (a gain above {t} ruled out in most comparisons): "
                     f"{'; '.join(groups['did not pay'])}.")
    if groups["undecided"]:
        lines.append(f"Not decided (in most comparisons no evidence of a gain above {t}, none against, or too few "
                     f"seeds; more seeds would tell): {'; '.join(groups['undecided'])}.")
    if fits is not None and len(fits):
        lines += _fit_sentences(fits, threshold, names)
    return lines


def _cell_text(cell: pd.Series | None) -> str:
    """mean ± sd, with a second line for fewer than MIN_SEEDS seeds used and for collapsed runs."""
    if cell is None:
        return "<td>—</td>"
    notes = [f"{cell['n']} seed{'s' * (cell['n'] != 1)}"] if cell["n"] < analysis.MIN_SEEDS else []
    notes += [f"{cell['n_collapsed']}/{cell['n_jobs']} collapsed"] if cell["n_collapsed"] else []
    sd = f" ± {cell['sd']:.1f}" if not pd.isna(cell["sd"]) else ""
    value = f"{cell['mean']:.1f}{sd}" if cell["n"] else "—"
    return f"<td>{value}" + (f"<br><small>{', '.join(notes)}</small>" if notes else "") + "</td>"


def _table(df: pd.DataFrame, metric: str, include_collapsed: bool, names: dict) -> str:
    """The paper's table: `analysis.table_rows` for task x model (the definition `results --pivot task
    model` shares), mean ± sd over seeds, then macro averages by task type and domain."""
    sel = analysis.table_rows(df, ("task", "model"), include_collapsed=include_collapsed)
    cells = analysis.cell_stats(sel.jobs, metric, include_collapsed=include_collapsed)
    models = analysis.model_order(cells)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    for task, rows in cells.groupby("task", sort=True):
        by = {str(r["model"]): r for _, r in rows.iterrows()}
        tds = "".join(_cell_text(by.get(m)) for m in models)
        ttype = html.escape(str(rows["task_type"].iloc[0])) if "task_type" in rows else ""
        body.append(f"<tr><td class='name'>{html.escape(names.get(task, str(task)))}</td>"
                    f"<td class='name'>{ttype}</td>{tds}</tr>")
    for by in ("task_type", "domain"):
        if by not in sel.jobs or not len(sel.rows):
            continue
        macro = analysis.macro_average(sel.jobs, by, metric, include_collapsed=include_collapsed)
        for group, rows in macro.groupby(by, sort=True):
            got = {str(r["model"]): r for _, r in rows.iterrows()}
            tds = "".join(f"<td>{got[m]['mean']:.1f}</td>" if m in got else "<td>—</td>" for m in models)
            n = int(rows["n_tasks"].max())
            body.append(f"<tr class='macro'><td class='name'>macro: {html.escape(str(group))}</td>"
                        f"<td class='name'>{n} task{'s' * (n != 1)}</td>{tds}</tr>")
    caption = (f"Test F1: {sel.definition(metric)} Cells: mean ± sd; a note gives the seeds used when fewer than "
               f"{analysis.MIN_SEEDS} and the collapsed runs left out. Macro rows average the tasks' means. "
               f"`scaling-study results --pivot task model` prints this table.")
    return (f"<p class='meta'>{html.escape(caption)}</p><div class='wide'><table><tr><th class='name'>task</th>"
            f"<th class='name'>type</th>{head}</tr>{''.join(body)}</table></div>")


def _collapsed_section(cells: pd.DataFrame, names: dict, include_collapsed: bool) -> str:
    """Collapsed share per task, and per cell (those with a collapsed run) in a folded table."""
    total, jobs = int(cells["n_collapsed"].sum()), int(cells["n_jobs"].sum())
    if not total:
        return f"<p class='meta'>No run of the {jobs} finetune jobs is flagged collapsed.</p>"
    use = "counted like any other (--include-collapsed)" if include_collapsed else \
        "left out of the table, the verdicts and the fits (--include-collapsed counts them)"
    rows = []
    for task, sub in cells.groupby("task", sort=True):
        k, n = int(sub["n_collapsed"].sum()), int(sub["n_jobs"].sum())
        rows.append(f"<tr><td class='name'>{html.escape(names.get(task, str(task)))}</td><td>{n}</td><td>{k}</td>"
                    f"<td>{100 * k / n:.0f}%</td></tr>")
    hit = cells[cells["n_collapsed"] > 0]
    keys = [c for c in ("model", "steps", "epochs") if c in hit]
    per_cell = "".join(
        f"<tr><td class='name'>{html.escape(names.get(r['task'], str(r['task'])))}</td>"
        + "".join(f"<td class='name'>{html.escape('' if pd.isna(r[c]) else str(r[c]))}</td>" for c in keys)
        + f"<td>{r['n_collapsed']}/{r['n_jobs']}</td></tr>" for _, r in hit.iterrows())
    return (f"<p class='meta'>{total} of {jobs} finetune jobs ({100 * total / jobs:.0f}%) are flagged collapsed "
            f"(the model predicted one class); they are {use}.</p>"
            "<table><tr><th class='name'>task</th><th>jobs</th><th>collapsed</th><th>share</th></tr>"
            f"{''.join(rows)}</table><details><summary>Per cell: the {len(hit)} of {len(cells)} cells with a "
            "collapsed run</summary><table><tr><th class='name'>task</th>"
            + "".join(f"<th class='name'>{c}</th>" for c in keys)
            + f"<th>collapsed</th></tr>{per_cell}</table></details>")


def _fits_table(fits: pd.DataFrame, names: dict) -> str:
    rows = []
    for _, f in fits.iterrows():
        ok = f["status"] == "ok"
        interval = (f" ({_fmt(f['next_gain_x_low'])}-{_fmt(f['next_gain_x_high'])})"
                    if ok and f["next_gain_x_low"] <= f["next_gain_x"] <= f["next_gain_x_high"] else "")
        cells = (f"<td>{f['f1_at_x_max']:.1f}</td><td>{f['f1_limit']:.1f}</td><td>{_fmt(f['next_gain_x'])}x"
                 f"{interval}</td>" if ok else "<td>—</td><td>—</td><td>—</td>")
        rows.append(f"<tr><td class='name'>{html.escape(names.get(f['task'], str(f['task'])))}</td>"
                    f"<td>{f['n_points']}</td><td class='status'>{html.escape(str(f['status']))}</td>{cells}</tr>")
    return ("<table><tr><th class='name'>task</th><th>compute levels</th><th class='name'>status</th>"
            "<th>F1 at the largest compute</th><th>F1 limit (100 − E)</th><th>next point: × compute (95%)</th></tr>"
            f"{''.join(rows)}</table>")


def _seeds_section(log: dict) -> str:
    """An adaptive-seeds study's decisions (`adaptive.SeedWaves.log`): the rule, each wave, and every
    comparison with the seeds after which it was settled (or why it got no more)."""
    rule, comps = log["rule"], log.get("comparisons") or []
    runs = sum(g["seeds"] for g in log.get("groups", []))
    text = (f"Seeds were given out in waves: {rule['min']} for every cell, then one more at a time only for cells in a "
            f"comparison not yet settled (threshold {_points_word(rule['threshold'])}), up to {rule['max']}. Each wave's "
            f"interval has its own level (alpha spending, {rule['spending']}) so that every comparison's verdict is "
            f"wrong with a chance of at most {1 - rule['confidence']:.0%}; a comparison that {rule['max']} seeds "
            f"were unlikely to settle stopped as inconclusive. {runs} finetune runs of the plan's "
            f"{rule['max'] * len(log.get('groups', []))} were run.")
    waves = "".join(f"<li>After {w['seeds']} seeds (interval level {w['level']:.4f}): {len(w['settled'])} comparisons "
                    f"settled, {len(w.get('futile', []))} stopped as unlikely to settle, "
                    f"{len(w['given_another_seed'])} cells given another seed.</li>"
                    if w.get("level") else f"<li>After {w['seeds']} seeds: {len(w['given_another_seed'])} cells "
                    "given another seed (intervals need 3).</li>" for w in log.get("waves", []))
    rows = ""
    for c in comps:
        when = {"settled": f"settled after {c['settled_after']} seeds",
                "futile": f"stopped after {c.get('futile_after')} seeds (unlikely to settle)",
                "max seeds": f"{c['seeds']} seeds, the most"}.get(c["status"], f"{c['status']} at {c['seeds']} seeds")
        ci = (f"[{c['ci_low']:.1f}, {c['ci_high']:.1f}]" if c.get("ci_low") is not None
              and not pd.isna(c["ci_low"]) else "—")
        rows += (f"<tr><td class='name'>{html.escape(str(c['comparison']))}</td><td class='name'>"
                 f"{html.escape(str(c['verdict']))}</td><td>{ci}</td><td class='name'>{html.escape(when)}</td></tr>")
    table = ("<details><summary>Every comparison</summary><div class='wide'><table><tr><th class='name'>comparison"
             "</th><th class='name'>verdict</th><th>interval (points)</th><th class='name'>decided</th></tr>"
             f"{rows}</table></div></details>")
    return f"<p>{html.escape(text)}</p><ul>{waves}</ul>{table}"


# ----------------------------------------------------------------------------------- the page


def _attempt(what: str, build, *args):
    """(value, None), or (None, a note) when building `what` fails: the rest of the report still gets written."""
    try:
        return build(*args), None
    except UserError:
        raise
    except Exception as exc:   # the page names the error instead of a traceback ending the report
        return None, f"{what} could not be computed ({type(exc).__name__}: {exc})."


class _Page:
    """Sections of HTML and the figures they embed, written together by `write`."""

    def __init__(self, out_path: Path):
        self.out = out_path
        self.folder = out_path.with_name(f"{out_path.stem}-figures")
        self.sections: list[str] = []
        self.plots: list[str] = []
        self.files: dict[str, bytes] = {}

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"<h2>{html.escape(heading)}</h2>{body}")

    def note(self, text: str, error: bool = False) -> str:
        return f"<p class='{'error' if error else 'note'}'>{html.escape(text)}</p>"

    def plot(self, plot_id: str, heading: str, build, *args, caption: str = "", empty: str = "") -> None:
        """Draw build(*args) (a Figure, (Figure | None, caption) or None) as a section with its files."""
        got, error = _attempt(heading, build, *args)
        fig, text = got if isinstance(got, tuple) else (got, None)
        if fig is None:
            self.add(heading, self.note(error or text or empty or "No data for this plot.", bool(error)))
            return
        text = caption if text is None else text
        svg, png = io.BytesIO(), io.BytesIO()
        fig.savefig(svg, format="svg", metadata={"Date": None})
        fig.set_layout_engine(None)   # laid out by the first save: the PNG keeps that layout, one draw instead of two
        fig.savefig(png, format="png", dpi=FIGURE_DPI)
        self.files[f"{plot_id}.svg"], self.files[f"{plot_id}.png"] = svg.getvalue(), png.getvalue()
        data = base64.b64encode(svg.getvalue()).decode("ascii")
        width = round(fig.get_figwidth() * 110)   # on screen a little larger than print: 8-pt labels stay legible
        self.add(heading, f"<img class='plot' id='{plot_id}' alt='{html.escape(heading)}' width='{width}' "
                          f"src='data:image/svg+xml;base64,{data}'>"
                          + (f"<p class='meta'>{html.escape(text)}</p>" if text else ""))
        self.plots.append(plot_id)

    def write(self, title: str, meta: str) -> None:
        """The figures folder (replaced whole), then the page (atomically)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in self.files.items():
            (tmp / name).write_bytes(data)
        shutil.rmtree(self.folder, ignore_errors=True)
        tmp.rename(self.folder)
        link = (f" Figures for a paper (SVG and {FIGURE_DPI}-dpi PNG): <a href='{html.escape(self.folder.name)}/'>"
                f"{html.escape(self.folder.name)}/</a>." if self.files else "")
        page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
                f"<p class='meta'>{html.escape(meta)}{link}</p>{''.join(self.sections)}</body></html>\n")
        part = self.out.with_name(self.out.name + ".tmp")
        try:
            part.write_text(page, encoding="utf-8")
            part.replace(self.out)
        finally:
            part.unlink(missing_ok=True)


def _verdicts(df: pd.DataFrame, threshold: float, metric: str, include_collapsed: bool) -> pd.DataFrame:
    frames = [analysis.diminishing_returns(df, f, threshold, metric, include_collapsed=include_collapsed)
              for f in FACTOR_NAMES if f in df and df[f].notna().any()]
    if analysis.is_control(df).any():
        frames.append(analysis.pretraining_vs_none(df, threshold, metric, include_collapsed=include_collapsed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["factor", "task"])


def render(df: pd.DataFrame, curves: pd.DataFrame | None, out_path: str | Path, *, title: str = "Scaling study",
           threshold: float = 1.0, metric: str = "test_f1", include_collapsed: bool = False,
           names: dict | None = None, seeds_log: dict | None = None) -> list[str]:
    """Write the report to `out_path` (atomically) and its figures beside it; returns the ids of the
    plots it holds. `names`: task id -> display name (default: the task registry's names);
    `seeds_log`: an adaptive-seeds study's decisions (`artifacts.SEEDS_FILE`), shown after the summary."""
    import matplotlib

    df = df.copy()
    for col, default in (("model_source", "pretrained"), ("parameters", pd.NA), ("tokens", pd.NA),
                         ("pretrain_flops", np.nan), ("collapsed", False)):
        if col not in df:
            df[col] = default
    cells = analysis.cell_stats(df, metric, include_collapsed=include_collapsed)
    tasks = sorted(cells["task"].dropna().unique())
    names = task_names(tasks, names)
    page = _Page(Path(out_path))
    verdicts, verdict_error = _attempt("the verdicts", _verdicts, df, threshold, metric, include_collapsed)
    fits, fit_error = (_attempt("the power-law fits", lambda: analysis.fit_power_law(
        df, "pretrain_flops", metric, gain=threshold, include_collapsed=include_collapsed))
        if df["pretrain_flops"].notna().any() else (None, None))
    lines, error = (_attempt("the summary", summary, verdicts, fits, threshold, names) if verdicts is not None
                    else ([], verdict_error))
    page.add("Summary", "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines or []) + "</ul>"
             + (page.note(error, True) if error else ""))
    if seeds_log:
        section, error = _attempt("the adaptive seeds' decisions", _seeds_section, seeds_log)
        page.add("Adaptive seeds", section or page.note(error, True))
    table, error = _attempt("the results table", _table, df, metric, include_collapsed, names)
    page.add("Results", table or page.note(error, True))
    section, error = _attempt("the collapsed share", _collapsed_section, cells, names, include_collapsed)
    page.add("Collapsed runs", section or page.note(error, True))
    with matplotlib.rc_context(_RC):
        for factor, line_by in (("model_size", ["data_volume"]), ("data_volume", ["model_size"]),
                                ("steps", ["model_size", "data_volume"]), ("epochs", ["model"])):
            page.plot(f"plot-{factor}", f"F1 against {FACTOR_NAMES[factor]}",
                      _factor_plot if factor in cells else (lambda *a: None), cells, factor, line_by, tasks, names)
        page.plot("plot-verdicts", f"Diminishing returns: does the next level buy more than {_points_word(threshold)}?",
                  lambda: _verdict_heatmap(verdicts, tasks, names) if verdicts is not None and len(verdicts) else None,
                  caption="Each cell compares consecutive levels with every other factor at its largest level; the "
                          "number is the change in F1 points. Green: the 95% interval of the change lies above the "
                          "threshold; blue: below it (a gain above the threshold ruled out); grey: it holds the "
                          "threshold (no evidence either way); red: below minus the threshold; white: fewer than "
                          f"{analysis.MIN_SEEDS} usable seeds.",
                  empty=verdict_error or "No factor has two levels with results.")
        page.plot("plot-fit", "Power laws: test error against pretraining compute",
                  lambda: _fit_plot(cells, fits, names) if fits is not None else None,
                  caption="err = E + A·C^−α fitted to the best cell at each compute budget; dotted: the fitted "
                          "floor E. Only fits whose standard errors are below their estimates are drawn.",
                  empty=fit_error or ("No fit could pin its parameters down (see the table)." if fits is not None
                                      else "No pretraining compute in the results: no fit."))
        if fits is not None:
            page.sections[-1] += _fits_table(fits, names)
        page.plot("plot-loss", "Pretraining loss curves", _loss_plot, curves,
                  empty="No pretraining loss curves in the results.")
    n_collapsed = int(cells["n_collapsed"].sum())
    meta = (f"{len(df)} finetune jobs in {len(cells)} cells, {len(tasks)} tasks; F1 in points; threshold "
            f"{threshold:g} point. Intervals: 95% Student's t over seeds (paired by seed where two cells share "
            f"seeds, else Welch's), none below {analysis.MIN_SEEDS} seeds. Collapsed runs: {n_collapsed} of "
            f"{len(df)} jobs, " + ("included." if include_collapsed else "left out of the table, verdicts and fits."))
    page.write(title, meta)
    return page.plots


def build(study: str, tracking_uri: str | None = None, root: str | Path | None = None, out: str | Path | None = None,
          *, threshold: float = 1.0, include_collapsed: bool = False) -> Path:
    """Load a study's results (results.load, results.loss_curves) and render its report; returns the path
    (default: the study's folder under the storage root, report.html; its figures in report-figures/)."""
    from scaling_study import results

    if not threshold >= 0:
        raise UserError(f"report: --threshold must be a number of F1 points >= 0; got {threshold!r}")
    problem = output_problem(out) if out else None
    if problem:
        raise UserError(f"report: -o {out}: {problem}; allowed: an HTML file path in an existing folder")

    df = results.load(study, tracking_uri=tracking_uri, root=root)
    if not len(df):
        raise UserError(f"report: study {study!r} has no finished finetune jobs yet; allowed: a study with results")
    curves = results.loss_curves(study, tracking_uri=tracking_uri, root=root)
    from scaling_study.artifacts import SEEDS_FILE, Layout

    if study.endswith((".yaml", ".yml")):
        from scaling_study.spec import load_spec

        layout = Layout.of(load_spec(study))
    else:  # an object-store root: its local mirror
        from scaling_study.studies import root_of

        layout = Layout.named(study, root_of(study, root))
    folder = layout.root
    out = Path(out) if out else folder / "report.html"
    seeds_log = layout.store.read_text(SEEDS_FILE)
    render(df, curves, out, title=f"Scaling study: {folder.name}", threshold=threshold,
           include_collapsed=include_collapsed, seeds_log=json.loads(seeds_log) if seeds_log else None)
    return out
