"""A study's results as one self-contained HTML page: tables, plots, verdicts, a plain-text summary.

    scaling-study report scholarbert -o scholarbert.html      # the CLI; --threshold 1.0 by default

    from scaling_study import report
    report.build("scholarbert")                               # results.load + render -> studies/scholarbert/report.html
    report.render(df, curves, "out.html", title="My study")  # from DataFrames you already have

The page needs nothing but the file: plots are PNGs embedded as base64 (matplotlib, Agg, no
pyplot state), styles are inline, there is no script, font or other request. Sections: a summary
generated from the verdicts (where scaling paid, where it did not), the paper's table (task x model,
mean ± sd F1 over seeds, with macro averages by task type and domain), F1 against model size, data
volume, pretraining steps and finetuning epochs per task with 95% interval bands, a heatmap of the
diminishing-returns verdicts, power-law fits against pretraining compute, and the pretraining loss
curves. A factor with a single level in the study gets a note instead of a plot.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from scaling_study import analysis

FACTOR_NAMES = {"model_size": "model size", "data_volume": "data volume", "steps": "pretraining steps",
                "epochs": "finetuning epochs"}
VERDICT_COLORS = {"significant gain": "#2e7d32", "no significant gain": "#bdbdbd", "significant loss": "#c62828",
                  "too few seeds": "#ffffff"}
#: Every plot the report can hold, by element id, in page order.
PLOT_IDS = ("plot-model_size", "plot-data_volume", "plot-steps", "plot-epochs", "plot-verdicts", "plot-fit",
            "plot-loss")
_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1500px; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; } tr.macro td { background: #fafafa; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #666; font-style: italic; } .meta { color: #666; }
"""


def _sort_levels(cells: pd.DataFrame, factor: str) -> list:
    """The factor's levels present in `cells`, smallest first (parameters, tokens, value)."""
    order = analysis.FACTOR_ORDER[factor]
    seen = {}
    for level, sub in cells[cells[factor].notna()].groupby(factor):
        seen[level] = analysis.level_value(factor, level, sub[order].iloc[0] if order in sub else None)
    return sorted(seen, key=seen.get)


