"""Tests of llm_unitscale.preprocessing: tokenizer, vocabulary (incl. safe pickle loading), embeddings."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors
from gensim.test.utils import datapath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_unitscale.preprocessing import embeddings as emb_module
from llm_unitscale.preprocessing import vocabulary as vocab_module
from llm_unitscale.preprocessing.embeddings import (
    EmbeddingError,
    embedding_matrix,
    load_keyed_vectors,
    save_keyed_vectors,
    train_word2vec,
)
from llm_unitscale.preprocessing.tokenizer import Tokenizer, TokenizerError
from llm_unitscale.preprocessing.vocabulary import (
    BOS,
    EOS,
    FORMAT_VERSION,
    PAD,
    UNK,
    Vocabulary,
    VocabularyError,
)

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def no_jieba(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import jieba`` fail, as on a machine without the [zh] extra."""
    monkeypatch.setitem(sys.modules, "jieba", None)


# ==================================================================================================
# Tokenizer
# ==================================================================================================

ENGLISH_SENTENCES = [
    "Hello, world! I don't know.",
    'He said "yes" (maybe).',
    "It costs $3.50, right?",
    "The U.S. is big. Mr. Smith went to Washington.",
    "I can't believe it's already 5 p.m. here.",
    "She said 'yes' to me.",
    "The students' books are on the table.",
    "Wait... what?!",
    "50% of people agree; the rest don't.",
    "I cannot go. It's late.",
    "\u201cHello,\u201d she said.",
    "It's a dog's life, isn't it?",
    "To be, or not to be: that is the question.",
    "Je ne sais pas.",
    "e-mail me at 10:30 (or later).",
]
CHINESE_SENTENCES = [
    "我是一个程序员。我喜欢编程。",
    "\u201c你好\u201d，他说。",
    "我喜欢Python编程！",
    "他在2023年去了北京。",
    "今天天气很好，我们去公园散步吧？",
    "こんにちは世界、元気ですか。",
]


def test_english_word_tokens() -> None:
    tok = Tokenizer()
    assert tok.tokenize("Hello, world! I don't know.") == ["Hello", ",", "world", "!", "I", "do", "n't", "know", "."]
    assert tok.tokenize('He said "yes".') == ["He", "said", "``", "yes", "''", "."]


def test_sentence_stops_inside_a_line_are_split_but_abbreviations_kept() -> None:
    tok = Tokenizer()
    assert tok.tokenize("Hello world. How are you?") == ["Hello", "world", ".", "How", "are", "you", "?"]
    assert tok.tokenize("Mr. Smith met J. Doe in the U.S. today.") == [
        "Mr.",
        "Smith",
        "met",
        "J.",
        "Doe",
        "in",
        "the",
        "U.S.",
        "today",
        ".",
    ]


def test_chinese_is_segmented_with_jieba() -> None:
    tok = Tokenizer()
    assert tok.get_config()["cjk"] == "jieba"
    tokens = tok.tokenize("我是一个程序员。")
    assert len(tokens) > 1
    assert tokens == ["我", "是", "一个", "程序员", "。"]


def test_mixed_english_and_chinese() -> None:
    tokens = Tokenizer().tokenize("I said 我是一个程序员。 Then left.")
    assert tokens == ["I", "said", "我", "是", "一个", "程序员", "。", "Then", "left", "."]


def test_jieba_segmentation_ignores_words_added_to_jiebas_global_dictionary() -> None:
    import jieba

    tok = Tokenizer()
    before = tok.tokenize("我是一个程序员。")
    jieba.add_word("一个程序员", freq=10**9)
    try:
        assert jieba.lcut("我是一个程序员。") == ["我", "是", "一个程序员", "。"]
        assert tok.tokenize("我是一个程序员。") == before
    finally:
        jieba.del_word("一个程序员")


def test_without_jieba_cjk_is_split_into_characters(no_jieba: None) -> None:
    tok = Tokenizer()
    assert tok.get_config()["cjk"] == "char"
    assert tok.tokenize("我是一个程序员。") == ["我", "是", "一", "个", "程", "序", "员", "。"]
    assert tok.tokenize("Hi 你好!") == ["Hi", "你", "好", "!"]


