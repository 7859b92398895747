"""``evaluate.py``'s forward pass traced once against the model called eagerly (not a test): seconds to score
warpeace's held-out tail with the character recipe model, both ways in each repeat, alternating.

    python benchmarks/evaluation_pass.py               # 3 repeats
    python benchmarks/evaluation_pass.py --repeats 5 --json

What is measured: the recipe model (4 layers, 4 heads, width 128, context 64; unit-scaled, as ``build_model``
makes it: the weights do not change the time) on the last 10 % of ``../shared/data/warpeace.txt`` (characters
as ids: 319,662 tokens), cut and batched as :func:`llm_unitscale.evaluation.evaluate_lm` does (windows of 65
overlapping by one, 32 per batch, the last shorter). "traced" is :func:`evaluation.inference_pass` (one
``tf.function`` for every batch shape; its tracing included), "eager" is ``model(ids, training=False)`` per
batch, what ``evaluate_lm`` called before. Prints the median and range of each, their ratio per repeat, and
the largest difference between the two passes' logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "warpeace.txt"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from validation_xla import summary  # noqa: E402  (median [range]; benchmarks/ is the script's folder)

BATCH = 32  # evaluate_lm's default


def tail_batches(seq_len: int) -> tuple[list[np.ndarray], int]:
    """(input id batches as evaluate_lm makes them, vocabulary size) for warpeace's last 10 %."""
    from llm_unitscale.evaluation import lm_batches

    text = CORPUS.read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9):]
    index = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
    ids = np.fromiter((index[c] for c in tail), dtype=np.int32, count=len(tail))
    return [batch[:, :-1] for batch in lm_batches(ids, seq_len, BATCH)], len(index) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from llm_unitscale.evaluation import inference_pass
    from llm_unitscale.models import build_model

    batches, vocab_size = tail_batches(64)
    model = build_model(vocab_size=vocab_size, seq_len=64, width=128, depth=4, heads=4)
    seconds: dict[str, list[float]] = {"traced": [], "eager": []}
    largest_difference = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward = inference_pass(model)  # a new tf.function each repeat: its tracing is part of the time
        traced = [forward(x) for x in batches]
        seconds["traced"].append(time.perf_counter() - start)
        start = time.perf_counter()
        eager = [np.asarray(model(x, training=False)) for x in batches]
        seconds["eager"].append(time.perf_counter() - start)
        largest_difference = max(largest_difference, *(float(np.max(np.abs(a - b))) for a, b in zip(traced, eager,
                                                                                                   strict=True)))
    ratios = [e / t for e, t in zip(seconds["eager"], seconds["traced"], strict=True)]
    if args.json:
        print(json.dumps({"repeats": args.repeats, "batches": len(batches), "seconds": seconds,
                          "eager_over_traced": ratios, "largest_logit_difference": largest_difference}, indent=1))
        return
    print(f"warpeace's held-out tail ({sum(x.size for x in batches):,} tokens, {len(batches)} batches), recipe "
          f"model, seconds, {args.repeats} repeat(s) alternating")
    for mode, values in seconds.items():
        print(f"{mode:7} {summary(values):>24}")
    print(f"eager / traced: {summary(ratios)}; largest logit difference {largest_difference:.2e}")


if __name__ == "__main__":
    main()
