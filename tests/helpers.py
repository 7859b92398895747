"""Helpers shared by the end-to-end tests: run the real root scripts in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A model small enough to train in seconds on 2 cores.
TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "8", "--no-jit"]


def script(name: str, *args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python NAME.py ARGS`` from the repository root (the way a user does) and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *args], cwd=cwd, env=env, input=stdin,
        capture_output=True, text=True, timeout=300,
    )


def scripts_in_parallel(calls: dict[str, tuple[str, ...]], workers: int = 3) -> dict[str, subprocess.CompletedProcess]:
    """Run many short ``script`` calls at once ({key: (name, *args)}); most of each is TensorFlow's import."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(script, *call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}


#: Runs each call of a JSON list through the entry point the root scripts call (``cli.*_main``), one after the
#: other in this one process, with fd 1 and fd 2 pointed at files of the call's own (so everything written
#: there, C++ logs included, is captured as a subprocess's would be); prints {key: [status, stdout, stderr]}.
_ONE_PROCESS_DRIVER = """
import json, os, sys, tempfile
from llm_unitscale import cli
mains = {"train": cli.train_main, "predict": cli.predict_main, "evaluate": cli.evaluate_main}
calls, results = json.load(sys.stdin), {}
saved = os.dup(1), os.dup(2)
for key, (name, *argv) in calls.items():
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            status = mains[name](argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        out.seek(0); err.seek(0)
        results[key] = [status, out.read(), err.read()]
print(json.dumps(results))
"""


def scripts_in_one_process(calls: dict[str, tuple[str, ...]]) -> dict[str, subprocess.CompletedProcess]:
    """Many ``script`` calls that fail before training ({key: (name, *args)}), in ONE child process.

    Each goes through the same function as ``python NAME.py ARGS`` (the root scripts are one-line wrappers of
    ``llm_unitscale.cli``), with its own stdout/stderr; TensorFlow is imported once instead of once per call
    (7 s each). Only for calls that stop early: a call that trains would leave state for the next one.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", _ONE_PROCESS_DRIVER], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600, input=json.dumps(calls))
    assert child.returncode == 0, child.stderr[-2000:]
    return {key: subprocess.CompletedProcess([*calls[key]], status, out, err)
            for key, (status, out, err) in json.loads(child.stdout).items()}


def ok_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """Assert the run failed with ``status`` and exactly one line on stderr (no traceback); return that line."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]
