"""Tests for llm_unitscale.layers and llm_unitscale.constraints: unit scale in a model, config round trips,
initial weights on the constraint, the UnitScaling constraint inside fit, and the unit-scaled loss."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf

from llm_unitscale import layers as L
from llm_unitscale.constraints import UnitScaling

B, T, W, V = 8, 64, 256, 1000  # DESIGN shapes
LO, HI = 0.7, 1.4


def rms(x, axis=None) -> np.ndarray | float:
    a = np.asarray(tf.convert_to_tensor(x), dtype=np.float64)
    return np.sqrt(np.mean(a * a, axis=axis))


def normal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ids(shape: tuple[int, ...], vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# (factory, takes token ids?, weight names exempt from invariant 1 with the reason)
LAYERS: dict[str, tuple[Callable[[], keras.layers.Layer], bool, dict[str, str]]] = {
    "dense": (lambda: L.UnitDense(W), False, {}),
    "dense_up_gelu": (lambda: L.UnitDense(4 * W, activation="gelu"), False, {}),
    "dense_relu": (lambda: L.UnitDense(W, activation="relu"), False, {}),
    "readout": (lambda: L.UnitReadout(V), False,
                {"out": "logits start at RMS kernel_init_scale = 0.02 by design (test_readout_starts_small)"}),
    "embedding": (lambda: L.UnitEmbedding(V, W), True, {}),
    "position_embedding": (lambda: L.UnitPositionEmbedding(T), False, {}),
    "conv1d": (lambda: L.UnitConv1D(W, 3), False, {}),
    "conv1d_same_relu": (lambda: L.UnitConv1D(W, 3, padding="same", activation="relu"), False, {}),
    "layer_norm": (lambda: L.UnitLayerNorm(), False, {}),
    "rms_norm": (lambda: L.UnitRMSNorm(), False, {}),
    # value/key biases: see test_ops (∂b_k = 0 by shift invariance; ∂b_v xfail)
    "attention": (lambda: L.UnitMultiHeadAttention(4, use_bias=False), False, {}),
    "attention_bidirectional": (lambda: L.UnitMultiHeadAttention(4, causal=False, use_bias=False), False, {}),
    "mlp": (lambda: L.UnitMLP(), False, {}),
    "transformer_block": (lambda: L.UnitTransformerBlock(4), False, {}),
    "transformer_block_layer_norm_bias": (lambda: L.UnitTransformerBlock(4, norm="layer", tau=0.3), False, {}),
    "pooling_max_global": (lambda: L.UnitPooling("max"), False, {}),
    "pooling_max_window": (lambda: L.UnitPooling("max", 3), False, {}),
    "pooling_average_window": (lambda: L.UnitPooling("average", 3), False, {}),
    "pooling_average_global": (lambda: L.UnitPooling("average"), False, {}),
    "dropout": (lambda: L.UnitDropout(0.1, seed=0), False, {}),
}
# Known deviations (reported)
XFAIL_LAYERS = {
    "transformer_block_layer_norm_bias": "attention_norm/beta RMS ≈ 6.6: a shared shift of the attention input "
    "reaches v as a shared value bias, whose gradient grows as √(T/2) (see test_ops ∂b_v)",
}


def _model(layer: keras.layers.Layer, takes_ids: bool, shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(shape=shape[1:], dtype="int32" if takes_ids else "float32")
    return keras.Model(inputs, layer(inputs))


def _unit_report(name: str) -> tuple[keras.layers.Layer, dict[str, float]]:
    factory, takes_ids, _ = LAYERS[name]
    layer = factory()
    x = tf.constant(ids((B, T), V) if takes_ids else normal((B, T, W)))
    model = _model(layer, takes_ids, tuple(x.shape))
    with tf.GradientTape() as tape:
        if not takes_ids:
            tape.watch(x)
        y = model(x, training=True)  # eager call
        loss = tf.reduce_sum(y * tf.constant(normal(tuple(y.shape), seed=1)))
    weights = layer.trainable_weights
    grads = tape.gradient(loss, [*weights, *([] if takes_ids else [x])])
    measured = {"out": float(rms(y))}
    measured.update({w.path.split("/", 1)[-1]: float(rms(g)) for w, g in zip(weights, grads, strict=False)})
    if not takes_ids:
        measured["∂x"] = float(rms(grads[-1]))
    return layer, measured


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL_LAYERS[n])) if n in XFAIL_LAYERS else n
     for n in LAYERS],
)
def test_layer_unit_scale(name: str) -> None:
    layer, measured = _unit_report(name)
    exempt = LAYERS[name][2]
    assert len(measured) == 1 + len(layer.trainable_weights) + (0 if LAYERS[name][1] else 1)
    bad = {k: round(v, 3) for k, v in measured.items()
           if not any(k.endswith(e) for e in exempt) and not LO <= v <= HI}
    assert not bad, f"{name}: RMS outside [{LO}, {HI}]: {bad} (all: {measured})"


# ---------------------------------------------------------------------------------------- config round trip
SMALL_W, SMALL_T, SMALL_V = 32, 16, 50
SMALL_LAYERS: dict[str, Callable[[], keras.layers.Layer]] = {
    "dense": lambda: L.UnitDense(48, activation="tanh", use_bias=False, kernel_constraint=UnitScaling("l2")),
    "readout": lambda: L.UnitReadout(SMALL_V, use_bias=True),
    "embedding": lambda: L.UnitEmbedding(SMALL_V, SMALL_W, embeddings_constraint=None),
    "position_embedding": lambda: L.UnitPositionEmbedding(SMALL_T),
    "conv1d": lambda: L.UnitConv1D(24, 5, padding="same", dilation_rate=2, activation="sigmoid"),
    "layer_norm": lambda: L.UnitLayerNorm(epsilon=1e-3),
    "rms_norm": lambda: L.UnitRMSNorm(),
    "attention": lambda: L.UnitMultiHeadAttention(4),
    "mlp": lambda: L.UnitMLP(mlp_ratio=2, activation="relu"),
    "transformer_block": lambda: L.UnitTransformerBlock(2, mlp_ratio=2, tau=0.7, norm="layer", use_bias=True),
    "pooling": lambda: L.UnitPooling("average", 4),
    "dropout": lambda: L.UnitDropout(0.25, seed=3),
}


@pytest.mark.parametrize("name", list(SMALL_LAYERS))
def test_config_round_trip(name: str) -> None:
    layer = SMALL_LAYERS[name]()
    x = tf.constant(ids((2, SMALL_T), SMALL_V) if name == "embedding" else normal((2, SMALL_T, SMALL_W)))
    y = layer(x).numpy()  # eager call outside fit builds the layer
    config = layer.get_config()
    clone = type(layer).from_config(config)
    clone(x)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    np.testing.assert_allclose(clone(x).numpy(), y, rtol=1e-6, atol=1e-6)
    revived = keras.layers.deserialize(keras.layers.serialize(layer))  # registered under llm_unitscale
    assert type(revived) is type(layer) and revived.get_config() == config


def test_dense_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        L.UnitDense(4, activation="swish")


def test_attention_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        L.UnitMultiHeadAttention(3)(tf.zeros((1, 4, 32)))


# -------------------------------------------------------------------------------------------- initial weights
def _assert_unit_normal_like(w: np.ndarray) -> None:
    w = np.asarray(w, np.float64)
    assert abs(w.mean()) < 0.05 and w.std() == pytest.approx(1.0, abs=0.05)
    assert np.mean(np.abs(w) > 2.0) == pytest.approx(0.0455, abs=0.01)  # Gaussian tails, not uniform


def test_readout_starts_small() -> None:
    """UnitReadout: kernel N(0, 0.02²), unconstrained, so rare outputs start (and may stay) near zero."""
    layer = L.UnitReadout(V)
    layer.build((B, T, W))
    assert layer.kernel.constraint is None
    assert float(np.std(layer.kernel.numpy())) == pytest.approx(0.02, rel=0.02)
    _, measured = _unit_report("readout")
    assert measured["out"] == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "factory, shape, axis",
    [
        (lambda: L.UnitDense(512), (B, T, W), 0),
        (lambda: L.UnitConv1D(128, 3), (B, T, W), (0, 1)),
        (lambda: L.UnitMultiHeadAttention(4), (B, T, W), 0),
        (lambda: L.UnitMLP(), (B, T, W), 0),
        (lambda: L.UnitPositionEmbedding(T), (B, T, W), -1),
        (lambda: L.UnitEmbedding(V, W), (B, T), -1),
    ],
    ids=["dense", "conv1d", "attention", "mlp", "position_embedding", "embedding"],
)
def test_initial_weights_unit_normal_on_constraint(factory, shape, axis) -> None:
    layer = factory()
    layer.build(shape)
    matrices = [w for w in layer.weights if len(w.shape) >= 2]
    assert matrices
    for w in matrices:
        value = w.numpy()
        _assert_unit_normal_like(value)
        np.testing.assert_allclose(rms(value, axis=axis), 1.0, atol=1e-5, err_msg=w.path)
    for w in layer.weights:
        if w.path.endswith("bias"):
            assert not np.any(w.numpy())


# -------------------------------------------------------------------------------------------- UnitScaling
def test_unit_scaling_rms_per_dense_column() -> None:
    w = 3.0 * normal((64, 10)) + 0.5
    out = UnitScaling()(w).numpy()
    np.testing.assert_allclose(rms(out, axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, w / rms(w, axis=0), rtol=1e-5)  # direction kept: a per-column rescale


def test_unit_scaling_per_conv_output_channel() -> None:
    w = normal((3, 8, 5)) * np.arange(1, 6, dtype=np.float32)
    out = UnitScaling()(w).numpy()
    np.testing.assert_allclose(rms(out, axis=(0, 1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, w / rms(w, axis=(0, 1)), rtol=1e-5)


def test_unit_scaling_embedding_rows() -> None:
    w = normal((20, 16)) * np.arange(1, 21, dtype=np.float32)[:, None]
    out = UnitScaling(axis=-1)(w).numpy()
    np.testing.assert_allclose(rms(out, axis=-1), 1.0, atol=1e-6)
    assert not np.allclose(rms(out, axis=0), 1.0, atol=1e-2)
    vector = UnitScaling()(normal((7,)) * 4.0).numpy()  # a 1-D weight as a whole
    assert rms(vector) == pytest.approx(1.0, abs=1e-6)


def test_unit_scaling_l2_equals_keras_unit_norm() -> None:
    w = 2.0 * normal((64, 10))
    out = UnitScaling(norm="l2")(w).numpy()
    np.testing.assert_allclose(out, keras.constraints.UnitNorm(axis=0)(w).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), 1.0, atol=1e-6)


def test_unit_scaling_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        UnitScaling(norm="max")


@pytest.mark.parametrize("constraint", [UnitScaling(), UnitScaling("l2", axis=(0, 1), epsilon=1e-8)])
def test_unit_scaling_serialization(constraint: UnitScaling) -> None:
    revived = keras.constraints.deserialize(keras.constraints.serialize(constraint))
    assert isinstance(revived, UnitScaling) and revived.get_config() == constraint.get_config()
    assert UnitScaling.from_config(constraint.get_config()).get_config() == constraint.get_config()
    w = normal((3, 8, 5))
    np.testing.assert_array_equal(revived(w).numpy(), constraint(w).numpy())


def _fit_one_step(constraint, jit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    layer = L.UnitDense(8, kernel_constraint=constraint)
    model = keras.Sequential([keras.Input((16,)), layer])
    if constraint is None:  # start from the same unit-RMS point as the constrained layer
        layer.kernel.assign(UnitScaling()(layer.kernel.value))
    before = layer.kernel.numpy()
    model.compile(keras.optimizers.Adam(0.1), "mse", jit_compile=jit)
    model.fit(normal((64, 16)), normal((64, 8), seed=1), batch_size=64, epochs=1, verbose=0)
    return before, layer.kernel.numpy()


@pytest.mark.parametrize("jit", [False, True])
def test_unit_scaling_applied_after_fit_step(jit: bool) -> None:
    before, after = _fit_one_step(UnitScaling(), jit)
    assert np.abs(after - before).max() > 0.01  # the step moved the kernel
    np.testing.assert_allclose(rms(after, axis=0), 1.0, atol=1e-5)


def test_unit_scaling_l2_after_fit_step() -> None:
    before, after = _fit_one_step(UnitScaling(norm="l2"))
    assert np.abs(after - before).max() > 0.01
    np.testing.assert_allclose(np.linalg.norm(after, axis=0), 1.0, atol=1e-5)


def test_without_constraint_rms_drifts() -> None:
    before, after = _fit_one_step(None)
    np.testing.assert_allclose(rms(before, axis=0), 1.0, atol=1e-5)
    assert np.abs(rms(after, axis=0) - 1.0).max() > 1e-3


# -------------------------------------------------------------------------------------------- the loss
def test_unit_softmax_cross_entropy_equals_keras() -> None:
    logits = normal((4, 16, 30))
    targets = ids((4, 16), 30)
    ours = L.UnitSoftmaxCrossEntropy()(targets, logits)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, logits)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_unit_softmax_cross_entropy_ignore_class() -> None:
    logits = tf.constant(normal((4, 16, 30)))
    targets = ids((4, 16), 30)
    targets[:, ::3] = 0  # padding
    loss = L.UnitSoftmaxCrossEntropy(ignore_class=0)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(targets, logits)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)(targets, logits)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits).numpy()
    assert float(value) == pytest.approx(float(theirs), rel=1e-6)
    assert float(value) == pytest.approx(float(ce[targets != 0].mean()), rel=1e-6)
    assert float(value) != pytest.approx(float(ce.mean()), rel=1e-3)
    grad = tape.gradient(value, logits).numpy()
    assert np.all(grad[targets == 0] == 0) and np.all(np.abs(grad[targets != 0]).sum(-1) > 0)
    revived = L.UnitSoftmaxCrossEntropy.from_config(loss.get_config())
    assert revived.ignore_class == 0 and float(revived(targets, logits)) == pytest.approx(float(value))


def test_unit_softmax_cross_entropy_sample_weight_scales_each_targets_gradient() -> None:
    """Keras reduces the per-target values: a sample weight w scales the value as in Keras's own loss, and the
    gradient of each target's logits by w, on top of the unit-scaled V/√(V−1)·(softmax − onehot)."""
    vocab = 30
    logits = tf.constant(normal((4, 16, vocab)))
    targets = ids((4, 16), vocab)
    targets[:, ::3] = 0
    weights = np.random.default_rng(2).uniform(0.0, 3.0, size=(4, 16)).astype("float32")

    def value_and_grad(loss: keras.losses.Loss, sample_weight: np.ndarray | None) -> tuple[float, np.ndarray]:
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(targets, logits, sample_weight=sample_weight)
        return float(value), tape.gradient(value, logits).numpy()

    ours, grad = value_and_grad(L.UnitSoftmaxCrossEntropy(ignore_class=0), weights)
    theirs, true = value_and_grad(keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
                                  weights)
    assert ours == pytest.approx(theirs, rel=1e-6)
    counted = int((targets != 0).sum())
    np.testing.assert_allclose(grad, true * counted * vocab / np.sqrt(vocab - 1), rtol=1e-4, atol=1e-7)
    _, unweighted = value_and_grad(L.UnitSoftmaxCrossEntropy(ignore_class=0), None)
    np.testing.assert_allclose(grad, unweighted * weights[..., None], rtol=1e-5, atol=1e-7)


