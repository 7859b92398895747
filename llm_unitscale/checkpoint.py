"""Resumable training: exact mid-epoch checkpoints, validation-driven stopping that keeps the best weights,
Ctrl-C that saves, and the last good step on a NaN loss (and TensorBoard logs whose failed writes stop training
with one line, :class:`TensorBoardLogs`).

Why not ``keras.callbacks.BackupAndRestore``: with ``save_freq="epoch"`` it only resumes at epoch boundaries
(an epoch of a large corpus can take hours), and with ``save_freq=N`` steps it restarts the interrupted epoch
at batch 0 on mid-epoch weights, so batches are seen twice (checked with Keras 3.15, see FACTS.md). Here the
training batches are a pure function of the global step (``data.lm_train_batches`` /
``data.classify_train_batches``), so a resumed run restores weights and optimizer state, skips exactly the
steps already taken, and sees the same batches an uninterrupted run would.

Evaluation periods: validation runs at each epoch end and, with ``eval_every`` N, also every N steps
(:func:`evaluation_periods`). Each period between two evaluations is one Keras "epoch" of ``model.fit``, so
Keras's own validation, callbacks and logs work unchanged; ``TrainingState.epoch`` counts completed periods.

Best weights (:class:`ValidationStopping`, a ``keras.callbacks.EarlyStopping``): after each evaluation the run
remembers the step of its lowest validation loss and stops after ``patience`` evaluations without a new best.
Keras's ``restore_best_weights`` keeps them in memory only, which a resumed process has lost; here they are
also kept on disk in the best step's checkpoint file whenever a ``state.json`` refers to them (written from
memory at the next save if that evaluation did not save), and the best step, its validation loss and the count
of evaluations since are part of ``state.json``. So a run killed and resumed ends with the same best weights and
stops at the same evaluation as an uninterrupted one.

When to save: every ``every_steps`` steps when set (``--checkpoint-every``; default 0, none by step count),
at the first step or evaluation after ``min_seconds`` (``--checkpoint-seconds``, default 60) have passed since
the last save, after the last evaluation (so that a failed publish, e.g. a full disk, resumes with nothing to
repeat), and when interrupted. A save costs the same at any size of step: a classifier's checkpoint (a hashed
n-gram table and Adam's two moments: 91 MB on AG News) takes 0.3–0.8 s to write, and saving at every
evaluation cost 3–7 s of a 35-second run; the character recipe's (818k parameters and Adam's moments) takes
80–130 ms, and saving every 100 steps (the earlier default) cost 1.6–2.6 s of a 60-second run. A run killed with
SIGKILL repeats the steps since its last save, about a minute at most (the batches are a function of the step,
so it still ends where the uninterrupted run ends).

Files in ``checkpoints/``: ``step-N.keras`` (model and optimizer variables, ``runs.atomic_save_model``: Keras
builds the HDF5 part in memory and a full disk fails in Python's I/O, once, not inside h5py, whose
half-written files failed again when collected and crashed the process) and ``state.json`` {step,
epoch, batch, history, weights, best_step, ...}. ``state.json`` is replaced atomically *after* its weights file is complete,
and a previous weights file is deleted only then (unless it holds the best weights), so a crash at any moment leaves a consistent pair. A
failed write (full disk, ``ulimit -f``) removes its temporary file, raises ``files.WriteError`` ("… while
writing the checkpoint at step 10") and stops training: nothing more is written, the previous checkpoint
stays. ``step-N.weights.h5`` checkpoints of earlier versions still restore.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
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
    best_step: int | None = None  # the step whose weights had the lowest validation loss so far
    best_val_loss: float | None = None
    best_period: int | None = None  # index of that evaluation (the Keras epoch)
    wait: int = 0  # evaluations since the best one
    stopped_early: bool = False  # patience ran out

    @property
    def best_weights(self) -> str | None:
        """File name of the best step's checkpoint, kept until a better one replaces it."""
        return None if self.best_step is None else weights_name(self.best_step)


def weights_name(step: int) -> str:
    """File name of the checkpoint of ``step`` (``step-N.weights.h5`` of earlier versions still restore)."""
    return f"step-{step}.keras"


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
    for name in (state.weights, state.best_weights):
        if name and not (folder / name).is_file():
            raise runs.RunError(f"{folder / name}: checkpoint weights missing; pass --overwrite to start afresh")
    return state


def restore(model: keras.Model, folder: Path, state: TrainingState, name: str | None = None) -> None:
    """Load the checkpointed model and optimizer variables (of ``name``, default the latest) into a model."""
    name = name or state.weights
    if name is None:
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / name)
    except Exception as exc:  # a truncated or foreign file: say which, do not crash
        raise runs.RunError(f"{folder / name}: cannot load the checkpoint ({type(exc).__name__}); "
                            "pass --overwrite to start afresh") from exc


