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


def ok_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """Assert the run failed with ``status`` and exactly one line on stderr (no traceback); return that line."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]
