"""XLA's compiled programs kept between runs (llm_unitscale.compile_cache): a second run loads the first run's
training step instead of compiling it, computes the same, and damaged entries never reach TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from helpers import ROOT, TINY

from llm_unitscale import compile_cache

#: TensorFlow's own log line when it loads a program from the cache instead of compiling it.
LOADED = "Loading cached entry"


def train(corpus: Path, out: Path, cache: Path, steps: str = "6", *options: str) -> subprocess.CompletedProcess:
    jit = [option for option in TINY if option != "--no-jit"]  # XLA on: the language model's default
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "0",
           "TF_CPP_VMODULE": "device_executable_persistor=1"}
    env.pop(compile_cache.ENV, None)
    env.pop("TF_XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), str(corpus), "--out", str(out), "--cache",
                           str(cache), "--max-steps", steps, "--embeddings", "none", *jit, *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compile_cache")
    corpus = root / "lee.txt"
    corpus.write_text(Path(datapath("lee_background.cor")).read_text(encoding="utf-8")[:8000], encoding="utf-8")
    cache = root / "cache"
    first = train(corpus, root / "first", cache)
    entries = sorted((cache / "xla").glob("*/*.pb"))
    second = train(corpus, root / "second", cache)
    other_schedule = train(corpus, root / "other", cache, "9", "--lr", "0.02")
    return {"root": root, "first": first, "second": second, "other_schedule": other_schedule, "entries": entries}


def test_a_second_run_loads_the_compiled_step_and_computes_the_same(two_runs: dict) -> None:
    first, second = two_runs["first"], two_runs["second"]
    assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-2000:]
    assert two_runs["entries"], "the first run left no compiled program"
    assert two_runs["entries"][0].parent.name.startswith("tf")
    assert LOADED not in first.stderr and LOADED in second.stderr
    metrics = [(Path(two_runs["root"]) / name / "metrics.json").read_text() for name in ("first", "second")]
    assert metrics[0] == metrics[1]


def test_another_length_and_learning_rate_load_the_same_compiled_step(two_runs: dict) -> None:
    """The schedule's peak and length are inputs of the program (``optimizers.WarmupCosineDecay``), not
    constants: a run with another ``--max-steps`` and ``--lr`` loads the step the first run compiled."""
    other = two_runs["other_schedule"]
    assert other.returncode == 0, other.stderr[-2000:]
    assert LOADED in other.stderr
    steps = [json.loads((Path(two_runs["root"]) / name / "history.json").read_text())["step"][-1]
             for name in ("first", "other")]
    assert steps[1] > steps[0]  # another schedule length indeed


def test_entries_that_are_not_whole_are_deleted_before_tensorflow_reads_them(two_runs: dict,
                                                                              tmp_path: Path) -> None:
    entry = two_runs["entries"][0]
    assert compile_cache.is_whole_entry(entry)
    data = entry.read_bytes()
    folder = tmp_path / "xla"
    folder.mkdir()
    (folder / "whole.pb").write_bytes(data)
    (folder / "truncated.pb").write_bytes(data[: len(data) // 2])
    (folder / "no_executable.pb").write_bytes(data[: len(data) - 10])
    (folder / "empty.pb").write_bytes(b"")
    (folder / "garbage.pb").write_bytes(b"\xff" * 64)
    (folder / "stale.pb.tmp").write_bytes(data)  # a write that never got its final name
    hours_ago = os.stat(folder / "stale.pb.tmp").st_mtime - 2 * compile_cache.STALE_SECONDS
    os.utime(folder / "stale.pb.tmp", (hours_ago, hours_ago))
    (folder / "writing.pb.tmp").write_bytes(data[:100])  # another process's write in progress: left alone
    compile_cache.tidy(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["whole.pb", "writing.pb.tmp"]


def test_the_oldest_entries_go_when_the_folder_is_full(two_runs: dict, tmp_path: Path) -> None:
    entry = two_runs["entries"][0]
    for age, name in enumerate(("newest.pb", "middle.pb", "oldest.pb")):
        shutil.copy(entry, tmp_path / name)
        os.utime(tmp_path / name, (1e9 - age * 1000, 1e9 - age * 1000))
    compile_cache.tidy(tmp_path, max_bytes=2 * entry.stat().st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle.pb", "newest.pb"]


@pytest.mark.parametrize(("environ", "root"), [
    ({compile_cache.ENV: "0"}, "cache"),  # switched off
    ({"TF_XLA_FLAGS": f"{compile_cache.FLAG}=/somewhere/else"}, "cache"),  # the user's own cache
    ({}, "a cache"),  # TF_XLA_FLAGS is split at spaces
])
def test_the_cache_stays_off_when_asked_or_when_it_cannot_work(tmp_path: Path, environ: dict, root: str) -> None:
    before = dict(environ)
    assert compile_cache.enable(tmp_path / root, "2.0.0", environ) is None
    assert environ == before


def test_enable_adds_the_flag_to_the_users_flags(tmp_path: Path) -> None:
    environ = {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2"}
    folder = compile_cache.enable(tmp_path, "2.0.0", environ)
    assert folder is not None and folder.is_dir() and folder.parent == tmp_path / "xla"
    assert environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 {compile_cache.FLAG}={folder}"
    assert compile_cache.folder_in_use(environ) == folder
    assert compile_cache.folder_in_use({"TF_XLA_FLAGS": "--tf_xla_auto_jit=2"}) is None
