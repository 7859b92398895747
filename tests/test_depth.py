"""Unit scale that holds in deep and long models: the depth-aware residual rule and the "norm" attention rule.

The scale invariants of test_layers/test_models hold at depth ≤ 4 and T ≤ 64; here they are checked on a deep
stack (depth 24) and at long context (T = 512, 2048), at small width so that the default suite stays fast.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from llm_unitscale import layers as L
from llm_unitscale import ops
from llm_unitscale.analysis import scale_report
from llm_unitscale.models import build_model


def rms(a: np.ndarray | tf.Tensor) -> float:
    a = np.asarray(a, np.float64)
    return float(np.sqrt(np.mean(a * a)))


@pytest.mark.parametrize("depth", [1, 4, 12, 24])
@pytest.mark.parametrize("mult, ratio", [(1.0, 1.0), (0.5, 0.5)])
def test_residual_shares_are_independent_of_depth(depth: int, mult: float, ratio: float) -> None:
    """Following the stream through y = (x + τ·f)/√(1+τ²): the embedding keeps 1/(1+2m²) of the variance at any
    depth, all attention branches together r²·c², all MLP branches c² (c² = 2m²/(1+r²)) over (1+2m²)."""
    taus = ops.residual_taus(depth, mult, ratio)
    shares = {"embedding": 1.0, "attention": 0.0, "mlp": 0.0}
    for tau_attention, tau_mlp in taus:
        for kind, tau in (("attention", tau_attention), ("mlp", tau_mlp)):
            keep = 1.0 / (1.0 + tau * tau)
            shares = {k: v * keep for k, v in shares.items()}
            shares[kind] += tau * tau * keep
    c2 = 2 * mult**2 / (1 + ratio**2)
    total = 1 + 2 * mult**2
    assert shares["embedding"] == pytest.approx(1 / total)
    assert shares["attention"] == pytest.approx(ratio**2 * c2 / total)
    assert shares["mlp"] == pytest.approx(c2 / total)
    # each branch's τ falls as depth^-½ (the depth-μP branch multiplier): the first attention τ is r·c/√L
    assert taus[0][0] == pytest.approx(ratio * math.sqrt(c2) / math.sqrt(depth))


def test_fixed_tau_forgets_the_embedding_with_depth() -> None:
    """The rule it replaces, as a regression reference: τ = ½ leaves the embedding 0.8^(2L) of the variance."""
    assert (1 / 1.25) ** (2 * 12) < 0.005


def test_norm_rule_is_unit_for_correlated_values_where_sqrt_n_is_not() -> None:
    """Values sharing a component (ρ = 0.5 across positions, as after a first attention block): the "norm"
    output is unit at every position, the √n rule grows as √(1 + nρ) (4.5 at the last of 64 positions)."""
    rng = np.random.default_rng(0)
    t, d = 64, 32
    shared = rng.standard_normal((2, 2, 1, d))
    v = (np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.standard_normal((2, 2, t, d))).astype(np.float32)
    q = k = tf.zeros((2, 2, t, d))  # flat attention, as at init
    norm = ops.attention(q, k, tf.constant(v), rule="norm").numpy()
    sqrt_n = ops.attention(q, k, tf.constant(v), rule="sqrt_n").numpy()
    per_position = np.sqrt(np.mean(norm**2, axis=(0, 1, 3)))
    np.testing.assert_allclose(per_position, 1.0, atol=1e-3)
    assert rms(sqrt_n[:, :, -1]) > 3.0


def test_joint_norm_is_unit_per_position_and_keeps_the_heads_relative_sizes() -> None:
    """"joint_norm": one RMS over all heads at each position — unit there, at every position, whatever the
    values' correlation; a quiet head stays quiet beside a loud one (per head, "norm" makes both unit)."""
    rng = np.random.default_rng(1)
    t, d = 64, 16
    shared = rng.standard_normal((2, 3, 1, d))
    v = np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.standard_normal((2, 3, t, d))
    v[:, 0] *= 0.05  # head 0's values are small
    v = tf.constant(v.astype(np.float32))
    q = tf.constant(rng.standard_normal((2, 3, t, d)).astype(np.float32))
    joint = ops.attention(q, q, v, rule="joint_norm").numpy()
    np.testing.assert_allclose(np.sqrt(np.mean(joint**2, axis=(1, 3))), 1.0, atol=1e-3)  # per (batch, position)
    raw = ops.attention(q, q, v, rule="none").numpy()
    def head_ratio(o: np.ndarray) -> np.ndarray:  # head 0 against head 1, at each (batch, position)
        return np.sqrt(np.mean(o[:, 0] ** 2, axis=-1) / np.mean(o[:, 1] ** 2, axis=-1))

    np.testing.assert_allclose(head_ratio(joint), head_ratio(raw), rtol=1e-3)
    assert rms(joint[:, 0]) < 0.1 * rms(joint[:, 1])
    per_head = ops.attention(q, q, v, rule="norm").numpy()
    assert rms(per_head[:, 0]) == pytest.approx(1.0, abs=1e-3)


