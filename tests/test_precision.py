"""Tests for llm_unitscale.precision: FP8 rounding like the real formats, the FP8 switch in every matmul, the
under/overflow counts, and every precision mode training a tiny model without NaN."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from llm_unitscale import cli, decoding, models, ops, precision, training
from llm_unitscale.runs import load_run
from llm_unitscale.scale_tracker import float32_shadow


@pytest.fixture(autouse=True)
def _restore_precision() -> None:
    """Every test starts and ends in float32 with FP8 off (the settings are process-wide)."""
    precision.apply("float32")
    yield
    precision.apply("float32")


def _round(fn, values) -> np.ndarray:  # noqa: ANN001
    return fn(tf.constant(np.asarray(values, np.float32))).numpy()


def _log_uniform(n: int, lo: float, hi: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mags = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


# --------------------------------------------------------------------------------------------- rounding
def test_e4m3_matches_ml_dtypes_inside_the_range() -> None:
    x = _log_uniform(200_000, 2.0**-12, 440.0)
    ours = _round(precision.to_e4m3, x)
    np.testing.assert_array_equal(ours, x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_e5m2_matches_ml_dtypes_inside_the_range() -> None:
    x = _log_uniform(200_000, 2.0**-19, 57000.0)
    ours = _round(precision.to_e5m2, x)
    np.testing.assert_array_equal(ours, x.astype(ml_dtypes.float8_e5m2).astype(np.float32))


def test_e4m3_saturates_at_448_instead_of_nan() -> None:
    raw = tf.cast(tf.cast(tf.constant([470.0]), tf.dtypes.experimental.float8_e4m3fn), tf.float32).numpy()
    assert np.isnan(raw[0])  # the trap the saturation avoids
    got = _round(precision.to_e4m3, [448.0, 449.0, 464.0, 470.0, 1e6, -1e6, np.inf, -np.inf])
    np.testing.assert_array_equal(got, [448, 448, 448, 448, 448, -448, 448, -448])
    assert precision.E4M3.max == 448.0


def test_e5m2_saturates_at_57344_instead_of_inf() -> None:
    got = _round(precision.to_e5m2, [57344.0, 60000.0, 61440.0, 1e9, -1e9, np.inf])
    np.testing.assert_array_equal(got, [57344, 57344, 57344, 57344, -57344, 57344])
    assert precision.E5M2.max == 57344.0


def test_e4m3_subnormals_and_ties_to_even() -> None:
    s = 2.0**-9  # smallest subnormal
    values = [s, s / 2, 0.75 * s, 0.25 * s, 1.5 * s, 2.5 * s, 2.0**-6, 1 + 1 / 16, 1 + 3 / 16, 1 + 5 / 16,
              2.0**-7 + 2.0**-10]
    expect = [s, 0.0, s, 0.0, 2 * s, 2 * s, 2.0**-6, 1.0, 1.25, 1.25, 2.0**-7]
    # s/2 ties between 0 and s: 0 (even); 1.5·s and 2.5·s tie to 2s (even mantissa); in the normal range the
    # spacing at 1 is 1/8: 1+1/16 ties to 1 (mantissa 000), 1+3/16 and 1+5/16 to 1.25 (010)
    np.testing.assert_array_equal(_round(precision.to_e4m3, values), expect)


def test_e5m2_subnormals_and_ties_to_even() -> None:
    s = 2.0**-16
    values = [s, s / 2, 0.6 * s, 1.5 * s, 3.5 * s, 2.0**-14, 1 + 1 / 8, 1 + 3 / 8, 1.75 + 1 / 8]
    expect = [s, 0.0, s, 2 * s, 4 * s, 2.0**-14, 1.0, 1.5, 2.0]
    np.testing.assert_array_equal(_round(precision.to_e5m2, values), expect)


def test_rounding_keeps_the_dtype_and_rounds_from_float32() -> None:
    for dtype in (tf.bfloat16, tf.float16):
        x = tf.constant([1.0 + 1 / 16, 300.0, 1e4], dtype)
        y = precision.to_e4m3(x)
        assert y.dtype == dtype
        np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), [1.0, 288.0, 448.0])


def test_quantizers_round_one_direction_only() -> None:
    x = tf.constant([1.0 + 1 / 16, 100.0, 1000.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = precision.quantize_e4m3(x)
    np.testing.assert_array_equal(y.numpy(), [1.0, 96.0, 448.0])
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=tf.constant([1.0 + 1 / 16, 3.0, 5.0])),
                                  [1.0 + 1 / 16, 3.0, 5.0])  # straight through, unrounded
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = precision.quantize_grad_e5m2(x)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    g = tape.gradient(y, x, output_gradients=tf.constant([1.0 + 1 / 8, 1e6, 2.0**-18]))
    np.testing.assert_array_equal(g.numpy(), [1.0, 57344.0, 0.0])


# ---------------------------------------------------------------------------------------- the FP8 switch
def _e4(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _e5(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -57344, 57344).astype(ml_dtypes.float8_e5m2).astype(np.float32)


def test_fp8_dense_rounds_operands_and_gradient() -> None:
    """FP8 dense: y = e4(x)·(α·e4(W)); ∂x = β_x·e5(g)·e4(W)ᵀ (the unit-scaled β_x = fan_out^-½)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    g = rng.standard_normal((64, 8)).astype(np.float32)
    xt, wt = tf.constant(x), tf.constant(w)
    with precision.fp8(), tf.GradientTape() as tape:
        tape.watch(xt)
        y = ops.dense(xt, wt)
    np.testing.assert_allclose(y.numpy(), _e4(x) @ (_e4(w) * 16**-0.5), rtol=1e-5, atol=1e-6)
    dx = tape.gradient(y, xt, output_gradients=tf.constant(g)).numpy()
    np.testing.assert_allclose(dx, 8**-0.5 * _e5(g) @ _e4(w).T, rtol=1e-4, atol=1e-5)
    assert not np.allclose(dx, 8**-0.5 * g @ w.T, rtol=1e-3)  # the rounding is really there
    plain = ops.dense(xt, wt).numpy()  # switch off again: exact float32
    np.testing.assert_allclose(plain, x @ (w * 16**-0.5), rtol=1e-5, atol=1e-6)