def test_jieba_required_but_missing_raises_with_install_hint(no_jieba: None) -> None:
    with pytest.raises(TokenizerError, match=r'pip install "llm-unitscale\[zh\]"'):
        Tokenizer.from_config({"mode": "word", "lowercase": False, "punctuation": True, "cjk": "jieba"})
    with pytest.raises(TokenizerError, match=r'pip install "llm-unitscale\[zh\]"'):
        Tokenizer(mode="jieba")


def test_cjk_char_setting_is_respected_when_jieba_is_installed() -> None:
    tok = Tokenizer.from_config({"mode": "word", "lowercase": False, "punctuation": True, "cjk": "char"})
    assert tok.tokenize("程序员") == ["程", "序", "员"]


def test_char_mode_keeps_every_character() -> None:
    tok = Tokenizer(mode="char")
    assert tok.tokenize("Hi, 你好") == ["H", "i", ",", " ", "你", "好"]
    assert tok.detokenize(tok.tokenize("a  b\tc")) == "a  b\tc"
    assert tok.get_config()["cjk"] == "char"


def test_jieba_mode() -> None:
    tok = Tokenizer(mode="jieba")
    assert tok.tokenize("我是一个程序员。") == ["我", "是", "一个", "程序员", "。"]
    tokens = tok.tokenize("Hello world, 我是 程序员!")
    assert " " not in tokens
    assert tokens == ["Hello", "world", ",", "我", "是", "程序员", "!"]
    assert tok.detokenize(tok.tokenize("我是一个程序员。")) == "我是一个程序员。"


def test_lowercase_and_punctuation_options() -> None:
    assert Tokenizer(lowercase=True).tokenize("Hello World.") == ["hello", "world", "."]
    no_punct = Tokenizer(punctuation=False)
    assert no_punct.tokenize('Hello, "world"! (Yes.)') == ["Hello", "world", "Yes"]
    assert no_punct.tokenize("“你好”，他说。") == ["你好", "他", "说"]
    assert Tokenizer(mode="char", punctuation=False, lowercase=True).tokenize("A, b!") == ["a", " ", "b"]
    assert Tokenizer(mode="jieba", punctuation=False).tokenize("我是程序员。") == ["我", "是", "程序员"]


@pytest.mark.parametrize("sentence", ENGLISH_SENTENCES + CHINESE_SENTENCES)
def test_detokenize_round_trip_on_real_sentences(sentence: str) -> None:
    tok = Tokenizer()
    assert tok.detokenize(tok.tokenize(sentence)) == sentence


@pytest.mark.parametrize("sentence", CHINESE_SENTENCES)
def test_detokenize_round_trip_without_jieba(sentence: str, no_jieba: None) -> None:
    tok = Tokenizer()
    assert tok.detokenize(tok.tokenize(sentence)) == sentence


def test_detokenize_spacing_rules() -> None:
    tok = Tokenizer()
    assert tok.detokenize(["(", "a", ")", "b", ",", "c", "n't", "'s", "$", "5"]) == "(a) b, cn't's $5"
    assert tok.detokenize(["我", "喜欢", "Python", "。"]) == "我喜欢Python。"
    assert tok.detokenize(["can", "not", "gon", "na"]) == "cannot gonna"
    assert tok.detokenize([]) == ""


_WORD = st.text(alphabet="abcdeXYZ0123", min_size=1, max_size=6)
_PIECE = st.tuples(
    st.sampled_from(["", "", "", "(", '"', "$"]),
    _WORD,
    st.sampled_from(["", "", "", ",", ".", "!", "?", ";", ":", "'s", "n't", "%"]),
    st.sampled_from(["", "", "", ")", '"']),
)
_LATIN = st.lists(_PIECE, min_size=1, max_size=8).map(lambda ps: " ".join("".join(p) for p in ps))
_CHINESE = st.text(alphabet="我是一个程序员你好他说喜欢编程北京年了的。，！？、", min_size=1, max_size=12)
_MIXED = st.lists(st.one_of(_LATIN, _CHINESE), min_size=1, max_size=4).map("".join)


