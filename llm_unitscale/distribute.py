"""Scale-out on TensorFlow's own engine: ``tf.distribute`` strategy selection and the batch / learning-rate rule.

``--strategy``:

- ``none``: the default strategy (one device; XLA allowed).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over every local GPU (over the logical CPUs when there is
  no GPU: how the tests split this machine's CPU in two). Synchronous data parallelism, all-reduce of the
  gradients every step.
- ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy``, configured by the standard ``TF_CONFIG``
  environment variable (``{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker",
  "index": i}}``, one process per machine, worker 0 is the chief that writes the run folder).
- ``auto`` (default): ``multiworker`` when ``TF_CONFIG`` names more than one worker, else ``mirrored`` when
  more than one GPU is visible, else ``none``.

Every replica runs the same model on its slice of the global batch; Keras splits the ``tf.data`` batches
(``fit`` calls ``strategy.experimental_distribute_dataset``). Under ``mirrored`` and ``multiworker`` XLA is
switched off (``jit_compile=False``, logged): XLA cannot reach the other devices' variables.

**Batch and learning-rate rule** (``--batch-rule``):

- ``global`` (default): ``--batch-size`` is the *global* batch B, split into B/R rows per replica; the
  learning rate is unchanged. The maths is that of one device on batch B, so results (and the tuned lr)
  carry over unchanged when R changes; only the time per step falls.
- ``per-replica``: ``--batch-size`` is the batch *per replica* b; the global batch is B = R·b and the
  learning rate is scaled by √R (the square-root scaling rule for Adam-type optimisers, Malladi et al.
  2022: the gradient noise variance falls as 1/B, so the step that keeps the same noise-to-signal ratio
  grows as √B). Use it to keep each device's memory fixed as machines are added.

**Unit-scaled loss and gradients under replicas.** Keras divides each replica's loss by R and sums the
replicas' gradients; ``UnitSoftmaxCrossEntropy`` returns one value per target and lets Keras reduce them, like
every Keras loss, so the logged loss is the global-batch mean. The unit-scaled ops then scale weight gradients
by N^-½ with N the replica's own rows, so the summed gradient is R^-½ times the one-device gradient of the
same global batch; ``optimizers.UnitAdamW`` multiplies by √R (see there), so the optimizer sees exactly the
global-batch gradient (N = global rows; tested per variable in tests/test_distribute.py).

**Keras 3 + MultiWorkerMirroredStrategy** (keras-team/keras#20329): ``fit`` fails on every worker in two
places of ``keras.src.backend.tensorflow.trainer``: the symbolic build reduces a ``PerReplica`` batch, and
``reduce_per_replica`` concatenates scalar logs along axis 0. :func:`patch_keras_multiworker` fixes exactly
those two (narrowly, only while a MultiWorkerMirroredStrategy is active) so that users keep ``model.fit``
with its callbacks, checkpoints and TensorBoard; ``tests/test_distribute.py`` has a guard test that fails
as soon as Keras fixes the bug, so the patch can then be removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

STRATEGIES = ("auto", "none", "mirrored", "multiworker")
BATCH_RULES = ("global", "per-replica")

_STRATEGY: Any = None  # one strategy per process (MultiWorkerMirroredStrategy can be created only once)
_STRATEGY_NAME: str | None = None


def tf_config_workers(environ: dict[str, str] | None = None) -> int:
    """How many workers ``TF_CONFIG`` names (0 when it is unset); ValueError when it is not valid JSON."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG", "")
    if not raw.strip():
        return 0
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc.msg})") from exc
    cluster = config.get("cluster", {}) if isinstance(config, dict) else {}
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def writer_index(environ: dict[str, str] | None = None) -> int:
    """This process's index among the workers that write files: 0 for the chief — ``TF_CONFIG``'s task of type
    "chief", or worker 0 of a cluster without one — and for a process without ``TF_CONFIG``; 1, 2, … for the
    other workers, which train in a folder of their own and publish nothing (``run_writer.RunWriter``)."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG", "")
    try:
        config = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return 0
    task = config.get("task", {}) if isinstance(config, dict) else {}
    cluster = config.get("cluster", {}) if isinstance(config, dict) else {}
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return 0
    return index + 1 if cluster.get("chief") else index


def resolve_strategy(name: str, gpus: int | None = None, environ: dict[str, str] | None = None) -> str:
    """The concrete strategy ("none", "mirrored" or "multiworker") for a ``--strategy`` value."""
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name != "auto":
        if name == "multiworker" and tf_config_workers(environ) == 0:
            raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable "
                             '(e.g. {"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                             '"task": {"type": "worker", "index": 0}})')
        return name
    if tf_config_workers(environ) > 1:
        return "multiworker"
    if gpus is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    return "mirrored" if gpus > 1 else "none"


def get_strategy(name: str = "auto") -> Any:
    """The process's ``tf.distribute.Strategy`` for ``--strategy name`` (created once, then reused)."""
    global _STRATEGY, _STRATEGY_NAME
    import tensorflow as tf

    concrete = resolve_strategy(name)
    if _STRATEGY is not None and concrete == _STRATEGY_NAME:
        return _STRATEGY
    if concrete == "none":
        return tf.distribute.get_strategy()
    if concrete == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_multiworker()
    _STRATEGY, _STRATEGY_NAME = strategy, concrete
    return strategy


