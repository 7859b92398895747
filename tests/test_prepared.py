"""Prepared corpora (llm_unitscale.prepared): parallel = serial, the cache, the memory map, BPE, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath
from helpers import ROOT, TINY, ok_json, one_line_error, script

from llm_unitscale import data, prepared
from llm_unitscale.preprocessing import Tokenizer, Vocabulary
from llm_unitscale.preprocessing.bpe import BpeTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real English news and the shipped English/Chinese sample, with a BOM, CRLF line ends and empty lines."""
    english = Path(datapath("lee_background.cor")).read_text(encoding="utf-8")
    mixed = (ROOT / "data" / "dataset.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (english[:150_000] + "\n\n" + mixed).replace("\n", "\r\n").encode("utf-8"))
    return path


def serial(text: str, tokenizer: Tokenizer, fraction: float = 0.1, max_vocab: int = 20000
           ) -> tuple[Vocabulary, np.ndarray, np.ndarray, str]:
    """The in-memory reference: split the whole text, tokenise it line by line, count, encode."""
    train_text, val_text = prepared.split_tail(text, fraction)
    pieces, line_ends = prepared.tokenize_lines(tokenizer, train_text)
    vocab = Vocabulary.build([p for p in pieces if p], max_size=max_vocab)
    keep = prepared.keeps_empty_lines(tokenizer)
    return (vocab, prepared.line_ids(vocab, pieces, line_ends, keep), prepared.lm_ids(tokenizer, vocab, val_text),
            val_text)


@pytest.mark.parametrize(("mode", "max_vocab"), [("word", 20000), ("word", 500), ("char", 20000)])
def test_parallel_chunks_give_the_serial_ids(mode: str, max_vocab: int, corpus: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepared, "CHUNK_BYTES", 16_000)  # ~10 chunks, the split inside one of them
    tokenizer = Tokenizer(mode)
    ready = prepared.prepare(str(corpus), tokenizer.get_config(), max_vocab=max_vocab, cache=tmp_path, workers=2)
    text = data.read_text(corpus)
    vocab, train, val, val_text = serial(text, tokenizer, max_vocab=max_vocab)
    assert ready.vocab == vocab
    assert isinstance(ready.ids, np.memmap) and ready.ids.dtype == np.uint16
    np.testing.assert_array_equal(ready.train, train)
    np.testing.assert_array_equal(ready.val, val)
    assert ready.val_path.read_text(encoding="utf-8") == val_text
    assert ready.manifest["data_sha256"] == data.corpus_hash(text)
    assert not ready.reused and ready.manifest["workers"] == 2  # two processes did it


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_split_inside_a_chunk_is_split_tail(fraction: float) -> None:
    text = "".join(f"line {i} " + "word " * (i % 7) + "\n" for i in range(300))
    whole = prepared.cut_index(text, fraction)
    for size in (50, 200, 700):  # chunks that end at line breaks, as the scan makes them
        offset = 0
        while offset < len(text):
            end = text.find("\n", offset + size) + 1 or len(text)
            if offset <= int(len(text) * (1 - fraction)) < end:
                assert offset + prepared.cut_index(text[offset:end], fraction, len(text), offset) == whole
            offset = end


def test_second_run_reuses_the_cache_and_settings_change_the_key(corpus: Path, tmp_path: Path) -> None:
    config = Tokenizer("char").get_config()
    first = prepared.prepare(str(corpus), config, cache=tmp_path, workers=1)
    again = prepared.prepare(str(corpus), config, cache=tmp_path, workers=1)
    assert again.reused and again.path == first.path
    assert again.summary().startswith(f"prepared corpus: reusing {first.path} (")
    other = prepared.prepare(str(corpus), config, val_fraction=0.2, cache=tmp_path, workers=1)
    assert other.path != first.path and not other.reused
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_bad_byte_in_a_later_chunk_names_its_line_and_leaves_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepared, "CHUNK_BYTES", 1000)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a good line of text\n" * 500 + b"caf\xe9\n" + b"more text\n" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match=r"bad.txt: invalid utf-8 at line 501 \(byte offset 10003,"):
        prepared.prepare(str(path), Tokenizer().get_config(), cache=cache, workers=2)
    assert list(cache.iterdir()) == []


def test_cache_path_that_is_a_file_is_refused(corpus: Path, tmp_path: Path) -> None:
    from llm_unitscale.files import OutputError

    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(OutputError, match="not a folder"):
        prepared.prepare(str(corpus), Tokenizer("char").get_config(), cache=mine)
    assert mine.read_text() == "mine"


def test_a_foreign_folder_in_the_cache_is_not_replaced(corpus: Path, tmp_path: Path) -> None:
    from llm_unitscale.files import OutputError

    config = Tokenizer("char").get_config()
    entry = prepared.prepare(str(corpus), config, cache=tmp_path).path
    for child in entry.iterdir():
        child.unlink()
    (entry / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a prepared corpus; refusing to replace it"):
        prepared.prepare(str(corpus), config, cache=tmp_path)
    assert [p.name for p in entry.iterdir()] == ["mine.txt"]


def test_word2vec_lines_from_ids_are_the_plan_of_the_token_lines() -> None:
    from llm_unitscale.preprocessing.embeddings import word2vec_plan

    lines = [["a", "b"], ["c"], ["a", "a", "d"]]
    vocab = Vocabulary.build(lines)
    ids = prepared.line_ids(vocab, [*lines, []], [1, 2, 3, 4], keep_empty=True)
    assert prepared.id_lines(ids, vocab) == (*word2vec_plan(lines), 3)


# --------------------------------------------------------------------------------------------------- BPE
@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    lines = (ROOT / "data" / "dataset.txt").read_text(encoding="utf-8").split("\n")
    return BpeTokenizer.train(iter(lines), vocab_size=600)


def test_bpe_round_trips_english_and_chinese(bpe: BpeTokenizer, tmp_path: Path) -> None:
    for text in ("To be, or not to be: that is the question.", "我喜欢编程。今天天气很好！", "emoji 😀 and tabs\t."):
        assert bpe.detokenize(bpe.tokenize(text)) == text
    assert bpe.vocab_size == 600 and len(bpe.pieces()) == 596
    bpe.save(tmp_path / "tokenizer.json")
    loaded = BpeTokenizer.load(tmp_path / "tokenizer.json", bpe.get_config())
    assert loaded.tokenize("我喜欢编程 and more") == bpe.tokenize("我喜欢编程 and more")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_bpe_file_problems_are_one_line(tmp_path: Path, bpe: BpeTokenizer) -> None:
    from llm_unitscale.preprocessing.tokenizer import TokenizerError

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a readable tokenizer file"):
        BpeTokenizer.load(bad, {})
    bpe.save(bad)
    with pytest.raises(TokenizerError, match="holds 600 tokens but the run's config says 700"):
        BpeTokenizer.load(bad, {"vocab_size": 700})


@pytest.mark.parametrize("sample_bytes", [10**9, 40_000])
def test_bpe_prepared_ids_are_the_serial_ids(sample_bytes: int, corpus: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes encode the chunks; the BPE learns from every chunk, or from a spread sample of them."""
    monkeypatch.setattr(prepared, "CHUNK_BYTES", 16_000)
    monkeypatch.setattr(prepared, "BPE_SAMPLE_BYTES", sample_bytes)
    config = {"mode": "bpe", "vocab_size": 500, "lowercase": False, "normalize": True}
    ready = prepared.prepare(str(corpus), config, cache=tmp_path, workers=2)
    assert (ready.path / "tokenizer.json").is_file() and len(ready.vocab) == 500
    assert ready.manifest["workers"] == 2
    train_text, val_text = prepared.split_tail(data.read_text(corpus), 0.1)
    np.testing.assert_array_equal(ready.train, prepared.lm_ids(ready.tokenizer, ready.vocab, train_text))
    np.testing.assert_array_equal(ready.val, prepared.lm_ids(ready.tokenizer, ready.vocab, val_text))
    assert ready.vocab.tokens[4:] == ready.tokenizer.pieces()


def test_bpe_sample_spreads_over_the_training_part(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [(i * 100, (i + 1) * 100, 0, None) for i in range(50)]
    monkeypatch.setattr(prepared, "BPE_SAMPLE_BYTES", 5_000)
    assert prepared.bpe_sample(tasks) == tasks
    monkeypatch.setattr(prepared, "BPE_SAMPLE_BYTES", 1_000)
    sample = prepared.bpe_sample(tasks)
    assert len(sample) == 10 and sample[0] == tasks[0] and sample[-1] == tasks[-1]
    gaps = np.diff([task[0] for task in sample])
    assert gaps.min() >= 500 and gaps.max() <= 600


def test_bpe_run_trains_predicts_and_evaluates(tmp_path: Path) -> None:
    out = tmp_path / "bpe"
    ok_json(script("train", "data/dataset.txt", "--tokenizer", "bpe", "--vocab-size", "400", "--out", str(out),
                   "--max-steps", "4", "--embeddings", "none", "--json", *TINY))
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"] == {"mode": "bpe", "vocab_size": 400, "lowercase": False, "normalize": True}
    assert config["vocab_size"] == 400 and (out / "tokenizer.json").is_file()
    answer = ok_json(script("predict", "我喜欢", "--model", str(out), "--generate", "5", "--json"))
    assert len(answer["results"][0]["next"]) > 0 and "continuation" in answer["results"][0]
    text = (out / "validation.txt").read_text(encoding="utf-8")
    metrics = ok_json(script("evaluate", str(out / "validation.txt"), "--model", str(out), "--json"))
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] * metrics["tokens"] / np.log(2) / len(text),
                                                     rel=1e-6)
    assert metrics["unk_rate"] == 0.0


def test_bpe_option_mistakes_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(script("train", "data/dataset.txt", "--out", str(tmp_path / "r"), "--tokenizer", "bpe",
                                 "--task", "classify"))
    assert "--tokenizer bpe trains language models" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize(("options", "message"), [
    (dict(tokenizer="bpe", vocab_size=100), "--vocab-size must be an integer from 260"),
    (dict(vocab_size=1000), "--vocab-size sets the size of a BPE vocabulary"),
])
def test_bpe_vocabulary_size_mistakes_are_refused(options: dict, message: str) -> None:
    """The same check as above (TrainConfig.validate, one line and exit 2 through train.py), in process."""
    from llm_unitscale.training import ConfigError, TrainConfig

    config = TrainConfig(data="data/dataset.txt", **options).with_task_defaults("lm")
    with pytest.raises(ConfigError, match=message):
        config.validate()
