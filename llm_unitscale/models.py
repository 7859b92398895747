"""Architectures: ``build_model(config)`` composes the unit-scaled layers (or stock Keras twins) into a model.

Every model maps int token ids (B, T) — id 0 is padding — to logits: (B, T, V) for ``task="lm"``, (B, C) for
``task="classify"``. ``unit_scaling=False`` builds the same shapes from stock Keras layers with Keras's default
inits and loss: the baseline every benchmark compares against.

- transformer: GPT decoder (pre-norm, causal attention, GELU MLP, residual τ, final norm, readout);
  classification: bidirectional blocks over a padding mask, mean pool, head.
- cnn: embedding → conv (ReLU) × depth → pooling → dense (ReLU) → output (causal conv and causal windowed
  pooling for lm; global max pooling for classify) — the seed document's diagram.
- mlp: Bengio et al. (2003) neural LM: the embeddings of a fixed window of previous tokens, concatenated →
  dense (ReLU) → output; for classify the window is the whole text (mean of embeddings) — the seed's listing.
- bag (classify only; the default classifier): fastText-style (Joulin et al. 2017) — the ids are a bag of
  word, word n-gram and character n-gram features (``preprocessing.ngrams.BagOfNgrams``); their vectors are
  averaged (``ops.embedding_bag``; the stock twin: ``Embedding`` then ``GlobalAveragePooling1D`` over the
  padding mask), then dropout and the readout. Its table is the one weight without the
  UnitScaling constraint besides the readout: an uninformative n-gram's vector must be free to shrink and a
  decisive one's to grow, and normalising its 10⁵ rows after every step would cost more than the step
  (only the rows of a batch's features are updated: ``optimizers.UnitAdamW(sparse_updates=True)``).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from llm_unitscale import layers as unit
from llm_unitscale import ops, precision

TASKS = ("lm", "classify")
ARCHS = ("transformer", "cnn", "mlp", "bag")
#: Architectures that make sense per task (``bag`` has no notion of order, so no language model).
TASK_ARCHS = {"lm": ("transformer", "cnn", "mlp"), "classify": ARCHS}


@keras.saving.register_keras_serializable(package="llm_unitscale")
class CausalWindow(keras.layers.Layer):
    """Concatenate, at each position t, the features of positions t−w+1 … t (zeros before the start).

    (B, T, d) → (B, T, w·d): the fixed context window of Bengio's neural language model, for every position
    at once. Pure data movement, so the same layer serves the unit-scaled and the stock model.
    """

    def __init__(self, window: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.window = int(window)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        length = tf.shape(x)[1]
        padded = tf.pad(x, [[0, 0], [self.window - 1, 0], [0, 0]])
        shifted = [padded[:, self.window - 1 - k : self.window - 1 - k + length] for k in range(self.window)]
        return tf.concat(shifted, axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], input_shape[-1] * self.window)

    def get_config(self) -> dict:
        return {**super().get_config(), "window": self.window}


@keras.saving.register_keras_serializable(package="llm_unitscale")
class PositionEmbedding(keras.layers.Layer):
    """Stock learned position embedding for the baseline: ``x + keras.layers.Embedding(length, d)(0..T−1)``.

    The maths of ``keras_hub.layers.PositionEmbedding`` (a learned table, added); ours because the baseline
    must build without KerasHub, an optional dependency that the scripts do not import (≈ 1 s of start-up).
    ``start`` is the decoding offset of the key/value cache (KerasHub's ``start_index``)."""

    def __init__(self, sequence_length: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)

    def build(self, input_shape: tuple) -> None:
        self.position_embedding = keras.layers.Embedding(self.sequence_length, int(input_shape[-1]))
        self.position_embedding.build((None,))

    def call(self, x: tf.Tensor, start: int | tf.Tensor = 0) -> tf.Tensor:
        positions = tf.range(tf.shape(x)[1]) + start
        return x + tf.cast(self.position_embedding(positions), x.dtype)[None]

    def get_config(self) -> dict:
        return {**super().get_config(), "sequence_length": self.sequence_length}


def build_model(
    task: str = "lm",
    arch: str = "transformer",
    vocab_size: int = 1000,
    seq_len: int = 64,
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
    num_classes: int | None = None,
    unit_scaling: bool = True,
    dropout: float = 0.0,
    tau: float | None = None,
    mlp_ratio: int = 4,
    kernel_size: int = 3,
    pool_size: int = 3,
    window: int = 5,
    constraint: str | None = "rms",
    typical_count: float = 64.0,
    name: str | None = None,
    residual_mult: float = 1.0,
    attention_ratio: float = 1.0,
    attention_rule: str = "joint_norm",
    attention_gain: bool = False,
) -> keras.Model:
    """Build an uncompiled model mapping ids (B, T) to logits; see the module docstring for the archs.

    seq_len is the longest context (the position table's size); inputs may be shorter. constraint: the
    UnitScaling norm on every kernel and embedding table ("rms", "l2") or None; ignored by the baseline.
    tau: one residual branch weight for every branch, or None for the depth-aware rule of
    ``ops.residual_taus(depth, residual_mult, attention_ratio)`` (the default; unit-scaled transformer only).
    attention_rule: how attention outputs are brought to unit scale (``ops.attention_output``); attention_gain: a
    learnable gain on the heads' outputs (``ops.multi_head_attention``).
    typical_count: the bag model's typical number of features per text (``ops.bag_mean``'s n̄).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if arch not in TASK_ARCHS[task]:
        raise ValueError(f"arch must be one of {TASK_ARCHS[task]} for task {task!r}, got {arch!r}")
    if task == "classify" and not num_classes:
        raise ValueError("num_classes is required for task='classify'")
    for label, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("width", width), ("depth", depth)):
        if int(value) < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    if arch == "transformer" and width % heads:
        raise ValueError(f"width {width} must be divisible by heads {heads}")
    outputs = vocab_size if task == "lm" else num_classes
    kit = _UnitKit(constraint, attention_rule, attention_gain) if unit_scaling else _StockKit()
    ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    mask = keras.ops.not_equal(ids, 0) if task == "classify" else None
    if arch == "bag":
        x = kit.dropout(dropout)(kit.embedding_bag(vocab_size, width, typical_count)(ids, mask))
    else:
        x = kit.embedding(vocab_size, width)(ids)

    if arch == "bag":
        pass  # the readout follows the bag's mean directly
    elif arch == "transformer":
        x = kit.position(seq_len)(x)
        x = kit.dropout(dropout)(x)
        taus = ops.residual_taus(depth, residual_mult, attention_ratio) if tau is None else [(tau, tau)] * depth
        for i, block_taus in enumerate(taus):
            x = kit.block(heads, mlp_ratio, block_taus, task == "lm", dropout, f"block_{i}")(x, mask)
        x = kit.norm()(x)
        if task == "classify":
            x = kit.pool("average", None)(x, mask)
    elif arch == "cnn":
        padding = "causal" if task == "lm" else "same"
        for i in range(depth):
            x = kit.conv(width, kernel_size, padding, f"conv_{i}")(x)
        x = kit.pool("max", pool_size if task == "lm" else None)(x, mask)
        x = kit.dropout(dropout)(x)
        x = kit.dense(width, "relu")(x)
    else:  # mlp
        x = CausalWindow(window)(x) if task == "lm" else kit.pool("average", None)(x, mask)
        x = kit.dropout(dropout)(x)
        x = kit.dense(width, "relu")(x)
    logits = kit.readout(outputs)(x)
    return keras.Model(ids, logits, name=name or f"{'unit' if unit_scaling else 'stock'}_{arch}_{task}")


def loss_for(unit_scaling: bool) -> keras.losses.Loss:
    """The training loss: unit-scaled cross-entropy, or Keras's own for the baseline (same value)."""
    if unit_scaling:
        return unit.UnitSoftmaxCrossEntropy()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def is_unit_scaled(model: keras.Model) -> bool:
    """Whether ``model`` is built from llm_unitscale's unit-scaled layers."""
    return any(type(layer).__module__ == unit.__name__ for layer in model.layers)


class _UnitKit:
    """Factories for the unit-scaled model's layers."""

    def __init__(self, constraint: str | None, attention_rule: str = "joint_norm", attention_gain: bool = False):
        self.attention_rule = attention_rule
        self.attention_gain = attention_gain
        self.kernel_constraint = None if constraint is None else unit.UnitScaling(norm=constraint)
        self.table_constraint = None if constraint is None else unit.UnitScaling(norm=constraint, axis=-1)

    def embedding(self, vocab: int, width: int) -> keras.layers.Layer:
        return unit.UnitEmbedding(vocab, width, embeddings_constraint=self.table_constraint, name="embedding")

    def embedding_bag(self, vocab: int, width: int, typical_count: float) -> Any:
        layer = unit.UnitEmbeddingBag(vocab, width, typical_count, name="embedding")
        return lambda ids, mask: layer(ids)

    def position(self, length: int) -> keras.layers.Layer:
        return unit.UnitPositionEmbedding(length, embeddings_constraint=self.table_constraint, name="position")

    def dropout(self, rate: float) -> keras.layers.Layer:
        return unit.UnitDropout(rate) if rate else keras.layers.Identity()

    def block(self, heads: int, ratio: int, taus: tuple[float, float], causal: bool, rate: float, name: str) -> Any:
        layer = unit.UnitTransformerBlock(heads, ratio, taus[0], causal, rate, self.kernel_constraint,
                                          mlp_tau=taus[1], attention_rule=self.attention_rule,
                                          attention_gain=self.attention_gain, name=name)
        return lambda x, mask: layer(x, padding_mask=mask)

    def norm(self) -> keras.layers.Layer:
        return unit.UnitRMSNorm(name="final_norm")

    def pool(self, mode: str, size: int | None) -> Any:
        layer = unit.UnitPooling(mode, size, name="pool")
        return lambda x, mask: layer(x, padding_mask=mask)

    def conv(self, filters: int, kernel_size: int, padding: str, name: str) -> keras.layers.Layer:
        return unit.UnitConv1D(
            filters, kernel_size, padding, activation="relu", kernel_constraint=self.kernel_constraint, name=name
        )

    def dense(self, units: int, activation: str) -> keras.layers.Layer:
        return unit.UnitDense(units, activation, kernel_constraint=self.kernel_constraint, name="hidden")

    def readout(self, units: int) -> keras.layers.Layer:
        return unit.UnitReadout(units, name="readout")  # small init, unconstrained: see UnitReadout


class _StockKit:
    """Factories for the baseline: stock Keras layers and default initialisers.

    Built while simulated FP8 is on (``precision.fp8_enabled()``), the matmul layers are the FP8 subclasses of
    the stock layers in :mod:`llm_unitscale.precision` (same weights, inits and config; E4M3/E5M2 rounding
    in every matmul, no scaling); otherwise the stock classes themselves.
    """

    def __init__(self) -> None:
        fp8 = precision.fp8_enabled()
        self.Dense = precision.FP8Dense if fp8 else keras.layers.Dense
        self.Conv1D = precision.FP8Conv1D if fp8 else keras.layers.Conv1D
        self.MultiHeadAttention = precision.FP8MultiHeadAttention if fp8 else keras.layers.MultiHeadAttention

    def embedding(self, vocab: int, width: int) -> keras.layers.Layer:
        return keras.layers.Embedding(vocab, width, name="embedding")

    def embedding_bag(self, vocab: int, width: int, typical_count: float) -> Any:
        embedding = self.embedding(vocab, width)
        pool = keras.layers.GlobalAveragePooling1D(name="pool")
        return lambda ids, mask: pool(embedding(ids), mask=mask)

    def position(self, length: int) -> keras.layers.Layer:
        return PositionEmbedding(length, name="position")

    def dropout(self, rate: float) -> keras.layers.Layer:
        return keras.layers.Dropout(rate) if rate else keras.layers.Identity()

    def block(self, heads: int, ratio: int, taus: tuple[float, float], causal: bool, rate: float, name: str) -> Any:
        """A pre-norm block of stock layers: x + MHA(LN(x)), then x + Dense(GELU-Dense(LN(x))) — what
        ``keras_hub.layers.TransformerDecoder(normalize_first=True)`` computes, built from named stock layers
        instead, because FP8 runs need the FP8 subclasses of Dense and MultiHeadAttention in it (the decoder
        builds its own), the scale report and tracker show each piece by name, and the model must build
        without KerasHub."""

        def apply(x: Any, mask: Any) -> Any:
            width = int(x.shape[-1])
            drop = keras.layers.Dropout(rate, name=f"{name}_dropout")
            h = keras.layers.LayerNormalization(name=f"{name}_attention_norm")(x)
            attention = self.MultiHeadAttention(heads, width // heads, dropout=rate, name=f"{name}_attention")
            attention_mask = None if mask is None else keras.ops.expand_dims(mask, 1)
            h = attention(h, h, attention_mask=attention_mask, use_causal_mask=causal)
            x = keras.layers.Add(name=f"{name}_attention_add")([x, drop(h)])
            h = keras.layers.LayerNormalization(name=f"{name}_mlp_norm")(x)
            h = self.Dense(ratio * width, activation="gelu", name=f"{name}_mlp_up")(h)
            h = self.Dense(width, name=f"{name}_mlp_down")(h)
            return keras.layers.Add(name=f"{name}_mlp_add")([x, drop(h)])

        return apply

    def norm(self) -> keras.layers.Layer:
        return keras.layers.LayerNormalization(name="final_norm")

    def pool(self, mode: str, size: int | None) -> Any:
        def apply(x: Any, mask: Any) -> Any:
            if size is not None:  # causal window: left-pad then stride-1 pooling
                x = keras.layers.ZeroPadding1D((size - 1, 0), name="pool_pad")(x)
                return keras.layers.MaxPooling1D(size, strides=1, name="pool")(x)
            if mode == "average":
                return keras.layers.GlobalAveragePooling1D(name="pool")(x, mask=mask)
            if mask is not None:  # padded positions must not win the max
                fill = keras.ops.expand_dims(keras.ops.cast(mask, x.dtype), -1)
                x = x * fill + (1.0 - fill) * -1e9
            return keras.layers.GlobalMaxPooling1D(name="pool")(x)

        return apply

    def conv(self, filters: int, kernel_size: int, padding: str, name: str) -> keras.layers.Layer:
        return self.Conv1D(filters, kernel_size, padding=padding, activation="relu", name=name)

    def dense(self, units: int, activation: str) -> keras.layers.Layer:
        return self.Dense(units, activation=activation, name="hidden")

    def readout(self, units: int) -> keras.layers.Layer:
        return self.Dense(units, name="readout")
