"""NLTK's word tokenizer on the standard ``re`` engine gives NLTK's tokens, for every text."""

from __future__ import annotations

from pathlib import Path

import pytest
from gensim.test.utils import datapath
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.tokenize.destructive import NLTKWordTokenizer

from llm_unitscale.preprocessing import nltk_engine
from llm_unitscale.preprocessing.nltk_engine import FastWordTokenizer, disagreeing_characters, needs_nltk

NLTK = NLTKWordTokenizer()
FAST = FastWordTokenizer()
#: Characters the rules treat specially: quotes, clitics, brackets, dashes, stops, separators.
_RULE_CHARS = " \t'\"`.,:;!?()[]{}<>-—–$%&@#*«»“”‘’„…" + "stndmlrevSTNDMLREV" + "0123456789" + "aeiouxyz"


@pytest.mark.parametrize("name", ["lee_background.cor", "pang_lee_polarity.cor"])
def test_same_tokens_as_nltk_on_real_english(name: str) -> None:
    lines = Path(datapath(name)).read_text(encoding="utf-8", errors="replace").splitlines()
    assert len(lines) >= 200
    assert [FAST.tokenize(line) for line in lines] == [NLTK.tokenize(line) for line in lines]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(_RULE_CHARS), max_size=40))
def test_same_tokens_as_nltk_on_punctuation_heavy_text(text: str) -> None:
    assert FAST.tokenize(text) == NLTK.tokenize(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_same_tokens_as_nltk_on_any_unicode(text: str) -> None:
    assert FAST.tokenize(text) == NLTK.tokenize(text)


def test_every_disagreeing_character_goes_to_nltk() -> None:
    chars = disagreeing_characters()
    assert "\x1c" in chars and "\u0301" in chars  # an ASCII separator and a combining mark
    for ch in chars[::7]:
        for text in (f"x{ch}'abc don't", f"{ch}", f"a {ch}. B{ch}, can{ch}not 'tis"):
            assert needs_nltk(text), repr(ch)
            assert FAST.tokenize(text) == NLTK.tokenize(text), repr(text)


def test_the_guard_asks_per_character_what_the_whole_table_says() -> None:
    """``needs_nltk`` classifies characters as it meets them; it agrees with the table of all of Unicode."""
    chars = set(disagreeing_characters())
    others = [chr(c) for c in range(0, 0x110000, 37) if not 0xD800 <= c <= 0xDFFF and chr(c) not in chars]
    assert len(others) > 25_000
    assert not any(needs_nltk(f"ab {ch} cd") for ch in others)
    assert all(needs_nltk(f"ab {ch} cd") for ch in sorted(chars)[::3])


def test_the_engines_differ_where_the_guard_sends_text_to_nltk() -> None:
    """The guard is needed: on a combining mark before an apostrophe the ``re`` rules alone split differently."""
    text = "x\u0301'abc"
    stdlib_only = NLTKWordTokenizer.tokenize(FAST, text)  # the re-compiled rules, no guard
    assert stdlib_only != NLTK.tokenize(text)
    assert FAST.tokenize(text) == NLTK.tokenize(text)


def test_plain_text_never_calls_nltks_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("NLTK's own engine was used")

    monkeypatch.setattr(nltk_engine.FastWordTokenizer._nltk, "tokenize", refuse)
    assert FAST.tokenize("He said \"don't\" -- cannot stop (now)... Mr. Smith's car.") == [
        "He", "said", "``", "do", "n't", "''", "--", "can", "not", "stop", "(", "now", ")", "...", "Mr.", "Smith",
        "'s", "car", "."]
    assert FAST.tokenize("café “quoted” naïve") == ["café", "“", "quoted", "”", "naïve"]


def test_a_character_tokenizer_does_not_import_nltk() -> None:
    """NLTK (1.3 s to import) is loaded when a word tokenizer first splits text, not by the package."""
    import subprocess
    import sys

    program = ("import sys\nimport llm_unitscale.training\nfrom llm_unitscale.preprocessing import Tokenizer\n"
               "assert Tokenizer('char').tokenize('ab c') == ['a', 'b', ' ', 'c']\n"
               "assert 'nltk' not in sys.modules, 'nltk imported'\n"
               "assert Tokenizer('word').tokenize(\"Don't\") == ['Do', \"n't\"]\n"
               "assert 'nltk' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
