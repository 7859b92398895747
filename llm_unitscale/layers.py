"""Unit-scaled Keras layers: weights plus one call into :mod:`llm_unitscale.ops`.

Where Keras has the same layer, the unit-scaled one subclasses it and overrides only ``call`` (as Graphcore's
library subclasses torch's modules): ``UnitDense(keras.layers.Dense)``, ``UnitEmbedding``, ``UnitConv1D``,
``UnitLayerNorm``, ``UnitRMSNorm``, ``UnitDropout``. They take the stock arguments (initializers, regularizers,
constraints, ``mask_zero``, LoRA, a per-layer ``dtype`` policy) and behave as the stock layer does, except for
the scaling; Keras's weight quantization, which would replace the scaled op, is refused. Every weight starts
N(0, 1) (the fan-in lives in the op) and carries a :class:`UnitScaling` constraint by default
(``kernel_constraint=None`` switches it off), projected onto at creation. Weights are passed to ops as tensors
(``variable.value``): custom gradients reject Keras variables in eager calls.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from llm_unitscale import ops
from llm_unitscale.constraints import UnitScaling
from llm_unitscale.precision import PrecisionOfPolicy, tensor_of

_DEFAULT = "unit_scaling"
register = keras.saving.register_keras_serializable(package="llm_unitscale")


def unit_normal() -> keras.initializers.Initializer:
    """N(0, 1): the unit-scaling weight init."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=1.0)


def _constraint(value: Any, axis: int | None = None) -> keras.constraints.Constraint | None:
    """Resolve a constraint argument; the default is ``UnitScaling(axis=axis)``."""
    if isinstance(value, str) and value == _DEFAULT:
        return UnitScaling(axis=axis)
    return keras.constraints.get(value)


def _project(weight: keras.Variable, constraint: Any) -> None:
    """Project a freshly created weight onto its constraint (Keras applies constraints only after updates)."""
    if constraint is not None:
        weight.assign(constraint(weight.value))


def _unit_weight(layer: keras.layers.Layer, name: str, shape: tuple, constraint: Any) -> keras.Variable:
    """Add an N(0, 1) weight and project it onto its constraint."""
    weight = layer.add_weight(name=name, shape=shape, initializer=unit_normal(), constraint=constraint)
    _project(weight, constraint)
    return weight


def _zeros(layer: keras.layers.Layer, name: str, shape: tuple) -> keras.Variable:
    return layer.add_weight(name=name, shape=shape, initializer="zeros")


def _ser(constraint: Any) -> Any:
    return keras.constraints.serialize(constraint) if constraint is not None else None


def _no_quantization(layer: keras.layers.Layer) -> NotImplementedError:
    return NotImplementedError(
        f"{type(layer).__name__} runs its own unit-scaled op, which Keras's weight quantization would replace; "
        "train and run it in low precision with --precision bfloat16/float16/fp8 instead"
    )


def _scaled_activation(activation: str | None) -> str | None:
    if activation is not None and activation not in ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ops.ACTIVATIONS} or None, got {activation!r}")
    return activation


@register
class UnitDense(PrecisionOfPolicy, keras.layers.Dense):
    """Unit-scaled ``keras.layers.Dense``: ``act(α·(xW + b))``, α = fan_in^-½ (see :func:`ops.dense`).

    Dense's own arguments and behaviour, with unit-scaling defaults: ``kernel_initializer`` N(0, 1) and
    ``kernel_constraint`` :class:`UnitScaling` (``None`` switches it off; the initial kernel is projected onto
    it). Regularizers, bias initializer/constraint, masking, a per-layer ``dtype`` policy and ``lora_rank`` (the
    scaled matmul then runs on W + ΔW) work as in Dense. ``activation`` names one of ``ops.ACTIVATIONS``,
    applied in its unit-scaled form. Keras's weight quantization (``quantize``) would replace the scaled
    matmul, so it is refused with a clear error.
    """

    def __init__(
        self,
        units: int,
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer: Any = None,
        kernel_constraint: Any = _DEFAULT,
        **kwargs: Any,
    ):
        super().__init__(
            int(units), activation=None, use_bias=use_bias, kernel_initializer=kernel_initializer or unit_normal(),
            kernel_constraint=_constraint(kernel_constraint), **kwargs,
        )
        self.scaled_activation = _scaled_activation(activation)

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        _project(self._kernel, self.kernel_constraint)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        y = ops.dense(inputs, tensor_of(self.kernel), tensor_of(self.bias) if self.use_bias else None)
        return y if self.scaled_activation is None else ops.activation(y, self.scaled_activation)

    def quantize(self, mode: Any = None, **kwargs: Any) -> None:
        raise _no_quantization(self)

    def get_config(self) -> dict:
        return {**super().get_config(), "activation": self.scaled_activation}


