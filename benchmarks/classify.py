"""Text classification side by side: the unit-scaled default, the stock-Keras baseline and fastText.

For each labelled set, in one run: ``python train.py TRAIN`` (the unit-scaled default), the same with
``--no-unit-scaling`` and the baseline's best settings (:data:`STOCK_ARGS`), and fastText (the
``fasttext-numpy2`` package: ``pip install -e ".[bench]"``) with the settings in :data:`FASTTEXT`, each
trained as a subprocess and timed from start to finish (start-up included), then scored on the test file:
accuracy, macro-F1 and expected calibration error (15 equal-width bins of the top probability,
``llm_unitscale.calibration``). Ours are scored by ``evaluate.py --json``; fastText's probabilities (all
labels, ``k=-1``) go through the same functions.

Sets (``--sets``, all three by default): ``agnews`` and ``chnsenticorp`` (``../shared/data/NAME-{train,test}.txt``),
and ``polarity``: gensim's ``pang_lee_polarity.cor`` (200 sentences, cp1252), scored by 5-fold cross-validation
(each fold's 40 lines as test; the table shows the mean over folds). Chinese is given to fastText as
space-separated characters (its best input measured here: 88.3 % against 67.9 % on unsegmented text, where a
whole review is one "word").

Wall seconds are per training run (one fold): ours ``train.py`` alone, fastText training and predicting the
test file, each a fresh process (so Python and TensorFlow start-up are in them). With ``--repeats N`` every
system trains N times, the systems taking turns within a repeat; the table shows the median and the range of
the wall seconds and the median of each score (CPU runs of ours are bit-identical; fastText's threads are not).

    python benchmarks/classify.py                      # the table on stdout
    python benchmarks/classify.py --sets polarity --json
    python benchmarks/classify.py --systems unit --sets agnews --unit-args "--width 32"    # try other options

Not a test. Runs one system at a time (timings: see the README on shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_unitscale.data import parse_labelled  # noqa: E402
from llm_unitscale.evaluation import classification_scores  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SYSTEMS = ("unit", "stock", "fasttext")
#: The stock-Keras baseline at its own best settings (README, "Choosing the classifier's defaults").
STOCK_ARGS = ["--no-unit-scaling"]
#: fastText's settings per set: a user's usual choice, as in ../shared/data/README.md.
FASTTEXT = {
    "agnews": dict(epoch=10, lr=0.5, dim=100),
    "chnsenticorp": dict(epoch=25, lr=0.25, dim=100, wordNgrams=3),
    "polarity": dict(epoch=10, lr=0.5, dim=100, wordNgrams=2),
}
FASTTEXT_SCRIPT = """
import json, sys, fasttext
model = fasttext.train_supervised(sys.argv[1], verbose=0, **json.loads(sys.argv[3]))
texts = [line.rstrip("\\n").split(" ", 1)[1] if " " in line else "" for line in open(sys.argv[2], encoding="utf-8")]
labels, probs = model.predict(texts, k=-1)
print(json.dumps([dict(zip(l, map(float, p))) for l, p in zip(labels, probs)]))
"""


def split_chars(text: str) -> str:
    """fastText's input for Chinese: every non-space character separated by a space."""
    return " ".join(ch for ch in text if not ch.isspace())


