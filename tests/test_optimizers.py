"""UnitAdamW: u-μP per-parameter learning-rate multipliers by variable role, applied per variable."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from llm_unitscale import optimizers
from llm_unitscale.models import build_model


def test_umup_multipliers_by_role_transformer() -> None:
    width, depth = 32, 4
    model = build_model(vocab_size=50, width=width, depth=depth, heads=4, seq_len=16)
    m = optimizers.umup_multipliers(model.trainable_variables)
    assert m["embedding/embeddings"] == pytest.approx(width**-0.5)
    assert m["position/embeddings"] == pytest.approx(width**-0.5)
    assert m["block_0/attention/query_kernel"] == pytest.approx(width**-0.5 * depth**-0.5)
    assert m["block_3/mlp/up_kernel"] == pytest.approx(width**-0.5 * depth**-0.5)
    assert m["block_3/mlp/down_kernel"] == pytest.approx((4 * width) ** -0.5 * depth**-0.5)
    assert m["readout/kernel"] == pytest.approx(width**-0.5)  # no depth factor: not in a residual branch
    assert m["readout/bias"] == 1.0
    assert m["final_norm/scale"] == 1.0 and m["block_2/mlp_norm/scale"] == 1.0
    assert set(m) == {v.path for v in model.trainable_variables}


def test_umup_multipliers_cnn_fan_in_counts_the_kernel_taps() -> None:
    model = build_model(arch="cnn", vocab_size=50, width=16, depth=2, kernel_size=3)
    m = optimizers.umup_multipliers(model.trainable_variables)
    assert m["conv_0/kernel"] == pytest.approx((3 * 16) ** -0.5)  # (K·C_in)^-½, no depth factor
    assert m["conv_0/bias"] == 1.0
    assert m["hidden/kernel"] == pytest.approx(16**-0.5)


def _one_step(optimizer: keras.optimizers.Optimizer, seed: int = 0) -> dict[str, np.ndarray]:
    """Weight change of one optimizer step on fixed random gradients (same for every optimizer)."""
    keras.utils.set_random_seed(3)
    model = build_model(vocab_size=40, width=16, depth=2, heads=2, seq_len=8, constraint=None)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    rng = np.random.default_rng(seed)
    grads = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables]
    optimizer.apply(grads, model.trainable_variables)
    return {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}


def test_update_size_is_lr_times_multiplier() -> None:
    """Adam's first step is ≈ lr·sign(g) per entry, so Δ_umup / Δ_uniform must equal m(v) for each variable."""
    uniform = _one_step(keras.optimizers.AdamW(1e-2, weight_decay=0.0, beta_2=0.99))
    opt = optimizers.UnitAdamW(1e-2, weight_decay=0.0, beta_2=0.99, lr_rule="umup")
    umup = _one_step(opt)
    assert any(m != 1.0 for m in opt.multipliers_by_path.values())
    for path, delta in uniform.items():
        ratio = np.linalg.norm(umup[path]) / np.linalg.norm(delta)
        assert ratio == pytest.approx(opt.multipliers_by_path[path], rel=1e-4), path


@pytest.mark.parametrize("rule", ["uniform", "umup"])
def test_position_lr_multiplies_the_position_tables_step_only(rule: str) -> None:
    base = optimizers.UnitAdamW(1e-2, weight_decay=0.0, beta_2=0.99, lr_rule=rule)
    fast = optimizers.UnitAdamW(1e-2, weight_decay=0.0, beta_2=0.99, lr_rule=rule, position_lr=3.0)
    before, after = _one_step(base), _one_step(fast)
    for path, delta in before.items():
        factor = 3.0 if path.startswith("position/") else 1.0
        np.testing.assert_allclose(after[path], factor * delta, rtol=1e-4, atol=1e-9, err_msg=path)
    assert fast.multipliers_by_path["position/embeddings"] == pytest.approx(
        3.0 * base.multipliers_by_path["position/embeddings"])
    again = keras.optimizers.deserialize(keras.optimizers.serialize(fast))
    assert again.position_lr == 3.0


