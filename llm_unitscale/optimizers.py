"""Optimizer for unit-scaled models: AdamW with u-μP per-parameter learning rates and a replica-count fix.

``UnitAdamW`` is ``keras.optimizers.AdamW`` with two additions, both per variable and decided once when the
optimizer is built from the model's variables (roles come from the Keras variable paths of ``models.py``):

1. **u-μP learning-rate multipliers** (``lr_rule="umup"``; Blake et al. 2024, Table 2; depth from depth-μP,
   Yang et al. 2023). A variable's step is ``η·m(v)`` with η the base (scheduled) learning rate and

   ===============================  ==========================================  =================================
   role (path)                      m(v)                                        why
   ===============================  ==========================================  =================================
   hidden weight (``*kernel``)      fan_in^-½ · D(v)                            α = fan_in^-½ in the op: an Adam
                                                                                step of η·fan_in^-½ per element
                                                                                moves the output by O(η) at any
                                                                                width
   embedding table (``embeddings``) width^-½  (width = the table's last axis)    u-μP's embedding rule
   readout kernel (``readout/``)    fan_in^-½                                   see below
   norm gain / bias / ≤1-D          1                                           u-μP: norms and biases take η
   ===============================  ==========================================  =================================

   fan_in = the product of all kernel axes but the last (Dense (fan_in, fan_out): fan_in; Conv1D (K, C_in,
   C_out): K·C_in — the same fan-in the op's forward scale uses). **Readout:** u-μP gives the readout the
   plain η because its forward scale is α = 1/fan_in; ``ops.readout`` uses α = fan_in^-½, and the update of a
   logit, α·fan_in·η_r, is width-independent exactly when η_r = η·fan_in^-½ — so our readout takes the hidden
   rule, which is u-μP's readout update re-expressed for our α.

   **Depth factor** D(v) = L^-½ for weights inside a residual block (path ``block_i/…``), L = the number of
   transformer blocks, and 1 elsewhere (conv and MLP layers are not residual branches). This is depth-μP's
   Adam rule: with L residual branches each branch's update must shrink as L^-½ for the residual stream's
   total update to stay O(η) as depth grows.

   ``lr_rule="uniform"`` (m = 1 everywhere) is plain AdamW. Decoupled weight decay is ``η·λ·w`` with the base
   η, not multiplied by m(v) (u-μP's "independent" weight decay).

2. **Replica correction** (``replica_correction=True``). Under a ``tf.distribute`` strategy with R replicas,
   Keras divides each replica's loss by R (``scale_loss_for_distribution``) and sums the replicas'
   gradients. That is exact for an ordinary mean loss, but the unit-scaled ops scale every weight gradient by
   N^-½ with N the rows *on the replica* (``ops.dense``: ∂W = N^-½·xᵀg, embeddings √(V/N), norms N^-½), and
   ``ops.softmax_cross_entropy`` undoes the mean's 1/N. So the summed gradient is
   Σ_r (1/R)·(N/R)^-½·Σ_{rows of r} = R^-½ · N^-½·Σ_{all rows}, i.e. R^-½ times the single-device gradient on
   the same global batch, for every weight alike. ``apply`` multiplies each replica's gradients by √R
   before Keras sums them, so a unit-scaled model's optimizer sees the gradient of the global batch
   (N = global rows). Adam is nearly invariant to one constant per step, but its ε, gradient clipping and
   anything that logs gradients are not. Off for the stock baseline (its gradients are exact).

   Under more than one replica ``apply`` also densifies sparse (IndexedSlices) embedding gradients: they
   hold a different number of rows on each replica, which MirroredStrategy's packed all-reduce rejects
   ("Shape mismatch in the collective instance"; measured with the stock Embedding on 2 CPUs). So the
   baseline also uses this class, with ``lr_rule="uniform", replica_correction=False``.

3. **A faster position table** (``position_lr``; train.py gives unit-scaled models ``POSITION_LR`` = 3): the
   position table's (path ``position/…``) step is multiplied by it on top of the rule above. The table is held
   at unit RMS per row by its constraint, so an Adam step (≈ η per element) turns a row by ≈ η of its size:
   3 % at the character rate 3e-2, where the stock twin's table (Keras's uniform ±0.05 init, RMS 0.029) moves
   by ≈ 2e-3/0.029 = 7 % of its size per step; ×3 brings ours to 9 %. Measured at the character recipe (README
   "What makes the unit-scaled language model learn"): ×3 is ahead on every seed of English and Chinese, ×10
   is not; ×3 on the token table too costs Chinese (most of its 4,107 characters are rare).

4. **Sparse (lazy) updates of embedding tables** (``sparse_updates=True``; the bag-of-n-grams classifier, whose
   table has 10⁵ rows of which a batch touches a few thousand). Keras's Adam turns a table's IndexedSlices
   gradient dense and updates every row at every step. Here the rows in the batch are updated as Adam would
   (duplicates summed first), and the others keep their weights *and* moments, as in TF-Addons' ``LazyAdam``:

       m_r ← β₁·m_r + (1−β₁)·g_r,  v_r ← β₂·v_r + (1−β₂)·g_r²,  w_r ← w_r − η·√(1−β₂ᵗ)/(1−β₁ᵗ)·m_r/(√v_r + ε)

   for each row r of the batch. Such tables take no decoupled weight decay (it would touch every row). When
   the gradient's rows are distinct by construction (:func:`distinct_by_construction`) the summing is skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

LR_RULES = ("uniform", "umup")
#: The position table's learning-rate factor in unit-scaled models (module docstring, 3).
POSITION_LR = 3.0


def position_lr(unit_scaling: bool) -> float:
    """The ``position_lr`` a model gets: ``POSITION_LR`` unit-scaled, 1 (plain AdamW) for the stock twin."""
    return POSITION_LR if unit_scaling else 1.0
_BLOCK = re.compile(r"^block_(\d+)[/_]")


def variable_role(path: str, shape: Sequence[int]) -> str:
    """'embedding', 'readout', 'hidden' or 'vector' (norm gains, biases and any ≤1-D variable) from a path."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "embeddings" or leaf.endswith("embeddings"):
        return "embedding"
    if len(shape) <= 1 or leaf in ("gamma", "beta", "bias") or leaf.endswith("_bias"):
        return "vector"
    if path.startswith("readout/"):
        return "readout"
    return "hidden"


