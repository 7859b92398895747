"""Incremental decoding with a key/value cache for the transformer language models of :mod:`llm_unitscale.models`.

A decoder-only transformer recomputes, at every new token, the keys and values of every earlier position — work
that does not change from one token to the next. :class:`KVCacheDecoder` keeps them: a *prefill* runs the prompt
once (T positions, causal) and stores each block's keys K and values V; each *step* then runs one new token at
position p through the model, writes its k, v into row p of a fixed-size cache and attends over rows 0…p.

Exactly the maths of the full forward pass, with the model's own layers and weights:

* unit-scaled model (:class:`~llm_unitscale.layers.UnitTransformerBlock`): the block's own ``call`` with a
  ``cache`` and its ``cache_update_index`` — the same layers, projections, norms and residuals as training; only
  the attention core differs: the new rows attend over the cache rows 0…p−1 and themselves
  (:func:`ops.cached_attention`, rows p… of :func:`ops.attention`'s causal output, simulated FP8 included), and
  the block returns their keys and values for the decoder to write;
* stock-Keras baseline: the ``keras.layers.MultiHeadAttention`` layer's own projection layers (its public
  ``query_dense`` … ``output_dense``) around stock attention maths (:func:`precision.stock_attention`,
  softmax(q·kᵀ/√d_head)·v) with a key mask; LayerNormalization, Dense and Add layers are called as they are in
  the model.

Norms, MLPs, the embedding, the readout act row by row, so running them on one row gives that row of the full
pass. Results equal the uncached path up to float rounding (matmuls of a different shape sum in another order).

Context window (the choice made here): positions are learned absolute embeddings over ``seq_len`` slots, and the
uncached path (``inference.generate``) feeds the *last* ``seq_len`` tokens at positions 0…seq_len−1. Once the
window is full, every further token shifts every position, so every cached key and value changes: there is
nothing left to reuse. :class:`IncrementalDecoder` then falls back to a full prefill of the last ``seq_len``
tokens per new token — the uncached cost, and exactly the uncached output. Generation with
``len(prompt) + new_tokens ≤ seq_len`` is cached throughout.

Cost per cached step: O(depth·width²) for the projections plus O(depth·S·width) for attention over the fixed
cache, instead of O(depth·T·width² + depth·T²·width) for a full forward pass over T tokens. The step's maths is
one ``tf.function`` with static shapes (compiled by XLA by default), traced once per batch size. It only *reads*
the caches (the unit-scaled attention of the new row is :func:`ops.cached_attention`: the cache rows plus the new
key, without writing it in); the new keys and values are then written into cache *variables* one row at a time
(:meth:`KVCacheDecoder.bound_step`, used by :class:`IncrementalDecoder`: one graph that captures those
variables). Returning updated cache tensors
instead would copy every cache per token (XLA inserts a copy even when a variable could be updated in place):
measured ≈ 1 ms of a ≈ 5 ms step at the medium shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from llm_unitscale import layers as unit_layers
from llm_unitscale import ops, precision
from llm_unitscale.models import PositionEmbedding

Caches = tuple[tf.Tensor, ...]


def supports(model: keras.Model) -> bool:
    """Whether ``model`` is a transformer language model from :func:`build_model` (unit-scaled or stock)."""
    names = {layer.name for layer in model.layers}
    if not {"embedding", "position", "final_norm", "readout"} <= names:
        return False
    if len(model.outputs[0].shape) != 3:  # (B, T, V): a language model
        return False
    return isinstance(model.get_layer("position"), (unit_layers.UnitPositionEmbedding, PositionEmbedding))


class _UnitBlock:
    """A unit-scaled transformer block driven against a (B, H, S, d_head) key/value cache: the block's own
    ``call`` with ``cache`` and ``cache_update_index`` (:class:`~llm_unitscale.layers.UnitTransformerBlock`),
    so decoding runs the very layers training runs."""

    seq_axis = 2  # caches are (B, H, S, d_head), the layout of ops.attention

    def __init__(self, block: unit_layers.UnitTransformerBlock):
        self.block = block
        self.attention = block.attention
        self.heads = block.attention.num_heads
        self.head_dim = int(block.attention.kernels[0].shape[0]) // self.heads

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (batch, self.heads, length, self.head_dim)

    def __call__(
        self, x: tf.Tensor, key_cache: tf.Tensor | None, value_cache: tf.Tensor | None, pos: tf.Tensor | None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Run ``x`` (B, T, d) through the block. With no cache: a prefill from position 0 (an empty cache).
        With a cache (rows 0…pos−1 filled): the rows at ``pos``…, attending over the cache and themselves (the
        cache is only read). Returns (output, k, v): the new rows' keys and values, to be stored in the cache."""
        if key_cache is None:
            empty = tf.zeros(self.cache_shape(tf.shape(x)[0], 0), self.attention.compute_dtype)
            key_cache, value_cache, pos = empty, empty, 0
        x, (k, v) = self.block(x, cache=(key_cache, value_cache), cache_update_index=pos)
        return x, k, v