@register
class UnitReadout(PrecisionOfPolicy, keras.layers.Layer):
    """Projection to logits with a bias (see :func:`ops.readout`).

    The one weight that does *not* start at unit scale and carries no constraint by default: the kernel
    starts N(0, kernel_init_scale²) (0.02) and may grow freely, and ``ops.readout`` divides ∂x by
    kernel_init_scale so the backward pass still starts at unit scale. A unit-RMS column for every output
    leaves rare words (seen a few times) with random logits of unit scale for the whole run, which costs
    calibration (the kernel now learns its own magnitude, so no separate logit scale is needed). Measured on
    lee_background.cor, 600 steps: no Word2Vec, lr 1e-2: val loss 6.62 with unit-RMS columns, 6.31 with a
    zero-initialised kernel; Word2Vec init, lr 7e-3: 6.23 zero-initialised, 6.19 at 0.02.
    """

    def __init__(
        self,
        units: int,
        use_bias: bool = True,
        kernel_init_scale: float = 0.02,
        kernel_constraint: Any = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = use_bias
        self.kernel_init_scale = float(kernel_init_scale)
        self.kernel_constraint = _constraint(kernel_constraint)

    def build(self, input_shape: tuple) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-1]), self.units),
            initializer=keras.initializers.RandomNormal(stddev=self.kernel_init_scale),
            constraint=self.kernel_constraint,
        )
        self.bias = _zeros(self, "bias", (self.units,)) if self.use_bias else None

    def call(self, x: tf.Tensor) -> tf.Tensor:
        bias = self.bias.value if self.use_bias else None
        return ops.readout(x, self.kernel.value, bias, self.kernel_init_scale)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_init_scale": self.kernel_init_scale,
            "kernel_constraint": _ser(self.kernel_constraint),
        }


@register
class UnitEmbedding(keras.layers.Embedding):
    """Unit-scaled ``keras.layers.Embedding``: N(0, 1) rows, ∂W = √(V/N)·scatter(g) (see :func:`ops.embedding`).

    Embedding's own arguments (``mask_zero``, regularizer, ``lora_rank``, per-layer ``dtype``) with
    unit-scaling defaults: ``embeddings_initializer`` N(0, 1) and ``embeddings_constraint`` :class:`UnitScaling`
    over each row (``None`` switches it off). Keras's weight quantization is refused (see :class:`UnitDense`).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = None,
        embeddings_constraint: Any = _DEFAULT,
        **kwargs: Any,
    ):
        super().__init__(
            int(input_dim), int(output_dim), embeddings_initializer=embeddings_initializer or unit_normal(),
            embeddings_constraint=_constraint(embeddings_constraint, axis=-1), **kwargs,
        )

    def build(self, input_shape: tuple | None = None) -> None:
        if self.built:
            return
        super().build(input_shape)
        _project(self._embeddings, self.embeddings_constraint)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return ops.embedding(tf.cast(inputs, tf.int32), tensor_of(self.embeddings))

    def quantize(self, mode: Any = None, **kwargs: Any) -> None:
        raise _no_quantization(self)


@register
class UnitPositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to (B, T, d): ``ops.add(x, P[0..T−1])``, P of shape (length, d)."""

    def __init__(self, sequence_length: int, embeddings_constraint: Any = _DEFAULT, **kwargs: Any):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)
        self.embeddings_constraint = _constraint(embeddings_constraint, axis=-1)

    def build(self, input_shape: tuple) -> None:
        shape = (self.sequence_length, int(input_shape[-1]))
        self.embeddings = _unit_weight(self, "embeddings", shape, self.embeddings_constraint)

    def call(self, x: tf.Tensor, start: int | tf.Tensor = 0) -> tf.Tensor:
        shape = tf.shape(x)
        positions = tf.broadcast_to(tf.range(shape[1]) + start, shape[:2])
        return ops.add(x, tf.cast(ops.embedding(positions, self.embeddings.value), x.dtype))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "embeddings_constraint": _ser(self.embeddings_constraint),
        }


