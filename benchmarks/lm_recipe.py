"""nanoGPT's CPU recipe, character level, unit-scaled vs the stock-Keras twin, as a user runs it.

    python benchmarks/lm_recipe.py [--corpora warpeace sanguo] [--steps 2000] [--eval-every 250]
                                   [--repeats 1] [--lr-unit X] [--lr-stock X] [--nanogpt-python PY]
                                   [--word2vec train|reuse] [--plot FILE] [--json]

The recipe (nanoGPT's README, "I only have a macbook"): 4 layers, 4 heads, width 128, context 64, batch 12,
2000 steps, character tokens. Each system is the real command, ``train.py DATA --tokenizer char …`` in a child
process (``--no-unit-scaling`` for the stock twin), on the first 90 % of ``../shared/data/CORPUS.txt``; the
validation loss is over the whole last 10 % (nats per character), every ``--eval-every`` steps.

Reported per system: the validation loss at each evaluation, the wall seconds to it from the command's start,
the whole command's wall time, the start-up (command start to the first optimizer step: imports, reading,
tokenising, building, tracing) and the time after the last validation (saving the run). With ``--repeats N``
each system runs N times with seeds 0…N−1 and the table gives the median and the range.

Word2Vec: with ``--word2vec train`` (the default) every command trains its character vectors, as a user's first
run on a file does (``LLM_UNITSCALE_WORD2VEC_CACHE=0``); with ``--word2vec reuse`` every command reads them
from the cache beside the prepared corpus, as a later run on the same file does (``embedding_cache``), after an
untimed one-step run per seed has kept them. The prepared corpus is read from the cache in both.

nanoGPT on the same machine: ``--nanogpt-python PYTHON`` (an interpreter with PyTorch) runs the same recipe in
nanoGPT's own model and loop (``benchmarks/nanogpt_twin.py``, alternating with the two systems), adds its row —
its own validation estimate (20 random batches) at each evaluation, its loss over the whole tail at the end —
and prints each system's wall time over nanoGPT's, per seed. Without it, the figures nanoGPT reached on the
data's reference machine are printed instead, which compare with this machine's only if it is as fast.
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
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ["--tokenizer", "char", "--batch-size", "12", "--seq-len", "64", "--width", "128", "--depth", "4",
          "--heads", "4"]
#: nanoGPT on the data's reference machine (its CPU recipe, 2000 steps): validation loss and wall seconds.
NANOGPT = {"warpeace": (1.760, 73.0), "sanguo": (4.774, 120.0)}
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?([\d.]+) ms/step")


def run_once(data: Path, unit: bool, lr: float | None, steps: int, eval_every: int, seed: int,
             env: dict[str, str]) -> dict:
    """One ``train.py`` command in the environment ``env`` (:func:`child_env`, made before the clock starts); the
    stderr lines are timestamped as they arrive."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, str(ROOT / "train.py"), str(data), "--out", str(out), *RECIPE,
                   "--max-steps", str(steps), "--eval-every", str(eval_every), "--log-every", "50",
                   "--seed", str(seed), "--json"]
        command += [] if unit else ["--no-unit-scaling"]
        command += [] if lr is None else ["--lr", str(lr)]
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        first_step = None
        word2vec = "none"
        validations: list[float] = []
        assert child.stderr is not None
        for line in child.stderr:
            now = time.perf_counter() - started
            if first_step is None and (match := STEP_LINE.match(line.strip())):
                first_step = now - int(match.group(1)) * float(match.group(2)) / 1000.0
            if "val_loss" in line:
                validations.append(now)
            if line.startswith("training Word2Vec"):
                word2vec = "trained"
            elif line.startswith("Word2Vec (") and "reusing" in line:
                word2vec = "reused"
        stdout = child.stdout.read() if child.stdout else ""
        code = child.wait()
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"error: {' '.join(command)} exited {code}")
        json.loads(stdout)  # the run's summary: a valid document, or the run failed
        history = json.loads((out / "history.json").read_text())
        lr_used = json.loads((out / "config.json").read_text()).get("learning_rate")
    val = history["val_loss"]
    seconds = validations[-len(val):] if len(validations) >= len(val) else [float("nan")] * len(val)
    return {"steps": [int(s) for s in history["step"]], "val_loss": val, "seconds_to": seconds, "wall": wall,
            "startup": first_step if first_step is not None else float("nan"),
            "after_last_validation": wall - seconds[-1], "lr": lr_used, "final": val[-1], "word2vec": word2vec}


