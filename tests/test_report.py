"""The HTML report: rendered for a synthetic study, loaded in headless Chromium with no network."""

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_study import report
from scaling_study.cli import main

from test_analysis import SIZES, VOLUMES, synthetic

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


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "synthetic.html"
    df = synthetic(rng=np.random.default_rng(0), seeds=3)
    plots = report.render(df, synthetic_curves(), out, title="Synthetic study")
    return out, plots


def test_render_writes_one_self_contained_page(rendered):
    out, plots = rendered
    assert plots == EXPECTED_PLOTS
    text = out.read_text()
    assert text.count("data:image/png;base64,") == len(EXPECTED_PLOTS)
    for needle in ("http:", "https:", "<script", "<link", "@import", "url("):
        assert needle not in text, needle
    # The summary comes from the verdicts: size (+3 per level) paid, data (+0.2) did not.
    summary = text[text.index("<h2>Summary</h2>"):text.index("<h2>Results</h2>")]
    assert "Model size small → base: a significant gain of more than 1 F1 point in " in summary
    assert "comparisons (all 3 tasks)" in summary
    assert "Data volume 1% → 10%: no significant gain of more than 1 F1 point in any of 36 comparisons" in summary
    assert "Scaling paid" in summary and "model size base → large" in summary.split("Scaling did not pay")[0]
    assert "data volume 1% → 10%" in summary.split("Scaling did not pay")[1]
    assert not list(out.parent.glob("*.tmp"))


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
    assert "Finetuning epochs 1 → 3: one seed only in all 3 comparisons, so no interval and no verdict" in text
    assert "Too few distinct compute budgets" in text


@pytest.mark.skipif(chromium() is None and os.environ.get("CI") != "true",
                    reason="chromium not installed (apt-get install -y chromium); CI=true fails instead")
def test_report_opens_in_headless_chromium(rendered, tmp_path):
    out, _ = rendered
    assert chromium(), "CI=true but no chromium binary: install it with apt-get install -y chromium"
    shot = tmp_path / "report.png"
    got = load_in_chromium(out, shot, tmp_path / "profile")
    assert got["errors"] == []
    assert [p["id"] for p in got["plots"]] == EXPECTED_PLOTS
    assert all(p["ok"] and p["w"] > 300 and p["src"] == "data:image/png;base64," for p in got["plots"]), got["plots"]
    assert got["tables"] == 1 and len(got["summary"]) >= 5
    assert all(url.startswith(("file:", "data:")) for url in got["requests"]), got["requests"]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.1 and (pixels[..., :3] < 0.5).mean() > 0.01   # not blank, has ink
    keep = os.environ.get("SCALING_STUDY_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_cli_report_without_results_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", "nosuch", "--root", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "no results" in err[0]
    assert not (tmp_path / "r.html").exists()
    assert main(["report", "nosuch", "--threshold", "-0.5"]) == 2
    assert "--threshold must be a number of F1 points >= 0" in capsys.readouterr().err
