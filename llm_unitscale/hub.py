"""KerasHub task models over llm_unitscale's networks: the Python API a Keras user already knows.

    import llm_unitscale as lu

    lm = lu.CausalLM.from_run("runs/default")            # a run folder written by train.py (or save_to_run)
    lm.compile(sampler="greedy")                          # KerasHub's samplers: greedy, top_k, top_p, beam, …
    lm.generate(["The war"], max_length=64)               # prompt + continuation, as text
    lm.fit(texts, batch_size=12, epochs=1)                # raw strings: the preprocessor tokenises
    lm.save_to_run("runs/mine")                           # predict.py and evaluate.py read it

    clf = lu.TextClassifier.from_run("runs/reviews")
    clf.predict(["a tedious, silly film"])                # (n, C) probabilities, in the order of clf.labels

Built on KerasHub's base classes, with our networks inside (:func:`models.build_model`: unit-scaled, or the stock
twin with ``unit_scaling=False``):

- :class:`UnitBackbone` (``keras_hub.models.Backbone``): ``{"token_ids", "padding_mask"}`` → the network's
  features before its readout: hidden states (B, T, d) of a language model, pooled features (B, d) of a
  classifier. Built from sizes (``UnitBackbone(vocabulary_size=…, num_layers=…)``) or around a built network;
  its config is the network's own Keras config, so every layer option (the attention rule of an old run, say)
  survives ``get_config``/``from_config``. The padding mask is accepted for KerasHub's contract; the networks
  find padding (id 0) themselves, and a causal language model does not need it.
- :class:`UnitTokenizer` (``keras_hub.tokenizers.Tokenizer``): our tokenizer (NLTK words, characters, jieba,
  BPE) with its vocabulary, ``<eos>`` as ``end_token_id``. The tokenizers are Python, so inside ``tf.data``
  the preprocessors call them through ``tf.py_function``.
- :class:`CausalLMPreprocessor`, :class:`TextClassifierPreprocessor` (``keras_hub.models.Preprocessor``):
  strings → the backbone's inputs, targets and sample weights, exactly as ``train.py`` makes them: a language
  model's text is ``<eos>`` then its tokens with each line break an ``<eos>``; a classifier's, its first
  ``sequence_length`` tokens (or its bag of n-gram features).
- :class:`CausalLM` (``keras_hub.models.CausalLM``): ``call_with_cache`` runs the blocks' own cached ``call``
  (:class:`decoding.KVCacheDecoder`'s prefill and step, the path predict.py decodes with), so KerasHub's
  samplers drive generation. ``<pad>``, ``<unk>`` and ``<bos>`` are never sampled (as predict.py). Unlike
  KerasHub's default, ``generate`` does not stop at the end of a line unless asked
  (``stop_token_ids=[lm.preprocessor.tokenizer.end_token_id]``): a character model writes across lines.
- :class:`TextClassifier` (``keras_hub.models.TextClassifier``): ``predict`` returns probabilities.

``compile()`` defaults to what ``train.py`` uses: :class:`optimizers.UnitAdamW` at the task's default rate, the
unit-scaled loss (or Keras's for the stock twin), weighted accuracy. ``from_run``/``save_to_run`` keep the run
folder as the unit of storage (``config.json``, ``vocab.pkl``, ``model.keras`` — a plain ids → logits network,
what predict.py and evaluate.py load). KerasHub's preset folders work too (``save_to_preset(dir)`` /
``CausalLM.from_preset(dir)``, ``TextClassifier.from_preset(dir)``): the tokenizer's config holds its vocabulary
and BPE model, so it needs no asset files; the scripts read run folders only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras_hub.src.utils.tensor_utils import any_equal

from llm_unitscale import prepared
from llm_unitscale.models import build_model, is_unit_scaled, loss_for
from llm_unitscale.preprocessing.vocabulary import EOS, PAD, SPECIAL_TOKENS, Vocabulary

_PACKAGE = "llm_unitscale"
#: Special tokens a language model never samples: padding, the unknown word, and <bos> (never a target).
_NEVER_SAMPLED = ("pad_id", "unk_id", "bos_id")


def _texts(x: Any) -> list[str]:
    """Python strings of a batch given as a str, a list, a numpy array or a tf string tensor."""
    if isinstance(x, str):
        return [x]
    values = x.numpy() if isinstance(x, tf.Tensor) else np.asarray(x, dtype=object)
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.reshape(values, [-1])]


def _padded(rows: list[list[int]], length: int | None = None) -> np.ndarray:
    """int32 (n, length) with rows left-aligned and zero-padded (length: the longest row if None)."""
    width = length if length is not None else max((len(r) for r in rows), default=1)
    out = np.zeros((len(rows), max(width, 1)), np.int32)
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, : len(row)] = row
    return out


# --------------------------------------------------------------------------------------------------- tokenizer
@keras.saving.register_keras_serializable(package=_PACKAGE)
class UnitTokenizer(keras_hub.tokenizers.Tokenizer):
    """Our tokenizer and vocabulary as a KerasHub tokenizer: ``tokenize(text) → ids``, ``detokenize(ids) →
    text``. ``tokenizer``: a tokenizer's ``get_config()`` (``preprocessing.Tokenizer`` or, with ``bpe_json``, the
    BPE model's settings); ``vocabulary``: every token in id order, the special tokens first."""

    def __init__(self, tokenizer: dict, vocabulary: list[str], bpe_json: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.tokenizer_config = dict(tokenizer)
        self.bpe_json = bpe_json
        if bpe_json is not None:
            from tokenizers import Tokenizer as HFTokenizer

            from llm_unitscale.preprocessing.bpe import BpeTokenizer

            self.text_tokenizer: Any = BpeTokenizer(HFTokenizer.from_str(bpe_json),
                                                    bool(tokenizer.get("lowercase", False)),
                                                    bool(tokenizer.get("normalize", True)))
        else:
            from llm_unitscale.preprocessing import Tokenizer

            self.text_tokenizer = Tokenizer.from_config(self.tokenizer_config)
        if list(vocabulary[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"the vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        self.vocab = Vocabulary(list(vocabulary[len(SPECIAL_TOKENS):]))
        self._add_special_token(EOS, "end_token")
        self._add_special_token(PAD, "pad_token")

    @classmethod
    def of(cls, text_tokenizer: Any, vocab: Vocabulary) -> UnitTokenizer:
        """The KerasHub tokenizer of a tokenizer object and a :class:`Vocabulary` (a run's)."""
        bpe = text_tokenizer.to_json() if getattr(text_tokenizer, "mode", None) == "bpe" else None
        return cls(text_tokenizer.get_config(), list(vocab.tokens), bpe_json=bpe)

    def tokenize(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Ids of the tokens of one text (a list) or of a batch (a list of lists); no special tokens added."""
        ids = [self.vocab.encode(self.text_tokenizer.tokenize(t)) for t in _texts(inputs)]
        return ids[0] if isinstance(inputs, str) else ids

    def detokenize(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Text of one sequence of ids, or a list of texts for a batch; ``<eos>`` is a line break."""
        ids = np.asarray(inputs)
        if ids.ndim == 1:
            return prepared.lm_text(self.text_tokenizer, self.vocab, ids)
        return [prepared.lm_text(self.text_tokenizer, self.vocab, row) for row in ids]

    def lm_ids(self, text: str) -> list[int]:
        """A language model's ids of ``text`` from its start: ``<eos>``, then its tokens and line breaks."""
        return [self.vocab.eos_id, *(int(i) for i in prepared.lm_ids(self.text_tokenizer, self.vocab, text))]

    def get_vocabulary(self) -> list[str]:
        return list(self.vocab.tokens)

    def vocabulary_size(self) -> int:
        return len(self.vocab)

    def id_to_token(self, id: int) -> str:  # noqa: A002 (KerasHub's argument name)
        return self.vocab.id_to_token(id)

    def token_to_id(self, token: str) -> int:
        return self.vocab.token_to_id(token)

    def get_config(self) -> dict:
        return {**super().get_config(), "tokenizer": self.tokenizer_config, "vocabulary": self.get_vocabulary(),
                "bpe_json": self.bpe_json}

    def save_assets(self, dir_path: str) -> None:
        """Nothing to write: a KerasHub preset's ``tokenizer.json`` is :meth:`get_config`, which already holds the
        vocabulary and the BPE model (KerasHub's own tokenizers keep their vocabulary files as assets)."""

    def load_preset_assets(self, preset: str) -> None:
        """Nothing to read (see :meth:`save_assets`)."""


# --------------------------------------------------------------------------------------------------- preprocessors
@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalLMPreprocessor(keras_hub.models.Preprocessor):
    """Strings → ``({"token_ids", "padding_mask"}, targets, sample_weight)`` for a language model: each text's
    :meth:`UnitTokenizer.lm_ids` cut to ``sequence_length + 1``, inputs are all but the last id, targets all but
    the first, padding weighs 0."""

    def __init__(self, tokenizer: UnitTokenizer, sequence_length: int = 64, **kwargs: Any):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)

    def build(self, input_shape: Any = None) -> None:
        self.built = True  # nothing to build: the tokenizer and vocabulary are given

    def _encode(self, texts: tf.Tensor, length: int) -> np.ndarray:
        return _padded([self.tokenizer.lm_ids(t) for t in _texts(texts)], length)

    def call(self, x: Any, y: Any = None, sample_weight: Any = None, sequence_length: int | None = None) -> Any:
        length = (sequence_length or self.sequence_length) + 1
        ids = tf.py_function(lambda t: self._encode(t, length), [tf.convert_to_tensor(x)], tf.int32)
        ids.set_shape([None, length])
        inputs = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] != 0}
        return keras.utils.pack_x_y_sample_weight(inputs, ids[:, 1:], tf.cast(ids[:, 1:] != 0, tf.float32))

    def generate_preprocess(self, x: Any, sequence_length: int | None = None) -> dict:
        """Prompts → token ids padded to ``sequence_length`` (a prompt ends mid-line unless it ends in ``\\n``)."""
        length = sequence_length or self.sequence_length
        rows = [prepared.prompt_ids(self.tokenizer.text_tokenizer, self.tokenizer.vocab, t) for t in _texts(x)]
        too_long = [len(r) for r in rows if len(r) >= length]
        if too_long:
            raise ValueError(f"a prompt of {max(too_long)} tokens leaves no room to generate within "
                             f"max_length {length}")
        ids = _padded(rows, length)
        return {"token_ids": tf.constant(ids), "padding_mask": tf.constant(ids != 0)}

    def generate_postprocess(self, x: dict) -> list[str]:
        """Generated ids → texts: each row's unpadded ids after the leading ``<eos>``."""
        ids, mask = np.asarray(x["token_ids"]), np.asarray(x["padding_mask"])
        return [self.tokenizer.detokenize(row[keep][1:]) for row, keep in zip(ids, mask, strict=True)]

    def get_config(self) -> dict:
        return {**super().get_config(), "sequence_length": self.sequence_length}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TextClassifierPreprocessor(keras_hub.models.Preprocessor):
    """Strings → ``{"token_ids", "padding_mask"}`` for a classifier, padded to the batch's longest text: the
    first ``sequence_length`` tokens' ids, or with ``features`` (a ``BagOfNgrams`` config) their bag of word and
    character n-gram features, as ``train.py`` makes them. ``labels``: the class names, in the model's order."""

    def __init__(self, tokenizer: UnitTokenizer, labels: list[str], sequence_length: int = 64,
                 features: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.labels = [str(label) for label in labels]
        self.sequence_length = int(sequence_length)
        self.features = features
        from llm_unitscale.preprocessing.ngrams import BagOfNgrams

        self._bag = BagOfNgrams.from_config(features) if features else None

    def build(self, input_shape: Any = None) -> None:
        self.built = True  # nothing to build: the tokenizer, vocabulary and features are given

    def _encode(self, texts: Any) -> np.ndarray:
        from llm_unitscale.data import classify_ids

        return _padded([list(r) for r in classify_ids(self.tokenizer.text_tokenizer, self.tokenizer.vocab,
                                                      _texts(texts), self.sequence_length, self._bag)])

    def call(self, x: Any, y: Any = None, sample_weight: Any = None) -> Any:
        ids = tf.py_function(self._encode, [tf.convert_to_tensor(x)], tf.int32)
        ids.set_shape([None, None])
        return keras.utils.pack_x_y_sample_weight({"token_ids": ids, "padding_mask": ids != 0}, y, sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "labels": self.labels, "sequence_length": self.sequence_length,
                "features": self.features}


# --------------------------------------------------------------------------------------------------- backbone
@keras.saving.register_keras_serializable(package=_PACKAGE)
class UnitBackbone(keras_hub.models.Backbone):
    """A :func:`models.build_model` network without its readout, as a KerasHub backbone.

    Either sizes (``vocabulary_size``, ``sequence_length``, ``hidden_dim``, ``num_layers``, ``num_heads``,
    ``task``, ``arch``, ``num_classes``, ``unit_scaling``, ``dropout``; anything else ``build_model`` takes in
    ``model_options``) or ``network``: a built network (or its Keras config). The readout's config is kept as
    :attr:`readout_config`, for the task model's head.
    """

    def __init__(self, vocabulary_size: int | None = None, sequence_length: int = 64, hidden_dim: int = 128,
                 num_layers: int = 4, num_heads: int = 4, task: str = "lm", arch: str = "transformer",
                 num_classes: int | None = None, unit_scaling: bool = True, dropout: float = 0.0,
                 model_options: dict | None = None, network: keras.Model | dict | None = None, **kwargs: Any):
        if network is None:
            if vocabulary_size is None:
                raise ValueError("UnitBackbone needs vocabulary_size (or a built network)")
            network = build_model(task=task, arch=arch, vocab_size=vocabulary_size, seq_len=sequence_length,
                                  width=hidden_dim, depth=num_layers, heads=num_heads, num_classes=num_classes,
                                  unit_scaling=unit_scaling, dropout=dropout, **(model_options or {}))
        elif isinstance(network, dict):
            network = keras.saving.deserialize_keras_object(network)
        readout = network.get_layer("readout")
        token_ids = network.inputs[0]
        padding_mask = keras.Input(shape=(None,), dtype="bool", name="padding_mask")
        super().__init__(inputs={"token_ids": token_ids, "padding_mask": padding_mask}, outputs=readout.input,
                         **kwargs)
        self.network_config = keras.saving.serialize_keras_object(network)
        self.readout_config = keras.saving.serialize_keras_object(readout)
        self.task_kind = "lm" if len(network.outputs[0].shape) == 3 else "classify"
        self.unit_scaling = is_unit_scaled(network)
        self.sequence_length = _sequence_length(network, sequence_length)
        self.arch = _arch(network)

    def get_config(self) -> dict:
        return {**super().get_config(), "network": self.network_config}


def _sequence_length(network: keras.Model, default: int) -> int:
    """The longest context of a network: its position table's size (a transformer), else ``default``."""
    names = {layer.name for layer in network.layers}
    return int(network.get_layer("position").sequence_length) if "position" in names else int(default)


def _arch(network: keras.Model) -> str:
    """Which of ``models.ARCHS`` a network is, from its layer names (``build_model`` names them)."""
    names = {layer.name for layer in network.layers}
    if "position" in names:
        return "transformer"
    if any(name.startswith("conv_") for name in names):
        return "cnn"
    return "mlp" if "hidden" in names else "bag"


def _head(backbone: UnitBackbone) -> keras.layers.Layer:
    """A new readout layer like the backbone's network's (same class and config, fresh weights)."""
    return keras.saving.deserialize_keras_object(backbone.readout_config)


def _flat_network(backbone: UnitBackbone, readout: keras.layers.Layer) -> keras.Model:
    """ids → logits through the backbone's own layers and ``readout``: the shape of :func:`build_model`'s
    networks (same layer names), what a run folder stores and :mod:`decoding` drives."""
    logits = readout(backbone.output)
    return keras.Model(backbone.input["token_ids"], logits, name=backbone.name + "_network")


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Every weight of ``source`` into the layer of the same name in ``target`` (networks of one config)."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def _compile_defaults(model: keras.Model, optimizer: Any, loss: Any, char_lm: bool) -> tuple[Any, Any]:
    """``train.py``'s optimizer (UnitAdamW at the task's default rate; no schedule) and loss for "auto"."""
    from llm_unitscale import optimizers, training

    unit = model.backbone.unit_scaling
    if optimizer == "auto":
        bag = model.backbone.arch == "bag"
        rate = training.BAG_LR[unit] if bag else (training.CHAR_LM_LR if char_lm else training.DEFAULT_LR)[unit]
        optimizer = optimizers.UnitAdamW(rate, beta_2=0.99, lr_rule="uniform", replica_correction=unit,
                                         sparse_updates=bag, position_lr=optimizers.position_lr(unit))
    if loss == "auto":
        loss = loss_for(unit)
    return optimizer, loss


def _save_run(model: keras.Model, network: keras.Model, path: str | os.PathLike, task: str, tokenizer: UnitTokenizer,
              extra: dict) -> Path:
    """A run folder predict.py and evaluate.py read: config.json, vocab.pkl, model.keras (+ tokenizer.json)."""
    from llm_unitscale import files, runs

    folder = Path(path)
    if folder.exists() and not runs.is_run_folder(folder):
        raise runs.RunError(f"{folder}: exists and is not a run folder; refusing to write into it")
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_marker(folder)
    tokenizer.vocab.save(folder / runs.VOCAB)
    if tokenizer.bpe_json is not None:
        files.atomic_write_bytes(folder / runs.TOKENIZER, tokenizer.bpe_json.encode("utf-8"))
    runs.atomic_save_model(network, folder / runs.MODEL)
    config = {"task": task, "tokenizer": tokenizer.tokenizer_config, "vocab_size": len(tokenizer.vocab),
              "unit_scaling": model.backbone.unit_scaling, "params": int(network.count_params()), **extra}
    files.atomic_write_json(folder / runs.CONFIG, config)
    return folder


def _load_run(path: str | os.PathLike, task: str) -> Any:
    from llm_unitscale import runs

    run = runs.load_run(path)
    if run.task != task:
        raise runs.RunError(f"{path}: a {run.task} run, not a {task} run")
    return run


# --------------------------------------------------------------------------------------------------- task models
@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalLM(keras_hub.models.CausalLM):
    """A language model: ``{"token_ids", "padding_mask"}`` → logits (B, T, V); ``generate`` with KerasHub's
    samplers over a key/value cache; ``fit`` on raw strings with a :class:`CausalLMPreprocessor`."""

    backbone_cls = UnitBackbone
    preprocessor_cls = CausalLMPreprocessor

    def __init__(self, backbone: UnitBackbone, preprocessor: CausalLMPreprocessor | None = None, **kwargs: Any):
        if backbone.task_kind != "lm":
            raise ValueError("CausalLM needs a language-model backbone (task='lm')")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.readout = _head(backbone)
        inputs = backbone.input
        outputs = self.readout(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.network = _flat_network(backbone, self.readout)
        self._decoder: Any = None

    def compile(self, optimizer: Any = "auto", loss: Any = "auto", *, weighted_metrics: Any = "auto",
                sampler: Any = "top_k", **kwargs: Any) -> None:
        char = self.preprocessor is not None and self.preprocessor.tokenizer.tokenizer_config.get("mode") == "char"
        optimizer, loss = _compile_defaults(self, optimizer, loss, char)
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, sampler=sampler,
                        **kwargs)

    @property
    def decoder(self) -> Any:
        """The key/value-cache decoder over :attr:`network` (transformers only)."""
        from llm_unitscale import decoding

        if self._decoder is None:
            if not decoding.supports(self.network):
                raise ValueError("generate() needs a transformer language model (the key/value cache); "
                                 "cnn and mlp models predict with predict.py")
            self._decoder = decoding.KVCacheDecoder(self.network, jit_compile=False)
        return self._decoder

    def _never_sampled(self, logits: tf.Tensor) -> tf.Tensor:
        vocab_size = int(logits.shape[-1])
        banned = np.zeros(vocab_size, np.float32)
        banned[[getattr(Vocabulary, name) for name in _NEVER_SAMPLED]] = -1e9
        return logits + tf.constant(banned)

    def _build_cache(self, token_ids: tf.Tensor) -> tuple[tf.Tensor, tuple]:
        hidden, _, caches = self.decoder.prefill_states(token_ids)
        return hidden, caches

    def call_with_cache(self, token_ids: tf.Tensor, cache: tuple, cache_update_index: tf.Tensor
                        ) -> tuple[tf.Tensor, tf.Tensor, tuple]:
        """(logits (B, 1, V), hidden states (B, 1, d), cache with row ``cache_update_index`` written) of the
        tokens (B, 1) at that position: KerasHub's contract for its samplers."""
        hidden, logits, cache = self.decoder.step_states(token_ids[:, 0], cache_update_index, cache)
        return self._never_sampled(logits), hidden, cache

    def generate_step(self, inputs: dict, stop_token_ids: Any = None) -> dict:
        """One batch of generation, compiled by KerasHub: fill the cache with the padded prompts, then let the
        sampler extend every row from the shortest prompt's end (longer prompts keep their own tokens)."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(token_ids)
        index = keras.ops.min(keras.ops.sum(keras.ops.cast(padding_mask, "int32"), axis=-1))

        def next_token(prompt: tf.Tensor, cache: tuple, index: tf.Tensor) -> tuple:
            tokens = keras.ops.slice(prompt, [0, index - 1], [keras.ops.shape(prompt)[0], 1])
            logits, hidden, cache = self.call_with_cache(tokens, cache, index - 1)
            return keras.ops.squeeze(logits, 1), keras.ops.squeeze(hidden, 1), cache

        token_ids = self.sampler(next=next_token, prompt=token_ids, cache=cache, index=index, mask=padding_mask,
                                 stop_token_ids=stop_token_ids, hidden_states=hidden_states, model=self)
        if stop_token_ids is None:
            return {"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids, dtype="bool")}
        ends = any_equal(token_ids, stop_token_ids, keras.ops.logical_not(padding_mask))
        ends = keras.ops.cast(ends, "int32")
        after_end = keras.ops.cumsum(ends, axis=-1) - ends  # positions after a generated stop token
        return {"token_ids": token_ids, "padding_mask": keras.ops.logical_not(keras.ops.cast(after_end, "bool"))}

    def generate(self, inputs: Any, max_length: int | None = None, stop_token_ids: Any = None,
                 strip_prompt: bool = False) -> Any:
        """KerasHub's ``generate`` (prompt + continuation, ``max_length`` tokens at most, counting the leading
        ``<eos>``); no stop token unless given. ``max_length`` defaults to the model's context."""
        limit = self.backbone.sequence_length
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} is longer than the model's context of {limit}")
        return super().generate(inputs, max_length=max_length or limit, stop_token_ids=stop_token_ids,
                                strip_prompt=strip_prompt)

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> CausalLM:
        """The language model of a run folder (train.py's or :meth:`save_to_run`'s), weights included."""
        run = _load_run(path, "lm")
        backbone = UnitBackbone(network=run.model)
        preprocessor = CausalLMPreprocessor(UnitTokenizer.of(run.tokenizer, run.vocab), backbone.sequence_length)
        model = cls(backbone, preprocessor)
        _copy_weights(run.model, model.network)
        return model

    def save_to_run(self, path: str | os.PathLike) -> Path:
        """Write a run folder that predict.py, evaluate.py and :meth:`from_run` read."""
        if self.preprocessor is None:
            raise ValueError("save_to_run needs a preprocessor (the tokenizer and vocabulary)")
        return _save_run(self, self.network, path, "lm", self.preprocessor.tokenizer,
                         {"seq_len": self.backbone.sequence_length, "labels": None})


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TextClassifier(keras_hub.models.TextClassifier):
    """A text classifier: inputs → logits (B, C); ``predict`` returns probabilities; ``fit`` on raw strings and
    integer labels with a :class:`TextClassifierPreprocessor`."""

    backbone_cls = UnitBackbone
    preprocessor_cls = TextClassifierPreprocessor

    def __init__(self, backbone: UnitBackbone, num_classes: int | None = None,
                 preprocessor: TextClassifierPreprocessor | None = None, **kwargs: Any):
        if backbone.task_kind != "classify":
            raise ValueError("TextClassifier needs a classifier backbone (task='classify')")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.readout = _head(backbone)
        self.num_classes = int(self.readout.units)
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ValueError(f"num_classes {num_classes} differs from the backbone's readout ({self.num_classes})")
        inputs = backbone.input
        outputs = self.readout(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.network = _flat_network(backbone, self.readout)

    @property
    def labels(self) -> list[str]:
        """The class names in output order (the preprocessor's), or their indices as strings."""
        if self.preprocessor is not None:
            return list(self.preprocessor.labels)
        return [str(i) for i in range(self.num_classes)]

    def compile(self, optimizer: Any = "auto", loss: Any = "auto", *, metrics: Any = "auto", **kwargs: Any) -> None:
        optimizer, loss = _compile_defaults(self, optimizer, loss, False)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def predict(self, x: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        """Class probabilities (n, C), in the order of :attr:`labels`."""
        logits = np.asarray(super().predict(x, *args, **kwargs), np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> TextClassifier:
        """The classifier of a run folder (train.py's or :meth:`save_to_run`'s), weights included."""
        run = _load_run(path, "classify")
        backbone = UnitBackbone(network=run.model)
        preprocessor = TextClassifierPreprocessor(UnitTokenizer.of(run.tokenizer, run.vocab), run.labels,
                                                  run.seq_len, run.config.get("features"))
        model = cls(backbone, preprocessor=preprocessor)
        _copy_weights(run.model, model.network)
        return model

    def save_to_run(self, path: str | os.PathLike) -> Path:
        """Write a run folder that predict.py, evaluate.py and :meth:`from_run` read."""
        if self.preprocessor is None:
            raise ValueError("save_to_run needs a preprocessor (the tokenizer, vocabulary and labels)")
        p = self.preprocessor
        return _save_run(self, self.network, path, "classify", p.tokenizer,
                         {"seq_len": p.sequence_length, "labels": p.labels, "features": p.features})
