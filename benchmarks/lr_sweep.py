"""Learning-rate sweep: unit-scaled (UnitScaling constraint on) vs the stock-Keras baseline, same shape and budget.

Trains the default transformer LM on gensim's ``lee_background.cor`` for a fixed number of steps at each
learning rate and prints the validation loss table; the best rate of each model is what ``train.py`` uses
by default (``training.DEFAULT_LR``). Not a test: run ``python benchmarks/lr_sweep.py [--steps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from gensim.test.utils import datapath

from llm_unitscale.training import TrainConfig, train

UNIT_LRS = (3e-3, 7e-3, 1e-2, 2e-2)
STOCK_LRS = (5e-4, 1e-3, 1.5e-3, 3e-3)


def sweep(steps: int, unit_lrs: tuple, stock_lrs: tuple, extra: dict, models: str = "both") -> list[dict]:
    rows = []
    plan = [(True, unit_lrs), (False, stock_lrs)]
    plan = [p for p in plan if models == "both" or (models == "unit") == p[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for unit_scaling, lrs in plan:
            for lr in lrs:
                cfg = TrainConfig(
                    data=datapath("lee_background.cor"), out=str(Path(tmp) / f"{unit_scaling}_{lr}"),
                    max_steps=steps, lr=lr, unit_scaling=unit_scaling, **extra,
                )
                summary = train(cfg, log=io.StringIO())
                row = {"model": "unit-scaled" if unit_scaling else "baseline", "lr": lr,
                       "val_loss": round(summary["val_loss"], 4), "val_accuracy": round(summary["val_accuracy"], 4),
                       "val_perplexity": round(summary["val_perplexity"], 2),
                       "tokens_per_second": summary["tokens_per_second"]}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--quick", action="store_true", help="200 steps, 3 rates each")
    parser.add_argument("--constraint", default="rms", choices=("rms", "l2", "none"))
    parser.add_argument("--embeddings", default="word2vec", help="word2vec (default) or none")
    parser.add_argument("--models", default="both", choices=("both", "unit", "baseline"),
                        help="run one side only (e.g. two processes side by side)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    steps = 200 if args.quick else args.steps
    unit_lrs, stock_lrs = (UNIT_LRS[:3], STOCK_LRS[1:]) if args.quick else (UNIT_LRS, STOCK_LRS)
    extra = {"constraint": None if args.constraint == "none" else args.constraint, "embeddings": args.embeddings}
    rows = sweep(steps, unit_lrs, stock_lrs, extra, args.models)
    print(f"lee_background.cor, default transformer, {steps} steps, constraint {args.constraint}, "
          f"embeddings {args.embeddings}")
    print(f"{'model':12} {'lr':>8} {'val loss':>9} {'val acc':>8} {'val ppl':>9} {'tok/s':>8}")
    for r in rows:
        print(f"{r['model']:12} {r['lr']:>8g} {r['val_loss']:>9.4f} {r['val_accuracy']:>8.2%} "
              f"{r['val_perplexity']:>9.2f} {r['tokens_per_second']:>8.0f}")
    for model in sorted({r["model"] for r in rows}, reverse=True):
        best = min((r for r in rows if r["model"] == model), key=lambda r: r["val_loss"])
        print(f"best {model}: lr {best['lr']:g}, val loss {best['val_loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