def test_each_transformer_block_draws_its_own_dropout_masks() -> None:
    """Two blocks with the same weights, input and rate must not drop the same units: with one fixed seed per
    block they did, at every step, which made dropout across blocks perfectly correlated."""
    keras.utils.set_random_seed(0)
    x = tf.random.normal((2, 16, 32))
    first, second = L.UnitTransformerBlock(2, dropout=0.5), L.UnitTransformerBlock(2, dropout=0.5)
    first(x), second(x)
    second.set_weights(first.get_weights())
    np.testing.assert_allclose(first(x).numpy(), second(x).numpy(), rtol=1e-5, atol=1e-6)  # inference: same
    assert not np.allclose(first(x, training=True).numpy(), second(x, training=True).numpy())


# ------------------------------------------------------------------------------ the stock layers they extend
@pytest.mark.parametrize("unit, stock", [
    (L.UnitDense, keras.layers.Dense), (L.UnitEmbedding, keras.layers.Embedding),
    (L.UnitConv1D, keras.layers.Conv1D), (L.UnitLayerNorm, keras.layers.LayerNormalization),
    (L.UnitRMSNorm, keras.layers.RMSNormalization), (L.UnitDropout, keras.layers.Dropout),
])
def test_a_unit_layer_is_its_stock_twin(unit: type, stock: type) -> None:
    assert issubclass(unit, stock)