def umup_multipliers(variables: Iterable[Any]) -> dict[str, float]:
    """u-μP learning-rate multiplier m(v) for each variable, keyed by its Keras path (module docstring)."""
    variables = list(variables)
    blocks = {int(m.group(1)) for v in variables if (m := _BLOCK.match(v.path))}
    depth_factor = 1.0 / math.sqrt(len(blocks)) if blocks else 1.0
    out: dict[str, float] = {}
    for v in variables:
        shape = tuple(int(d) for d in v.shape)
        role = variable_role(v.path, shape)
        if role == "vector":
            m = 1.0
        elif role == "embedding":
            m = 1.0 / math.sqrt(shape[-1])
        else:
            fan_in = math.prod(shape[:-1])
            m = 1.0 / math.sqrt(fan_in)
            if role == "hidden" and _BLOCK.match(v.path):
                m *= depth_factor
        out[v.path] = m
    return out


def distinct_by_construction(indices: Any) -> bool:
    """True when ``indices`` is, through reshapes, the first output of a ``tf.unique`` op in the graph being
    traced — the rows are then distinct and need no summing. That is the bag classifier's table gradient
    (``ops.embedding_bag`` gathers the batch's distinct ids, and the gather's gradient reshapes them), whose
    second ``tf.unique`` and segment sum took 2.7 ms of a 22-ms AG News step (one TensorFlow profile). Eager
    tensors, and indices built any other way (e.g. two gathers' gradients concatenated), give False."""
    tensor = indices
    while getattr(tensor, "op", None) is not None and tensor.op.type in ("Reshape", "Identity"):
        tensor = tensor.op.inputs[0]
    op = getattr(tensor, "op", None)
    return op is not None and op.type in ("Unique", "UniqueV2") and tensor.value_index == 0