@pytest.mark.parametrize("decay", [0.0, 0.3])  # 0: our optimizer skips the decay step Keras builds anyway
def test_uniform_rule_is_plain_adamw(decay: float) -> None:
    plain = _one_step(keras.optimizers.AdamW(1e-2, weight_decay=decay, beta_2=0.99))
    ours = _one_step(optimizers.UnitAdamW(1e-2, weight_decay=decay, beta_2=0.99, lr_rule="uniform"))
    for path, delta in plain.items():
        np.testing.assert_allclose(ours[path], delta, rtol=1e-6, atol=1e-9, err_msg=path)


def test_no_replica_correction_outside_a_strategy() -> None:
    assert optimizers.UnitAdamW.replica_gradient_scale(4) == pytest.approx(2.0)
    plain = _one_step(optimizers.UnitAdamW(1e-2, lr_rule="uniform", replica_correction=False), seed=1)
    corrected = _one_step(optimizers.UnitAdamW(1e-2, lr_rule="uniform", replica_correction=True), seed=1)
    for path, delta in plain.items():
        np.testing.assert_allclose(corrected[path], delta, rtol=1e-6, atol=1e-9, err_msg=path)


def test_invalid_rule_and_config_round_trip() -> None:
    with pytest.raises(ValueError, match="lr_rule"):
        optimizers.UnitAdamW(1e-3, lr_rule="mup")
    opt = optimizers.UnitAdamW(1e-3, lr_rule="umup", replica_correction=False)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, optimizers.UnitAdamW)
    assert again.lr_rule == "umup" and again.replica_correction is False


def test_make_optimizer_follows_the_config() -> None:
    from llm_unitscale.training import TrainConfig, make_optimizer

    unit = make_optimizer(TrainConfig(lr_rule="umup", strategy="none"), 0.3, 100)
    assert isinstance(unit, optimizers.UnitAdamW) and unit.lr_rule == "umup" and unit.replica_correction
    stock = make_optimizer(TrainConfig(lr_rule="umup", unit_scaling=False, strategy="none"), 1e-3, 100)
    assert stock.lr_rule == "uniform" and not stock.replica_correction
    assert unit.position_lr == optimizers.POSITION_LR and stock.position_lr == 1.0  # the stock twin: plain AdamW
    assert float(keras.ops.convert_to_numpy(unit.learning_rate)) == 0.0  # warm-up starts at 0
    assert isinstance(unit._learning_rate, optimizers.WarmupCosineDecay)
    assert unit._learning_rate.get_config()["warmup_target"] == 0.3


