"""Metrics against hand-computed examples, strict vs lenient (conlleval) IOB decoding, collapse, MLflow
records, prediction files."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqeval.metrics import classification_report
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.scheme import IOB2, Entities
from sklearn.metrics import f1_score as sk_f1

from scaling_study.metrics import (
    classification_scores,
    conlleval_spans,
    detect_collapse,
    end_loss,
    entity_scores,
    entity_spans,
    label_entropy,
    majority_baseline,
    mlflow_metrics,
    mlflow_tags,
    read_conll_predictions,
    rescore,
    score,
    write_conll_predictions,
    write_jsonl_predictions,
)


def test_entity_f1_hand_computed():
    gold = [["B-A", "I-A", "O", "B-B"], ["B-A", "O", "B-A", "I-A"]]
    pred = [["B-A", "I-A", "O", "O"], ["B-A", "O", "B-B", "I-B"]]
    # gold: A[0,1] B[3] | A[0] A[2,3]   pred: A[0,1] | A[0] B[2,3]   -> tp 2, 3 predicted, 4 gold
    s = entity_scores(gold, pred)
    assert (s["num_gold"], s["num_pred"]) == (4, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(4 / 7)
    assert s["per_type"]["A"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert s["per_type"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


@pytest.mark.parametrize("gold,pred,strict,lenient", [
    # a predicted entity that starts with I-A: lenient decoding counts it, strict IOB2 drops it
    ([["B-A", "I-A", "O"]], [["I-A", "I-A", "O"]], 0.0, 1.0),
    # I-Y right after B-X: lenient starts a Y entity (a false positive), strict starts nothing
    ([["B-X", "O"]], [["B-X", "I-Y"]], 1.0, 2 / 3),
    # the same I- inside gold: strict drops the gold span too
    ([["O", "I-A", "O", "B-A"]], [["O", "B-A", "O", "B-A"]], 2 / 3, 1.0),
])
def test_strict_and_lenient_decoding_differ_where_they_should(gold, pred, strict, lenient):
    scores = entity_scores(gold, pred)
    assert scores["f1"] == pytest.approx(strict)
    assert scores["conlleval_f1"] == pytest.approx(lenient)
    assert seqeval_f1(gold, pred) == pytest.approx(lenient)  # seqeval's default (conlleval-like) mode


TAGS = st.sampled_from(["O", "B-A", "I-A", "B-B", "I-B"])


@settings(max_examples=300, deadline=None)
@given(st.lists(TAGS, min_size=1, max_size=12))
def test_entity_spans_match_seqeval_strict(tags):
    theirs = sorted((e.tag, e.start, e.end - 1) for e in Entities([tags], IOB2, suffix=False).entities[0])
    assert sorted(entity_spans(tags)) == theirs


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(TAGS, min_size=1, max_size=8), st.lists(TAGS, min_size=8, max_size=8)),
                min_size=1, max_size=5))
def test_entity_scores_equal_seqeval_strict_report(pairs):
    gold = [g for g, _ in pairs]
    pred = [p[:len(g)] for g, p in pairs]
    ours = entity_scores(gold, pred)
    if not ours["num_gold"] and not ours["num_pred"]:
        return
    report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    assert ours["f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert ours["precision"] == pytest.approx(report["micro avg"]["precision"])
    for kind, row in ours["per_type"].items():
        assert row["f1"] == pytest.approx(report[kind]["f1-score"]) and row["support"] == report[kind]["support"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["O", "B-A", "I-A", "B-B", "I-B", "B-C-D", "I-C-D"]), min_size=1, max_size=12))
def test_conlleval_spans_match_seqeval_default_mode(tags):
    """seqeval's default mode ports conlleval's startOfChunk/endOfChunk (types may hold hyphens)."""
    from seqeval.metrics.sequence_labeling import get_entities

    assert sorted(conlleval_spans(tags)) == sorted(get_entities(tags))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(TAGS, min_size=1, max_size=8), st.lists(TAGS, min_size=8, max_size=8)),
                min_size=1, max_size=5))
def test_conlleval_scores_equal_seqeval_default_report(pairs):
    gold = [g for g, _ in pairs]
    pred = [p[:len(g)] for g, p in pairs]
    ours = entity_scores(gold, pred)
    if not ours["conlleval_num_gold"] and not ours["conlleval_num_pred"]:
        return
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    assert ours["conlleval_f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert ours["conlleval_precision"] == pytest.approx(report["micro avg"]["precision"])
    assert ours["conlleval_recall"] == pytest.approx(report["micro avg"]["recall"])


def test_no_entities_anywhere_scores_zero():
    assert entity_scores([["O", "O"]], [["O", "O"]])["f1"] == 0.0
    assert entity_scores([["O"]], [["B-A"]])["precision"] == 0.0
    with pytest.raises(ValueError):
        entity_scores([["O"]], [["O", "O"]])


def test_classification_hand_computed_and_against_sklearn():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    macro = classification_scores(gold, pred, ["a", "b", "c", "d"], average="macro")
    # per class F1: a 0.8 (P 1, R 2/3), b 0.5, c 2/3 (P 1/2, R 1); d occurs nowhere and is left out
    assert macro["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert set(macro["per_type"]) == {"a", "b", "c"}
    assert macro["per_type"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert macro["f1"] == pytest.approx(sk_f1(gold, pred, average="macro"))
    micro = classification_scores(gold, pred, average="micro")
    assert micro["f1"] == pytest.approx(4 / 6) == micro["accuracy"] == pytest.approx(sk_f1(gold, pred, average="micro"))
    assert score("macro_f1", gold, pred)["f1"] == macro["f1"]
    with pytest.raises(ValueError):
        score("accuracy", gold, pred)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd")), min_size=1, max_size=40))
def test_macro_and_micro_equal_sklearn(pairs):
    gold, pred = [g for g, _ in pairs], [p for _, p in pairs]
    for average in ("macro", "micro"):
        ours = classification_scores(gold, pred, average=average)["f1"]
        assert ours == pytest.approx(sk_f1(gold, pred, average=average, zero_division=0))


def test_majority_baseline():
    assert majority_baseline("entity_f1", [], [["B-A"]]) == 0.0
    train = ["x"] * 5 + ["y"] * 3 + ["z"]
    test = ["x", "x", "y", "z"]
    # always x: x has P 1/2, R 1, F1 2/3; y and z score 0 -> macro 2/9, micro = accuracy 1/2
    assert majority_baseline("macro_f1", train, test) == pytest.approx(2 / 9)
    assert majority_baseline("micro_f1", train, test) == pytest.approx(0.5)


def test_collapse_detection():
    gold = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    assert detect_collapse("macro_f1", gold, ["a"] * 100)["collapse"]
    assert detect_collapse("macro_f1", gold, ["a"] * 96 + ["b"] * 4)["collapse"]
    assert not detect_collapse("macro_f1", gold, ["a"] * 60 + ["b"] * 30 + ["c"] * 10)["collapse"]
    skewed = ["a"] * 97 + ["b"] * 3  # gold itself 97% one class: predicting it is not collapse
    assert not detect_collapse("macro_f1", skewed, ["a"] * 98 + ["b"] * 2)["collapse"]
    prior = label_entropy(["a", "b", "c"] * 10)
    assert prior == pytest.approx(math.log(3))
    stuck = detect_collapse("macro_f1", gold, gold, end_train_loss=1.08, prior_loss=prior)
    assert stuck["collapse"] and "stays near" in stuck["reasons"][0]
    assert not detect_collapse("macro_f1", gold, gold, end_train_loss=0.5, prior_loss=prior)["collapse"]
    ner_gold = [["B-A", "I-A", "O", "B-B"]] * 10
    assert detect_collapse("entity_f1", ner_gold, [["O"] * 4] * 10)["collapse"]
    assert not detect_collapse("entity_f1", ner_gold, ner_gold)["collapse"]


def test_collapse_of_ner_is_decided_on_entities_and_word_tags():
    gold = [["O"] * 6 + ["B-A", "I-A", "O", "B-B"]] * 20  # 40 entities; O on 70% of the words
    constant = detect_collapse("entity_f1", gold, [["B-A"] * 10] * 20)  # one tag everywhere: 200 entities
    assert constant["collapse"] and constant["reasons"] == ["100% of word tags are 'B-A' (gold: 10%)"]
    under = [["O"] * 9 + ["B-B"]] * 20  # half the entities, O on 90%: a model that learned part of the task
    assert not detect_collapse("entity_f1", gold, under)["collapse"]
    sparse = [["O"] * 99 + ["B-A"]] * 4 + [["O"] * 100] * 16  # nearly all-O: 4 entities predicted of 40
    assert detect_collapse("entity_f1", gold * 10, sparse * 2)["reasons"][0].startswith("nearly all-O predictions")


def test_a_run_that_learned_is_not_flagged_by_its_early_losses():
    """The issue's case: a 1-epoch NER run whose epoch-mean loss (0.94 of the prior) includes its first
    steps, while it predicts about as many entities as gold. The end of training decides."""
    prior = 0.60
    steps = [prior * (1.6 - 1.2 * i / 99) for i in range(100)]  # from 1.6x the prior down to 0.4x
    assert sum(steps) / len(steps) >= 0.95 * prior  # the old rule's epoch mean: flagged
    assert end_loss(steps) == pytest.approx(sum(steps[-10:]) / 10) and end_loss(steps) < 0.5 * prior
    gold = [["B-A", "I-A", "O", "O", "B-B", "O"]] * 50
    pred = [["B-A", "I-A", "O", "O", "O", "O"]] * 25 + [["B-A", "O", "O", "B-B", "I-B", "O"]] * 25
    verdict = detect_collapse("entity_f1", gold, pred, end_train_loss=end_loss(steps), prior_loss=prior)
    assert not verdict["collapse"], verdict["reasons"]
    assert verdict["end_loss_to_prior_loss"] < 0.5
    assert end_loss([2.0]) == 2.0 and end_loss([1.0] * 1000 + [3.0] * 50) == 3.0  # at most 50 steps
    with pytest.raises(ValueError):
        end_loss([])


def test_mlflow_metrics_and_tags_of_a_result():
    result = {"metric": "entity_f1", "selected_epoch": 2, "train_loss": 0.4, "end_train_loss": 0.3,
              "examples_per_s": 10.0, "majority_f1": 0.0, "collapse": False, "collapse_reasons": [],
              "dev": entity_scores([["B-A", "O"]], [["B-A", "O"]]),
              "test": entity_scores([["B-A", "O", "B-SUBSTRATE_PRODUCT-OF"]], [["I-A", "O", "B-SUBSTRATE_PRODUCT-OF"]])}
    metrics = mlflow_metrics(result)
    assert metrics["test_f1"] == pytest.approx(2 / 3) and metrics["test_conlleval_f1"] == 1.0
    assert metrics["test_per_type/SUBSTRATE_PRODUCT-OF/f1"] == 1.0 and metrics["test_per_type/A/recall"] == 0.0
    assert metrics["test_per_type/A/support"] == 1.0 and not any(k.startswith("dev_per_type") for k in metrics)
    assert metrics["dev_f1"] == 1.0 and metrics["end_train_loss"] == 0.3 and metrics["collapsed"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert mlflow_tags(result) == {"collapsed": "False", "metric": "entity_f1_strict"}
    flagged = {**result, "metric": "macro_f1", "collapse": True, "collapse_reasons": ["100% of predictions are 'a'"]}
    assert mlflow_tags(flagged) == {"collapsed": "True", "metric": "macro_f1",
                                    "collapse_reason": "100% of predictions are 'a'"}
    cls = classification_scores(["x/y", "z"], ["x/y", "x/y"], average="micro")
    assert set(mlflow_metrics({"metric": "micro_f1", "test": cls})) >= {"test_f1", "test_accuracy",
                                                                        "test_per_type/x_y/f1"}


def test_prediction_files_rescore(tmp_path):
    words = [["MPam 1/2", "", "Fe"], ["x"]]
    gold = [["O", "O", "B-MAT"], ["B-MAT"]]
    pred = [["O", "O", "B-MAT"], ["O"]]
    path = tmp_path / "p.conll"
    write_conll_predictions(path, words, gold, pred)
    assert read_conll_predictions(path) == (words, gold, pred)
    assert rescore(path, "entity_f1") == entity_scores(gold, pred)
    jpath = tmp_path / "p.jsonl"
    write_jsonl_predictions(jpath, ["t1", "t\n2"], ["a", "b"], ["a", "a"])
    assert rescore(jpath, "micro_f1")["f1"] == pytest.approx(0.5)
