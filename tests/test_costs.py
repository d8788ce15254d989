"""Plan costs: exact parameters, hand-counted FLOPs, device-hours from the stated assumptions."""

import copy
import os

import pytest

from scaling_study.costs import BYTES_PER_TOKEN, CORPUS_RATES, estimate, node_flops
from scaling_study.grid import expand
from scaling_study.models import count_parameters, load_corpus_rates, load_devices, load_presets
from scaling_study.spec import CorpusSpec, spec_from_data

from conftest import BASE_SPEC

TOKENIZER_SAMPLE = CorpusSpec(name="x").tokenizer_sample  # the default

LARGE = {
    "name": "large-run",
    "corpus": {"name": "c", "paths": ["x"], "total_tokens": 221e9, "vocab_size": 50000},
    "model_sizes": ["large"], "data_volumes": ["1%"],
    "pretrain": {"steps": [1000], "batch_size": 256, "seq_len": 128, "mask_rate": 0.15},
    "finetune": {"epochs": [1]}, "tasks": {"include": ["scierc_re"]},
}


def test_bert_large_flops_match_hand_count():
    study = spec_from_data(copy.deepcopy(LARGE))
    run = estimate(study, expand(study), "h100").pretrain_runs[0]
    # By hand, BERT-large (24 layers, h 1024, FFN 4096), vocab 50,000, seq 128, 15% masked:
    #   encoder forward per token: 24 * (2 * (4 * 1024^2 + 2 * 1024 * 4096) + 4 * 128 * 1024)
    #                            = 24 * (2 * (4,194,304 + 8,388,608) + 524,288) = 24 * 25,690,112 = 616,562,688
    #   head forward per masked position: 2 * 1024^2 + 2 * 1024 * 50,000 = 2,097,152 + 102,400,000 = 104,497,152
    #   per token, fwd + bwd: 3 * (616,562,688 + 0.15 * 104,497,152) = 3 * 632,237,260.8 = 1,896,711,782.4
    #   tokens: 1,000 steps * 256 sequences * 128 = 32,768,000
    hand = 1_896_711_782.4 * 32_768_000  # = 6.2152e16
    assert run.flops == pytest.approx(hand, rel=0.02)
    assert run.tokens == 32_768_000
    assert run.parameters == 355_139_408
    assert run.volume_tokens == pytest.approx(2.21e9)
    h100 = load_devices()["h100"]
    assert run.device_hours == pytest.approx(hand / (h100.peak_flops * h100.assumed_mfu) / 3600, rel=0.02)


def test_mfu_override_scales_hours():
    study = spec_from_data(copy.deepcopy(LARGE))
    plan = expand(study)
    a = estimate(study, plan, "h100", mfu=0.2).totals.device_hours
    b = estimate(study, plan, "h100", mfu=0.4).totals.device_hours
    assert a == pytest.approx(2 * b)


def test_storage_and_counts(tmp_path):
    (tmp_path / "corpus.txt").write_text("word " * 4600)  # 23,000 bytes -> 5,000 estimated tokens
    data = copy.deepcopy(BASE_SPEC)
    data["corpus"]["paths"] = [str(tmp_path / "corpus.txt")]
    study = spec_from_data(data)
    report = estimate(study, expand(study), "cpu")
    assert report.corpus.tokens == pytest.approx(5000)
    presets = load_presets()
    params = sum(count_parameters(presets[s], 1000) for s in ("debug", "tiny"))
    checkpoints_per_run = 2
    volumes = 2
    assert report.storage.checkpoint_weights_bytes == params * checkpoints_per_run * volumes * 4
    assert report.counts["finetune"] == 2 * 2 * 2 * 2 * 3
    assert all(r.flops > 0 for r in report.finetune_by_task)
    # capped: 50 training examples per task
    assert {r.train_examples for r in report.finetune_by_task} == {50}


