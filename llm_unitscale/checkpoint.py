"""Resumable training: exact mid-epoch checkpoints, Ctrl-C that saves, and the last good step on a NaN loss
(and TensorBoard logs whose failed writes stop training with one line, :class:`TensorBoardLogs`).

Why not ``keras.callbacks.BackupAndRestore``: with ``save_freq="epoch"`` it only resumes at epoch boundaries
(an epoch of a large corpus can take hours), and with ``save_freq=N`` steps it restarts the interrupted epoch
at batch 0 on mid-epoch weights, so batches are seen twice (checked with Keras 3.15, see FACTS.md). Here the
training batches are a pure function of the global step (``data.lm_train_batches`` /
``data.classify_train_batches``), so a resumed run restores weights and optimizer state, skips exactly the
steps already taken, and sees the same batches an uninterrupted run would.

Files in ``checkpoints/``: ``step-N.keras`` (model and optimizer variables, ``runs.atomic_save_model``: Keras
builds the HDF5 part in memory and a full disk fails in Python's I/O, once, not inside h5py, whose
half-written files failed again when collected and crashed the process) and ``state.json`` {step,
epoch, batch, history, weights}. ``state.json`` is replaced atomically *after* its weights file is complete,
and the previous weights file is deleted only then, so a crash at any moment leaves a consistent pair. A
failed write (full disk, ``ulimit -f``) removes its temporary file, raises ``files.WriteError`` ("… while
writing the checkpoint at step 10") and stops training: nothing more is written, the previous checkpoint
stays. ``step-N.weights.h5`` checkpoints of earlier versions still restore.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras

from llm_unitscale import files, runs

STATE = "state.json"


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C (exit status 130); ``resumable``: a checkpoint was saved for ``--resume``."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


@dataclass
class TrainingState:
    """Where a run stands: ``step`` optimizer steps done, the epoch in progress and the batches done in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)  # logs of the completed epochs
    weights: str | None = None  # file name of the weights in the checkpoint folder
    #: running means of the training metrics over the ``batch`` steps done in the epoch in progress, so that a
    #: run resumed mid-epoch logs the whole epoch's mean, not only the resumed part's
    epoch_means: dict[str, float] = field(default_factory=dict)


def load_state(folder: Path) -> TrainingState | None:
    """The saved state of an interrupted run, or None when there is none (or it is unreadable)."""
    import json

    path = folder / STATE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        state = TrainingState(**document)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise runs.RunError(f"{path}: unreadable checkpoint state ({exc}); pass --overwrite to start afresh") from exc
    if state.weights and not (folder / state.weights).is_file():
        raise runs.RunError(f"{folder / state.weights}: checkpoint weights missing; pass --overwrite to start afresh")
    return state


def restore(model: keras.Model, folder: Path, state: TrainingState) -> None:
    """Load the checkpointed model and optimizer variables into a compiled model."""
    if state.weights is None:
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / state.weights)
    except Exception as exc:  # a truncated or foreign file: say which, do not crash
        raise runs.RunError(f"{folder / state.weights}: cannot load the checkpoint ({type(exc).__name__}); "
                            "pass --overwrite to start afresh") from exc


def segments(state: TrainingState, steps_per_epoch: int, epochs: int) -> list[tuple[int, int, int]]:
    """The ``model.fit`` calls that finish a run from ``state``: (initial_epoch, epochs, steps_per_epoch).

    Keras cannot start an epoch in the middle, so a run resumed mid-epoch first finishes that epoch with a
    short fit call, then runs the remaining whole epochs.
    """
    plan = []
    epoch = state.epoch
    if state.batch:
        plan.append((epoch, epoch + 1, steps_per_epoch - state.batch))
        epoch += 1
    if epoch < epochs:
        plan.append((epoch, epochs, steps_per_epoch))
    return plan


