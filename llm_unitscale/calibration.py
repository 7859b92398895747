"""Calibration of a classifier's probabilities: expected calibration error and temperature scaling.

**Expected calibration error** (Naeini et al. 2015; Guo et al. 2017): the predictions are put into M = 15
equal-width bins of their top probability p̂ (bin m holds p̂ ∈ ((m−1)/M, m/M]), and

    ECE = Σ_m (|B_m| / n) · |accuracy(B_m) − mean p̂(B_m)|

— 0 when, among the predictions made with confidence p, a fraction p is right.

**Temperature scaling** (Guo et al. 2017): one scalar T > 0 divides the logits, p = softmax(z / T), with T
chosen to minimise the negative log-likelihood of the validation split. It changes no prediction (argmax is
unchanged), only how sure they are: a model that is right 90 % of the time should say 0.9, not 0.999. T is
folded into the readout (kernel and bias divided by T), so the saved model gives calibrated probabilities
with no extra layer and nothing for predict or evaluate to know.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of integer ``labels`` under softmax(``logits``)."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of class probabilities (n, C) against integer labels (n,), ``bins`` equal-width bins of the top
    probability (module docstring). Labels outside 0…C−1 (classes the model never saw) count as wrong."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] that minimises NLL(logits / T) — a golden-section search on log T (the NLL of a
    temperature-scaled softmax is unimodal in log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return nll(logits / math.exp(log_t), labels)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2.0)


def fold_temperature(model: Any, temperature: float) -> None:
    """Divide the model's readout (the layer named "readout": kernel and bias) by ``temperature``, so that
    its logits become logits / T."""
    for weight in model.get_layer("readout").weights:
        weight.assign(weight.value / temperature)
