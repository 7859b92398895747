"""tf.distribute: strategy choice, the batch/lr rule, 2-replica gradients == 1-replica, mirrored and multi-worker runs.

Tests that need two logical CPU devices run this file as a subprocess (``python tests/test_distribute.py MODE``):
the device split must happen before TensorFlow initialises, which the pytest process has already done.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "dataset.txt"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="-1", **extra)
    return env


def _run_mode(mode: str, *args: str, timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, __file__, mode, *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ pure rules
def test_resolve_strategy_rules() -> None:
    from llm_unitscale import distribute

    two = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    assert distribute.resolve_strategy("auto", gpus=0, environ={}) == "none"
    assert distribute.resolve_strategy("auto", gpus=1, environ={}) == "none"
    assert distribute.resolve_strategy("auto", gpus=2, environ={}) == "mirrored"
    assert distribute.resolve_strategy("auto", gpus=0, environ={"TF_CONFIG": two}) == "multiworker"
    assert distribute.resolve_strategy("mirrored", gpus=0, environ={}) == "mirrored"
    assert distribute.resolve_strategy("multiworker", environ={"TF_CONFIG": two}) == "multiworker"
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.resolve_strategy("multiworker", environ={})
    with pytest.raises(ValueError, match="strategy"):
        distribute.resolve_strategy("tpu", environ={})
    with pytest.raises(ValueError, match="JSON"):
        distribute.tf_config_workers({"TF_CONFIG": "{not json"})
    assert distribute.tf_config_workers({"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}})}) == 2


def test_batch_and_lr_rule() -> None:
    from llm_unitscale import distribute

    assert distribute.scaled_batch_and_lr(16, 1e-2, 1, "global") == (16, 1e-2)
    assert distribute.scaled_batch_and_lr(16, 1e-2, 4, "global") == (16, 1e-2)
    batch, lr = distribute.scaled_batch_and_lr(16, 1e-2, 4, "per-replica")
    assert batch == 64 and lr == pytest.approx(2e-2)
    assert distribute.scaled_batch_and_lr(16, 1e-2, 1, "per-replica") == (16, 1e-2)
    with pytest.raises(ValueError):
        distribute.scaled_batch_and_lr(16, 1e-2, 2, "linear")


def test_keras_multiworker_bug_still_present() -> None:
    """Guard for the keras#20329 patch: fails once Keras fixes the bug — then delete the patch and this test."""
    from llm_unitscale import distribute

    assert distribute.keras_multiworker_bug_present(), (
        "Keras no longer has keras#20329: remove distribute.patch_keras_multiworker and this test"
    )


def test_train_config_rejects_unknown_strategy(tmp_path: Path) -> None:
    from llm_unitscale.training import ConfigError, TrainConfig, train

    for field, value in (("strategy", "tpu"), ("lr_rule", "mup"), ("batch_rule", "linear")):
        cfg = TrainConfig(data=str(DATA), out=str(tmp_path / field), **{field: value})
        with pytest.raises(ConfigError):
            train(cfg)


# ------------------------------------------------------------------------------- 2 logical CPU devices
def test_two_replica_gradients_equal_one_replica() -> None:
    """Per-variable gradients the optimizer applies: MirroredStrategy over 2 CPUs == 1 device, same global batch.

    Also shows the check can fail: without the replica correction the unit-scaled gradients are 2^-½ too small.
    """
    result = _run_mode("grads")
    for model in ("unit", "baseline"):
        assert result[model]["variables"] >= 10
        assert result[model]["max_rel_err"] < 1e-4, result
        assert result[model]["loss_2"] == pytest.approx(result[model]["loss_1"], rel=1e-5)  # logged loss not ×R
    ratios = result["unit_uncorrected"]
    assert ratios["min_ratio"] == pytest.approx(math.sqrt(0.5), rel=1e-4)
    assert ratios["max_ratio"] == pytest.approx(math.sqrt(0.5), rel=1e-4)


def test_train_mirrored_two_cpus(tmp_path: Path) -> None:
    """training.train with --strategy mirrored: 2 replicas, XLA switched off, a finite loss, a loadable model."""
    result = _run_mode("train", str(tmp_path / "run"))
    assert result["replicas"] == 2
    assert result["jit_compile"] is False
    assert math.isfinite(result["loss"]) and result["loss"] < 8.0  # ln(vocab) ≈ 6.5 at init: not doubled
    assert result["strategy"] == "mirrored"