@register
class UnitConv1D(PrecisionOfPolicy, keras.layers.Conv1D):
    """Unit-scaled ``keras.layers.Conv1D`` over (B, T, C), causal padding by default (see :func:`ops.conv1d`).

    Conv1D's arguments with unit-scaling defaults (``kernel_initializer`` N(0, 1), ``kernel_constraint``
    :class:`UnitScaling` per output channel, ``padding="causal"``); ``activation`` names one of
    ``ops.ACTIVATIONS``. The scaled op covers stride 1, one group and channels-last data; other values are
    refused at construction.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int],
        padding: str = "causal",
        dilation_rate: int | tuple[int] = 1,
        activation: str | None = None,
        use_bias: bool = True,
        kernel_initializer: Any = None,
        kernel_constraint: Any = _DEFAULT,
        **kwargs: Any,
    ):
        super().__init__(
            int(filters), kernel_size, padding=padding, dilation_rate=dilation_rate, activation=None,
            use_bias=use_bias, kernel_initializer=kernel_initializer or unit_normal(),
            kernel_constraint=_constraint(kernel_constraint), **kwargs,
        )
        if self.strides != (1,) or self.groups != 1 or self.data_format != "channels_last":
            raise ValueError("UnitConv1D supports strides=1, groups=1 and channels_last only, got "
                             f"strides={self.strides}, groups={self.groups}, data_format={self.data_format!r}")
        self.scaled_activation = _scaled_activation(activation)

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        _project(self._kernel, self.kernel_constraint)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        bias = tensor_of(self.bias) if self.use_bias else None
        y = ops.conv1d(inputs, tensor_of(self.kernel), bias, self.padding, int(self.dilation_rate[0]))
        return y if self.scaled_activation is None else ops.activation(y, self.scaled_activation)

    def quantize(self, mode: Any = None, **kwargs: Any) -> None:
        raise _no_quantization(self)

    def get_config(self) -> dict:
        return {**super().get_config(), "activation": self.scaled_activation}


def _last_axis_only(layer: str, axis: Any) -> None:
    if axis not in (-1, [-1], (-1,)):
        raise ValueError(f"{layer} normalises the last axis (axis=-1) only, got axis={axis!r}")


def _ones_gain(x: tf.Tensor) -> tf.Tensor:
    """The gain γ = 1 of a norm built without one (``scale=False``)."""
    return tf.ones((int(x.shape[-1]),), tf.float32)


@register
class UnitLayerNorm(keras.layers.LayerNormalization):
    """Unit-scaled ``keras.layers.LayerNormalization`` over the last axis: a closed-form backward, ∂γ and ∂β
    × N^-½ (see :func:`ops.layer_norm`). LayerNormalization's arguments (``center``, ``scale``, initializers,
    regularizers, constraints), ε = 1e-5 by default; computed in float32 like Keras's (``autocast=False``)."""

    def __init__(self, axis: int = -1, epsilon: float = 1e-5, **kwargs: Any):
        _last_axis_only("UnitLayerNorm", axis)
        super().__init__(axis=axis, epsilon=float(epsilon), **kwargs)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        gamma = tensor_of(self.gamma) if self.gamma is not None else _ones_gain(inputs)
        beta = tensor_of(self.beta) if self.beta is not None else None
        return ops.layer_norm(inputs, gamma, beta, self.epsilon)


