"""Tests for llm_unitscale.data: reading, task detection, splits and tf.data pipelines."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath

from llm_unitscale import data
from llm_unitscale.data import DataError

DATASET = Path(__file__).resolve().parents[1] / "data" / "dataset.txt"
SEED_LINES = ["我是一个程序员。", "我喜欢编程。", "编程让我感到快乐。"]


# --------------------------------------------------------------------------- read_text


def _assert_data_error(path: Path, *fragments: str, **kwargs: str) -> DataError:
    with pytest.raises(DataError) as info:
        data.read_text(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)
    return info.value


def test_read_text_missing(tmp_path: Path) -> None:
    _assert_data_error(tmp_path / "nope.txt", "no such file")


def test_read_text_directory(tmp_path: Path) -> None:
    _assert_data_error(tmp_path, "directory")


def test_read_text_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    _assert_data_error(path, "empty")


def test_read_text_whitespace_only(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_bytes(b"  \n\t\r\n\n")
    _assert_data_error(path, "whitespace")


def test_read_text_binary(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"abc\ndef\x00\x01\x02\xff")
    _assert_data_error(path, "binary", "line 2")


def test_read_text_utf16_named(tmp_path: Path) -> None:
    path = tmp_path / "utf16.txt"
    path.write_bytes("hello world\n".encode("utf-16"))
    _assert_data_error(path, "UTF-16")
    assert data.read_text(path, encoding="utf-16") == "hello world\n"


def test_read_text_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    raw = "first line\nsecond café line\n".encode("latin-1")
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    _assert_data_error(path, "line 2", f"byte offset {offset}", "--errors replace")
    assert (
        data.read_text(path, errors="replace") == "first line\nsecond caf\ufffd line\n"
    )
    assert data.read_text(path, encoding="latin-1") == "first line\nsecond café line\n"


def test_read_text_unknown_encoding(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hi\n", encoding="utf-8")
    _assert_data_error(path, "unknown encoding", encoding="no-such-codec")
    _assert_data_error(path, "unknown --errors", errors="no-such-handler")


def test_read_text_bom_and_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes(
        b"\xef\xbb\xbf" + "我喜欢编程。\r\nline two\rline three\r\n".encode()
    )
    assert data.read_text(path) == "我喜欢编程。\nline two\nline three\n"
    assert data.read_text(str(path)) == data.read_text(path)


def test_data_error_forms() -> None:
    error = DataError(Path("a/b.txt"), "bad\nthing")
    assert str(error) == f"{Path('a/b.txt')}: bad thing"
    assert error.path == str(Path("a/b.txt"))
    assert error.problem == "bad thing"
    plain = DataError("x.txt: finished message")
    assert str(plain) == "x.txt: finished message"
    assert plain.path is None


# --------------------------------------------------------------------------- labels and task


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("__label__pos some text", ("pos", "some text")),
        ("__label__pos __label__neg  some  text \n", ("pos", "some  text")),
        ("__label__pos", ("pos", "")),
        ("pos\tsome text", ("pos", "some text")),
        ("0\tfine film\twith a tab", ("0", "fine film\twith a tab")),
        ("two words\tsome text", None),
        ("x" * 41 + "\ttext", None),
        ("\tindented text", None),
        ("just a sentence", None),
        ("   ", None),
        ("__label__ text", None),
    ],
)
def test_parse_labelled_line(line: str, expected: tuple[str, str] | None) -> None:
    assert data.parse_labelled_line(line) == expected


def test_parse_labelled_skips_blank_and_unlabelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = ["__label__a one", "", "  ", "b\ttwo", "no label here", "__label__c"]
    with caplog.at_level(logging.WARNING, logger="llm_unitscale.data"):
        labels, texts = data.parse_labelled(lines)
    assert labels == ["a", "b"]
    assert texts == ["one", "two"]
    assert "skipped 2" in caplog.text


def test_detect_task_plain_fasttext_tab() -> None:
    assert data.detect_task(["The cat sat.", "", "On the mat."]) == "lm"
    assert data.detect_task([]) == "lm"
    assert data.detect_task(["__label__pos good", "", "__label__neg bad"]) == "classify"
    assert data.detect_task(["pos\tgood", "neg\tbad"]) == "classify"
    nearly = ["__label__pos good"] * 19 + ["stray line"]
    assert data.detect_task(nearly) == "classify"


def test_detect_task_mixed_raises() -> None:
    lines = ["__label__pos good", "plain text", "neg\tbad", "more plain text"]
    with pytest.raises(ValueError, match=r"2 of 4 non-blank lines") as info:
        data.detect_task(lines)
    assert "--task" in str(info.value)
    with pytest.raises(DataError) as info:
        data.detect_task(lines, path="mix.txt")
    assert str(info.value).startswith("mix.txt: ")


def test_gensim_polarity_is_classify() -> None:
    path = datapath("pang_lee_polarity.cor")
    # The file is not valid UTF-8 (latin-1 bytes): read it with replacement.
    lines = data.read_text(path, errors="replace").split("\n")
    assert data.detect_task(lines) == "classify"
    labels, texts = data.parse_labelled(lines)
    assert data.label_counts(labels) == {"neg": 100, "pos": 100}
    assert all(text and not text.startswith("__label__") for text in texts)


def test_gensim_lee_background_is_lm() -> None:
    text = data.read_text(datapath("lee_background.cor"))
    assert data.detect_task(text.split("\n")) == "lm"


# --------------------------------------------------------------------------- lm_split / lm_windows


def test_lm_split_tail_disjoint() -> None:
    ids = np.arange(1000, dtype=np.int64)
    train, val = data.lm_split(ids, val_fraction=0.1)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert train.max() < val.min()  # tail, no overlap


def test_lm_split_min_validation_window() -> None:
    ids = np.arange(300)
    train, val = data.lm_split(ids, val_fraction=0.05, seq_len=64)
    assert len(val) == 65 and len(train) == 235
    np.testing.assert_array_equal(val, ids[-65:])
    # Training keeps at least one window too.
    train, val = data.lm_split(np.arange(130), val_fraction=0.9, seq_len=64)
    assert len(train) == 65 and len(val) == 65


def test_lm_split_too_short() -> None:
    with pytest.raises(ValueError, match=r"at least 130 are needed"):
        data.lm_split(np.arange(129), seq_len=64)
    with pytest.raises(ValueError, match="val_fraction"):
        data.lm_split(np.arange(1000), val_fraction=1.0)
    train, val = data.lm_split(np.arange(10), val_fraction=0.0)
    assert len(train) == 10 and len(val) == 0


def test_lm_windows_shapes_and_shift() -> None:
    ids = np.arange(101, dtype=np.int32)
    x, y = data.lm_windows(ids, 10)
    assert x.shape == y.shape == (10, 10)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x[:, 0], np.arange(0, 100, 10))
    assert x.flags.writeable and x.flags.c_contiguous
    x, y = data.lm_windows(np.arange(100), 10)
    assert x.shape == (9, 10)  # (100 - 1) // 10
    with pytest.raises(ValueError):
        data.lm_windows(np.arange(5), 5)


# --------------------------------------------------------------------------- lm_eval_batches


def _epoch(dataset) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in dataset])


def test_lm_eval_batches_are_the_windows_in_order() -> None:
    ids = np.arange(101)
    dataset = data.lm_eval_batches(ids, 10, 4)
    assert dataset.element_spec[0].shape.as_list() == [None, 10]
    shapes = [x.shape[0] for x, _ in dataset]
    assert shapes == [4, 4, 2]
    x_all = _epoch(dataset)
    x_ref, _ = data.lm_windows(ids, 10)
    np.testing.assert_array_equal(x_all, x_ref)


# --------------------------------------------------------------------------- classification


def test_classify_split_stratified() -> None:
    labels = ["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["d"]
    texts = [f"text {i}" for i in range(len(labels))]
    (train_labels, train_texts), (val_labels, val_texts) = data.classify_split(
        labels, texts, val_fraction=0.1, seed=0
    )
    assert data.label_counts(val_labels) == {"a": 5, "b": 2, "c": 1}
    assert data.label_counts(train_labels) == {"a": 45, "b": 18, "c": 2, "d": 1}
    assert sorted(train_texts + val_texts) == sorted(texts)
    assert not set(train_texts) & set(val_texts)
    pairs = dict(zip(texts, labels, strict=True))
    assert all(pairs[t] == lab for t, lab in zip(val_texts, val_labels, strict=True))
    again = data.classify_split(labels, texts, val_fraction=0.1, seed=0)
    assert again == ((train_labels, train_texts), (val_labels, val_texts))
    different = data.classify_split(labels, texts, val_fraction=0.1, seed=1)
    assert different[1][1] != val_texts


def test_classify_dataset_pads_each_batch_to_its_longest_and_truncates() -> None:
    import tensorflow as tf

    tokens = [[5, 6, 7], list(range(1, 21)), [9]]
    dataset = data.classify_dataset(
        tokens, [0, 1, 2], batch_size=2, max_len=8, shuffle=False
    )
    x_spec, y_spec = dataset.element_spec
    assert x_spec.shape.as_list() == [None, None] and y_spec.shape.as_list() == [None]
    assert x_spec.dtype == tf.int32 and y_spec.dtype == tf.int32
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    assert [b[0].shape for b in batches] == [(2, 8), (1, 1)]  # no fixed width: the batch's own longest
    np.testing.assert_array_equal(batches[0][0][0], [5, 6, 7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batches[0][0][1], list(range(1, 9)))  # keeps the FIRST max_len
    np.testing.assert_array_equal(batches[1][0], [[9]])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), [0, 1, 2])


def test_classify_dataset_shuffle_deterministic() -> None:
    tokens = [[i + 1] for i in range(40)]
    labels = list(range(40))

    def epoch(seed: int) -> list[int]:
        ds = data.classify_dataset(tokens, labels, 8, 4, shuffle=True, seed=seed)
        return np.concatenate([y.numpy() for _, y in ds]).tolist()

    assert epoch(0) == epoch(0)
    assert sorted(epoch(0)) == labels
    assert epoch(0) != labels


def test_training_batches_are_bucketed_by_length_and_a_pure_function_of_the_step() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 1000)
    tokens = [list(range(1, n + 1)) for n in lengths]
    labels = list(range(1000))
    per_epoch = data.classify_steps_per_epoch(1000, 16)
    assert per_epoch == 63  # 1000 = 1 pool of 32 × 16 + 488 = 30 full batches and a short one
    whole = [(x.numpy(), y.numpy()) for x, y in data.classify_train_batches(tokens, labels, 16, 500, 0, 0, 2 * per_epoch)]
    assert sorted(np.concatenate([y for _, y in whole[:per_epoch]]).tolist()) == labels  # each example once
    padded = sum(x.size for x, _ in whole[:per_epoch])
    assert padded < 1.15 * lengths.sum()  # bucketing: little padding (a fixed width would be 200 per row)
    assert all((x[:, -1] != 0).any() for x, _ in whole)  # every batch is as long as its longest row
    later = [(x.numpy(), y.numpy()) for x, y in data.classify_train_batches(tokens, labels, 16, 500, 0, 70, 75)]
    for (x, y), (x2, y2) in zip(whole[70:75], later, strict=True):  # a resumed run sees the same batches
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    first_epoch = np.concatenate([y for _, y in whole[:per_epoch]])
    second_epoch = np.concatenate([y for _, y in whole[per_epoch:]])
    assert first_epoch.tolist() != second_epoch.tolist()  # every epoch is shuffled anew


def test_corpus_hash() -> None:
    assert (
        data.corpus_hash("我喜欢编程。")
        == hashlib.sha256("我喜欢编程。".encode()).hexdigest()
    )
    assert len(data.corpus_hash("")) == 64


# --------------------------------------------------------------------------- shipped corpus


def test_dataset_file_seed_lines_and_size() -> None:
    text = data.read_text(DATASET)
    size = len(text.encode("utf-8"))
    assert 40_000 <= size <= 80_000, size
    lines = text.split("\n")
    for seed_line in SEED_LINES:
        assert lines.count(seed_line) >= 3, seed_line
    assert data.detect_task(lines) == "lm"
    english = sum(1 for line in lines if line.isascii() and line.strip())
    assert english > 50
    likes = text.count("我喜欢")
    assert text.count("我喜欢编程") >= 0.6 * likes > 0
    # Chinese uses full-width punctuation.
    assert not any("，" not in line and ", " in line for line in lines if "我" in line)


def test_dataset_file_jieba_continuation() -> None:
    jieba = pytest.importorskip("jieba")
    jieba.setLogLevel(logging.WARNING)
    following: list[str] = []
    for line in data.read_text(DATASET).split("\n"):
        words = [w for w in jieba.lcut(line) if w.strip()]
        following += [
            c
            for a, b, c in zip(words, words[1:], words[2:], strict=False)
            if (a, b) == ("我", "喜欢")
        ]
    assert following.count("编程") >= 0.6 * len(following) > 0


def test_line_pieces_split_long_lines_at_spaces_and_lose_nothing() -> None:
    from llm_unitscale.data import line_pieces

    line = "word " * 10_000
    pieces = line_pieces(line, 1000)
    assert "".join(pieces) == line and max(map(len, pieces)) <= 1000
    assert all(piece.endswith(" ") for piece in pieces[:-1])  # never inside a word
    assert [len(p) for p in line_pieces("x" * 2500, 1000)] == [1000, 1000, 500]  # no space: hard cut
    assert line_pieces("short line") == ["short line"]
