"""Bag-of-n-grams features for text classification (fastText-style): word ids, hashed word n-grams and
hashed character n-grams of each word.

A text's tokens ``t_1 … t_T`` (from :class:`~llm_unitscale.preprocessing.Tokenizer`) become one bag of
integer feature ids (Joulin et al., *Bag of Tricks for Efficient Text Classification*, 2017; Bojanowski et
al., *Enriching Word Vectors with Subword Information*, 2017):

* **words**: the vocabulary id of each token (unknown tokens are dropped: their character n-grams remain);
* **word n-grams** for n = 2 … ``word_ngrams``: the n-gram ``t_i … t_{i+n-1}`` hashed as fastText does,
  ``h = h·116049371 + hash(t_j)`` over its tokens (64-bit wrap-around), into bucket ``h mod buckets``;
* **character n-grams** for n = ``char_min`` … ``char_max`` of each word of two characters or more, written
  ``<word>`` with boundary marks (the whole ``<word>`` itself excluded), each hashed into a bucket.

Token and character-n-gram hashes are CRC-32 of the UTF-8 bytes (``zlib.crc32``): the same in every process
and on every platform, unlike Python's salted ``hash``. Feature ids: 0 is padding, ``1 … V−1`` the vocabulary
(ids below :data:`FIRST_WORD_ID` are the special tokens and never occur), ``V + b`` bucket b, so the embedding
table has ``V + buckets`` rows. Hashing needs no n-gram vocabulary and gives an n-gram never seen in training
the row of whatever shared its bucket (usually a rarely trained one).

Speed: character n-grams are computed once per distinct token and word n-grams with numpy over the whole
corpus, so featurising is a few hundred milliseconds for ten thousand lines.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BagOfNgrams", "FIRST_WORD_ID"]

#: The first id of an ordinary vocabulary token (0-3 are ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``).
FIRST_WORD_ID = 4
_NGRAM_MULTIPLIER = np.uint64(116049371)  # fastText's word n-gram hash multiplier


@dataclass(frozen=True)
class BagOfNgrams:
    """The feature recipe; saved in a run's config.json (``get_config`` / ``from_config``).

    vocab_size: V, the vocabulary's size (feature ids of words are their vocabulary ids). buckets: hashed
    rows. word_ngrams: longest word n-gram (1 = words only). char_min, char_max: character n-gram lengths
    (char_max 0 = none). max_features: at most this many features per text (the first ones: words, then
    word n-grams, then character n-grams, each in text order).
    """

    vocab_size: int
    buckets: int = 100_000
    word_ngrams: int = 2
    char_min: int = 3
    char_max: int = 5
    max_features: int = 4096

    def __post_init__(self) -> None:
        if self.vocab_size < FIRST_WORD_ID or self.buckets < 1 or self.word_ngrams < 1 or self.max_features < 1:
            raise ValueError(f"invalid n-gram features {self}")
        if self.char_max and not 1 <= self.char_min <= self.char_max:
            raise ValueError(f"character n-grams need 1 <= char_min <= char_max, got {self.char_min}, {self.char_max}")

    @property
    def num_features(self) -> int:
        """Rows of the embedding table: padding, the vocabulary and the buckets."""
        return self.vocab_size + self.buckets

    def get_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BagOfNgrams:
        return cls(**config)

    def encode(self, token_lines: list[list[str]], vocab: Any) -> list[np.ndarray]:
        """Feature ids (int32 arrays, one per text; an empty text gives an empty array) of tokenised texts."""
        lengths = np.fromiter((len(t) for t in token_lines), dtype=np.int64, count=len(token_lines))
        index: dict[str, int] = {}
        flat = np.fromiter((index.setdefault(tok, len(index)) for line in token_lines for tok in line),
                           dtype=np.int64, count=int(lengths.sum()))
        distinct = list(index)
        line_of = np.repeat(np.arange(len(token_lines)), lengths)
        parts = [self._words(distinct, vocab, flat, line_of)]
        if self.word_ngrams > 1:
            parts += self._word_ngrams(distinct, flat, line_of, lengths)
        if self.char_max:
            parts.append(self._char_ngrams(distinct, flat, line_of))
        lines = np.concatenate([p[0] for p in parts])
        ids = np.concatenate([p[1] for p in parts]).astype(np.int32)
        order = np.argsort(lines, kind="stable")  # group by text, keeping words → n-grams → char n-grams
        lines, ids = lines[order], ids[order]
        cuts = np.searchsorted(lines, np.arange(1, len(token_lines)))
        return [row[: self.max_features] for row in np.split(ids, cuts)]

    def _words(self, distinct: list[str], vocab: Any, flat: np.ndarray, line_of: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(vocab.encode(distinct), dtype=np.int64)[flat]
        known = ids >= FIRST_WORD_ID
        return line_of[known], ids[known]

    def _word_ngrams(self, distinct: list[str], flat: np.ndarray, line_of: np.ndarray, lengths: np.ndarray
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        token_hash = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in distinct), dtype=np.uint64,
                                 count=len(distinct))[flat]
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        line_length = lengths[line_of]
        parts, h = [], token_hash
        with np.errstate(over="ignore"):
            for n in range(2, self.word_ngrams + 1):
                h = h[:-1] * _NGRAM_MULTIPLIER + token_hash[n - 1 :]
                inside = position[: len(h)] + n <= line_length[: len(h)]  # the n-gram does not cross texts
                parts.append((line_of[: len(h)][inside], self._bucket(h[inside])))
        return parts

    def _char_ngrams(self, distinct: list[str], flat: np.ndarray, line_of: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        per_token = [self._token_char_ngrams(t) for t in distinct]
        counts = np.fromiter(map(len, per_token), dtype=np.int64, count=len(per_token))
        values = np.fromiter((h for grams in per_token for h in grams), dtype=np.uint64, count=int(counts.sum()))
        starts = np.cumsum(counts) - counts
        take = counts[flat]
        # the character n-grams of every token occurrence, in order: a ragged gather
        offsets = np.repeat(starts[flat] - (np.cumsum(take) - take), take) + np.arange(int(take.sum()))
        return np.repeat(line_of, take), self._bucket(values[offsets])

    def _token_char_ngrams(self, token: str) -> list[int]:
        if len(token) < 2:
            return []
        marked = f"<{token}>"
        return [zlib.crc32(marked[i : i + n].encode("utf-8"))
                for n in range(self.char_min, min(self.char_max, len(marked) - 1) + 1)
                for i in range(len(marked) - n + 1)]

    def _bucket(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes % np.uint64(self.buckets)).astype(np.int64) + self.vocab_size