@register
class UnitRMSNorm(keras.layers.RMSNormalization):
    """Unit-scaled ``keras.layers.RMSNormalization`` over the last axis: a closed-form backward, ∂γ × N^-½
    (see :func:`ops.rms_norm`); the gain is RMSNormalization's ``scale`` weight. ε = 1e-5 by default;
    computed in float32 (``autocast=False``, as the layer norm)."""

    def __init__(self, axis: int = -1, epsilon: float = 1e-5, **kwargs: Any):
        _last_axis_only("UnitRMSNorm", axis)
        kwargs.setdefault("autocast", False)
        super().__init__(axis=axis, epsilon=float(epsilon), **kwargs)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return ops.rms_norm(x, tensor_of(self.scale), self.epsilon)


_NORMS = {"layer": UnitLayerNorm, "rms": UnitRMSNorm}


def _all_true(*masks: tf.Tensor | None) -> tf.Tensor | None:
    """The logical AND of the masks given (None for none)."""
    given = [tf.cast(m, tf.bool) for m in masks if m is not None]
    if not given:
        return None
    out = given[0]
    for m in given[1:]:
        out = tf.logical_and(out, m)
    return out


@register
class UnitMultiHeadAttention(PrecisionOfPolicy, keras.layers.Layer):
    """Unit-scaled multi-head self-attention (see :func:`ops.multi_head_attention`).

    Weights: query/key/value/output kernels (width, width) as in Keras's ``MultiHeadAttention`` (one per
    projection), biases optional. ``call`` takes ``keras.layers.MultiHeadAttention``'s arguments for
    self-attention: ``call(query, value=None, key=None, query_mask=None, value_mask=None, key_mask=None,
    attention_mask=None, use_causal_mask=None)`` — ``value``/``key`` may only be the query itself (the scale
    rules are derived for one source: cross-attention is refused, not approximated); ``use_causal_mask`` None
    means the layer's ``causal``; ``attention_mask`` (B, T, T) is True where query i may see key j; masks are
    True for real tokens, and Keras fills ``query_mask``/``value_mask`` from the inputs' own masks (e.g. an
    embedding with ``mask_zero=True``) when the query is passed as value too. ``padding_mask`` (B, T) is the
    keys' mask by our blocks' name. ``call(x, cache=(keys, values), cache_update_index=p)`` decodes rows p…
    against a key/value cache and returns (output, (k, v)) of the new rows (see :func:`ops.multi_head_attention`).
    attention_rule: how each head's output is brought to unit scale (:func:`ops.attention_output`); a saved
    layer without the key is from a version that always used "sqrt_n", and loads with it. output_gain: a
    learnable per-channel gain on the heads' outputs (see :func:`ops.multi_head_attention`).
    """

    def __init__(
        self,
        num_heads: int,
        causal: bool = True,
        use_bias: bool = True,
        kernel_constraint: Any = _DEFAULT,
        attention_rule: str = "joint_norm",
        output_gain: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if attention_rule not in ops.ATTENTION_RULES:
            raise ValueError(f"attention_rule must be one of {ops.ATTENTION_RULES}, got {attention_rule!r}")
        self.num_heads = int(num_heads)
        self.causal = causal
        self.use_bias = use_bias
        self.kernel_constraint = _constraint(kernel_constraint)
        self.attention_rule = attention_rule
        self.output_gain = bool(output_gain)
        self.supports_masking = True  # the query's mask passes through, as in Keras's MultiHeadAttention

    def build(self, query_shape: tuple, value_shape: tuple | None = None, key_shape: tuple | None = None) -> None:
        width = int(query_shape[-1])
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        names = ("query", "key", "value", "output")
        self.kernels = [
            _unit_weight(self, f"{n}_kernel", (width, width), self.kernel_constraint) for n in names
        ]
        self.biases = [_zeros(self, f"{n}_bias", (width,)) for n in names] if self.use_bias else None
        self.gain = (self.add_weight(name="output_gain", shape=(width,), initializer="ones")
                     if self.output_gain else None)

    def call(
        self,
        query: tf.Tensor,
        value: tf.Tensor | None = None,
        key: tf.Tensor | None = None,
        query_mask: tf.Tensor | None = None,
        value_mask: tf.Tensor | None = None,
        key_mask: tf.Tensor | None = None,
        attention_mask: tf.Tensor | None = None,
        use_causal_mask: bool | None = None,
        training: bool | None = None,
        padding_mask: tf.Tensor | None = None,
        cache: tuple[tf.Tensor, tf.Tensor] | None = None,
        cache_update_index: tf.Tensor | int | None = None,
    ) -> tf.Tensor | tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        for name, source in (("value", value), ("key", key)):
            if source is not None and source is not query:
                raise NotImplementedError(
                    f"UnitMultiHeadAttention is self-attention: {name} must be the query itself (its scale rules "
                    "assume queries, keys and values projected from one source)")
        keys = _all_true(padding_mask, value_mask, key_mask)
        if query_mask is not None:  # a masked query sees no key (Keras's rule); its output is not used
            rows = tf.cast(query_mask, tf.bool)[:, :, None]
            attention_mask = rows if attention_mask is None else tf.logical_and(rows, tf.cast(attention_mask, tf.bool))
        causal = self.causal if use_causal_mask is None else bool(use_causal_mask)
        kernels = tuple(k.value for k in self.kernels)
        biases = tuple(b.value for b in self.biases) if self.use_bias else None
        gain = self.gain.value if self.output_gain else None
        return ops.multi_head_attention(query, kernels, biases, self.num_heads, causal, keys,
                                        self.attention_rule, gain, cache, cache_update_index,
                                        attention_mask=attention_mask)

    def compute_output_shape(self, query_shape: tuple, value_shape: tuple | None = None,
                             key_shape: tuple | None = None) -> tuple:
        return query_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "causal": self.causal,
            "use_bias": self.use_bias,
            "kernel_constraint": _ser(self.kernel_constraint),
            "attention_rule": self.attention_rule,
            "output_gain": self.output_gain,
        }

    @classmethod
    def from_config(cls, config: dict) -> UnitMultiHeadAttention:
        return cls(**{"attention_rule": "sqrt_n", **config})


