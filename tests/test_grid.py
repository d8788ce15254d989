"""Grid expansion: counts, id determinism, uniqueness, stability and exact downstream invalidation."""

import copy
import json
import random

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling_study.grid import expand
from scaling_study.spec import load_spec, spec_from_data

from conftest import REPO

SIZES = ["debug", "tiny", "mini", "small"]
VOLUMES = ["1%", "5%", "10%", "50%", "100%"]
TASKS = ["bc5cdr_ner", "scierc_re", "paper_field_cls", "matsci_ner", "jnlpba_ner"]
EXTERNAL = [{"name": "bert", "source": "bert-base-cased"}, {"name": "scibert", "source": "allenai/scibert_scivocab_cased"},
            {"name": "local", "source": "./my_model", "revision": None}]


@st.composite
def specs(draw):
    steps = sorted(draw(st.sets(st.integers(1, 10_000), min_size=1, max_size=3)))
    epochs = sorted(draw(st.sets(st.integers(1, 20), min_size=1, max_size=3)))
    spec = {
        "name": "prop",
        "finetune": {"epochs": epochs, "seeds": sorted(draw(st.sets(st.integers(0, 99), min_size=1, max_size=3))),
                     "protocol": draw(st.sampled_from(["trajectory", "independent"])),
                     "lr": draw(st.sampled_from([1e-5, 2e-5, 5e-5]))},
        "tasks": {"include": draw(st.lists(st.sampled_from(TASKS), min_size=1, max_size=3, unique=True))},
    }
    externals = draw(st.lists(st.sampled_from(EXTERNAL), max_size=2, unique_by=lambda m: m["name"]))
    if externals:
        spec["external_models"] = copy.deepcopy(externals)
    if draw(st.booleans()) or not externals:
        spec.update({
            "corpus": {"name": "c", "paths": ["corpus"], "vocab_size": draw(st.sampled_from([1000, 8000]))},
            "model_sizes": draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3, unique=True)),
            "data_volumes": draw(st.lists(st.sampled_from(VOLUMES), min_size=1, max_size=3, unique=True)),
            "pretrain": {"steps": steps, "protocol": draw(st.sampled_from(["trajectory", "independent"])),
                         "batch_size": 8, "seq_len": 64, "lr": draw(st.sampled_from([1e-4, 5e-4])),
                         "random_init": draw(st.booleans())},
        })
    return spec


def plan_of(data):
    return expand(spec_from_data(copy.deepcopy(data)))


def _expected_counts(spec):
    sizes, volumes = len(spec.get("model_sizes", [])), len(spec.get("data_volumes", []))
    steps = spec["pretrain"]["steps"] if "pretrain" in spec else []
    control = spec.get("pretrain", {}).get("random_init", False)
    checkpoints = sizes * volumes * (len(steps) + control)
    runs = sizes * volumes * (1 if spec.get("pretrain", {}).get("protocol") == "trajectory" else len(steps))
    models = checkpoints + len(spec.get("external_models", []))
    tasks, seeds, epochs = len(spec["tasks"]["include"]), len(spec["finetune"]["seeds"]), len(spec["finetune"]["epochs"])
    ft_runs = models * tasks * seeds * (1 if spec["finetune"]["protocol"] == "trajectory" else epochs)
    return {"corpus": volumes, "pretrain": runs, "checkpoint": checkpoints,
            "external": len(spec.get("external_models", [])), "finetune_run": ft_runs,
            "finetune": models * tasks * epochs * seeds}


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(specs())
def test_counts_are_products_of_levels(spec):
    plan = plan_of(spec)
    expected = _expected_counts(spec)
    for kind, count in expected.items():
        assert len(plan.of_kind(kind)) == count, kind
    # ids are unique: a collision would have merged two nodes and broken the counts above
    assert len(plan.nodes) == sum(expected.values())


@PROPS
@given(specs())
def test_ids_deterministic_and_dag_ordered(spec):
    a, b = plan_of(spec), plan_of(spec)
    assert list(a.nodes) == list(b.nodes)
    seen = set()
    for node in a.nodes.values():
        assert all(p in seen for p in node.parents), "a node before its parent"
        seen.add(node.id)
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()