@HYPOTHESIS
@given(_MIXED)
def test_retokenizing_detokenized_text_gives_the_same_tokens(text: str) -> None:
    tok = Tokenizer()
    tokens = tok.tokenize(text)
    assert tok.tokenize(tok.detokenize(tokens)) == tokens


@HYPOTHESIS
@given(st.text(max_size=50))
def test_char_mode_round_trips_any_text(text: str) -> None:
    """Exactly without normalisation; with it (the default), up to removed format characters and NFC."""
    from llm_unitscale.preprocessing.tokenizer import normalize_text

    tok = Tokenizer(mode="char")
    assert tok.detokenize(tok.tokenize(text)) == normalize_text(text)
    raw = Tokenizer(mode="char", normalize=False)
    assert raw.detokenize(raw.tokenize(text)) == text


@pytest.mark.parametrize("mode", ["word", "char", "jieba"])
def test_config_round_trip_through_json(mode: str) -> None:
    tok = Tokenizer(mode=mode, lowercase=True, punctuation=False)
    config = json.loads(json.dumps(tok.get_config()))
    assert set(config) >= {"mode", "lowercase", "punctuation", "cjk"}
    again = Tokenizer.from_config(config)
    assert again == tok
    assert again.get_config() == tok.get_config()
    text = "Hello, World! 我是一个程序员。"
    assert again.tokenize(text) == tok.tokenize(text)


def test_bad_tokenizer_settings() -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer mode"):
        Tokenizer(mode="bpe")
    with pytest.raises(TokenizerError, match="unknown tokenizer config keys"):
        Tokenizer.from_config({"mode": "word", "lowercase": False, "punctuation": True, "cjk": "char", "x": 1})
    with pytest.raises(TokenizerError, match="cjk"):
        Tokenizer(cjk="mecab")
    with pytest.raises(TypeError):
        Tokenizer().tokenize(["not", "a", "string"])  # type: ignore[arg-type]


# ==================================================================================================
# Vocabulary
# ==================================================================================================


def _corpus() -> list[list[str]]:
    return [["the", "cat", "sat"], ["the", "dog", "sat"], ["the", "cat", "ran"], ["a", UNK]]


def test_build_orders_by_count_then_token_after_the_specials() -> None:
    vocab = Vocabulary.build(_corpus())
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2, 3)
    assert vocab.tokens == [PAD, UNK, BOS, EOS, "the", "cat", "sat", "a", "dog", "ran"]
    assert len(vocab) == 10
    assert "cat" in vocab and "cow" not in vocab and PAD in vocab
    assert vocab.counts["the"] == 3
    assert UNK not in vocab.counts  # special tokens met in the text are not counted as words


def test_build_min_count_and_max_size() -> None:
    assert Vocabulary.build(_corpus(), min_count=2).tokens[4:] == ["the", "cat", "sat"]
    assert Vocabulary.build(_corpus(), max_size=6).tokens == [PAD, UNK, BOS, EOS, "the", "cat"]
    assert len(Vocabulary.build(_corpus(), max_size=4)) == 4
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.build(_corpus(), max_size=3)
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(_corpus(), min_count=0)


def test_encode_decode_and_unknowns() -> None:
    vocab = Vocabulary.build(_corpus())
    ids = vocab.encode(["the", "cow", "sat"])
    assert ids == [4, vocab.unk_id, 6]
    assert vocab.token_to_id("cow") == vocab.unk_id
    assert vocab.id_to_token(5) == "cat"
    assert vocab.decode([vocab.bos_id, *ids, vocab.eos_id, vocab.pad_id]) == ["the", UNK, "sat"]
    assert vocab.decode([vocab.bos_id, 4], skip_special=False) == [BOS, "the"]
    assert vocab.decode(np.array([4, 5])) == ["the", "cat"]
    with pytest.raises(IndexError):
        vocab.id_to_token(len(vocab))
    with pytest.raises(IndexError):
        vocab.id_to_token(-1)


