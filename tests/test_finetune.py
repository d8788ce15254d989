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
from scaling_study.finetune import FinetuneConfig, build_scratch_model, encode, finetune, load_model, load_tokenizer
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


def test_independent_protocol_and_select_last(scratch, tmp_path):
    task = REGISTRY.tasks["paper_field_cls"]
    config = dataclasses.replace(FAST, protocol="independent", select="last")
    results = finetune(scratch, task, synthetic_data("paper_field_cls"), config, [2, 1], seed=0, out_dir=tmp_path)
    assert [(r["epochs"], r["total_epochs"], r["selected_epoch"]) for r in results] == [(1, 1, 1), (2, 2, 2)]
    assert len(results[1]["train_losses"]) == 2
    lines = (tmp_path / "epochs_1" / "test_predictions.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) == {"text", "gold", "pred"} and len(lines) == 16


def test_config_from_spec():
    from scaling_study.spec import spec_from_data

    from conftest import BASE_SPEC

    study = spec_from_data({**BASE_SPEC, "finetune": {"epochs": [1, 2], "lr": 3e-5, "protocol": "independent"}})
    config = FinetuneConfig.from_spec(study.spec.finetune, select="last")
    assert (config.lr, config.batch_size, config.protocol, config.select) == (3e-5, 32, "independent", "last")


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
    # "Above the trivial baseline", with a small margin: the scratch model's WordPiece vocabulary
    # differs between processes (tokenizers trains it non-deterministically, huggingface/tokenizers#1794),
    # so scores move between runs (scierc_re 0.12-0.15 seen); within a process a seed repeats exactly.
    assert first["score"] > first["majority_f1"] + 0.01, (first["score"], first["majority_f1"])
    assert not first["collapse"], first["collapse_reasons"]
    again = finetune(model, task, data, config, [epochs], seed=0, out_dir=tmp_path / "b")[0]
    assert again["test"] == first["test"] and again["train_losses"] == first["train_losses"]
    name = "test_predictions.conll" if task.type == "ner" else "test_predictions.jsonl"
    assert (tmp_path / "a" / f"epochs_{epochs}" / name).read_bytes() == \
           (tmp_path / "b" / f"epochs_{epochs}" / name).read_bytes()
