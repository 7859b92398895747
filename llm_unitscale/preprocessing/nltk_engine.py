"""NLTK's word tokenizer, its rules run by the standard library's ``re`` engine where that gives the same tokens.

Recent NLTK (3.10 here) compiles every rule of ``NLTKWordTokenizer`` with the third-party ``regex`` engine behind a
wall-clock timeout (``nltk.redos``), a defence meant for patterns that callers supply. The word tokenizer's
rules are NLTK's own constants, all linear, and on them the timed ``regex`` path is about twice as slow as
``re`` (``python benchmarks/prepare.py`` tokenises with it, one process per core). :class:`FastWordTokenizer`
is ``NLTKWordTokenizer`` with the very same patterns (read from NLTK's class, never copied) compiled by ``re``.

The two engines agree on every construct these rules use except the meaning of ``\\w``, ``\\s``, ``\\d`` and
case-insensitive letters on some characters (the engines carry different Unicode tables: combining marks,
superscript digits, the ASCII separators U+001C–U+001F, dotted/dotless i, characters one table has not
assigned yet). :func:`disagreeing_characters` lists those characters by asking both engines; a text that holds
one of them is tokenised by NLTK itself. So the tokens are NLTK's for every text, byte for byte
(tests/test_tokenizer.py checks both paths on the shared corpora and on every disagreeing character).
"""

from __future__ import annotations

import functools
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


@functools.cache
def disagreeing_characters() -> str:
    """Every character that ``re`` and the engine NLTK uses (``regex``) classify differently in
    :data:`_CLASSES`, as one string (empty when NLTK uses ``re`` itself). About 0.3 s, once per process."""
    rule = NLTKWordTokenizer.PUNCTUATION[0][0]
    if isinstance(rule, re.Pattern):
        return ""
    import regex

    everything = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    differ: set[str] = set()
    for pattern in _CLASSES:
        ours = set(re.findall(pattern, everything))
        theirs = set(regex.findall(pattern, everything))
        differ |= ours ^ theirs
    return "".join(sorted(differ))


@functools.cache
def _disagreeing_sets() -> tuple[frozenset[str], frozenset[str]]:
    """(the disagreeing ASCII characters, all of them) as sets: ``isdisjoint`` over a line is faster than a
    regular expression of the thousands of ranges."""
    chars = frozenset(disagreeing_characters())
    return frozenset(ch for ch in chars if ch.isascii()), chars


def needs_nltk(text: str) -> bool:
    """Whether ``text`` holds a character on which the two engines disagree."""
    ascii_chars, chars = _disagreeing_sets()
    return not (ascii_chars if text.isascii() else chars).isdisjoint(text)


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