# ------------------------------------------------------------------------------------------- multi-worker
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multiworker_two_processes_agree(tmp_path: Path) -> None:
    """Two worker processes on loopback ports (TF_CONFIG), a tiny model, 3 steps: identical final weights."""
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "worker", str(tmp_path / f"run{index}")], env=_env(TF_CONFIG=tf_config),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        ))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [o["replicas"] for o in outputs] == [2, 2]
    assert outputs[0]["steps"] == outputs[1]["steps"] == 3
    assert math.isfinite(outputs[0]["loss"])
    import numpy as np

    a = np.load(tmp_path / "run0.npz")
    b = np.load(tmp_path / "run1.npz")
    assert sorted(a.files) == sorted(b.files)
    assert np.abs(a["readout/bias"]).max() > 0  # zero at init: the steps did update the weights
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------------------ subprocess entry points
def _split_cpu() -> None:
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def _mode_grads() -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from llm_unitscale import optimizers
    from llm_unitscale.models import build_model, loss_for

    class Recording(optimizers.UnitAdamW):
        """Records the gradient each update_step receives (after the all-reduce and the replica correction)."""

        def build(self, var_list: list) -> None:
            super().build(var_list)
            self.seen = [self.add_variable_from_reference(v, name="seen") for v in var_list]
            self._seen_by_key = {self._var_key(v): s for v, s in zip(var_list, self.seen, strict=True)}

        def update_step(self, gradient, variable, learning_rate):  # noqa: ANN001, ANN202
            dense = tf.convert_to_tensor(gradient)  # a one-device embedding gradient is IndexedSlices
            self._seen_by_key[self._var_key(variable)].assign(tf.cast(dense, variable.dtype))
            super().update_step(gradient, variable, learning_rate)

    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=(8, 12)).astype("int32")
    y = rng.integers(1, 50, size=(8, 12)).astype("int32")

    def gradients(strategy: tf.distribute.Strategy, unit: bool, correction: bool) -> tuple[list[np.ndarray], float]:
        keras.utils.set_random_seed(1)
        with strategy.scope():
            model = build_model(vocab_size=50, width=16, depth=1, heads=2, seq_len=12, unit_scaling=unit)
            opt = Recording(1e-3, lr_rule="umup" if unit else "uniform", replica_correction=unit and correction)
            model.compile(optimizer=opt, loss=loss_for(unit), jit_compile=False)
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0).history
        return [np.asarray(s.numpy()) for s in opt.seen], float(history["loss"][-1])

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result: dict = {}
    for unit in (True, False):
        (g1, loss_1), (g2, loss_2) = gradients(one, unit, True), gradients(two, unit, True)
        # relative to the gradient's own size, floored at 1e-3 of the largest gradient entry: the attention key
        # bias's true gradient is 0 (softmax ignores a constant added to every key), computed as rounding noise
        floor = 1e-3 * max(float(np.max(np.abs(a))) for a in g1)
        errs = [float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), floor)) for a, b in zip(g1, g2, strict=True)]
        worst = int(np.argmax(errs))
        result["unit" if unit else "baseline"] = {"variables": len(g1), "max_rel_err": max(errs), "worst": worst,
                                                  "loss_1": loss_1, "loss_2": loss_2}
    (g1, _), (g2, _) = gradients(one, True, True), gradients(two, True, False)
    ratios = [float(np.linalg.norm(b) / np.linalg.norm(a)) for a, b in zip(g1, g2, strict=True) if np.linalg.norm(a)]
    result["unit_uncorrected"] = {"min_ratio": min(ratios), "max_ratio": max(ratios)}
    return result


def _tiny_config(out: str, strategy: str) -> object:
    from llm_unitscale.training import TrainConfig

    return TrainConfig(data=str(DATA), out=out, max_steps=3, width=16, depth=1, heads=2, seq_len=16, batch_size=8,
                       embeddings="none", strategy=strategy, warmup_steps=1, overwrite=True)


def _mode_train(out: str) -> dict:
    import io

    from llm_unitscale import distribute
    from llm_unitscale.training import train

    cfg = _tiny_config(out, "mirrored")
    summary = train(cfg, log=io.StringIO())
    config = json.loads((Path(out) / "config.json").read_text())
    return {"replicas": int(distribute.get_strategy("mirrored").num_replicas_in_sync), "loss": summary["loss"],
            "jit_compile": config["jit_compile"], "strategy": config["strategy"]}


def _mode_worker(out: str) -> dict:
    import io

    import keras
    import numpy as np

    from llm_unitscale import distribute
    from llm_unitscale.training import train

    cfg = _tiny_config(out, "multiworker")
    summary = train(cfg, log=io.StringIO())
    model = keras.models.load_model(Path(out) / "model.keras", compile=False)
    weights = {v.path: v.numpy() for v in model.weights}
    np.savez(out + ".npz", **weights)
    return {"replicas": int(distribute.get_strategy("multiworker").num_replicas_in_sync), "steps": summary["steps"],
            "loss": summary["loss"]}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode in ("grads", "train"):
        _split_cpu()
    if mode == "grads":
        print(json.dumps(_mode_grads()))
    elif mode == "train":
        print(json.dumps(_mode_train(sys.argv[2])))
    elif mode == "worker":
        print(json.dumps(_mode_worker(sys.argv[2])))
    else:
        raise SystemExit(f"unknown mode {mode}")
