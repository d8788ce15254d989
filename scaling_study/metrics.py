"""Scores for the three task types, prediction files anyone can re-score, collapse detection, and the
MLflow metrics and tags of a finetune result.

    from scaling_study.metrics import score, entity_scores, classification_scores
    entity_scores(gold_tags, pred_tags)          # NER: {"f1", "precision", "recall", "conlleval_f1", "per_type", ...}
    classification_scores(gold, pred, labels, average="macro")
    score("entity_f1", gold, pred, labels)       # dispatch on a task's `metric`
    rescore("out/epochs_3/test_predictions.conll", "entity_f1")
    mlflow_metrics(result), mlflow_tags(result)  # what a finetune result logs: flat floats, string tags

Definitions (all scores are fractions in [0, 1]):

- `entity_f1` (the tag says `entity_f1_strict`): entity-level exact match (same first word, last
  word and type) with strict IOB2 decoding (seqeval `mode="strict", scheme=IOB2`): an entity starts
  at B-X and continues over I-X; an I-X that does not continue an X entity (after O or another type)
  starts nothing and is dropped, in gold and predictions alike. Computed on words. Micro-averaged
  over entities; `per_type` has precision, recall, F1 and support (gold entities) of each type. This
  is the score (`f1`, MLflow `test_f1`) that NER verdicts use.
- `conlleval_f1` (with `conlleval_precision`, `conlleval_recall`, `conlleval_num_gold/pred`): the
  same match with conlleval's lenient chunking, which most biomedical NER papers report and which
  seqeval's default mode (Hugging Face `run_ner`) reproduces: an I-X that does not continue an X
  entity starts one. Reported beside the strict score, never used for verdicts.
- `micro_f1`: micro-averaged F1 over all classes; for single-label classification with every class
  counted (no "none" class to exclude), this equals accuracy.
- `macro_f1`: the unweighted mean of per-class F1 over the classes that occur in the gold labels or
  the predictions (a class with no prediction has precision 0); the sklearn convention.

Collapse (`detect_collapse`): a run is flagged when its test predictions carry (nearly) nothing of
the input, or when it did not fit its training data:
- NER: fewer than 5% as many predicted entities as gold entities (nearly all-O), or one entity tag
  (`B-X`/`I-X`) on >= 95% of the words and 5 points more than its gold share (a constant tagger);
- classification: the most frequent predicted class covers >= 95% of predictions and at least 5
  points more than its share of gold;
- both: the train loss at the end of training (mean over the last 10% of the steps up to the end of
  the scored epoch, at most 50 steps; not an epoch mean, which includes the first steps) is >= 95% of
  the loss of always predicting the training label distribution (its entropy; ln(num labels) for
  balanced classes).
Reasons are recorded (`collapse_reasons`; MLflow tags `collapsed`, `collapse_reason`). A run that
learned (e.g. NER with 2,896 entities predicted for 2,933 gold) is not flagged by any of them.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

COLLAPSE_SHARE = 0.95
COLLAPSE_MARGIN = 0.05
COLLAPSE_ENTITY_RATIO = 0.05
COLLAPSE_LOSS_RATIO = 0.95
END_LOSS_FRACTION = 0.1
END_LOSS_MAX_STEPS = 50
METRIC_TAGS = {"entity_f1": "entity_f1_strict", "micro_f1": "micro_f1", "macro_f1": "macro_f1"}
"""What `test_f1` is, per task metric: the MLflow `metric` tag of a finetune run."""


def _prf(tp: float, n_pred: float, n_gold: float) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each entity under strict IOB2 decoding (matches seqeval strict)."""
    spans = []
    start, kind = -1, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        continues = tag.startswith("I-") and kind == tag[2:]
        if start >= 0 and not continues:
            spans.append((kind, start, i - 1))
            start, kind = -1, ""
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return spans