@register
class UnitMLP(PrecisionOfPolicy, keras.layers.Layer):
    """Feed-forward branch width → mlp_ratio·width → width with a constrained activation (:func:`ops.mlp`)."""

    def __init__(
        self,
        mlp_ratio: int = 4,
        activation: str = "gelu",
        use_bias: bool = True,
        kernel_constraint: Any = _DEFAULT,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.mlp_ratio = int(mlp_ratio)
        self.activation = activation
        self.use_bias = use_bias
        self.kernel_constraint = _constraint(kernel_constraint)

    def build(self, input_shape: tuple) -> None:
        width = int(input_shape[-1])
        hidden = self.mlp_ratio * width
        self.up_kernel = _unit_weight(self, "up_kernel", (width, hidden), self.kernel_constraint)
        self.down_kernel = _unit_weight(self, "down_kernel", (hidden, width), self.kernel_constraint)
        self.up_bias = _zeros(self, "up_bias", (hidden,)) if self.use_bias else None
        self.down_bias = _zeros(self, "down_bias", (width,)) if self.use_bias else None

    def call(self, x: tf.Tensor) -> tf.Tensor:
        up = (self.up_kernel.value, self.up_bias.value if self.use_bias else None)
        down = (self.down_kernel.value, self.down_bias.value if self.use_bias else None)
        return ops.mlp(x, up, down, self.activation)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "mlp_ratio": self.mlp_ratio,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_constraint": _ser(self.kernel_constraint),
        }