def test_constructor_rejects_bad_tokens() -> None:
    with pytest.raises(ValueError, match="repeated"):
        Vocabulary(["a", "a"])
    with pytest.raises(ValueError, match="special"):
        Vocabulary(["a", EOS])


def test_save_load_round_trip_is_a_plain_dict(tmp_path: Path) -> None:
    vocab = Vocabulary.build(_corpus() + [["你好", "世界"]])
    path = tmp_path / "vocab.pkl"
    vocab.save(path)
    assert os.listdir(tmp_path) == ["vocab.pkl"]  # the temporary file was renamed, nothing left over
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.tokens == vocab.tokens and loaded.counts == vocab.counts
    with open(path, "rb") as handle:
        raw = pickle.load(handle)
    assert type(raw) is dict
    assert raw["format"] == "llm_unitscale.vocabulary" and raw["version"] == FORMAT_VERSION == 1
    vocab.save(str(path))  # overwriting works, str paths work
    assert Vocabulary.load(str(path)) == vocab


class _Payload:
    """Unpickling this calls os.system to create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def _malicious_pickle(marker: Path, protocol: int) -> bytes:
    payload = {"format": "llm_unitscale.vocabulary", "version": 1, "tokens": [_Payload(marker)], "counts": {}}
    return pickle.dumps(payload, protocol=protocol)


@pytest.mark.skipif(os.name != "posix", reason="the payload runs `touch`")
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, protocol: int) -> None:
    # The payload is live: a plain pickle.loads runs it.
    probe = tmp_path / "probe"
    pickle.loads(_malicious_pickle(probe, protocol))
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "vocab.pkl"
    path.write_bytes(_malicious_pickle(marker, protocol))
    with pytest.raises(VocabularyError) as info:
        Vocabulary.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refusing to load")
    assert "unsafe pickle" in message and "os.system" in message
    assert not marker.exists()


@pytest.mark.skipif(os.name != "posix", reason="the payload runs `touch`")
def test_restricted_unpickler_alone_refuses_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even without the opcode scan, the unpickler's find_class refuses every global."""
    monkeypatch.setattr(vocab_module, "_scan_pickle", lambda data: None)
    marker = tmp_path / "pwned"
    path = tmp_path / "vocab.pkl"
    path.write_bytes(_malicious_pickle(marker, pickle.HIGHEST_PROTOCOL))
    with pytest.raises(VocabularyError, match="os.system"):
        Vocabulary.load(path)
    assert not marker.exists()


def test_truncated_vocabulary_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.pkl"
    Vocabulary.build(_corpus()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VocabularyError, match="truncated or corrupt") as info:
        Vocabulary.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_wrong_version(tmp_path: Path) -> None:
    path = tmp_path / "vocab.pkl"
    data = Vocabulary.build(_corpus()).to_dict()
    data["version"] = 2
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(VocabularyError) as info:
        Vocabulary.load(path)
    assert str(info.value) == f"{path}: made by an incompatible version 2; expected 1"