def evaluation_periods(total_steps: int, steps_per_epoch: int, eval_every: int | None = None) -> list[int]:
    """Lengths (in steps) of the stretches between validations: one ends at every epoch end and, with
    ``eval_every`` N, every N steps, and the last at ``total_steps``. E.g. (10, 4, 3) → [3, 1, 2, 2, 1, 1]:
    validations after steps 3, 4, 6, 8, 9 and 10."""
    ends = set(range(steps_per_epoch, total_steps + 1, steps_per_epoch)) | {total_steps}
    if eval_every:
        ends |= set(range(eval_every, total_steps + 1, eval_every))
    ends = sorted(ends)
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def segments(state: TrainingState, periods: list[int]) -> list[tuple[int, int, int]]:
    """The ``model.fit`` calls that finish a run from ``state``: (initial_epoch, epochs, steps_per_epoch).

    One Keras epoch per evaluation period; consecutive periods of equal length share a fit call. Keras cannot
    start an epoch in the middle, so a run resumed mid-period first finishes that period with a short call.
    Nothing is left once patience has run out.
    """
    if state.stopped_early:
        return []
    plan = []
    epoch = state.epoch
    if state.batch and epoch < len(periods):
        plan.append((epoch, epoch + 1, periods[epoch] - state.batch))
        epoch += 1
    while epoch < len(periods):
        end = epoch
        while end < len(periods) and periods[end] == periods[epoch]:
            end += 1
        plan.append((epoch, end, periods[epoch]))
        epoch = end
    return plan


class ResumableCheckpoint(keras.callbacks.Callback):
    """Saves the training state every ``every_steps`` steps (0: not by step count), at any step or evaluation
    once ``min_seconds`` have passed since the last save (0: at every evaluation, never by time between them),
    after the last period, and when interrupted.

    Set ``interrupted`` (the SIGINT handler of :func:`stop_on_sigint` does) to save at the end of the current
    batch and stop training. A non-finite loss is never saved: ``nan_step`` records where it happened and the
    last good checkpoint stays (``keras.callbacks.TerminateOnNaN`` stops the run).
    """

    def __init__(self, folder: Path, periods: list[int], every_steps: int, state: TrainingState,
                 min_seconds: float = 0.0) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.periods = list(periods)
        self.every_steps = every_steps  # 0: only at evaluations (and interrupts)
        self.min_seconds = float(min_seconds)  # an evaluation saves only this long after the last save
        self._last_save = time.monotonic()
        self._deferred = False  # a step save due at a period's last batch, made after its evaluation
        #: the best step's model weights while its checkpoint file is not written yet (set by ValidationStopping)
        self.best_weights: list | None = None
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
        if interrupted or self.step_save_due():
            if interrupted or not self.period_complete(self.state.epoch):
                self.save()
            else:  # the evaluation comes next: its save holds the period's outcome (a state saved between the
                self._deferred = True  # two would resume into a period with no steps left and no evaluation)
        if interrupted:
            self._saved_on_interrupt = True
            self.model.stop_training = True

    def step_save_due(self) -> bool:
        """Whether the step just taken saves: every ``every_steps`` steps, or once ``min_seconds`` (> 0) have
        passed since the last save."""
        if self.every_steps and self.state.step % self.every_steps == 0:
            return True
        return self.min_seconds > 0 and time.monotonic() - self._last_save >= self.min_seconds

    def period_complete(self, epoch: int) -> bool:
        """Whether Keras epoch ``epoch`` (an evaluation period) ran all its steps without a NaN loss."""
        return self.nan_step is None and epoch < len(self.periods) and self.state.batch >= self.periods[epoch]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.period_complete(epoch):
            return  # a cut-short period: its state was saved at its last good batch
        logs = {**(logs or {}), **self._whole_epoch(logs or {})}
        logs["step"] = self.state.step
        for key, value in logs.items():
            self.state.history.setdefault(key, []).append(float(value))
        self.state.epoch, self.state.batch, self.state.epoch_means = epoch + 1, 0, {}
        self._before = (0, {})
        last = self.state.epoch >= len(self.periods) or self.state.stopped_early
        if last or self._deferred or self.interrupted or time.monotonic() - self._last_save >= self.min_seconds:
            self.save()
        self._deferred = False

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
        """Write step-N.keras (and the best step's weights if they are only in memory), then state.json pointing
        at them, then delete the weights no longer needed (all but this step's and the best step's)."""
        old = self.state.weights
        name = weights_name(self.state.step)
        fresh = name != old or not (self.folder / name).is_file()
        with files.writing(f"the checkpoint at step {self.state.step}", self.folder):
            self._save_best_from_memory(name)
            if fresh:
                runs.atomic_save_model(self.model, self.folder / name)
            try:
                files.atomic_write_json(self.folder / STATE, {**asdict(self.state), "weights": name})
            except BaseException:
                if fresh and name != self.state.best_weights:  # the previous state.json points at older weights
                    (self.folder / name).unlink(missing_ok=True)
                raise
        self.state.weights = name
        self.saved_step = self.state.step
        self._last_save = time.monotonic()
        keep = {name, self.state.best_weights}
        for stale in [*self.folder.glob("step-*.keras"), *self.folder.glob("step-*.weights.h5")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)

    def _save_best_from_memory(self, current: str) -> None:
        """The best step's checkpoint, when that step's evaluation did not save one: its weights, kept in
        memory, go into the model for the length of one save (with this step's optimizer variables: only the
        model weights of a best checkpoint are ever read back, by :meth:`ValidationStopping.restore_best`)."""
        best = self.state.best_weights
        if best is None or best == current or self.best_weights is None or (self.folder / best).is_file():
            return
        now = self.model.get_weights()
        self.model.set_weights(self.best_weights)
        try:
            runs.atomic_save_model(self.model, self.folder / best)
        finally:
            self.model.set_weights(now)


