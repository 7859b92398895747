"""TensorFlow's host allocator for training: the BFC allocator (the commands' default) against malloc.

    python benchmarks/host_allocator.py [--steps 600] [--repeats 3] [--corpus warpeace] [--json]
                                        [-- EXTRA TRAIN.PY OPTIONS]

Runs ``train.py`` on the character recipe (``benchmarks/lm_recipe.py``'s options, one validation at the end,
``--steps`` steps on the first 90 % of ``../shared/data/CORPUS.txt``) in child processes, alternating
``TF_CPU_ALLOCATOR_USE_BFC`` unset (the commands then choose BFC: ``llm_unitscale.host_allocator``) and
``=false`` (malloc, TensorFlow's own default), and reports per allocator the median and range over
``--repeats`` runs of: the whole command's wall seconds, the compiled step (median of the 50-step means after
step 100), the child's user and system CPU seconds, its peak resident memory, and the validation loss (the
allocator must not change a result). The prepared corpus and compiled programs are cached by a first run, so
every measured run starts alike. Options after ``--`` go to every ``train.py`` (e.g. another model shape).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lm_recipe import DATA, RECIPE, STEP_LINE  # noqa: E402

ALLOCATORS = {"bfc": None, "malloc": "false"}
VAL_LOSS = re.compile(r"val loss ([\d.]+)")


def run_once(data: Path, out: Path, cache: Path, steps: int, use_bfc: str | None, extra: list[str]) -> dict:
    """One ``train.py`` command; its CPU time and peak memory from ``wait4``."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    if use_bfc is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = use_bfc
    command = [sys.executable, str(ROOT / "train.py"), str(data), "--out", str(out), "--cache", str(cache),
               *RECIPE, "--max-steps", str(steps), "--log-every", "50", "--overwrite", *extra]
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env={**env, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        log.seek(0)
        lines = log.read().splitlines()
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"train.py failed ({code}): {' '.join(lines[-5:])}")
    step_ms = {int(m.group(1)): float(m.group(2)) for line in lines if (m := STEP_LINE.match(line))}
    later = [ms for step, ms in step_ms.items() if step > 100]
    val = next((float(m.group(1)) for line in lines if (m := VAL_LOSS.search(line))), float("nan"))
    return {"wall_s": wall, "step_ms": statistics.median(later) if later else float("nan"),
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "val_loss": val}


def summary(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default="warpeace")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    runs: dict[str, list[dict]] = {name: [] for name in ALLOCATORS}
    with tempfile.TemporaryDirectory() as tmp:
        data, cache, out = Path(tmp) / "train.txt", Path(tmp) / "cache", Path(tmp) / "run"
        text = (DATA / f"{args.corpus}.txt").read_text(encoding="utf-8")
        data.write_text(text[: int(len(text) * 0.9)], encoding="utf-8")
        run_once(data, out, cache, args.steps, None, extra)  # prepares the corpus, compiles the programs
        for _ in range(args.repeats):
            for name, use_bfc in ALLOCATORS.items():
                runs[name].append(run_once(data, out, cache, args.steps, use_bfc, extra))
                print(name, json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "corpus": args.corpus, "extra": extra, "runs": runs}, indent=1))
        return
    shape = "".join(" " + option for option in extra)
    print(f"{args.corpus}, recipe{shape}, {args.steps} steps; median [range] over {args.repeats} run(s) each, "
          "interleaved")
    columns = {"wall_s": "wall s", "step_ms": "step ms", "user_s": "user CPU s", "sys_s": "system CPU s",
               "peak_mb": "peak MB", "val_loss": "val loss"}
    print(f"{'allocator':10s}" + "".join(f"{title:>26s}" for title in columns.values()))
    for name, rows in runs.items():
        print(f"{name:10s}" + "".join(f"{summary([r[key] for r in rows], 4 if key == 'val_loss' else 1):>26s}"
                                      for key in columns))
    ratio = statistics.median(r["step_ms"] for r in runs["malloc"]) / statistics.median(
        r["step_ms"] for r in runs["bfc"])
    print(f"compiled step, malloc / bfc: {ratio:.2f}×")


if __name__ == "__main__":
    main()
