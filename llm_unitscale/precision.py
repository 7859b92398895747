"""Precision modes: float32, bfloat16, float16 and simulated FP8 — the formats and every rounding rule.

``--precision`` picks one of :data:`PRECISIONS` (DESIGN §7); :func:`apply` makes it the process-wide setting
(like ``keras.mixed_precision.set_global_policy``, which it calls):

- ``float32``: everything in float32.
- ``bfloat16`` / ``float16``: Keras's *mixed* policies ``mixed_bfloat16`` / ``mixed_float16``: every layer
  computes (activations, activation gradients, the matmuls of the weight gradients) in the 16-bit dtype, while
  the variables — and so the optimizer state and the update — stay float32. Chosen over pure 16-bit policies
  because the point is to test the *compute* format, which the scales of activations and gradients decide;
  pure 16-bit variables test the optimizer instead, and fail for reasons unit scaling cannot help with
  (bf16(0.999) == 1.0 freezes Adam's second moment; pure float16 + Adam gave NaN: see FACTS). No loss scaling
  is applied unless the run asks for it (``--loss-scaling``: Keras's ``LossScaleOptimizer``).
- ``fp8``: simulated FP8 on a float32 model. The inputs of every matmul (dense, readout, conv, both attention
  matmuls; unit-scaled and baseline alike) are rounded to E4M3 in the forward pass and the gradient arriving at
  every matmul output is rounded to E5M2 in the backward pass, with **no per-tensor scale factors** (see
  :func:`fp8_matmul_inputs`, :func:`fp8_matmul_output`). Accumulation, norms, softmax, residual adds, the
  embedding lookup (a gather: exact in any format, its output is rounded where it enters the first matmul) and
  the loss (float32, from the logits; its gradient is rounded at the readout's output) stay float32, as on FP8
  hardware, which multiplies FP8 and accumulates in float32. The precision belongs to the model: its layers are
  built with :class:`SimulatedFP8Policy`, which ``model.keras`` saves, and each such layer switches the
  rounding on while it computes (:class:`PrecisionOfPolicy`; the ops read the switch *at trace time*), so a
  loaded fp8 run predicts and evaluates in simulated FP8 beside float32 models in the same process. Runs saved
  before the policy existed load as float32 models; ``runs.load_run`` gives them the policy back from their
  ``config.json``. ``with precision.fp8():`` turns the rounding on for any model traced inside it.
- ``keras-float8``: stock Keras's own float8 training for comparison (``model.quantize("float8")``: Dense and
  EinsumDense only, delayed per-tensor scaling from an amax history). Baseline models only, and for
  benchmarks only (``TrainConfig``, not a ``train.py`` choice): Keras 3.15 saves such a model but cannot load it
  back (the float8 policies of ``MultiHeadAttention``'s inner projections are not serialized).

Rounding: round-to-nearest-even (``tf.cast`` to ``tf.dtypes.experimental.float8_e4m3fn`` / ``float8_e5m2``,
bit-identical to ``ml_dtypes``), always from float32 (a direct cast from bfloat16 rounds twice), and
*saturating*: values beyond the largest finite (E4M3 ±448, E5M2 ±57344) are clipped to it first, because a raw
cast turns them into NaN (E4M3: no inf) or inf (E5M2). Values below half the smallest subnormal flush to zero.
The rounding ops only clip; how many values saturate or flush is counted by the scale tracker
(:mod:`llm_unitscale.scale_tracker`, from :func:`value_shares`), which sees every activation and gradient —
counting inside the jit-compiled training step would add state to every matmul.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: --precision choice → the Keras dtype policy of the model (fp8: :class:`SimulatedFP8Policy`, named float32).
POLICIES = {
    "float32": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
    "fp8": "float32",
    "keras-float8": "float32",
}
PRECISIONS = tuple(POLICIES)


@dataclass(frozen=True)
class Format:
    """A floating-point format's range: largest finite value, smallest normal and smallest subnormal."""

    name: str
    max: float
    min_normal: float
    min_subnormal: float


FLOAT16 = Format("float16", 65504.0, 2.0**-14, 2.0**-24)
BFLOAT16 = Format("bfloat16", float(np.finfo(np.float32).max) * (1 - 2.0**-8), 2.0**-126, 2.0**-133)
E4M3 = Format("e4m3", 448.0, 2.0**-6, 2.0**-9)
E5M2 = Format("e5m2", 57344.0, 2.0**-14, 2.0**-16)
#: The formats the scale tracker reports on.
FORMATS = {f.name: f for f in (FLOAT16, BFLOAT16, E4M3, E5M2)}