def test_old_models_keep_the_sqrt_n_rule() -> None:
    """A layer saved before the rule was an option has no "attention_rule" key and loads with the old rule; one
    saved with the per-head "norm" rule keeps it."""
    block = L.UnitTransformerBlock(2)
    config = block.get_config()
    assert config["attention_rule"] == "joint_norm"
    assert L.UnitTransformerBlock.from_config({**config, "attention_rule": "norm"}).attention.attention_rule == "norm"
    del config["attention_rule"]
    assert L.UnitTransformerBlock.from_config(config).attention_rule == "sqrt_n"
    attention = L.UnitMultiHeadAttention(2).get_config()
    del attention["attention_rule"]
    assert L.UnitMultiHeadAttention.from_config(attention).attention_rule == "sqrt_n"


def _report(depth: int, length: int, width: int = 64) -> dict:
    keras.utils.set_random_seed(0)
    model = build_model(vocab_size=500, seq_len=length, width=width, depth=depth, heads=2, tau=None)
    ids = np.random.default_rng(0).integers(4, 500, (1, length))
    report = scale_report(model, ids)
    blocks = [r for r in report if r.name.startswith("block_")]
    return {
        "block outputs": [r.output for r in blocks],
        "activation gradients": [v for r in blocks for v in (r.grad_output, r.grad_input)],
        "weight gradients": {f"{r.name}/{k}": v for r in blocks for k, v in r.weight_grads.items()},
    }


#: Weights whose gradient the N^-½ rule over-estimates in deep stacks at long context: the gradient reaching an
#: early block has been mixed across positions by every later attention (∂v_j = Σ_i p_ij ∂o_i), and so has the
#: attention output it meets, so Σ_positions y_j ⊗ g_j grows faster than √N. Measured at width 64, heads 2:
#: up to 2.13 (depth 24, T = 128), 2.01 (depth 12, T = 512), 1.81 (depth 4, T = 2048); width 128
#: (benchmarks/depth.py): up to 3.5 at depth 24, T = 2048.
MIXED_GRADIENT_WEIGHTS = ("attention/value_kernel", "attention/output_kernel", "attention_norm/scale")


@pytest.mark.parametrize("depth, length", [(24, 128), (12, 512), (4, 2048)])
def test_unit_scale_at_depth_and_length(depth: int, length: int) -> None:
    """At init, every block's output and input/output gradient RMS lies in [0.5, 2], and so does every weight
    gradient — the query/key kernels included at any length (``ops.shared_source_factor``; without it they
    reach √(1 + n̄/w) ≈ 4 at T = 2048) — but those of ``MIXED_GRADIENT_WEIGHTS``, which stay below 2.5."""
    report = _report(depth, length)
    for kind in ("block outputs", "activation gradients"):
        values = report[kind]
        assert all(0.5 <= v <= 2.0 for v in values), (kind, [round(v, 2) for v in values])
    for name, value in report["weight gradients"].items():
        high = 2.5 if name.endswith(MIXED_GRADIENT_WEIGHTS) else 2.0
        assert 0.5 <= value <= high, (name, round(value, 2))


@pytest.mark.parametrize("length", [256, 2048])
def test_query_key_weight_gradients_stay_unit_at_any_length(length: int) -> None:
    """q, k and v projected from one x: the q/k weight gradients would grow as √(1 + n̄/w) (n̄ = (T+1)/2 keys
    per causal query, w = 64 here: 1.7 at T = 256, 4.1 at T = 2048); the rule divides that out."""
    rng = np.random.default_rng(0)
    width = 64
    x = tf.constant(rng.standard_normal((1, length, width)), tf.float32)
    kernels = [tf.Variable(rng.standard_normal((width, width)), dtype=tf.float32) for _ in range(4)]
    upstream = tf.constant(rng.standard_normal((1, length, width)), tf.float32)
    with tf.GradientTape() as tape:
        y = ops.multi_head_attention(x, tuple(kernels), None, num_heads=4, causal=True)
    grads = tape.gradient(y, kernels, output_gradients=upstream)
    assert 0.8 <= rms(grads[0]) <= 1.25 and 0.8 <= rms(grads[1]) <= 1.25, [round(rms(g), 2) for g in grads]


def test_the_default_model_takes_its_residual_weights_from_depth_and_tau_fixes_them() -> None:
    """build_model's default is the depth rule; ``tau`` (``train.py --tau``) gives every branch one weight."""
    from llm_unitscale.training import ConfigError, TrainConfig

    blocks = [layer for layer in build_model(vocab_size=50, seq_len=8, width=16, depth=3, heads=2).layers
              if isinstance(layer, L.UnitTransformerBlock)]
    got = [tau for b in blocks for tau in (b.tau, b.mlp_tau)]  # flat: pytest.approx does not nest
    assert got == pytest.approx([tau for pair in ops.residual_taus(3) for tau in pair])
    fixed = [layer for layer in build_model(vocab_size=50, seq_len=8, width=16, depth=3, heads=2, tau=0.5).layers
             if isinstance(layer, L.UnitTransformerBlock)]
    assert all(b.tau == b.mlp_tau == 0.5 for b in fixed)
    with pytest.raises(ConfigError, match="--tau must be a positive number"):
        TrainConfig(tau=-1.0).validate()
