"""Scale report: the RMS of every layer's output, gradients and weight gradients for one training step.

``python -m llm_unitscale.analysis`` prints the table for the default transformer, unit-scaled and baseline
side by side: the unit-scaled model sits near 1 everywhere, while the stock model's weight gradients are tiny
(≈1e-4 and below) — the values that underflow in float16 without loss scaling.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from llm_unitscale.models import build_model, is_unit_scaled, loss_for


@dataclass
class LayerScales:
    """RMS values for one layer; ``None`` where the quantity does not exist (integer input, no weights)."""

    name: str
    output: float
    grad_output: float | None
    grad_input: float | None
    weight_grads: dict[str, float] = field(default_factory=dict)


def rms(x: tf.Tensor | np.ndarray) -> float:
    """√mean(x²), in float64."""
    if isinstance(x, tf.IndexedSlices):
        x = tf.convert_to_tensor(x)
    a = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


@dataclass
class LayerTensors:
    """One layer's tensors from one forward/backward pass: what :class:`LayerScales` summarises."""

    name: str
    output: tf.Tensor
    grad_output: tf.Tensor | None
    grad_input: tf.Tensor | None
    weights: dict[str, tf.Tensor] = field(default_factory=dict)
    weight_grads: dict[str, tf.Tensor] = field(default_factory=dict)


class LayerProbe:
    """A functional model rebuilt with every layer's output exposed, for per-layer forward/backward passes.

    Built once per model (shares its layers and weights); each call runs one forward/backward pass on a batch.
    Used by :func:`scale_report` and by the scale tracker (``llm_unitscale.scale_tracker``).
    """

    def __init__(self, model: keras.Model):
        self.model = model
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        tensors: list = []
        index: dict[int, int] = {}

        def slot(t: keras.KerasTensor) -> int:
            if id(t) not in index:
                index[id(t)] = len(tensors)
                tensors.append(t)
            return index[id(t)]

        self.plan = []
        for layer in layers:
            for node in layer._inbound_nodes:
                inputs = [t for t in node.input_tensors if t.dtype not in ("int32", "int64", "bool")]
                self.plan.append((layer, slot(node.output_tensors[0]), [slot(t) for t in inputs]))
        self.probe = keras.Model(model.inputs[0], tensors)
        self.final = index[id(model.outputs[0])]
        self._passes: dict[int, tuple[keras.losses.Loss, Any]] = {}

    def default_targets(self, token_ids: np.ndarray) -> np.ndarray:
        """The next token (lm: ids shifted left) or classes 0, 1, … alternating (classify)."""
        outputs = self.model.outputs[0]
        if len(outputs.shape) == 3:
            return np.roll(token_ids, -1, axis=1)
        return np.arange(len(token_ids)) % int(outputs.shape[-1])

    def __call__(
        self, token_ids: np.ndarray, targets: np.ndarray | None = None, loss: keras.losses.Loss | None = None
    ) -> list[LayerTensors]:
        """One training-mode forward/backward pass; every layer's output, gradients, weights and their gradients.

        The pass runs as a ``tf.function`` (traced once per loss object): Keras's own float8 layers have
        custom gradients that fail eagerly but work in a graph, as in ``fit``.
        """
        token_ids = np.asarray(token_ids, dtype=np.int32)
        targets = self.default_targets(token_ids) if targets is None else np.asarray(targets)
        if loss is None:  # one default loss object per probe: a new one per call would retrace the pass
            loss = self._default_loss = getattr(self, "_default_loss", None) or loss_for(is_unit_scaled(self.model))
        key = id(loss)
        if key not in self._passes:
            self._passes[key] = (loss, tf.function(functools.partial(self._pass, loss)))
        values, grads, weight_grads = self._passes[key][1](tf.constant(token_ids), tf.constant(targets))
        result = []
        for (layer, out, ins), layer_grads in zip(self.plan, weight_grads, strict=True):
            names = [w.path.split("/", 1)[-1] for w in layer.trainable_weights]
            result.append(
                LayerTensors(
                    name=layer.name,
                    output=values[out],
                    grad_output=grads[out],
                    grad_input=grads[ins[0]] if ins else None,
                    weights={n: w.value for n, w in zip(names, layer.trainable_weights, strict=True)},
                    weight_grads={n: g for n, g in zip(names, layer_grads, strict=True) if g is not None},
                )
            )
        return result

    def _pass(self, loss: keras.losses.Loss, token_ids: tf.Tensor, targets: tf.Tensor) -> tuple[list, list, list]:
        with tf.GradientTape() as tape:
            values = self.probe(token_ids, training=True)
            value = loss(targets, values[self.final])
        weights = [layer.trainable_weights for layer, _, _ in self.plan]
        # One backward pass for every output and weight (a gradient call per layer would trace one each).
        grads, flat_weight_grads = tape.gradient(value, (values, [w for ws in weights for w in ws]),
                                                 unconnected_gradients=tf.UnconnectedGradients.NONE)
        del tape
        weight_grads, start = [], 0
        for ws in weights:
            weight_grads.append(flat_weight_grads[start:start + len(ws)])
            start += len(ws)
        return values, grads, weight_grads


