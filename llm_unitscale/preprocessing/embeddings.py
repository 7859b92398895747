"""Word vectors with gensim: train Word2Vec, read/write KeyedVectors, build a unit-scaled embedding matrix.

Unit scaling initialises every weight at unit scale, so ``embedding_matrix`` rescales each pre-trained
vector to RMS 1 (the direction is what word2vec learnt; the magnitude is the model's business) and draws
the rows it has no vector for from N(0, 1), like a freshly initialised unit-scaled embedding.

File formats (chosen by the file name's suffix, optionally followed by ``.gz`` for the word2vec ones):

* ``.kv``: gensim's native ``KeyedVectors.save`` format, a **pickle**. Loading one can run arbitrary code,
  so only load ``.kv`` files you made yourself (a run folder's ``embeddings.kv``) or trust.
* ``.txt`` / ``.vec``: word2vec text format (``load_word2vec_format(binary=False)``), e.g. fastText's
  ``.vec`` files. Plain data, safe to read from anywhere.
* ``.bin``: word2vec binary format (e.g. ``GoogleNews-vectors-negative300.bin.gz``). Plain data.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np

if TYPE_CHECKING:
    from gensim.models import KeyedVectors, Word2Vec

    from llm_unitscale.preprocessing.vocabulary import Vocabulary

__all__ = [
    "EmbeddingError",
    "WordVectors",
    "embedding_matrix",
    "load_keyed_vectors",
    "save_keyed_vectors",
    "train_word2vec",
    "word2vec_plan",
]

_NUM_SPECIALS = 4  # <pad>, <unk>, <bos>, <eos> at ids 0-3 of every Vocabulary
_TEXT_SUFFIXES = (".txt", ".vec")
_BINARY_SUFFIXES = (".bin",)
_KV_SUFFIXES = (".kv",)


class EmbeddingError(ValueError):
    """A word-vector file cannot be used. The message starts with the file's path: ``"PATH: ..."``."""


def _stable_hash(text: str) -> int:
    """A hash that, unlike ``hash``, does not change between processes (PYTHONHASHSEED)."""
    return zlib.crc32(text.encode("utf-8"))


class _EpochProgress:
    """Prints one line per Word2Vec epoch (epoch, elapsed seconds, training loss) to a stream.

    gensim calls a callback's ``on_train_begin``, ``on_epoch_begin``, ``on_epoch_end`` and ``on_train_end``
    (``gensim.models.callbacks.CallbackAny2Vec``'s four methods, all defined here): no base class, so that this
    module imports without gensim (≈ 1 s), which a run needs only to train or read vectors."""

    def __init__(self, epochs: int, stream: TextIO) -> None:
        self.epochs = epochs
        self.stream = stream
        self.epoch = 0
        self.start = 0.0
        self.previous_loss = 0.0

    def on_train_begin(self, model: Word2Vec) -> None:
        self.start = time.perf_counter()

    def on_epoch_begin(self, model: Word2Vec) -> None:
        pass

    def on_train_end(self, model: Word2Vec) -> None:
        pass

    def on_epoch_end(self, model: Word2Vec) -> None:
        self.epoch += 1
        cumulative = float(model.get_latest_training_loss())
        loss, self.previous_loss = cumulative - self.previous_loss, cumulative
        elapsed = time.perf_counter() - self.start
        print(
            f"word2vec: epoch {self.epoch}/{self.epochs} - {elapsed:.1f}s - loss {loss:.1f}",
            file=self.stream,
            flush=True,
        )


class _CountedSentences:
    """The sentences, counted (``progress.Progress``, in words) as gensim reads them: once to build its
    vocabulary, then once per epoch. gensim's reader runs a few jobs of 10,000 words ahead of training."""

    def __init__(self, sentences: list[list[str]], epochs: int) -> None:
        from llm_unitscale.progress import Progress

        words = sum(map(len, sentences))
        self.sentences = sentences
        self.progress = Progress(f"word2vec ({epochs} epochs and a vocabulary pass)", words * (epochs + 1), "words")
        self.words = 0

    def __iter__(self) -> Any:
        for count, sentence in enumerate(self.sentences):
            self.words += len(sentence)
            if count % 64 == 0 or len(sentence) > 1000:  # a clock read is ~1 µs
                self.progress.update(self.words)
            yield sentence


