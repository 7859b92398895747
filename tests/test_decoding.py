"""Incremental decoding with a key/value cache equals the uncached full forward pass (llm_unitscale.decoding)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from llm_unitscale.decoding import IncrementalDecoder, KVCacheDecoder, supports
from llm_unitscale.models import build_model

SHAPE = dict(vocab_size=50, seq_len=12, width=32, depth=2, heads=4)
ATOL = 1e-4


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, SHAPE["vocab_size"], (batch, length)).astype(np.int32)


def trained_like(model: keras.Model, seed: int = 1) -> keras.Model:
    """Perturb every weight so that biases, norm gains and position tables are non-trivial (not init values)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(w.numpy() + 0.3 * rng.standard_normal(w.shape).astype(w.dtype))
    return model


@pytest.fixture(params=[True, False], ids=["unit", "stock"])
def model(request: pytest.FixtureRequest) -> keras.Model:
    return trained_like(build_model("lm", "transformer", unit_scaling=request.param, **SHAPE))


def test_supports_only_transformer_language_models() -> None:
    assert supports(build_model("lm", "transformer", **SHAPE))
    assert supports(build_model("lm", "transformer", unit_scaling=False, **SHAPE))
    assert not supports(build_model("lm", "cnn", **SHAPE))
    assert not supports(build_model("lm", "mlp", **SHAPE))
    assert not supports(build_model("classify", "transformer", num_classes=3, **SHAPE))
    with pytest.raises(ValueError, match="transformer language model"):
        KVCacheDecoder(build_model("lm", "cnn", **SHAPE))


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_prefill_then_steps_equal_full_forward(model: keras.Model, jit_compile: bool) -> None:
    x = ids(2, SHAPE["seq_len"])
    full = model(x).numpy()
    decoder = KVCacheDecoder(model, jit_compile=jit_compile)
    logits, caches = decoder.prefill(x[:, :4])
    np.testing.assert_allclose(logits.numpy(), full[:, :4], atol=ATOL)
    for pos in range(4, SHAPE["seq_len"]):
        logits, caches = decoder.step(x[:, pos], pos, caches)
        np.testing.assert_allclose(logits.numpy(), full[:, pos], atol=ATOL, err_msg=f"position {pos}")
    assert np.abs(full).max() > 0.1  # the comparison is not between near-zero logits