def _model_label(row: pd.Series, show_steps: bool) -> str:
    if row.get("model_source") == "external" or pd.isna(row.get("model_size")):
        return str(row["model"])
    label = f"{row['model_size']} · {row['data_volume']}"
    return f"{label} · {row['steps']} steps" if show_steps else label


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)   # constrained layout already fits; "tight" would draw twice
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int):
    from matplotlib.figure import Figure

    cols = min(4, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _factor_plot(cells: pd.DataFrame, factor: str, line_by: list[str], tasks: list[str]):
    """F1 (mean, 95% band) against `factor` per task, one line per combination of `line_by`; every
    other factor at its largest level. None when the factor has fewer than 2 levels."""
    pre = cells[cells["model_source"] != "external"] if factor != "epochs" else cells
    levels = _sort_levels(pre, factor)
    if len(levels) < 2:
        return None, f"{FACTOR_NAMES[factor]}: one level only ({', '.join(map(str, levels)) or 'none'}); no plot"
    fixed = [f for f in ("model_size", "data_volume", "steps", "epochs") if f != factor and f not in line_by]
    for f in fixed:
        present = _sort_levels(pre, f)
        if present:
            pre = pre[(pre[f] == present[-1]) | pre[f].isna()]
    x_of = {lv: i for i, lv in enumerate(levels)}
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        sub = pre[pre["task"] == task]
        for key, line in sub.groupby([c if c in sub else "model" for c in line_by], dropna=False, sort=True):
            line = line.assign(_x=line[factor].map(x_of)).sort_values("_x")
            label = " · ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if not pd.isna(k))
            external = (line["model_source"] == "external").all()
            (handle,) = ax.plot(line["_x"], line["mean"], marker="o", ls="--" if external else "-", label=label)
            ax.fill_between(line["_x"], line["ci_low"], line["ci_high"], alpha=0.2, color=handle.get_color())
        ax.set_title(task, fontsize=10)
        ax.set_xticks(range(len(levels)), [str(lv) for lv in levels], fontsize=8)
        ax.set_xlabel(FACTOR_NAMES[factor], fontsize=8)
        ax.set_ylabel("test F1", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
    fixed_text = ", ".join(f"{FACTOR_NAMES[f]} at its largest level" for f in fixed)
    return fig, f"Lines: {' · '.join(FACTOR_NAMES.get(c, c) for c in line_by)}; {fixed_text or 'nothing else fixed'}."


def _verdict_heatmap(verdicts: pd.DataFrame, tasks: list[str]):
    """Tasks x (factor, from -> to) at every other factor's largest level, colored by verdict,
    annotated with the change in points."""
    from matplotlib.colors import ListedColormap

    columns, table = [], {}
    for factor, comps in verdicts.groupby("factor", sort=False):
        comps = comps[comps["model_source"] != "external"] if "model_source" in comps else comps
        for f in (c for c in ("model_size", "data_volume", "steps", "epochs") if c in comps and c != factor):
            order = "parameters" if f == "model_size" else "tokens" if f == "data_volume" else f
            top = comps.dropna(subset=[f])
            if not len(top):
                continue
            best = max(top[f].unique(), key=lambda lv: analysis.level_value(
                f, lv, top.loc[top[f] == lv, order].iloc[0] if order in top else None))
            comps = comps[comps[f] == best]
        for (lo, hi), pair in comps.groupby(["from", "to"], sort=False):
            name = f"{FACTOR_NAMES[factor]}\n{lo} → {hi}"
            columns.append(name)
            for _, row in pair.iterrows():
                table[(row["task"], name)] = row
    if not columns:
        return None
    names = list(VERDICT_COLORS)
    grid = np.full((len(tasks), len(columns)), names.index("too few seeds"))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.45 * len(columns), 0.9 + 0.38 * len(tasks)), layout="constrained")
    ax = fig.subplots()
    for i, task in enumerate(tasks):
        for j, col in enumerate(columns):
            row = table.get((task, col))
            if row is not None:
                grid[i, j] = names.index(row["verdict"])
    ax.imshow(grid, cmap=ListedColormap(list(VERDICT_COLORS.values())), vmin=0, vmax=len(names) - 1, aspect="auto")
    for i, task in enumerate(tasks):
        for j, col in enumerate(columns):
            row = table.get((task, col))
            text = "—" if row is None else f"{row['change']:+.1f}"
            dark = row is not None and row["verdict"] in ("significant gain", "significant loss")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(tasks)), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    from matplotlib.patches import Patch

    fig.legend([Patch(facecolor=c, edgecolor="#999") for c in VERDICT_COLORS.values()], names,
               loc="outside lower center", ncols=4, fontsize=8)
    return fig