def child_env(reuse_word2vec: bool) -> dict[str, str]:
    """A command's environment: the checkout importable, the Word2Vec cache on or off."""
    from llm_unitscale.embedding_cache import ENV

    return {**os.environ, "PYTHONPATH": str(ROOT), ENV: "1" if reuse_word2vec else "0"}


def keep_word2vec(data: Path, seed: int) -> None:
    """An untimed one-step run of the recipe, so that the cache holds the corpus's vectors for ``seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "train.py"), str(data), "--out", str(Path(tmp) / "run"), *RECIPE,
                   "--max-steps", "1", "--seed", str(seed)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env(True))
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}")


def run_nanogpt(python: str, data: Path, steps: int, seed: int) -> dict:
    """nanoGPT's recipe in its own loop (:mod:`nanogpt_twin`), in the interpreter ``python``; its times are
    from its own clock (process start, less the data preparation that nanoGPT runs as a separate command)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [python, str(ROOT / "benchmarks" / "nanogpt_twin.py"), str(data), tmp, "--steps", str(steps),
                   "--seed", str(seed)]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    lines = [line.split() for line in done.stdout.splitlines()]
    evals = [line for line in lines if line[0] == "eval" and int(line[1]) > 0]
    marks = {line[0]: float(line[-1]) for line in lines if line[0] in ("first-step", "done", "tail")}
    seconds = [float(line[4]) for line in evals]
    return {"steps": [int(line[1]) for line in evals], "val_loss": [float(line[3]) for line in evals],
            "seconds_to": seconds, "wall": marks["done"], "startup": marks["first-step"],
            "after_last_validation": marks["done"] - seconds[-1], "lr": 1e-3, "final": marks["tail"]}