#: Most token passes Word2Vec makes at the start of a run (epochs × tokens), and most epochs.
WORD2VEC_TOKEN_BUDGET = 10_000_000
WORD2VEC_MAX_EPOCHS = 10
#: CBOW's context on each side, and the fewest occurrences for a token to get a vector.
WORD2VEC_WINDOW = 5
WORD2VEC_MIN_COUNT = 1


def word2vec_plan(sentences: list[list[str]], budget: int = WORD2VEC_TOKEN_BUDGET,
                  most_epochs: int = WORD2VEC_MAX_EPOCHS) -> tuple[list[list[str]], int]:
    """(sentences to train on, epochs) with at most ``budget`` token passes: E = min(most, budget // N) epochs
    over all N tokens, at least one; above the budget, one epoch over every k-th sentence (k = ⌈N / budget⌉),
    a sample spread over the whole corpus.

    Word2Vec is an initialisation, and its cost grew with the corpus: 5.5 s of a 2000-step character recipe
    (10 epochs over 2.9 M characters, 82 distinct) and about a minute for 50 MB. A few hundred distinct tokens
    need no 10 passes over millions of occurrences; a small corpus keeps all 10."""
    step, epochs = word2vec_sampling(sum(len(sentence) for sentence in sentences), budget, most_epochs)
    return sentences[::step], epochs


