"""Text preprocessing: tokenizer, vocabulary and word-vector embeddings.

The embedding helpers need gensim (a ~1 s import); they are imported lazily, on first use of one of
their names, so that tokenizing and encoding text does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llm_unitscale.preprocessing.tokenizer import Tokenizer, TokenizerError, jieba_available
from llm_unitscale.preprocessing.vocabulary import (
    BOS,
    EOS,
    FORMAT_VERSION,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    Vocabulary,
    VocabularyError,
)

if TYPE_CHECKING:
    from llm_unitscale.preprocessing.embeddings import (
        EmbeddingError,
        embedding_matrix,
        load_keyed_vectors,
        save_keyed_vectors,
        train_word2vec,
    )

_LAZY = {
    "EmbeddingError",
    "embedding_matrix",
    "load_keyed_vectors",
    "save_keyed_vectors",
    "train_word2vec",
}

__all__ = [
    "BOS",
    "EOS",
    "FORMAT_VERSION",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "EmbeddingError",
    "Tokenizer",
    "TokenizerError",
    "Vocabulary",
    "VocabularyError",
    "embedding_matrix",
    "jieba_available",
    "load_keyed_vectors",
    "save_keyed_vectors",
    "train_word2vec",
]


def __getattr__(name: str) -> Any:
    """Import the gensim-based embedding helpers on first access."""
    if name in _LAZY:
        module = importlib.import_module("llm_unitscale.preprocessing.embeddings")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