class ValidationStopping(keras.callbacks.EarlyStopping):
    """Keras's ``EarlyStopping`` on ``val_loss`` whose state lives in the run's resumable ``TrainingState``.

    After every complete evaluation period it records a new best (lowest ``val_loss``; step, value, period)
    in ``saver.state`` and counts evaluations without one (``wait``); after ``patience`` of them it stops
    training and sets ``state.stopped_early``. ``patience`` 0 never stops. The best weights are kept in memory
    (``best_weights``, as ``restore_best_weights`` does) and, for a resumed process, in the best step's
    checkpoint file, which ``ResumableCheckpoint`` keeps; :meth:`restore_best` puts them back at the end.
    Must come *before* ``saver`` in the callback list, so that the checkpoint saved at an evaluation already
    holds its outcome.
    """

    def __init__(self, saver: ResumableCheckpoint, patience: int) -> None:
        self.saver = saver  # first: Keras's __init__ sets best_weights, which lives in the saver
        super().__init__(monitor="val_loss", mode="min", patience=patience if patience > 0 else math.inf)

    @property
    def state(self) -> TrainingState:
        return self.saver.state

    @property
    def best_weights(self) -> list | None:
        """The best weights in memory (None in a resumed process until it finds a new best); the saver writes
        them into the best step's checkpoint when it saves after an evaluation that did not."""
        return self.saver.best_weights

    @best_weights.setter
    def best_weights(self, weights: list | None) -> None:
        self.saver.best_weights = weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Continue from the saved state (Keras resets it at every ``fit`` call, and a run makes several)."""
        self.wait, self.best = self.state.wait, self.state.best_val_loss
        self.best_epoch = self.state.best_period or 0
        self.stopped_epoch = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        current = (logs or {}).get(self.monitor)
        if not self.saver.period_complete(epoch) or current is None or not math.isfinite(float(current)):
            return
        if self.monitor_op is None:
            self._set_monitor_op()
        self.wait += 1
        if self._is_improvement(float(current), self.best):
            self.best, self.best_epoch, self.wait = float(current), epoch, 0
            self.best_weights = self.model.get_weights()
            self.state.best_step, self.state.best_val_loss, self.state.best_period = (
                self.state.step, self.best, epoch)
        elif self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.state.stopped_early = True
            self.model.stop_training = True
        self.state.wait = self.wait

    def on_train_end(self, logs: dict | None = None) -> None:
        """Nothing: a run is several ``fit`` calls; :meth:`restore_best` runs once, after the last."""

    def restore_best(self) -> int | None:
        """Put the best weights back into the model (from memory, or from the best checkpoint file after a
        resume); returns their step (None when no evaluation happened)."""
        if self.state.best_step is None or self.state.best_step == self.state.step:
            return self.state.best_step  # no evaluation, or the weights in the model are the best
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        else:
            restore(self.model, self.saver.folder, self.state, self.state.best_weights)
        return self.state.best_step


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
        if self.update_freq == "epoch" and not self._should_trace:
            return  # Keras would call tf.summary.scalar for each log with no writer set: ≈ 0.8 ms a step
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
