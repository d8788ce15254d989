"""The state of every node of a running study, and its live view in the terminal.

    from scaling_study.studystate import StudyState, live_view
    state = StudyState(plan, node_weights(study, plan), done=finished_ids)
    state.set(node_id, "running"); state.fail(node, "reason", log_path)
    with live_view(state, enabled=True):      # a rich table of node counts by kind and state, with an ETA
        ...
    state.set_corpus(progress.corpus_progress(name, ids))   # corpus builds' stages under it (StudyProgress does)
    with quiet_terminal("studies/x/logs/driver.log"), live_view(state, enabled=True):
        ...                                   # the table on the terminal; Ray's and Tune's messages in the log

One lock guards the states: the study driver, its Ray Tune search algorithm and the metrics
thread (`scaling_study.progress`) read and write them from different threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from scaling_study.grid import Node, Plan

STATES = ("pending", "running", "done", "failed", "blocked", "skipped")
"""`skipped`: a finetune job an adaptive-seeds rule did not need (`scaling_study.adaptive`)."""
SHOWN = ("corpus", "pretrain", "checkpoint", "finetune")
WORK = ("corpus", "pretrain", "finetune_run")
"""The node kinds that compute something; checkpoints and finetune cells are their outputs."""


@dataclasses.dataclass
class Failure:
    node: str
    kind: str
    what: str
    reason: str
    log: str


def node_weights(study, plan: Plan) -> dict[str, float]:
    """Estimated FLOPs per node, for the ETA (`costs.node_flops`); finetune cells share their run's."""
    from scaling_study.costs import node_flops

    flops = node_flops(study, plan)
    weights = {node.id: flops.get(node.id, 0.0) for node in plan.of_kind("pretrain")}
    for run in plan.of_kind("finetune_run"):
        cells = plan.children(run.id)
        weights.update({cell.id: flops.get(run.id, 0.0) / len(cells) for cell in cells})
    weights.update({node.id: 1e9 for node in plan.of_kind("corpus")})  # builds take minutes: a token weight
    return weights


class StudyState:
    """Every node's state, shared by the driver, the Tune searcher and the live view (one lock)."""

    def __init__(self, plan: Plan, weights: dict[str, float], *, done: Iterable[str] = ()):
        self.plan, self.weights = plan, weights
        self.state = {nid: "pending" for nid in plan.nodes}
        self.state.update(dict.fromkeys(done, "done"))
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.done_at_start = sum(w for nid, w in weights.items() if self.state[nid] == "done")
        self.corpus: dict[str, dict] = {}
        """Corpus node id -> its build's last `progress.CorpusProgress.row`."""

    def set_corpus(self, rows: dict[str, dict]) -> None:
        with self.lock:
            self.corpus = dict(rows)

    def set(self, nid: str, state: str) -> None:
        with self.lock:
            self.state[nid] = state

    def unfinished(self) -> list[Node]:
        """The nodes that compute something and are not done."""
        return [n for n in self.plan.nodes.values() if n.kind in WORK and self.state[n.id] != "done"]

    def fail(self, node: Node, reason: str, log: str | None, *, state: str = "failed") -> None:
        what = " ".join(f"{k}={v}" for k, v in node.factors.items())
        with self.lock:
            self.state[node.id] = state
            self.failures.append(Failure(node.id, node.kind, what, reason, str(log) if log else ""))

    def tracking_lost(self, node: Node | None, reason: str, *, what: str = "tracking") -> None:
        """A node's output is done (or the study ended) but MLflow did not take its record: a re-run logs it.

        Also, with `what`, a failure no node can be named for (the summary lists it; the exit is 1).
        """
        with self.lock:
            self.failures.append(Failure(node.id if node else self.plan.study, node.kind if node else "study",
                                         what, reason, ""))

    def counts(self) -> dict[str, dict[str, int]]:
        out = {kind: dict.fromkeys(STATES, 0) for kind in SHOWN}
        with self.lock:
            for nid, state in self.state.items():
                kind = self.plan.nodes[nid].kind
                if kind in out:
                    out[kind][state] += 1
        return out

    def eta_seconds(self) -> float | None:
        """Remaining work at the rate of this invocation so far (work = estimated FLOPs)."""
        with self.lock:
            done = sum(w for nid, w in self.weights.items() if self.state[nid] == "done")
            left = sum(w for nid, w in self.weights.items() if self.state[nid] in ("pending", "running"))  # worst case
        done -= self.done_at_start
        elapsed = time.monotonic() - self.started
        return left * elapsed / done if done > 0 else None

    def table(self):
        from rich.table import Table

        eta = self.eta_seconds()
        elapsed = time.monotonic() - self.started
        title = f"{self.plan.study}: {elapsed / 60:.1f} min" + (f", ETA {eta / 60:.1f} min" if eta is not None else "")
        table = Table(title=title, title_justify="left", caption=self.corpus_lines() or None,
                      caption_justify="left")
        table.add_column("nodes")
        for state in STATES:
            table.add_column(state, justify="right")
        for kind, row in self.counts().items():
            table.add_row(kind, *(str(row[s]) for s in STATES))
        return table

    def corpus_lines(self) -> str:
        """A line per stage the running corpus builds are in: its volumes, pieces, throughput, ETA."""
        with self.lock:
            rows = {nid: row for nid, row in self.corpus.items() if self.state.get(nid) == "running"}
        stages: dict[tuple, list[str]] = {}
        for node in self.plan.of_kind("corpus"):  # plan order: the volumes as the spec lists them
            if node.id in rows:
                r = rows[node.id]
                key = tuple(r.get(k) for k in ("stage", "done", "total", "done_bytes", "total_bytes",
                                               "bytes_per_second", "closed"))
                stages.setdefault(key, []).append(node.factors.get("data_volume", node.id))
        return "\n".join(_corpus_line(volumes, *key) for key, volumes in stages.items())


