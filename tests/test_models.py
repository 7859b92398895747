"""Tests for llm_unitscale.models and llm_unitscale.analysis: shapes, .keras round trips, whole-model correct
gradients (invariant 2), the scale report at init, and that a tiny unit-scaled transformer learns."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import llm_unitscale
from llm_unitscale import analysis, ops
from llm_unitscale.models import TASK_ARCHS, TASKS, build_model, is_unit_scaled, loss_for

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=50, seq_len=16, width=32, depth=2, heads=4, num_classes=3)
#: Every (architecture, task) pair build_model accepts.
PAIRS = [(arch, task) for task in TASKS for arch in TASK_ARCHS[task]]


def token_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (batch, length)).astype(np.int32)


def fit_constant(a, b) -> tuple[float, float]:
    """Least-squares c with a ≈ c·b, and the relative residual ‖a − c·b‖ / ‖a‖."""
    a = np.asarray(tf.convert_to_tensor(a), np.float64).ravel()
    b = np.asarray(tf.convert_to_tensor(b), np.float64).ravel()
    c = float(a @ b / (b @ b))
    return c, float(np.linalg.norm(a - c * b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("unit_scaling", [True, False], ids=["unit", "stock"])
@pytest.mark.parametrize(("arch", "task"), PAIRS)
def test_build_model_output_shape(arch: str, task: str, unit_scaling: bool) -> None:
    model = build_model(task, arch, unit_scaling=unit_scaling, **SMALL)
    assert is_unit_scaled(model) is unit_scaling
    for length in (16, 10):  # seq_len is the longest context; shorter inputs work
        x = token_ids(2, length, 50)
        if task == "classify":
            x[0, 6:] = 0  # padding
        y = model(x)
        assert tuple(y.shape) == ((2, length, 50) if task == "lm" else (2, 3))
        assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize(("arch", "task"), PAIRS)
def test_graph_with_unknown_shape_matches_eager(arch: str, task: str) -> None:
    """A traced call with unknown batch and length (serving, fit's relaxed retracing) gives the eager outputs."""
    model = build_model(task, arch, **SMALL)
    x = token_ids(4, 16, 50)
    graph = tf.function(model, input_signature=[tf.TensorSpec((None, None), tf.int32)], autograph=False)
    np.testing.assert_allclose(graph(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="translate"), "task"),
        (dict(arch="rnn"), "arch"),
        (dict(arch="bag", task="lm"), "arch"),
        (dict(task="classify"), "num_classes"),
        (dict(width=30, heads=4), "divisible"),
        (dict(depth=0), "depth"),
    ],
)
def test_build_model_rejects_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(**{"vocab_size": 50, "seq_len": 16, "width": 32, "depth": 1, **kwargs})


def test_loss_for() -> None:
    assert isinstance(loss_for(True), llm_unitscale.layers.UnitSoftmaxCrossEntropy)
    assert isinstance(loss_for(False), keras.losses.SparseCategoricalCrossentropy)


