"""The dashboards' metrics, live: a real `ray start --head`, a micro study run on it, Ray's Prometheus
endpoint scraped while it runs. Every metric name in every dashboard under dashboards/ must be
exported. The same run is the end-to-end test of a URI storage root (`file://`): it completes,
a re-run trains nothing, and its checkpoints load after a download.
"""

import contextlib
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from scaling_study.grid import expand
from scaling_study.progress import METRICS, PREFIX

from conftest import REPO, needs_mirror

DASHBOARDS = REPO / "dashboards"

# ----------------------------------------------------------------------------------- PromQL names

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    expr = re.sub(r"\$\{?\w+(?::\w+)?\}?", "", expr)  # Grafana variables
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\blabel_values\s*\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        rest = expr[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _KEYWORDS or re.fullmatch(r"\d.*", word):
            continue  # a function, an aggregation or a keyword
        names.add(word)
    return names


def _queries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, (str, dict)):
                yield value if isinstance(value, str) else value.get("query", "")
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def dashboard_metrics() -> dict[str, set[str]]:
    """Metric name -> the dashboard files that read it."""
    out: dict[str, set[str]] = {}
    for file in sorted(DASHBOARDS.rglob("*.json")):
        dashboard = json.loads(file.read_text())
        for query in _queries(dashboard):
            if query == "prometheus":  # the data source variable's type
                continue
            for name in metric_names(query):
                out.setdefault(name, set()).add(file.name)
    return out


def test_metric_names_from_promql():
    assert metric_names('sum by (state) (max by (study, kind, state) (ray_a_b{study=~"$study", x="y(z)"}))') \
        == {"ray_a_b"}
    assert metric_names("rate(foo_total[5m]) / on(job) bar * 100") == {"foo_total", "bar"}
    assert metric_names("label_values(ray_scaling_study_nodes, study)") == {"ray_scaling_study_nodes"}
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(x_bucket{a="1"}[$__rate_interval])))') \
        == {"x_bucket"}


def test_dashboards_read_only_progress_metrics():
    """A fast check of what the live test proves: the dashboards read the metrics progress.py defines."""
    used = dashboard_metrics()
    assert set(used) == {PREFIX + name for name in METRICS}, used
    for file in DASHBOARDS.rglob("*.json"):
        dashboard = json.loads(file.read_text())
        names = [v["name"] for v in dashboard["templating"]["list"]]
        assert "datasource" in names
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Scraper(threading.Thread):
    """Scrapes a Prometheus endpoint every half second, keeping every sample of our metrics."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.names, self.samples = url, threading.Event(), set(), []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            with contextlib.suppress(OSError):
                self.scrape()

    def scrape(self) -> None:
        for line in _get(self.url).splitlines():
            if not line or line.startswith("#"):
                continue
            name = re.match(r"[A-Za-z_:][\w:]*", line).group(0)
            self.names.add(name)
            if name.startswith(PREFIX + "scaling_study_"):
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[len(name):line.rfind("}") + 1]))
                self.samples.append((name, labels, float(line.rsplit(" ", 1)[1])))


# ----------------------------------------------------------------------------------- the run


def live(test):
    """End to end on the Ray head: slow, and needs the task data of ../shared."""
    test = needs_mirror("datasets")(test)
    return pytest.mark.slow(test)


@pytest.fixture(scope="module")
def uri_study(ray_head, tmp_path_factory):
    """The micro study with storage.root = file://..., run on the Ray head (conftest's, token auth on)
    with this process as the driver, while the head's metrics are scraped."""
    from test_orchestration import micro_spec

    from scaling_study.orchestration import run_study
    from scaling_study.spec import load_spec

    cache = ray_head.extra_env["SCALING_STUDY_CACHE"]
    folder = tmp_path_factory.mktemp("uri")
    path = micro_spec(folder, name="uri", storage={"root": f"file://{folder}/bucket/studies"})
    study = load_spec(path)
    scraper = Scraper(ray_head.metrics_url)
    with pytest.MonkeyPatch.context() as mp, ray_head.in_this_process():
        mp.setenv("SCALING_STUDY_CACHE", cache)  # the driver's mirror, as the workers'
        scraper.start()
        try:
            summary = run_study(study, address=ray_head.address, progress=False)
            wanted = set(dashboard_metrics())
            deadline = time.monotonic() + 10  # the last export may still be on its way
            while not wanted <= scraper.names and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            scraper.stop.set()
            scraper.join()
    yield study, summary, scraper, folder, cache


