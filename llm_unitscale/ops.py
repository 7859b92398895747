"""Unit-scaled operations: every scaling rule of llm_unitscale lives in this module.

Unit scaling (Blake, Orr, Luschi, ICML 2023; u-μP, 2024) gives each op a forward scale α and backward scales β
(one per input) so that, for unit-variance inputs and a unit-variance incoming gradient, the output and every
outgoing gradient are unit-variance too. Weights are initialised N(0, 1): the fan-in lives in the op, not in
the init. The primitive is :func:`scaled`::

    scaled(x, α, β):   forward y = α·x,   backward ∂L/∂x = β·∂L/∂y          (tf.custom_gradient)

Notation used in the docstrings: N = rows that share a weight in one step (batch × sequence positions),
V = vocabulary (or class) count, g = incoming gradient, d = width of a head.

Gradient consistency (DESIGN §3.1, invariant 2): wherever α ≠ β, every path through the op is rescaled by the
same β/α. That is harmless where all paths cross the op (loss, readout, weights — Adam is invariant to one
constant per tensor); inside a residual branch the ops trade scales so that each path multiplies to 1 and the
gradient leaving the branch is the true gradient (see :func:`mlp`, :func:`multi_head_attention`,
:func:`residual_add`). :func:`exact_gradients` switches every custom backward scale off (β := α), which is how the
tests compare against true autodiff gradients of the same forward maths.

Efficiency: a dense/conv op applies α to the *kernel* (a weight-sized multiply) rather than to the activations,
and the input-gradient rescale is skipped when β_x = α, so a square projection costs no extra activation-sized
work. Python-float scales are folded at trace time and ×1 multiplies are skipped.

Low precision: every matmul here (dense, readout, conv1d, both attention matmuls) passes its operands through
``precision.fp8_matmul_inputs`` (E4M3, straight-through) and its output through ``precision.fp8_matmul_output``
(E5M2 gradient). Both are no-ops unless simulated FP8 is on at trace time (``precision.set_fp8``); the rounding
rules live in :mod:`llm_unitscale.precision`. The operands are rounded at unit scale, *before* α is applied
(α·(q(x)·q(W)) is an FP8 matmul with a fixed output scale); attention rounds the probabilities times a power of
two known from n (:func:`fp8_prob_scale`), never the bare probabilities (≈1/n, below E4M3's range at long
context) nor n·softmax (a peaked row reaches n, which saturates E4M3 at n > 448).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from llm_unitscale.precision import fp8_enabled, fp8_matmul_inputs, fp8_matmul_output

Scale = float | tf.Tensor

_EXACT_GRADIENTS = False


@contextlib.contextmanager
def exact_gradients() -> Iterator[None]:
    """Within this context (at trace time) every op uses its true autodiff gradient (β := α).

    Used by tests to check that unit-scaled gradients equal the true gradient times the declared scales.
    """
    global _EXACT_GRADIENTS
    previous, _EXACT_GRADIENTS = _EXACT_GRADIENTS, True
    try:
        yield
    finally:
        _EXACT_GRADIENTS = previous


_FORWARD_ONLY = False


@contextlib.contextmanager
def forward_only() -> Iterator[None]:
    """Within this context (at trace time) matmul ops apply α to their output rows instead of to the weight.

    Same forward maths, α·(x·W) instead of x·(α·W), and no custom gradients (none are taken): for decoding one
    token the weight-sized multiply would cost more than the matmul itself (``decoding.py``'s cached step).
    """
    global _FORWARD_ONLY
    previous, _FORWARD_ONLY = _FORWARD_ONLY, True
    try:
        yield
    finally:
        _FORWARD_ONLY = previous


def _is_python_number(s: Scale) -> bool:
    return isinstance(s, (int, float))


def _as(s: Scale, dtype: tf.DType) -> Scale:
    """A scale ready to multiply a tensor of ``dtype`` (Python numbers are folded by TF as constants)."""
    return s if _is_python_number(s) else tf.cast(s, dtype)


def _mul(x: tf.Tensor, s: Scale) -> tf.Tensor:
    if _is_python_number(s) and s == 1:
        return x
    return x * _as(s, x.dtype)


def scaled(x: tf.Tensor, fwd: Scale, bwd: Scale) -> tf.Tensor:
    """Forward ``y = fwd·x``; backward ``∂x = bwd·g``. The primitive of unit scaling.

    Equal Python scales need no custom gradient (plain multiply, or nothing at all for 1).
    """
    if _EXACT_GRADIENTS:
        bwd = fwd
    if _is_python_number(fwd) and _is_python_number(bwd) and fwd == bwd:
        return _mul(x, fwd)

    @tf.custom_gradient
    def _scaled(t: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        def grad(g: tf.Tensor) -> tf.Tensor:
            return _mul(g, bwd)

        return _mul(t, fwd), grad

    return _scaled(x)


def scale_fwd(x: tf.Tensor, fwd: Scale) -> tf.Tensor:
    """Forward ``fwd·x``, gradient passed through unchanged."""
    return scaled(x, fwd, 1.0)


def scale_bwd(x: tf.Tensor, bwd: Scale) -> tf.Tensor:
    """Forward identity, gradient ``bwd·g``."""
    return scaled(x, 1.0, bwd)


class LateScale:
    """A backward scale that the forward pass computes *after* the op whose gradient it scales.

    Every backward pass runs after its whole forward pass, so an op early in the forward pass may multiply its
    gradient by a value that a later op sets: ``late = LateScale(); y = scale_bwd_late(x, late); …;
    late.set(value)``. The value is taken as a constant (no gradient flows into it).
    """

    def __init__(self) -> None:
        self.value: tf.Tensor | None = None

    def set(self, value: tf.Tensor) -> None:
        self.value = tf.stop_gradient(value)


def scale_bwd_late(x: tf.Tensor, late: LateScale, inverse: bool = False) -> tf.Tensor:
    """Forward identity, gradient ``v·g`` (``g/v`` with ``inverse``), v = ``late.value`` set later in the forward."""
    if _EXACT_GRADIENTS:
        return x

    @tf.custom_gradient
    def _late(t: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        def grad(g: tf.Tensor) -> tf.Tensor:
            if late.value is None:
                raise RuntimeError("a LateScale was used in a backward pass but never set in the forward pass")
            value = tf.cast(late.value, g.dtype)
            return g / value if inverse else g * value

        return tf.identity(t), grad

    return _late(x)


def rows(x: tf.Tensor) -> int | tf.Tensor:
    """N: how many rows of ``x`` (all axes but the last) share a weight in one step; static when known."""
    static = x.shape[:-1]
    if static.is_fully_defined():
        return max(int(np.prod(static)), 1)
    return tf.reduce_prod(tf.shape(x)[:-1])


def _matmul_rows(x: tf.Tensor, w: tf.Tensor, matmul_2d: Callable = tf.matmul) -> tf.Tensor:
    """``x·w`` for x (..., fan_in) and w (fan_in, fan_out), as one 2-D ``matmul_2d`` over the flattened rows.

    Same maths as ``tf.matmul(x, w)``; but on a rank-3 x that is a BatchMatMul broadcasting w, whose weight
    gradient is computed per batch element and then summed (a B-times larger intermediate and an extra pass),
    and which oneDNN runs slower than MatMul. Keras's Dense flattens the same way.
    """
    if len(x.shape) == 2:
        return matmul_2d(x, w)
    fan_in, fan_out = int(w.shape[0]), int(w.shape[1])
    y = matmul_2d(tf.reshape(x, [-1, fan_in]), w)
    lead = x.shape[:-1]
    if lead.is_fully_defined():
        return tf.reshape(y, [*lead.as_list(), fan_out])
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [fan_out]], axis=0))


def _weight_matmul(x: tf.Tensor, kernel: tf.Tensor, alpha: Scale, beta_w: Scale) -> tf.Tensor:
    """``x·(α·W)`` over the flattened rows; backward ∂x = g·(αW)ᵀ, ∂W = β_w·xᵀg.

    The same gradients as ``matmul(x, scaled(W, α, β_w))``, which is what float32 and bfloat16 (float32's
    range) compute. In float16, β_w (= N^-½) is applied to g *before* the weight-gradient matmul sums over the
    N rows, ∂W = xᵀ·(β_w·g), so its output stays near unit scale: after the sum, xᵀg has RMS ≈ √N × the
    unit-scaled result, which overflowed float16 (65504) at N = 8192 tokens per batch and made unit-scaled
    float16 training diverge (README, "More tokens per batch"). The other dtypes need no such protection and
    keep the plain form, which multiplies the weight-sized result rather than the activation-sized g.
    """
    if _EXACT_GRADIENTS or x.dtype != tf.float16:
        return _matmul_rows(x, scaled(kernel, alpha, beta_w))

    @tf.custom_gradient
    def _mm(rows_in: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        w = _mul(k, alpha)

        def grad(g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.matmul(g, w, transpose_b=True), tf.matmul(rows_in, _mul(g, beta_w), transpose_a=True)

        return tf.matmul(rows_in, w), grad

    return _matmul_rows(x, kernel, _mm)


def _forward_matmul(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None, alpha: float, bias_scale: float
                    ) -> tf.Tensor:
    """Forward-only dense: ``α·(x·W) + bias_scale·b`` (see :func:`forward_only`), with simulated FP8 if on."""
    x, kernel = fp8_matmul_inputs(x, kernel)
    y = _mul(_matmul_rows(x, kernel), alpha)
    return y if bias is None else y + _mul(bias, bias_scale)


def rsqrt(n: int | float | tf.Tensor) -> Scale:
    """n^-½, as a Python float when n is static."""
    if _is_python_number(n):
        return 1.0 / math.sqrt(n)
    return tf.math.rsqrt(tf.cast(n, tf.float32))


# --------------------------------------------------------------------------------------------- linear maps
def dense(
    x: tf.Tensor,
    kernel: tf.Tensor,
    bias: tf.Tensor | None = None,
    *,
    fwd_scale: Scale | None = None,
    grad_input_scale: Scale | None = None,
    grad_weight_scale: Scale = 1.0,
) -> tf.Tensor:
    """Unit-scaled dense layer ``y = α·(xW + b)`` with W of shape (fan_in, fan_out).

    forward  α = fan_in^-½
    backward ∂x = β_x·gWᵀ with β_x = fan_out^-½;  ∂W = N^-½·xᵀg,  ∂b = N^-½·Σg  (times ``grad_weight_scale``)

    α is applied to the kernel (W' = scaled(W, α, N^-½)), so the forward pass costs one weight-sized multiply,
    and ∂x is rescaled by β_x/α only where β_x ≠ α (never for a square kernel).
    """
    fan_in, fan_out = int(kernel.shape[0]), int(kernel.shape[1])
    alpha = fan_in**-0.5 if fwd_scale is None else fwd_scale
    if _FORWARD_ONLY:
        return _forward_matmul(x, kernel, bias, alpha, alpha)
    beta_x = fan_out**-0.5 if grad_input_scale is None else grad_input_scale
    beta_w = _times(rsqrt(rows(x)), grad_weight_scale)
    x = scale_bwd(x, _ratio(beta_x, alpha))
    x, kernel = fp8_matmul_inputs(x, kernel)  # simulated FP8 (precision.py): no-op unless on
    y = fp8_matmul_output(_weight_matmul(x, kernel, alpha, beta_w))
    if bias is not None:
        y = y + scaled(bias, alpha, beta_w)
    return y


def readout(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None, kernel_scale: float = 1.0) -> tf.Tensor:
    """Unit-scaled readout to V logits: ``y = α·xW + b``.

    forward  α = fan_in^-½ (as a dense layer; the u-μP alternative α = 1/fan_in is another way to start
             the logits small). The bias b is added unscaled: it holds each output's log-prior (a word's
             unigram log-frequency spans several nats), which an α-scaled bias could only reach with
             steps ~√fan_in times larger.
    backward ∂x = β_x·gWᵀ with β_x = V^-½ / kernel_scale; ∂W = N^-½·xᵀg; ∂b = N^-½·Σg.
    kernel_scale: the RMS the kernel was initialised at (UnitReadout starts it small, see there): dividing ∂x
    by it makes upstream gradients start at unit scale. All paths cross the readout, so its α ≠ β only
    rescales upstream gradients by one constant.
    """
    fan_in, fan_out = int(kernel.shape[0]), int(kernel.shape[1])
    alpha = fan_in**-0.5
    if _FORWARD_ONLY:
        return _forward_matmul(x, kernel, None if bias is None else tf.cast(bias, x.dtype), alpha, 1.0)
    beta_w = rsqrt(rows(x))
    x = scale_bwd(x, _ratio(fan_out**-0.5 / kernel_scale, alpha))
    x, kernel = fp8_matmul_inputs(x, kernel)
    y = fp8_matmul_output(_weight_matmul(x, kernel, alpha, beta_w))
    if bias is not None:
        y = y + scale_bwd(tf.cast(bias, y.dtype), beta_w)
    return y


def embedding(ids: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """Unit-scaled embedding lookup ``y = W[ids]`` for a table W of shape (V, d).

    backward ∂W = √(V/N)·scatter(g): each row collects N/V gradients on average, so this makes ∂W unit-RMS.
    Applied on the gathered rows' gradient (dense, (N, d)) rather than on the sparse table gradient.
    """
    vocab = int(table.shape[0])
    out = tf.gather(table, ids)
    n = rows(out)
    scale = math.sqrt(vocab / n) if _is_python_number(n) else tf.sqrt(vocab / tf.cast(n, tf.float32))
    return scale_bwd(out, scale)


def conv1d(
    x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None, padding: str = "causal", dilation_rate: int = 1
) -> tf.Tensor:
    """Unit-scaled 1-D convolution over (B, T, C_in) with kernel (K, C_in, C_out).

    forward  α = (K·C_in)^-½
    backward ∂x = β_x·conv_transpose(g) with β_x = (K·C_out)^-½; ∂W = N^-½·(…), ∂b = N^-½·Σg, N = B·T_out
    padding: "causal" (left pad (K−1)·dilation: output t sees inputs ≤ t), "same" or "valid".
    """
    k, c_in, c_out = (int(s) for s in kernel.shape)
    alpha = (k * c_in) ** -0.5
    beta_x = (k * c_out) ** -0.5
    if padding == "causal":
        x = tf.pad(x, [[0, 0], [(k - 1) * dilation_rate, 0], [0, 0]])
        tf_padding = "VALID"
    elif padding in ("same", "valid"):
        tf_padding = padding.upper()
    else:
        raise ValueError(f"padding must be 'causal', 'same' or 'valid', got {padding!r}")
    x = scale_bwd(x, _ratio(beta_x, alpha))
    n_out = _conv_rows(x, k, dilation_rate, tf_padding)
    beta_w = rsqrt(n_out)
    x, kernel = fp8_matmul_inputs(x, kernel)
    y = fp8_matmul_output(_weight_conv(x, kernel, alpha, beta_w, tf_padding, dilation_rate))
    if bias is not None:
        y = y + scaled(bias, alpha, beta_w)
    return y


def _weight_conv(x: tf.Tensor, kernel: tf.Tensor, alpha: float, beta_w: Scale, padding: str, dilation: int
                 ) -> tf.Tensor:
    """``conv1d(x, α·W)``; backward ∂x = conv_transpose(g, αW), ∂W = β_w·filter_grad(x, g).

    As :func:`_weight_matmul`: float16 applies β_w (= N^-½) to g *before* the filter gradient sums over the N
    output rows, so the sum stays near unit scale instead of √N times it (which overflows float16's 65504 at a
    few thousand correlated rows): the output's gradient is scaled by β_w and the input's by 1/β_w, which
    leaves ∂x exact. The convolution itself, forward and backward, then runs in float32 on the float16 values
    (float16 storage, float32 sums, as GPU tensor cores do): TensorFlow's float16 CPU kernels sum in float16,
    which lost 9 % of an 8,190-row filter gradient on an AMD EPYC (tests/test_ops.py). The other dtypes keep
    ``conv1d(x, scaled(W, α, β_w))``.
    """
    if _EXACT_GRADIENTS or x.dtype != tf.float16:
        return tf.nn.conv1d(x, scaled(kernel, alpha, beta_w), stride=1, padding=padding, dilations=dilation)
    x = scale_bwd(x, 1.0 / beta_w if _is_python_number(beta_w) else tf.math.reciprocal(beta_w))
    w = scaled(kernel, alpha, 1.0)
    y = tf.nn.conv1d(tf.cast(x, tf.float32), tf.cast(w, tf.float32), stride=1, padding=padding, dilations=dilation)
    return scale_bwd(tf.cast(y, tf.float16), beta_w)


def _conv_rows(x: tf.Tensor, k: int, dilation: int, padding: str) -> int | tf.Tensor:
    """B·T_out for a stride-1 convolution of ``x`` (already padded for causal)."""
    shrink = 0 if padding == "SAME" else (k - 1) * dilation
    b, t = x.shape[0], x.shape[1]
    if b is not None and t is not None:
        return max(b * (t - shrink), 1)
    shape = tf.shape(x)
    return shape[0] * (shape[1] - shrink)


# ------------------------------------------------------------------------------------------- nonlinearities
# name -> (function, α = 1/std(f(x)), β = 1/rms(f'(x))) for x ~ N(0, 1) (numerical integration; the values of
# the Unit Scaling paper). Forward normalises the *variance*: sigmoid's output keeps its mean 0.5, so its RMS
# is ≈ 2.6 — the one documented exception to "RMS ≈ 1" among activations.
_ACTIVATIONS: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], float, float]] = {
    "relu": (tf.nn.relu, 1.7129, 1.4142),
    "gelu": (functools.partial(tf.nn.gelu, approximate=True), 1.7009, 1.4811),
    "tanh": (tf.math.tanh, 1.5925, 1.4674),
    "sigmoid": (tf.math.sigmoid, 4.8013, 4.7226),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def activation(x: tf.Tensor, name: str, constrain: bool = False) -> tf.Tensor:
    """Unit-scaled activation ``y = α·f(x)``, ``∂x = β·f'(x)·g`` (α, β in ``_ACTIVATIONS``).

    constrain=True uses one scale √(α·β) both ways (the exact gradient): required inside a residual branch,
    where α ≠ β would weight the branch differently from its skip in the backward pass (gelu: ~8 %).
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    fn, alpha, beta = _ACTIVATIONS[name]
    if constrain:
        alpha = beta = math.sqrt(alpha * beta)
    return scaled(fn(x), alpha, beta)


def relu(x: tf.Tensor, constrain: bool = False) -> tf.Tensor:
    """``1.712·relu(x)`` (= √(2/(1−1/π))), backward ``1.414`` (= √2)."""
    return activation(x, "relu", constrain)


def gelu(x: tf.Tensor, constrain: bool = False) -> tf.Tensor:
    """``1.70·gelu(x)``, backward ``1.48``; constrained: ``1.59`` both ways."""
    return activation(x, "gelu", constrain)


def tanh(x: tf.Tensor, constrain: bool = False) -> tf.Tensor:
    """``1.593·tanh(x)``, backward ``1.467``."""
    return activation(x, "tanh", constrain)


def sigmoid(x: tf.Tensor, constrain: bool = False) -> tf.Tensor:
    """``4.802·sigmoid(x)``, backward ``4.722`` (unit *variance*; the output keeps its mean of 0.5)."""
    return activation(x, "sigmoid", constrain)


def softmax(x: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """``n·softmax(x)`` over an axis of length n, both ways (exact gradient).

    Near-uniform inputs give probabilities ≈ 1/n, so the scale n brings output and gradient to unit RMS.
    """
    n = x.shape[axis]
    return _mul(tf.nn.softmax(x, axis=axis), float(n) if n is not None else tf.cast(tf.shape(x)[axis], x.dtype))


# ------------------------------------------------------------------------------------------------------ loss
def softmax_cross_entropy(logits: tf.Tensor, targets: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
    """Per-target cross-entropy whose mean is the mean over unmasked targets, with a unit-scaled gradient.

    forward  ℓ_i = m_i·(N/n)·CE(x_i, t_i)          (N targets, n = Σ m_i of them counted; masked ℓ_i = 0)
    backward ∂x_i = m_i·N·g_i·V/√(V−1)·(softmax(x_i) − onehot(t_i))      (g_i = ∂L/∂ℓ_i)

    The values are meant to be averaged, as Keras's "sum_over_batch_size" reduction does: mean_i ℓ_i =
    Σ m·CE / n, the mean over counted targets (the N/n weight is Keras's own for a masked loss,
    ``keras.src.losses.loss.apply_mask``), and then g_i = 1/N, so ∂x_i = m_i·V/√(V−1)·(softmax − onehot): at
    init (softmax ≈ uniform) softmax − onehot has RMS √(V−1)/V per logit, so ∂x is unit-RMS per target. A
    sample weight w_i (g_i = w_i/N) multiplies its target's gradient by w_i; R replicas (g_i = 1/(N·R)) give
    each replica 1/R of it, as for any Keras loss. Against the true gradient of mean ℓ the backward is
    n·V/√(V−1) times larger. The loss is computed in float32 whatever the logits' dtype.
    """
    vocab = int(logits.shape[-1])
    targets = tf.cast(targets, tf.int32)
    m = tf.ones_like(targets, tf.float32) if mask is None else tf.cast(mask, tf.float32)
    safe_targets = tf.where(m > 0, targets, tf.zeros_like(targets))
    exact = _EXACT_GRADIENTS

    @tf.custom_gradient
    def _loss(x: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        x32 = tf.cast(x, tf.float32)
        # the fused kernel returns softmax(x) − onehot(t) (its "backprop") with the loss: reuse it in grad
        # rather than recomputing softmax and the one-hot (flattened: the raw op takes (N, V) and (N,))
        ce, delta = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=tf.reshape(x32, [-1, vocab]), labels=tf.reshape(safe_targets, [-1])
        )
        total = tf.cast(tf.size(m), tf.float32)
        weight = m * (total / tf.maximum(tf.reduce_sum(m), 1.0))
        values = tf.reshape(ce, tf.shape(safe_targets)) * weight

        def grad(g: tf.Tensor) -> tf.Tensor:
            per_target = weight if exact else m * total * (vocab / math.sqrt(max(vocab - 1, 1)))
            dx = delta * tf.reshape(per_target * tf.cast(g, tf.float32), [-1, 1])
            return tf.cast(tf.reshape(dx, tf.shape(x)), x.dtype)

        return values, grad

    return _loss(logits)


# ---------------------------------------------------------------------------------------------------- norms
def layer_norm(x: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor | None, epsilon: float = 1e-5) -> tf.Tensor:
    """Layer norm ``y = γ·(x − μ)/σ + β`` (no β when ``bias`` is None) with a closed-form backward (in float32).

    backward ∂x exact: (1/σ)·(gγ − mean(gγ) − x̂·mean(gγ·x̂));  ∂γ = N^-½·Σ g·x̂,  ∂β = N^-½·Σ g.
    """
    return _norm(x, gain, bias, epsilon, center=True)


def rms_norm(x: tf.Tensor, gain: tf.Tensor, epsilon: float = 1e-5) -> tf.Tensor:
    """RMS norm ``y = γ·x/rms(x)``; backward ∂x exact: (1/r)·(gγ − x̂·mean(gγ·x̂)); ∂γ = N^-½·Σ g·x̂."""
    return _norm(x, gain, None, epsilon, center=False)


def _norm(x: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor | None, epsilon: float, center: bool) -> tf.Tensor:
    beta_w = 1.0 if _EXACT_GRADIENTS else rsqrt(rows(x))
    reduce_axes = list(range(len(x.shape) - 1))

    def forward(t: tf.Tensor, gamma: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        t32 = tf.cast(t, tf.float32)
        if center:
            t32 = t32 - tf.reduce_mean(t32, axis=-1, keepdims=True)
        inv = tf.math.rsqrt(tf.reduce_mean(tf.square(t32), axis=-1, keepdims=True) + epsilon)
        xhat = t32 * inv
        return xhat, inv, xhat * tf.cast(gamma, tf.float32)

    def backward(g: tf.Tensor, xhat: tf.Tensor, inv: tf.Tensor, gamma: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        g32 = tf.cast(g, tf.float32)
        gg = g32 * tf.cast(gamma, tf.float32)
        dx = gg - xhat * tf.reduce_mean(gg * xhat, axis=-1, keepdims=True)
        if center:
            dx = dx - tf.reduce_mean(gg, axis=-1, keepdims=True)
        dgain = _mul(tf.reduce_sum(g32 * xhat, axis=reduce_axes), beta_w)
        return dx * inv, dgain

    if bias is None:

        @tf.custom_gradient
        def _rms(t: tf.Tensor, gamma: tf.Tensor) -> tuple[tf.Tensor, Callable]:
            xhat, inv, y = forward(t, gamma)

            def grad(g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                dx, dgain = backward(g, xhat, inv, gamma)
                return tf.cast(dx, t.dtype), tf.cast(dgain, gamma.dtype)

            return tf.cast(y, t.dtype), grad

        return _rms(x, gain)

    @tf.custom_gradient
    def _ln(t: tf.Tensor, gamma: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        xhat, inv, y = forward(t, gamma)

        def grad(g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            dx, dgain = backward(g, xhat, inv, gamma)
            dbias = _mul(tf.reduce_sum(tf.cast(g, tf.float32), axis=reduce_axes), beta_w)
            return tf.cast(dx, t.dtype), tf.cast(dgain, gamma.dtype), tf.cast(dbias, b.dtype)

        return tf.cast(y + tf.cast(b, tf.float32), t.dtype), grad

    return _ln(x, gain, bias)


# ------------------------------------------------------------------------------------------ combining paths
def residual_add(x: tf.Tensor, branch: Callable[[tf.Tensor], tf.Tensor], tau: float) -> tf.Tensor:
    """Residual connection ``y = (τ·f(x) + x)/√(1+τ²)`` around the callable ``branch`` f.

    With a = τ/√(1+τ²), b = 1/√(1+τ²): forward y = a·f(x) + b·x keeps unit scale for unit f(x) and x.
    backward: the branch's interior sees g itself (×1/a compared with autodiff, so its weights get unit
    gradients), and the gradient leaving the branch is multiplied by a again: ∂x = b·g + a·J_fᵀg, exact.
    """
    a = tau / math.sqrt(1.0 + tau * tau)
    b = 1.0 / math.sqrt(1.0 + tau * tau)
    f = branch(scale_bwd(x, a))
    return scale_fwd(f, a) + _mul(x, b)


def residual_taus(depth: int, residual_mult: float = 1.0, attention_ratio: float = 1.0) -> list[tuple[float, float]]:
    """Depth-aware residual weights (τ_attention, τ_mlp) for each of ``depth`` pre-norm blocks (u-μP, App. G).

    Branch k of the 2·depth branches (attention, MLP, attention, …) is added as y = (x + τ_k·f_k)/√(1+τ_k²).
    Give branch k the variance weight c_k² (c_mlp = m·√(2/(1+r²)), c_attn = r·c_mlp, with m = residual_mult,
    r = attention_ratio) and the embedding the weight L = depth; then

        τ_k = c_k / √(L + Σ_{j<k} c_j²)

    keeps every earlier term's *share* of the stream fixed when branch k is added. At the top the embedding's
    share is 1/(1 + c_attn² + c_mlp²) = 1/(1 + 2m²) for every depth (1/3 at m = 1), and each branch's is
    c_k²/(L·(1 + 2m²)): the shares of the embedding, of all attention and of all MLP branches are independent of
    depth, and each branch's τ falls as L^-½, the depth-μP branch multiplier (which is what the depth^-½
    learning-rate factor of ``optimizers.umup_multipliers`` assumes). r < 1 weights attention below the MLPs.
    A fixed τ instead gives the embedding a share of (1+τ²)^-2L: 0.17 at depth 4, 0.005 at depth 12 for τ = ½.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    c_mlp = residual_mult * math.sqrt(2.0 / (1.0 + attention_ratio**2))
    c_attn = attention_ratio * c_mlp
    weight, taus = float(depth), []
    for _ in range(depth):
        tau_attn = c_attn / math.sqrt(weight)
        weight += c_attn**2
        tau_mlp = c_mlp / math.sqrt(weight)
        weight += c_mlp**2
        taus.append((tau_attn, tau_mlp))
    return taus


def add(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Sum of two independent unit tensors, ``2^-½·(a + b)`` both ways (exact)."""
    return (a + b) * math.sqrt(0.5)


def dropout(x: tf.Tensor, rate: float, training: bool = False, seed: keras.random.SeedGenerator | None = None,
            noise_shape: tuple | None = None) -> tf.Tensor:
    """``√(1−p)·dropout(x)``, i.e. kept values × (1−p)^-½ (not (1−p)^-1): preserves RMS; gradient exact.
    ``noise_shape``: as in ``keras.random.dropout`` (a mask shared along the axes of size 1)."""
    if not training or rate <= 0.0:
        return x
    return keras.random.dropout(x, rate, noise_shape=noise_shape, seed=seed) * math.sqrt(1.0 - rate)


# ---------------------------------------------------------------------------------------------- attention
def attention_grad_scale(head_dim: int) -> float:
    """Extra scale c on ∂q, ∂k inside :func:`attention`: c = √d.

    With logits q·kᵀ/d and unit q, k, attention at init is near-uniform and its true ∂q, ∂k have RMS ≈ d^-½
    (the reference library's 0.11 at d = 64 with a fixed output scale). Multiplying them by √d brings them to
    ≈ 1; :func:`multi_head_attention` divides the q/k projections' input gradients by the same c, so only the
    q/k *weight* gradients keep the factor (a cut edge) and the gradient leaving the block stays exact.
    """
    return math.sqrt(head_dim)


def shared_source_factor(mean_count: tf.Tensor, source_width: int) -> tf.Tensor:
    """√(1 + n̄/w): how much larger than the independent-input estimate the q/k weight gradients are when q, k
    and v are projected from the same x (self-attention), under a normalising rule ("joint_norm", "norm").
    n̄ = the mean number of keys a query sees ((T+1)/2 when causal), w = the width of x.

    Why: the rule divides o_i by its RMS ≈ √Σp² ≈ n_i^-½, so ∂o_i ≈ √n_i·∂y_i. Through the logits,
    ∂k_j ∋ (c/d)·Σ_{i≥j} p_ij (∂o_i·v_j) q_i with v_j = w^-½·x_j W_v, so x_jᵀ∂k_j holds a part that does not
    average out over j: E[x_jᵀx_j] = I gives (c/d)·w^-½·Σ_i (W_v ∂o_iᵀ) q_i after Σ_j p_ij = 1, whose entries
    have variance (1/(d·w))·d·Σ_i n_i, i.e. n̄/w after the weight gradient's N^-½; and ∂q_i = (c/d)·Σ_j
    p_ij (∂o_i·v_j) k_j + … gains, through the same E[x_jᵀx_j], a part (c/d)·w^-1·∂o_i W_vᵀW_k of variance
    n_i/w. So rms(∂W_q)² ≈ rms(∂W_k)² ≈ 1 + n̄/w; measured at
    init (tests/test_depth.py): 1.38 / 2.15 / 2.90 at T = 256 / 1024 / 2048, w = 128, for 1.41 / 2.24 / 3.0
    predicted, independent of the head size and the batch. Dividing c by this factor keeps the q/k weight
    gradients unit at any length; the projections' input gradients are divided by the same c, so ∂x stays
    exact.
    """
    return tf.sqrt(1.0 + tf.cast(mean_count, tf.float32) / float(source_width))


#: How attention's output is brought to unit scale (:func:`attention_output`).
ATTENTION_RULES = ("joint_norm", "norm", "sqrt_n", "none")
#: The axes of o (B, H, T, d) over which a normalising rule takes its mean square.
_NORM_AXES = {"joint_norm": (1, 3), "norm": (3,)}
#: Largest power of two that n·softmax is scaled to before E4M3 rounding: a one-hot row stays below 448.
_FP8_PROB_SCALE_MAX = 256.0


def attention_output(o: tf.Tensor, count: tf.Tensor, rule: str = "joint_norm", epsilon: float = 1e-6) -> tf.Tensor:
    """Bring o = Σ_j p_j·v_j, the attention output (B, H, T, d) of every head at every query position, to unit scale.

    A convex combination of values has variance Σ_ij p_i p_j C_ij, where C is the covariance of the values.
    For independent unit values that is Σ_j p_j², which is 1/n for the flat attention of a fresh model (n = the
    keys the query may see), hence the classic √n rule ("sqrt_n"). But from the second block on, the values
    of different positions are correlated — they carry earlier attention outputs, averages over shared prefixes
    — and the variance becomes ρ + (1−ρ)/n: √n then amplifies by up to √(1 + nρ) (measured at init: residual RMS
    2.6 after 4 blocks at T = 64 and 15 at T = 2048), and the attention branch drowns its residual stream. No rule
    on p or n alone can know ρ, so the normalising rules measure it:

        "joint_norm"  o / √(mean_{h,d} o² + ε)   one RMS over all heads at each position (the default): the
                  attention output of every position is exactly unit at every block, length and attention
                  pattern, at init and during training, while the heads keep their sizes relative to each
                  other — a head whose attention averages many unrelated values stays small beside one that
                  found its key, instead of being raised to unit RMS like it. Backward: autodiff, exact.
        "norm"    o / √(mean_d o² + ε)   per head and position (a head-wise RMS norm without gain, as in RetNet
                  and the Differential Transformer): every head at unit RMS everywhere (the rule of models saved
                  before "joint_norm"; they keep it).
        "sqrt_n"  √n·o: unit for independent values only (the rule of earlier versions; old models keep it).
        "none"    o: stock attention (RMS √Σp², about n^-½ at init): not unit-scaled, for comparison only.

    For both normalising rules, at init ∂v_j has variance Σ_{i≥j} 1/n_i ≈ ln(T/j), RMS ≈ 1 over j.
    count: n per query position, broadcastable to o's (…, T, 1).
    """
    if rule in _NORM_AXES:
        return o * tf.math.rsqrt(tf.reduce_mean(tf.square(o), axis=_NORM_AXES[rule], keepdims=True) + epsilon)
    if rule == "sqrt_n":
        return o * tf.sqrt(count)
    if rule == "none":
        return o
    raise ValueError(f"attention rule must be one of {ATTENTION_RULES}, got {rule!r}")


def fp8_prob_scale(count: tf.Tensor) -> tf.Tensor:
    """The power of two s = 2^min(⌊log2 n⌋, 8) by which probabilities are multiplied before E4M3 rounding.

    A flat row (p = 1/n) becomes s/n ∈ (½, 1] for n ≤ 256 and ≥ 2^-6 (E4M3's smallest normal) for n ≤ 16384; a
    one-hot row becomes s ≤ 256 < 448 (E4M3's largest value) at every length. s depends only on n, not on data,
    and multiplying by a power of two is exact.
    """
    exponent = tf.minimum(tf.floor(tf.math.log(count) / math.log(2.0)), math.log2(_FP8_PROB_SCALE_MAX))
    return tf.pow(tf.constant(2.0, count.dtype), exponent)


def attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    causal: bool = True,
    padding_mask: tf.Tensor | None = None,
    qk_grad_scale: float = 1.0,
    rule: str = "joint_norm",
    qk_grad: LateScale | None = None,
    source_width: int | None = None,
    attention_mask: tf.Tensor | None = None,
) -> tf.Tensor:
    """Unit-scaled scaled-dot-product attention on (B, H, T, d) tensors.

    forward  o_i = unit(Σ_j softmax_j(q_i·k_jᵀ/d + mask)·v_j), with ``unit`` = :func:`attention_output`'s
             ``rule`` and n_i the number of keys query i may see (i+1 when causal; valid keys with a padding
             mask (B, T_k); those an ``attention_mask`` (B, T_q, T_k) allows, on top). Every rule is per
             position, so a cached, token-by-token decode gives the same outputs.
    backward exact for v; ∂q and ∂k are exact times ``qk_grad_scale`` (see :func:`attention_grad_scale`; 1 leaves
             the op exact) — or, with ``qk_grad`` (a normalising rule), times c = ``qk_grad_scale``·f̄, set into
             ``qk_grad`` so that the caller can divide its input gradient by the same c (:func:`multi_head_attention`).
             f̄ = mean_i r_i/√Σ_j p_ij², r_i = the output RMS the rule divides by: √Σp² is what r_i would be
             for independent values (its mean square over the heads for "joint_norm"), and when the values are
             correlated the norm divides by a larger r_i and every gradient reaching p shrinks by that ratio
             (measured at init, depth 12, T = 512: q/k weight gradients 0.15–0.4 after block 0 without f̄,
             1.3–1.5 with it). With ``source_width`` w (the width x had before q, k, v were projected from
             it), c is further divided by :func:`shared_source_factor`.
    The 1/d logit scale (u-μP) rather than 1/√d keeps attention near-uniform at init for any width.
    Simulated FP8: q and k are rounded at unit scale; the probabilities are rounded after scaling by
    :func:`fp8_prob_scale` (never saturating, whatever the length), and the product divided by it again.
    """
    head_dim = int(q.shape[-1])
    adapt = qk_grad is not None and rule in _NORM_AXES and not _EXACT_GRADIENTS
    if adapt:
        q, k = scale_bwd_late(q, qk_grad), scale_bwd_late(k, qk_grad)
    else:
        q, k = scale_bwd(q, qk_grad_scale), scale_bwd(k, qk_grad_scale)
    q, k = fp8_matmul_inputs(q, k)
    scores = fp8_matmul_output(tf.matmul(q, k, transpose_b=True) * (1.0 / head_dim))
    t_q, t_k = tf.shape(q)[2], tf.shape(k)[2]
    visible = None
    if causal:
        # query i (of the last t_q positions) sees keys j <= i + (t_k − t_q)
        row = tf.range(t_q)[:, None] + (t_k - t_q)
        visible = tf.range(t_k)[None, :] <= row
        visible = visible[None, None]
    if padding_mask is not None:
        keys = tf.cast(padding_mask, tf.bool)[:, None, None, :]
        visible = keys if visible is None else tf.logical_and(visible, keys)
    if attention_mask is not None:
        pairs = tf.cast(attention_mask, tf.bool)[:, None]
        visible = pairs if visible is None else tf.logical_and(visible, pairs)
    if visible is None:
        count = tf.cast(t_k, scores.dtype)
        probs = tf.nn.softmax(scores, axis=-1)
    else:
        # the mask stays (1|B, 1, t_q, t_k) and broadcasts in the select; n_i is summed over it, not over a
        # (B, H, t_q, t_k) copy (B·H times less work, same values)
        scores = tf.where(visible, scores, tf.cast(scores.dtype.min, scores.dtype) * 0.5)
        probs = tf.nn.softmax(scores, axis=-1)
        count = tf.maximum(tf.reduce_sum(tf.cast(visible, scores.dtype), axis=-1, keepdims=True), 1.0)
    if fp8_enabled():
        s = fp8_prob_scale(count)
        probs_q, v = fp8_matmul_inputs(probs * s, v)
        o = fp8_matmul_output(tf.matmul(probs_q, v)) / s
    else:
        o = tf.matmul(probs, v)
    if adapt:
        # the RMS the rule divides by, against what it would be for independent values (√Σp², mean square
        # over the heads the rule pools)
        axes = _NORM_AXES[rule]
        independent = tf.sqrt(tf.reduce_mean(tf.reduce_sum(tf.square(probs), axis=-1, keepdims=True),
                                             axis=axes[:-1], keepdims=True))
        actual = tf.sqrt(tf.reduce_mean(tf.square(o), axis=axes, keepdims=True) + 1e-6)
        late = qk_grad_scale * _global_mean(tf.reduce_mean(actual / independent))
        if source_width is not None:
            late = late / tf.cast(shared_source_factor(_global_mean(tf.reduce_mean(count)), source_width), late.dtype)
        qk_grad.set(late)
    return attention_output(o, count, rule)


def _global_mean(value: tf.Tensor) -> tf.Tensor:
    """The mean of a per-replica batch statistic over all replicas (itself without a distribution strategy),
    so that a data-parallel run scales its gradients by the same constant as one replica with the whole batch
    (replicas hold equal shares of it)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, value)


def cached_attention(
    q: tf.Tensor,
    k_cache: tf.Tensor,
    v_cache: tf.Tensor,
    k_new: tf.Tensor,
    v_new: tf.Tensor,
    start: tf.Tensor | int,
    rule: str = "joint_norm",
) -> tf.Tensor:
    """Causal :func:`attention` of T new rows at positions p…p+T−1 over a key/value cache that holds positions
    0…p−1, plus the new rows' own keys (forward only: decoding).

    q, k_new, v_new: (B, H, T, d); k_cache, v_cache: (B, H, S, d), rows ≥ p ignored whatever they hold;
    start: p. Query i sees the cache rows j < p and the new rows t ≤ i, n_i = p + i + 1 keys:

        o_i = unit(Σ_j softmax_j(q_i·k_j/d) · v_j)        (``unit`` = :func:`attention_output` with ``rule``)

    — rows p…p+T−1 of :func:`attention`'s causal output over the whole sequence (a prefill is p = 0, a decode
    step T = 1). The cache is only read: the two score blocks (cache, new rows) are joined, not the caches, so
    a step costs no cache-sized copy (concatenating or writing the keys first would copy every cache per token).
    Simulated FP8 rounds the same operands as :func:`attention`.
    """
    inv_d = 1.0 / int(q.shape[-1])
    t_new, length = tf.shape(q)[2], tf.shape(k_cache)[2]
    start = tf.cast(start, tf.int32)
    q_r, k_cache_r, k_new_r = fp8_matmul_inputs(q, k_cache, k_new)
    old = fp8_matmul_output(tf.matmul(q_r, k_cache_r, transpose_b=True) * inv_d)  # (B, H, T, S)
    new = fp8_matmul_output(tf.matmul(q_r, k_new_r, transpose_b=True) * inv_d)  # (B, H, T, T)
    floor = tf.cast(old.dtype.min, old.dtype) * 0.5
    old = tf.where((tf.range(length) < start)[None, None, None, :], old, floor)
    new = tf.where((tf.range(t_new)[None, :] <= tf.range(t_new)[:, None])[None, None], new, floor)
    probs = tf.nn.softmax(tf.concat([old, new], axis=-1), axis=-1)
    count = tf.cast(start + tf.range(t_new) + 1, q.dtype)[:, None]  # (T, 1)
    p_old, p_new = probs[..., :length], probs[..., length:]
    if fp8_enabled():
        s = fp8_prob_scale(count)
        p_old, v_cache = fp8_matmul_inputs(p_old * s, v_cache)
        p_new, v_new = fp8_matmul_inputs(p_new * s, v_new)
        o = fp8_matmul_output(tf.matmul(p_old, v_cache) + tf.matmul(p_new, v_new)) / s
    else:
        o = tf.matmul(p_old, v_cache) + tf.matmul(p_new, v_new)
    return attention_output(o, count, rule)


def multi_head_attention(
    x: tf.Tensor,
    kernels: tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor],
    biases: tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor] | None,
    num_heads: int,
    causal: bool = True,
    padding_mask: tf.Tensor | None = None,
    rule: str = "joint_norm",
    output_gain: tf.Tensor | None = None,
    cache: tuple[tf.Tensor, tf.Tensor] | None = None,
    cache_update_index: tf.Tensor | int | None = None,
    attention_mask: tf.Tensor | None = None,
) -> tf.Tensor | tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
    """Self-attention block: q, k, v = dense(x); o = dense(γ ⊙ concat_heads(attention(q, k, v))) (``rule``: see
    :func:`attention_output`; γ = ``output_gain``, one per channel, or none). ``attention_mask`` (B, T, T):
    True where query i may see key j, on top of ``causal`` and ``padding_mask`` (:func:`attention`).

    With a ``cache`` (keys, values), each (B, H, S, d_head), holding positions 0…p−1 and
    ``cache_update_index`` = p, x holds the T rows at positions p…p+T−1 and attention is
    :func:`cached_attention` over the cache and those rows (decoding: a prefill is p = 0 with any cache, a step
    T = 1). Returns (output, (k, v)) — the new rows' keys and values, (B, H, T, d_head), for the caller to write
    at rows p…p+T−1 (in place, into cache variables: returning a written cache would copy it per token).

    γ (starting at 1) gives the branch back a learnable magnitude: a normalising rule fixes the heads' output
    RMS at 1 and the output kernel's columns are held at unit RMS, so without γ the attention branch adds the
    same amount to the residual stream whatever it has learned. ∂γ = N^-½·Σ_rows o ⊙ g, as a norm gain.

    Scale trade inside the branch: attention multiplies ∂q, ∂k by c (= √d_head, times f̄ under a normalising
    rule: see :func:`attention`) so the q/k weight gradients are unit, and the q/k projections' input gradients are
    divided by the same c, so the gradient reaching x is exact.
    """
    wq, wk, wv, wo = kernels
    bq, bk, bv, bo = biases if biases is not None else (None,) * 4
    width = int(wq.shape[1])
    head_dim = width // num_heads
    c = 1.0 if _EXACT_GRADIENTS else attention_grad_scale(head_dim)

    def heads(t: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(t)
        return tf.transpose(tf.reshape(t, [shape[0], shape[1], num_heads, head_dim]), [0, 2, 1, 3])

    if rule in _NORM_AXES and not _EXACT_GRADIENTS:  # c·f̄, known once attention has run (see attention)
        qk_grad = LateScale()
        x_qk = scale_bwd_late(x, qk_grad, inverse=True)
        q, k = heads(dense(x_qk, wq, bq)), heads(dense(x_qk, wk, bk))
    else:
        qk_grad = None
        q = heads(dense(x, wq, bq, grad_input_scale=width**-0.5 / c))
        k = heads(dense(x, wk, bk, grad_input_scale=width**-0.5 / c))
    v = heads(dense(x, wv, bv))
    if cache is None:
        o = attention(q, k, v, causal=causal, padding_mask=padding_mask, qk_grad_scale=c, rule=rule,
                      qk_grad=qk_grad, source_width=int(wq.shape[0]), attention_mask=attention_mask)
    else:
        if not causal or padding_mask is not None or attention_mask is not None:
            raise ValueError("a key/value cache is for causal attention without a padding or attention mask")
        o = cached_attention(q, tf.cast(cache[0], q.dtype), tf.cast(cache[1], v.dtype), k, v, cache_update_index,
                             rule)
    o = tf.transpose(o, [0, 2, 1, 3])
    shape = tf.shape(o)
    o = tf.reshape(o, [shape[0], shape[1], width])
    if output_gain is not None:
        o = o * scaled(tf.cast(output_gain, o.dtype), 1.0, rsqrt(rows(o)))
    out = dense(o, wo, bo)
    return out if cache is None else (out, (k, v))


def mlp(
    x: tf.Tensor,
    up: tuple[tf.Tensor, tf.Tensor | None],
    down: tuple[tf.Tensor, tf.Tensor | None],
    activation_name: str = "gelu",
) -> tf.Tensor:
    """Feed-forward branch ``dense_down(act(dense_up(x)))`` with consistent gradients.

    up (d→h): α = d^-½, β_x = h^-½;  down (h→d): α = h^-½, β_x = d^-½. Their β/α ratios (√(d/h), √(h/d))
    cancel along the path, and the activation is constrained (one scale both ways), so ∂x is exact.
    """
    h = dense(x, up[0], up[1])
    h = activation(h, activation_name, constrain=True)
    return dense(h, down[0], down[1])


# ----------------------------------------------------------------------------------------------- pooling
@functools.lru_cache(maxsize=256)
def max_of_normals_rms(n: int) -> float:
    """√E[max(z_1..z_n)²] for iid z ~ N(0, 1), by numerical integration of n·φ(x)·Φ(x)^(n−1)."""
    x = np.linspace(-12.0, 12.0, 48001)
    phi = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    density = n * phi * cdf ** (n - 1)
    return float(math.sqrt(np.sum(x * x * density) * (x[1] - x[0])))


def pool(
    x: tf.Tensor,
    mode: str = "max",
    pool_size: int | None = None,
    padding_mask: tf.Tensor | None = None,
) -> tf.Tensor:
    """Unit-scaled pooling over the time axis of (B, T, C).

    pool_size=None: global pooling → (B, C). Otherwise windowed and causal, stride 1 → (B, T, C): output t
    pools inputs t−w+1 … t (left-padded), so a language model never sees the future.
    average: Σ/√n instead of Σ/n (n inputs per output). Windowed: backward exact (each input collects w
             gradients × w^-½: unit). Global: backward ∂x = g (β = 1 on the sum, i.e. √n × the exact g/√n).
    max:     forward 1/√E[max_n²] (:func:`max_of_normals_rms`). Backward: global √n (one input in n gets the
             gradient); windowed 1 (with independent g per output, an input that wins c windows collects
             c independent gradients, and E[c] = 1).
    padding_mask (B, T) removes padded positions from global pools (n counts valid positions).
    """
    if mode not in ("max", "average"):
        raise ValueError(f"pool mode must be 'max' or 'average', got {mode!r}")
    if pool_size is None:
        return _global_pool(x, mode, padding_mask)
    w = int(pool_size)
    if mode == "average":
        padded = tf.pad(x, [[0, 0], [w - 1, 0], [0, 0]])
        return tf.nn.avg_pool1d(padded, w, 1, "VALID") * math.sqrt(w)
    padded = tf.pad(x, [[0, 0], [w - 1, 0], [0, 0]], constant_values=x.dtype.min)
    pooled = tf.nn.max_pool1d(padded, w, 1, "VALID")
    return scaled(pooled, 1.0 / max_of_normals_rms(w), 1.0)


@functools.lru_cache(maxsize=1)
def _max_rms_table() -> tuple[np.ndarray, np.ndarray]:
    """(log n, 1/√E[max_n²]) on a grid of n from 1 to 2^20: exact for n ≤ 32, then geometric steps of 2^¼."""
    grid = np.unique(np.concatenate([np.arange(1, 33), np.round(2.0 ** np.arange(5.0, 20.25, 0.25))]))
    return np.log(grid), np.array([1.0 / max_of_normals_rms(int(n)) for n in grid])


def _inverse_max_rms(n: tf.Tensor) -> tf.Tensor:
    """1/√E[max_n²] for a tensor of counts n ≥ 1 (linear interpolation in log n; in-graph, any n)."""
    log_grid, values = _max_rms_table()
    log_n = tf.math.log(tf.cast(n, tf.float32))
    i = tf.clip_by_value(tf.searchsorted(tf.constant(log_grid, tf.float32), tf.reshape(log_n, [-1])), 1,
                         len(log_grid) - 1)
    i = tf.reshape(i, tf.shape(log_n))
    lo, hi = tf.gather(tf.constant(log_grid, tf.float32), i - 1), tf.gather(tf.constant(log_grid, tf.float32), i)
    v_lo, v_hi = tf.gather(tf.constant(values, tf.float32), i - 1), tf.gather(tf.constant(values, tf.float32), i)
    w = tf.clip_by_value((log_n - lo) / (hi - lo), 0.0, 1.0)
    return v_lo + w * (v_hi - v_lo)


def _global_pool(x: tf.Tensor, mode: str, padding_mask: tf.Tensor | None) -> tf.Tensor:
    """Global pool over time; n = the (valid) length per example, static or dynamic."""
    if padding_mask is None:
        valid = None
        count = tf.cast(tf.shape(x)[1], tf.float32)
    else:
        valid = tf.cast(padding_mask, x.dtype)[..., None]
        count = tf.maximum(tf.reduce_sum(tf.cast(padding_mask, tf.float32), axis=1, keepdims=True), 1.0)
    if mode == "average":
        summed = tf.reduce_sum(x if valid is None else x * valid, axis=1)
        return scaled(summed, tf.math.rsqrt(count), 1.0)
    masked = x if valid is None else tf.where(valid > 0, x, tf.cast(x.dtype.min, x.dtype))
    pooled = tf.reduce_max(masked, axis=1)
    return scaled(pooled, _inverse_max_rms(count), tf.sqrt(count))


def embedding_bag(ids: tf.Tensor, table: tf.Tensor, typical_count: float) -> tf.Tensor:
    """Unit-scaled mean of the embeddings of a bag of ids (B, T) → (B, d); id 0 is padding and not counted.

    forward  y_b = d^-½ · (1/n_b)·Σ_{i: id_bi ≠ 0} W[id_bi]        (n_b valid ids of example b)
    backward ∂W[r] = n̄·√(V/N) · Σ_{b,i: id_bi = r} g_b / n_b        (N = Σ_b n_b ids in the batch, V = rows of W,
                                                                     n̄ = typical_count)

    A mean, not a sum: a text's bag of n-grams grows with its length while its meaning does not, and the mean
    keeps long and short texts on one scale (fastText). The backward pass is the exact gradient times one
    constant, √d·n̄·√(V/N): unit RMS for unit g and bags of the typical length (the embedding rule: each row
    collects N/V of the N ids), weighing the examples as the true gradient does.

    The forward scale is the dense rule's α = fan_in^-½ with fan_in = d, not the √n̄ that would give unit RMS
    for a bag of independent unit rows: the bag's table starts at zero (``layers.UnitEmbeddingBag``), so there
    is no initial scale to keep, and what α sets is how fast the output moves under Adam, which moves every
    element of every row of a text by about η per step, coherently. With α = d^-½ the mean moves like the
    readout it feeds (also α = d^-½). √n̄ made the table ≈ 20× faster than the readout, and its best
    learning rate then gave 0.4–0.5 points less accuracy on both dev sets (README, "Text classification").

    Only the batch's distinct rows are read (``tf.unique``, then ``tf.gather``: a ResourceGather when ``table``
    is a variable) and summed per text by ``tf.sparse.segment_sum``, so the gradient is one IndexedSlices row
    per distinct id and the (B, T, d) gathered rows never exist (the tables have 10⁵ rows, a batch 10⁴ ids).
    Summing straight from the table read all of it at every step: 18 ms per step against 13 ms on AG News
    (118,805 rows, batch 32, words and word bigrams; same losses).

    The scales are applied to the gathered rows, between the gather and the sum (the same maths: the sum and
    the division by n_b are linear). Directly adjacent, gather-then-segment-sum is a pattern TensorFlow's
    graph optimizer rewrites (Grappler's ``SimplifyEmbeddingLookup``) into a segment sum over the whole table
    — which reads all of it every step, and once the optimizer's sparse updates have put the variable in
    copy-on-read mode, copies all of it (30 MB on AG News): 22.5 → 18.8 ms a training step there (TensorFlow
    profiler, one profile of steps 100–130 each, AVX2 machine).
    """
    vocab, width = int(table.shape[0]), int(table.shape[1])
    valid = tf.not_equal(ids, 0)
    shape = tf.shape(ids)
    rows_of = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
    flat_ids = tf.boolean_mask(ids, valid)
    distinct, position = tf.unique(flat_ids)
    total = tf.maximum(tf.cast(tf.size(flat_ids), tf.float32), 1.0)
    rows = tf.gather(table, distinct)  # a variable's ResourceGather: only these rows are read
    rows = scaled(rows, width**-0.5, typical_count * tf.sqrt(vocab / total))  # here, not after the sum: docstring
    summed = tf.sparse.segment_sum(rows, position, tf.boolean_mask(rows_of, valid), num_segments=shape[0])
    count = tf.maximum(tf.reduce_sum(tf.cast(valid, summed.dtype), axis=1, keepdims=True), 1.0)
    return summed / count


# ------------------------------------------------------------------------------------------------ helpers
def _ratio(num: Scale, den: Scale) -> Scale:
    if _is_python_number(num) and _is_python_number(den):
        return num / den
    return tf.cast(num, tf.float32) / tf.cast(den, tf.float32)


def _times(a: Scale, b: Scale) -> Scale:
    if _is_python_number(a) and _is_python_number(b):
        return a * b
    return tf.cast(a, tf.float32) * tf.cast(b, tf.float32)