class ResumableCheckpoint(keras.callbacks.Callback):
    """Saves the training state every ``every_steps`` steps, at each epoch end, and when interrupted.

    Set ``interrupted`` (the SIGINT handler of :func:`stop_on_sigint` does) to save at the end of the current
    batch and stop training. A non-finite loss is never saved: ``nan_step`` records where it happened and the
    last good checkpoint stays (``keras.callbacks.TerminateOnNaN`` stops the run).
    """

    def __init__(self, folder: Path, steps_per_epoch: int, every_steps: int, state: TrainingState) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = max(1, every_steps)
        self.state = TrainingState(**asdict(state))
        self.interrupted = False
        self._saved_on_interrupt = False
        self._before = (self.state.batch, dict(self.state.epoch_means))  # the epoch's steps before this fit
        self.nan_step: int | None = None
        self.saved_step: int | None = state.step if state.weights else None

    @property
    def stopped(self) -> bool:
        return self.interrupted or self.nan_step is not None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.nan_step is not None or self._saved_on_interrupt:
            return
        interrupted = self.interrupted  # read once: the SIGINT handler can set it between any two lines
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.nan_step = self.state.step + 1
            return
        self.state.step += 1
        self.state.batch += 1
        self.state.epoch_means = self._whole_epoch(logs or {})
        if interrupted or self.state.step % self.every_steps == 0:
            self.save()
        if interrupted:
            self._saved_on_interrupt = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.nan_step is not None or self.state.batch < self.steps_per_epoch:
            return  # a cut-short epoch: its state was saved at its last good batch
        logs = {**(logs or {}), **self._whole_epoch(logs or {})}
        for key, value in logs.items():
            self.state.history.setdefault(key, []).append(float(value))
        self.state.epoch, self.state.batch, self.state.epoch_means = epoch + 1, 0, {}
        self._before = (0, {})
        self.save()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._before = (self.state.batch, dict(self.state.epoch_means))

    def _whole_epoch(self, logs: dict) -> dict[str, float]:
        """The training metrics of ``logs`` (Keras's means over this fit's steps of the epoch) as means over
        all of the epoch's steps so far, including those done before a resume (equal batches: equal weights)."""
        done_before, means_before = self._before
        steps_now = self.state.batch - done_before
        out = {}
        for key, value in logs.items():
            try:
                mean_now = float(value)
            except (TypeError, ValueError):
                continue
            if key.startswith("val_"):
                continue
            prior = means_before.get(key)
            out[key] = mean_now if prior is None or not done_before else (
                (done_before * prior + steps_now * mean_now) / max(done_before + steps_now, 1))
        return out

    def save(self) -> None:
        """Write step-N.keras, then state.json pointing at it, then delete the previous weights."""
        old = self.state.weights
        name = f"step-{self.state.step}.keras"
        with files.writing(f"the checkpoint at step {self.state.step}", self.folder):
            if name != old:
                runs.atomic_save_model(self.model, self.folder / name)
            try:
                runs.atomic_write_json(self.folder / STATE, {**asdict(self.state), "weights": name})
            except BaseException:
                if name != old:  # the previous state.json still points at the previous weights
                    (self.folder / name).unlink(missing_ok=True)
                raise
        self.state.weights = name
        self.saved_step = self.state.step
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)


class TensorBoardLogs(keras.callbacks.TensorBoard):
    """``keras.callbacks.TensorBoard`` whose failed writes (a full disk: TensorFlow raises an ``OpError``
    carrying "No space left on device") end training as ``files.WriteError`` ("… while writing the TensorBoard
    logs"), after closing its event writers so that they are not flushed (and fail) again when collected."""

    def _guarded(self, method: Any, *args: Any) -> None:
        try:
            with files.writing("the TensorBoard logs"):
                method(*args)
        except Exception:
            with contextlib.suppress(Exception):
                self._close_writers()
            self._writers = {}
            raise

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._guarded(super().on_train_begin, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._guarded(super().on_train_batch_end, batch, logs)

    def on_test_end(self, logs: dict | None = None) -> None:
        self._guarded(super().on_test_end, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._guarded(super().on_epoch_end, epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._guarded(super().on_train_end, logs)


@contextlib.contextmanager
def stop_on_sigint(checkpoint: ResumableCheckpoint) -> Iterator[None]:
    """While training, the first Ctrl-C asks ``checkpoint`` to save and stop after the current batch; a second
    Ctrl-C interrupts at once (Python's usual KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if checkpoint.interrupted:
            raise KeyboardInterrupt
        checkpoint.interrupted = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