def test_fp8_attention_rounds_probabilities_times_a_power_of_two() -> None:
    """FP8 attention: e4(p·s)·e4(v)/s with s = 2^min(⌊log2 n⌋, 8), then the output rule (sqrt_n here: × √n)."""
    rng = np.random.default_rng(2)
    q, k, v = (tf.constant(rng.standard_normal((1, 1, 8, 4)).astype(np.float32)) for _ in range(3))
    with precision.fp8():
        got = ops.attention(q, k, v, causal=True, rule="sqrt_n").numpy()
    s = _e4(q.numpy()[0, 0]) @ _e4(k.numpy()[0, 0]).T / np.float32(4)
    s = np.where(np.tril(np.ones((8, 8))) > 0, s, -np.inf).astype(np.float32)
    p = tf.nn.softmax(tf.constant(s)).numpy()
    n = np.arange(1, 9)[:, None].astype(np.float32)
    scale = 2.0 ** np.minimum(np.floor(np.log2(n)), 8)
    expect = (_e4(p * scale) @ _e4(v.numpy()[0, 0])) / scale * np.sqrt(n)
    np.testing.assert_allclose(got[0, 0], expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_fp8_attention_does_not_saturate_at_long_context(length: int) -> None:
    """A one-hot row at n > 448 (the last query picks key 0): FP8 gives v_0 rounded, not 448/n of it; a flat
    row at n = 8192 does not flush to zero."""
    d = 8
    rng = np.random.default_rng(3)
    k = np.zeros((1, 1, length, d), np.float32)
    k[0, 0, 0, 0] = 1.0  # only key 0 has a component along the query
    q = np.zeros((1, 1, length, d), np.float32)
    q[0, 0, -1, 0] = 400.0 * d  # logit 400 for key 0, 0 for the others: p ≈ 1 on key 0
    v = rng.standard_normal((1, 1, length, d)).astype(np.float32)
    with precision.fp8():
        out = ops.attention(tf.constant(q), tf.constant(k), tf.constant(v), rule="none").numpy()
    np.testing.assert_allclose(out[0, 0, -1], _e4(v[0, 0, 0]), rtol=0.07, atol=1e-3)
    flat = out[0, 0, length // 2]  # q = 0 there: attention is exactly flat over n = length/2 + 1 keys
    expect = v[0, 0, : length // 2 + 1].mean(axis=0)
    np.testing.assert_allclose(flat, expect, atol=0.005)  # |expect| ≈ 0.03: a flush to 0 or 2^-9 fails


def test_stock_layers_under_fp8_are_the_fp8_subclasses() -> None:
    shape = dict(vocab_size=30, seq_len=8, width=16, depth=1, heads=2, unit_scaling=False)
    stock = models.build_model(**shape)
    assert {type(layer) for layer in stock.layers}.isdisjoint(
        {precision.FP8Dense, precision.FP8Conv1D, precision.FP8MultiHeadAttention})
    with precision.fp8():
        model = models.build_model(**shape)
        conv = models.build_model(**{**shape, "arch": "cnn"})
    attention = next(layer for layer in model.layers if isinstance(layer, keras.layers.MultiHeadAttention))
    assert type(attention) is precision.FP8MultiHeadAttention
    assert type(attention._query_dense) is precision.FP8EinsumDense
    assert type(attention._output_dense) is precision.FP8EinsumDense
    assert type(model.get_layer("readout")) is precision.FP8Dense
    assert any(type(layer) is precision.FP8Conv1D for layer in conv.layers)
    ids = np.random.default_rng(0).integers(1, 30, (2, 8)).astype(np.int32)
    exact = model(ids).numpy()
    with precision.fp8():
        rounded = model(ids).numpy()
    assert np.all(np.isfinite(rounded)) and not np.allclose(exact, rounded)


# ------------------------------------------------------------------------------------- under/overflow counts
def test_value_shares_on_a_hand_made_tensor() -> None:
    x = np.array([0.0, 2.0**-25, -2.0**-25, 2.0**-24, 3.5e-8, 1e-5, 1.0, 65504.0, 65505.0, -1e5], np.float32)
    s = precision.value_shares(x, precision.FLOAT16)
    # underflow: ±2^-25 (exact halves of the smallest subnormal round to 0); subnormal: 2^-24, 3.5e-8, 1e-5;
    # overflow: 65505 and -1e5; the zero counts in the denominator only
    assert s == {"underflow": 2 / 10, "subnormal": 3 / 10, "overflow": 2 / 10}
    e4 = precision.value_shares(x, precision.E4M3)
    # e4m3: |x| <= 2^-10 flush (0 excluded): ±2^-25, 2^-24, 3.5e-8, 1e-5 -> 5; > 448: 65504, 65505, -1e5 -> 3
    assert e4 == {"underflow": 5 / 10, "subnormal": 0.0, "overflow": 3 / 10}
    e5 = precision.value_shares(np.array([2.0**-17, 2.0**-17 * 1.01, 2.0**-15, 57344.0, 57345.0]), precision.E5M2)
    assert e5 == {"underflow": 1 / 5, "subnormal": 2 / 5, "overflow": 1 / 5}


@pytest.mark.parametrize("fmt, cast", [
    (precision.FLOAT16, lambda a: a.astype(np.float16)),
    (precision.E4M3, lambda a: a.astype(ml_dtypes.float8_e4m3fn)),
    (precision.E5M2, lambda a: a.astype(ml_dtypes.float8_e5m2)),
])
def test_underflow_count_agrees_with_a_real_cast(fmt: precision.Format, cast) -> None:  # noqa: ANN001
    x = _log_uniform(100_000, fmt.min_subnormal / 8, fmt.min_normal * 4, seed=3)
    flushed = (x != 0) & (cast(x).astype(np.float32) == 0)
    assert precision.value_shares(x, fmt)["underflow"] == pytest.approx(flushed.mean(), abs=0)
    assert 0.05 < flushed.mean() < 0.5


# ------------------------------------------------------------------------------------------ training modes
def _corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(120)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MODES = [
    (True, "transformer", "bfloat16", False), (True, "transformer", "float16", False),
    (True, "transformer", "fp8", False), (True, "cnn", "fp8", False), (True, "mlp", "fp8", False),
    (False, "transformer", "bfloat16", False), (False, "transformer", "float16", False),
    (False, "transformer", "float16", True), (False, "transformer", "fp8", False), (False, "cnn", "fp8", False),
    (False, "mlp", "fp8", False), (False, "transformer", "keras-float8", False),
]


@pytest.mark.parametrize("unit_scaling, arch, precision_name, loss_scaling", MODES)
def test_each_precision_trains_without_nan(unit_scaling: bool, arch: str, precision_name: str, loss_scaling: bool) -> None:
    """A tiny model, built and compiled as train() does, takes 4 optimizer steps with finite loss and weights."""
    cfg = training.TrainConfig(precision=precision_name, unit_scaling=unit_scaling, loss_scaling=loss_scaling,
                               jit_compile=False)
    cfg.validate()
    precision.apply(precision_name)
    model = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2, arch=arch,
                               unit_scaling=unit_scaling)
    training.compile_model(cfg, model, keras.optimizers.AdamW(1e-2 if unit_scaling else 1e-3, beta_2=0.99))
    ids = np.random.default_rng(0).integers(1, 40, (4, 9)).astype(np.int32)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=4, verbose=0).history
    assert all(np.isfinite(history["loss"]))
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    if precision_name in ("bfloat16", "float16"):
        assert model.layers[1].compute_dtype == precision_name


@pytest.mark.parametrize("unit_scaling, precision_name, loss_scaling", [
    (True, "fp8", False), (False, "float16", True), (False, "keras-float8", False), (True, "float32", False)])
def test_training_variables_exist_before_the_first_step(unit_scaling: bool, precision_name: str,
                                                        loss_scaling: bool) -> None:
    """After build_training_variables, fit creates no variable: a traced step that creates variables is
    traced a second time by tf.function (seconds per run, and an XLA step compiled twice)."""
    cfg = training.TrainConfig(precision=precision_name, unit_scaling=unit_scaling, loss_scaling=loss_scaling,
                               jit_compile=False)
    precision.apply(precision_name)
    model = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2, unit_scaling=unit_scaling)
    training.compile_model(cfg, model, training.make_optimizer(cfg, 1e-3, 10))
    ids = np.random.default_rng(0).integers(1, 40, (4, 9)).astype(np.int32)
    data = tf.data.Dataset.from_tensors((ids[:, :-1], ids[:, 1:]))
    training.build_training_variables(model, data.element_spec)
    created = []

    def record(next_creator, **kwargs):  # noqa: ANN001, ANN003, ANN202
        created.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(record):
        model.fit(data, epochs=1, verbose=0)
    assert created == []