def test_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "vocab.pkl"
    path.write_text("the cat sat on the mat\n", encoding="utf-8")
    with pytest.raises(VocabularyError) as info:
        Vocabulary.load(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such vocabulary file"),
        (b"", "empty file"),
        (pickle.dumps(["<pad>", "<unk>"]), "not a vocabulary file"),
        (pickle.dumps({"format": "something.else", "version": 1}), "not a vocabulary file"),
        (pickle.dumps({"format": "llm_unitscale.vocabulary", "tokens": []}), "no 'version'"),
        (pickle.dumps({"format": "llm_unitscale.vocabulary", "version": 1, "tokens": "abc"}), "malformed"),
        (pickle.dumps({"format": "llm_unitscale.vocabulary", "version": 1, "tokens": ["a"]}), "must start with"),
        (
            pickle.dumps(
                {"format": "llm_unitscale.vocabulary", "version": 1, "tokens": [PAD, UNK, BOS, EOS, "a", "a"]}
            ),
            "repeated",
        ),
        (
            pickle.dumps(
                {"format": "llm_unitscale.vocabulary", "version": 1, "tokens": [PAD, UNK, BOS, EOS], "counts": [1]}
            ),
            "'counts' must be a dict",
        ),
    ],
)
def test_other_bad_vocabulary_files(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "vocab.pkl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VocabularyError) as info:
        Vocabulary.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


# ==================================================================================================
# Embeddings
# ==================================================================================================


@pytest.fixture(scope="module")
def lee_sentences() -> list[list[str]]:
    tok = Tokenizer(lowercase=True)
    with open(datapath("lee_background.cor"), encoding="utf-8") as handle:
        return [tok.tokenize(line) for line in handle if line.strip()]


def test_word2vec_is_deterministic_for_a_seed(lee_sentences: list[list[str]], capsys: pytest.CaptureFixture) -> None:
    a = train_word2vec(lee_sentences, vector_size=16, seed=7, epochs=3, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "epoch 3/3" in err
    b = train_word2vec(lee_sentences, vector_size=16, seed=7, epochs=3, progress=False)
    assert capsys.readouterr().err == ""
    c = train_word2vec(lee_sentences, vector_size=16, seed=8, epochs=3, progress=False)
    assert isinstance(a, KeyedVectors)
    assert a.vector_size == 16 and "the" in a.key_to_index
    assert a.index_to_key == b.index_to_key
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert not np.array_equal(a.vectors, c.vectors)


def test_word2vec_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="min_count"):
        train_word2vec([["a"], ["b"]], vector_size=4, min_count=2, progress=False)
    with pytest.raises(ValueError, match="vector_size"):
        train_word2vec([["a"]], vector_size=0, progress=False)
    for tokens in (["a", 1], ["a", ["b"]], ["a", b"b"]):  # a number, an unhashable list, bytes
        with pytest.raises(ValueError, match="lists of string tokens"):
            train_word2vec([tokens], vector_size=4, progress=False)


def _hand_made_kv() -> KeyedVectors:
    kv = KeyedVectors(vector_size=4)
    kv.add_vectors(
        ["apple", "Pear", "zero", UNK],
        np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]),
    )
    return kv


def test_embedding_matrix_rows_and_coverage() -> None:
    kv = _hand_made_kv()
    # "Apple" is found lowercased; "Pear" as is; "pear" is not ("Pear".lower() is tried, not the reverse);
    # "zero" has an all-zero vector and counts as missing; "cherry" is missing.
    vocab = Vocabulary(["Apple", "Pear", "pear", "zero", "cherry"])
    matrix, coverage = embedding_matrix(vocab, kv, seed=5)
    assert matrix.shape == (len(vocab), 4) and matrix.dtype == np.float32
    assert coverage == pytest.approx(2 / 5)
    centre = np.asarray(kv.vectors, dtype=np.float64).mean(axis=0)  # rows are centred, then unit RMS
    for token, raw in (("Apple", [1.0, 2.0, 3.0, 4.0]), ("Pear", [0.5, -0.5, 0.5, -0.5])):
        row = np.asarray(raw) - centre
        np.testing.assert_allclose(matrix[vocab.token_to_id(token)], row / np.sqrt(np.mean(row**2)), rtol=1e-5)
    for token in ("Apple", "Pear"):
        row = matrix[vocab.token_to_id(token)].astype(np.float64)
        assert np.sqrt(np.mean(row**2)) == pytest.approx(1.0, abs=1e-6)
    expected_random = np.random.default_rng(5).standard_normal((len(vocab), 4)).astype(np.float32)
    for token in (PAD, UNK, BOS, EOS, "pear", "zero", "cherry"):  # specials are never looked up
        i = vocab.token_to_id(token)
        np.testing.assert_array_equal(matrix[i], expected_random[i])
    again, _ = embedding_matrix(vocab, kv, seed=5)
    np.testing.assert_array_equal(matrix, again)


def test_embedding_matrix_of_specials_only_has_zero_coverage() -> None:
    matrix, coverage = embedding_matrix(Vocabulary([]), _hand_made_kv())
    assert matrix.shape == (4, 4) and coverage == 0.0