def test_corpus_builds_cost_one_scan_and_a_pack_per_volume():
    """221B tokens in volumes of 1%, 10% and 100%: one scan of the whole text, shared evenly; each
    volume packs its own text and trains its tokenizer on at most TOKENIZER_SAMPLE of it."""
    data = copy.deepcopy(LARGE)
    data["data_volumes"] = ["1%", "10%", "100%"]
    study = spec_from_data(data)
    plan = expand(study)
    report = estimate(study, plan, "h100", cpus=64, cpus_source="--cpus")
    rates = load_corpus_rates()[CORPUS_RATES]
    assert (report.cpu.cpus, report.cpu.cpus_source, report.cpu.pack_rate) == (64, "--cpus", rates.pack_rate)
    text = 221e9 * BYTES_PER_TOKEN
    scan = text / rates.scan_rate / 3600
    train = TOKENIZER_SAMPLE / rates.train_rate / 3600  # every volume holds more than the sample
    rows = {r.data_volume: r for r in report.corpus_builds}
    assert list(rows) == ["1%", "10%", "100%"]
    assert [r.id for r in report.corpus_builds] == [n.id for n in plan.of_kind("corpus")]
    for label, fraction in (("1%", 0.01), ("10%", 0.1), ("100%", 1.0)):
        r, pack = rows[label], fraction * text / rates.pack_rate / 3600
        assert r.volume_bytes == pytest.approx(fraction * text)
        assert r.tokenizer_sample_bytes == TOKENIZER_SAMPLE
        assert (r.scan_cpu_hours, r.train_cpu_hours, r.pack_cpu_hours) == pytest.approx((scan / 3, train, pack))
        assert r.cpu_hours == pytest.approx(scan / 3 + train + pack)
        assert r.wall_hours == pytest.approx((scan / 3 + pack) / 64 + train)
    packs = 1.11 * text / rates.pack_rate / 3600
    t = report.totals
    assert t.corpus_cpu_hours == pytest.approx(scan + packs + 3 * train)
    assert t.corpus_wall_hours == pytest.approx((scan + packs) / 64 + 3 * train)  # the trainings in turn
    one = estimate(study, plan, "h100", cpus=1).totals
    assert one.corpus_cpu_hours == pytest.approx(t.corpus_cpu_hours)
    assert one.corpus_wall_hours == pytest.approx(t.corpus_cpu_hours)  # one CPU: one thing at a time
    assert t.device_hours == one.device_hours  # CPU-hours are counted apart


def test_corpus_build_of_files_and_of_an_unknown_size(tmp_path):
    (tmp_path / "corpus.txt").write_text("word " * 4600)  # 23,000 bytes
    data = copy.deepcopy(BASE_SPEC)  # volumes 0.5 and 1.0
    data["corpus"]["paths"] = [str(tmp_path / "corpus.txt")]
    study = spec_from_data(data)
    report = estimate(study, expand(study), "cpu")
    rates = load_corpus_rates()[CORPUS_RATES]
    assert (report.cpu.cpus, report.cpu.cpus_source) == (os.cpu_count(), "this machine's, os.cpu_count()")
    half = report.corpus_builds[0]
    assert half.volume_bytes == half.tokenizer_sample_bytes == pytest.approx(11_500)  # below the sample cap
    assert half.scan_cpu_hours == pytest.approx(23_000 / rates.scan_rate / 3600 / 2)
    assert half.train_cpu_hours == pytest.approx(11_500 / rates.train_rate / 3600)

    data["corpus"]["paths"] = [str(tmp_path / "missing")]
    study = spec_from_data(data)
    report = estimate(study, expand(study), "cpu")
    assert report.corpus.tokens is None
    assert all(r.cpu_hours is None and r.wall_hours is None for r in report.corpus_builds)
    assert report.totals.corpus_cpu_hours is None and report.totals.corpus_wall_hours is None
    with pytest.raises(ValueError, match="cpus 0"):
        estimate(study, expand(study), "cpu", cpus=0)


def test_corpus_rates_are_validated():
    rates = load_corpus_rates(extra={"mine": {"description": "d", "scan_rate": "3e6", "pack_rate": 1.0,
                                              "train_rate": 2.0, "source": "s"}})
    assert rates["mine"].scan_rate == 3e6  # PyYAML's string for 3e6, read as the number meant
    with pytest.raises(ValueError, match="pack_rate must be a positive number"):
        load_corpus_rates(extra={"bad": {"description": "d", "scan_rate": 1.0, "pack_rate": 0, "train_rate": 1.0,
                                         "source": "s"}})
    with pytest.raises(ValueError, match=r"missing fields \['train_rate'\]"):
        load_corpus_rates(extra={"bad": {"description": "d", "scan_rate": 1.0, "pack_rate": 1.0, "source": "s"}})


def test_estimate_is_pure(tmp_path):
    study = spec_from_data(copy.deepcopy(LARGE))
    plan = expand(study)
    before = plan.to_dict()
    estimate(study, plan, "a100")
    assert plan.to_dict() == before


