"""The study spec: every experiments/ YAML loads; malformed specs are refused precisely."""

import copy
import os

import pytest
import yaml

from scaling_study.cli import main
from scaling_study.errors import SpecErrors
from scaling_study.spec import DataVolume, load_spec, parse_volume, spec_from_data

from conftest import BASE_SPEC, EXPERIMENTS


def test_experiments_exist():
    assert {p.name for p in EXPERIMENTS} >= {"smoke.yaml", "scholarbert.yaml", "baselines.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads(path):
    study = load_spec(path)
    assert study.tasks, "a study without tasks"


def test_smoke_shape():
    study = load_spec(next(p for p in EXPERIMENTS if p.name == "smoke.yaml"))
    s = study.spec
    assert len(s.model_sizes) == 2 and len(study.volumes) == 2 and len(s.pretrain.steps) == 2
    assert len(s.finetune.epochs) == 2 and len(s.finetune.seeds) == 2  # two seeds: the report needs intervals
    assert sorted(t.type for t in study.tasks.values()) == ["cls", "ner", "re"]


def test_paper_grid():
    study = load_spec(next(p for p in EXPERIMENTS if p.name == "scholarbert.yaml"))
    assert set(study.spec.model_sizes) == {"large", "xl"}
    assert [v.fraction for v in study.volumes] == [0.01, 0.1, 1.0]
    assert len(study.tasks) == 12 and len(study.spec.finetune.seeds) >= 3
    large = study.presets["large"]
    assert (large.num_layers, large.hidden_size, large.num_heads, large.ffn_size) == (24, 1024, 16, 4096)
    xl = study.presets["xl"]
    assert (xl.num_layers, xl.hidden_size, xl.num_heads, xl.ffn_size) == (36, 1280, 20, 5120)


def test_volumes_parse():
    assert parse_volume("10%") == DataVolume(fraction=0.1)
    assert parse_volume(0.01) == DataVolume(fraction=0.01)
    assert parse_volume(1) == DataVolume(fraction=1.0)
    assert parse_volume("2.2B") == DataVolume(tokens=2_200_000_000)
    assert parse_volume(2.2e9) == DataVolume(tokens=2_200_000_000)
    assert parse_volume("500M tokens") == DataVolume(tokens=500_000_000)
    assert DataVolume(fraction=0.01).label == "1%"


def test_corpus_reading_fields(base_spec):
    from scaling_study.spec import MAX_TOKENIZER_SAMPLE, parse_bytes

    corpus = spec_from_data(base_spec).spec.corpus
    assert (corpus.format, corpus.text_field, corpus.tokenizer_sample) == ("text", "text", 1_000_000_000)
    for value, parsed in [("500M", 500_000_000), ("1GB", 10**9), ("1.5G", 1_500_000_000), ("64 kB", 64_000),
                          ("2_000_000", 2_000_000), (2e9, 2_000_000_000), (1000, 1000),
                          (MAX_TOKENIZER_SAMPLE, 2**31 - 1), ("2147483647 bytes", 2**31 - 1)]:
        assert parse_bytes(value) == parsed
        base_spec["corpus"].update(format="jsonl", text_field="abstract", tokenizer_sample=value)
        corpus = spec_from_data(base_spec).spec.corpus
        assert (corpus.format, corpus.text_field, corpus.tokenizer_sample) == ("jsonl", "abstract", parsed)
    base_spec["corpus"].update(format="parquet", paths=["s3://bucket/corpus/", "file:///data/c.parquet"],
                               urls=["https://example.org/c.parquet", "file:///data/d.parquet"])
    assert spec_from_data(base_spec).spec.corpus.format == "parquet"


def test_caps_merge_per_task(base_spec):
    base_spec["tasks"]["per_task"] = {"scierc_re": {"max_train_examples": 7, "max_test_examples": 9}}
    study = spec_from_data(base_spec)
    assert study.caps["scierc_re"].max_train_examples == 7
    assert study.caps["scierc_re"].max_test_examples == 9
    assert study.caps["bc5cdr_ner"].max_train_examples == 50
    assert study.caps["bc5cdr_ner"].max_test_examples is None


def test_yaml_floats_without_dot(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(BASE_SPEC).replace("precision: fp32", "precision: fp32\n  lr: 5e-4"))
    assert load_spec(spec).spec.pretrain.lr == 5e-4


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()

# (case id, [(field path, new value)], text fragments the one error line must contain)
MALFORMED = [
    ("unknown-top-key", [(("modle_sizes",), ["tiny"])], ["modle_sizes: unknown key", "allowed: name, description"]),
    ("unknown-nested-key", [(("pretrain", "stpes"), [1])], ["pretrain.stpes: unknown key", "steps"]),
    ("string-for-int", [(("pretrain", "batch_size"), "32")], ["pretrain.batch_size", "got '32'", "valid integer"]),
    ("bool-for-int", [(("finetune", "batch_size"), True)], ["finetune.batch_size", "got True", "valid integer"]),
    ("float-for-int", [(("finetune", "batch_size"), 3.5)], ["finetune.batch_size", "got 3.5", "valid integer"]),
    ("scalar-for-list", [(("pretrain", "steps"), 100)], ["pretrain.steps", "got 100", "allowed: a list"]),
    ("string-for-float", [(("pretrain", "lr"), "fast")], ["pretrain.lr", "got 'fast'", "valid number"]),
    ("empty-steps", [(("pretrain", "steps"), [])], ["pretrain.steps", "empty list of levels"]),
    ("duplicate-steps", [(("pretrain", "steps"), [10, 10])], ["pretrain.steps", "duplicate level 10"]),
    ("decreasing-steps", [(("pretrain", "steps"), [20, 10])], ["pretrain.steps", "strictly increasing"]),
    ("negative-step", [(("pretrain", "steps"), [-5, 10])], ["pretrain.steps[0]", "got -5", "must be positive"]),
    ("decreasing-epochs", [(("finetune", "epochs"), [3, 1])], ["finetune.epochs", "strictly increasing"]),
    ("duplicate-seeds", [(("finetune", "seeds"), [1, 1])], ["finetune.seeds", "duplicate level 1"]),
    ("seeds-neither-list-nor-rule", [(("finetune", "seeds"), "all")], ["finetune.seeds", "got 'all'", "not seeds",
                                                                      "{adaptive: {min: 2, max: 10}}"]),
    ("adaptive-max-not-above-min", [(("finetune", "seeds"), {"adaptive": {"min": 4, "max": 4}})],
     ["finetune.seeds.adaptive.max", "got 4", "no seed left to decide", "more than min (4)"]),
    ("adaptive-unknown-key", [(("finetune", "seeds"), {"adaptive": {"mx": 4}})],
     ["finetune.seeds.adaptive.mx: unknown key", "min, max, threshold, confidence, futility"]),
    ("unknown-preset", [(("model_sizes",), ["tiny", "huge"])], ["model_sizes[1]", "got 'huge'", "unknown model size",
                                                               "debug, tiny"]),
    ("duplicate-size", [(("model_sizes",), ["tiny", "tiny"])], ["model_sizes", "duplicate level 'tiny'"]),
    ("unknown-task", [(("tasks", "include"), ["bc5cdr_ner", "nope_ner"])], ["tasks.include[1]", "got 'nope_ner'",
                                                                          "unknown task or suite", "paper12"]),
    ("duplicate-task", [(("tasks", "include"), ["scierc_re", "scierc_re"])], ["tasks.include", "duplicate level"]),
    ("fraction-above-one", [(("data_volumes",), [0.5, 1.5])], ["data_volumes[1]", "got 1.5", "fraction outside (0, 1]"]),
    ("fraction-zero", [(("data_volumes",), [0, 0.5])], ["data_volumes[0]", "got 0", "fraction outside (0, 1]"]),
    ("percent-above-100", [(("data_volumes",), ["150%"])], ["data_volumes[0]", "got '150%'", "not a data volume"]),
    ("mixed-volumes", [(("data_volumes",), ["1%", 1_000_000])], ["data_volumes", "mixes fractions and token counts"]),
    ("tokens-above-corpus", [(("data_volumes",), [2_000_000]), (("corpus", "total_tokens"), 1e6)],
     ["data_volumes[0]", "more tokens than the corpus has"]),
    ("bad-protocol", [(("pretrain", "protocol"), "sometimes")], ["pretrain.protocol", "got 'sometimes'",
                                                                 "'trajectory' or 'independent'"]),
    ("mask-rate-one", [(("pretrain", "mask_rate"), 1.0)], ["pretrain.mask_rate", "got 1.0", "(0, 1)"]),
    ("missing-finetune", [(("finetune",), DELETE)], ["finetune: required field is missing"]),
    ("missing-step-levels", [(("pretrain", "steps"), DELETE)], ["pretrain.steps: required field is missing"]),
    ("nothing-to-evaluate", [(("model_sizes",), DELETE), (("corpus",), DELETE), (("data_volumes",), DELETE),
                             (("pretrain",), DELETE)], ["model_sizes: nothing to evaluate"]),
    ("sizes-without-pretrain", [(("pretrain",), DELETE)], ["pretrain: required when model_sizes is set"]),
    ("pretrain-without-sizes", [(("model_sizes",), DELETE), (("data_volumes",), DELETE), (("corpus",), DELETE),
                                (("external_models",), [{"name": "b", "source": "bert-base-cased"}])],
     ["pretrain: set without model_sizes"]),
    ("uneven-batch", [(("pretrain", "num_workers"), 3)], ["pretrain.batch_size", "got 8",
                                                         "a multiple of num_workers x grad_accum = 3"]),
    ("wsd-overlap", [(("pretrain", "schedule"), "wsd"), (("pretrain", "warmup_fraction"), 0.5),
                     (("pretrain", "decay_fraction"), 0.6)], ["pretrain.decay_fraction", "warmup and decay overlap"]),
    ("fsdp-one-worker", [(("pretrain", "strategy"), "fsdp")], ["pretrain.strategy", "fsdp shards across workers"]),
    ("seq-too-long", [(("pretrain", "seq_len"), 1024)], ["pretrain.seq_len", "got 1024", "longer than the model takes"]),
    ("path-escaping-name", [(("name",), "../etc")], ["name", "got '../etc'", "not a valid name"]),
    ("duplicate-external", [(("external_models",), [{"name": "b", "source": "bert-base-cased"},
                                                    {"name": "b", "source": "bert-large-cased"}])],
     ["external_models[1].name", "duplicate model name"]),
    ("caps-for-other-task", [(("tasks", "per_task"), {"jnlpba_ner": {"max_train_examples": 5}})],
     ["tasks.per_task.jnlpba_ner", "caps for a task the study does not include"]),
    ("betas-length", [(("pretrain", "betas"), [0.9])], ["pretrain.betas", "exactly two numbers"]),
    ("corpus-without-sources", [(("corpus", "paths"), [])], ["corpus: no sources"]),
    ("corpus-unknown-format", [(("corpus", "format"), "csv")], ["corpus.format", "got 'csv'",
                                                               "allowed: 'text', 'jsonl' or 'parquet'"]),
    ("corpus-empty-text-field", [(("corpus", "text_field"), "")], ["corpus.text_field", "empty", "e.g. 'text'"]),
    ("tokenizer-sample-overflows", [(("corpus", "tokenizer_sample"), "2.2G")],
     ["corpus.tokenizer_sample", "got '2.2G'", "32-bit integers", "to 2**31 - 1"]),
    ("tokenizer-sample-at-2-31", [(("corpus", "tokenizer_sample"), 2**31)], ["corpus.tokenizer_sample", "2**31 bytes"]),
    ("tokenizer-sample-tiny", [(("corpus", "tokenizer_sample"), 999)], ["corpus.tokenizer_sample", "got 999",
                                                                        "too small", "from 1,000"]),
    ("tokenizer-sample-words", [(("corpus", "tokenizer_sample"), "a lot")], ["corpus.tokenizer_sample",
                                                                             "not a number of bytes", "'500M'"]),
    ("tokenizer-sample-fractional", [(("corpus", "tokenizer_sample"), "1500.5")],
     ["corpus.tokenizer_sample", "not a whole number of bytes"]),
    ("corpus-path-scheme", [(("corpus", "paths"), ["hdfs://namenode/corpus/"])],
     ["corpus.paths[0]", "unsupported URI scheme 'hdfs'", "s3://bucket/key"]),
    ("corpus-url-object-store", [(("corpus", "urls"), ["s3://bucket/corpus.txt"])],
     ["corpus.urls[0]", "unsupported URI scheme 's3'", "go under corpus.paths"]),
    ("bad-preset-shape", [(("model_presets",), {"odd": {"num_layers": 2, "hidden_size": 100, "num_heads": 3,
                                                         "ffn_size": 400}})], ["model_presets", "multiple"]),
    ("section-not-mapping", [(("pretrain",), [1, 2])], ["pretrain", "a mapping with keys steps, protocol"]),
    ("registry-path-missing", [(("tasks", "registry_paths"), ["no_such_folder"])],
     ["tasks.registry_paths[0]", "not a folder"]),
    ("negative-caps", [(("tasks", "max_test_examples"), -1)], ["tasks.max_test_examples", "must be positive"]),
]


def _run_validate(tmp_path, capsys, text: str):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    before = sorted(os.listdir(tmp_path))
    code = main(["validate", str(spec)])
    err = capsys.readouterr().err.strip()
    assert sorted(os.listdir(tmp_path)) == before, "validation wrote files"
    return code, err


@pytest.mark.parametrize("case,edits,fragments", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_spec(tmp_path, capsys, case, edits, fragments):
    data = copy.deepcopy(BASE_SPEC)
    for path, value in edits:
        _set(data, path, value)
    code, err = _run_validate(tmp_path, capsys, yaml.safe_dump(data, sort_keys=False))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one error line, got: {err}"
    assert "Traceback" not in err
    assert f"{tmp_path / 'bad.yaml'}:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_malformed_messages_are_distinct(tmp_path, capsys):
    messages = set()
    for case, edits, _ in MALFORMED:
        data = copy.deepcopy(BASE_SPEC)
        for path, value in edits:
            _set(data, path, value)
        _, err = _run_validate(tmp_path, capsys, yaml.safe_dump(data, sort_keys=False))
        messages.add(err.split(": ", 1)[1])
    assert len(messages) == len(MALFORMED) >= 25


@pytest.mark.parametrize("text,fragments", [
    ("name: [smoke\n", ["YAML syntax error", "bad.yaml:2"]),
    ("name: a\nname: b\n", ["bad.yaml:2: name: duplicate key (first on line 1)"]),
    ("- a\n- b\n", ["<top level>: expected a mapping"]),
    ("name: a\n\tfinetune: 1\n", ["YAML syntax error"]),
])
def test_malformed_yaml(tmp_path, capsys, text, fragments):
    code, err = _run_validate(tmp_path, capsys, text)
    assert code == 2 and len(err.splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_error_points_at_line(tmp_path, capsys):
    text = yaml.safe_dump(BASE_SPEC, sort_keys=False).replace("batch_size: 8", "batch_size: eight")
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "eight" in l)
    code, err = _run_validate(tmp_path, capsys, text)
    assert code == 2 and f"bad.yaml:{line}: pretrain.batch_size" in err


def test_not_utf8_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    assert main(["validate", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_several_errors_one_line_each(tmp_path, capsys):
    data = copy.deepcopy(BASE_SPEC)
    data["pretrain"]["batch_size"] = "x"
    data["finetune"]["lr"] = "y"
    data["bogus"] = 1
    code, err = _run_validate(tmp_path, capsys, yaml.safe_dump(data))
    assert code == 2 and len(err.splitlines()) == 3


def test_errors_are_spec_errors():
    with pytest.raises(SpecErrors) as info:
        spec_from_data({"name": "x"})
    assert "finetune: required field is missing" in str(info.value)


def test_every_field_documented_and_reference_current():
    from scaling_study.spec import spec_reference, spec_reference_markdown

    from conftest import REPO

    rows = spec_reference()
    assert len(rows) > 60
    assert [r["field"] for r in rows if not r["doc"]] == []
    assert (REPO / "docs" / "spec.md").read_text() == spec_reference_markdown(), \
        "docs/spec.md is stale: run `scaling-study spec-reference > docs/spec.md`"


# Every spec field of pretrain and finetune either reaches the runtime config (set here to a value
# that is not its default) or is named here as not a runtime setting: a field added, renamed or
# dropped on one side only fails this test.
PRETRAIN_NOT_RUNTIME = {"steps", "protocol", "random_init",  # the plan's: total_steps, checkpoint_steps
                        "num_workers", "gpus_per_worker", "cpus_per_worker"}  # resources, for Ray Train
PRETRAIN_VALUES = {"batch_size": 12, "seq_len": 32, "lr": 3e-4, "schedule": "wsd", "warmup_fraction": 0.1,
                   "decay_fraction": 0.3, "min_lr_ratio": 0.1, "weight_decay": 0.05, "mask_rate": 0.2,
                   "optimizer": "lamb", "betas": [0.8, 0.9], "eps": 1e-8, "grad_clip": 0.5, "precision": "fp32",
                   "seed": 7, "grad_accum": 3, "strategy": "fsdp", "checkpoint_every": 5, "log_every": 3,
                   "compile": True}
FINETUNE_NOT_RUNTIME = {"epochs", "seeds",  # the plan's: a run gets its epoch levels and seed
                        "gpus_per_job", "cpus_per_job", "max_concurrent"}  # resources, for Ray Tune
FINETUNE_VALUES = {"protocol": "independent", "lr": 1e-4, "batch_size": 16, "max_seq_len": 64,
                   "warmup_fraction": 0.2, "weight_decay": 0.1, "precision": "bf16", "batches": "by_length"}


def _defaults(cls) -> dict:
    import dataclasses

    return {f.name: f.default if f.default is not dataclasses.MISSING else
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_every_spec_field_reaches_the_runtime_config(base_spec, section):
    from scaling_study.finetune import FinetuneConfig
    from scaling_study.grid import expand
    from scaling_study.pretrain import PretrainConfig
    from scaling_study.spec import FinetuneSpec, PretrainSpec

    cls, values, not_runtime = {"pretrain": (PretrainSpec, PRETRAIN_VALUES, PRETRAIN_NOT_RUNTIME),
                                "finetune": (FinetuneSpec, FINETUNE_VALUES, FINETUNE_NOT_RUNTIME)}[section]
    defaults = _defaults(cls)
    assert set(values) | not_runtime == set(defaults) and not set(values) & not_runtime
    assert [k for k, v in values.items() if v == defaults[k]] == []
    base_spec[section].update(values)
    base_spec["pretrain"]["num_workers"] = 2  # fsdp shards across workers; 12 = 2 workers x 2 x grad_accum 3
    study = spec_from_data(base_spec)
    if section == "pretrain":
        plan = expand(study)
        config = PretrainConfig.from_study(study, plan, plan.of_kind("pretrain")[0], vocab_size=900)
    else:
        config = FinetuneConfig.from_spec(study.spec.finetune)
    got = {k: getattr(config, k, "missing") for k in values}
    assert got == {**values, **({"betas": (0.8, 0.9)} if section == "pretrain" else {})}