@register
class UnitTransformerBlock(PrecisionOfPolicy, keras.layers.Layer):
    """Pre-norm transformer block: x ← res(x, attn(norm(x))); x ← res(x, mlp(norm(x))), res = ops.residual_add.

    tau: the residual branch weight τ of ``y = (τ·f(x) + x)/√(1+τ²)`` for the attention branch, and for the
    MLP branch too unless ``mlp_tau`` is given (``ops.residual_taus`` gives both per block from the depth).
    """

    def __init__(
        self,
        num_heads: int,
        mlp_ratio: int = 4,
        tau: float = 0.5,
        causal: bool = True,
        dropout: float = 0.0,
        kernel_constraint: Any = _DEFAULT,
        norm: str = "rms",
        use_bias: bool = False,
        mlp_tau: float | None = None,
        attention_rule: str = "joint_norm",
        attention_gain: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {norm!r}")
        self.num_heads = int(num_heads)
        self.mlp_ratio = int(mlp_ratio)
        self.tau = float(tau)
        self.mlp_tau = self.tau if mlp_tau is None else float(mlp_tau)
        self.causal = causal
        self.dropout = float(dropout)
        self.norm = norm
        self.use_bias = use_bias
        self.kernel_constraint = _constraint(kernel_constraint)
        constraint = _ser(self.kernel_constraint)
        self.attention_norm = _NORMS[norm](name="attention_norm")
        self.attention_rule = attention_rule
        self.attention_gain = bool(attention_gain)
        self.attention = UnitMultiHeadAttention(
            num_heads, causal, use_bias, kernel_constraint=constraint, attention_rule=attention_rule,
            output_gain=attention_gain, name="attention",
        )
        self.mlp_norm = _NORMS[norm](name="mlp_norm")
        self.mlp = UnitMLP(mlp_ratio, use_bias=use_bias, kernel_constraint=constraint, name="mlp")
        # seed None: drawn from Keras's global seed (keras.utils.set_random_seed), so each block's masks are
        # its own — a fixed seed gave every block the same masks at every step
        self.seed_generator = keras.random.SeedGenerator(None) if self.dropout else None

    def build(self, x_shape: tuple, padding_mask_shape: tuple | None = None) -> None:
        for layer in (self.attention_norm, self.attention, self.mlp_norm, self.mlp):
            layer.build(x_shape)

    def call(
        self,
        x: tf.Tensor,
        padding_mask: tf.Tensor | None = None,
        training: bool = False,
        cache: tuple[tf.Tensor, tf.Tensor] | None = None,
        cache_update_index: tf.Tensor | int | None = None,
    ) -> tf.Tensor | tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        """The block on x (B, T, width). With ``cache`` = (keys, values), each (B, heads, S, head_dim), holding
        positions 0…p−1 and ``cache_update_index`` = p, x holds positions p…p+T−1 and the call returns
        (output, (k, v)): the keys and values of those rows, for the caller to write into the cache (decoding
        runs this same call: ``decoding.KVCacheDecoder``)."""
        new_rows: list[tuple[tf.Tensor, tf.Tensor]] = []

        def attention_branch(h: tf.Tensor) -> tf.Tensor:
            h = self.attention(self.attention_norm(h), padding_mask=padding_mask, cache=cache,
                               cache_update_index=cache_update_index)
            if cache is not None:
                h, rows = h
                new_rows.append(rows)
            return ops.dropout(h, self.dropout, training, self.seed_generator)

        def mlp_branch(h: tf.Tensor) -> tf.Tensor:
            return ops.dropout(self.mlp(self.mlp_norm(h)), self.dropout, training, self.seed_generator)

        x = ops.residual_add(x, attention_branch, self.tau)
        x = ops.residual_add(x, mlp_branch, self.mlp_tau)
        return x if cache is None else (x, new_rows[0])

    def compute_output_shape(self, x_shape: tuple, padding_mask_shape: tuple | None = None) -> tuple:
        return x_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "tau": self.tau,
            "mlp_tau": self.mlp_tau,
            "causal": self.causal,
            "dropout": self.dropout,
            "kernel_constraint": _ser(self.kernel_constraint),
            "norm": self.norm,
            "use_bias": self.use_bias,
            "attention_rule": self.attention_rule,
            "attention_gain": self.attention_gain,
        }

    @classmethod
    def from_config(cls, config: dict) -> UnitTransformerBlock:
        return cls(**{"attention_rule": "sqrt_n", **config})  # saved before the rule was an option