def test_node_flops_are_what_estimate_sums():
    data = copy.deepcopy(LARGE)
    data["external_models"] = [{"name": "known", "source": "x/known", "num_parameters": 110_000_000},
                               {"name": "unknown", "source": "x/unknown"}]
    study = spec_from_data(data)
    plan = expand(study)
    flops = node_flops(study, plan)
    report = estimate(study, plan, "h100")
    unknown = {n.id for n in plan.of_kind("finetune_run") if plan.nodes[n.parents[0]].factors["model"] == "unknown"}
    assert set(flops) == {n.id for n in plan.nodes.values() if n.kind in ("pretrain", "finetune_run")} - unknown
    assert all(v > 0 for v in flops.values())
    assert {r.id: r.flops for r in report.pretrain_runs} == {k: v for k, v in flops.items() if k.startswith("pt-")}
    assert sum(flops.values()) == pytest.approx(report.totals.flops)
    assert report.totals.finetune_jobs_without_flops == len(unknown) == 1


def test_report_json_keys():
    # `plan --format json` is read by scripts: the keys and their order stay as they are
    study = spec_from_data(copy.deepcopy(LARGE))
    data = estimate(study, expand(study), "h100").to_dict()
    assert list(data) == ["study", "device", "counts", "pretrain_runs", "finetune_by_task", "storage", "corpus",
                          "totals", "adaptive_seeds",  # adaptive_seeds: added for issue 18 (None here)
                          "cpu", "corpus_builds"]  # added for issue 13
    assert list(data["cpu"]) == ["cpus", "cpus_source", "scan_rate", "pack_rate", "train_rate", "rates_source"]
    assert list(data["corpus_builds"][0]) == ["id", "data_volume", "volume_bytes", "tokenizer_sample_bytes",
                                              "scan_cpu_hours", "train_cpu_hours", "pack_cpu_hours", "cpu_hours",
                                              "wall_hours"]
    assert data["adaptive_seeds"] is None
    assert list(data["device"]) == ["name", "description", "peak_flops", "peak_precision", "assumed_mfu",
                                    "throughput_flops", "source"]
    assert list(data["pretrain_runs"][0]) == ["id", "model_size", "parameters", "data_volume", "volume_tokens",
                                              "steps", "checkpoints", "tokens", "epochs_over_data", "flops",
                                              "flops_encoder", "flops_head", "device_hours"]
    assert list(data["finetune_by_task"][0]) == ["task", "runs", "jobs", "flops", "flops_unknown", "type",
                                                 "train_examples", "test_examples", "device_hours"]
    assert list(data["storage"]) == ["checkpoint_weights_bytes", "checkpoint_optimizer_bytes", "corpus_shards_bytes",
                                     "total_bytes", "node_disk"]  # node_disk: added for the cluster's disks
    assert list(data["storage"]["node_disk"]) == ["head", "pretrain_node", "finetune_node"]
    assert list(data["corpus"]) == ["tokens", "source"]
    assert list(data["totals"]) == ["pretrain_flops", "finetune_flops", "flops", "pretrain_device_hours",
                                    "finetune_device_hours", "device_hours", "finetune_jobs_without_flops",
                                    "corpus_cpu_hours", "corpus_wall_hours"]


def test_adaptive_seeds_expected_and_worst_case():
    """An adaptive study's plan holds `max` seeds (the totals: the worst case); `plan` also says the
    least (`min` seeds) and what the rule is expected to need on synthetic studies of the design."""
    spec = copy.deepcopy(BASE_SPEC)
    spec["tasks"]["max_dev_examples"] = spec["tasks"]["max_test_examples"] = 20
    spec["finetune"]["seeds"] = {"adaptive": {"min": 2, "max": 6}}
    study = spec_from_data(spec)
    report = estimate(study, expand(study), "cpu")
    a = report.adaptive_seeds
    jobs = report.counts["finetune"]
    assert (a.min_seeds, a.max_seeds, a.jobs_max, a.jobs_min) == (2, 6, jobs, jobs // 3)
    assert a.jobs_min < a.jobs_expected < a.jobs_max
    assert a.finetune_flops_max == pytest.approx(report.totals.finetune_flops)
    assert a.finetune_flops_min < a.finetune_flops_expected < a.finetune_flops_max
    assert a.finetune_device_hours_max == pytest.approx(report.totals.finetune_device_hours)
    assert estimate(study, expand(study), "cpu").adaptive_seeds == a  # seeded: the same numbers every time
