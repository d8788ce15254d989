"""The HTML report: rendered for synthetic studies (a power-law one, a flat frontier, two seeds, collapsed
runs), its figures for a paper, and the page loaded in headless Chromium with no network."""

import base64
import html
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_study import analysis, report, results
from scaling_study.cli import main

from test_analysis import SIZES, TASKS, VOLUMES, synthetic

EXPECTED_PLOTS = list(report.PLOT_IDS)


def synthetic_curves() -> pd.DataFrame:
    """Loss falling as a power of tokens seen, faster for larger models and more data."""
    rows = []
    for i, (size, params) in enumerate(SIZES.items()):
        for j, (vol, tokens) in enumerate(VOLUMES.items()):
            for step in range(100, 2001, 100):
                seen = step * 256 * 128
                rows.append({"pretrain_node_id": f"pt-{size}-{vol}", "model_size": size, "data_volume": vol,
                             "parameters": params, "step": step, "tokens_seen": seen,
                             "loss": 1.8 + 0.1 * (2 - j) + 40 * seen ** -0.2 / (1 + 0.3 * i)})
    return pd.DataFrame(rows)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it
    reads JSON messages from fd 3 and writes to fd 4, each ending in a NUL): no websocket library,
    no port."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                "--window-size=1400,1000", "about:blank"]
        # bash puts our pipe ends on fds 3 and 4, where Chromium expects them
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "bash", *args],
                                     pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def load_in_chromium(page: Path, screenshot: Path, profile: Path) -> dict:
    """Open `page`, wait for load, take a full-page screenshot; returns the plots found in the DOM,
    console errors and exceptions, and every URL the page requested."""
    browser = Chromium(chromium(), profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired", timeout=60)
        probe = """JSON.stringify({
            plots: [...document.querySelectorAll('img.plot')].map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 0,
                                                                          w: i.naturalWidth, src: i.src.slice(0, 22)})),
            svgs: document.querySelectorAll('svg').length, tables: document.querySelectorAll('table').length,
            summary: [...document.querySelectorAll('h2 + ul li')].map(li => li.textContent),
            height: document.documentElement.scrollHeight})"""
        dom = json.loads(browser.send("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                      session=session)["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    events = browser.events
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {**dom, "errors": errors, "requests": requests}


def power_law_study(seeds: int = 3) -> pd.DataFrame:
    """The synthetic grid with pretrained F1 = 100 - (12 + 40 (C / C_min)^-0.4) + 0.2 per data-volume
    level + N(0, 0.3): size and steps pay through compute, data volume barely. BC5CDR's 3-epoch seed 0
    collapsed (F1 2)."""
    df = synthetic(rng=np.random.default_rng(0), seeds=seeds, epochs_gain=0.5)
    rng = np.random.default_rng(1)
    pre = df["model_source"] == "pretrained"
    flops = df.loc[pre, "pretrain_flops"].astype(float)
    volume = df.loc[pre, "data_volume"].map({v: i for i, v in enumerate(VOLUMES)}).astype(float)
    base = df.loc[pre, "task"].map({"bc5cdr_ner": 0.0, "scierc_re": -15.0, "paper_field_cls": -8.0})
    err = 12 + 40 * (flops / flops.min()) ** -0.4 - 0.2 * volume - base - 0.5 * (df.loc[pre, "epochs"] == 3)
    df.loc[pre, "test_f1"] = (100 - err + rng.normal(0, 0.3, pre.sum())) / 100
    hit = (df["task"] == "bc5cdr_ner") & (df["epochs"] == 3) & (df["seed"] == 0)
    df.loc[hit, "test_f1"], df.loc[hit, "collapsed"] = 0.02, True
    return df


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "synthetic.html"
    df = power_law_study()
    plots = report.render(df, synthetic_curves(), out, title="Synthetic study")
    return out, plots, df


def _summary(text: str) -> str:
    return text[text.index("<h2>Summary</h2>"):text.index("<h2>Results</h2>")]


def test_render_writes_one_self_contained_page(rendered):
    out, plots, _ = rendered
    assert plots == EXPECTED_PLOTS
    text = out.read_text()
    assert text.count("data:image/svg+xml;base64,") == len(EXPECTED_PLOTS)
    for needle in ("http:", "https:", "<script", "<link", "@import", "url(", "could not be"):
        assert needle not in text, needle
    summary = _summary(text)
    # The summary comes from the verdicts: size and steps pay through compute, data (+0.2) does not.
    assert "Model size small → base (36 comparisons): a gain above 1 F1 point in " in summary
    assert "(all 3 tasks)" in summary
    assert "Scaling paid (a gain above 1 F1 point shown in most comparisons): model size small → base" in summary
    assert "pretraining steps 1000 → 2000" in summary.split("Scaling paid")[1].split("</li>")[0]
    undecided = summary.split("Not decided")[1].split("</li>")[0]
    assert "data volume 1% → 10%" in undecided and "finetuning epochs 1 → 3" in undecided
    assert "Scaling did not pay" not in summary          # +0.2 is not shown to be below 1 point by 3 seeds
    assert "no evidence of a gain above 1 F1 point (and none against) in" in summary
    # BC5CDR's collapsed seed leaves 2 of 3 seeds in its 3-epoch cells: those comparisons cannot decide
    assert "because collapsed runs were left out" in summary.split("Finetuning epochs 1 → 3")[1].split("</li>")[0]
    assert "the next 1 F1 point costs" in summary
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_figures_for_a_paper_beside_the_page(rendered):
    """SVG and 300-dpi PNG per plot in synthetic-figures/, linked from the page; display names; each
    legend entry once, in level order."""
    from PIL import Image

    out, plots, df = rendered
    folder = out.parent / "synthetic-figures"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p}.{ext}" for p in plots for ext in ("svg", "png"))
    for plot in plots:
        assert (folder / f"{plot}.svg").read_bytes().lstrip().startswith(b"<?xml")
        with Image.open(folder / f"{plot}.png") as png:
            assert png.info["dpi"] == pytest.approx((300, 300), abs=0.5) and png.width >= 1500
    assert "href='synthetic-figures/'" in out.read_text()
    cells = analysis.cell_stats(df)
    names = report.task_names(sorted(cells["task"].unique()))
    assert names == {"bc5cdr_ner": "BC5CDR", "paper_field_cls": "Paper Field", "scierc_re": "SciERC"}
    assert report.task_names(["scierc_ner", "scierc_re"]) == {"scierc_ner": "SciERC (NER)", "scierc_re": "SciERC (RE)"}
    fig, _ = report._factor_plot(cells, "epochs", ["model"], sorted(names), names)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["BC5CDR", "Paper Field", "SciERC"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == sorted(set(labels), key=labels.index) and "allenai/scibert" in labels
    fig, _ = report._factor_plot(cells, "data_volume", ["model_size"], sorted(names), names)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(SIZES)          # level order, each once
    curves = synthetic_curves()
    twin = curves[curves["pretrain_node_id"] == "pt-small-1%"].assign(pretrain_node_id="pt-small-1%-again")
    fig = report._loss_plot(pd.concat([curves, twin]))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == len(set(labels)) == 10             # two runs of one size and volume: told apart
    assert labels[:4] == ["small · 1% (pt-small-1%)", "small · 1% (pt-small-1%-again)", "small · 10%",
                          "small · 100%"]


def test_one_table_definition_and_unit(rendered):
    """The report's table is `results.pivot(df, "task", "model")`: the same cells, numbers and sentence."""
    out, _, df = rendered
    text = out.read_text()
    table = results.pivot(df, "task", "model")
    assert html.escape(table.attrs["definition"]) in text
    assert table.attrs["definition"].startswith("test_f1 in points (100 x the fraction), mean over seeds; every "
                                                "factor not in the table at the study's largest level")
    results_table = text[text.index("<h2>Results</h2>"):text.index("<h2>Collapsed runs</h2>")]
    names = report.task_names(table["task"])
    for _, row in table.iterrows():
        line = results_table.split(f"<td class='name'>{names[row['task']]}</td>")[1].split("</tr>")[0]
        cells = [td.split(" ±")[0].split("<br>")[0] for td in line.split("<td>")[1:]]
        assert cells == [f"{v:.1f}" for v in row.drop("task")], row["task"]
    assert 50 < table.drop(columns="task").to_numpy().mean() < 100        # points, not fractions


def test_collapsed_share_per_task_and_cell(rendered):
    out, _, df = rendered
    text = out.read_text()
    section = text[text.index("<h2>Collapsed runs</h2>"):text.index("<h2>F1 against model size</h2>")]
    n = int(df["collapsed"].sum())
    assert f"{n} of {len(df)} finetune jobs ({100 * n / len(df):.0f}%) are flagged collapsed" in section
    assert "<td class='name'>BC5CDR</td><td>" in section
    assert "<td class='name'>SciERC</td><td>114</td><td>0</td><td>0%</td>" in section
    assert f"Per cell: the {n} of {len(df) // 3} cells with a collapsed run" in section
    bc5cdr = text.split("<h2>Results</h2>")[1].split("<td class='name'>BC5CDR</td>")[1].split("</tr>")[0]
    assert bc5cdr.count("<br><small>2 seeds, 1/3 collapsed</small>") == 10       # every model at 3 epochs
    assert f"Collapsed runs: {n} of {len(df)} jobs, left out of the table, verdicts and fits." in text


def test_including_collapsed_runs_on_request(tmp_path):
    df = power_law_study()
    df = df[(df["task"] == "bc5cdr_ner") & (df["steps"].isna() | (df["steps"] == 2000))]
    report.render(df, None, tmp_path / "with.html", include_collapsed=True)
    text = (tmp_path / "with.html").read_text()
    assert "collapsed runs included" in text and "counted like any other (--include-collapsed)" in text
    assert "because collapsed runs were left out" not in _summary(text)


def test_flat_frontier_and_two_seeds_still_give_a_report(tmp_path):
    """Best F1 31.8-32.8 over 4 compute levels, 2 seeds: no traceback, no band, no made-up fit, no
    "did not pay" (absence of evidence is not evidence of absence)."""
    df = synthetic(rng=np.random.default_rng(3), seeds=2, sizes={"small": SIZES["small"], "base": SIZES["base"]},
                   volumes={"100%": VOLUMES["100%"]}, steps=(1000, 2000), epochs=(1, 3), externals=())
    pre = df["model_source"] == "pretrained"
    level = df["pretrain_flops"].rank(method="dense").astype(int) - 1          # 4 compute levels
    df.loc[pre, "test_f1"] = level.map(dict(enumerate((0.318, 0.328, 0.321, 0.325)))) + 0.001 * df["seed"]
    df.loc[df["epochs"] == 3, "test_f1"] += 0.087                               # +8.7 points, 2 seeds
    plots = report.render(df, None, tmp_path / "flat.html")
    text = (tmp_path / "flat.html").read_text()
    assert "could not be" not in text and "plot-fit" not in plots
    summary = _summary(text)
    assert "Finetuning epochs 1 → 3 (12 comparisons): too few seeds to decide in 12 (fewer than 3); " \
           "median change +8.7 points." in summary
    assert "Not decided" in summary and "Scaling did not pay" not in summary and "Scaling paid" not in summary
    assert "No power-law estimate (not estimable) for BC5CDR, Paper Field, SciERC" in summary
    assert text.count("not estimable: ") == 3 and "frontier F1 " in text
    assert "<br><small>2 seeds</small>" in text                                  # the table says so too
    cells = analysis.cell_stats(df)
    assert cells["ci_low"].isna().all()                                          # no bands to draw


def test_the_control_arm_in_the_table_the_steps_plot_and_the_verdicts(tmp_path):
    """pretrain.random_init: the step-0 cells are a model of their own in the table, the steps plot's
    first level, and a verdict of their own, "pretraining none -> the largest steps level"."""
    df = synthetic(rng=np.random.default_rng(5), seeds=3, sizes={"small": SIZES["small"]},
                   volumes={"100%": VOLUMES["100%"]}, externals=(), control_gap=5.0)
    plots = report.render(df, None, tmp_path / "c.html")
    text = (tmp_path / "c.html").read_text()
    summary = _summary(text)
    assert "Pretraining none → 2,000 steps (6 comparisons): a gain above 1 F1 point in 6 (all 3 tasks); " \
           "median change +5.0 points." in summary
    assert "pretraining none → 2,000 steps" in summary.split("Scaling paid")[1].split("</li>")[0]
    assert "Pretraining steps 1000 → 2000 (6 comparisons)" in summary  # the control is no steps level
    assert "<th>small-100%</th><th>small-100% | no pretraining</th>" in text
    assert "(0 for the control arm: no pretraining)" in text
    assert "plot-steps" in plots and "plot-verdicts" in plots
    top = report._top_comparisons(report._verdicts(df, 1.0, "test_f1", False))
    assert set(top.loc[top["factor"] == analysis.CONTROL, "task"]) == set(TASKS)
    assert report._level_labels(analysis.cell_stats(df), "steps", [0, 1000]) == ["0\nnone", "1000"]


def test_single_level_factors_get_a_note_not_a_plot(tmp_path):
    df = synthetic(sizes={"base": SIZES["base"]}, steps=(1000,), seeds=2)
    plots = report.render(df, None, tmp_path / "r.html")
    assert plots == ["plot-data_volume", "plot-epochs", "plot-verdicts"]
    text = (tmp_path / "r.html").read_text()
    assert "model size: one level only (base); no plot" in text and "No pretraining loss curves" in text
    # Published models only, one seed: epochs is the only factor; no intervals, no fit, still a page.
    df = synthetic(seeds=1)
    plots = report.render(df[df.model_source == "external"], None, tmp_path / "e.html")
    assert plots == ["plot-epochs", "plot-verdicts"]
    text = (tmp_path / "e.html").read_text()
    assert "Finetuning epochs 1 → 3 (3 comparisons): too few seeds to decide in 3 (fewer than 3)" in text
    assert "No pretraining compute in the results: no fit." in text


def test_a_section_that_fails_is_a_note_not_a_traceback(tmp_path, monkeypatch):
    def broken(*args):
        raise OverflowError("math range error")

    monkeypatch.setattr(report, "_verdict_heatmap", broken)
    df = synthetic(seeds=3, tasks={"scierc_re": TASKS["scierc_re"]})
    plots = report.render(df[df["model_source"] == "external"], None, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    assert plots == ["plot-epochs"]
    assert "could not be computed (OverflowError: math range error)" in text


@pytest.mark.skipif(chromium() is None and os.environ.get("CI") != "true",
                    reason="chromium not installed (apt-get install -y chromium); CI=true fails instead")
def test_report_opens_in_headless_chromium(rendered, tmp_path):
    out, _, _ = rendered
    assert chromium(), "CI=true but no chromium binary: install it with apt-get install -y chromium"
    shot = tmp_path / "report.png"
    got = load_in_chromium(out, shot, tmp_path / "profile")
    assert got["errors"] == []
    assert [p["id"] for p in got["plots"]] == EXPECTED_PLOTS
    assert all(p["ok"] and p["w"] > 300 and p["src"] == "data:image/svg+xml;bas" for p in got["plots"]), got["plots"]
    assert got["tables"] == 4 and len(got["summary"]) >= 5     # results, collapsed per task and per cell, fits
    assert all(url.startswith(("file:", "data:")) for url in got["requests"]), got["requests"]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.1 and (pixels[..., :3] < 0.5).mean() > 0.01   # not blank, has ink
    keep = os.environ.get("SCALING_STUDY_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_cli_report_without_results_is_one_line_exit_2(tmp_path, capsys):
    assert "--include-collapsed" in [a for act in _report_parser()._actions for a in act.option_strings]
    assert main(["report", "nosuch", "--root", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "no results" in err[0]
    assert not (tmp_path / "r.html").exists()
    assert main(["report", "nosuch", "--threshold", "-0.5"]) == 2
    assert "--threshold must be a number of F1 points >= 0" in capsys.readouterr().err


def _report_parser():
    from scaling_study.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["report"]


def test_adaptive_seeds_decisions_on_the_page(tmp_path):
    """An adaptive-seeds study's log (here from the rule run on a synthetic study): each wave and each
    comparison's "settled after k seeds" on the page, after the summary."""
    from scaling_study import adaptive
    from scaling_study.spec import AdaptiveSeeds

    df = synthetic(sizes={"small": SIZES["small"], "base": SIZES["base"]}, steps=(1000,), epochs=(1,), externals=())
    cells = df[df["seed"] == 0].assign(group=lambda d: list(zip(d["model"], d["task"])),
                                       cell=lambda d: list(zip(d["model"], d["task"])),
                                       label=lambda d: d["model"] + " | " + d["task"])
    design = adaptive.Design.from_cells(cells.drop(columns=["seed", "test_f1"]))
    rng = np.random.default_rng(0)
    truth = {c: 50.0 + (8.0 if "base" in c[0] else 0.0) for c in design.group_of}
    log = adaptive.simulate(design, AdaptiveSeeds(min=2, max=5),
                            lambda g, s: {g: (truth[g] + 0.5 * rng.standard_normal(), False)}).log()
    report.render(df, None, tmp_path / "a.html", seeds_log=json.loads(json.dumps(log)))
    text = (tmp_path / "a.html").read_text()
    assert text.index("<h2>Adaptive seeds</h2>") < text.index("<h2>Results</h2>")
    assert "After 2 seeds: " in text and "settled after 3 seeds" in text and "Every comparison" in text
    assert "could not be" not in text