@register
class UnitPooling(keras.layers.Layer):
    """Unit-scaled max/average pooling over time: global (pool_size=None) or causal windows (:func:`ops.pool`)."""

    def __init__(self, mode: str = "max", pool_size: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if mode not in ("max", "average"):
            raise ValueError(f"mode must be 'max' or 'average', got {mode!r}")
        self.mode = mode
        self.pool_size = None if pool_size is None else int(pool_size)

    def call(self, x: tf.Tensor, padding_mask: tf.Tensor | None = None) -> tf.Tensor:
        return ops.pool(x, self.mode, self.pool_size, padding_mask)

    def compute_output_shape(self, x_shape: tuple, padding_mask_shape: tuple | None = None) -> tuple:
        return (x_shape[0], x_shape[-1]) if self.pool_size is None else x_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "pool_size": self.pool_size}


@register
class UnitEmbeddingBag(keras.layers.Layer):
    """Mean of the embeddings of a bag of ids (B, T) → (B, d), id 0 = padding (:func:`ops.embedding_bag`;
    ``typical_count``: the n̄ of its backward scale).

    The table is the second documented exception to "weights start N(0, 1)" (after ``UnitReadout``): it starts
    at **zero** and carries no constraint. Its rows are n-gram features, most of them rare, many hashed buckets
    never reached in training: an N(0, 1) row is a random unit vector that a feature seen once or never keeps
    for the whole run, and a text of unseen words then gets a confident random answer (measured: p = 1.0 for
    "zzzz qqqq" on a two-topic classifier) and every text some noise. From zero, an unseen feature adds exactly
    nothing and a feature's vector is what training gave it (fastText likewise starts its output matrix at
    zero). The output starts at 0 and grows with the rows; the readout (small random init) carries the first
    gradients. ``embeddings_initializer`` overrides it (e.g. "random_normal").
    """

    def __init__(self, input_dim: int, output_dim: int, typical_count: float, embeddings_constraint: Any = None,
                 embeddings_initializer: Any = "zeros", **kwargs: Any):
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.typical_count = float(typical_count)
        self.embeddings_constraint = _constraint(embeddings_constraint, axis=-1)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape: tuple | None = None) -> None:
        self.embeddings = self.add_weight(name="embeddings", shape=(self.input_dim, self.output_dim),
                                          initializer=self.embeddings_initializer,
                                          constraint=self.embeddings_constraint)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return ops.embedding_bag(tf.cast(ids, tf.int32), self.embeddings.value, self.typical_count)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.output_dim)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "typical_count": self.typical_count,
            "embeddings_constraint": _ser(self.embeddings_constraint),
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


@register
class UnitDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` (``rate``, ``noise_shape``, ``seed``) that preserves RMS: kept values × (1−p)^-½
    instead of (1−p)^-1 (see :func:`ops.dropout`)."""

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return ops.dropout(inputs, self.rate, training, getattr(self, "seed_generator", None), self.noise_shape)


@register
class UnitSoftmaxCrossEntropy(keras.losses.Loss):
    """Sparse softmax cross-entropy from logits with a unit-scaled gradient (:func:`ops.softmax_cross_entropy`).

    ``call`` returns one value per target and Keras reduces them, as for its own losses, so ``sample_weight``,
    the reductions and tf.distribute's ÷R work unchanged. The value is the ordinary mean cross-entropy (nats
    per target), so it compares directly with ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``,
    with or without ``ignore_class`` (targets that neither contribute nor count) and sample weights. The
    backward pass assumes the values are averaged (the default "sum_over_batch_size"): each target's logits then
    get V/√(V−1)·(softmax − onehot) times its sample weight.
    """

    def __init__(self, ignore_class: int | None = None, name: str = "unit_softmax_cross_entropy", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.ignore_class = ignore_class

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_true = tf.cast(y_true, tf.int32)
        mask = None if self.ignore_class is None else tf.not_equal(y_true, self.ignore_class)
        return ops.softmax_cross_entropy(y_pred, y_true, mask)

    def get_config(self) -> dict:
        return {**super().get_config(), "ignore_class": self.ignore_class}
