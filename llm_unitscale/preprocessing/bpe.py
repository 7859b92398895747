"""Byte-level BPE tokenizer (``--tokenizer bpe``), trained on the corpus with Hugging Face ``tokenizers``.

The subword tokenizer of GPT-2 and most LLMs: text is UTF-8 bytes, each byte a symbol of a 256-letter alphabet
(so no text is ever unknown, in any script), and the trainer merges the most frequent adjacent pairs until the
vocabulary is full. Spaces are kept as the ``Ġ`` prefix of the following piece, so ``detokenize`` gives back
the text exactly (after the same normalisation as the other modes: :func:`tokenizer.normalize_text`, and
``lowercase`` when asked).

Ids: the run's :class:`Vocabulary` holds the 4 special tokens (ids 0-3) and then the BPE tokens in the BPE
model's id order, so vocabulary id = BPE id + 4 and ``--vocab-size N`` is the whole vocabulary, special tokens
included. The model is saved in the run folder as ``tokenizer.json`` (the ``tokenizers`` library's own JSON;
read without pickle) next to ``vocab.pkl``; ``config.json`` keeps :meth:`BpeTokenizer.get_config`.

Default size :data:`DEFAULT_VOCAB_SIZE` = 4096: the ids fit ``uint16`` token files, the embedding and readout
(V × width) stay small next to a default model's blocks, and English text still gets about 3.5 characters
per token (README, "Big corpora").
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from llm_unitscale.preprocessing.tokenizer import TokenizerError, normalize_text
from llm_unitscale.preprocessing.vocabulary import SPECIAL_TOKENS

__all__ = ["DEFAULT_VOCAB_SIZE", "MAX_TOKENIZER_BYTES", "BpeTokenizer"]

#: ``--vocab-size`` when none is given (see the module docstring).
DEFAULT_VOCAB_SIZE = 4096
#: Smallest vocabulary: the 4 special tokens and the 256 bytes.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
#: A tokenizer.json larger than this is not ours (a 65k-token BPE model is ~2 MB); refused before reading.
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024
#: Texts encoded per call of the library (its threads share them).
BATCH = 4096


class BpeTokenizer:
    """Byte-level BPE with the same interface as :class:`~llm_unitscale.preprocessing.Tokenizer`.

    Build one with :meth:`train` or :meth:`load`. ``tokenize`` gives the BPE pieces (strings such as
    ``"Ġthe"``), ``tokenize_many`` a list of texts at once (the library's threads), ``encode_many`` their
    vocabulary ids straight away, ``detokenize`` the text.
    """

    mode = "bpe"

    def __init__(self, model: Any, lowercase: bool = False, normalize: bool = True) -> None:
        self._model = model
        self.lowercase = lowercase
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, normalize={self.normalize})"

    @property
    def vocab_size(self) -> int:
        """The run's vocabulary: the BPE tokens and the 4 special tokens."""
        return self._model.get_vocab_size() + len(SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, lowercase: bool = False,
              normalize: bool = True) -> BpeTokenizer:
        """Train on ``texts`` (an iterator of lines is streamed: the corpus is never held whole) a BPE of
        ``vocab_size`` ids in all, special tokens included.

        Raises:
            TokenizerError: ``vocab_size`` below :data:`MIN_VOCAB_SIZE` or above 2**31.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
                MIN_VOCAB_SIZE <= vocab_size < 2**31):
            raise TokenizerError(f"--vocab-size must be an integer of at least {MIN_VOCAB_SIZE} (the 256 bytes and "
                                 f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        model = Tokenizer(models.BPE())
        model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe = cls(model, lowercase, normalize)
        model.train_from_iterator((bpe._prepared(text) for text in texts), trainer=trainer)
        return bpe

    def _prepared(self, text: str) -> str:
        if self.normalize:
            text = normalize_text(text)
        return text.lower() if self.lowercase else text

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of ``text`` (newlines are ordinary bytes; callers split lines first)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.tokenize expects a str, got {type(text).__name__}")
        return self._model.encode(self._prepared(text)).tokens

    def tokenize_many(self, texts: list[str]) -> list[list[str]]:
        """``[tokenize(t) for t in texts]``, encoded in batches."""
        return [encoding.tokens for encoding in self._encodings(texts, self._model.encode_batch)]

    def _encodings(self, texts: list[str], encode: Any) -> Iterator[Any]:
        """The library's encodings of ``texts`` by ``encode``, :data:`BATCH` at a time (each holds offsets and
        masks too: a whole chunk at once took ~1 GB)."""
        for start in range(0, len(texts), BATCH):
            yield from encode([self._prepared(t) for t in texts[start : start + BATCH]])

    def encode_many(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the vocabulary ids (BPE id + 4) of every text's pieces, concatenated, as ``int32``; the number of ids
        of each text): what ``vocab.encode(tokenize(t))`` gives, without making the token strings.

        One text at a time, in this thread: that is 1.5× faster per core than the library's threaded
        ``encode_batch_fast`` (whose Python-side Encoding objects cost more than its threads win on two
        cores), so corpus preparation runs one process per core instead (``prepared``)."""
        encode, prepared = self._model.encode, self._prepared
        pieces = [encode(prepared(text)).ids for text in texts]
        counts = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(counts.sum()))
        return ids + np.int32(len(SPECIAL_TOKENS)), counts

    def detokenize(self, tokens: list[str]) -> str:
        """The text of BPE pieces (bytes that are not whole UTF-8 characters become U+FFFD)."""
        return self._model.decoder.decode([str(token) for token in tokens])

    def pieces(self) -> list[str]:
        """Every BPE token in id order (the vocabulary's ordinary tokens)."""
        vocab = self._model.get_vocab()
        return sorted(vocab, key=vocab.__getitem__)

    def get_config(self) -> dict[str, Any]:
        """The settings saved in config.json: ``mode`` "bpe", ``vocab_size``, ``lowercase``, ``normalize``."""
        return {"mode": "bpe", "vocab_size": self.vocab_size, "lowercase": self.lowercase,
                "normalize": self.normalize}

    def to_json(self) -> str:
        """The model as the ``tokenizers`` library's JSON."""
        return self._model.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model's JSON to ``path`` atomically."""
        from llm_unitscale.files import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: dict[str, Any]) -> BpeTokenizer:
        """Read a model saved by :meth:`save` with the settings of ``config`` (:meth:`get_config`).

        Raises:
            TokenizerError: ``"PATH: problem"`` when the file is missing, too large, not a tokenizer's JSON, or
                its size differs from ``config["vocab_size"]``.
        """
        from tokenizers import Tokenizer

        from llm_unitscale.files import input_problem

        name = os.fspath(path)
        problem = input_problem(name, MAX_TOKENIZER_BYTES, "tokenizer file")
        if problem:
            raise TokenizerError(f"{name}: {problem}")
        try:
            with open(name, encoding="utf-8") as handle:
                model = Tokenizer.from_str(handle.read())
        except (OSError, UnicodeDecodeError, Exception) as exc:  # the library raises its own Exception
            raise TokenizerError(f"{name}: not a readable tokenizer file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        bpe = cls(model, bool(config.get("lowercase", False)), bool(config.get("normalize", True)))
        if config.get("vocab_size") not in (None, bpe.vocab_size):
            raise TokenizerError(f"{name}: holds {bpe.vocab_size} tokens but the run's config says "
                                 f"{config['vocab_size']}")
        return bpe
