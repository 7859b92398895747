"""Evaluation metrics (DESIGN §6): next-token accuracy, perplexity and bits per character for a language
model; accuracy, macro-F1, per-class scores and a confusion matrix for a classifier."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llm_unitscale import data as data_mod
from llm_unitscale import runs
from llm_unitscale.inference import softmax
from llm_unitscale.prepared import lm_ids
from llm_unitscale.runs import Run


def lm_chunks(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Consecutive pieces of ``seq_len + 1`` ids overlapping by one, so every id after the first is a target
    exactly once (the last piece may be shorter)."""
    return [ids[start : start + seq_len + 1] for start in range(0, max(len(ids) - 1, 0), seq_len)]


def lm_batches(ids: np.ndarray, seq_len: int, batch_size: int) -> list[np.ndarray]:
    """:func:`lm_chunks` stacked ``batch_size`` at a time, each (B, seq_len + 1); a shorter last piece comes
    alone, as (1, its length)."""
    chunks = lm_chunks(ids, seq_len)
    full = [c for c in chunks if len(c) == seq_len + 1]
    batches = [np.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    return batches + [c[None] for c in chunks if len(c) != seq_len + 1]


def inference_pass(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``model(ids, training=False)`` as one traced graph for id batches of any shape (B, T): traced once.

    Called eagerly, a unit-scaled model dispatches each of its ops from Python on every batch: ``evaluate.py``
    spent 50 s on warpeace's 320k-character tail with the character recipe model on 2 cores, most of it there.
    """
    import tensorflow as tf

    traced = tf.function(lambda ids: model(ids, training=False),
                         input_signature=[tf.TensorSpec([None, None], tf.int32)])
    return lambda ids: np.asarray(traced(np.asarray(ids, dtype=np.int32)))


def evaluate_lm(run: Run, text: str, batch_size: int = 32) -> dict:
    """Mean NLL (nats/token), perplexity, top-1/top-5 accuracy, bits per character, per-position loss.

    Perplexity is exp(mean NLL) of the one pass that also counts accuracy, bits per character and the loss per
    position (``keras_hub.metrics.Perplexity`` would compute the same from the logits, as a second metric)."""
    ids = lm_ids(run.tokenizer, run.vocab, text)
    if len(ids) < 2:
        raise data_mod.DataError("the evaluation text has fewer than 2 tokens")
    ids = np.concatenate([[run.vocab.eos_id], ids]).astype(np.int32)  # the first line starts after an <eos>
    nll_sum, top1, top5, count = 0.0, 0, 0, 0
    position_nll = np.zeros(run.seq_len)
    position_count = np.zeros(run.seq_len)
    groups = lm_batches(ids, run.seq_len, batch_size)
    forward = inference_pass(run.model)
    for group in groups:
        x, y = group[:, :-1], group[:, 1:]
        logp = np.log(np.maximum(softmax(forward(x)), 1e-300))
        nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        ranks = np.sum(logp > np.take_along_axis(logp, y[..., None], axis=-1), axis=-1)
        nll_sum += float(nll.sum())
        top1 += int(np.sum(ranks == 0))
        top5 += int(np.sum(ranks < 5))
        count += nll.size
        position_nll[: nll.shape[1]] += nll.sum(axis=0)
        position_count[: nll.shape[1]] += nll.shape[0]
    loss = nll_sum / count
    targets = ids[1:]
    words = targets[targets != run.vocab.eos_id]
    return {
        "task": "lm",
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": top1 / count,
        "top5_accuracy": top5 / count,
        "bits_per_char": nll_sum / math.log(2) / max(len(text), 1),
        "tokens": int(count),
        "unk_rate": float(np.mean(words == run.vocab.unk_id)) if len(words) else 0.0,
        "examples": sum(len(group) for group in groups),
        "position_loss": (position_nll / np.maximum(position_count, 1)).tolist(),
    }


def classification_scores(gold_ids: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 over the labels present, per-class precision/recall/F1/support, confusion matrix and
    expected calibration error of class probabilities ``probs`` (n, C) against ``gold_ids`` (n,) — −1 for a
    label the model never saw, which counts as an error."""
    from llm_unitscale.calibration import expected_calibration_error

    gold_ids = np.asarray(gold_ids)
    pred_ids = np.argmax(probs, axis=-1)
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(gold_ids, pred_ids, strict=True):
        if g >= 0:
            confusion[g, p] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp = confusion[i, i]
        precision = tp / max(int(np.sum(pred_ids == i)), 1)
        recall = tp / max(int(confusion[i].sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[i].sum())}
    present = [c for c in per_class.values() if c["support"]]
    return {
        "accuracy": float(np.mean(gold_ids == pred_ids)),
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "ece": expected_calibration_error(probs, gold_ids),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


def evaluate_classify(run: Run, lines: list[str], batch_size: int = 64) -> dict:
    """Accuracy, macro-F1 over the model's labels, expected calibration error (15 bins of the top
    probability, ``calibration.expected_calibration_error``), per-class precision/recall/F1/support, confusion
    matrix.

    Labels the model has never seen count as errors and are listed under ``unseen_labels``."""
    from llm_unitscale.inference import classifier_probabilities

    gold, texts = data_mod.parse_labelled(lines)
    if not gold:
        raise data_mod.DataError("no labelled lines to evaluate (expected '__label__X text' or 'X<TAB>text')")
    index = {name: i for i, name in enumerate(run.labels)}
    probs = np.concatenate([classifier_probabilities(run, texts[start : start + batch_size])
                            for start in range(0, len(texts), batch_size)])
    unseen = sorted({g for g in gold if g not in index})
    result = {"task": "classify",
              **classification_scores(np.array([index.get(g, -1) for g in gold]), probs, run.labels),
              "examples": len(gold)}
    if unseen:
        result["unseen_labels"] = {name: gold.count(name) for name in unseen}
    return result


def plot(metrics: dict, path: Path) -> None:
    """Confusion matrix (classify) or loss per position in the context window (lm), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    if metrics["task"] == "classify":
        matrix = np.asarray(metrics["confusion"])
        ax.imshow(matrix, cmap="Blues")
        ticks = range(len(metrics["labels"]))
        ax.set_xticks(ticks, metrics["labels"], rotation=45, ha="right")
        ax.set_yticks(ticks, metrics["labels"])
        for (r, c), v in np.ndenumerate(matrix):
            ax.text(c, r, str(v), ha="center", va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix (accuracy {metrics['accuracy']:.1%})")
    else:
        ax.plot(range(1, len(metrics["position_loss"]) + 1), metrics["position_loss"])
        ax.set_xlabel("position in the context window")
        ax.set_ylabel("mean NLL (nats)")
        ax.set_title(f"loss by position (perplexity {metrics['perplexity']:.1f})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    runs.save_figure(fig, path)
