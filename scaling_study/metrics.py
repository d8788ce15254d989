"""Scores for the three task types, prediction files anyone can re-score, and collapse detection.

    from scaling_study.metrics import score, entity_scores, classification_scores
    entity_scores(gold_tags, pred_tags)          # NER: {"f1", "precision", "recall", "per_type": {...}}
    classification_scores(gold, pred, labels, average="macro")
    score("entity_f1", gold, pred, labels)       # dispatch on a task's `metric`
    rescore("out/epochs_3/test_predictions.conll", "entity_f1")

Definitions (all scores are fractions in [0, 1]):

- `entity_f1`: entity-level exact match (same first word, last word and type) with strict IOB2
  decoding (seqeval `mode="strict", scheme=IOB2`): an entity starts at B-X and continues over I-X;
  an I-X that does not continue an X entity (after O or another type) starts nothing and is
  dropped, in gold and predictions alike. Computed on words. Micro-averaged over entities;
  `per_type` has precision, recall, F1 and support (gold entities) of each type.
- `micro_f1`: micro-averaged F1 over all classes; for single-label classification with every class
  counted (no "none" class to exclude), this equals accuracy.
- `macro_f1`: the unweighted mean of per-class F1 over the classes that occur in the gold labels or
  the predictions (a class with no prediction has precision 0); the sklearn convention.

Collapse (`detect_collapse`): a run is flagged when its predictions are (nearly) constant (NER:
fewer than 5% as many predicted entities as gold entities, i.e. nearly all-O; classification: the
most frequent predicted class covers >= 95% of predictions and at least 5 points more than its
share of gold), or when its final train loss is >= 95% of the loss of always predicting the
training label distribution (its entropy; ln(num labels) for balanced classes). Flags are reported,
never used to drop a run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

COLLAPSE_SHARE = 0.95
COLLAPSE_MARGIN = 0.05
COLLAPSE_ENTITY_RATIO = 0.05
COLLAPSE_LOSS_RATIO = 0.95


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


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level exact-match scores, strict IOB2 decoding by seqeval; see the module docstring.

    Equal to `seqeval.metrics.classification_report(..., mode="strict", scheme=IOB2)` (a test checks
    it); the entities come from `seqeval.scheme` directly because `seqeval.metrics` imports sklearn,
    which costs seconds per process.
    """
    from seqeval.scheme import IOB2, Entities

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences differ in number or length")
    def decode(seqs: Sequence[Sequence[str]]) -> set[tuple]:  # (sentence, type, start, end + 1)
        return {e.to_tuple() for sent in Entities([list(s) for s in seqs], IOB2, suffix=False).entities for e in sent}

    true, found = decode(gold), decode(pred)
    per_type = {}
    for kind in sorted({e[1] for e in true | found}):
        t = {e for e in true if e[1] == kind}
        f = {e for e in found if e[1] == kind}
        p, r, f1 = _prf(len(t & f), len(f), len(t))
        per_type[kind] = {"precision": p, "recall": r, "f1": f1, "support": len(t)}
    p, r, f1 = _prf(len(true & found), len(found), len(true))
    return {"f1": f1, "precision": p, "recall": r, "num_gold": len(true), "num_pred": len(found),
            "per_type": per_type}


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


def detect_collapse(metric: str, gold: Sequence, pred: Sequence, *, train_loss: float | None = None,
                    prior_loss: float | None = None) -> dict:
    """`{"collapse": bool, "reasons": [...], ...}`; see the module docstring for the rule."""
    reasons = []
    out: dict = {}
    if metric == "entity_f1":
        n_gold = sum(len(entity_spans(s)) for s in gold)
        n_pred = sum(len(entity_spans(s)) for s in pred)
        out["predicted_to_gold_entities"] = n_pred / n_gold if n_gold else None
        if n_gold and n_pred < COLLAPSE_ENTITY_RATIO * n_gold:
            reasons.append(f"nearly all-O predictions ({n_pred} entities predicted, {n_gold} in gold)")
    elif len(pred):
        top, count = Counter(pred).most_common(1)[0]
        share = count / len(pred)
        gold_share = sum(1 for g in gold if g == top) / len(gold) if len(gold) else 0.0
        out["top_prediction"], out["top_prediction_share"] = top, share
        if share >= max(COLLAPSE_SHARE, gold_share + COLLAPSE_MARGIN):
            reasons.append(f"{share:.0%} of predictions are {top!r} (gold: {gold_share:.0%})")
    if train_loss is not None and prior_loss:
        out["train_loss_to_prior_loss"] = train_loss / prior_loss
        if train_loss >= COLLAPSE_LOSS_RATIO * prior_loss:
            reasons.append(f"train loss {train_loss:.3f} stays near {prior_loss:.3f}, the loss of "
                           "predicting the label prior")
    return {"collapse": bool(reasons), "reasons": reasons, **out}


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
