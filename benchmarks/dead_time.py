"""Where the character recipe's command spends time besides its steps: callbacks, checkpoints, XLA compilation.

    python benchmarks/dead_time.py [--steps 2000] [--repeats 3] [--corpus warpeace] [--json]

Runs ``train.py`` on the recipe (``benchmarks/lm_recipe.py``'s options, one validation at the end) in child
processes, alternating a cold and a warm compile cache (``llm_unitscale.compile_cache``: the cache folder's
``xla/`` deleted before a cold run, kept from the previous run for a warm one; the prepared corpus is kept for
both), and reports per run kind the median and range over ``--repeats`` runs of: the whole command's wall
seconds; the mean time of the first 50 steps (tracing and XLA compilation included) and the median of the later
50-step means (the compiled step); the time Keras's callbacks
take after each step (ms per step: checkpoints, logs, early stopping — synchronous with training, so added to
it); and the number of checkpoint saves and their total seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lm_recipe import DATA, RECIPE  # noqa: E402

REPORT = re.compile(r"^dead-time (\{.*\})$")
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?([\d.]+) ms/step")


def child(argv: list[str]) -> None:
    """``train.py ARGV`` in this process, with Keras's per-step callbacks and the checkpoint saves timed."""
    from keras.src.callbacks import callback_list

    from llm_unitscale import checkpoint, cli

    timed = {"callback_s": 0.0, "steps": 0, "saves": 0, "save_s": 0.0}
    batch_end, save = callback_list.CallbackList.on_train_batch_end, checkpoint.ResumableCheckpoint.save

    def timed_batch_end(self: object, batch: int, logs: dict | None = None) -> None:
        started = time.perf_counter()
        batch_end(self, batch, logs)
        timed["callback_s"] += time.perf_counter() - started
        timed["steps"] += 1

    def timed_save(self: object) -> None:
        started = time.perf_counter()
        save(self)
        timed["save_s"] += time.perf_counter() - started
        timed["saves"] += 1

    callback_list.CallbackList.on_train_batch_end = timed_batch_end
    checkpoint.ResumableCheckpoint.save = timed_save
    status = cli.train_main(argv)
    print("dead-time " + json.dumps(timed), file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(status)


def run_once(data: Path, out: Path, cache: Path, steps: int) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(data), "--out", str(out), "--cache", str(cache), *RECIPE,
         "--max-steps", str(steps), "--log-every", "50", "--overwrite"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"train.py failed: {result.stderr[-2000:]}")
    lines = result.stderr.splitlines()
    timed = next(json.loads(m.group(1)) for line in lines if (m := REPORT.match(line)))
    step_ms = {int(m.group(1)): float(m.group(2)) for line in lines if (m := STEP_LINE.match(line))}
    later = [ms for step, ms in step_ms.items() if step > 100]
    return {"wall_s": wall, "first_50_ms_per_step": step_ms.get(50, float("nan")),
            "later_ms_per_step": statistics.median(later) if later else float("nan"),
            "callback_ms_per_step": 1000 * timed["callback_s"] / max(timed["steps"], 1),
            "saves": timed["saves"], "save_s": timed["save_s"]}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} [{min(values):.2f}–{max(values):.2f}]"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default="warpeace")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "train.txt", Path(tmp) / "cache"
        text = (DATA / f"{args.corpus}.txt").read_text(encoding="utf-8")
        data.write_text(text[: int(len(text) * 0.9)], encoding="utf-8")
        run_once(data, Path(tmp) / "run", cache, 1)  # prepares the corpus once, for every run below
        for _ in range(args.repeats):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    shutil.rmtree(cache / "xla", ignore_errors=True)
                runs[kind].append(run_once(data, Path(tmp) / "run", cache, args.steps))
                print(kind, json.dumps(runs[kind][-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "corpus": args.corpus, "runs": runs}, indent=1))
        return
    print(f"{args.corpus}, recipe, {args.steps} steps; median [range] over {args.repeats} run(s)")
    print(f"{'compile cache':14s} {'wall s':>22s} {'first 50 steps ms':>24s} {'later steps ms':>24s} "
          f"{'callbacks ms/step':>24s} "
          f"{'saves':>6s} {'saving s':>22s}")
    for kind, rows in runs.items():
        print(f"{kind:14s} {summary([r['wall_s'] for r in rows]):>22s} "
              f"{summary([r['first_50_ms_per_step'] for r in rows]):>24s} "
              f"{summary([r['later_ms_per_step'] for r in rows]):>24s} "
              f"{summary([r['callback_ms_per_step'] for r in rows]):>24s} "
              f"{statistics.median([r['saves'] for r in rows]):6.0f} {summary([r['save_s'] for r in rows]):>22s}")


if __name__ == "__main__":
    main()