@live
def test_every_dashboard_metric_is_exported(uri_study):
    study, summary, scraper, _, _ = uri_study
    assert summary.ok, summary.failures
    missing = {name: files for name, files in dashboard_metrics().items() if name not in scraper.names}
    assert not missing, f"dashboards read metrics nobody exported: {missing}"
    values = {}
    for name, labels, value in scraper.samples:
        values.setdefault(name.removeprefix(PREFIX), []).append((labels, value))
    assert all(labels["study"] == "uri" for rows in values.values() for labels, _ in rows)
    assert any(lb["kind"] == "checkpoint" and lb["state"] == "done" and v == 2
               for lb, v in values["scaling_study_nodes"])
    assert {lb["node"] for lb, _ in values["scaling_study_tokens_per_second"]} == {
        n.id for n in expand(study).of_kind("pretrain")}
    assert all(v > 0 for _, v in values["scaling_study_tokens_per_second"])
    assert all(0 < v < 1 for _, v in values["scaling_study_mfu"])
    assert all(v > 0 for _, v in values["scaling_study_device_hours_planned"])
    assert max(v for _, v in values["scaling_study_device_hours_used"]) > 0
    pieces = values["scaling_study_corpus_pieces"]  # set by the corpus build (progress.CorpusProgress)
    assert {lb["node"] for lb, _ in pieces} == {n.id for n in expand(study).of_kind("corpus")}
    done, total = ([v for lb, v in pieces if lb["state"] == state] for state in ("done", "total"))
    assert max(done) == max(total) > 0  # the last stage's pieces all done
    assert max(v for _, v in values["scaling_study_corpus_bytes_per_second"]) > 0


@live
def test_uri_storage_completes_and_rerun_is_a_noop(uri_study):
    from scaling_study import results
    from scaling_study.artifacts import DONE_FILE
    from scaling_study.orchestration import run_study

    study, summary, _, folder, cache = uri_study
    assert summary.ok, summary.failures
    assert summary.root == f"file://{folder}/bucket/studies/uri"
    stored = folder / "bucket" / "studies" / "uri"
    done = {p: p.stat().st_mtime_ns for p in stored.rglob(DONE_FILE)}
    assert len(done) == 4  # 2 checkpoints x 2 tasks
    assert len(list(stored.glob("corpus/*/manifest.json"))) == 1
    assert len(list(stored.glob("pretrain/*/checkpoints/step-*/trainer_state.pt"))) == 2
    assert not list(stored.rglob(".*tmp*"))  # no temporary upload left behind
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALING_STUDY_CACHE", cache)
        again = run_study(study, progress=False)
        assert again.ok and again.trained == 0
        assert {p: p.stat().st_mtime_ns for p in stored.rglob(DONE_FILE)} == done
        df = results.load(study.file)
    assert len(df) == 8 and df["test_f1"].notna().all()


@live
def test_checkpoints_load_after_download(uri_study, tmp_path, monkeypatch):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from scaling_study.artifacts import STATE_FILE, Layout, model_source
    from scaling_study.storage import local_copy

    study, _, _, _, _ = uri_study
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "fresh-cache"))  # another machine
    plan = expand(study)
    layout = Layout.of(study)
    for ck in plan.of_kind("checkpoint"):
        uri = model_source(study, layout, plan, ck)
        assert uri.startswith("file://")
        folder = Path(local_copy(uri, exclude=(STATE_FILE,)))
        assert folder.is_relative_to(tmp_path / "fresh-cache") and not (folder / STATE_FILE).exists()
        model = AutoModelForMaskedLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tokenizer)