def conlleval_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each chunk under conlleval's lenient decoding: as `entity_spans`, but an
    I-X that does not continue an X chunk starts one (conlleval's startOfChunk/endOfChunk for IOB tags;
    equal to seqeval's default mode, a test checks it)."""
    spans = []
    start, kind = -1, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        continues = tag.startswith("I-") and kind == tag[2:]
        if start >= 0 and not continues:
            spans.append((kind, start, i - 1))
            start, kind = -1, ""
        if tag.startswith("B-") or tag.startswith("I-") and not continues:
            start, kind = i, tag[2:]
    return spans


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level exact-match scores: strict IOB2 (`f1`, ..., `per_type`) and conlleval's lenient
    chunking (`conlleval_*`); see the module docstring.

    The strict ones equal `seqeval.metrics.classification_report(..., mode="strict", scheme=IOB2)` (a
    test checks it); the entities come from `seqeval.scheme` directly because `seqeval.metrics` imports
    sklearn, which costs seconds per process.
    """
    from seqeval.scheme import IOB2, Entities

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences differ in number or length")
    def decode(seqs: Sequence[Sequence[str]]) -> set[tuple]:  # (sentence, type, start, end + 1)
        return {e.to_tuple() for sent in Entities([list(s) for s in seqs], IOB2, suffix=False).entities for e in sent}

    def lenient(seqs: Sequence[Sequence[str]]) -> set[tuple]:
        return {(i, kind, a, b + 1) for i, s in enumerate(seqs) for kind, a, b in conlleval_spans(s)}

    true, found = decode(gold), decode(pred)
    per_type = {}
    for kind in sorted({e[1] for e in true | found}):
        t = {e for e in true if e[1] == kind}
        f = {e for e in found if e[1] == kind}
        p, r, f1 = _prf(len(t & f), len(f), len(t))
        per_type[kind] = {"precision": p, "recall": r, "f1": f1, "support": len(t)}
    p, r, f1 = _prf(len(true & found), len(found), len(true))
    c_true, c_found = lenient(gold), lenient(pred)
    cp, cr, cf1 = _prf(len(c_true & c_found), len(c_found), len(c_true))
    return {"f1": f1, "precision": p, "recall": r, "num_gold": len(true), "num_pred": len(found),
            "conlleval_f1": cf1, "conlleval_precision": cp, "conlleval_recall": cr,
            "conlleval_num_gold": len(c_true), "conlleval_num_pred": len(c_found), "per_type": per_type}


def classification_scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None,
                          average: str = "macro") -> dict:
    """Micro- or macro-F1 (`average`) with per-class precision/recall/F1/support; see the module docstring."""
    if len(gold) != len(pred):
        raise ValueError("gold and predictions differ in length")
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be micro or macro, got {average!r}")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred))
    index = {c: i for i, c in enumerate(classes)}
    g = np.array([index[x] for x in gold], dtype=int)
    p = np.array([index[x] for x in pred], dtype=int)
    k = len(classes)
    tp = np.bincount(g[g == p], minlength=k).astype(float)
    n_pred = np.bincount(p, minlength=k).astype(float)
    n_gold = np.bincount(g, minlength=k).astype(float)
    per_class = {}
    for i, c in enumerate(classes):
        if n_gold[i] or n_pred[i]:
            prec, rec, f1 = _prf(tp[i], n_pred[i], n_gold[i])
            per_class[c] = {"precision": prec, "recall": rec, "f1": f1, "support": int(n_gold[i])}
    if average == "micro":
        prec, rec, f1 = _prf(tp.sum(), n_pred.sum(), n_gold.sum())
    else:
        f1 = float(np.mean([v["f1"] for v in per_class.values()])) if per_class else 0.0
        prec = float(np.mean([v["precision"] for v in per_class.values()])) if per_class else 0.0
        rec = float(np.mean([v["recall"] for v in per_class.values()])) if per_class else 0.0
    accuracy = float((g == p).mean()) if len(g) else 0.0
    return {"f1": float(f1), "precision": float(prec), "recall": float(rec), "accuracy": accuracy,
            "average": average, "per_type": per_class}


def score(metric: str, gold: Sequence, pred: Sequence, labels: Sequence[str] | None = None) -> dict:
    """Dispatch on a task's `metric`: `entity_f1` (tag sequences), `micro_f1` or `macro_f1` (labels)."""
    if metric == "entity_f1":
        return entity_scores(gold, pred)
    if metric in ("micro_f1", "macro_f1"):
        return classification_scores(gold, pred, labels, average=metric.split("_")[0])
    raise ValueError(f"unknown metric {metric!r}; allowed: entity_f1, micro_f1, macro_f1")


def majority_baseline(metric: str, train_gold: Sequence, test_gold: Sequence, labels: Sequence[str] | None = None
                      ) -> float:
    """Test score of always predicting the most frequent training class (NER: all O, which scores 0)."""
    if metric == "entity_f1":
        return 0.0
    top = Counter(train_gold).most_common(1)[0][0]
    return score(metric, test_gold, [top] * len(test_gold), labels)["f1"]


# ----------------------------------------------------------------------------------- collapse


def label_entropy(labels: Sequence[str]) -> float:
    """Entropy (nats) of a label distribution: the loss of always predicting that distribution."""
    counts = np.array(list(Counter(labels).values()), dtype=float)
    if counts.size == 0:
        return 0.0
    q = counts / counts.sum()
    return float(-(q * np.log(q)).sum())


def end_loss(step_losses: Sequence[float]) -> float:
    """The train loss at the end of training: the mean over the last `END_LOSS_FRACTION` of the steps
    (at least 1, at most `END_LOSS_MAX_STEPS`)."""
    if not step_losses:
        raise ValueError("no training steps")
    k = min(END_LOSS_MAX_STEPS, max(1, math.ceil(END_LOSS_FRACTION * len(step_losses))))
    return float(np.mean(step_losses[-k:]))


def _constant_share(pred: Sequence[str], gold: Sequence[str], skip: str | None = None) -> tuple[str, float, float]:
    """(most frequent prediction other than `skip`, its share of the predictions, its share of gold)."""
    counts = Counter(p for p in pred if p != skip)
    if not counts:
        return "", 0.0, 0.0
    top, count = counts.most_common(1)[0]
    return top, count / len(pred), (sum(1 for g in gold if g == top) / len(gold) if len(gold) else 0.0)


def detect_collapse(metric: str, gold: Sequence, pred: Sequence, *, end_train_loss: float | None = None,
                    prior_loss: float | None = None) -> dict:
    """`{"collapse": bool, "reasons": [...], ...details}`; see the module docstring for the rule.

    `gold`/`pred`: tag sequences (NER) or labels of the test split; `end_train_loss`: `end_loss` of the
    scored state's training steps; `prior_loss`: `label_entropy` of the training labels.
    """
    reasons = []
    out: dict = {}
    if metric == "entity_f1":
        n_gold = sum(len(entity_spans(s)) for s in gold)
        n_pred = sum(len(entity_spans(s)) for s in pred)
        out["predicted_to_gold_entities"] = n_pred / n_gold if n_gold else None
        if n_gold and n_pred < COLLAPSE_ENTITY_RATIO * n_gold:
            reasons.append(f"nearly all-O predictions ({n_pred} entities predicted, {n_gold} in gold)")
        gold, pred = [t for s in gold for t in s], [t for s in pred for t in s]  # words; O is left to the count
    if len(pred):
        top, share, gold_share = _constant_share(pred, gold, skip="O" if metric == "entity_f1" else None)
        out["top_prediction"], out["top_prediction_share"], out["top_prediction_gold_share"] = top, share, gold_share
        if share >= max(COLLAPSE_SHARE, gold_share + COLLAPSE_MARGIN):
            what = "word tags" if metric == "entity_f1" else "predictions"
            reasons.append(f"{share:.0%} of {what} are {top!r} (gold: {gold_share:.0%})")
    if end_train_loss is not None and prior_loss:
        out["end_loss_to_prior_loss"] = end_train_loss / prior_loss
        if end_train_loss >= COLLAPSE_LOSS_RATIO * prior_loss:
            reasons.append(f"train loss at the end of training {end_train_loss:.3f} stays near {prior_loss:.3f}, "
                           "the loss of predicting the label prior")
    return {"collapse": bool(reasons), "reasons": reasons, **out}


# ----------------------------------------------------------------------------------- MLflow records


def flat_scores(scores: dict, *, per_type: bool = True) -> dict[str, float]:
    """The numeric scores of one split as flat keys: `f1`, `precision`, ..., `conlleval_f1` (NER), and
    with `per_type` `per_type/<type>/<precision|recall|f1|support>` (MLflow groups keys by `/`)."""
    out = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for kind, row in (scores.get("per_type") or {}).items() if per_type else ():
        for stat, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"per_type/{_metric_key(str(kind))}/{stat}"] = float(value)
    return out