def word2vec_sampling(tokens: int, budget: int = WORD2VEC_TOKEN_BUDGET,
                      most_epochs: int = WORD2VEC_MAX_EPOCHS) -> tuple[int, int]:
    """(k, epochs) of :func:`word2vec_plan` for ``tokens`` tokens: every k-th sentence, that many epochs."""
    if tokens <= budget:
        return 1, max(1, min(most_epochs, budget // max(tokens, 1)))
    return -(-tokens // budget), 1


def train_word2vec(
    sentences: list[list[str]],
    vector_size: int,
    seed: int = 0,
    epochs: int = 10,
    window: int = WORD2VEC_WINDOW,
    min_count: int = WORD2VEC_MIN_COUNT,
    progress: bool = True,
) -> KeyedVectors:
    """Train CBOW Word2Vec on tokenized sentences and return its word vectors.

    Training uses a single worker thread and a process-independent hash, so the same sentences and
    seed give identical vectors in every run.

    Args:
        sentences: Tokenized sentences (lists of tokens).
        vector_size: Dimension of the vectors.
        seed: Random seed (initial vectors, negative sampling, down-sampling).
        epochs: Passes over the sentences.
        window: Context window on each side.
        min_count: Ignore tokens seen fewer times.
        progress: Print one line per epoch to stderr, and words done and words/s every few seconds
            (``progress.Progress``) when it takes longer than that.

    Returns:
        The trained ``KeyedVectors`` (``model.wv``).

    Raises:
        ValueError: a bad argument, or no token occurs ``min_count`` times.
    """
    for name, value, low in (
        ("vector_size", vector_size, 1),
        ("epochs", epochs, 1),
        ("window", window, 1),
        ("min_count", min_count, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    from gensim.models import Word2Vec

    sentences = [list(s) for s in sentences]
    try:  # counted at C speed (0.2 s for 2.8 M characters, a Python loop 0.7 s); then each distinct token checked
        counts: Counter | None = Counter(itertools.chain.from_iterable(sentences))
    except TypeError:  # an unhashable token
        counts = None
    if counts is None or not all(isinstance(tok, str) for tok in counts):
        raise ValueError("train_word2vec expects lists of string tokens")
    if not any(n >= min_count for n in counts.values()):
        raise ValueError(f"cannot train word2vec: no token occurs at least min_count={min_count} times")
    callbacks = [_EpochProgress(epochs, sys.stderr)] if progress else []
    corpus: Any = _CountedSentences(sentences, epochs) if progress else sentences
    model = Word2Vec(
        vector_size=vector_size,
        window=window,
        min_count=min_count,
        workers=1,
        seed=seed,
        hashfxn=_stable_hash,
        compute_loss=True,
    )
    model.build_vocab(corpus)
    model.train(
        corpus,
        total_examples=model.corpus_count,
        epochs=epochs,
        compute_loss=True,
        callbacks=callbacks,
    )
    if isinstance(corpus, _CountedSentences):
        corpus.progress.close(corpus.words)
    return model.wv


def _kind(path: Path) -> str:
    """Return ``"kv"``, ``"text"`` or ``"binary"`` from the file name, or raise EmbeddingError."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    if name.endswith(_KV_SUFFIXES) and not path.name.lower().endswith(".gz"):
        return "kv"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    if name.endswith(_BINARY_SUFFIXES):
        return "binary"
    raise EmbeddingError(
        f"{path}: unknown word-vector format; expected a name ending in .kv (gensim), "
        ".txt or .vec (word2vec text) or .bin (word2vec binary)"
    )


def load_keyed_vectors(path: str | os.PathLike[str]) -> KeyedVectors:
    """Read word vectors, choosing the format from the file name.

    ``.kv`` files are read with ``KeyedVectors.load``, which **unpickles** the file: only load ``.kv``
    files you made or trust. ``.txt``/``.vec`` (word2vec text) and ``.bin`` (word2vec binary), optionally
    gzipped, are plain data read with ``load_word2vec_format``.

    Raises:
        EmbeddingError: ``"PATH: problem"`` for a missing, unreadable, corrupt or unrecognised file.
    """
    from gensim.models import KeyedVectors

    path = Path(path)
    kind = _kind(path)
    if not path.exists():
        raise EmbeddingError(f"{path}: no such word-vector file")
    if not path.is_file():
        raise EmbeddingError(f"{path}: not a file")
    try:
        if kind == "kv":
            # Pickle-based: only for files that the user trusts (see the docstring).
            loaded: Any = KeyedVectors.load(str(path))
        else:
            loaded = KeyedVectors.load_word2vec_format(str(path), binary=(kind == "binary"))
    except Exception as exc:  # gensim raises many types on a bad file
        raise EmbeddingError(
            f"{path}: cannot read word vectors (truncated or corrupt {kind} file? {type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(loaded, KeyedVectors) and isinstance(getattr(loaded, "wv", None), KeyedVectors):
        loaded = loaded.wv  # a whole Word2Vec/FastText model saved under a .kv name
    if not isinstance(loaded, KeyedVectors):
        raise EmbeddingError(f"{path}: holds a {type(loaded).__name__}, not gensim KeyedVectors")
    if loaded.vectors.ndim != 2 or loaded.vectors.shape[0] != len(loaded.index_to_key):
        raise EmbeddingError(f"{path}: malformed word vectors (shape {loaded.vectors.shape})")
    return loaded


def save_keyed_vectors(kv: KeyedVectors, path: str | os.PathLike[str]) -> None:
    """Write word vectors atomically (temporary file in the same folder, then ``os.replace``).

    The format follows the file name like ``load_keyed_vectors``: ``.kv`` is gensim's native format
    (one self-contained pickle file, the arrays inside it), ``.txt``/``.vec`` word2vec text and ``.bin``
    word2vec binary (add ``.gz`` to compress those two).

    Raises:
        EmbeddingError: the file name has an unknown suffix.
        TypeError: ``kv`` is not a ``KeyedVectors``.
    """
    from gensim.models import KeyedVectors

    if not isinstance(kv, KeyedVectors):
        raise TypeError(f"save_keyed_vectors expects gensim KeyedVectors, got {type(kv).__name__}")
    path = Path(path)
    kind = _kind(path)
    compressed = ".gz" if path.name.lower().endswith(".gz") else ""
    from llm_unitscale.files import writing

    with writing(path.name, path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{compressed}", dir=path.parent)
        try:
            if kind == "kv":
                with os.fdopen(fd, "wb") as handle:
                    kv.save(handle)  # a handle: gensim pickles everything into this one file
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                os.close(fd)
                kv.save_word2vec_format(tmp, binary=(kind == "binary"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class WordVectors(Protocol):
    """What :func:`embedding_matrix` reads of a table of word vectors: gensim's ``KeyedVectors``, or
    ``embedding_cache.CachedVectors`` (the same vectors read back without gensim)."""

    vector_size: int
    key_to_index: dict[str, int]
    vectors: np.ndarray


def embedding_matrix(
    vocab: Vocabulary, kv: WordVectors, seed: int = 0, remove_top: int = 3
) -> tuple[np.ndarray, float]:
    """Build an embedding table for ``vocab`` from word vectors, every row at unit scale.

    Row ``i`` is ``kv``'s vector for token ``i`` (looked up as is, then lowercased), post-processed as in
    "all-but-the-top" (Mu & Viswanath, ICLR 2018): minus the mean of all of ``kv``'s vectors, minus its
    projection on their top ``remove_top`` principal directions, then divided by its RMS so
    ``mean(row**2) == 1``. Word2Vec vectors trained on a small corpus share a few dominant directions (mean
    cosine between rows 0.88 on lee_background.cor); rescaled to unit RMS as they are, they hand a
    unit-scaled model near-identical token inputs. Measured (default transformer, lee_background.cor, 600
    steps, lr 7e-3, zero-initialised readout): val loss 6.52 centred only, 6.23 with the top 3 removed.
    The special tokens (ids 0-3), tokens without a vector, and tokens whose vector is all zeros get N(0, 1)
    rows from ``np.random.default_rng(seed)`` (drawn for the whole table first, so a row's random values do
    not depend on which other tokens were found).

    Args:
        vocab: The vocabulary (anything with a ``tokens`` list in id order, special tokens first).
        kv: The word vectors (``KeyedVectors`` or anything with its three attributes: :class:`WordVectors`).
        seed: Seed for the random rows.
        remove_top: How many principal directions to remove (0: only centre; skipped below 100 vectors).

    Returns:
        ``(matrix, coverage)``: a float32 array of shape ``(len(vocab), kv.vector_size)`` and the share
        of the non-special tokens that had a vector (0.0 for a vocabulary of special tokens only).
    """
    tokens = list(vocab.tokens)
    dim = int(kv.vector_size)
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((len(tokens), dim))
    index = kv.key_to_index
    centre = np.asarray(kv.vectors, dtype=np.float64).mean(axis=0) if len(index) else 0.0
    if remove_top and len(index) >= 100:  # principal directions of a handful of vectors mean nothing
        _, _, vt = np.linalg.svd(np.asarray(kv.vectors, dtype=np.float64) - centre, full_matrices=False)
        pcs = vt[:remove_top]
    else:
        pcs = None
    found = 0
    for i, token in enumerate(tokens[_NUM_SPECIALS:], start=_NUM_SPECIALS):
        key = token if token in index else token.lower()
        if key not in index:
            continue
        raw = np.asarray(kv.vectors[index[key]], dtype=np.float64)
        if not np.all(np.isfinite(raw)) or not np.any(raw):
            continue
        row = raw - centre
        if pcs is not None:
            row = row - pcs.T @ (pcs @ row)
        rms = float(np.sqrt(np.mean(row**2)))
        if rms == 0.0:
            continue
        matrix[i] = row / rms
        found += 1
    ordinary = len(tokens) - _NUM_SPECIALS
    coverage = found / ordinary if ordinary > 0 else 0.0
    return matrix.astype(np.float32), coverage
