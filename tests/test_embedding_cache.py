"""A language model's Word2Vec vectors kept beside its prepared corpus: the same vectors back, damaged entries
ignored, the second run on the same data trains no Word2Vec (and imports no gensim) and ends the same."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from llm_unitscale import embedding_cache, training
from llm_unitscale.preprocessing import Vocabulary, embedding_matrix, save_keyed_vectors, train_word2vec

SENTENCES = [["the", "cat", "sat", "on", "the", "mat"], ["the", "dog", "lay", "on", "the", "rug"]] * 30
TEXT = "the cat sat on the mat .\nthe dog lay on the rug .\na bird flew over the house .\n" * 40


@pytest.fixture()
def kept(tmp_path: Path) -> tuple[Path, dict, object]:
    """An entry written by ``store`` for trained vectors: (entry, settings, the KeyedVectors)."""
    kv = train_word2vec(SENTENCES, vector_size=8, seed=3, epochs=2, progress=False)
    kv_file = tmp_path / "embeddings.kv"
    save_keyed_vectors(kv, kv_file)
    config = embedding_cache.settings(8, 3)
    entry = embedding_cache.entry_path(tmp_path, config)
    assert embedding_cache.store(entry, config, kv, kv_file, {"lines": 60, "tokens": 360, "epochs": 2})
    return entry, config, kv


def test_an_entry_reads_back_the_same_vectors_and_gensim_file(kept: tuple[Path, dict, object]) -> None:
    entry, config, kv = kept
    found = embedding_cache.load(entry, config)
    assert found is not None
    assert found.keys == list(kv.index_to_key) and found.vector_size == 8
    np.testing.assert_array_equal(found.vectors, kv.vectors)
    assert found.keyed_vectors_file.read_bytes() == (entry.parent / "embeddings.kv").read_bytes()
    assert found.manifest["tokens"] == 360 and found.manifest["settings"] == config
    vocab = Vocabulary.build(SENTENCES)
    cached_matrix, cached_coverage = embedding_matrix(vocab, found, seed=1)
    matrix, coverage = embedding_matrix(vocab, kv, seed=1)
    np.testing.assert_array_equal(cached_matrix, matrix)
    assert cached_coverage == coverage == 1.0
    assert sorted(p.name for p in entry.parent.iterdir()) == ["embeddings.kv", entry.name]  # no temporary left


def test_the_key_changes_with_every_setting_that_changes_the_vectors() -> None:
    base = embedding_cache.settings(8, 3)
    assert embedding_cache.entry_key(base) == embedding_cache.entry_key(embedding_cache.settings(8, 3))
    others = [embedding_cache.settings(16, 3), embedding_cache.settings(8, 4), {**base, "gensim": "0.0"},
              {**base, "token_budget": 1}, {**base, "window": 2}]
    assert len({embedding_cache.entry_key(c) for c in [base, *others]}) == 1 + len(others)


@pytest.mark.parametrize("damage", ["vectors truncated", "vectors pickled", "keys not a list", "keys repeated",
                                    "other settings", "gensim file shorter", "no manifest", "not finite"])
def test_a_damaged_entry_is_ignored_and_the_next_store_replaces_it(kept: tuple[Path, dict, object],
                                                                  damage: str) -> None:
    entry, config, kv = kept
    vectors = entry / embedding_cache.VECTORS
    if damage == "vectors truncated":
        vectors.write_bytes(vectors.read_bytes()[:-16])
    elif damage == "vectors pickled":  # an object array needs unpickling: never read
        np.save(vectors, np.array([object()] * 4, dtype=object), allow_pickle=True)
    elif damage == "keys not a list":
        (entry / embedding_cache.KEYS).write_text('{"the": 0}', encoding="utf-8")
    elif damage == "keys repeated":
        keys = json.loads((entry / embedding_cache.KEYS).read_text(encoding="utf-8"))
        (entry / embedding_cache.KEYS).write_text(json.dumps([keys[0]] * len(keys)), encoding="utf-8")
    elif damage == "other settings":
        manifest = json.loads((entry / embedding_cache.MANIFEST).read_text(encoding="utf-8"))
        (entry / embedding_cache.MANIFEST).write_text(json.dumps({**manifest, "settings": {**config, "seed": 9}}))
    elif damage == "gensim file shorter":
        kv_file = entry / embedding_cache.KEYED_VECTORS
        kv_file.write_bytes(kv_file.read_bytes()[:100])
    elif damage == "no manifest":
        (entry / embedding_cache.MANIFEST).unlink()
    else:
        np.save(vectors, np.full((len(kv.index_to_key), 8), np.nan, dtype=np.float32))
    assert embedding_cache.load(entry, config) is None
    assert embedding_cache.store(entry, config, kv, entry.parent / "embeddings.kv", {"lines": 60, "tokens": 360,
                                                                                      "epochs": 2})
    found = embedding_cache.load(entry, config)
    assert found is not None
    np.testing.assert_array_equal(found.vectors, kv.vectors)


def test_a_cache_that_cannot_be_written_leaves_a_note_and_nothing_else(tmp_path: Path) -> None:
    kv = train_word2vec(SENTENCES, vector_size=8, seed=3, epochs=1, progress=False)
    kv_file = tmp_path / "embeddings.kv"
    save_keyed_vectors(kv, kv_file)
    blocked = tmp_path / "prepared-x"
    blocked.write_text("a file where the corpus folder should be", encoding="utf-8")
    config = embedding_cache.settings(8, 3)
    log = io.StringIO()
    assert not embedding_cache.store(embedding_cache.entry_path(blocked, config), config, kv, kv_file, {}, log)
    assert log.getvalue().startswith("note: Word2Vec vectors not kept for the next run (")
    assert blocked.read_text(encoding="utf-8") == "a file where the corpus folder should be"


def test_the_second_run_on_the_same_data_reuses_the_vectors_without_gensim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    cache = tmp_path / "cache"

    def run(name: str) -> tuple[dict, str]:
        cfg = training.TrainConfig(data=str(data), out=str(tmp_path / name), cache=str(cache), max_steps=4,
                                   width=16, depth=1, heads=2, seq_len=8, batch_size=4, jit_compile=False,
                                   warmup_steps=1, strategy="none", embeddings="word2vec")
        log = io.StringIO()
        return training.train(cfg, log=log), log.getvalue()

    first, first_log = run("first")
    assert "training Word2Vec (16 dims" in first_log and "reusing" not in first_log.split("task:")[1]
    (entry,) = cache.glob("prepared-*/word2vec-*")
    with monkeypatch.context() as patch:  # any gensim import in the second run fails it
        patch.setitem(sys.modules, "gensim", None)
        patch.setitem(sys.modules, "gensim.models", None)
        second, second_log = run("second")
    epochs, tokens = re.search(r"training Word2Vec \(16 dims, (\d+) epochs\) on [\d,]+ lines, ([\d,]+) tokens",
                               first_log).groups()
    assert f"Word2Vec (16 dims, {epochs} epochs on {tokens} tokens): reusing {entry}" in second_log
    assert "training Word2Vec" not in second_log
    assert second["val_loss"] == first["val_loss"] and second["loss"] == first["loss"]
    assert (tmp_path / "second" / "embeddings.kv").read_bytes() == (tmp_path / "first" / "embeddings.kv").read_bytes()
    monkeypatch.setenv(embedding_cache.ENV, "0")  # switched off: trained again, the same run
    third, third_log = run("third")
    assert "training Word2Vec (16 dims" in third_log and "reusing" not in third_log.split("task:")[1]
    assert third["val_loss"] == first["val_loss"]


def test_importing_the_embedding_helpers_does_not_import_gensim() -> None:
    code = ("import sys; import llm_unitscale.preprocessing, llm_unitscale.embedding_cache; "
            "assert 'gensim' not in sys.modules, 'gensim imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