def write_labelled(path: Path, labels: list[str], texts: list[str], chars: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for label, text in zip(labels, texts, strict=True):
            handle.write(f"__label__{label} {split_chars(text) if chars else text}\n")


def folds(name: str, work: Path) -> list[tuple[Path, Path]]:
    """(train, test) file pairs of a set: the dev split, or 5 cross-validation folds for polarity."""
    if name != "polarity":
        return [(DATA / f"{name}-train.txt", DATA / f"{name}-test.txt")]
    from gensim.test.utils import datapath

    lines = Path(datapath("pang_lee_polarity.cor")).read_text(encoding="cp1252").split("\n")
    labels, texts = parse_labelled(lines)
    order = np.random.default_rng(0).permutation(len(labels))
    pairs = []
    for k, test in enumerate(np.array_split(order, 5)):
        train = np.setdiff1d(order, test)
        pair = (work / f"polarity-{k}-train.txt", work / f"polarity-{k}-test.txt")
        for path, chosen in zip(pair, (train, test), strict=True):
            write_labelled(path, [labels[i] for i in chosen], [texts[i] for i in chosen])
        pairs.append(pair)
    return pairs


def timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; (result, wall seconds, CPU seconds of the process and its children: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def checked_json(result: subprocess.CompletedProcess, what: str) -> object:
    if result.returncode != 0:
        raise SystemExit(f"{what} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def run_ours(train: Path, test: Path, out: Path, args: list[str]) -> dict:
    command = [sys.executable, "train.py", str(train), "--out", str(out), "--overwrite", "--json", *args]
    result, seconds, cpu = timed(command)
    summary = checked_json(result, shlex.join(command))
    scored, _, _ = timed([sys.executable, "evaluate.py", str(test), "--model", str(out), "--json"])
    metrics = checked_json(scored, f"evaluate.py {test}")
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
            "seconds": seconds, "cpu_seconds": cpu, "steps": summary["steps"], "best_epoch": summary["best_epoch"]}


def run_fasttext(name: str, train: Path, test: Path, work: Path) -> dict:
    chars = name == "chnsenticorp"
    labelled = {}
    for role, path in (("train", train), ("test", test)):
        labels, texts = parse_labelled(path.read_text(encoding="utf-8").split("\n"))
        labelled[role] = labels
        write_labelled(work / f"fasttext-{role}.txt", labels, texts, chars)
    command = [sys.executable, "-c", FASTTEXT_SCRIPT, str(work / "fasttext-train.txt"),
               str(work / "fasttext-test.txt"), json.dumps(FASTTEXT[name])]
    result, seconds, cpu = timed(command)
    predictions = checked_json(result, "fastText")
    names = sorted(set(labelled["train"]))
    probs = np.array([[p.get(f"__label__{label}", 0.0) for label in names] for p in predictions])
    gold = np.array([names.index(g) if g in names else -1 for g in labelled["test"]])
    scores = classification_scores(gold, probs, names)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "ece": scores["ece"],
            "seconds": seconds, "cpu_seconds": cpu}


def run_system(name: str, system: str, train: Path, test: Path, work: Path, unit_args: list[str],
               stock_args: list[str], tag: str) -> dict:
    if system == "fasttext":
        return run_fasttext(name, train, test, work)
    args = unit_args if system == "unit" else [*STOCK_ARGS, *stock_args]
    return run_ours(train, test, work / f"{name}-{system}-{tag}", args)


def summarise(name: str, system: str, repeats: list[list[dict]]) -> dict:
    """One table row from ``repeats[r][fold]``: each score the median over repeats of its mean over folds;
    wall seconds per training run (one fold) as median, min and max over every run."""
    row: dict = {"set": name, "system": system, "folds": len(repeats[0]), "repeats": len(repeats)}
    for key in repeats[0][0]:
        if key not in ("seconds", "cpu_seconds"):
            row[key] = float(np.median([np.mean([fold[key] for fold in runs]) for runs in repeats]))
    seconds = [fold["seconds"] for runs in repeats for fold in runs]
    cpu = [fold["cpu_seconds"] for runs in repeats for fold in runs]
    row.update(seconds=float(np.median(seconds)), seconds_min=min(seconds), seconds_max=max(seconds),
               cpu_seconds=float(np.median(cpu)))
    return row


def benchmark(sets: list[str], systems: list[str], unit_args: list[str], stock_args: list[str],
              repeats: int = 1) -> list[dict]:
    """Every system on every set, ``repeats`` times; within a repeat the systems run one after the other, so
    the timings of a repeat see the same load on shared cores."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in sets:
            pairs = folds(name, work)
            results: dict[str, list[list[dict]]] = {system: [] for system in systems}
            for _ in range(repeats):
                for system in systems:
                    results[system].append([run_system(name, system, train, test, work, unit_args, stock_args,
                                                       str(k)) for k, (train, test) in enumerate(pairs)])
            for system in systems:
                row = summarise(name, system, results[system])
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    names = {"unit": "unit-scaled (default)", "stock": "stock Keras baseline", "fasttext": "fastText"}
    lines = [f"{'set':<13} {'system':<22} {'accuracy':>8} {'macro-F1':>8} {'ECE':>6} {'wall s: median (range)':>23} {'CPU s':>6}"]
    for row in rows:
        spread = f"{row['seconds']:.1f} ({row['seconds_min']:.1f}–{row['seconds_max']:.1f})"
        lines.append(f"{row['set']:<13} {names[row['system']]:<22} {row['accuracy']:>8.2%} {row['macro_f1']:>8.3f} "
                     f"{row['ece']:>6.3f} {spread:>23} {row['cpu_seconds']:>6.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["agnews", "chnsenticorp", "polarity"],
                        choices=("agnews", "chnsenticorp", "polarity"))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--unit-args", default="", help="extra train.py options for the unit-scaled system")
    parser.add_argument("--stock-args", default="", help="extra train.py options for the baseline")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train every system this many times (wall seconds: median and range)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON document")
    args = parser.parse_args()
    rows = benchmark(args.sets, args.systems, shlex.split(args.unit_args), shlex.split(args.stock_args),
                     args.repeats)
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