@pytest.mark.parametrize("validations, validation_xla", [
    (1, False), (training.XLA_VALIDATIONS - 1, False), (training.XLA_VALIDATIONS, True), (20, True)])
def test_validation_is_compiled_with_xla_only_when_the_run_validates_often(
        monkeypatch: pytest.MonkeyPatch, validations: int, validation_xla: bool) -> None:
    """compile_validation: XLA for the validation pass only from XLA_VALIDATIONS validations on; the training
    step keeps XLA either way, and the validation loss is the same."""
    from keras.src.backend.tensorflow import trainer as keras_trainer

    traced: list[bool | None] = []
    real_function = tf.function

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if "jit_compile" in kwargs:
            traced.append(kwargs["jit_compile"])
        return real_function(*args, **kwargs)

    monkeypatch.setattr(keras_trainer.tf, "function", spy)
    cfg = training.TrainConfig(jit_compile=True)
    model = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2)
    training.compile_model(cfg, model, training.make_optimizer(cfg, 1e-3, 10))
    ids = np.random.default_rng(0).integers(1, 40, (4, 9)).astype(np.int32)
    data = tf.data.Dataset.from_tensors((ids[:, :-1], ids[:, 1:]))
    training.compile_validation(model, validations)
    history = model.fit(data, validation_data=data, epochs=1, verbose=0, shuffle=False)
    assert traced == ([] if validation_xla else [False]) + [True] + ([True] if validation_xla else [])
    assert model.jit_compile is True
    reference = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2)
    reference.set_weights(model.get_weights())
    training.compile_model(cfg, reference, training.make_optimizer(cfg, 1e-3, 10))
    assert reference.evaluate(data, verbose=0, return_dict=True)["loss"] == pytest.approx(
        history.history["val_loss"][0], rel=1e-5)


