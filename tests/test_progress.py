"""Corpus build progress: `CorpusProgress` outside Ray and in a Ray task, read back by the driver's
`StudyProgress` into the live table."""

import io

import pytest

from scaling_study.grid import expand
from scaling_study.progress import (CORPUS_STAGES, CorpusProgress, StudyProgress, clear_corpus_progress,
                                    corpus_progress)
from scaling_study.spec import spec_from_data
from scaling_study.studystate import StudyState, node_weights


def _render(table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def _state(base_spec):
    study = spec_from_data(base_spec)  # data volumes 0.5 and 1.0
    plan = expand(study)
    return study, StudyState(plan, node_weights(study, plan))


def test_corpus_progress_outside_ray_only_counts(capsys, recwarn):
    """Plain `build_corpus` (no Ray): the builder's calls cost nothing, export nothing, print nothing."""
    with CorpusProgress("s", ["cb-1", "cb-2"], "scan", total=4, total_bytes=400) as p:
        p.update(1, 100)
        p.update(4, 400)
    assert (p.done, p.done_bytes) == (4, 400) and p.bytes_per_second() > 0
    assert p.row()["stage"] == "scan" and p.row(closed=True)["closed"]
    assert corpus_progress("s", ["cb-1"]) == {}
    clear_corpus_progress("s", ["cb-1"])
    assert capsys.readouterr() == ("", "") and not recwarn.list
    with pytest.raises(ValueError, match="stage 'tokenize': unknown; allowed: scan, sample, count, pack"):
        CorpusProgress("s", ["cb-1"], "tokenize", total=1, total_bytes=1)
    assert CORPUS_STAGES == ("scan", "sample", "count", "pack")


def test_live_table_shows_the_running_corpus_builds(base_spec):
    _, state = _state(base_spec)
    half, full = state.plan.of_kind("corpus")
    labels = half.factors["data_volume"], full.factors["data_volume"]
    row = {"stage": "pack", "done": 12, "total": 40, "done_bytes": 30e6, "total_bytes": 100e6,
           "bytes_per_second": 2e6, "seconds": 15.0, "closed": False}
    state.set_corpus({half.id: row, full.id: row})
    assert "corpus" not in _render(state.table()).split("finetune")[-1]  # pending builds: no line
    state.set(half.id, "running")
    state.set(full.id, "running")
    text = _render(state.table())
    # 70 MB left at 2 MB/s: 35 s
    assert f"corpus {labels[0]}, {labels[1]}: pack 12/40 pieces (30%), 2 MB/s, stage ETA 0.6 min" in text
    state.set_corpus({half.id: {**row, "stage": "scan", "done": 3, "total": 3, "done_bytes": 100e6,
                                "bytes_per_second": 5e6}, full.id: row})
    text = _render(state.table())
    assert f"corpus {labels[0]}: scan 3/3 pieces (100%), 5 MB/s\n" in text  # done: no ETA
    assert f"corpus {labels[1]}: pack 12/40" in text
    state.set_corpus({half.id: {**row, "stage": "sample", "closed": True}, full.id: row})
    assert f"corpus {labels[0]}: sample finished: 12/40 pieces, 2 MB/s\n" in _render(state.table())  # training now
    state.set(half.id, "done")
    text = _render(state.table())
    assert f"corpus {labels[0]}:" not in text and f"corpus {labels[1]}: pack" in text


@pytest.fixture(scope="module")
def local_ray():
    from scaling_study.raycluster import ray_cluster

    with ray_cluster(None):  # started and stopped here
        yield


def test_a_ray_task_reports_to_the_drivers_live_table(local_ray, base_spec):
    import ray

    def _build(study: str, nodes: list[str]) -> list:  # here: Ray's workers cannot import this test module
        """What a builder does in its Ray task: a stage, updated faster than it publishes, then closed."""
        from scaling_study.progress import CorpusProgress, corpus_progress

        seen = []
        with CorpusProgress(study, nodes, "pack", total=10, total_bytes=1000, interval=60) as p:
            p.update(4, 400)  # within the interval: not published
            seen.append(corpus_progress(study, nodes[:1]))
        seen.append(corpus_progress(study, nodes[:1]))
        return seen

    study, state = _state(base_spec)
    name = study.spec.name
    nodes = [n.id for n in state.plan.of_kind("corpus")]
    # an earlier driver's build left a row: the new driver clears it
    ray.get(ray.remote(_build).remote(name, nodes))
    with StudyProgress(study, state, interval=3600) as progress:
        assert corpus_progress(name, nodes) == {}
        during, after = ray.get(ray.remote(_build).remote(name, nodes))
        assert (during[nodes[0]]["done"], during[nodes[0]]["closed"]) == (0, False)  # the first row, from __init__
        assert (after[nodes[0]]["done"], after[nodes[0]]["done_bytes"], after[nodes[0]]["closed"]) == (4, 400, True)
        for nid in nodes:
            state.set(nid, "running")
        progress.read_corpus()
        assert set(state.corpus) == set(nodes) and state.corpus[nodes[1]]["total"] == 10
        assert "pack finished: 4/10 pieces" in _render(state.table())
    assert corpus_progress(name, nodes) == {}  # the driver ended: its study's rows are gone
