"""A language model's Word2Vec vectors kept beside its prepared corpus, so that the next run on the same data
starts without training them again.

Word2Vec here is a pure function of its input and settings: gensim trains on one thread with a
process-independent hash (``embeddings.train_word2vec``), so the same prepared corpus (ids and vocabulary), the
same dimensions and seed, and the same gensim give the same vectors, bit for bit. Training them is most of a
character model's start-up after the imports: ≈ 5 s of the character recipe on 2 cores (gensim's import ≈ 1 s,
the sampled lines decoded ≈ 0.5 s, a vocabulary pass and 3 epochs over 2.8 M characters ≈ 3 s). A second run
on the same file — another learning rate, depth, ``--out`` — reads them back in milliseconds, as it reads the
prepared corpus (``prepared``: nanoGPT's ``train.bin``).

An entry is a folder ``word2vec-KEY`` inside the prepared corpus's folder (KEY: :func:`entry_key`, a hash of
every setting that changes the vectors), holding

* ``vectors.npy`` (float32, one row per token) and ``keys.json`` (the tokens, in the rows' order): what the
  model's table is built from, read without gensim and without unpickling anything;
* ``embeddings.kv``: the same vectors in gensim's format, copied into the run folder as it is;
* ``manifest.json``: the settings and what the vectors were trained on (lines, tokens, epochs), written last,
  into a temporary folder that is then renamed, so a crash leaves no half entry.

An entry that does not read back whole is ignored (and replaced by the run that trains the vectors again). The
cache is an optimisation: a folder that cannot be written leaves the run as it was, with a note on the log.
``LLM_UNITSCALE_WORD2VEC_CACHE=0`` switches it off (every run trains its vectors, as a first run does).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from llm_unitscale import files

#: The switch: "0" leaves the cache off.
ENV = "LLM_UNITSCALE_WORD2VEC_CACHE"
#: Bumped when an entry's files change meaning.
FORMAT = 1
MANIFEST, VECTORS, KEYS, KEYED_VECTORS = "manifest.json", "vectors.npy", "keys.json", "embeddings.kv"


@dataclass
class CachedVectors:
    """Word vectors read back from an entry: what ``embeddings.embedding_matrix`` reads of a ``KeyedVectors``
    (``vector_size``, ``key_to_index``, ``vectors``), the gensim file beside them, and the entry's manifest."""

    keys: list[str]
    vectors: np.ndarray
    keyed_vectors_file: Path
    manifest: dict

    @property
    def vector_size(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def key_to_index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}


def enabled() -> bool:
    """Whether runs read and keep vectors (``$LLM_UNITSCALE_WORD2VEC_CACHE`` is not ``0``)."""
    return os.environ.get(ENV, "1").strip() != "0"


def settings(vector_size: int, seed: int) -> dict:
    """Everything that changes a language model's Word2Vec vectors besides its prepared corpus: the dimensions,
    the seed, ``train_word2vec``'s window and minimum count, the sampling budget of ``word2vec_plan``, and the
    gensim version (its training code)."""
    from llm_unitscale.preprocessing import embeddings as emb

    return {"format": FORMAT, "vector_size": int(vector_size), "seed": int(seed), "window": emb.WORD2VEC_WINDOW,
            "min_count": emb.WORD2VEC_MIN_COUNT, "token_budget": emb.WORD2VEC_TOKEN_BUDGET,
            "most_epochs": emb.WORD2VEC_MAX_EPOCHS, "gensim": importlib.metadata.version("gensim")}


def entry_key(config: dict) -> str:
    """The entry's name suffix: a hash of :func:`settings`."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def entry_path(prepared_folder: str | os.PathLike, config: dict) -> Path:
    """Where the vectors for ``config`` (:func:`settings`) of the prepared corpus in ``prepared_folder`` live."""
    return Path(prepared_folder) / f"word2vec-{entry_key(config)}"


def load(entry: Path, config: dict) -> CachedVectors | None:
    """The vectors in ``entry`` if it is a whole entry for ``config``, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        keys = json.loads((entry / KEYS).read_text(encoding="utf-8"))
        vectors = np.load(entry / VECTORS, allow_pickle=False)
        kv_file = entry / KEYED_VECTORS
        whole = (
            isinstance(manifest, dict) and manifest.get("settings") == config
            and isinstance(keys, list) and all(isinstance(key, str) for key in keys) and len(set(keys)) == len(keys)
            and vectors.dtype == np.float32 and vectors.shape == (len(keys), config["vector_size"])
            and bool(np.all(np.isfinite(vectors))) and kv_file.stat().st_size == manifest.get("keyed_vectors_bytes")
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return CachedVectors(keys, vectors, kv_file, manifest) if whole else None


def store(entry: Path, config: dict, kv: Any, keyed_vectors_file: Path, trained_on: dict,
          log: TextIO = sys.stderr) -> bool:
    """Keep ``kv`` (gensim ``KeyedVectors``, saved as ``keyed_vectors_file``) as the entry for ``config``;
    ``trained_on``: what the manifest records of the training (lines, tokens, epochs). Returns whether the
    entry was written; a failure to write is noted on ``log`` and changes nothing else."""
    work: Path | None = None
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        np.save(work / VECTORS, np.ascontiguousarray(kv.vectors, dtype=np.float32), allow_pickle=False)
        (work / KEYS).write_text(json.dumps([str(key) for key in kv.index_to_key], ensure_ascii=False),
                                 encoding="utf-8")
        shutil.copyfile(keyed_vectors_file, work / KEYED_VECTORS)
        files.atomic_write_json(work / MANIFEST, {"settings": config, **trained_on,
                                                  "keyed_vectors_bytes": (work / KEYED_VECTORS).stat().st_size})
        if load(entry, config) is None:  # absent, or an old entry that no longer reads back
            if entry.exists():
                files.replace_folder(work, entry)
            else:
                os.rename(work, entry)
        return True
    except (OSError, files.WriteError) as exc:
        if load(entry, config) is not None:  # another run on the same corpus published the same vectors first
            return True
        print(f"note: Word2Vec vectors not kept for the next run ({entry}: {exc})", file=log)
        return False
    finally:
        if work is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