@pytest.mark.parametrize("unit_scaling, arch", [(True, "transformer"), (False, "cnn"), (False, "transformer")])
def test_fp8_run_tracks_scales_saves_and_loads(tmp_path: Path, unit_scaling: bool, arch: str) -> None:
    cfg = training.TrainConfig(
        data=str(_corpus(tmp_path / "c.txt")), out=str(tmp_path / "run"), task="lm", arch=arch, max_steps=3,
        width=16, depth=1, heads=2, seq_len=8, batch_size=4, embeddings="none", jit_compile=False,
        precision="fp8", unit_scaling=unit_scaling, track_scales=2,
    )
    summary = training.train(cfg, log=io.StringIO())
    assert np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])
    scales = json.loads((tmp_path / "run" / "scales.json").read_text())
    assert [r["step"] for r in scales["records"]] == [0, 2, 3]
    assert (tmp_path / "run" / "scales.png").stat().st_size > 10_000
    precision.apply("float32")  # the process is float32; the loaded model keeps computing in simulated FP8
    run = load_run(tmp_path / "run")
    assert run.config["precision"] == "fp8" and precision.model_uses_fp8(run.model)
    ids = np.arange(1, 9, dtype=np.int32)[None]
    in_fp8 = run.model(ids).numpy()
    assert np.all(np.isfinite(in_fp8))
    with float32_shadow(run.model):
        in_float32 = run.model(ids).numpy()
    assert np.abs(in_fp8 - in_float32).max() > 1e-4  # the rounding is there by the model's own policy
    if arch == "transformer":  # cached decoding (the blocks' layers and the stock attention maths) follows it
        cached, _ = decoding.KVCacheDecoder(run.model, jit_compile=False).prefill(ids)
        np.testing.assert_allclose(cached.numpy(), in_fp8, atol=1e-4)
    if arch == "transformer" and importlib.util.find_spec("keras_hub"):  # and so does the Python API
        from llm_unitscale import hub

        lm = hub.CausalLM.from_run(tmp_path / "run")
        assert precision.model_uses_fp8(lm.network)
        np.testing.assert_array_equal(lm.network(ids).numpy(), in_fp8)
    # a run saved before the FP8 policy existed (float32 policies in model.keras) gets it from config.json
    legacy = keras.models.load_model(tmp_path / "run" / "model.keras", compile=False)
    for layer in legacy._flatten_layers(include_self=True):
        layer.dtype_policy = "float32"
    legacy.save(tmp_path / "run" / "model.keras")
    assert not precision.model_uses_fp8(keras.models.load_model(tmp_path / "run" / "model.keras", compile=False))
    np.testing.assert_allclose(load_run(tmp_path / "run").model(ids).numpy(), in_fp8, atol=1e-6)


