"""The ``UnitScaling`` weight constraint: re-project weights to unit scale after every optimizer step."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="llm_unitscale")
class UnitScaling(keras.constraints.Constraint):
    """Rescale each slice of a weight to unit scale: ``w ← w / ‖w‖`` over ``axis``.

    norm="rms" (default): ``w ← w / rms(w)`` with rms(w) = √mean(w²) over ``axis`` — keeps weights at exactly
        the unit scale that unit scaling assumes at init, for the whole of training (cf. nGPT's hypersphere
        normalisation, which uses the L2 form).
    norm="l2": ``w ← w / ‖w‖₂`` over ``axis`` — the seed document's formula, identical to
        ``keras.constraints.UnitNorm(axis)``. Note: this leaves entries at ≈ fan_in^-½, so a unit-scaled
        layer's output shrinks by that factor.

    axis=None means every axis but the last: one output column of a Dense kernel (fan_in, fan_out), one output
    channel of a Conv1D kernel (K, C_in, C_out). Embedding tables pass axis=-1 (one token vector per row).
    A 1-D weight is normalised as a whole. Keras applies constraints after each optimizer step, not at
    creation: layers project their initial weights themselves. Biases are not constrained by default (a
    zero-initialised bias has no norm to keep).
    """

    NORMS = ("rms", "l2")

    def __init__(self, norm: str = "rms", axis: int | tuple[int, ...] | None = None, epsilon: float = 1e-12):
        if norm not in self.NORMS:
            raise ValueError(f"UnitScaling norm must be one of {self.NORMS}, got {norm!r}")
        self.norm = norm
        self.axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
        self.epsilon = float(epsilon)

    def _axes(self, rank: int) -> tuple[int, ...] | int:
        if self.axis is not None:
            return self.axis
        return tuple(range(rank - 1)) if rank > 1 else 0

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        squares = ops.square(ops.cast(w, "float32"))
        axes = self._axes(len(w.shape))
        total = ops.mean(squares, axis=axes, keepdims=True) if self.norm == "rms" else ops.sum(
            squares, axis=axes, keepdims=True
        )
        return ops.cast(ops.cast(w, "float32") * ops.rsqrt(total + self.epsilon), w.dtype)

    def get_config(self) -> dict:
        return {"norm": self.norm, "axis": self.axis, "epsilon": self.epsilon}
