"""u-μP learning-rate transfer: does the best learning rate stay put when the model gets wider?

For widths 64, 128, 256 (fixed depth, heads, sequence, batch and steps) trains the transformer LM on gensim's
``lee_background.cor`` at a grid of learning rates, twice:

- unit-scaled with u-μP per-parameter multipliers (``--lr-rule umup``, ``llm_unitscale.optimizers``): the lr
  axis is the base rate η;
- the stock-Keras baseline (``--no-unit-scaling``, one learning rate for every parameter).

Prints a table (validation loss per width × lr), the best lr per width for each model, and writes
``benchmarks/results/lr_transfer.json`` and ``lr_transfer.png`` (loss vs lr, one line per width; left panel
unit-scaled + u-μP, right panel baseline). The claim it tests: the unit-scaled optimum stays at the same η across
widths while the baseline's moves. Not a test. ``--quick`` (100 steps, depth 2, sequence 32, 4 rates each, no XLA)
takes about 10 minutes on 2 idle CPU cores; the full run (400 steps, depth 4, 6 rates) takes a few hours there.

    python benchmarks/lr_transfer.py --quick
    python benchmarks/lr_transfer.py --steps 400 --widths 64 128 256 512
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

from gensim.test.utils import datapath

from llm_unitscale.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
UNIT_LRS = (0.03, 0.1, 0.3, 1.0, 3.0)
STOCK_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
QUICK_UNIT_LRS = (0.03, 0.1, 0.3, 1.0)
QUICK_STOCK_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def run_one(width: int, unit: bool, lr: float, args: argparse.Namespace, tmp: str) -> dict:
    """Train one (width, model, lr) point; returns its row."""
    cfg = TrainConfig(
        data=datapath("lee_background.cor"), out=str(Path(tmp) / f"{width}_{unit}_{lr}"), max_steps=args.steps,
        lr=lr, unit_scaling=unit, lr_rule="umup" if unit else "uniform", width=width, depth=args.depth,
        heads=args.heads, seq_len=args.seq_len, batch_size=args.batch_size, embeddings="none",
        warmup_steps=max(args.steps // 10, 1), seed=args.seed, strategy="none", jit_compile=not args.quick,
    )
    started = time.perf_counter()
    summary = train(cfg, log=io.StringIO())
    loss = summary["val_loss"]
    return {"model": "unit-scaled+umup" if unit else "baseline", "width": width, "lr": lr,
            "val_loss": round(loss, 4) if math.isfinite(loss) else None,
            "train_loss": round(summary["loss"], 4), "seconds": round(time.perf_counter() - started, 1)}


def best_lrs(rows: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    """{model: {width: (best lr, its val loss)}} over the rows with a finite loss."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for r in rows:
        if r["val_loss"] is None:
            continue
        cur = out.setdefault(r["model"], {}).get(r["width"])
        if cur is None or r["val_loss"] < cur[1]:
            out[r["model"]][r["width"]] = (r["lr"], r["val_loss"])
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Loss vs lr (log axis), one line per width, one panel per model; the best point of each line marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ("unit-scaled+umup", "baseline")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    best = best_lrs(rows)
    for ax, model in zip(axes, models, strict=True):
        widths = sorted({r["width"] for r in rows if r["model"] == model})
        for width in widths:
            pts = sorted((r["lr"], r["val_loss"]) for r in rows
                         if r["model"] == model and r["width"] == width and r["val_loss"] is not None)
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"width {width}")
            if width in best.get(model, {}):
                lr, loss = best[model][width]
                ax.plot([lr], [loss], "*", ms=16, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate η" if model != "baseline" else "learning rate")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("unit-scaled + u-μP multipliers" if model != "baseline" else "stock Keras baseline")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="100 steps, depth 2, sequence 32, 4 rates per model, no XLA (compiling costs more "
                        "than 100 steps)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--depth", type=int, default=None, help="blocks (default 4, --quick 2)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="both", choices=("both", "unit", "baseline"))
    parser.add_argument("--out", default=str(RESULTS / "lr_transfer"), help="JSON/PNG path without suffix")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len = 100, 32
    args.depth = args.depth or (2 if args.quick else 4)
    unit_lrs, stock_lrs = (QUICK_UNIT_LRS, QUICK_STOCK_LRS) if args.quick else (UNIT_LRS, STOCK_LRS)
    plan = [(True, unit_lrs), (False, stock_lrs)]
    plan = [p for p in plan if args.models == "both" or (args.models == "unit") == p[0]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"lee_background.cor, transformer depth {args.depth}, seq {args.seq_len}, batch {args.batch_size}, "
             f"{args.steps} steps, no Word2Vec{', no XLA' if args.quick else ''}")
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            for unit, lrs in plan:
                for lr in lrs:
                    try:
                        row = run_one(width, unit, lr, args, tmp)
                    except FloatingPointError:
                        row = {"model": "unit-scaled+umup" if unit else "baseline", "width": width, "lr": lr,
                               "val_loss": None, "train_loss": None, "seconds": None}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    out.with_suffix(".json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"), title)
    print(title + f" ({time.perf_counter() - started:.0f} s)")
    for model, lrs in (("unit-scaled+umup", unit_lrs), ("baseline", stock_lrs)):
        if not any(r["model"] == model for r in rows):
            continue
        print(f"{model:18} {'width':>5} " + " ".join(f"{'lr ' + format(lr, 'g'):>10}" for lr in lrs))
        for width in args.widths:
            cells = []
            for lr in lrs:
                r = next((r for r in rows if r["model"] == model and r["width"] == width and r["lr"] == lr), None)
                cells.append(f"{'diverged' if r is None or r['val_loss'] is None else format(r['val_loss'], '.4f'):>10}")
            print(f"{'':18} {width:>5} " + " ".join(cells))
    for model, per_width in best_lrs(rows).items():
        print(f"best {model}: " + ", ".join(f"width {w}: lr {lr:g} (val loss {loss:.4f})"
                                           for w, (lr, loss) in sorted(per_width.items())))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
