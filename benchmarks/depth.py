"""Unit scale in deep and long models, and what depth does to training.

Three parts (``--part scales|transfer|deep``, default ``scales``):

``scales``   per-block RMS at init of the block outputs, their gradients and every weight gradient, for depth
             4, 12, 24 × sequence length 64, 512, 2048 (width 128), unit-scaled vs stock Keras: a table with the
             worst values and how many fall outside [0.5, 2], and ``depth_scales.png`` (block output RMS and the
             extreme weight-gradient RMS by block). Random token ids, one sequence, no training. About 10 minutes
             on 2 cores; ``--quick`` leaves out T = 2048 and depth 24.
``transfer`` u-μP's learning-rate transfer along depth: the best learning rate (×2 grid) of the unit-scaled model
             with ``--lr-rule umup`` at depth 2, 4, 8, and of the baseline, on ``warpeace.txt`` at char level
             (short runs; ``--steps``).
``deep``     the same short training at depth 12: unit-scaled vs baseline, float32 and fp8, val loss side by side.

    python benchmarks/depth.py                       # the init table and plot
    python benchmarks/depth.py --part transfer --steps 300
    python benchmarks/depth.py --part deep --steps 300 --seq-len 256

Writes ``benchmarks/results/depth_<part>.json`` (and the plot). Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "warpeace.txt"
BAND = (0.5, 2.0)


# ------------------------------------------------------------------------------------------------- scales
def block_scales(depth: int, length: int, unit: bool, width: int = 128, seed: int = 0) -> dict:
    """One forward/backward pass at init; per-block output, ∂output and the extremes of the weight gradients."""
    import keras

    from llm_unitscale.analysis import scale_report
    from llm_unitscale.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(vocab_size=1000, seq_len=length, width=width, depth=depth, heads=4, unit_scaling=unit,
                        tau=None if unit else 0.5)
    ids = np.random.default_rng(seed).integers(4, 1000, (1, length))
    report = scale_report(model, ids)
    if unit:  # one UnitTransformerBlock layer per block
        blocks = [r for r in report if r.name.startswith("block_")]
        weight_grads = [list(r.weight_grads.values()) for r in blocks]
    else:  # the stock blocks are groups of layers named block_i_*: each block's output is its last add
        blocks = [r for r in report if r.name.endswith("_mlp_add")]
        weights = {}
        for r in report:
            if r.name.startswith("block_"):
                key = "_".join(r.name.split("_")[:2])
                weights.setdefault(key, []).extend(r.weight_grads.values())
        weight_grads = list(weights.values())
    values = {
        "output": [r.output for r in blocks],
        "grad_output": [r.grad_output for r in blocks],
        "weight_grad_min": [min(w) for w in weight_grads],
        "weight_grad_max": [max(w) for w in weight_grads],
    }
    everything = values["output"] + values["grad_output"] + [v for w in weight_grads for v in w]
    values["outside_band"] = sum(not BAND[0] <= v <= BAND[1] for v in everything)
    values["count"] = len(everything)
    return values


def part_scales(args: argparse.Namespace) -> dict:
    depths = (4, 12) if args.quick else (4, 12, 24)
    lengths = (64, 512) if args.quick else (64, 512, 2048)
    rows = []
    print(f"{'model':12} {'depth':>5} {'T':>5} | {'block outputs (min–max)':>24} | {'∂outputs':>12} | "
          f"{'weight grads':>14} | outside [0.5, 2]", flush=True)
    for depth in depths:
        for length in lengths:
            for unit in (True, False):
                started = time.perf_counter()
                v = block_scales(depth, length, unit)
                row = {"model": "unit-scaled" if unit else "baseline", "depth": depth, "seq_len": length, **v,
                       "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(f"{row['model']:12} {depth:5d} {length:5d} | {min(v['output']):10.3g} – {max(v['output']):9.3g} |"
                      f" {min(v['grad_output']):5.2g}–{max(v['grad_output']):<5.2g} | "
                      f"{min(v['weight_grad_min']):6.2g}–{max(v['weight_grad_max']):<6.2g} | "
                      f"{v['outside_band']} of {v['count']}", flush=True)
    plot_scales(rows, RESULTS / "depth_scales.png")
    return {"rows": rows}


def plot_scales(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm_unitscale.runs import save_figure

    depth = max(r["depth"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in (r for r in rows if r["depth"] == depth):
        style = "-" if r["model"] == "unit-scaled" else "--"
        label = f"{r['model']}, T={r['seq_len']}"
        axes[0].plot(r["output"], style, label=label)
        axes[1].plot(r["weight_grad_max"], style, label=label)
    for ax, title in zip(axes, (f"block output RMS at init (depth {depth})", "largest weight-gradient RMS"),
                         strict=True):
        ax.set_yscale("log")
        ax.axhspan(*BAND, color="green", alpha=0.08)
        ax.set_xlabel("block")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- training
def short_run(depth: int, unit: bool, lr: float, args: argparse.Namespace, tmp: str, precision: str = "float32",
              lr_rule: str = "umup") -> dict:
    from llm_unitscale.training import TrainConfig, train

    cfg = TrainConfig(
        data=str(args.data), out=str(Path(tmp) / f"d{depth}_{unit}_{lr}_{precision}"), tokenizer="char",
        max_steps=args.steps, lr=lr, unit_scaling=unit, lr_rule=lr_rule if unit else "uniform", depth=depth,
        width=args.width, heads=4, seq_len=args.seq_len, batch_size=args.batch_size, embeddings="none",
        precision=precision, seed=0, strategy="none", checkpoint_every=10**6,
    )
    started = time.perf_counter()
    summary = train(cfg, log=io.StringIO())
    loss = summary["val_loss"]
    return {"model": "unit-scaled" if unit else "baseline", "depth": depth, "lr": lr, "precision": precision,
            "val_loss": round(loss, 4) if math.isfinite(loss) else None,
            "seconds": round(time.perf_counter() - started, 1)}


def part_transfer(args: argparse.Namespace) -> dict:
    grids = {True: [args.unit_lr * 2.0**k for k in range(-2, 3)], False: [args.stock_lr * 2.0**k for k in range(-2, 3)]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in (2, 4, 8):
            for unit in (True, False):
                for lr in grids[unit]:
                    row = short_run(depth, unit, lr, args, tmp)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    best = {}
    for unit in ("unit-scaled", "baseline"):
        for depth in (2, 4, 8):
            mine = [r for r in rows if r["model"] == unit and r["depth"] == depth and r["val_loss"] is not None]
            top = min(mine, key=lambda r: r["val_loss"])
            best[f"{unit} depth {depth}"] = {"lr": top["lr"], "val_loss": top["val_loss"]}
    for key, value in best.items():
        print(f"best lr, {key}: {value['lr']:g} (val {value['val_loss']:.4f})")
    return {"rows": rows, "best": best}


def part_deep(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for unit, lr in ((True, args.unit_lr), (False, args.stock_lr)):
            if ("unit" if unit else "baseline") not in args.models:
                continue
            for precision in args.precisions:
                row = short_run(12, unit, lr, args, tmp, precision)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for model in ("unit-scaled", "baseline"):
        f32, f8 = (next((r for r in rows if r["model"] == model and r["precision"] == p), {}) for p in ("float32", "fp8"))
        if f32.get("val_loss") and f8.get("val_loss"):
            print(f"{model}: fp8 vs float32 {100 * (f8['val_loss'] / f32['val_loss'] - 1):+.2f} %")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="scales", choices=("scales", "transfer", "deep"))
    parser.add_argument("--quick", action="store_true", help="scales: leave out T = 2048 and depth 24")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--models", nargs="+", choices=("unit", "baseline"), default=["unit", "baseline"],
                        help="deep: which models to train (both by default)")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "fp8"), default=["float32", "fp8"],
                        help="deep: which formats to train in (both by default)")
    parser.add_argument("--unit-lr", type=float, default=0.3, help="centre of the unit-scaled grid (u-μP base η)")
    parser.add_argument("--stock-lr", type=float, default=2e-3, help="centre of the baseline's grid")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = {"scales": part_scales, "transfer": part_transfer, "deep": part_deep}[args.part](args)
    result.update(part=args.part, seconds=round(time.perf_counter() - started, 1), argv=sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"depth_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
