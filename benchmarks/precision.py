"""Low precision without loss scaling: unit-scaled vs the stock-Keras baseline in float32/bfloat16/float16/fp8.

Trains the same transformer LM on gensim's ``lee_background.cor`` with the same seed and number of steps for
{unit-scaled, baseline} × {float32, bfloat16, float16, fp8} (no loss scaling anywhere), plus the baseline in
float16 *with* Keras's ``LossScaleOptimizer`` (how stock Keras users run float16) and the baseline with Keras's
own float8 training (``model.quantize("float8")``, delayed scaling). Every run goes through
``training.train`` with a scale tracker at the first and last step (``--track-scales``).

Prints one table — final validation loss, its gap to the same model's float32 run, the share of gradient
values (∂ layer outputs and weight gradients, float32 shadow pass at the last step) that underflow in float16
and in E5M2, and the median step time — and writes ``precision.json`` and ``precision_loss.png`` (the training
loss per step and the validation loss per epoch of every run) into ``--out``.

Not a test: ``python benchmarks/precision.py --quick`` (a smaller model, 120 steps, no Word2Vec, no XLA) or ``python benchmarks/precision.py`` (the default transformer, 600 steps, Word2Vec init).
Step times on a shared CPU are noisy; the losses are what the benchmark is about.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from gensim.test.utils import datapath

from llm_unitscale import files, precision, runs, training

#: (label, unit_scaling, precision, loss_scaling) of every run, in table order.
RUNS = [
    ("unit-scaled", True, "float32", False),
    ("unit-scaled", True, "bfloat16", False),
    ("unit-scaled", True, "float16", False),
    ("unit-scaled", True, "fp8", False),
    ("baseline", False, "float32", False),
    ("baseline", False, "bfloat16", False),
    ("baseline", False, "float16", False),
    ("baseline", False, "fp8", False),
    ("baseline", False, "float16", True),
    ("baseline", False, "keras-float8", False),
]
#: --quick: a small model, vocabulary of words seen twice (lower-cased), no Word2Vec and no XLA (compiling
#: ten models with XLA takes longer than training them for the quick budget).
QUICK = dict(width=64, depth=2, heads=2, seq_len=32, batch_size=16, embeddings="none", min_count=2, lowercase=True,
             jit_compile=False)
FULL = dict(width=128, depth=4, heads=4, seq_len=64, batch_size=16, embeddings="word2vec")


class StepRecorder(keras.callbacks.Callback):
    """Per-step training loss (recovered from Keras's running epoch mean) and per-step wall time."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.val: list[tuple[int, float]] = []
        self._mean = 0.0
        self._k = 0
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._mean, self._k = 0.0, 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        mean = float((logs or {}).get("loss", math.nan))
        self._k += 1
        self.losses.append(self._k * mean - (self._k - 1) * self._mean)  # l_k = k·m_k − (k−1)·m_{k−1}
        self._mean = mean

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs and "val_loss" in logs:
            self.val.append((len(self.losses), float(logs["val_loss"])))


def run_one(label: str, unit_scaling: bool, prec: str, loss_scaling: bool, steps: int, shape: dict,
            folder: Path, seed: int) -> dict:
    """Train one configuration through ``training.train``; its row of the table (and curves for the plot)."""
    recorder = StepRecorder()
    original = training.make_callbacks

    def make_callbacks(*args: Any, **kwargs: Any) -> list:
        return [*original(*args, **kwargs), recorder]

    name = f"{'unit' if unit_scaling else 'base'}_{prec}{'_ls' if loss_scaling else ''}"
    cfg = training.TrainConfig(
        data=datapath("lee_background.cor"), out=str(folder / name), max_steps=steps, seed=seed,
        unit_scaling=unit_scaling, precision=prec, loss_scaling=loss_scaling, track_scales=steps, **shape,
    )
    training.make_callbacks = make_callbacks
    row: dict = {"model": label, "precision": prec + (" +loss scaling" if loss_scaling else ""),
                 "unit_scaling": unit_scaling, "loss_scaling": loss_scaling}
    try:
        summary = training.train(cfg, log=io.StringIO())
        row["val_loss"] = summary["val_loss"]
        row["status"] = "ok"
    except FloatingPointError as exc:
        row["val_loss"] = math.nan
        row["status"] = f"diverged: {exc}"
    finally:
        training.make_callbacks = original
        precision.apply("float32")
    scales_file = folder / name / "scales.json"
    if not scales_file.exists():
        scales_file = runs.partial_dir(folder / name) / "scales.json"
    if scales_file.exists():
        records = json.loads(scales_file.read_text())["records"]
        for when, rec in (("init", records[0]), ("final", records[-1])):
            grads = rec["totals"]["all_gradients"]
            row[f"grad_underflow_float16_{when}"] = grads["float16"]["underflow"]
            row[f"grad_underflow_e5m2_{when}"] = grads["e5m2"]["underflow"]
            row[f"grad_rms_{when}"] = grads["rms"]
            row[f"act_overflow_e4m3_{when}"] = rec["totals"]["activation"]["e4m3"]["overflow"]
            row[f"act_underflow_e4m3_{when}"] = rec["totals"]["activation"]["e4m3"]["underflow"]
    times = recorder.seconds[min(5, len(recorder.seconds) - 1):] if recorder.seconds else []
    row["step_ms"] = 1000 * float(np.median(times)) if times else math.nan
    row["train_loss"] = recorder.losses
    row["val_curve"] = recorder.val
    print(json.dumps({k: v for k, v in row.items() if k not in ("train_loss", "val_curve")}), file=sys.stderr,
          flush=True)
    return row


def _run_planned(planned: tuple, **kwargs: Any) -> dict:
    """``run_one`` for one entry of :data:`RUNS` (a picklable top-level function for the process pool)."""
    return run_one(*planned, **kwargs)


def add_gaps(rows: list[dict]) -> None:
    """gap = val_loss / val_loss of the same model's float32 run − 1."""
    ref = {r["unit_scaling"]: r["val_loss"] for r in rows if r["precision"] == "float32"}
    for r in rows:
        base = ref.get(r["unit_scaling"], math.nan)
        r["gap"] = r["val_loss"] / base - 1.0 if math.isfinite(r["val_loss"]) and base else math.nan


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:+.2%}"

    def share(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"

    lines = [f"{'model':12} {'precision':24} {'val loss':>9} {'vs fp32':>8} {'grad<fp16':>10} {'grad<e5m2':>10} "
             f"{'ms/step':>8}  status"]
    for r in rows:
        loss = f"{r['val_loss']:9.4f}" if math.isfinite(r["val_loss"]) else f"{'nan':>9}"
        lines.append(
            f"{r['model']:12} {r['precision']:24} {loss} {pct(r.get('gap')):>8} "
            f"{share(r.get('grad_underflow_float16_final')):>10} {share(r.get('grad_underflow_e5m2_final')):>10} "
            f"{r['step_ms']:8.1f}  {r['status'][:60]}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, unit in zip(axes, (True, False), strict=True):
        for r in (r for r in rows if r["unit_scaling"] == unit):
            losses = np.asarray(r["train_loss"], float)
            if losses.size:
                smooth = np.empty_like(losses)
                acc = losses[0]
                for i, v in enumerate(losses):  # EMA, ignoring non-finite steps
                    acc = 0.9 * acc + 0.1 * v if math.isfinite(v) else acc
                    smooth[i] = acc
                (line,) = ax.plot(np.arange(1, losses.size + 1), smooth, label=f"{r['precision']} (train, EMA)")
                if r["val_curve"]:
                    xs, ys = zip(*r["val_curve"], strict=True)
                    ax.plot(xs, ys, "o--", color=line.get_color(), ms=4, alpha=0.8)
        ax.set_title(f"{'unit-scaled' if unit else 'baseline (stock Keras)'} — dots: validation loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats/token)")
    fig.suptitle(title)
    fig.tight_layout()
    runs.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 64, depth 2, seq 32, 120 steps, no Word2Vec, no XLA")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600; 120 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated run names to keep, e.g. unit_fp8,base_fp8")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in parallel processes (default 2 with --quick, else 1); step times then share "
                        "the cores, so compare them within one table only")
    parser.add_argument("--out", default="runs/precision_benchmark", help="folder for precision.json and the plot")
    args = parser.parse_args(argv)
    steps = args.steps or (120 if args.quick else 600)
    shape = QUICK if args.quick else FULL
    plan = RUNS
    if args.only:
        keep = set(args.only.split(","))
        plan = [p for p in RUNS if f"{'unit' if p[1] else 'base'}_{p[2]}{'_ls' if p[3] else ''}" in keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = args.jobs or (2 if args.quick else 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = functools.partial(_run_planned, steps=steps, shape=shape, folder=Path(tmp), seed=args.seed)
        if jobs == 1:
            rows = [work(p) for p in plan]
        else:  # separate processes: each run has its own Keras global policy and TensorFlow graph state
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
                rows = list(pool.map(work, plan))
    add_gaps(rows)
    title = (f"lee_background.cor, transformer width {shape['width']} depth {shape['depth']} seq {shape['seq_len']}"
             f" batch {shape['batch_size']}, {steps} steps, seed {args.seed}, embeddings {shape['embeddings']}"
             f"{', no XLA' if not shape.get('jit_compile', True) else ''}")
    print(title + (f"; {jobs} runs at a time" if jobs > 1 else ""))
    print("no loss scaling unless stated; grad<fmt: share of all gradient values (∂ layer outputs, weight gradients)"
          " that flush to zero in that format, at the last step (float32 shadow pass)")
    print(table(rows))
    files.atomic_write_json(out / "precision.json", {"title": title, "steps": steps, "shape": shape, "rows": rows,
                                                    "seconds": round(time.perf_counter() - started, 1)})
    plot(rows, out / "precision_loss.png", title)
    print(f"wrote {out / 'precision.json'} and {out / 'precision_loss.png'} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