@pytest.mark.parametrize("name", ["vectors.kv", "vectors.txt", "vectors.vec", "vectors.bin", "vectors.bin.gz"])
def test_keyed_vectors_save_load_round_trip(tmp_path: Path, name: str) -> None:
    kv = KeyedVectors(vector_size=3)
    rng = np.random.default_rng(0)
    kv.add_vectors(["the", "cat", "你好", "<unk>"], rng.standard_normal((4, 3)).astype(np.float32))
    path = tmp_path / name
    save_keyed_vectors(kv, path)
    assert os.listdir(tmp_path) == [name]
    loaded = load_keyed_vectors(path)
    assert loaded.index_to_key == kv.index_to_key
    np.testing.assert_array_equal(loaded.vectors, kv.vectors)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("vectors.kv", b"garbage, not a pickle"),
        ("vectors.txt", b"the 0.1 0.2\ncat 0.3\n"),
        ("vectors.bin", b"2 3\nthe \x00\x01"),
    ],
)
def test_corrupt_word_vector_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EmbeddingError) as info:
        load_keyed_vectors(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_or_unknown_word_vector_files(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="no such word-vector file") as info:
        load_keyed_vectors(tmp_path / "missing.kv")
    assert str(info.value).startswith(str(tmp_path / "missing.kv"))
    with pytest.raises(EmbeddingError, match="unknown word-vector format"):
        load_keyed_vectors(tmp_path / "vectors.npy")
    with pytest.raises(EmbeddingError, match="unknown word-vector format"):
        save_keyed_vectors(_hand_made_kv(), tmp_path / "vectors.model")
    assert os.listdir(tmp_path) == []


def test_embeddings_are_reexported_lazily() -> None:
    import llm_unitscale.preprocessing as preprocessing

    assert preprocessing.train_word2vec is emb_module.train_word2vec
    assert preprocessing.EmbeddingError is EmbeddingError
    assert preprocessing.Vocabulary is Vocabulary and preprocessing.Tokenizer is Tokenizer


def test_embedding_matrix_removes_the_shared_directions() -> None:
    """All-but-the-top: a shared offset and dominant directions are removed before the unit-RMS rescale."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    dominant = rng.standard_normal((3, 16)) * 10.0
    vectors = 5.0 + rng.standard_normal((300, 16)) + rng.standard_normal((300, 3)) @ dominant
    kv = KeyedVectors(vector_size=16)
    kv.add_vectors(words, vectors)
    matrix, coverage = embedding_matrix(Vocabulary(words), kv, remove_top=3)
    rows = matrix[4:].astype(np.float64)
    assert coverage == 1.0
    np.testing.assert_allclose(np.sqrt(np.mean(rows**2, axis=1)), 1.0, rtol=1e-5)
    basis, _ = np.linalg.qr(dominant.T)  # the 3 dominant directions

    def share(a: np.ndarray) -> float:  # share of the energy along the dominant directions
        return float(np.sum((a @ basis) ** 2) / np.sum(a**2))

    assert share(vectors) > 0.9 and share(rows) < 0.05
    centred_only, _ = embedding_matrix(Vocabulary(words), kv, remove_top=0)
    assert not np.allclose(centred_only, matrix)


def test_word2vec_passes_are_bounded_by_the_token_budget() -> None:
    """A small corpus keeps every epoch; a larger one fewer epochs; above the budget one epoch over a sample
    spread over the whole corpus — never more than the budget's token passes."""
    from llm_unitscale.preprocessing.embeddings import word2vec_plan

    small = [["w"] * 10] * 100  # 1,000 tokens
    assert word2vec_plan(small, budget=100_000) == (small, 10)
    middle = [["w"] * 10] * 3_000  # 30,000 tokens
    assert word2vec_plan(middle, budget=100_000) == (middle, 3)
    big = [[str(i)] * 10 for i in range(100_000)]  # 1,000,000 tokens
    sample, epochs = word2vec_plan(big, budget=100_000)
    assert epochs == 1 and sum(map(len, sample)) <= 100_000
    assert sample[0] == big[0] and int(sample[-1][0]) > 90_000  # from the start to the end of the corpus