def _corpus_line(volumes: list[str], stage: str, done: int, total: int, done_bytes: float, total_bytes: float,
                 rate: float, closed: bool) -> str:
    line = f"corpus {', '.join(volumes)}: {stage}{' finished:' if closed else ''} {done:,}/{total:,} pieces"
    if total and not closed:
        line += f" ({100 * done / total:.0f}%)"
    line += f", {_megabytes(rate)}/s"
    if rate > 0 and total_bytes > done_bytes and not closed:
        line += f", stage ETA {(total_bytes - done_bytes) / rate / 60:.1f} min"
    return line


def _megabytes(value: float) -> str:
    return f"{value / 1e9:.3g} GB" if value >= 1e9 else f"{value / 1e6:.3g} MB"


_terminal: TextIO | None = None
"""The terminal while `quiet_terminal` sends stdout and stderr to a log: where the live view draws."""


@contextlib.contextmanager
def quiet_terminal(log: str | Path, *, enabled: bool = True):
    """Send what this process and the processes it starts write to stdout and stderr to `log` (appended),
    at the file-descriptor level: Ray's token-auth warning, Tune's experiment box, its "View detailed
    results" and TensorBoard hints, the raylet's worker-pool warnings. A user can act on none of them
    during a run; the study's log keeps them for when something fails. The live view (`live_view`)
    still draws on the terminal. Yields the log's path (None when not `enabled`)."""
    global _terminal
    if not enabled:
        yield None
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = (os.dup(1), os.dup(2))
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    _terminal = terminal
    try:
        yield log
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal = None
        terminal.close()


def live_view(state: StudyState, enabled: bool):
    """A context in which the terminal shows `state.table()`, refreshed every second."""
    if not enabled:
        return contextlib.nullcontext()
    from rich.console import Console
    from rich.live import Live

    class _View:
        def __rich__(self):
            return state.table()

    if _terminal is None:
        return Live(_View(), refresh_per_second=1, transient=False)
    # under quiet_terminal: draw on the terminal, and leave what Python prints to the log
    return Live(_View(), console=Console(file=_terminal), refresh_per_second=1, transient=False,
                redirect_stdout=False, redirect_stderr=False)