def scale_report(
    model: keras.Model, token_ids: np.ndarray, targets: np.ndarray | None = None, loss: keras.losses.Loss | None = None
) -> list[LayerScales]:
    """One forward/backward pass of ``model`` on ``token_ids``; per-layer RMS of activations and gradients.

    targets default to the next token (lm: ids shifted left) or class 0/1 alternating (classify). loss defaults
    to the model's training loss (unit-scaled cross-entropy for unit-scaled models, Keras's otherwise).
    Works for functional models: it rebuilds the model with every layer's output exposed (:class:`LayerProbe`).
    """
    return [
        LayerScales(
            name=t.name,
            output=rms(t.output),
            grad_output=_maybe_rms(t.grad_output),
            grad_input=_maybe_rms(t.grad_input),
            weight_grads={name: rms(g) for name, g in t.weight_grads.items()},
        )
        for t in LayerProbe(model)(token_ids, targets, loss)
    ]


def _maybe_rms(g: tf.Tensor | None) -> float | None:
    return None if g is None else rms(g)


def extremes(report: list[LayerScales]) -> tuple[float, float]:
    """Smallest and largest RMS over all gradients (activation and weight) in a report."""
    values = [v for r in report for v in (r.grad_output, r.grad_input, *r.weight_grads.values()) if v]
    return min(values), max(values)


def worst_log_distance(report: list[LayerScales]) -> float:
    """The RMS farthest from 1 (on a log scale) among outputs and gradients: the worst unit-scale deviation."""
    values = [v for r in report for v in (r.output, r.grad_output, r.grad_input, *r.weight_grads.values()) if v]
    return max(values, key=lambda v: abs(math.log(v)))


def format_side_by_side(unit: list[LayerScales], stock: list[LayerScales]) -> str:
    """Two reports as text: one row per quantity, the unit-scaled and the baseline RMS next to each other."""

    def rows(report: list[LayerScales]) -> list[tuple[str, float | None, float | None, float | None]]:
        out = []
        for r in report:
            out.append((r.name, r.output, r.grad_output, r.grad_input))
            out.extend((f"  ∂{name}", None, value, None) for name, value in r.weight_grads.items())
        return out

    def fmt(v: float | None) -> str:
        return f"{v:9.3g}" if v is not None else "        -"

    lines = [
        "unit-scaled" + " " * 44 + "| baseline (stock Keras)",
        f"{'layer / weight':34} {'output':>9} {'∂output':>9} {'∂input':>9} | "
        f"{'layer / weight':34} {'output':>9} {'∂output':>9} {'∂input':>9}",
    ]
    left, right = rows(unit), rows(stock)
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ("", None, None, None)
        b = right[i] if i < len(right) else ("", None, None, None)
        lines.append(
            f"{a[0][:34]:34} {fmt(a[1])} {fmt(a[2])} {fmt(a[3])} | {b[0][:34]:34} {fmt(b[1])} {fmt(b[2])} {fmt(b[3])}"
        )
    lo_u, hi_u = extremes(unit)
    lo_s, hi_s = extremes(stock)
    lines.append(
        f"gradient RMS range: unit-scaled [{lo_u:.3g}, {hi_u:.3g}] (worst of all: {worst_log_distance(unit):.3g})"
        f" | baseline [{lo_s:.3g}, {hi_s:.3g}]"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_unitscale.analysis",
        description="Print the per-layer scale report of a model, unit-scaled vs stock Keras, at init.",
    )
    parser.add_argument("--arch", default="transformer", choices=("transformer", "cnn", "mlp"))
    parser.add_argument("--task", default="lm", choices=("lm", "classify"))
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    shape = dict(
        task=args.task, arch=args.arch, vocab_size=args.vocab_size, seq_len=args.seq_len, width=args.width,
        depth=args.depth, heads=args.heads, num_classes=2,
    )
    ids = np.random.default_rng(args.seed).integers(1, args.vocab_size, (args.batch_size, args.seq_len))
    unit = scale_report(build_model(**shape, unit_scaling=True), ids)
    stock = scale_report(build_model(**shape, unit_scaling=False), ids)
    print(format_side_by_side(unit, stock))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