def test_models_of_different_precisions_compute_side_by_side() -> None:
    """FP8 is a setting of the model (its layers' dtype policy), not of the process: an fp8 model and a float32
    twin with the same weights, called in turn, each compute in their own format, saved or not."""
    with precision.applied("fp8"):
        fp8_model = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2)
    float32_model = models.build_model(vocab_size=40, seq_len=8, width=16, depth=1, heads=2)
    float32_model.set_weights(fp8_model.get_weights())
    ids = np.arange(4, 12, dtype=np.int32)[None]
    with precision.fp8():
        reference_fp8 = float32_model(ids).numpy()
    reference_float32 = float32_model(ids).numpy()
    assert np.abs(reference_fp8 - reference_float32).max() > 1e-4
    np.testing.assert_array_equal(fp8_model(ids).numpy(), reference_fp8)
    np.testing.assert_array_equal(float32_model(ids).numpy(), reference_float32)
    assert not precision.uses_fp8(keras.layers.Dense(2)) and not precision.fp8_enabled()  # nothing leaked


def test_loss_scaling_wraps_the_optimizer() -> None:
    cfg = training.TrainConfig(loss_scaling=True, unit_scaling=False, precision="float16")
    model = models.build_model(vocab_size=20, seq_len=8, width=8, depth=1, heads=2, unit_scaling=False)
    training.compile_model(cfg, model, keras.optimizers.Adam(1e-3))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    plain = models.build_model(vocab_size=20, seq_len=8, width=8, depth=1, heads=2, unit_scaling=False)
    training.compile_model(training.TrainConfig(precision="float16"), plain, keras.optimizers.Adam(1e-3))
    assert not isinstance(plain.optimizer, keras.optimizers.LossScaleOptimizer)


def test_cli_precision_options() -> None:
    args = cli.train_parser().parse_args(["--precision", "fp8", "--loss-scaling", "--track-scales", "50"])
    assert (args.precision, args.loss_scaling, args.track_scales) == ("fp8", True, 50)
    assert set(cli.train_parser().parse_args([]).__dict__) >= {"precision", "loss_scaling", "track_scales"}
    for bad in (dict(precision="fp4"), dict(precision="keras-float8"), dict(track_scales=-1)):
        with pytest.raises(training.ConfigError):
            training.TrainConfig(**bad).validate()


@pytest.mark.parametrize("precision_name", ["fp8", "bfloat16"])
def test_a_run_leaves_the_process_precision_as_it_found_it(precision_name: str, tmp_path: Path) -> None:
    """train() applies its precision for the run only: the global dtype policy and the FP8 switch are back
    afterwards, and the saved model keeps the run's precision."""
    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat .\nthe dog lay on the rug .\n" * 30, encoding="utf-8")
    cfg = training.TrainConfig(data=str(data), out=str(tmp_path / "run"), precision=precision_name, max_steps=2,
                               width=16, depth=1, heads=2, seq_len=8, batch_size=4, embeddings="none",
                               jit_compile=False)
    training.train(cfg, log=io.StringIO())
    assert keras.mixed_precision.global_policy().name == "float32" and not precision.fp8_enabled()
    if precision_name == "bfloat16":
        assert load_run(tmp_path / "run").model.get_layer("embedding").compute_dtype == "bfloat16"