def test_bound_step_equals_step_and_writes_only_row_pos(model: keras.Model) -> None:
    x = ids(2, 7, seed=6)
    decoder = KVCacheDecoder(model)
    _, caches = decoder.prefill(x[:, :5])
    variables = decoder.cache_variables(2)
    for variable, cache in zip(variables, caches, strict=True):
        variable.assign(cache)
    step = decoder.bound_step(variables)
    for pos in (5, 6):
        want, updated = decoder.step(x[:, pos], pos, caches)
        np.testing.assert_allclose(step(x[:, pos], pos).numpy(), want.numpy(), atol=ATOL)
        for i, (variable, before, after) in enumerate(zip(variables, caches, updated, strict=True)):
            axis = decoder.blocks[i // 2].seq_axis
            np.testing.assert_allclose(variable.numpy(), after.numpy(), atol=ATOL)  # row pos written …
            changed = np.any(np.abs(variable.numpy() - before.numpy()) > ATOL,
                             axis=tuple(a for a in range(4) if a != axis))
            assert np.flatnonzero(changed).tolist() == [pos]  # … and no other row
        caches = updated
    with pytest.raises(ValueError, match="outside the context"):
        step(x[:, 6], SHAPE["seq_len"])


def test_cached_steps_depend_on_the_cache(model: keras.Model) -> None:
    """A step must read the cached keys/values: a different prefix gives different logits for the same token."""
    decoder = KVCacheDecoder(model)
    a, b = ids(1, 5, seed=1), ids(1, 5, seed=2)
    _, cache_a = decoder.prefill(a[:, :4])
    _, cache_b = decoder.prefill(b[:, :4])
    step_a, _ = decoder.step(a[:, 4], 4, cache_a)
    step_b, _ = decoder.step(a[:, 4], 4, cache_b)
    assert np.abs(step_a.numpy() - step_b.numpy()).max() > 1e-3


def test_incremental_decoder_equals_uncached_through_the_sliding_window(model: keras.Model) -> None:
    """Start from a 3-token prompt and append past seq_len: every logit equals model(last seq_len tokens)."""
    seq_len = SHAPE["seq_len"]
    x = ids(1, 2 * seq_len + 3, seed=3)[0]
    decoder = IncrementalDecoder(model)
    got = [decoder.start(x[:3])]
    for t in range(3, len(x)):
        got.append(decoder.append(int(x[t])))
    for t, logits in enumerate(got, start=2):
        window = x[max(0, t + 1 - seq_len) : t + 1]
        want = model(window[None]).numpy()[:, -1]
        np.testing.assert_allclose(logits, want, atol=ATOL, err_msg=f"after token {t}")
    assert decoder.length == len(x)


def test_prompt_longer_than_the_context_keeps_its_last_tokens(model: keras.Model) -> None:
    x = ids(1, SHAPE["seq_len"] + 5, seed=4)
    logits = IncrementalDecoder(model).start(x)
    np.testing.assert_allclose(logits, model(x[:, -SHAPE["seq_len"] :]).numpy()[:, -1], atol=ATOL)


def test_mixed_bfloat16_model_decodes_close_to_its_full_pass() -> None:
    """Under a bf16 compute policy the cache is bf16 and results agree to bf16 rounding."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        for unit_scaling in (True, False):
            m = trained_like(build_model("lm", "transformer", unit_scaling=unit_scaling, **SHAPE))
            x = ids(1, 8, seed=5)
            full = m(x).numpy().astype(np.float32)
            decoder = KVCacheDecoder(m)
            assert decoder.cache_dtype.name == "bfloat16"
            logits, caches = decoder.prefill(x[:, :5])
            for pos in range(5, 8):
                logits, caches = decoder.step(x[:, pos], pos, caches)
                scale = np.abs(full[:, pos]).max()
                assert np.abs(logits.numpy() - full[:, pos]).max() < 0.05 * scale + 0.05
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_bad_calls_are_rejected(model: keras.Model) -> None:
    decoder = KVCacheDecoder(model)
    with pytest.raises(ValueError, match="prefill needs"):
        decoder.prefill(ids(1, SHAPE["seq_len"] + 1))
    _, caches = decoder.prefill(ids(1, 2))
    with pytest.raises(ValueError, match="outside the context"):
        decoder.step([1], SHAPE["seq_len"], caches)
    incremental = IncrementalDecoder(model)
    with pytest.raises(ValueError, match="start"):
        incremental.append(1)
    incremental.start([1, 2, 3])
    with pytest.raises(ValueError, match="one per row"):
        incremental.append([1, 2])


@pytest.mark.parametrize("unit_scaling", [True, False], ids=["unit", "stock"])
def test_generate_cached_equals_uncached(unit_scaling: bool) -> None:
    """inference.generate samples the same continuation with and without the cache (and beyond the window)."""
    from pathlib import Path

    from llm_unitscale import inference
    from llm_unitscale.preprocessing import Tokenizer, Vocabulary
    from llm_unitscale.runs import Run

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "the", "dog", "ran", "to", "the", "big", "red", "house", "by", "the", "sea"]
    vocab = Vocabulary.build([words])
    shape = {**SHAPE, "vocab_size": len(vocab)}
    model = trained_like(build_model("lm", "transformer", unit_scaling=unit_scaling, **shape))
    run = Run(Path("."), {"task": "lm", "seq_len": shape["seq_len"]}, Tokenizer("word"), vocab, model)
    steps = 2 * shape["seq_len"]  # crosses the context window
    for temperature in (0.0, 1.0):
        cached = inference.generate(run, "the cat", steps, temperature, seed=3, cached=True)
        uncached = inference.generate(run, "the cat", steps, temperature, seed=3, cached=False)
        assert cached == uncached
        assert cached  # something was generated (eos is one of many tokens)