def _shuffled(value, rng):
    """Reorder every mapping's keys and every unordered level list."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) if k not in ("steps", "epochs", "betas") else v for k, v in items}
    if isinstance(value, list):
        out = [_shuffled(v, rng) for v in value]
        rng.shuffle(out)
        return out
    return value


@PROPS
@given(specs(), st.integers(0, 2**32))
def test_ids_stable_under_reordering(spec, seed):
    shuffled = _shuffled(spec, random.Random(seed))
    assert set(plan_of(shuffled).nodes) == set(plan_of(spec).nodes)


def test_reordered_yaml_file_same_ids(tmp_path, base_spec):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    b.write_text(yaml.safe_dump(_shuffled(base_spec, random.Random(3)), sort_keys=True))
    assert a.read_text() != b.read_text()
    assert set(expand(load_spec(a)).nodes) == set(expand(load_spec(b)).nodes)


def _address(node):
    return (node.kind, json.dumps(node.factors, sort_keys=True), json.dumps(node.inputs.get("step")),
            json.dumps(node.inputs.get("epochs")))


class View:
    """What a CHANGES predicate sees of a node: its kind and factors, and which task and external
    model the edit touched (the first listed)."""

    def __init__(self, node, spec):
        self.kind, self.factors = node.kind, node.factors
        self.first_task = spec["tasks"]["include"][0]
        self.first_external = spec["external_models"][0]["name"] if spec.get("external_models") else None


# (edit, which nodes' own inputs the edit changes); everything downstream of those must change too
CHANGES = [
    (lambda s: s["finetune"].__setitem__("lr", 3e-5), lambda n: n.kind == "finetune_run"),
    (lambda s: s["finetune"].__setitem__("max_seq_len", 256), lambda n: n.kind == "finetune_run"),
    (lambda s: s["finetune"].__setitem__("batches", "by_length"), lambda n: n.kind == "finetune_run"),
    (lambda s: s["tasks"].__setitem__("max_train_examples", 11), lambda n: n.kind == "finetune_run"),
    (lambda s: s["tasks"].setdefault("per_task", {}).__setitem__(s["tasks"]["include"][0], {"max_test_examples": 3}),
     lambda n: n.kind == "finetune_run" and n.factors["task"] == n.first_task),
    (lambda s: "pretrain" in s and s["pretrain"].__setitem__("lr", 7e-4), lambda n: n.kind == "pretrain"),
    (lambda s: "pretrain" in s and s["pretrain"].__setitem__("mask_rate", 0.2), lambda n: n.kind == "pretrain"),
    (lambda s: "corpus" in s and s["corpus"].__setitem__("vocab_size", 3333),
     lambda n: n.kind in ("corpus", "pretrain")),
    (lambda s: "corpus" in s and s["corpus"].__setitem__("seed", 5), lambda n: n.kind == "corpus"),
    (lambda s: "pretrain" in s and s["pretrain"].__setitem__("seq_len", 32),
     lambda n: n.kind in ("corpus", "pretrain")),
    (lambda s: "external_models" in s and s["external_models"][0].__setitem__("revision", "v2"),
     lambda n: n.kind == "external" and n.factors["model"] == n.first_external),
    # not factors: resources, tracking, storage, descriptions change no id
    (lambda s: "pretrain" in s and s["pretrain"].__setitem__("num_workers", 2), lambda n: False),
    (lambda s: s["finetune"].__setitem__("gpus_per_job", 1), lambda n: False),
    (lambda s: s.__setitem__("tracking", {"uri": "http://127.0.0.1:5000"}), lambda n: False),
    (lambda s: s.__setitem__("storage", {"root": "/elsewhere"}), lambda n: False),
    (lambda s: s.__setitem__("description", "changed"), lambda n: False),
]


@PROPS
@given(specs(), st.sampled_from(range(len(CHANGES))))
def test_change_invalidates_exactly_downstream(spec, which):
    edit, directly = CHANGES[which]
    before = plan_of(spec)
    changed_spec = copy.deepcopy(spec)
    edit(changed_spec)
    after = plan_of(changed_spec)
    # match nodes across the two plans by their place in the grid, not by id
    after_by_address = {_address(n): n for n in after.nodes.values()}
    assert len(after_by_address) == len(after.nodes) == len(before.nodes)
    direct = {n.id for n in before.nodes.values() if directly(View(n, spec))}
    expected = set(direct)
    for nid in direct:
        expected |= before.downstream(nid)
    changed = {n.id for n in before.nodes.values() if after_by_address[_address(n)].id != n.id}
    assert changed == expected


def test_finetune_lr_keeps_pretraining_ids(base_spec):
    before = plan_of(base_spec)
    base_spec["finetune"]["lr"] = 1e-3
    after = plan_of(base_spec)
    for kind in ("corpus", "pretrain", "checkpoint"):
        assert {n.id for n in before.of_kind(kind)} == {n.id for n in after.of_kind(kind)}
    assert not {n.id for n in before.of_kind("finetune")} & {n.id for n in after.of_kind("finetune")}


def test_adding_levels_keeps_existing_ids(base_spec):
    before = set(plan_of(base_spec).nodes)
    grown = copy.deepcopy(base_spec)
    grown["finetune"]["seeds"] = [0, 1]
    grown["model_sizes"] = ["debug", "tiny", "mini"]
    grown["tasks"]["include"].append("matsci_ner")
    assert before < set(plan_of(grown).nodes)


def test_intermediate_step_level_adds_a_checkpoint_only(base_spec):
    before = plan_of(base_spec)
    base_spec["pretrain"]["steps"] = [10, 15, 20]
    after = plan_of(base_spec)
    assert {n.id for n in before.of_kind("pretrain")} == {n.id for n in after.of_kind("pretrain")}
    assert {n.id for n in before.of_kind("checkpoint")} < {n.id for n in after.of_kind("checkpoint")}


def test_trajectory_schedule_length_is_an_input(base_spec):
    before = plan_of(base_spec)
    base_spec["pretrain"]["steps"] = [10, 20, 40]
    after = plan_of(base_spec)
    assert not {n.id for n in before.of_kind("pretrain")} & {n.id for n in after.of_kind("pretrain")}


@pytest.mark.parametrize("protocol", ["trajectory", "independent"])
def test_checkpoint_factors(base_spec, protocol):
    base_spec["pretrain"]["protocol"] = protocol
    plan = plan_of(base_spec)
    for ck in plan.of_kind("checkpoint"):
        run = plan.nodes[ck.parents[0]]
        assert ck.factors["steps"] <= run.inputs["total_steps"]
        if protocol == "independent":
            assert ck.factors["steps"] == run.inputs["total_steps"]


@pytest.mark.parametrize("protocol", ["trajectory", "independent"])
def test_random_init_adds_a_step_0_checkpoint_per_size_and_volume_only(base_spec, protocol):
    base_spec["pretrain"]["protocol"] = protocol
    before = plan_of(base_spec)
    base_spec["pretrain"]["random_init"] = True
    after = plan_of(base_spec)
    added = [after.nodes[n] for n in set(after.nodes) - set(before.nodes)]
    assert set(before.nodes) < set(after.nodes)  # switched on, nothing else is renamed
    controls = [n for n in added if n.kind == "checkpoint"]
    assert sorted((n.factors["model_size"], n.factors["data_volume"]) for n in controls) == \
        sorted((s, v) for s in ("debug", "tiny") for v in ("50%", "100%"))
    for ck in controls:
        run = after.nodes[ck.parents[0]]
        assert ck.inputs == {"step": 0} and ck.factors["steps"] == 0 and ck.factors["model"].endswith("/0")
        # independent: the shortest run writes it (every run starts from the same weights)
        assert run.inputs["total_steps"] == min(base_spec["pretrain"]["steps"]) or protocol == "trajectory"
        assert after.downstream(ck.id) == {n.id for n in added if n.kind.startswith("finetune")
                                           and ck.id in {*n.parents, *after.nodes[n.parents[0]].parents}}
    # a finetune run per task and seed of each control, a cell per epochs level
    assert len([n for n in added if n.kind == "finetune"]) == len(controls) * 3 * 1 * 2


# Digests of the sorted node ids of each kind, per experiment spec. A change here renames nodes, so
# existing studies would recompute everything and lose their results: only on purpose (a new
# builder version, say), and then say so in the commit.
PINNED_IDS = {
    "effect.yaml": {"corpus": "3702799fe4768b23", "pretrain": "db52f0b17b48fb2c", "checkpoint": "3ba0384dd30717da",
                    "finetune_run": "7c8f7b54cc03c308", "finetune": "b0611256a0c03073"},
    "baselines.yaml": {"external": "7336c63238f49bae", "finetune_run": "ce79edc73f8b3b5d",
                       "finetune": "5cfa755edb194eca"},
    "scholarbert.yaml": {"corpus": "00e961037d76977b", "pretrain": "11347f5b5dd7ed22",
                         "checkpoint": "e95446355dca5ae5", "finetune_run": "a789ef5aac1db0cc",
                         "finetune": "0f3f3e51b805d6f3"},
    "smoke.yaml": {"corpus": "d0bfe51b87a402a3", "pretrain": "7746db01c22713d3", "checkpoint": "31f155559de9e1da",
                   "finetune_run": "08f834b2c60f3054", "finetune": "20a49a3600aa9a49"},
}


@pytest.mark.parametrize("name", sorted(PINNED_IDS))
def test_experiment_node_ids_are_pinned(name):
    import hashlib

    from scaling_study.grid import KINDS

    plan = expand(load_spec(REPO / "experiments" / name))
    digests = {kind: hashlib.sha256(",".join(sorted(n.id for n in plan.of_kind(kind))).encode()).hexdigest()[:16]
               for kind in KINDS if plan.of_kind(kind)}
    assert digests == PINNED_IDS[name]
