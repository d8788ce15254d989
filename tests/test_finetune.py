"""Finetuning: sub-word labelling, markers, selection, protocols, determinism, artifacts; slow: real tasks.

Models are built here from a config with a WordPiece vocabulary trained on the task text
(`build_scratch_model`), so nothing is downloaded. The fast tests use small synthetic data and
check plumbing; the slow ones finetune on every mirrored task and check that the model learns
(test F1 above the trivial baseline) and that a seed repeats its score exactly.
"""

import dataclasses
import json
import random

import pytest
import torch

from scaling_study.errors import UserError
from scaling_study.finetune import (FinetuneConfig, build_scratch_model, encode, epoch_batches, finetune, load_model,
                                    load_tokenizer, prepare)
from scaling_study.metrics import rescore
from scaling_study.spec import TaskCaps
from scaling_study.tasks.data import TaskData, load_task_data
from scaling_study.tasks.registry import discover

from conftest import REPO

MIRROR = REPO.parent / "shared" / "datasets"
REGISTRY = discover()
FAST = FinetuneConfig(lr=1e-3, batch_size=8, max_seq_len=32, eval_batch_size=16)

WORDS = "the of a cells were treated with and in patients dose levels after study increased".split()
CHEMS = ["aspirin", "lithium carbonate", "cisplatin", "nitric oxide"]


def synthetic(task_id: str, n: int, seed: int) -> list[dict]:
    """Sentences with chemical names tagged (NER), or marked pairs / titles with a label (re, cls)."""
    rng = random.Random(seed)
    task = REGISTRY.tasks[task_id]
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        if task.type == "ner":
            tokens, tags = [], []
            for w in words:
                if rng.random() < 0.3:
                    chem = rng.choice(CHEMS).split()
                    tokens += chem
                    tags += ["B-Chemical"] + ["I-Chemical"] * (len(chem) - 1)
                tokens.append(w)
                tags.append("O")
            out.append({"tokens": tokens, "tags": tags, "line": i + 1})
        else:
            label = rng.choice(task.labels[:3])
            if task.type == "re":
                text = f"{words[0]} << {rng.choice(CHEMS)} >> {label.lower()} [[ {words[1]} ]] " + " ".join(words[2:])
            else:
                text = f"{label} " + " ".join(words)
            out.append({"text": text, "label": label, "entities": [], "line": i + 1})
    return out


def synthetic_data(task_id: str, sizes=(48, 16, 16)) -> TaskData:
    splits = {s: synthetic(task_id, n, seed) for seed, (s, n) in enumerate(zip(("train", "dev", "test"), sizes))}
    return TaskData(task=REGISTRY.tasks[task_id], splits=splits, files={}, full_sizes={}, notes={})