def _metric_key(name: str) -> str:
    """A label as an MLflow key part: characters MLflow refuses become `_` (`.` and `..` too)."""
    safe = re.sub(r"[^A-Za-z0-9_\-. :]", "_", name)
    return "_" if safe.strip(".") == "" else safe


def mlflow_metrics(result: dict) -> dict[str, float]:
    """The MLflow metrics of one finetune result (a level of `finetune.finetune`): `dev_*` and `test_*`
    (`flat_scores`; per-type scores for test only), `train_loss`, `end_train_loss`, `examples_per_s`,
    `train_seconds`, `selected_epoch`, `majority_f1`, `collapsed` (0 or 1) and `test_unk_share` (the
    share of [UNK] pieces in the test split). `test_f1` is the task's declared metric
    (`mlflow_tags(result)["metric"]` says which)."""
    out = {}
    for split in ("dev", "test"):
        for key, value in flat_scores(result.get(split) or {}, per_type=split == "test").items():
            out[f"{split}_{key}"] = value
    for key in ("train_loss", "end_train_loss", "examples_per_s", "train_seconds", "selected_epoch", "majority_f1"):
        if isinstance(result.get(key), (int, float)) and not isinstance(result.get(key), bool):
            out[key] = float(result[key])
    out["collapsed"] = float(bool(result.get("collapse")))
    if isinstance((result.get("tokenizer") or {}).get("unk_share"), (int, float)):
        out["test_unk_share"] = float(result["tokenizer"]["unk_share"])
    return out