class _StockBlock:
    """One stock-Keras transformer block (models._StockKit) against a (B, S, H, d_head) key/value cache."""

    seq_axis = 1  # caches are (B, S, H, d_head), the layout of keras.layers.MultiHeadAttention

    def __init__(self, model: keras.Model, name: str):
        get = model.get_layer
        self.attention_norm = get(f"{name}_attention_norm")
        self.attention: keras.layers.MultiHeadAttention = get(f"{name}_attention")
        self.attention_add = get(f"{name}_attention_add")
        self.mlp_norm = get(f"{name}_mlp_norm")
        self.mlp_up = get(f"{name}_mlp_up")
        self.mlp_down = get(f"{name}_mlp_down")
        self.mlp_add = get(f"{name}_mlp_add")
        self.heads = self.attention.num_heads
        self.head_dim = self.attention.key_dim

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (batch, length, self.heads, self.head_dim)

    def __call__(
        self, x: tf.Tensor, key_cache: tf.Tensor | None, value_cache: tf.Tensor | None, pos: tf.Tensor | None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """As :meth:`_UnitBlock.__call__`, with MultiHeadAttention's own projection layers and the stock
        attention maths (:func:`precision.stock_attention`, simulated FP8 included) over a copy of the cache with
        the new row written in."""
        mha = self.attention
        h = self.attention_norm(x)
        q, k, v = mha.query_dense(h), mha.key_dense(h), mha.value_dense(h)
        if key_cache is None:  # prefill from position 0: causal over the new rows
            keys, values = k, v
            length = tf.shape(q)[1]
            visible = tf.range(length)[None, :] <= tf.range(length)[:, None]
        else:
            keys = _write(key_cache, k, pos, self.seq_axis)
            values = _write(value_cache, v, pos, self.seq_axis)
            visible = (tf.range(tf.shape(keys)[self.seq_axis]) <= pos)[None, :]
        with precision.scope_of(mha):  # the attention maths outside the layer follow its FP8 policy
            o, _ = precision.stock_attention(q, keys, values, visible[None])
        x = self.attention_add([x, mha.output_dense(o)])
        h = self.mlp_down(self.mlp_up(self.mlp_norm(x)))
        return self.mlp_add([x, h]), k, v


def _write(cache: tf.Tensor, new: tf.Tensor, pos: tf.Tensor, axis: int) -> tf.Tensor:
    """``cache`` with its row ``pos`` along ``axis`` replaced by ``new`` (length 1 on that axis); exact (a select).

    A select over the whole cache (O(S·d)) has the same cost order as the attention that reads it, and keeps
    static shapes for XLA."""
    length = cache.shape[axis]
    shape = [1] * len(cache.shape)
    shape[axis] = length
    row = tf.reshape(tf.equal(tf.range(length), pos), shape)
    return tf.where(row, tf.cast(new, cache.dtype), cache)


class KVCacheDecoder:
    """Functional prefill / step over a built transformer LM with per-block key/value caches.

    ``prefill(ids)`` → (logits (B, T, V) float32, caches) for ids (B, T), T ≤ seq_len, at positions 0…T−1;
    ``step(tokens, pos, caches)`` → (logits (B, V) float32, caches) for tokens (B,) at position ``pos`` < seq_len,
    given caches holding positions 0…pos−1. The caches are a tuple (K_0, V_0, K_1, V_1, …) of fixed size seq_len.
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True):
        if not supports(model):
            raise ValueError(f"{model.name}: incremental decoding needs a transformer language model from build_model")
        self.model = model
        self.embedding = model.get_layer("embedding")
        self.position = model.get_layer("position")
        self.final_norm = model.get_layer("final_norm")
        self.readout = model.get_layer("readout")
        self.seq_len = int(self.position.sequence_length)
        unit_blocks = [layer for layer in model.layers if isinstance(layer, unit_layers.UnitTransformerBlock)]
        if unit_blocks:
            self.blocks: list[Any] = [_UnitBlock(b) for b in unit_blocks]
        else:
            names = sorted({layer.name[: -len("_attention")] for layer in model.layers
                            if isinstance(layer, keras.layers.MultiHeadAttention)},
                           key=lambda n: int(n.rsplit("_", 1)[-1]))
            self.blocks = [_StockBlock(model, name) for name in names]
        if not self.blocks:
            raise ValueError(f"{model.name}: no transformer blocks found")
        self.cache_dtype = tf.as_dtype(self.blocks[0].attention.compute_dtype)
        self._prefill = tf.function(self._prefill_impl, reduce_retracing=True)
        self._rows = tf.function(self._rows_impl, jit_compile=jit_compile)
        self._step = tf.function(self._step_impl)

    # -- the graphs: plain TensorFlow ops, traced by the tf.functions below or inside a caller's graph
    def _states(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(hidden states after the final norm, float32 logits) of the last block's output ``x``."""
        hidden = self.final_norm(x)
        return hidden, tf.cast(self.readout(hidden), tf.float32)

    def prefill_states(self, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, Caches]:
        """(hidden states (B, T, d), logits (B, T, V), caches of length seq_len) of ids (B, T) at positions
        0…T−1, as ops of the calling graph (KerasHub's generate traces it inside its own compiled loop)."""
        x = self.position(self.embedding(ids))
        caches: list[tf.Tensor] = []
        length = tf.shape(ids)[1]
        for block in self.blocks:
            x, k, v = block(x, None, None, None)
            pad = [[0, 0]] * 4
            pad[block.seq_axis] = [0, self.seq_len - length]
            caches += [tf.pad(tf.cast(k, self.cache_dtype), pad), tf.pad(tf.cast(v, self.cache_dtype), pad)]
        return (*self._states(x), tuple(caches))

    def _prefill_impl(self, ids: tf.Tensor) -> tuple[tf.Tensor, Caches]:
        _, logits, caches = self.prefill_states(ids)
        return logits, caches

    def _row_states(self, tokens: tf.Tensor, pos: tf.Tensor, caches: Caches) -> tuple[tf.Tensor, tf.Tensor, Caches]:
        """(hidden (B, 1, d), logits (B, 1, V), the new row's keys and values per block) of tokens at ``pos``;
        the caches are only read."""
        # one row: forward-only ops scale the row, not the weights (a weight-sized multiply per matmul would
        # cost more than the matmul; measured 25 → 10 ms per token at the medium shape)
        with ops.forward_only():
            x = self.position(self.embedding(tokens[:, None]), start=pos)
            rows: list[tf.Tensor] = []
            for i, block in enumerate(self.blocks):
                x, k, v = block(x, caches[2 * i], caches[2 * i + 1], pos)
                rows += [tf.cast(k, self.cache_dtype), tf.cast(v, self.cache_dtype)]
            return (*self._states(x), tuple(rows))

    def _rows_impl(self, tokens: tf.Tensor, pos: tf.Tensor, caches: Caches) -> tuple[tf.Tensor, Caches]:
        """(logits (B, V), the new row's keys and values per block) of tokens at ``pos``; the caches are only read."""
        _, logits, rows = self._row_states(tokens, pos, caches)
        return logits[:, 0], rows

    def _written(self, caches: Caches, rows: Caches, pos: tf.Tensor) -> Caches:
        return tuple(_write(cache, row, pos, self.blocks[i // 2].seq_axis)
                     for i, (cache, row) in enumerate(zip(caches, rows, strict=True)))

    def step_states(self, tokens: tf.Tensor, pos: tf.Tensor, caches: Caches) -> tuple[tf.Tensor, tf.Tensor, Caches]:
        """(hidden (B, 1, d), logits (B, 1, V), caches with row ``pos`` written) of tokens (B,) at ``pos``, as ops
        of the calling graph (KerasHub's ``call_with_cache`` contract)."""
        hidden, logits, rows = self._row_states(tokens, pos, caches)
        return hidden, logits, self._written(caches, rows, pos)

    def _step_impl(self, tokens: tf.Tensor, pos: tf.Tensor, caches: Caches) -> tuple[tf.Tensor, Caches]:
        logits, rows = self._rows(tokens, pos, caches)
        return logits, self._written(caches, rows, pos)

    def _step_in_place_impl(self, tokens: tf.Tensor, pos: tf.Tensor, caches: tuple[tf.Variable, ...]) -> tf.Tensor:
        logits, rows = self._rows(tokens, pos, caches)
        for i, (cache, row) in enumerate(zip(caches, rows, strict=True)):
            index = [slice(None)] * len(cache.shape)
            index[self.blocks[i // 2].seq_axis] = slice(pos, pos + 1)
            cache[tuple(index)].assign(row)  # a strided-slice assign: writes one row of the variable in place
        return logits

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.seq_len:
            raise ValueError(f"position {pos} is outside the context of {self.seq_len}")

    # -- public API
    def cache_variables(self, batch: int) -> tuple[tf.Variable, ...]:
        """Zeroed cache variables (K_0, V_0, K_1, V_1, …) for :meth:`bound_step`, each of length seq_len."""
        return tuple(tf.Variable(tf.zeros(block.cache_shape(batch, self.seq_len), self.cache_dtype), trainable=False)
                     for block in self.blocks for _ in ("keys", "values"))

    def prefill(self, ids: np.ndarray | tf.Tensor) -> tuple[tf.Tensor, Caches]:
        """Logits (B, T, V) of ids (B, T) at positions 0…T−1 (= ``model(ids)``) and the filled caches."""
        ids = tf.convert_to_tensor(ids, tf.int32)
        if not 1 <= int(ids.shape[1]) <= self.seq_len:
            raise ValueError(f"prefill needs 1…{self.seq_len} tokens, got {int(ids.shape[1])}")
        return self._prefill(ids)

    def step(self, tokens: np.ndarray | tf.Tensor, pos: int, caches: Caches) -> tuple[tf.Tensor, Caches]:
        """Logits (B, V) of ``tokens`` (B,) at position ``pos`` < seq_len, caches holding positions 0…pos−1."""
        self._check_position(pos)
        return self._step(tf.convert_to_tensor(tokens, tf.int32), tf.constant(pos, tf.int32), caches)

    def bound_step(self, caches: tuple[tf.Variable, ...]) -> Callable[[np.ndarray | tf.Tensor, int], tf.Tensor]:
        """:meth:`step` on these cache *variables*, updated in place: ``step(tokens, pos) → logits``.

        Same maths; faster for generation: the compiled step only reads the caches and the new key/value rows
        are then written into the variables, instead of copying every cache per token; and the graph captures
        the variables, as passing 12 variables as ``tf.function`` arguments costs Python time on every call
        (measured 4.2–5.7 vs 3.6–4.4 ms per step at the medium shape, interleaved)."""
        graph = tf.function(lambda tokens, pos: self._step_in_place_impl(tokens, pos, caches))

        def step(tokens: np.ndarray | tf.Tensor, pos: int) -> tf.Tensor:
            self._check_position(pos)
            return graph(tf.convert_to_tensor(tokens, tf.int32), tf.constant(pos, tf.int32))

        return step


class IncrementalDecoder:
    """Stateful next-token logits for generation: ``start(ids)`` then ``append(tokens)`` per new token.

    Every call returns the float32 logits (B, V) of the last position, equal to
    ``model(all_ids[:, -seq_len:])[:, -1]`` — the uncached path. Prompts longer than seq_len keep their last
    seq_len tokens; once the window is full each ``append`` recomputes it (see the module docstring).
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True):
        self.decoder = KVCacheDecoder(model, jit_compile=jit_compile)
        self.seq_len = self.decoder.seq_len
        self._ids = np.zeros((1, 0), np.int32)
        self._caches: tuple[tf.Variable, ...] = ()  # variables for the current batch size, updated in place
        self._step: Callable[[np.ndarray | tf.Tensor, int], tf.Tensor] | None = None  # bound to _caches

    @property
    def length(self) -> int:
        """Tokens seen so far (prompt and appended), including those slid out of the window."""
        return int(self._ids.shape[1])

    def start(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Reset to the prompt ``ids`` ((T,) or (B, T)); logits (B, V) of its last token."""
        ids = np.asarray(ids, np.int32)
        self._ids = ids[None] if ids.ndim == 1 else ids
        if self._ids.shape[1] < 1:
            raise ValueError("the prompt needs at least one token")
        return self._refill()

    def append(self, tokens: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Add one token per row ((B,) or an int for B = 1); logits (B, V) of the new last position."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if tokens.shape[0] != self._ids.shape[0]:
            raise ValueError(f"append needs {self._ids.shape[0]} tokens (one per row), got {tokens.shape[0]}")
        if self.length == 0:
            raise ValueError("call start(prompt) first")
        self._ids = np.concatenate([self._ids, tokens[:, None]], axis=1)
        pos = self.length - 1
        if pos >= self.seq_len:  # the window slides: every position moves, nothing cached is valid
            return self._refill()
        return self._step(tokens, pos).numpy()

    def _refill(self) -> np.ndarray:
        logits, caches = self.decoder.prefill(self._ids[:, -self.seq_len:])
        batch = self._ids.shape[0]
        if not self._caches or self._caches[0].shape[0] != batch:
            self._caches = self.decoder.cache_variables(batch)
            self._step = self.decoder.bound_step(self._caches)
        for variable, value in zip(self._caches, caches, strict=True):
            variable.assign(value)
        return logits[:, -1].numpy()


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: keras.Model) -> IncrementalDecoder:
    """The model's :class:`IncrementalDecoder`, made once and reused, so its step graph is traced and compiled
    once per model rather than once per generated text."""
    if model not in _DECODERS:
        _DECODERS[model] = IncrementalDecoder(model)
    return _DECODERS[model]