def _scale_gradient(g: Any, s: float) -> Any:
    if g is None:
        return None
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(s, g.values.dtype), g.indices, g.dense_shape)
    return g * tf.cast(s, g.dtype)


@keras.saving.register_keras_serializable(package="llm_unitscale")
class WarmupCosineDecay(keras.optimizers.schedules.CosineDecay):
    """Keras's ``CosineDecay`` with linear warm-up (the same formula, the same ops: η_t = η·t/W for t < W, then
    η·((1 − α)·½(1 + cos(π·min(t − W, D)/D)) + α)), whose peak η, warm-up W and decay length D are variables
    instead of constants of the traced step.

    XLA compiles the training step with the schedule inside it, and its persistent cache (``compile_cache``)
    finds a program only when the whole program is the same: with ``CosineDecay`` every ``--lr`` and every
    ``--max-steps`` was another program, compiled afresh. Here they are the program's inputs, so a run with
    another peak or length loads the step the last run compiled. α stays a constant (0.1 in every run);
    ``get_config`` gives plain numbers, so a saved model loads as before.
    """

    def __init__(self, initial_learning_rate: float, decay_steps: int, alpha: float = 0.0,
                 name: str = "WarmupCosineDecay", warmup_target: float | None = None, warmup_steps: int = 0) -> None:
        super().__init__(initial_learning_rate, decay_steps, alpha=alpha, name=name, warmup_target=warmup_target,
                         warmup_steps=warmup_steps)
        if warmup_target is None:
            raise ValueError("WarmupCosineDecay needs a warmup_target (the peak learning rate)")

        def variable(value: float, what: str) -> tf.Variable:
            return tf.Variable(float(value), trainable=False, dtype=tf.float32, name=f"{name}_{what}")

        self.decay_steps = variable(decay_steps, "decay_steps")
        self.warmup_steps = variable(warmup_steps, "warmup_steps")
        self.warmup_target = variable(warmup_target, "peak")

    def get_config(self) -> dict:
        """The numbers the variables hold now, the peak as the shortest decimal of its float32 (0.03, not
        0.029999999329447746), which converts back to the same float32."""
        return {**super().get_config(), "decay_steps": int(self.decay_steps.numpy()),
                "warmup_steps": int(self.warmup_steps.numpy()),
                "warmup_target": float(str(self.warmup_target.numpy()))}


