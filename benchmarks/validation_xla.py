"""Validation with and without XLA (not a test): seconds for a run's first whole-tail validation and for a
later one, on the character recipe model, each mode in fresh processes, interleaved.

    python benchmarks/validation_xla.py              # 3 fresh processes per mode, warpeace's tail
    python benchmarks/validation_xla.py --repeats 5 --json

What is measured: the recipe model (4 layers, 4 heads, width 128, context 64; unit-scaled, built and compiled
as ``train.py`` does: ``training.compile_model``, ``training.build_training_variables``) evaluates the last
10 % of ``../shared/data/warpeace.txt`` (characters as ids: 319,662 tokens, 4994 windows of 64 in batches of
``training.validation_batch(12, 64)`` = 120, so a partial last batch) with ``model.evaluate``: once right after
start (first validation: tracing + compilation for each batch shape + the pass) and once more (compiled).
"xla" is what a run that validates at least ``training.XLA_VALIDATIONS`` times gets, "no xla" what a run that
validates once gets (``training.compile_validation``). Prints the median and range of each number over the
repeats, and the break-even count of validations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "warpeace.txt"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(validations: int) -> None:
    """One fresh process: build, compile and time two validations; prints one JSON line."""
    import time

    import numpy as np

    from llm_unitscale import data, training
    from llm_unitscale.models import build_model

    text = CORPUS.read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9):]
    chars = sorted(set(text))
    index = {c: i + 1 for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in tail), dtype=np.int32, count=len(tail))
    ds = data.lm_eval_batches(ids, 64, training.validation_batch(12, 64))
    cfg = training.TrainConfig(tokenizer="char", batch_size=12, seq_len=64, width=128, depth=4, heads=4,
                               max_steps=2000, jit_compile=True)
    model = build_model(vocab_size=len(chars) + 1, seq_len=64, width=128, depth=4, heads=4)
    training.compile_model(cfg, model, training.make_optimizer(cfg, 3e-2, 2000))
    training.build_training_variables(model, ds.element_spec)
    training.compile_validation(model, validations)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.evaluate(ds, verbose=0)
        times.append(time.perf_counter() - start)
    print(json.dumps({"first": times[0], "later": times[1]}))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    from llm_unitscale import training

    modes = {"no xla": 1, "xla": training.XLA_VALIDATIONS}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, validations in modes.items():  # interleaved: machine noise hits both modes
            out = subprocess.run([sys.executable, __file__, "--child", str(validations)], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = {mode: {key: [r[key] for r in runs] for key in ("first", "later")} for mode, runs in results.items()}
    med = {mode: {k: statistics.median(v) for k, v in cols.items()} for mode, cols in table.items()}
    saved_first = med["xla"]["first"] - med["no xla"]["first"]
    cost_later = med["no xla"]["later"] - med["xla"]["later"]
    if args.json:
        print(json.dumps({"repeats": args.repeats, "seconds": table, "median": med}, indent=1))
        return
    print(f"whole-tail validation of warpeace (4994 windows), seconds, {args.repeats} fresh process(es) per mode")
    print(f"{'mode':8} {'first validation':>22} {'later validation':>22}")
    for mode, cols in table.items():
        print(f"{mode:8} {summary(cols['first']):>22} {summary(cols['later']):>22}")
    print(f"without XLA the first validation is {saved_first:+.2f} s shorter and each later one {cost_later:+.2f} s "
          f"longer (medians): a run validating once saves {saved_first:.2f} s, twice "
          f"{saved_first - cost_later:+.2f} s")


if __name__ == "__main__":
    main()