def texts_of(data: TaskData) -> list[str]:
    return [" ".join(e["tokens"]) if "tokens" in e else e["text"] for s in data.splits.values() for e in s]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A debug-size BERT with a small vocabulary trained on synthetic text of all three task types."""
    texts = [t for tid in ("bc5cdr_ner", "scierc_re", "paper_field_cls") for t in texts_of(synthetic_data(tid))]
    return build_scratch_model(tmp_path_factory.mktemp("scratch"), texts, preset="debug", vocab_size=200)


def test_first_subtoken_labelled_and_empty_words_get_unk(scratch):
    task = REGISTRY.tasks["bc5cdr_ner"]
    tokenizer = load_tokenizer(scratch, task)
    labels = ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
    ex = {"tokens": ["lithiumcarbonatezz", "", "\u200b", "of"], "tags": ["B-Chemical", "O", "O", "O"]}
    (feat,) = encode(task, tokenizer, [ex], labels, max_len=64)
    pieces = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    starts = feat["word_starts"]
    assert starts[0] == 1 and starts[1] == starts[0] + len(tokenizer.tokenize("lithiumcarbonatezz"))
    assert pieces[starts[1]] == pieces[starts[2]] == tokenizer.unk_token  # no piece of their own: fed as [UNK]
    assert [feat["labels"][s] for s in starts] == [1, 0, 0, 0]
    assert sum(x != -100 for x in feat["labels"]) == 4  # every other piece, [CLS] and [SEP] are -100
    (cut,) = encode(task, tokenizer, [ex], labels, max_len=4)
    assert cut["word_starts"][-1] == -1 and len(cut["input_ids"]) == 4  # truncated words: predicted O


def test_markers_are_special_tokens_and_embeddings_grow(scratch):
    task = REGISTRY.tasks["scierc_re"]
    tokenizer = load_tokenizer(scratch, task)
    pieces = tokenizer.tokenize("pan-[[ erbB ]] << x >>-induced")  # ChemProt style: glued to the text
    assert [p for p in pieces if p in ("<<", ">>", "[[", "]]")] == ["[[", "]]", "<<", ">>"]
    for marker in ("<<", ">>", "[[", "]]"):
        assert tokenizer.tokenize(f"a{marker}b").count(marker) == 1
    model = load_model(scratch, task, task.labels, len(tokenizer))
    plain = load_tokenizer(scratch, REGISTRY.tasks["paper_field_cls"])
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(plain) + 4


def test_finetune_results_artifacts_and_selection(scratch, tmp_path):
    task = REGISTRY.tasks["bc5cdr_ner"]
    records = []
    results = finetune(scratch, task, synthetic_data("bc5cdr_ner"), FAST, [1, 3], seed=0, out_dir=tmp_path,
                       logger=records.append)
    assert [r["epochs"] for r in results] == [1, 3] and {r["total_epochs"] for r in results} == {3}
    assert [r["epoch"] for r in records] == [1, 2, 3] and all("dev_f1" in r for r in records)
    for r in results:
        # the selected state is the best dev epoch among those up to the level (earliest on ties)
        devs = [rec["dev_f1"] for rec in records[:r["epochs"]]]
        assert r["selected_epoch"] == devs.index(max(devs)) + 1 and r["dev"]["f1"] == max(devs)
        assert r["dev_last"]["f1"] == devs[-1]
        scores, predictions = (tmp_path / name for name in r["artifacts"])
        assert json.loads(scores.read_text())["score"] == r["score"]
        assert rescore(predictions, "entity_f1")["f1"] == pytest.approx(r["test"]["f1"])
        assert r["examples_per_s"] > 0 and r["num_examples"] == {"train": 48, "dev": 16, "test": 16}
        assert isinstance(r["collapse"], bool) and "per_type" in r["test"]
    assert len(results[1]["train_losses"]) == 3
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))


def test_same_seed_same_scores_other_seed_differs(scratch, tmp_path):
    task, data = REGISTRY.tasks["scierc_re"], synthetic_data("scierc_re")
    a = finetune(scratch, task, data, FAST, [2], seed=7, out_dir=tmp_path / "a")
    b = finetune(scratch, task, data, FAST, [2], seed=7, out_dir=tmp_path / "b")
    c = finetune(scratch, task, data, FAST, [2], seed=8, out_dir=tmp_path / "c")
    assert a[0]["train_losses"] == b[0]["train_losses"] and a[0]["test"] == b[0]["test"]
    assert (tmp_path / "a/epochs_2/test_predictions.jsonl").read_bytes() == \
           (tmp_path / "b/epochs_2/test_predictions.jsonl").read_bytes()
    assert a[0]["train_losses"] != c[0]["train_losses"]
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards


@pytest.mark.parametrize("tid", ["bc5cdr_ner", "scierc_re"])
def test_runs_sharing_inputs_match_runs_alone(scratch, tmp_path, tid):
    """A trial's runs share one `prepare` (tokenizer, encoded task, weights read once): the same
    results as runs that load everything themselves, and the shared weights stay untouched."""
    task, data, cache = REGISTRY.tasks[tid], synthetic_data(tid), tmp_path / "cache"
    inputs = prepare(scratch, task, data, FAST, cache_dir=cache)
    assert inputs.weights is not None
    before = {k: v.clone() for k, v in inputs.weights.items()}
    for seed in (0, 1):
        shared = finetune(scratch, task, data, FAST, [1, 2], seed, tmp_path / f"shared{seed}", inputs=inputs)
        alone = finetune(scratch, task, data, FAST, [1, 2], seed, tmp_path / f"alone{seed}")
        assert [(r["train_losses"], r["dev"], r["test"]) for r in shared] == \
               [(r["train_losses"], r["dev"], r["test"]) for r in alone]
    assert all(torch.equal(before[k], v) for k, v in inputs.weights.items())
    # encoded once per tokenizer, data and length: the same again is read back, a new length is encoded
    assert len(list(cache.glob("*.pkl"))) == 1
    assert prepare(scratch, task, data, FAST, cache_dir=cache).feats == inputs.feats
    prepare(scratch, task, data, dataclasses.replace(FAST, max_seq_len=16), cache_dir=cache)
    assert len(list(cache.glob("*.pkl"))) == 2


def test_independent_protocol_and_select_last(scratch, tmp_path):
    task = REGISTRY.tasks["paper_field_cls"]
    config = dataclasses.replace(FAST, protocol="independent", select="last")
    results = finetune(scratch, task, synthetic_data("paper_field_cls"), config, [2, 1], seed=0, out_dir=tmp_path)
    assert [(r["epochs"], r["total_epochs"], r["selected_epoch"]) for r in results] == [(1, 1, 1), (2, 2, 2)]
    assert len(results[1]["train_losses"]) == 2
    lines = (tmp_path / "epochs_1" / "test_predictions.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) == {"text", "gold", "pred"} and len(lines) == 16


def padded(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_random_batches_are_the_permutation_split():
    rng = random.Random(3)
    lengths = [rng.randint(2, 120) for _ in range(203)]
    new, old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):  # two epochs: also the generator's state after each is the old one
        assert epoch_batches(lengths, 16, new, "random") == \
               [idx.tolist() for idx in torch.randperm(203, generator=old).split(16)]  # _train_run's before `batches`


def test_by_length_batches_cover_each_example_once_and_pad_less():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(80, 128)]) for _ in range(1803)]  # skewed: short and long
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs from one generator
        grouped = epoch_batches(lengths, 16, generator, "by_length")
        assert sorted(i for b in grouped for i in b) == list(range(1803))
        assert len(grouped) == -(-1803 // 16) and max(map(len, grouped)) == 16 and sorted(map(len, grouped))[0] == 11
    shuffled = epoch_batches(lengths, 16, torch.Generator().manual_seed(0), "random")
    assert padded(grouped, lengths) < 0.7 * padded(shuffled, lengths)  # measured: 1.03x real tokens vs 2.09x
    assert grouped != epoch_batches(lengths, 16, torch.Generator().manual_seed(0), "by_length")  # epoch 2 != epoch 1

    def draw(seed):
        return epoch_batches(lengths, 16, torch.Generator().manual_seed(seed), "by_length")
    assert draw(4) == draw(4) and draw(4) != draw(5)
    assert len({tuple(b) for b in draw(4)} & {tuple(b) for b in draw(5)}) < 5


def test_by_length_run_trains_and_scores(scratch, tmp_path):
    task, data = REGISTRY.tasks["bc5cdr_ner"], synthetic_data("bc5cdr_ner")
    config = dataclasses.replace(FAST, batches="by_length")
    (grouped,) = finetune(scratch, task, data, config, [2], seed=0, out_dir=tmp_path / "g")
    (again,) = finetune(scratch, task, data, config, [2], seed=0, out_dir=tmp_path / "a")
    (shuffled,) = finetune(scratch, task, data, FAST, [2], seed=0, out_dir=tmp_path / "r")
    assert grouped["train_losses"] == again["train_losses"] and grouped["test"] == again["test"]
    assert grouped["train_losses"] != shuffled["train_losses"]  # another recipe: other batches
    assert grouped["train_losses"][1] < grouped["train_losses"][0] and 0 <= grouped["test"]["f1"] <= 1
    with pytest.raises(UserError, match="finetune.batches"):
        finetune(scratch, task, data, dataclasses.replace(FAST, batches="sorted"), [1], seed=0, out_dir=tmp_path / "x")


def test_config_from_spec():
    from scaling_study.spec import spec_from_data

    from conftest import BASE_SPEC

    study = spec_from_data({**BASE_SPEC, "finetune": {"epochs": [1, 2], "lr": 3e-5, "protocol": "independent"}})
    config = FinetuneConfig.from_spec(study.spec.finetune, select="last")
    assert (config.lr, config.batch_size, config.protocol, config.select) == (3e-5, 32, "independent", "last")


# ----------------------------------------------------------------------------------- published models


CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Aspirin", "causes", "renal", "failure", "."]


def cased_folder(folder, layers: int = 1, **config_extra):
    """A cased model as some hub repos ship it: config.json, weights and vocab.txt, no tokenizer files."""
    from transformers import BertConfig, BertForMaskedLM

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(CASED_VOCAB) + "\n")
    config = BertConfig(vocab_size=len(CASED_VOCAB), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, **config_extra)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def test_casing_comes_from_the_model_or_the_spec_never_a_default(tmp_path):
    task = REGISTRY.tasks["bc5cdr_ner"]
    bare = cased_folder(tmp_path / "bare")
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    with pytest.raises(UserError, match="does not say whether it lowercases .*allowed: external_models"
                                        r"\[\]\.do_lower_case: true for an uncased model, false for a cased one"):
        load_tokenizer(bare, task)
    assert load_tokenizer(bare, task, do_lower_case=False).tokenize("Aspirin causes") == ["Aspirin", "causes"]
    assert load_tokenizer(bare, task, do_lower_case=True).tokenize("Aspirin") == ["[UNK]"]  # the hazard
    said = cased_folder(tmp_path / "said", do_lower_case=False)  # config.json says it
    assert load_tokenizer(said, task).tokenize("Aspirin") == ["Aspirin"]
    # tokenizer.json with a cased normalizer, tokenizer_config.json without do_lower_case: transformers
    # alone would lowercase it (its BertTokenizer default); the normalizer is what the model says
    load_tokenizer(bare, task, do_lower_case=False).save_pretrained(tmp_path / "fast")
    config = json.loads((tmp_path / "fast" / "tokenizer_config.json").read_text())
    del config["do_lower_case"]
    (tmp_path / "fast" / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "fast" / name).write_bytes((bare / name).read_bytes())
    assert load_tokenizer(tmp_path / "fast", task).tokenize("Aspirin") == ["Aspirin"]


def test_revision_reaches_from_pretrained(tmp_path, monkeypatch):
    """Two revisions of one hub id in a local hub cache (offline): each loads its own weights and vocabulary."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # what $HF_HUB_CACHE sets
    repo = tmp_path / "models--lab--cased-bert"
    old, new = "a" * 40, "b" * 40
    cased_folder(repo / "snapshots" / old, layers=1, do_lower_case=False)
    cased_folder(repo / "snapshots" / new, layers=2, do_lower_case=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    (repo / "refs" / "v1").write_text(old)
    task = REGISTRY.tasks["bc5cdr_ner"]
    for revision, layers, pieces in ((None, 2, ["[UNK]"]), (old, 1, ["Aspirin"]), ("v1", 1, ["Aspirin"])):
        tokenizer = load_tokenizer("lab/cased-bert", task, revision=revision)
        assert tokenizer.tokenize("Aspirin") == pieces, revision
        model = load_model("lab/cased-bert", task, ["O", "B-Chemical", "I-Chemical"], len(tokenizer), revision=revision)
        assert model.config.num_hidden_layers == layers, revision
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer("lab/cased-bert", task, revision="c" * 40)


def test_bad_model_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load its tokenizer"):
        finetune(tmp_path / "nope", REGISTRY.tasks["scierc_re"], synthetic_data("scierc_re"), FAST, [1], 0, tmp_path)


# ----------------------------------------------------------------------------------- real tasks (slow)

# Per task: caps (train, dev, test), epochs, batch size. A randomly initialised hidden-128 model (`tiny`,
# lr 1e-3) learns every task within these budgets (measured: NER test F1 0.06-0.43 from 600 sentences;
# scierc_re macro-F1 0.15 vs 0.10 for the majority class; paper_field_cls 0.26 vs 0.03). The sentence-level
# tasks need more examples than NER: with 500-1000 a tiny model from scratch stays at the majority class.
REAL = {
    "bc5cdr_ner": ((800, 200, 300), 3, 16),
    "jnlpba_ner": ((800, 200, 300), 3, 16),
    "matsci_ner": ((800, 200, 300), 3, 16),
    "scierc_ner": ((800, 200, 300), 3, 16),
    "scienceie_ner": ((800, 200, 300), 3, 16),
    "scierc_re": ((3219, 300, 500), 3, 32),
    "paper_field_cls": ((2000, 300, 500), 3, 32),
}
REPEATED = {"bc5cdr_ner", "paper_field_cls"}
"""Tasks whose run is repeated to check that a seed repeats its scores exactly (one NER, one sentence
task: the code paths differ by task type, not by task; the suite's time is spent elsewhere)."""


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR.is_dir(), reason="no shared/datasets mirror")
@pytest.mark.parametrize("tid", sorted(REAL))
def test_real_task_learns_and_repeats(tid, tmp_path):
    (n_train, n_dev, n_test), epochs, batch_size = REAL[tid]
    task = REGISTRY.tasks[tid]
    data = load_task_data(task, [MIRROR], caps=TaskCaps(max_train_examples=n_train, max_dev_examples=n_dev,
                                                         max_test_examples=n_test))
    train_text = [" ".join(e["tokens"]) if "tokens" in e else e["text"] for e in data.splits["train"]]
    model = build_scratch_model(tmp_path / "model", train_text, preset="tiny", vocab_size=3000)
    config = FinetuneConfig(lr=1e-3, batch_size=batch_size, max_seq_len=128)
    first = finetune(model, task, data, config, [epochs], seed=0, out_dir=tmp_path / "a")[0]
    # "Above the trivial baseline", with a small margin. The scratch model's WordPiece vocabulary is
    # the same in every process (`build_scratch_model` registers the `##` continuations first); before
    # it was not (huggingface/tokenizers#1794), scores moved between runs, and scierc_re now and then
    # collapsed onto its majority relation.
    assert first["score"] > first["majority_f1"] + 0.01, (first["score"], first["majority_f1"])
    assert not first["collapse"], first["collapse_reasons"]
    if tid not in REPEATED:
        return
    again = finetune(model, task, data, config, [epochs], seed=0, out_dir=tmp_path / "b")[0]
    assert again["test"] == first["test"] and again["train_losses"] == first["train_losses"]
    name = "test_predictions.conll" if task.type == "ner" else "test_predictions.jsonl"
    assert (tmp_path / "a" / f"epochs_{epochs}" / name).read_bytes() == \
           (tmp_path / "b" / f"epochs_{epochs}" / name).read_bytes()