@keras.saving.register_keras_serializable(package="llm_unitscale")
class UnitAdamW(keras.optimizers.AdamW):
    """AdamW with u-μP per-variable learning-rate multipliers and the √R replica correction (module docs).

    lr_rule: "umup" (multipliers m(v)) or "uniform" (plain AdamW). replica_correction: multiply each
    replica's gradients by √R (R = replicas in sync); for unit-scaled models only. position_lr: a factor on the
    position table's multiplier (module docstring, 3).
    """

    def __init__(self, *args: Any, lr_rule: str = "umup", replica_correction: bool = True,
                 sparse_updates: bool = False, position_lr: float = 1.0, **kwargs: Any):
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {LR_RULES}, got {lr_rule!r}")
        super().__init__(*args, **kwargs)
        self.lr_rule = lr_rule
        self.replica_correction = bool(replica_correction)
        self.sparse_updates = bool(sparse_updates)
        self.position_lr = float(position_lr)
        self._multipliers: dict[Any, float] = {}
        self._sparse: set[Any] = set()
        self.multipliers_by_path: dict[str, float] = {}

    def build(self, var_list: list) -> None:
        super().build(var_list)
        by_path = umup_multipliers(var_list) if self.lr_rule == "umup" else {v.path: 1.0 for v in var_list}
        by_path = {path: m * (self.position_lr if path.startswith("position/") else 1.0)
                   for path, m in by_path.items()}
        self.multipliers_by_path = by_path
        self._multipliers = {self._var_key(v): by_path[v.path] for v in var_list}
        if self.sparse_updates:
            self._sparse = {self._var_key(v) for v in var_list
                            if variable_role(v.path, tuple(int(d) for d in v.shape)) == "embedding"}

    def _apply_weight_decay(self, variables: Sequence[Any]) -> None:
        """AdamW's decoupled decay, ``v ← v − λ·lr·v``; nothing at all when λ = 0 (the default here). Keras
        builds the decay for every variable whenever λ is not None, evaluating the learning-rate schedule once
        per variable: with λ = 0, ≈ 0.8 s of the character recipe's 2.9-s trace of its training step, and a
        multiply-subtract over every weight each step that changes nothing."""
        if self.weight_decay:
            super()._apply_weight_decay(variables)

    def _use_weight_decay(self, variable: Any) -> bool:
        return self._var_key(variable) not in self._sparse and super()._use_weight_decay(variable)

    def multiplier(self, variable: Any) -> float:
        """m(v) of a model variable (1.0 for one the optimizer was not built with)."""
        return self._multipliers.get(self._var_key(variable), 1.0)

    @staticmethod
    def replica_gradient_scale(replicas: int) -> float:
        """√R: the factor that turns the replicas' summed unit-scaled gradient into the global-batch one."""
        return math.sqrt(replicas)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        if replicas > 1:
            # Sparse (IndexedSlices) embedding gradients hold a different number of rows on each replica, which
            # the packed CollectiveReduce of MirroredStrategy rejects ("Shape mismatch in the collective"):
            # all-reduce them dense.
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            if self.replica_correction:
                grads = [_scale_gradient(g, self.replica_gradient_scale(replicas)) for g in grads]
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        m = self.multiplier(variable)
        if m != 1.0:
            learning_rate = learning_rate * m
        if isinstance(gradient, tf.IndexedSlices) and self._var_key(variable) in self._sparse:
            self._lazy_update(gradient, variable, learning_rate)
        else:
            super().update_step(gradient, variable, learning_rate)

    def _lazy_update(self, gradient: tf.IndexedSlices, variable: Any, learning_rate: Any) -> None:
        """Adam on the rows of ``gradient`` only (module docstring, 4)."""
        dtype = variable.dtype
        if distinct_by_construction(gradient.indices):
            rows, g = gradient.indices, tf.cast(gradient.values, dtype)
        else:
            rows, position = tf.unique(gradient.indices)
            g = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.shape(rows)[0])
        step = tf.cast(self.iterations + 1, dtype)
        alpha = tf.cast(learning_rate, dtype) * tf.sqrt(1.0 - tf.pow(tf.cast(self.beta_2, dtype), step)) / (
            1.0 - tf.pow(tf.cast(self.beta_1, dtype), step))
        index = self._get_variable_index(variable)
        m_var, v_var = self._momentums[index], self._velocities[index]
        m = self.beta_1 * tf.gather(m_var.value, rows) + (1.0 - self.beta_1) * g
        v = self.beta_2 * tf.gather(v_var.value, rows) + (1.0 - self.beta_2) * tf.square(g)
        self.assign(m_var, tf.IndexedSlices(m, rows))
        self.assign(v_var, tf.IndexedSlices(v, rows))
        # w_r − step written back with a scatter *update*: TensorFlow's scatter-subtract kernel is slower than a
        # gather plus a scatter update (20,700 of 118,805 rows of width 64, as on AG News: 6.1 ms against 3.5 ms,
        # median of 7 × 50 calls of each, interleaved).
        step_rows = alpha * m / (tf.sqrt(v) + self.epsilon)
        weights = variable.value if isinstance(variable, keras.Variable) else variable  # a tf.Variable: ResourceGather
        self.assign(variable, tf.IndexedSlices(tf.gather(weights, rows) - step_rows, rows))

    def get_config(self) -> dict:
        return {**super().get_config(), "lr_rule": self.lr_rule, "replica_correction": self.replica_correction,
                "sparse_updates": self.sparse_updates, "position_lr": self.position_lr}
