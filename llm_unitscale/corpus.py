"""A run's corpus: the task read or detected, the text split into training and validation parts, tokenised,
its vocabulary built — the data layer under ``training`` (which imports this, never the reverse).

A language model's corpus is the prepared corpus of ``prepared.prepare`` (streamed, tokenised in parallel,
cached, read through a memory map); a classifier's file is read whole, split per label, tokenised here.
Each function takes the run's ``training.TrainConfig`` for its settings.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llm_unitscale import data as data_mod

if TYPE_CHECKING:
    from llm_unitscale.training import TrainConfig

__all__ = ["Corpus", "bag_features", "prepare_classifier", "prepare_lm", "read_for_task", "tokenizer_config"]


@dataclass
class Corpus:
    """The tokenised training and validation data of a run."""

    task: str
    tokenizer: Any
    vocab: Any
    labels: list[str] | None
    train: Any  # lm: np.ndarray of ids; classify: (token id lists, label ids)
    val: Any
    val_text: str | Path  # the held-out text, or the file that holds it (a prepared corpus)
    token_lines: list[list[str]] | None  # classify: training tokens per text (for Word2Vec); lm: None
    features: Any = None  # classify with arch "bag": the preprocessing.ngrams.BagOfNgrams recipe
    data_sha256: str | None = None  # the text's hash (``data.corpus_hash``; lm: from the prepared corpus)
    prepared_path: Path | None = None  # lm: the prepared corpus's folder in the cache (``prepared.Prepared.path``)

    def word2vec_lines(self) -> tuple[list[list[str]], int, int]:
        """(sentences, epochs, all sentences) for Word2Vec: ``embeddings.word2vec_plan``'s bounded sample of the
        training texts (lm: of the lines of the token ids, decoded one sampled line at a time)."""
        from llm_unitscale.preprocessing import embeddings as emb

        if self.token_lines is not None:
            lines, epochs = emb.word2vec_plan(self.token_lines)
            return lines, epochs, len(self.token_lines)
        from llm_unitscale.prepared import id_lines

        return id_lines(self.train, self.vocab)


def bag_features(cfg: TrainConfig, vocab: Any) -> Any:
    """The bag-of-n-grams recipe of a run (``preprocessing.ngrams.BagOfNgrams``), or None for other archs."""
    if cfg.arch != "bag":
        return None
    from llm_unitscale.preprocessing.ngrams import BagOfNgrams

    low, high = cfg.char_ngrams
    return BagOfNgrams(len(vocab), cfg.buckets, cfg.word_ngrams, low or 1, high)


def read_for_task(cfg: TrainConfig) -> tuple[str, str | None]:
    """(task, text): the task given or detected, and the file's text when training needs it in memory (a
    classifier, or an input that is not a regular file), else None (a language model's corpus is streamed).

    ``--task auto`` looks at the first ``data.HEAD_BYTES`` of a larger file: a classifier's file is then read
    whole and checked again over every line.
    """
    regular = os.path.isfile(cfg.data)  # a pipe or a device is read once, whole
    if cfg.task == "lm" and regular:
        return "lm", None
    if cfg.task == "auto" and regular:
        head = data_mod.read_head(cfg.data, cfg.encoding, cfg.errors)
        task = data_mod.detect_task(head.split("\n"), cfg.data)
        if task == "lm":
            return task, None
    text = data_mod.read_text(cfg.data, cfg.encoding, cfg.errors)
    return (cfg.task if cfg.task != "auto" else data_mod.detect_task(text.split("\n"), cfg.data)), text


def tokenizer_config(cfg: TrainConfig) -> dict:
    """The settings of the run's tokenizer (``Tokenizer.get_config``, or BPE's before it is trained)."""
    from llm_unitscale.preprocessing import Tokenizer
    from llm_unitscale.preprocessing.bpe import DEFAULT_VOCAB_SIZE

    if cfg.tokenizer == "bpe":
        return {"mode": "bpe", "vocab_size": cfg.vocab_size or DEFAULT_VOCAB_SIZE, "lowercase": cfg.lowercase,
                "normalize": True}
    return Tokenizer(mode=cfg.tokenizer, lowercase=cfg.lowercase).get_config()


def prepare_lm(cfg: TrainConfig, log: TextIO = sys.stderr) -> Corpus:
    """A language model's corpus: the prepared corpus of ``cfg.data`` (``prepared.prepare``: streamed,
    tokenised in parallel, cached), its ids read through a memory map."""
    from llm_unitscale import prepared

    ready = prepared.prepare(cfg.data, tokenizer_config(cfg), val_fraction=cfg.val_fraction, min_count=cfg.min_count,
                             max_vocab=cfg.max_vocab, encoding=cfg.encoding, errors=cfg.errors, cache=cfg.cache,
                             log=log)
    need = cfg.seq_len + 1
    if len(ready.train) < need or len(ready.val) < need:
        raise data_mod.DataError(
            cfg.data,
            f"too short: {len(ready.ids)} tokens, but --seq-len {cfg.seq_len} needs at least "
            f"{math.ceil(need / cfg.val_fraction)} (or pass a smaller --seq-len)",
        )
    print(ready.summary(), file=log)
    return Corpus("lm", ready.tokenizer, ready.vocab, None, ready.train, ready.val, ready.val_path, None,
                  data_sha256=ready.manifest["data_sha256"], prepared_path=ready.path)


def prepare_classifier(cfg: TrainConfig, text: str) -> Corpus:
    """A classifier's corpus: split train/validation (stratified), tokenise, build the vocabulary from the
    training part."""
    from llm_unitscale.preprocessing import Tokenizer, Vocabulary

    path = cfg.data
    lines = text.split("\n")
    tokenizer = Tokenizer(mode=cfg.tokenizer, lowercase=cfg.lowercase)
    task = "classify"
    labels, texts = data_mod.parse_labelled(lines)
    names = sorted(set(labels))
    if len(names) < 2:
        raise data_mod.DataError(path, f"a classifier needs at least 2 labels, found {len(names)}: {names}")
    (train_labels, train_texts), (val_labels, val_texts) = data_mod.classify_split(
        labels, texts, cfg.val_fraction, cfg.seed
    )
    token_lines = [tokenizer.tokenize(t) for t in train_texts]
    vocab = Vocabulary.build([t for t in token_lines if t], min_count=cfg.min_count, max_size=cfg.max_vocab)
    index = {name: i for i, name in enumerate(names)}
    features = bag_features(cfg, vocab)
    train_ids = data_mod.classify_ids(tokenizer, vocab, train_texts, cfg.seq_len, features, token_lines)
    val_ids = data_mod.classify_ids(tokenizer, vocab, val_texts, cfg.seq_len, features)
    val_text = "".join(f"__label__{label} {t}\n" for label, t in zip(val_labels, val_texts, strict=True))
    return Corpus(
        task, tokenizer, vocab, names, (train_ids, [index[label] for label in train_labels]),
        (val_ids, [index[label] for label in val_labels]), val_text, token_lines, features,
        data_sha256=data_mod.corpus_hash(text),
    )
