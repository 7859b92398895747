"""Scale tracker: a Keras callback that records, every N steps, where each layer's values sit on the number line.

Every ``every`` optimizer steps (and before the first and after the last) it runs one extra forward/backward
pass on a fixed batch through :class:`llm_unitscale.analysis.LayerProbe` and records, per layer:

- ``activation``: the layer's output;  ``gradient``: ∂loss/∂output;
- ``weight``: the layer's trainable weights (pooled);  ``weight_gradient``: their gradients (pooled);

each as its RMS √mean(x²) and, for every format of :data:`llm_unitscale.precision.FORMATS` (float16,
bfloat16, E4M3, E5M2), the shares of its values that a cast would flush to zero (underflow), leave subnormal,
or saturate (overflow) — :func:`llm_unitscale.precision.value_shares`. ``totals`` pool every layer.

**What is measured: the float32 shadow.** The probe pass runs the current weights in exact float32 — every
layer's dtype policy is switched to float32 and simulated FP8 is off for that pass, then restored (layers that
Keras quantized itself keep their float8 policy). So the shares say which values *would* underflow or overflow
in each format, including those a float16 run has already lost (in the float16 pass they would just be zeros,
indistinguishable from true zeros). That is also how FP8 saturation and flush-to-zero are counted: the FP8
rounding in the training step only clips; the tracker counts what it clips and flushes.

Outputs: ``scales.json`` (all records, written after each record), TensorBoard scalars under
``<log_dir>/scales`` (RMS of each quantity per layer; under/overflow shares in float16 and in the FP8 format of
that direction: E4M3 forward, E5M2 backward; histograms of log2|x| of every layer's activations and gradients),
and ``scales.png`` at the end of training: per-layer RMS on a log
axis against the shaded float16 and FP8 ranges (the picture that shows why unit scaling works).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from llm_unitscale import files, precision, runs
from llm_unitscale.analysis import LayerProbe

SCALES_JSON, SCALES_PNG = "scales.json", "scales.png"
QUANTITIES = ("activation", "gradient", "weight", "weight_gradient")
#: The formats written to TensorBoard for each quantity (forward values meet E4M3, gradients E5M2).
TB_FORMATS = {"activation": ("float16", "e4m3"), "weight": ("float16", "e4m3"),
              "gradient": ("float16", "e5m2"), "weight_gradient": ("float16", "e5m2")}


def summarize(values: list[Any]) -> dict | None:
    """RMS and per-format shares of a list of tensors pooled together; None when there are no values."""
    arrays = [np.asarray(tf.convert_to_tensor(v), dtype=np.float64).ravel() for v in values if v is not None]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return None
    a = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    finite = a[np.isfinite(a)]
    out: dict = {"rms": float(np.sqrt(np.mean(finite * finite))) if finite.size else float("nan"), "count": a.size}
    for name, fmt in precision.FORMATS.items():
        out[name] = precision.value_shares(a, fmt)
    return out


def _pool(parts: list[dict]) -> dict | None:
    """Combine summaries of disjoint value sets (RMS and shares weighted by their counts)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    n = sum(p["count"] for p in parts)
    out: dict = {"rms": math.sqrt(sum(p["rms"] ** 2 * p["count"] for p in parts) / n), "count": n}
    for name in precision.FORMATS:
        out[name] = {k: sum(p[name][k] * p["count"] for p in parts) / n for k in parts[0][name]}
    return out


@contextlib.contextmanager
def float32_shadow(*models: keras.Model) -> Iterator[None]:
    """Within this context every (non-quantized) layer of ``models`` computes in float32, with FP8 off."""
    saved = []
    for model in models:
        for layer in model._flatten_layers(include_self=True):
            policy = layer.dtype_policy
            if policy.quantization_mode is None and policy != keras.DTypePolicy("float32"):  # fp8's is float32 too
                saved.append((layer, policy))
                layer.dtype_policy = "float32"
    try:
        with precision.fp8(False):
            yield
    finally:
        for layer, policy in saved:
            layer.dtype_policy = policy


