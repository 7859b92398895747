"""Live training progress, like nanoGPT's ``iter 250: loss 1.93, time 23.1ms``: one line every few seconds.

:class:`StepLog` is a Keras callback. Every ``every`` optimizer steps — or, with ``every=0`` (the default of
``train.py --log-every``), whenever ``seconds`` have passed since the last line — it prints

    step 250/2000  loss 1.9312  23.1 ms/step  33,200 tok/s  lr 9.6e-03

to the log stream (stderr), and writes the same scalars (``loss``, ``learning_rate``, ``tokens_per_second``)
per step to TensorBoard (``logs/steps``), which otherwise has one point per epoch. The loss is the mean of the
steps since the previous line (what Keras's batch logs give: the running mean of the epoch so far, turned back
into per-step values). Time per step excludes validation, checkpoints and the line itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

import keras


class StepLog(keras.callbacks.Callback):
    """Print step, loss, ms/step, tokens/s and learning rate every ``every`` steps (or ``seconds`` when 0)."""

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        log: TextIO,
        every: int = 0,
        seconds: float = 5.0,
        log_dir: str | Path | None = None,
        first_step: int = 0,
    ) -> None:
        super().__init__()
        self.total_steps = int(total_steps)
        self.tokens_per_step = int(tokens_per_step)
        self.log = log
        self.every = int(every)
        self.seconds = float(seconds)
        self.step = int(first_step)
        self._writer = None
        self._log_dir = None if log_dir is None else str(log_dir)
        self._epoch_mean = 0.0  # Keras's running mean of the loss over the epoch's batches so far
        self._epoch_batches = 0
        self._loss_sum = 0.0  # per-step losses since the last line
        self._steps = 0
        self._busy = 0.0  # seconds inside training batches since the last line
        self._last_line = time.perf_counter()
        self._batch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_mean, self._epoch_batches = 0.0, 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        self._busy += now - self._batch_start
        self.step += 1
        self._steps += 1
        mean = float((logs or {}).get("loss", float("nan")))
        seen = batch + 1  # Keras reports the mean over batches 0…batch of this fit call's epoch
        if seen <= self._epoch_batches:  # a new fit call restarted the count
            self._epoch_mean, self._epoch_batches = 0.0, 0
        self._loss_sum += mean * seen - self._epoch_mean * self._epoch_batches
        self._epoch_mean, self._epoch_batches = mean, seen
        due = self._steps >= self.every if self.every else now - self._last_line >= self.seconds
        if due or self.step == self.total_steps:
            self._emit()

    def _emit(self) -> None:
        loss = self._loss_sum / max(self._steps, 1)
        ms = 1000.0 * self._busy / max(self._steps, 1)
        tokens = self.tokens_per_step * self._steps / self._busy if self._busy else 0.0
        lr = self._learning_rate()
        print(f"step {self.step}/{self.total_steps}  loss {loss:.4f}  {ms:.1f} ms/step  {tokens:,.0f} tok/s"
              + (f"  lr {lr:.2e}" if lr is not None else ""), file=self.log, flush=True)
        self._write_scalars(loss, tokens, lr)
        self._loss_sum, self._steps, self._busy = 0.0, 0, 0.0
        self._last_line = time.perf_counter()

    def _learning_rate(self) -> float | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        rate = optimizer.learning_rate
        try:
            return float(keras.ops.convert_to_numpy(rate))
        except (TypeError, ValueError):
            return None

    def _write_scalars(self, loss: float, tokens: float, lr: float | None) -> None:
        if self._log_dir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(Path(self._log_dir) / "steps"))
        with self._writer.as_default(step=self.step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("tokens_per_second", tokens)
            if lr is not None:
                tf.summary.scalar("learning_rate", lr)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (call once training is over)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
