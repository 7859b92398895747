"""NLTK's word tokenizer, its rules run by the standard library's ``re`` engine where that gives the same tokens.

Recent NLTK (3.10 here) compiles every rule of ``NLTKWordTokenizer`` with the third-party ``regex`` engine behind a
wall-clock timeout (``nltk.redos``), a defence meant for patterns that callers supply. The word tokenizer's
rules are NLTK's own constants, all linear, and on them the timed ``regex`` path is about twice as slow as
``re`` (``python benchmarks/prepare.py`` tokenises with it, one process per core). :class:`FastWordTokenizer`
is ``NLTKWordTokenizer`` with the very same patterns (read from NLTK's class, never copied) compiled by ``re``.

The two engines agree on every construct these rules use except the meaning of ``\\w``, ``\\s``, ``\\d`` and
case-insensitive letters on some characters (the engines carry different Unicode tables: combining marks,
superscript digits, the ASCII separators U+001C–U+001F, dotted/dotless i, characters one table has not
assigned yet). :func:`needs_nltk` asks both engines about each character of a text (once per distinct
character and process; :func:`disagreeing_characters` lists them all); a text that holds one on which they
disagree is tokenised by NLTK itself. So the tokens are NLTK's for every text, byte for byte
(tests/test_nltk_engine.py checks it on real English text, on random text and on the disagreeing characters).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from nltk.tokenize.destructive import NLTKWordTokenizer

__all__ = ["FastWordTokenizer", "disagreeing_characters", "needs_nltk"]

#: The character classes of NLTK's word-tokenizer rules whose meaning depends on the engine's Unicode tables.
_CLASSES = (r"\w", r"\s", r"\d", r"(?i)[a-z]", r"(?i)[A-Z]")
#: ``re`` flags that mean the same in ``regex`` (``regex`` adds engine flags of its own, such as its version).
_PORTABLE_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE | re.ASCII | re.UNICODE


def _stdlib(pattern: Any) -> re.Pattern:
    """The same pattern compiled by ``re`` (a ``re.Pattern`` is returned as it is)."""
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern.pattern, pattern.flags & _PORTABLE_FLAGS)


def _rules(rules: list[tuple[Any, str]]) -> list[tuple[re.Pattern, str]]:
    return [(_stdlib(pattern), substitution) for pattern, substitution in rules]


def _engines() -> tuple[list[re.Pattern], list[Any]]:
    """:data:`_CLASSES` compiled by ``re`` and by the engine NLTK uses (empty when NLTK uses ``re`` itself)."""
    if isinstance(NLTKWordTokenizer.PUNCTUATION[0][0], re.Pattern):
        return [], []
    import regex

    return [re.compile(p) for p in _CLASSES], [regex.compile(p) for p in _CLASSES]


_ENGINES = _engines()
#: The characters met so far, and those of them that the two engines classify differently.
_SEEN: set[str] = set()
_DISAGREE: set[str] = set()


def _classify(chars: set[str]) -> None:
    """Ask both engines about each of ``chars`` (characters not met before)."""
    ours, theirs = _ENGINES
    for ch in chars:
        if any((a.fullmatch(ch) is None) != (b.fullmatch(ch) is None) for a, b in zip(ours, theirs, strict=True)):
            _DISAGREE.add(ch)
    _SEEN.update(chars)


_classify({chr(c) for c in range(128)})
_ASCII_DISAGREE = frozenset(_DISAGREE)


def needs_nltk(text: str) -> bool:
    """Whether ``text`` holds a character on which the two engines disagree (each distinct character is
    asked of both engines once per process, when first met: no table of all Unicode at start-up)."""
    if text.isascii():
        return not _ASCII_DISAGREE.isdisjoint(text)
    chars = set(text)
    if not chars <= _SEEN:
        _classify(chars - _SEEN)
    return not _DISAGREE.isdisjoint(chars)


def disagreeing_characters() -> str:
    """Every character that ``re`` and the engine NLTK uses (``regex``) classify differently in
    :data:`_CLASSES`, as one string: the whole table :func:`needs_nltk` consults one character at a time
    (about 0.3 s; for tests and for reading, not used while tokenising)."""
    ours, theirs = _ENGINES
    everything = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    differ: set[str] = set()
    for a, b in zip(ours, theirs, strict=True):
        differ |= set(a.findall(everything)) ^ set(b.findall(everything))
    return "".join(sorted(differ))


class FastWordTokenizer(NLTKWordTokenizer):
    """``NLTKWordTokenizer`` whose rules run on ``re`` (NLTK's own tokenizer for a text where the engines could
    differ; see the module docstring). ``tokenize(text)`` returns exactly ``NLTKWordTokenizer().tokenize(text)``."""

    STARTING_QUOTES = _rules(NLTKWordTokenizer.STARTING_QUOTES)
    ENDING_QUOTES = _rules(NLTKWordTokenizer.ENDING_QUOTES)
    PUNCTUATION = _rules(NLTKWordTokenizer.PUNCTUATION)
    PARENS_BRACKETS = _rules([NLTKWordTokenizer.PARENS_BRACKETS])[0]
    CONVERT_PARENTHESES = _rules(NLTKWordTokenizer.CONVERT_PARENTHESES)
    DOUBLE_DASHES = _rules([NLTKWordTokenizer.DOUBLE_DASHES])[0]
    CONTRACTIONS2 = [_stdlib(pattern) for pattern in NLTKWordTokenizer.CONTRACTIONS2]
    CONTRACTIONS3 = [_stdlib(pattern) for pattern in NLTKWordTokenizer.CONTRACTIONS3]

    _nltk = NLTKWordTokenizer()

    def tokenize(self, text: str, convert_parentheses: bool = False, return_str: bool = False) -> list[str]:
        if needs_nltk(text):
            return self._nltk.tokenize(text, convert_parentheses, return_str)
        return super().tokenize(text, convert_parentheses, return_str)