def value_shares(x: Any, fmt: Format) -> dict[str, float]:
    """Shares of the values of ``x`` that a cast to ``fmt`` would flush, make subnormal, or saturate.

    underflow: 0 < |x| ≤ min_subnormal/2 (round-to-nearest-even sends these to 0; the tie goes to 0, the even
               neighbour);  subnormal: min_subnormal/2 < |x| < min_normal (kept with fewer significant bits);
    overflow:  |x| > max (clipped by a saturating cast; an IEEE cast gives inf/NaN once past max + ½ulp).
    Each is a share of *all* values of ``x`` (exact zeros count in the denominator, never as underflow).
    """
    a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    if a.size == 0:
        return {"underflow": 0.0, "subnormal": 0.0, "overflow": 0.0}
    half = fmt.min_subnormal / 2.0
    n = float(a.size)
    return {
        "underflow": float(np.count_nonzero((a > 0) & (a <= half))) / n,
        "subnormal": float(np.count_nonzero((a > half) & (a < fmt.min_normal))) / n,
        "overflow": float(np.count_nonzero(a > fmt.max)) / n,
    }


# ------------------------------------------------------------------------------------------------- rounding
def _round_trip(x: tf.Tensor, fp8_dtype: tf.DType, limit: float) -> tf.Tensor:
    x32 = tf.cast(x, tf.float32)
    y = tf.cast(tf.cast(tf.clip_by_value(x32, -limit, limit), fp8_dtype), tf.float32)
    return tf.cast(y, x.dtype)


def to_e4m3(x: tf.Tensor) -> tf.Tensor:
    """``x`` rounded to the nearest FP8 E4M3 value (``float8_e4m3fn``), saturating at ±448; same dtype as x.

    E4M3: 4 exponent bits (bias 7), 3 mantissa bits, no inf; normals 2^-6 … 448, subnormals down to 2^-9.
    """
    return _round_trip(x, tf.dtypes.experimental.float8_e4m3fn, E4M3.max)


def to_e5m2(x: tf.Tensor) -> tf.Tensor:
    """``x`` rounded to the nearest FP8 E5M2 value (``float8_e5m2``), saturating at ±57344; same dtype as x.

    E5M2: 5 exponent bits (bias 15), 2 mantissa bits; normals 2^-14 … 57344, subnormals down to 2^-16.
    """
    return _round_trip(x, tf.dtypes.experimental.float8_e5m2, E5M2.max)


