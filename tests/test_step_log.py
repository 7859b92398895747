"""Live progress lines (step_log.StepLog) and the input pipeline's teardown (data.prefetched)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from llm_unitscale import data
from llm_unitscale.step_log import StepLog

LINE = re.compile(r"step (\d+)/(\d+)  loss ([0-9.]+)  ([0-9.]+) ms/step  ([0-9,]+) tok/s  lr ([0-9.e+-]+)")


def _frozen_model() -> keras.Model:
    """A model that does not learn (lr 0), so each step's loss is that batch's loss under fixed weights."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    return model


def test_lines_every_n_steps_with_the_mean_loss_of_those_steps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = rng.standard_normal((40, 1)).astype(np.float32) * np.arange(1, 41)[:, None]  # losses grow per batch
    model = _frozen_model()
    per_batch = [float(model.evaluate(x[i : i + 4], y[i : i + 4], verbose=0)) for i in range(0, 40, 4)]
    out = io.StringIO()
    log = StepLog(total_steps=10, tokens_per_step=4, log=out, every=3, log_dir=tmp_path / "logs")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[log], verbose=0)
    log.close()
    lines = [LINE.fullmatch(line) for line in out.getvalue().splitlines()]
    assert all(lines), out.getvalue()
    assert [int(m.group(1)) for m in lines] == [3, 6, 9, 10]
    expected = [np.mean(per_batch[0:3]), np.mean(per_batch[3:6]), np.mean(per_batch[6:9]), per_batch[9]]
    np.testing.assert_allclose([float(m.group(3)) for m in lines], expected, rtol=2e-4)
    assert all(float(m.group(4)) > 0 for m in lines)
    assert list((tmp_path / "logs" / "steps").glob("events.out.tfevents.*"))  # per-step TensorBoard scalars


def test_a_second_epoch_and_a_resumed_count(tmp_path: Path) -> None:
    """Step numbers continue across epochs and from ``first_step`` (a resumed run)."""
    x = np.ones((8, 4), np.float32)
    out = io.StringIO()
    log = StepLog(total_steps=14, tokens_per_step=4, log=out, every=2, first_step=10)
    _frozen_model().fit(x, x[:, :1], batch_size=4, epochs=2, callbacks=[log], verbose=0)
    assert [int(m.group(1)) for m in map(LINE.fullmatch, out.getvalue().splitlines())] == [12, 14]


def test_pipelines_run_without_the_autotuner() -> None:
    """Every dataset the trainer reads comes through data.prefetched: tf.data's autotuner is off (its model
    thread made the end of fit wait up to a minute), and it still prefetches."""
    ids = np.arange(1, 400, dtype=np.int32)
    for dataset in (data.lm_train_batches(ids, 8, 4, 0, 0, 5), data.lm_eval_batches(ids, 8, 4)):
        assert dataset.options().autotune.enabled is False
        assert len(list(dataset)) > 0
    assert isinstance(data.prefetched(tf.data.Dataset.range(3)), tf.data.Dataset)