class ScaleTracker(keras.callbacks.Callback):
    """Record per-layer scales every ``every`` optimizer steps on one fixed batch (see the module docstring).

    token_ids: the fixed batch (B, T); targets: its targets (default: next token / alternating classes);
    out_dir: where scales.json and scales.png go (None: keep in memory, ``self.records``); log_dir: TensorBoard
    folder (None: no TensorBoard); loss: the training loss (default: the model's own, as in training).
    """

    def __init__(
        self,
        token_ids: Any,
        targets: Any | None = None,
        every: int = 100,
        out_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        loss: keras.losses.Loss | None = None,
    ) -> None:
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.token_ids = np.asarray(token_ids, dtype=np.int32)
        self.targets = None if targets is None else np.asarray(targets)
        self.every = int(every)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.loss = loss
        self.records: list[dict] = []
        self._probe: LayerProbe | None = None
        self._histograms: dict[str, Any] = {}  # the last probe's activations and gradients, for TensorBoard
        self._writer: Any = None

    # -------------------------------------------------------------------------------------------- measuring
    def measure(self) -> dict:
        """One probe pass now: {"layers": [{name, activation, gradient, weight, weight_gradient}], "totals"}."""
        if self._probe is None:
            self._probe = LayerProbe(self.model)
        with float32_shadow(self.model, self._probe.probe):
            tensors = self._probe(self.token_ids, self.targets, self.loss)
        self._histograms = {f"{t.name}/{q}": v for t in tensors
                            for q, v in (("activation", t.output), ("gradient", t.grad_output)) if v is not None}
        layers = []
        for t in tensors:
            layers.append({
                "name": t.name,
                "activation": summarize([t.output]),
                "gradient": summarize([t.grad_output]),
                "weight": summarize(list(t.weights.values())),
                "weight_gradient": summarize(list(t.weight_grads.values())),
            })
        totals = {q: _pool([layer[q] for layer in layers]) for q in QUANTITIES}
        totals["all_gradients"] = _pool([totals["gradient"], totals["weight_gradient"]])
        return {"layers": layers, "totals": totals}

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy()) if self.model.optimizer is not None else 0

    def record(self) -> dict:
        """Measure, append to ``records``, write TensorBoard scalars and scales.json."""
        step = self._step()
        entry = {"step": step, **self.measure()}
        self.records = [r for r in self.records if r["step"] != step] + [entry]
        self._write_tensorboard(entry)
        if self.out_dir is not None:
            files.atomic_write_json(self.out_dir / SCALES_JSON, self.document())
        return entry

    def document(self) -> dict:
        """The scales.json document."""
        return {
            "every": self.every,
            "batch_shape": list(self.token_ids.shape),
            "measured_in": "float32 shadow pass (shares: values that would underflow/overflow in each format)",
            "formats": {n: {"max": f.max, "min_normal": f.min_normal, "min_subnormal": f.min_subnormal}
                        for n, f in precision.FORMATS.items()},
            "records": self.records,
        }

    def _write_tensorboard(self, entry: dict) -> None:
        if self.log_dir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir / "scales"))
        with self._writer.as_default(step=entry["step"]):
            for layer in [*entry["layers"], {"name": "total", **entry["totals"]}]:
                for q in QUANTITIES:
                    s = layer.get(q)
                    if not s:
                        continue
                    tf.summary.scalar(f"{layer['name']}/{q}_rms", s["rms"])
                    for fmt in TB_FORMATS[q]:
                        tf.summary.scalar(f"{layer['name']}/{q}_underflow_{fmt}", s[fmt]["underflow"])
                        tf.summary.scalar(f"{layer['name']}/{q}_overflow_{fmt}", s[fmt]["overflow"])
            for name, values in self._histograms.items():  # log2|x|: where the values sit against each format
                magnitude = tf.abs(tf.cast(values, tf.float32))
                tf.summary.histogram(f"{name}_log2_abs", tf.math.log(magnitude[magnitude > 0]) / math.log(2.0))
        self._writer.flush()

    # ------------------------------------------------------------------------------------------- callbacks
    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.out_dir is not None and (self.out_dir / SCALES_JSON).is_file() and not self.records:
            with contextlib.suppress(OSError, ValueError, KeyError):  # a resumed run keeps its earlier records
                step = self._step()
                old = json.loads((self.out_dir / SCALES_JSON).read_text(encoding="utf-8"))["records"]
                self.records = [r for r in old if r["step"] < step]
        self.record()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._step() % self.every == 0:
            self.record()

    def on_train_end(self, logs: dict | None = None) -> None:
        if not self.records or self.records[-1]["step"] != self._step():
            self.record()
        if self.out_dir is not None:
            plot_scales(self.records, self.out_dir / SCALES_PNG)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------------------------------------ the plot
def plot_scales(records: list[dict], path: str | Path, title: str | None = None) -> None:
    """scales.png: per-layer RMS (first and last record) on a log axis, float16 and FP8 ranges shaded.

    Left: forward values (activations, weights) against float16 and E4M3; right: gradients (∂outputs, weight
    gradients) against float16 and E5M2. Dark band: normal range; light band: subnormal range (fewer bits).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no scale records to plot")
    first, last = records[0], records[-1]
    names = [layer["name"] for layer in last["layers"]]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.55 * len(names) + 6), 5.5), sharey=True)
    panels = (("forward", ("activation", "weight"), precision.E4M3), ("backward", ("gradient", "weight_gradient"),
                                                                      precision.E5M2))
    values_seen = []
    for ax, (label, quantities, fp8) in zip(axes, panels, strict=True):
        for fmt, color in ((precision.FLOAT16, "tab:blue"), (fp8, "tab:orange")):
            ax.axhspan(fmt.min_normal, fmt.max, color=color, alpha=0.13, lw=0, label=f"{fmt.name} normal")
            ax.axhspan(fmt.min_subnormal, fmt.min_normal, color=color, alpha=0.05, lw=0,
                       label=f"{fmt.name} subnormal")
        for q, marker in zip(quantities, ("o", "s"), strict=True):
            for rec, style, alpha in ((first, "--", 0.45), (last, "-", 1.0)):
                ys = [(layer.get(q) or {}).get("rms", np.nan) for layer in rec["layers"]]
                ys = [y if y and y > 0 else np.nan for y in ys]
                values_seen.extend(y for y in ys if np.isfinite(y))
                ax.plot(x[: len(ys)], ys, style, marker=marker, alpha=alpha, label=f"{q} RMS (step {rec['step']})")
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{label}: float16 and {fp8.name} ranges")
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7, loc="lower left")
    lo = min([*values_seen, precision.E5M2.min_subnormal]) / 10
    hi = max([*values_seen, precision.FLOAT16.max]) * 10
    axes[0].set_ylim(lo, hi)
    axes[0].set_ylabel("RMS (float32 shadow pass)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    runs.save_figure(fig, path)