# ------------------------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize(
    "arch, task, unit_scaling",
    [(a, t, True) for a, t in PAIRS] + [("transformer", "lm", False), ("bag", "classify", False)],
)
def test_save_load_round_trip(tmp_path: Path, arch: str, task: str, unit_scaling: bool) -> None:
    model = build_model(task, arch, unit_scaling=unit_scaling, **SMALL)
    x = token_ids(3, 16, 50)
    x[1, 9:] = 0
    y = model(x).numpy()
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[-1]) is type(model.layers[-1])
    np.testing.assert_allclose(loaded(x).numpy(), y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ invariant 2
def _model_gradients(model: keras.Model, x: np.ndarray, targets: np.ndarray) -> list:
    with tf.GradientTape() as tape:
        loss = loss_for(True)(targets, model(x, training=True))
    return tape.gradient(loss, model.trainable_weights)


def test_whole_model_gradients_are_exact_up_to_one_constant_per_tensor() -> None:
    vocab, seq, width, batch = 200, 32, 64, 8
    model = build_model("lm", "transformer", vocab_size=vocab, seq_len=seq, width=width, depth=2, heads=4)
    x = token_ids(batch, seq + 1, vocab)
    x, targets = x[:, :-1], x[:, 1:]
    custom = _model_gradients(model, x, targets)
    with ops.exact_gradients():
        exact = _model_gradients(model, x, targets)
    constants = {}
    for w, a, b in zip(model.trainable_weights, custom, exact, strict=True):
        c, residual = fit_constant(a, b)
        assert residual <= 1e-3, f"{w.path}: gradient is not exact × one constant (residual {residual:.2e})"
        constants[w.path] = c
    # End to end, blocks exact: the token table's constant is the product of the declared ratios along the
    # only gradient path: loss (N·V/√(V−1)) · readout ∂x (√(width/V) / kernel_init_scale) · embedding (√(V/N)).
    n = batch * seq
    readout = math.sqrt(width / vocab) / model.get_layer("readout").kernel_init_scale
    expected = n * vocab / math.sqrt(vocab - 1) * readout * math.sqrt(vocab / n)
    assert constants["embedding/embeddings"] == pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------------------------------------------ scale report
def test_scale_report_unit_vs_baseline() -> None:
    shape = dict(vocab_size=1000, seq_len=64, width=128, depth=4, heads=4)
    x = token_ids(8, 64, 1000)
    unit = analysis.scale_report(build_model("lm", "transformer", **shape), x)
    stock = analysis.scale_report(build_model("lm", "transformer", unit_scaling=False, **shape), x)
    unit_grads = {f"{r.name}/{k}": v for r in unit for k, v in r.weight_grads.items()}
    # the stock key biases' gradients are 0 by construction (softmax shift invariance): leave them out
    stock_grads = [v for r in stock for k, v in r.weight_grads.items() if not k.endswith("key/bias")]
    assert len(unit_grads) > 20 and len(stock_grads) > 20
    bad = {k: v for k, v in unit_grads.items() if not 0.25 <= v <= 4.0}
    assert not bad, f"unit-scaled weight gradients outside [0.25, 4]: {bad}"
    print(f"weight-gradient RMS at init: unit-scaled [{min(unit_grads.values()):.3g}, {max(unit_grads.values()):.3g}],"
          f" baseline [{min(stock_grads):.3g}, {max(stock_grads):.3g}]")
    assert min(stock_grads) < 1e-3  # tiny gradients that underflow in float16 without loss scaling
    assert np.median(stock_grads) < 1e-2
    text = analysis.format_side_by_side(unit, stock)
    assert "unit-scaled" in text and "baseline" in text


def test_analysis_module_runs() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "llm_unitscale.analysis", "--depth", "2", "--width", "64", "--seq-len", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unit-scaled" in result.stdout and "baseline" in result.stdout


# ------------------------------------------------------------------------------------------ learning
def test_tiny_transformer_learns_repeating_sequence() -> None:
    vocab, seq = 16, 16
    model = build_model("lm", "transformer", vocab_size=vocab, seq_len=seq, width=32, depth=2, heads=2)
    stream = np.tile(np.arange(1, 9, dtype=np.int32), 64)
    starts = np.random.default_rng(0).integers(0, len(stream) - seq - 1, 64)
    windows = np.stack([stream[s : s + seq + 1] for s in starts])
    x, y = windows[:, :-1], windows[:, 1:]
    model.compile(keras.optimizers.Adam(1e-2), loss_for(True), jit_compile=False)
    initial = model.evaluate(x, y, batch_size=64, verbose=0)
    history = model.fit(x, y, batch_size=16, epochs=25, verbose=0)  # 100 steps
    final = model.evaluate(x, y, batch_size=64, verbose=0)
    assert len(history.history["loss"]) == 25
    assert initial > 0.8 * math.log(vocab)
    assert final < 0.1, f"loss {initial:.3f} -> {final:.3f}"
    for w in model.trainable_weights:  # the UnitScaling constraint held through training (readout: none)
        if w.path.endswith("kernel") and not w.path.startswith("readout"):
            np.testing.assert_allclose(np.sqrt(np.mean(np.square(w.numpy()), axis=0)), 1.0, atol=1e-4)