def spread(values: list[float]) -> str:
    """Median and range of one or more runs."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", nargs="+", default=["warpeace", "sanguo"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--lr-unit", type=float, default=None, help="default: the package's default")
    p.add_argument("--lr-stock", type=float, default=None, help="default: the package's default")
    p.add_argument("--nanogpt-python", default=None, metavar="PYTHON",
                   help="a Python interpreter with PyTorch: also run nanoGPT's recipe (nanogpt_twin.py) here")
    p.add_argument("--word2vec", choices=("train", "reuse"), default="train",
                   help="train: every command trains its Word2Vec vectors (a first run on a file; default); "
                   "reuse: every command reads them from the cache (a later run)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of validation loss against wall seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.nanogpt_python and shutil.which(args.nanogpt_python) is None:
        p.error(f"--nanogpt-python: {args.nanogpt_python} is not an interpreter that can be run")

    results: dict[str, dict[str, list[dict]]] = {}
    env = child_env(args.word2vec == "reuse")  # imports the package here, not inside a timed command
    for corpus in args.corpora:
        data = DATA / f"{corpus}.txt"
        results[corpus] = {"unit": [], "stock": []} | ({"nanogpt": []} if args.nanogpt_python else {})
        for seed in range(args.repeats) if args.word2vec == "reuse" else ():
            keep_word2vec(data, seed)
        for seed in range(args.repeats):  # alternate the systems so that machine load hits each alike
            for name in results[corpus]:
                if name == "nanogpt":
                    result = run_nanogpt(args.nanogpt_python, data, args.steps, seed)
                else:
                    lr = args.lr_unit if name == "unit" else args.lr_stock
                    result = run_once(data, name == "unit", lr, args.steps, args.eval_every, seed, env)
                results[corpus][name].append(result)
                print(f"{corpus} {name} seed {seed}: val {result['final']:.4f}, {result['wall']:.1f} s",
                      file=sys.stderr, flush=True)

    # with --json the document goes to stdout and the table to stderr
    print_table(results, args.repeats, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"recipe": RECIPE, "steps": args.steps, "word2vec": args.word2vec, "nanogpt": NANOGPT,
                          "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)


def print_table(results: dict, repeats: int, file: TextIO) -> None:
    """Per corpus: the median validation loss of each system at each evaluation, wall seconds (median and
    range), start-up and the time after the last validation; the final losses and their difference; with
    nanoGPT measured, each system's wall time over nanoGPT's."""
    for corpus, systems in results.items():
        steps = sorted({s for runs in systems.values() for s in runs[0]["steps"]})
        word2vec = ", ".join(f"{name} {r['word2vec']}" for name, runs in systems.items() for r in runs[:1]
                             if "word2vec" in r and all(o.get("word2vec") == r["word2vec"] for o in runs))
        print(f"\n{corpus}: validation loss (nats/char, whole held-out tail) at step; seconds; "
              f"{repeats} run(s) each; Word2Vec vectors: {word2vec or 'mixed'}", file=file)
        print(f"{'system':<8} {'lr':>7} " + " ".join(f"{s:>7}" for s in steps)
              + f" {'wall s':>16} {'start-up s':>11} {'after s':>8}", file=file)
        for name, runs in systems.items():
            cells = []
            for step in steps:
                at = [r["val_loss"][r["steps"].index(step)] for r in runs if step in r["steps"]]
                cells.append(f"{statistics.median(at):>7.3f}" if at else f"{'':>7}")
            print(f"{name:<8} {runs[0]['lr'] or 0:>7.0e} " + " ".join(cells)
                  + f" {spread([r['wall'] for r in runs]):>16}"
                  + f" {statistics.median(r['startup'] for r in runs):>11.1f}"
                  + f" {statistics.median(r['after_last_validation'] for r in runs):>8.1f}", file=file)
        finals = {name: [r["final"] for r in runs] for name, runs in systems.items()}
        print(f"final: unit {spread(finals['unit'])}, stock {spread(finals['stock'])}, "
              f"unit − stock {statistics.median(finals['unit']) - statistics.median(finals['stock']):+.3f}",
              file=file)
        if "nanogpt" in systems:
            print(f"nanoGPT, measured here: whole tail {spread(finals['nanogpt'])} (its row above: its own "
                  f"20-batch estimate at each evaluation)", file=file)
            for name in ("unit", "stock"):
                ratios = [r["wall"] / n["wall"] for r, n in zip(systems[name], systems["nanogpt"], strict=True)]
                print(f"wall {name} / nanoGPT: {spread(ratios)} (per seed: "
                      + ", ".join(f"{x:.2f}" for x in ratios) + ")", file=file)
        elif corpus in NANOGPT:
            print(f"nanoGPT (reference machine, same recipe): {NANOGPT[corpus][0]:.3f} in "
                  f"{NANOGPT[corpus][1]:.0f} s; --nanogpt-python measures it here", file=file)


def plot(results: dict, path: Path) -> None:
    """Validation loss against wall seconds, one panel per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (corpus, systems) in zip(axes[0], results.items(), strict=True):
        for name, runs in systems.items():
            for i, r in enumerate(runs):
                ax.plot(r["seconds_to"], r["val_loss"], marker="o", label=name if i == 0 else None,
                        color={"unit": "C0", "stock": "C1"}.get(name, "C2"))
        if corpus in NANOGPT and "nanogpt" not in systems:
            ax.scatter([NANOGPT[corpus][1]], [NANOGPT[corpus][0]], marker="*", s=120, color="C2", label="nanoGPT")
        ax.set(title=corpus, xlabel="wall seconds", ylabel="validation loss (nats/char)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
