"""Text preprocessing: tokenizer, vocabulary and word-vector embeddings.

The embedding helpers import gensim (a ~1 s import) inside the functions that train, read or write vectors,
so that tokenizing and encoding text does not pay for it.
"""

from __future__ import annotations

from llm_unitscale.preprocessing.embeddings import (
    EmbeddingError,
    embedding_matrix,
    load_keyed_vectors,
    save_keyed_vectors,
    train_word2vec,
)
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