def _fit_plot(cells: pd.DataFrame, fits: pd.DataFrame, tasks: list[str]):
    ok = fits[fits["status"] == "ok"]
    if not len(ok):
        return None
    fig, axes = _grid(len(ok))
    for ax, (_, fit) in zip(axes, ok.iterrows()):
        pts = cells[(cells["task"] == fit["task"]) & (cells["model_source"] != "external")]
        pts = pts[pd.to_numeric(pts["pretrain_flops"], errors="coerce") > 0]
        frontier = pts.groupby("pretrain_flops")["mean"].max()
        ax.scatter(frontier.index.astype(float), 100 - frontier.to_numpy(), s=18, label="best cell")
        xs = np.geomspace(float(frontier.index.min()), float(frontier.index.max()) * 10, 100)
        ax.plot(xs, fit["E"] + fit["A"] * xs ** -fit["alpha"], color="k", lw=1, label="fit")
        ax.axhline(fit["E"], color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{fit['task']}: E={fit['E']:.1f}±{fit['E_se']:.1f}, "
                     f"α={fit['alpha']:.2f}±{fit['alpha_se']:.2f}", fontsize=9)
        ax.set_xlabel("pretraining FLOPs", fontsize=8)
        ax.set_ylabel("test error (100 − F1)", fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _loss_plot(curves: pd.DataFrame | None):
    if curves is None or not len(curves) or "loss" not in curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    x = "tokens_seen" if "tokens_seen" in curves and curves["tokens_seen"].notna().any() else "step"
    keys = [c for c in ("pretrain_node_id", "model_size", "data_volume") if c in curves]
    for key, run in curves.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(str(k) for k in key[1:]) or str(key[0])
        run = run.sort_values(x)
        ax.plot(run[x], run["loss"], lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen" if x == "tokens_seen" else "step")
    ax.set_ylabel("MLM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return fig


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.3g}"


def summary(verdicts: pd.DataFrame, fits: pd.DataFrame | None, threshold: float) -> list[str]:
    """Plain sentences from the verdicts: for each factor step, where it bought more than `threshold`."""
    lines = []
    if not len(verdicts):
        return ["No factor has two levels with results: nothing to compare."]
    paid, not_paid = [], []
    for factor, comps in verdicts.groupby("factor", sort=False):
        for (lo, hi), pair in comps.groupby(["from", "to"], sort=False):
            counts = pair["verdict"].value_counts()
            n, gains, losses = len(pair), counts.get("significant gain", 0), counts.get("significant loss", 0)
            gain_tasks = sorted(pair.loc[pair["verdict"] == "significant gain", "task"].unique())
            all_tasks = sorted(pair["task"].unique())
            step = f"{FACTOR_NAMES[factor]} {lo} → {hi}"
            head = f"{step[0].upper()}{step[1:]}: "
            too_few = counts.get("too few seeds", 0)
            if too_few == n:
                lines.append(f"{head}one seed only in all {n} comparisons, so no interval and no verdict; "
                             f"median change {pair['change'].median():+.1f} points.")
                continue
            if gains:
                where = (", ".join(gain_tasks) if len(gain_tasks) < len(all_tasks) or len(all_tasks) == 1
                         else "both tasks" if len(all_tasks) == 2 else f"all {len(all_tasks)} tasks")
                text = (f"{head}a significant gain of more than {threshold:g} F1 point in {gains} of {n} "
                        f"comparisons ({where})")
            else:
                text = f"{head}no significant gain of more than {threshold:g} F1 point in any of {n} comparisons"
            text += f"; median change {pair['change'].median():+.1f} points"
            if losses:
                loss_tasks = sorted(pair.loc[pair["verdict"] == "significant loss", "task"].unique())
                text += f"; a significant loss in {losses} ({', '.join(loss_tasks)})"
            if too_few:
                text += f"; {too_few} with a single seed (no interval)"
            lines.append(text + ".")
            (paid if gains > n / 2 else not_paid).append(step)
    if paid:
        lines.append(f"Scaling paid (a significant gain over {threshold:g} point in most comparisons): "
                     f"{'; '.join(paid)}.")
    if not_paid:
        lines.append(f"Scaling did not pay (in most comparisons no gain over {threshold:g} point could be shown): "
                     f"{'; '.join(not_paid)}.")
    if fits is not None and len(fits) and (fits["status"] == "ok").any():
        ok = fits[fits["status"] == "ok"]
        never = sorted(ok.loc[ok["next_gain_x"] == math.inf, "task"])
        finite = ok[ok["next_gain_x"] < math.inf].sort_values("next_gain_x")
        # a loose fit's draws can put the interval beside its own estimate (most draws: never): say so
        parts = [f"{r.task} {_fmt(r.next_gain_x)}x " + (f"(95% {_fmt(r.next_gain_x_low)}-{_fmt(r.next_gain_x_high)})"
                                                       if r.next_gain_x_low <= r.next_gain_x <= r.next_gain_x_high
                                                       else "(the fit is too loose for an interval)")
                 for r in finite.itertuples()]
        text = f"Power-law fits against pretraining compute: the next {threshold:g} F1 point costs"
        text += f" {', '.join(parts)} the study's largest compute" if parts else " more compute than any fit can buy"
        if never:
            text += f"; never for {', '.join(never)} (the fitted ceiling is within {threshold:g} point)"
        lines.append(text + ".")
    return lines


def _table(cells: pd.DataFrame, df: pd.DataFrame, metric: str) -> str:
    """The paper's table: task x model, mean ± sd over seeds, at the largest epochs level (and the
    largest steps level for pretrained models), then macro averages by task type and domain."""
    epochs = _sort_levels(cells, "epochs") if "epochs" in cells else []
    sel = cells[cells["epochs"] == epochs[-1]] if epochs else cells
    steps = _sort_levels(sel[sel["model_source"] != "external"], "steps") if "steps" in sel else []
    if steps:
        sel = sel[(sel["steps"] == steps[-1]) | (sel["model_source"] == "external")]
    sel = sel.assign(_label=[_model_label(r, False) for _, r in sel.iterrows()])
    ordered = sel.sort_values(["model_source", "parameters", "tokens"], na_position="last")
    models = list(dict.fromkeys(ordered["_label"]))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    for task, rows in sel.groupby("task", sort=True):
        by = {r["_label"]: r for _, r in rows.iterrows()}
        tds = "".join(f"<td>{by[m]['mean']:.1f} ± {by[m]['sd']:.1f}</td>" if m in by and not pd.isna(by[m]["sd"])
                      else f"<td>{by[m]['mean']:.1f}</td>" if m in by else "<td>—</td>" for m in models)
        ttype = html.escape(str(rows["task_type"].iloc[0])) if "task_type" in rows else ""
        body.append(f"<tr><td class='name'>{html.escape(str(task))}</td><td class='name'>{ttype}</td>{tds}</tr>")
    raw = df[df["epochs"] == epochs[-1]] if epochs else df
    if steps:
        raw = raw[(raw["steps"] == steps[-1]) | (raw["model_source"] == "external")]
    for by in ("task_type", "domain"):
        if by not in raw:
            continue
        macro = analysis.macro_average(raw, by, metric)
        macro = macro.assign(_label=[_model_label(r, False) for _, r in macro.iterrows()])
        for group, rows in macro.groupby(by, sort=True):
            got = {r["_label"]: r for _, r in rows.iterrows()}
            tds = "".join(f"<td>{got[m]['mean']:.1f}</td>" if m in got else "<td>—</td>" for m in models)
            n = int(rows["n_tasks"].max())
            body.append(f"<tr class='macro'><td class='name'>macro: {html.escape(str(group))}</td>"
                        f"<td class='name'>{n} task{'s' * (n != 1)}</td>{tds}</tr>")
    caption = (f"Test F1 (points), mean ± sd over seeds, at {epochs[-1] if epochs else '?'} finetuning epochs"
               + (f" and {steps[-1]} pretraining steps" if steps else "") + "; macro rows average the tasks' means.")
    return (f"<p class='meta'>{html.escape(caption)}</p><table><tr><th class='name'>task</th><th class='name'>type"
            f"</th>{head}</tr>{''.join(body)}</table>")


def render(df: pd.DataFrame, curves: pd.DataFrame | None, out_path: str | Path, *, title: str = "Scaling study",
           threshold: float = 1.0, metric: str = "test_f1") -> list[str]:
    """Write the report to `out_path` (atomically); returns the ids of the plots it holds."""
    df = df.copy()
    for col, default in (("model_source", "pretrained"), ("parameters", pd.NA), ("tokens", pd.NA),
                         ("pretrain_flops", np.nan)):
        if col not in df:
            df[col] = default
    cells = analysis.cell_stats(df, metric)
    tasks = sorted(cells["task"].dropna().unique())
    sections, plots = [], []

    def add_plot(plot_id: str, heading: str, fig, caption: str = "") -> None:
        sections.append(f"<h2>{html.escape(heading)}</h2>")
        if fig is None:
            sections.append(f"<p class='note'>{html.escape(caption or 'no data for this plot')}</p>")
            return
        sections.append(f"<img class='plot' id='{plot_id}' alt='{html.escape(heading)}' "
                        f"src='data:image/png;base64,{_png(fig)}'>")
        if caption:
            sections.append(f"<p class='meta'>{html.escape(caption)}</p>")
        plots.append(plot_id)

    verdicts = pd.concat([analysis.diminishing_returns(df, f, threshold, metric) for f in FACTOR_NAMES
                          if f in df and df[f].notna().any()] or [pd.DataFrame(columns=["factor", "task"])],
                         ignore_index=True)
    fits = analysis.fit_power_law(df, "pretrain_flops", metric, gain=threshold) \
        if df["pretrain_flops"].notna().any() else None
    sections.append("<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in
                                                   summary(verdicts, fits, threshold)) + "</ul>")
    sections.append("<h2>Results</h2>" + _table(cells, df, metric))
    for factor, line_by in (("model_size", ["data_volume"]), ("data_volume", ["model_size"]),
                            ("steps", ["model_size", "data_volume"]), ("epochs", ["model"])):
        fig, caption = _factor_plot(cells, factor, line_by, tasks) if factor in cells else (None, "")
        add_plot(f"plot-{factor}", f"F1 against {FACTOR_NAMES[factor]}", fig,
                 caption + " Bands: 95% bootstrap intervals over seeds." if fig is not None else caption)
    add_plot("plot-verdicts", f"Diminishing returns: does the next level buy more than {threshold:g} F1 point?",
             _verdict_heatmap(verdicts, tasks) if len(verdicts) else None,
             "Each cell compares consecutive levels with every other factor at its largest level; the number is the "
             "change in F1 points. Green: the 95% interval of the change lies above the threshold; red: below "
             "minus the threshold; grey: neither; white: one seed.")
    fit_fig = _fit_plot(cells, fits, tasks) if fits is not None else None
    add_plot("plot-fit", "Power laws: test error against pretraining compute", fit_fig,
             "err = E + A·C^−α fitted to the best cell at each compute budget; dotted: the fitted floor E."
             if fit_fig is not None else "Too few distinct compute budgets for a fit (4 needed).")
    add_plot("plot-loss", "Pretraining loss curves", _loss_plot(curves),
             "" if curves is not None and len(curves) else "No pretraining loss curves in the results.")
    n_jobs, n_cells = len(df), len(cells)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{n_jobs} finetune jobs in {n_cells} cells, {len(tasks)} tasks; F1 in points; "
            f"threshold {threshold:g} point.</p>{''.join(sections)}</body></html>\n")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_path)
    return plots


def build(study: str, tracking_uri: str | None = None, root: str | Path = "studies", out: str | Path | None = None,
          *, threshold: float = 1.0) -> Path:
    """Load a study's results (results.load, results.loss_curves) and render its report; returns the path
    (default: the study's folder under the storage root, report.html)."""
    from scaling_study import results
    from scaling_study.errors import UserError

    if not threshold >= 0:
        raise UserError(f"report: --threshold must be a number of F1 points >= 0; got {threshold!r}")

    df = results.load(study, tracking_uri=tracking_uri, root=root)
    if not len(df):
        raise UserError(f"report: study {study!r} has no finished finetune jobs yet; allowed: a study with results")
    curves = results.loss_curves(study, tracking_uri=tracking_uri, root=root)
    from scaling_study.artifacts import Layout

    if study.endswith((".yaml", ".yml")):
        from scaling_study.spec import load_spec

        folder = Layout.of(load_spec(study)).root
    else:  # an object-store root: its local mirror
        folder = Layout.named(study, str(root)).root
    out = Path(out) if out else folder / "report.html"
    render(df, curves, out, title=f"Scaling study: {folder.name}", threshold=threshold)
    return out
