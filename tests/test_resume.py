"""Interrupted training: kill -9 then --resume, Ctrl-C, NaN, atomic saves, determinism.

The reference is an uninterrupted run; a run killed with SIGKILL (or stopped with SIGINT) mid-epoch and
resumed must end with the same metrics, because checkpoints hold the model and optimizer state and training
batch k is a pure function of k.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath
from helpers import ROOT, TINY, ok_json, script, scripts_in_parallel

from llm_unitscale import checkpoint, files, runs, training

#: 2 epochs of 25 steps; a checkpoint every 5 steps.
OPTIONS = ["--max-steps", "50", "--checkpoint-every", "5", "--json", *TINY]
#: Same machine, same seed, same data: metrics agree to this relative tolerance (measured: identical).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "lee.txt"
    path.write_text(Path(datapath("lee_background.cor")).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def start_training(corpus: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(corpus), "--out", str(out), *OPTIONS],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 240.0) -> int:
    """Poll the interrupted-run folder until a checkpoint at ``step`` or later exists; return its step."""
    state_file = runs.partial_dir(out) / "checkpoints" / checkpoint.STATE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            saved = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError):
            saved = 0
        if saved >= step:
            return saved
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def interrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two uninterrupted runs, one killed with SIGKILL and one stopped with SIGINT, both then resumed."""
    tmp = tmp_path_factory.mktemp("runs")
    killed = start_training(corpus, tmp / "killed")
    stopped = start_training(corpus, tmp / "stopped")
    killed_at = wait_for_step(tmp / "killed", 10, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    wait_for_step(tmp / "stopped", 10, stopped)
    stopped.send_signal(signal.SIGINT)
    _, stopped_stderr = stopped.communicate(timeout=120)
    references = scripts_in_parallel({name: ("train", str(corpus), "--out", str(tmp / name), *OPTIONS)
                                      for name in ("reference", "again")}, workers=2)
    stopped_state = json.loads((runs.partial_dir(tmp / "stopped") / "checkpoints" / checkpoint.STATE).read_text())
    resumed = scripts_in_parallel({name: ("train", str(corpus), "--out", str(tmp / name), "--resume", *OPTIONS)
                                   for name in ("killed", "stopped")}, workers=2)
    return {"reference": ok_json(references["reference"]), "again": ok_json(references["again"]),
            "killed_at": killed_at, "killed_rc": killed.returncode, "killed": resumed["killed"],
            "stopped_rc": stopped.returncode, "stopped_stderr": stopped_stderr, "stopped_state": stopped_state,
            "stopped": resumed["stopped"], "tmp": tmp}


def same_metrics(a: dict, b: dict) -> None:
    for key in ("loss", "val_loss", "val_accuracy"):
        assert b[key] == pytest.approx(a[key], rel=TOLERANCE), key


def test_same_seed_same_metrics(interrupted: dict) -> None:
    same_metrics(interrupted["reference"], interrupted["again"])


def test_kill_9_then_resume_matches_an_uninterrupted_run(interrupted: dict) -> None:
    assert interrupted["killed_rc"] == -signal.SIGKILL and 10 <= interrupted["killed_at"] < 50
    resumed = interrupted["killed"]
    assert "resuming at step" in resumed.stderr
    same_metrics(interrupted["reference"], ok_json(resumed))
    history = json.loads((interrupted["tmp"] / "killed" / "history.json").read_text())
    assert len(history["val_loss"]) == 2  # both epochs, the one before the kill included


def test_ctrl_c_saves_says_how_to_resume_and_exits_130(interrupted: dict) -> None:
    assert interrupted["stopped_rc"] == 130, interrupted["stopped_stderr"][-2000:]
    last = interrupted["stopped_stderr"].strip().splitlines()[-1]
    step = interrupted["stopped_state"]["step"]
    assert last.startswith(f"interrupted at step {step} of 50; checkpoint saved in "), last
    assert "resume with: train.py " in last and last.endswith("--resume"), last
    assert "Traceback" not in interrupted["stopped_stderr"]
    same_metrics(interrupted["reference"], ok_json(interrupted["stopped"]))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss turns NaN at step 8: training stops there, says so, and step 5's checkpoint stays."""
    import keras

    from llm_unitscale import training

    original = training.compile_model

    def poisoned_compile(cfg: training.TrainConfig, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        original(cfg, model, optimizer)
        loss = model.loss

        def nan_from_step_8(y_true: object, y_pred: object) -> object:
            value = loss(y_true, y_pred)
            return value * keras.ops.where(optimizer.iterations >= 7, float("nan"), 1.0)

        model.compile(optimizer=optimizer, loss=nan_from_step_8, metrics=["accuracy"], jit_compile=False)

    monkeypatch.setattr(training, "compile_model", poisoned_compile)
    cfg = training.TrainConfig(data=str(corpus), out=str(tmp_path / "nan"), max_steps=50, checkpoint_every=5,
                               width=32, depth=1, heads=2, seq_len=16, batch_size=8, jit_compile=False)
    with open(os.devnull, "w") as quiet, pytest.raises(FloatingPointError) as error:
        training.train(cfg, log=quiet)
    assert "NaN/inf at step 8" in str(error.value) and "last good checkpoint is step 5" in str(error.value)
    state = checkpoint.load_state(runs.partial_dir(tmp_path / "nan") / "checkpoints")
    assert state is not None and state.step == 5 and not (tmp_path / "nan").exists()


@pytest.mark.parametrize(("every_steps", "min_seconds", "saved_at"), [
    (0, 60, [3, 6]),  # the first step 60 s after the last save (steps 25 s apart)
    (4, 0, [4, 8]),  # every 4 steps, never by time
    (4, 60, [3, 4, 7, 8]),  # both: a count save also restarts the clock
    (0, 0, []),  # neither: only at evaluations (none in these 8 steps of a 10-step period)
])
def test_steps_save_by_time_and_by_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_steps: int,
                                         min_seconds: float, saved_at: list[int]) -> None:
    clock = [100.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    saver = checkpoint.ResumableCheckpoint(tmp_path, [10], every_steps, checkpoint.TrainingState(), min_seconds)
    saves: list[int] = []

    def save() -> None:
        saves.append(saver.state.step)
        saver._last_save = clock[0]

    monkeypatch.setattr(saver, "save", save)
    for batch in range(8):
        clock[0] += 25.0
        saver.on_train_batch_end(batch, {"loss": 1.0})
    assert saves == saved_at


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    files.atomic_write_json(target, {"old": 1})

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        files.atomic_write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no half-written temporary left


def test_a_checkpoint_killed_while_saving_weights_keeps_the_previous_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    saver = checkpoint.ResumableCheckpoint(tmp_path, periods=[10], every_steps=1,
                                           state=checkpoint.TrainingState())
    saver.set_model(model)
    saver.on_train_batch_end(0, {"loss": 1.0})
    assert checkpoint.load_state(tmp_path).weights == "step-1.keras"

    def dies_halfway(path: object) -> None:
        Path(str(path)).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        saver.on_train_batch_end(1, {"loss": 1.0})
    state = checkpoint.load_state(tmp_path)
    assert state.step == 1 and state.weights == "step-1.keras"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "step-1.keras"]  # no temporary left
    checkpoint.restore(model, tmp_path, state)  # the old pair still loads


def test_resume_refuses_a_different_model(interrupted: dict, corpus: Path) -> None:
    out = interrupted["tmp"] / "other"
    process = start_training(corpus, out)
    wait_for_step(out, 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = script("train", str(corpus), "--out", str(out), "--resume", *OPTIONS[:-1], "--width", "64")
    assert result.returncode == 2 and "width = 32, not 64" in result.stderr, result.stderr[-1000:]


@pytest.mark.parametrize(("per_epoch", "max_steps", "want"), [
    (117, 120, (2, 60)),  # was 2 epochs × 117 = 234 steps for --max-steps 120
    (117, 100, (1, 100)),
    (25, 50, (2, 25)),
    (10, 33, (4, 9)),  # 36 steps: 3 more than asked, never a whole extra epoch
])
def test_max_steps_is_split_into_equal_epochs(per_epoch: int, max_steps: int, want: tuple[int, int]) -> None:
    epochs, steps = training.epoch_plan(per_epoch, 30, max_steps)
    assert (epochs, steps) == want
    assert max_steps <= epochs * steps < max_steps + epochs and steps <= per_epoch
    assert training.epoch_plan(per_epoch, 30, None) == (30, per_epoch)


def test_resumed_mid_epoch_logs_the_whole_epochs_mean(corpus: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped at step 37 of a 50-step epoch and resumed: the epoch's training loss is the mean over all 50
    steps (as uninterrupted), not over the 13 after the resume."""
    import io

    common = dict(data=str(corpus), max_steps=50, checkpoint_every=5, width=32, depth=1, heads=2, seq_len=16,
                  batch_size=8, jit_compile=False, embeddings="none")
    reference = training.train(training.TrainConfig(out=str(tmp_path / "ref"), **common), log=io.StringIO())
    original = checkpoint.ResumableCheckpoint.on_train_batch_end

    def stop_at_37(self: checkpoint.ResumableCheckpoint, batch: int, logs: dict | None = None) -> None:
        if self.state.step == 36:
            self.interrupted = True
        original(self, batch, logs)

    monkeypatch.setattr(checkpoint.ResumableCheckpoint, "on_train_batch_end", stop_at_37)
    with pytest.raises(checkpoint.TrainingInterrupted, match="interrupted at step 37 of 50"):
        training.train(training.TrainConfig(out=str(tmp_path / "cut"), **common), log=io.StringIO())
    monkeypatch.setattr(checkpoint.ResumableCheckpoint, "on_train_batch_end", original)
    resumed = training.train(training.TrainConfig(out=str(tmp_path / "cut"), resume=True, **common),
                             log=io.StringIO())
    same_metrics(reference, resumed)


def test_evaluation_periods_end_at_every_epoch_and_every_n_steps() -> None:
    assert checkpoint.evaluation_periods(10, 4) == [4, 4, 2]
    assert checkpoint.evaluation_periods(10, 4, 3) == [3, 1, 2, 2, 1, 1]  # after steps 3 4 6 8 9 10
    assert checkpoint.evaluation_periods(12, 6, 2) == [2, 2, 2, 2, 2, 2]
    periods = [3, 3, 3, 1, 2, 2]
    assert checkpoint.segments(checkpoint.TrainingState(), periods) == [(0, 3, 3), (3, 4, 1), (4, 6, 2)]
    # resumed 2 steps into period 1: finish it, then the rest
    state = checkpoint.TrainingState(step=5, epoch=1, batch=2)
    assert checkpoint.segments(state, periods) == [(1, 2, 1), (2, 3, 3), (3, 4, 1), (4, 6, 2)]
    assert checkpoint.segments(checkpoint.TrainingState(step=9, epoch=3, stopped_early=True), periods) == []


@pytest.fixture(scope="module")
def polarity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("polarity") / "polarity.txt"
    path.write_text(Path(datapath("pang_lee_polarity.cor")).read_text(encoding="cp1252"), encoding="utf-8")
    return path


def classifier_config(data: Path, out: Path, **options: object) -> training.TrainConfig:
    """A small bag classifier that overfits 180 sentences within a few epochs, validated every 2 steps."""
    options = {"epochs": 12, "batch_size": 16, "width": 16, "buckets": 5000, "lr": 0.1, "eval_every": 2,
               "checkpoint_every": 3, **options}
    return training.TrainConfig(data=str(data), out=str(out), **options)


def test_early_stopping_keeps_the_best_weights_and_survives_resume(polarity: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation loss bottoms out and rises: the run stops after --patience validations without a new
    best, publishes the best step's weights and says so; killed after its best step and resumed, it stops at
    the same validation with the same weights. The interrupted run saves no checkpoint at its evaluations
    (none is due by --checkpoint-seconds): the best weights it held in memory are written beside the
    interrupt's checkpoint."""
    import io

    import keras

    reference = training.train(classifier_config(polarity, tmp_path / "ref", patience=3), log=io.StringIO())
    assert reference["stopped"] == "early" and reference["steps"] < reference["max_steps"]
    history = json.loads((tmp_path / "ref" / "history.json").read_text())
    best = int(np.argmin(history["val_loss"]))
    assert reference["best_step"] == history["step"][best] and len(history["val_loss"]) == best + 4  # patience 3
    assert reference["val_loss_uncalibrated"] == pytest.approx(history["val_loss"][best], rel=1e-6)
    assert "stopped early" in reference["stop_reason"] and f"step {reference['best_step']}" in reference["stop_reason"]
    assert "stopped early" in training.summary_text(reference)

    original = checkpoint.ResumableCheckpoint.on_train_batch_end
    cut = reference["best_step"] + 1  # after the best weights, before the stop

    def stop_after_best(self: checkpoint.ResumableCheckpoint, batch: int, logs: dict | None = None) -> None:
        if self.state.step == cut - 1:
            self.interrupted = True
        original(self, batch, logs)

    monkeypatch.setattr(checkpoint.ResumableCheckpoint, "on_train_batch_end", stop_after_best)
    lazy = dict(checkpoint_every=0, checkpoint_seconds=1e9)
    with pytest.raises(checkpoint.TrainingInterrupted, match=f"interrupted at step {cut} of"):
        training.train(classifier_config(polarity, tmp_path / "cut", patience=3, **lazy), log=io.StringIO())
    saved = runs.partial_dir(tmp_path / "cut") / "checkpoints"
    assert sorted(p.name for p in saved.glob("step-*")) == sorted(
        checkpoint.weights_name(step) for step in (cut - 1, cut)), "the best step's weights, then the interrupt's"
    monkeypatch.setattr(checkpoint.ResumableCheckpoint, "on_train_batch_end", original)
    resumed = training.train(classifier_config(polarity, tmp_path / "cut", patience=3, resume=True, **lazy),
                             log=io.StringIO())
    assert resumed["stopped"] == reference["stopped"]
    for key in ("steps", "best_step", "val_loss", "val_accuracy", "temperature"):
        assert resumed[key] == pytest.approx(reference[key], rel=TOLERANCE), key
    weights = [keras.models.load_model(tmp_path / name / runs.MODEL, compile=False).get_weights()
               for name in ("ref", "cut")]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=1e-7)


def test_patience_0_runs_every_step_and_still_keeps_the_best(polarity: Path, tmp_path: Path) -> None:
    import io

    summary = training.train(classifier_config(polarity, tmp_path / "all", patience=0, epochs=4, eval_every=3,
                                               lr=1.0),  # overfits by step 9 of 48
                             log=io.StringIO())
    history = json.loads((tmp_path / "all" / "history.json").read_text())
    assert summary["stopped"] == "budget" and summary["steps"] == summary["max_steps"]
    assert summary["best_step"] == history["step"][int(np.argmin(history["val_loss"]))] < summary["steps"]
    assert summary["val_loss_rising"] >= 3 and "rose for the last" in summary["stop_reason"]