def test_sparse_updates_move_only_the_batch_rows_as_adam_would() -> None:
    """Lazy Adam on a table: the rows in the gradient move exactly as dense Adam moves them (duplicates summed),
    every other row keeps its weights and moments; such a table takes no weight decay."""
    table = keras.Variable(np.random.default_rng(0).standard_normal((10, 3)).astype("float32"), name="embeddings")
    dense = keras.Variable(np.array(table.numpy()), name="embeddings")
    lazy = optimizers.UnitAdamW(0.1, lr_rule="uniform", sparse_updates=True, weight_decay=0.5)
    plain = optimizers.UnitAdamW(0.1, lr_rule="uniform", weight_decay=0.0)
    lazy.build([table])
    plain.build([dense])
    before = table.numpy()
    for step in range(3):
        values = tf.constant(np.random.default_rng(step).standard_normal((3, 3)).astype("float32"))
        rows = tf.constant([1, 4, 4])  # row 4 twice: summed
        lazy.apply([tf.IndexedSlices(values, rows, tf.constant([10, 3]))], [table])
        plain.apply([tf.convert_to_tensor(tf.IndexedSlices(values, rows, tf.constant([10, 3])))], [dense])
    np.testing.assert_allclose(table.numpy()[[1, 4]], dense.numpy()[[1, 4]], rtol=1e-5, atol=1e-6)
    untouched = [0, 2, 3, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(table.numpy()[untouched], before[untouched])


def test_rows_known_distinct_skip_the_summing_and_move_as_adam_would() -> None:
    """Inside a traced step, a gradient whose rows come straight from ``tf.unique`` (the bag's) skips the second
    unique and the segment sum; the rows still move exactly as dense Adam moves them. Rows built any other way
    (eager, concatenated, the unique op's second output) are not taken as distinct."""
    @tf.function
    def checks(x: tf.Tensor) -> list[bool]:
        distinct, position = tf.unique(x)
        return [optimizers.distinct_by_construction(t) for t in
                (distinct, tf.reshape(distinct, [-1]), position, tf.concat([distinct, distinct], 0), x)]

    assert [bool(flag) for flag in checks(tf.constant([3, 1, 3]))] == [True, True, False, False, False]
    assert not optimizers.distinct_by_construction(tf.constant([1, 2]))

    table = keras.Variable(np.random.default_rng(1).standard_normal((10, 3)).astype("float32"), name="embeddings")
    dense = keras.Variable(np.array(table.numpy()), name="embeddings")
    lazy = optimizers.UnitAdamW(0.1, lr_rule="uniform", sparse_updates=True)
    plain = optimizers.UnitAdamW(0.1, lr_rule="uniform", weight_decay=0.0)
    lazy.build([table])
    plain.build([dense])

    @tf.function
    def lazy_step(ids: tf.Tensor, values: tf.Tensor) -> None:
        rows = tf.unique(ids)[0]
        lazy.apply([tf.IndexedSlices(values, tf.reshape(rows, [-1]), tf.constant([10, 3]))], [table])

    before = table.numpy()
    for step in range(3):
        values = tf.constant(np.random.default_rng(step).standard_normal((3, 3)).astype("float32"))
        lazy_step(tf.constant([7, 2, 7, 5]), values)  # distinct rows 7, 2, 5
        plain.apply([tf.convert_to_tensor(tf.IndexedSlices(values, tf.constant([7, 2, 5]), tf.constant([10, 3])))],
                    [dense])
    np.testing.assert_allclose(table.numpy()[[2, 5, 7]], dense.numpy()[[2, 5, 7]], rtol=1e-5, atol=1e-6)
    untouched = [0, 1, 3, 4, 6, 8, 9]
    np.testing.assert_array_equal(table.numpy()[untouched], before[untouched])


@pytest.mark.parametrize(("peak", "total", "warmup"), [(3e-2, 2000, 100), (1e-2, 360, 36), (3e-3, 7, 1)])
def test_warmup_cosine_decay_is_keras_cosine_decay_with_its_numbers_as_variables(peak: float, total: int,
                                                                                 warmup: int) -> None:
    """The same learning rate as Keras's CosineDecay at every step, to the bit, with the peak, warm-up and
    decay length held in variables (inputs of a compiled step, not constants), and a config of plain numbers."""
    options = {"decay_steps": total - warmup, "alpha": 0.1, "warmup_target": peak, "warmup_steps": warmup}
    keras_schedule = keras.optimizers.schedules.CosineDecay(0.0, **options)
    schedule = optimizers.WarmupCosineDecay(0.0, **options)
    steps = [0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total, total + 10]
    for step in steps:
        at = tf.constant(step, tf.int64)
        assert float(schedule(at)) == float(keras_schedule(at)), step
    assert all(isinstance(v, tf.Variable) for v in (schedule.decay_steps, schedule.warmup_steps,
                                                    schedule.warmup_target))
    config = schedule.get_config()
    assert config == {**keras_schedule.get_config(), "name": "WarmupCosineDecay"}
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, optimizers.WarmupCosineDecay) and restored.get_config() == config
    schedule.warmup_target.assign(peak / 2)  # read at each call: a compiled step sees the new value
    assert float(schedule(tf.constant(warmup, tf.int64))) == pytest.approx(peak / 2)
    assert schedule.get_config()["warmup_target"] == peak / 2  # the config is what the variables hold


def test_warmup_cosine_decay_needs_its_peak() -> None:
    with pytest.raises(ValueError, match="warmup_target"):
        optimizers.WarmupCosineDecay(0.0, decay_steps=10)