def test_stock_arguments_work_on_unit_layers() -> None:
    """Regularizers, initializers, a per-layer dtype policy, masking and the stock config keys behave as in the
    stock layers; only the op is scaled."""
    x = normal((4, 16))
    dense = L.UnitDense(8, kernel_regularizer=keras.regularizers.L2(0.1), bias_initializer="ones")
    y = dense(x)
    kernel = dense.kernel.numpy()
    assert float(dense.losses[0]) == pytest.approx(0.1 * float(np.sum(kernel * kernel)), rel=1e-5)
    np.testing.assert_allclose(y.numpy(), (x @ kernel + 1.0) / 4.0, rtol=1e-5, atol=1e-5)  # α·(xW + b), α = 16^-½

    half = L.UnitDense(8, dtype="mixed_bfloat16")
    assert half(x).dtype == tf.bfloat16 and half.kernel.dtype == "float32"

    embedding = L.UnitEmbedding(10, 4, mask_zero=True)
    tokens = np.array([[3, 5, 0, 0]], dtype=np.int32)
    inputs = keras.Input((4,), dtype="int32")
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(embedding(inputs)))  # reads the mask
    np.testing.assert_allclose(pooled(tokens).numpy()[0], embedding.embeddings.numpy()[[3, 5]].mean(0), rtol=1e-5)

    norm = L.UnitLayerNorm(center=False, scale=False)
    z = normal((3, 32), seed=1)
    assert norm(z).shape == z.shape and not norm.weights
    expected = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(norm(z).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lora_runs_the_scaled_matmul_on_the_adapted_kernel() -> None:
    """``lora_rank`` (Dense's): the frozen kernel plus the low-rank delta, through the same unit-scaled op."""
    from llm_unitscale import ops

    x = normal((4, 16))
    layer = L.UnitDense(8, kernel_constraint=None, lora_rank=2)
    layer(x)
    layer.lora_kernel_b.assign(normal((2, 8), seed=3))
    assert {w.path.rsplit("/", 1)[-1] for w in layer.trainable_weights} == {"bias", "lora_kernel_a", "lora_kernel_b"}
    adapted = layer._kernel.numpy() + layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy()  # alpha = rank
    np.testing.assert_allclose(layer(x).numpy(), ops.dense(tf.constant(x), tf.constant(adapted)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_what_the_scaled_ops_cannot_do_is_refused_clearly() -> None:
    for layer, shape in ((L.UnitDense(4), (2, 8)), (L.UnitEmbedding(10, 4), (2, 8)), (L.UnitConv1D(4, 3), (2, 5, 8))):
        layer.build(shape)
        with pytest.raises(NotImplementedError, match="own unit-scaled op"):
            layer.quantize("int8")
    with pytest.raises(ValueError, match="strides=1"):
        L.UnitConv1D(4, 3, strides=2)
    with pytest.raises(ValueError, match="last axis"):
        L.UnitRMSNorm(axis=1)


def test_models_saved_by_the_earlier_layers_load_and_compute_the_same() -> None:
    """Models written before the layers subclassed Keras's load with today's layers and give the same outputs.
    tests/data/legacy_layers holds what a saved model is made of — each model's Keras config (models.json) and
    its weights in order (arrays.npz) — written with the layers of commit 147c70e."""
    import json
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "legacy_layers"
    configs = json.loads((folder / "models.json").read_text(encoding="utf-8"))
    arrays = np.load(folder / "arrays.npz")
    for name, config in configs.items():
        model = keras.models.model_from_json(json.dumps(config))
        count = sum(1 for key in arrays.files if key.startswith(f"{name}/weight_"))
        model.set_weights([arrays[f"{name}/weight_{i}"] for i in range(count)])
        inputs = arrays["x"] if name == "layer_norm_block" else arrays["ids"]
        np.testing.assert_allclose(model(inputs).numpy(), arrays[f"{name}/expected"], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_attention_takes_keras_multi_head_attention_arguments() -> None:
    """``call(query, value, key, …, attention_mask, use_causal_mask)`` as in keras.layers.MultiHeadAttention,
    for self-attention: each spelling of the same mask gives the same output as our own arguments."""
    x = tf.constant(normal((2, 6, 16)))
    causal, full = L.UnitMultiHeadAttention(2), L.UnitMultiHeadAttention(2, causal=False)
    reference = causal(x).numpy()
    full(x)
    full.set_weights(causal.get_weights())
    np.testing.assert_allclose(causal(x, x, x).numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(full(x, use_causal_mask=True).numpy(), reference, rtol=1e-6)
    lower = np.tril(np.ones((6, 6), bool))[None].repeat(2, 0)
    np.testing.assert_allclose(full(x, attention_mask=lower).numpy(), reference, rtol=1e-6)
    assert not np.allclose(causal(x, use_causal_mask=False).numpy(), reference)

    real = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    padded = full(x, padding_mask=real).numpy()
    for spelling in ({"value_mask": real}, {"key_mask": real}, {"attention_mask": real[:, None, :].repeat(6, 1)}):
        np.testing.assert_allclose(full(x, x, **spelling).numpy(), padded, rtol=1e-6, err_msg=str(list(spelling)))
    with pytest.raises(NotImplementedError, match="self-attention"):
        full(x, tf.constant(normal((2, 6, 16), seed=1)))


def test_attention_reads_the_mask_of_an_embedding_with_mask_zero() -> None:
    """Keras fills query_mask/value_mask from the inputs' masks: padding after an embedding with mask_zero is
    not attended to, as with an explicit padding mask."""
    tokens = np.array([[4, 7, 2, 0, 0], [3, 3, 9, 5, 1]], np.int32)
    inputs = keras.Input((5,), dtype="int32")
    embedding, attention = L.UnitEmbedding(12, 8, mask_zero=True), L.UnitMultiHeadAttention(2, causal=False)
    h = embedding(inputs)
    model = keras.Model(inputs, attention(h, h))
    out = model(tokens).numpy()
    explicit = attention(embedding(tokens), padding_mask=tokens != 0).numpy()
    np.testing.assert_allclose(out[:, :3], explicit[:, :3], rtol=1e-5, atol=1e-6)  # real queries
    np.testing.assert_allclose(out[1], explicit[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0, :3], attention(embedding(tokens)).numpy()[0, :3], atol=1e-3)  # unmasked differs


def test_bag_training_step_reads_only_the_batch_rows_after_graph_optimization() -> None:
    """TensorFlow's graph optimizer may rewrite gather-then-segment-sum into a segment sum over the whole table
    (``SimplifyEmbeddingLookup``), which reads — and, once sparse updates have touched the table, copies — all
    of it every step. The bag's step as ``fit`` runs it, after optimization, reads no table whole."""
    from tensorflow.python.eager import context  # run metadata: the only view of the post-optimization graph

    from llm_unitscale import optimizers

    ids = keras.Input((6,), dtype="int32")
    model = keras.Model(ids, keras.layers.Dense(2)(L.UnitEmbeddingBag(1000, 8, typical_count=4.0)(ids)))
    model.compile(optimizer=optimizers.UnitAdamW(1e-2, sparse_updates=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    context.enable_run_metadata()
    try:
        model.fit(rng.integers(0, 1000, (16, 6)).astype("int32"), rng.integers(0, 2, 16), batch_size=8, verbose=0)
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    nodes = [node for graph in metadata.function_graphs for node in graph.post_optimization_graph.node]
    assert any(node.op.startswith("SparseSegmentSum") for node in nodes)  # the step was captured
    assert not [node.name for node in nodes if "SimplifyEmbeddingLookup" in node.name]