def quantize_e4m3(x: tf.Tensor) -> tf.Tensor:
    """Forward ``to_e4m3(x)``; backward the gradient passes unchanged (straight-through, as in FP8 training)."""

    @tf.custom_gradient
    def _q(t: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        return to_e4m3(t), lambda g: g

    return _q(x)


def quantize_grad_e5m2(y: tf.Tensor) -> tf.Tensor:
    """Forward identity; backward ``∂y = to_e5m2(g)``: the incoming gradient is rounded to E5M2."""

    @tf.custom_gradient
    def _q(t: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        return tf.identity(t), to_e5m2

    return _q(y)


# ------------------------------------------------------------------------------------------- the FP8 switch
_FP8 = False


def set_fp8(enabled: bool) -> None:
    """Turn simulated FP8 matmuls on or off for every model traced from now on (process-wide)."""
    global _FP8
    _FP8 = bool(enabled)


def fp8_enabled() -> bool:
    """Whether simulated FP8 is on (read by the ops at trace time)."""
    return _FP8


@contextlib.contextmanager
def fp8(enabled: bool = True) -> Iterator[None]:
    """Within this context, models traced or called eagerly use simulated FP8 matmuls (or not)."""
    previous = _FP8
    set_fp8(enabled)
    try:
        yield
    finally:
        set_fp8(previous)


# ------------------------------------------------------------------------------- FP8 as a model's own setting
_register = keras.saving.register_keras_serializable(package="llm_unitscale")


@_register
class SimulatedFP8Policy(keras.DTypePolicy):
    """The dtype policy of a layer trained in simulated FP8: float32 variables and compute, with the layer's
    matmuls simulated in FP8 (E4M3 operands, E5M2 gradients) whenever it is called.

    ``--precision fp8`` builds every layer with it (as ``mixed_bfloat16`` builds every layer with that policy),
    so a model carries its precision: ``model.keras`` saves the policy with each layer's config, and the loaded
    model computes in simulated FP8 wherever it is called — ``predict.py``, ``evaluate.py``, the Python API —
    while a float32 model in the same process stays float32. Its name is ``"float32"`` (the dtype of its
    variables and compute); the class is what tells the two apart.
    """

    def __init__(self, name: str = "float32"):
        if name != "float32":
            raise ValueError(f"SimulatedFP8Policy computes in float32, got {name!r}")
        super().__init__("float32")


def uses_fp8(layer: keras.layers.Layer) -> bool:
    """Whether ``layer``'s dtype policy is :class:`SimulatedFP8Policy`."""
    return isinstance(layer.dtype_policy, SimulatedFP8Policy)


def model_uses_fp8(model: keras.Model) -> bool:
    """Whether any layer of ``model`` computes in simulated FP8 (a model built or saved with ``--precision fp8``)."""
    return any(uses_fp8(layer) for layer in model._flatten_layers(include_self=True))


def scope_of(layer: keras.layers.Layer) -> contextlib.AbstractContextManager:
    """Simulated FP8 on while ``layer`` (and every layer it calls) computes, if its policy says FP8; otherwise
    the surrounding setting, unchanged (an FP8 block's sublayers follow it whatever their own policy)."""
    return fp8(True) if uses_fp8(layer) else contextlib.nullcontext()


class PrecisionOfPolicy:
    """Mixin for layers with FP8-aware matmuls: a :class:`SimulatedFP8Policy` switches simulated FP8 on for the
    layer's call, and survives ``from_config`` (Keras turns every non-quantized policy back into its name
    there, which would make an FP8 layer a float32 one on loading)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with scope_of(self):
            return super().__call__(*args, **kwargs)

    @classmethod
    def from_config(cls, config: dict) -> Any:
        dtype = config.get("dtype")
        if isinstance(dtype, dict) and dtype.get("class_name") == SimulatedFP8Policy.__name__:
            config = {**config, "dtype": keras.dtype_policies.deserialize(dtype)}
        return super().from_config(config)


def fp8_matmul_inputs(*tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """The operands of a matmul, rounded to E4M3 (straight-through gradient) when FP8 is on; else unchanged.

    Call it on the *unit-scaled* operands: a unit-scaled op applies its static scale α to the product (here
    folded into the kernel after rounding: α·(q(x)·q(W)) = q(x)·(α·q(W))), which is how an FP8 matmul with a
    fixed output scale computes — no scale is measured from the data.
    """
    if not _FP8:
        return tensors
    return tuple(quantize_e4m3(t) for t in tensors)


def fp8_matmul_output(y: tf.Tensor) -> tf.Tensor:
    """A matmul's (scaled) output; when FP8 is on, the gradient arriving at it is rounded to E5M2.

    That gradient is the operand of both backward matmuls (∂x = g·Wᵀ, ∂W = xᵀ·g), which therefore multiply
    an E5M2 gradient by the E4M3 forward operands, as FP8 training does.
    """
    return quantize_grad_e5m2(y) if _FP8 else y


def fp8_matmul(fn: Callable[..., tf.Tensor], a: tf.Tensor, b: tf.Tensor, **kwargs: Any) -> tf.Tensor:
    """``fn(a, b, **kwargs)`` (a matmul, einsum or convolution) with FP8 rounding around it when FP8 is on."""
    a, b = fp8_matmul_inputs(a, b)
    return fp8_matmul_output(fn(a, b, **kwargs))


# ------------------------------------------------------------------------------------------ process setting
def apply(precision: str) -> None:
    """Make ``precision`` (one of :data:`PRECISIONS`) the process-wide setting, as ``set_global_policy`` does.

    Sets the Keras global dtype policy (for fp8 :class:`SimulatedFP8Policy`, so the layers built next carry
    it) and the FP8 switch (for what is traced outside a layer, e.g. the loss). For float16 it also turns off Grappler's
    remapping pass: it fuses MatMul+BiasAdd into a oneDNN op that runs a float16 reference kernel ~1000×
    slower on CPU (FACTS); other precisions switch the pass back on.
    """
    if precision not in POLICIES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    keras.mixed_precision.set_global_policy(SimulatedFP8Policy() if precision == "fp8" else POLICIES[precision])
    set_fp8(precision == "fp8")
    tf.config.optimizer.set_experimental_options({"remapping": precision != "float16"})


@contextlib.contextmanager
def applied(precision: str) -> Iterator[None]:
    """:func:`apply` for the duration of the context (a whole training run: building, tracing, saving), then the
    previous global dtype policy, FP8 switch and Grappler remapping option back, so that a run's precision does
    not leak into what the process does next (another run, a model built by the caller)."""
    policy = keras.mixed_precision.global_policy()
    fp8_before = _FP8
    remapping = tf.config.optimizer.get_experimental_options().get("remapping", True)
    apply(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        set_fp8(fp8_before)
        tf.config.optimizer.set_experimental_options({"remapping": remapping})


def tensor_of(v: Any) -> tf.Tensor:
    """A Keras variable's value (custom gradients reject Keras variables in eager calls), else ``v`` itself
    (e.g. the kernel + LoRA delta that ``Dense.kernel`` returns once LoRA is on)."""
    return v.value if isinstance(v, keras.Variable) else v


# ------------------------------------------------------------------ stock Keras layers with FP8 matmuls
# The baseline in fp8 needs the same simulated casts in its matmuls, without any scaling. These subclasses of
# the stock layers differ from them only when FP8 is on at trace time (their own policy or a caller's); models.
# build_model uses them for the baseline only when it builds under FP8, so other baselines stay pure stock Keras.


@_register
class FP8Dense(PrecisionOfPolicy, keras.layers.Dense):
    """``keras.layers.Dense`` whose matmul is simulated FP8 when FP8 is on (E4M3 in, E5M2 gradient)."""

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if self.quantization_mode is not None:
            return super().call(inputs, training=training)
        x = fp8_matmul(tf.matmul, inputs, tensor_of(self.kernel))
        if self.bias is not None:
            x = x + tensor_of(self.bias)
        return self.activation(x) if self.activation is not None else x


@_register
class FP8EinsumDense(PrecisionOfPolicy, keras.layers.EinsumDense):
    """``keras.layers.EinsumDense`` (the projections of ``MultiHeadAttention``) with a simulated FP8 einsum."""

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if self.quantization_mode is not None:
            return super().call(inputs, training=training)
        x = fp8_matmul_output(tf.einsum(self.equation, *fp8_matmul_inputs(inputs, tensor_of(self.kernel))))
        if self.bias is not None:
            x = x + tensor_of(self.bias)
        return self.activation(x) if self.activation is not None else x


@_register
class FP8Conv1D(PrecisionOfPolicy, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with a simulated FP8 convolution (E4M3 in, E5M2 gradient) when FP8 is on."""

    def convolution_op(self, inputs: tf.Tensor, kernel: Any) -> tf.Tensor:
        inputs, kernel = fp8_matmul_inputs(inputs, tensor_of(kernel))
        return fp8_matmul_output(super().convolution_op(inputs, kernel))


@_register
class FP8MultiHeadAttention(PrecisionOfPolicy, keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` with simulated FP8 in all six matmuls when FP8 is on.

    The four projections become :class:`FP8EinsumDense` (same variables, same config); the attention is the
    stock explicit path (scores = einsum(k, q/√d), masked softmax, dropout, einsum(probs, v)) with both
    einsums in FP8 — the fused ``dot_product_attention`` kernel the stock layer uses without dropout has no
    place for the casts. Probabilities are rounded as they are (≈1/n each): stock attention has no unit scale.
    """

    def build(self, query_shape: tuple, value_shape: tuple, key_shape: tuple | None = None) -> None:
        super().build(query_shape, value_shape, key_shape)
        for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
            layer = getattr(self, name, None)
            if type(layer) is keras.layers.EinsumDense:
                layer.__class__ = FP8EinsumDense

    def _compute_attention(
        self,
        query: tf.Tensor,
        key: tf.Tensor,
        value: tf.Tensor,
        attention_mask: tf.Tensor | None = None,
        training: bool | None = None,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        if not _FP8 or len(query.shape) != 4:
            return super()._compute_attention(
                query, key, value, attention_mask, training, return_attention_scores, use_causal_mask
            )
        if use_causal_mask:
            causal = self._compute_causal_mask(query, value)
            attention_mask = causal if attention_mask is None else tf.logical_and(
                tf.cast(attention_mask, tf.bool), causal
            )
        def dropout(probs: tf.Tensor) -> tf.Tensor:
            return self._dropout_layer(probs, training=training) if self._dropout > 0.0 else probs

        return stock_attention(query, key, value, attention_mask, dropout)


def stock_attention(
    query: tf.Tensor,
    key: tf.Tensor,
    value: tf.Tensor,
    mask: tf.Tensor | None = None,
    dropout: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Stock multi-head attention's explicit path on (B, T, H, d) query and (B, S, H, d) key/value, as
    ``keras.layers.MultiHeadAttention`` computes it: p = softmax(q·kᵀ/√d masked), out = p·v (B, T, H, d);
    returns (out, p). mask: bool, broadcastable to (B, T, S), True where query t may see key s. With FP8 on,
    both matmuls take E4M3 operands (E5M2 gradients); probabilities are rounded as they are (no unit scale).
    Used by :class:`FP8MultiHeadAttention` and by the stock model's cached decoding."""
    query = query * tf.cast(1.0 / math.sqrt(int(query.shape[-1])), query.dtype)
    scores = fp8_matmul_output(tf.einsum("bshd,bthd->bhts", *fp8_matmul_inputs(key, query)))
    if mask is not None:
        visible = tf.expand_dims(tf.cast(mask, tf.bool), -3)  # (B, 1, T, S): every head
        scores = tf.where(visible, scores, tf.cast(scores.dtype.min, scores.dtype) * 0.5)
    probs = tf.nn.softmax(scores, axis=-1)
    dropped = probs if dropout is None else dropout(probs)
    out = fp8_matmul_output(tf.einsum("bhts,bshd->bthd", *fp8_matmul_inputs(dropped, value)))
    return out, probs