def mlflow_tags(result: dict) -> dict[str, str]:
    """The MLflow tags of one finetune result: `collapsed` ("True"/"False"), `metric` (what `test_f1` is:
    `entity_f1_strict`, `micro_f1` or `macro_f1`), `tokenizer_lowercase` ("True"/"False": whether the
    model's tokenizer lowercased) and, for a collapsed run, `collapse_reason`."""
    tags = {"collapsed": str(bool(result.get("collapse")))}
    if isinstance((result.get("tokenizer") or {}).get("lowercase"), bool):
        tags["tokenizer_lowercase"] = str(result["tokenizer"]["lowercase"])
    if result.get("metric") in METRIC_TAGS:  # every result of `finetune` names it
        tags["metric"] = METRIC_TAGS[result["metric"]]
    if result.get("collapse"):
        tags["collapse_reason"] = "; ".join(map(str, result.get("collapse_reasons") or []))[:500]
    return tags


# ----------------------------------------------------------------------------------- prediction files


def write_conll_predictions(path: Path, sentences: Sequence[Sequence[str]], gold: Sequence[Sequence[str]],
                            pred: Sequence[Sequence[str]]) -> None:
    """`TOKEN<TAB>GOLD<TAB>PRED` per word, a blank line after each sentence."""
    with open(path, "w", encoding="utf-8") as f:
        for words, g, p in zip(sentences, gold, pred):
            for w, gt, pt in zip(words, g, p):
                f.write(f"{w.replace(chr(9), ' ')}\t{gt}\t{pt}\n")
            f.write("\n")


def read_conll_predictions(path: Path) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    words, gold, pred = [], [], []
    cur: tuple[list, list, list] = ([], [], [])
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line:
            if cur[0]:
                words.append(cur[0]), gold.append(cur[1]), pred.append(cur[2])
            cur = ([], [], [])
            continue
        w, g, p = line.split("\t")
        cur[0].append(w), cur[1].append(g), cur[2].append(p)
    if cur[0]:
        words.append(cur[0]), gold.append(cur[1]), pred.append(cur[2])
    return words, gold, pred


def write_jsonl_predictions(path: Path, texts: Sequence[str], gold: Sequence[str], pred: Sequence[str]) -> None:
    """`{"text", "gold", "pred"}` per line."""
    with open(path, "w", encoding="utf-8") as f:
        for t, g, p in zip(texts, gold, pred):
            f.write(json.dumps({"text": t, "gold": g, "pred": p}, ensure_ascii=False) + "\n")


def rescore(path: str | Path, metric: str, labels: Sequence[str] | None = None) -> dict:
    """Score a prediction file written by `finetune` (CoNLL for NER, JSON lines otherwise)."""
    if metric == "entity_f1":
        _, gold, pred = read_conll_predictions(Path(path))
        return entity_scores(gold, pred)
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return score(metric, [r["gold"] for r in rows], [r["pred"] for r in rows], labels)