def num_replicas() -> int:
    """Replicas in sync of the strategy in scope (1 outside any strategy)."""
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def scaled_batch_and_lr(batch_size: int, lr: float, replicas: int, rule: str = "global") -> tuple[int, float]:
    """(global batch, learning rate) for ``replicas`` replicas under ``--batch-rule`` (module docstring).

    global:      (B, η)                  — B split over the replicas, η unchanged
    per-replica: (R·b, η·√R)             — b rows on each replica, square-root lr scaling
    """
    if rule not in BATCH_RULES:
        raise ValueError(f"--batch-rule must be one of {', '.join(BATCH_RULES)}, got {rule!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if rule == "global":
        return batch_size, lr
    return batch_size * replicas, lr * math.sqrt(replicas)


@contextlib.contextmanager
def strategy_scope(cfg: Any, log: TextIO | None = None) -> Iterator[Any]:
    """Enter the scope of the strategy ``cfg.strategy`` names; switch XLA off under any tf.distribute strategy."""
    import tensorflow as tf

    strategy = get_strategy(getattr(cfg, "strategy", "auto"))
    replicas = int(strategy.num_replicas_in_sync)
    distributed = replicas > 1 or tf.distribute.has_strategy() or strategy is not tf.distribute.get_strategy()
    if distributed and getattr(cfg, "jit_compile", False):
        cfg.jit_compile = False
        print(f"note: {replicas} replica(s) under {type(strategy).__name__}: XLA switched off "
              "(jit_compile=False), it cannot reach the other devices' variables", file=log or sys.stderr)
    with strategy.scope():
        yield strategy


# ------------------------------------------------------------------------------- Keras 3 multi-worker patch
_PATCHED = False


def keras_multiworker_bug_present() -> bool:
    """Whether the installed Keras still has the two multi-worker bugs of keras-team/keras#20329.

    1. ``TensorFlowTrainer._maybe_symbolic_build`` reduces the first *distributed* batch with
       ``strategy.reduce("MEAN", batch)``, which MultiWorkerMirroredStrategy cannot do for a ``PerReplica`` of
       int token ids ("Attempt to convert a value (PerReplica…)").
    2. ``reduce_per_replica`` reduces every log with ``strategy.reduce("MEAN", v, axis=0)`` in multi-worker
       mode, which fails on the scalar loss and metric logs (there is no axis 0).
    """
    import inspect

    from keras.src.backend.tensorflow import trainer

    build = inspect.getsource(trainer.TensorFlowTrainer._maybe_symbolic_build)
    reduce = inspect.getsource(trainer.reduce_per_replica)
    return "distribute_strategy.reduce(" in build or 'strategy.reduce("MEAN", v, axis=0)' in reduce


def patch_keras_multiworker() -> bool:
    """Fix keras#20329's two bugs in ``keras.src.backend.tensorflow.trainer``; a no-op once Keras is fixed.

    Narrow: both replacements change behaviour only under a multi-worker MultiWorkerMirroredStrategy and
    otherwise call the original. (1) the symbolic build takes this worker's first replica's batch (only
    shapes and dtypes matter for building); (2) scalar logs are averaged over replicas with ``axis=None``.
    Returns whether the patch is (now) installed.
    """
    global _PATCHED
    if _PATCHED:
        return True
    if not keras_multiworker_bug_present():
        return False
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica

    def _first_local(strategy: Any, value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not trainer._collective_all_reduce_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tree.map_structure(lambda v: _first_local(strategy, v), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def _reduce(v: Any) -> Any:
            local = v.values[0] if trainer._is_per_replica_instance(v) else v
            if isinstance(local, tf.Tensor | tf.Variable) and local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original_reduce(v, strategy, reduction)

        return tree.map_structure(_reduce, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True
    return True