# ----------------------------------------------------------------------------------- collapse on real runs


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR.is_dir(), reason="no shared/datasets mirror")
def test_collapse_flags_constant_predictors_and_spares_runs_that_learned(tmp_path):
    """Issue 15: 1-epoch NER runs that learned were flagged because an epoch's mean loss includes its
    first steps. Measured here (tiny model from scratch, 1,000 sentences, 1 epoch, batch 8, lr 1e-3;
    shared 2-core machine): bc5cdr_ner test F1 0.26, epoch-mean loss 1.08 x the prior, end-of-training
    loss 0.71 x; jnlpba_ner F1 0.25, 0.95 x vs 0.69 x. The old rule flagged both; the end loss and the
    predictions decide now. Constant predictors on the same real test sets, and a run that did not
    learn (lr 1e-7), are flagged."""
    from scaling_study.metrics import detect_collapse, label_entropy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a trial with one CPU; two threads on a loaded 2-core machine ran 10x slower
    try:
        _collapse_on_real_runs(tmp_path, detect_collapse, label_entropy)
    finally:
        torch.set_num_threads(threads)


def _collapse_on_real_runs(tmp_path, detect_collapse, label_entropy):
    caps = TaskCaps(max_train_examples=1000, max_dev_examples=100, max_test_examples=200)
    datas = {tid: load_task_data(REGISTRY.tasks[tid], [MIRROR], caps=caps) for tid in ("bc5cdr_ner", "jnlpba_ner")}
    model = build_scratch_model(tmp_path / "model", [t for d in datas.values() for t in texts_of(d)], preset="tiny",
                                vocab_size=3000)
    config = FinetuneConfig(lr=1e-3, batch_size=8, max_seq_len=64, eval_batch_size=64)
    for tid, data in datas.items():
        learned = finetune(model, data.task, data, config, [1], seed=0, out_dir=tmp_path / tid)[0]
        assert learned["score"] > 0.1 and not learned["collapse"], (tid, learned["score"], learned["collapse_reasons"])
        assert learned["end_train_loss"] < learned["train_loss"]  # the epoch mean carries the first steps
        gold = [ex["tags"] for ex in data.splits["test"]]
        prior = label_entropy([t for ex in data.splits["train"] for t in ex["tags"]])
        for constant in ("O", f"B-{data.task.labels[0]}", f"I-{data.task.labels[-1]}"):
            verdict = detect_collapse("entity_f1", gold, [[constant] * len(g) for g in gold],
                                      end_train_loss=learned["end_train_loss"], prior_loss=prior)
            assert verdict["collapse"], (tid, constant, verdict)
    data = datas["bc5cdr_ner"]
    small = dataclasses.replace(data, splits={"train": data.splits["train"][:200], **{s: data.splits[s][:50]
                                                                                     for s in ("dev", "test")}})
    stuck = finetune(model, data.task, small, dataclasses.replace(config, lr=1e-7), [1], seed=0,
                     out_dir=tmp_path / "stuck")[0]
    assert stuck["collapse"], stuck["collapse_detail"]
    for tid in ("scierc_re", "paper_field_cls"):  # classification: the majority class everywhere
        data = load_task_data(REGISTRY.tasks[tid], [MIRROR], splits=("test",))
        gold = [ex["label"] for ex in data.splits["test"]]
        top = max(set(gold), key=gold.count)
        assert detect_collapse(data.task.metric, gold, [top] * len(gold))["collapse"], tid
        assert not detect_collapse(data.task.metric, gold, gold)["collapse"], tid
