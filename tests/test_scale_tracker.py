"""Tests for llm_unitscale.scale_tracker: exact under/overflow counts, the float32 shadow pass, and the callback's
records, scales.json, TensorBoard events and scales.png."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from llm_unitscale import analysis, models, precision, scale_tracker


@pytest.fixture(autouse=True)
def _restore_precision() -> None:
    precision.apply("float32")
    yield
    precision.apply("float32")


def test_summarize_counts_a_hand_made_tensor() -> None:
    # float16: 2^-26 and -2^-25 flush (≤ 2^-25); 1e-6 and 3e-5 are subnormal; 7e4 and -1e5 overflow
    # e4m3 (flush ≤ 2^-10, subnormal below 2^-6, overflow > 448): 2^-26, -2^-25, 1e-6, 3e-5 flush; 0.01 is
    # subnormal; 500, 7e4, -1e5 overflow.   e5m2 (flush ≤ 2^-17, subnormal below 2^-14, overflow > 57344):
    # 2^-26, -2^-25, 1e-6 flush; 3e-5 subnormal; 7e4, -1e5 overflow
    x = tf.constant([[0.0, 2.0**-26, -(2.0**-25), 1e-6], [3e-5, 0.01, 1.0, 500.0], [7e4, -1e5, 2.0, 0.0]])
    s = scale_tracker.summarize([x])
    assert s["count"] == 12
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(np.square(x.numpy().astype(np.float64)))))
    assert s["float16"] == {"underflow": 2 / 12, "subnormal": 2 / 12, "overflow": 2 / 12}
    assert s["e4m3"] == {"underflow": 4 / 12, "subnormal": 1 / 12, "overflow": 3 / 12}
    assert s["e5m2"] == {"underflow": 3 / 12, "subnormal": 1 / 12, "overflow": 2 / 12}
    assert s["bfloat16"] == {"underflow": 0.0, "subnormal": 0.0, "overflow": 0.0}
    assert scale_tracker.summarize([None]) is None


def test_pooling_equals_summarizing_everything_at_once() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(300) * 1e-6
    b = rng.standard_normal(100) * 1e3
    pooled = scale_tracker._pool([scale_tracker.summarize([a]), scale_tracker.summarize([b])])
    whole = scale_tracker.summarize([a, b])
    assert pooled["count"] == whole["count"] == 400
    assert pooled["rms"] == pytest.approx(whole["rms"])
    for name in precision.FORMATS:
        for key, value in whole[name].items():
            assert pooled[name][key] == pytest.approx(value)


def test_float32_shadow_computes_in_float32_and_restores_the_policy() -> None:
    precision.apply("float16")
    model = models.build_model(vocab_size=30, seq_len=8, width=16, depth=1, heads=2, unit_scaling=False)
    ids = np.random.default_rng(0).integers(1, 30, (2, 8)).astype(np.int32)
    assert model(ids).dtype == tf.float16
    probe = analysis.LayerProbe(model)
    precision.set_fp8(True)
    with scale_tracker.float32_shadow(model, probe.probe):
        assert not precision.fp8_enabled()
        tensors = probe(ids)
    assert precision.fp8_enabled()
    assert all(t.output.dtype == tf.float32 for t in tensors)
    assert all(t.grad_output is None or t.grad_output.dtype == tf.float32 for t in tensors)
    assert {layer.dtype_policy.name for layer in model._flatten_layers() if layer.trainable_weights} == {
        "mixed_float16"}


def test_tracker_agrees_with_scale_report_in_float32() -> None:
    model = models.build_model(vocab_size=30, seq_len=8, width=16, depth=2, heads=2)
    model.compile(optimizer="adam", loss=models.loss_for(True))
    ids = np.random.default_rng(1).integers(1, 30, (4, 8)).astype(np.int32)
    tracker = scale_tracker.ScaleTracker(ids)
    tracker.set_model(model)
    measured = tracker.measure()
    report = analysis.scale_report(model, ids)
    assert [layer["name"] for layer in measured["layers"]] == [r.name for r in report]
    for layer, r in zip(measured["layers"], report, strict=True):
        assert layer["activation"]["rms"] == pytest.approx(r.output, rel=1e-5)
        if r.grad_output is not None:
            assert layer["gradient"]["rms"] == pytest.approx(r.grad_output, rel=1e-5)
    assert measured["layers"][0]["activation"]["rms"] == pytest.approx(1.0, abs=1e-3)  # unit-RMS embedding rows
    assert measured["totals"]["all_gradients"]["count"] == (
        measured["totals"]["gradient"]["count"] + measured["totals"]["weight_gradient"]["count"])


@pytest.mark.parametrize("unit_scaling", [True, False])
def test_probe_weight_gradients_are_the_models_gradients(unit_scaling: bool) -> None:
    """The probe's one backward pass gives every layer's weight gradients exactly as a plain tape does."""
    model = models.build_model(vocab_size=30, seq_len=8, width=16, depth=2, heads=2, unit_scaling=unit_scaling)
    ids = np.random.default_rng(2).integers(1, 30, (4, 8)).astype(np.int32)
    loss = models.loss_for(unit_scaling)
    tensors = analysis.LayerProbe(model)(ids, loss=loss)
    with tf.GradientTape() as tape:
        value = loss(np.roll(ids, -1, axis=1), model(ids, training=True))
    expected = dict(zip([w.path for w in model.trainable_weights],
                        tape.gradient(value, model.trainable_weights), strict=True))
    probed = {f"{t.name}/{name}": g for t in tensors for name, g in t.weight_grads.items()}
    assert sorted(probed) == sorted(expected)
    for path, g in probed.items():  # a graph and an eager pass sum in different orders: compare to the scale
        if path.endswith("key/bias"):  # 0 by construction (softmax shift invariance): only rounding noise
            continue
        want = tf.convert_to_tensor(expected[path]).numpy()
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), want, rtol=1e-3,
                                   atol=1e-4 * float(np.sqrt(np.mean(want**2))), err_msg=path)


def test_tracker_callback_writes_json_tensorboard_and_png(tmp_path: Path) -> None:
    precision.apply("bfloat16")
    model = models.build_model(vocab_size=30, seq_len=8, width=16, depth=1, heads=2, unit_scaling=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=models.loss_for(False), jit_compile=False)
    ids = np.random.default_rng(2).integers(1, 30, (4, 9)).astype(np.int32)
    tracker = scale_tracker.ScaleTracker(ids[:, :-1], ids[:, 1:], every=2, out_dir=tmp_path, log_dir=tmp_path / "logs")
    model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=5, verbose=0, callbacks=[tracker])
    document = json.loads((tmp_path / "scales.json").read_text())
    assert [r["step"] for r in document["records"]] == [0, 2, 4, 5]
    assert document["formats"]["e4m3"]["max"] == 448.0
    last = document["records"][-1]
    names = [layer["name"] for layer in last["layers"]]
    assert "readout" in names and "embedding" in names
    readout = last["layers"][names.index("readout")]
    assert readout["weight"]["rms"] > 0 and set(readout["gradient"]) >= {"rms", "float16", "e5m2"}
    events = list((tmp_path / "logs" / "scales").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    assert any(t.endswith("/activation_log2_abs") for t in tags), tags[:10]
    assert any(t.endswith("/gradient_log2_abs") for t in tags), tags[:10]
    assert (tmp_path / "scales.png").stat().st_size > 10_000
    assert model.get_layer("readout").dtype_policy.name == "mixed_bfloat16"


def test_tracker_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        scale_tracker.ScaleTracker(np.ones((1, 4), np.int32), every=0)
