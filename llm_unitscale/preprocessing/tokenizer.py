r"""Text tokenizer: NLTK for alphabetic scripts, jieba (or single characters) for CJK, or plain characters.

Three modes:

``"word"`` (default)
    Latin-script (and any other space-separated) text is split with NLTK's ``NLTKWordTokenizer`` -- the
    tokenizer behind ``nltk.word_tokenize`` -- which needs no downloaded data (``word_tokenize`` itself
    needs the ``punkt_tab`` download for sentence splitting, which is not available offline), its rules
    run on the standard ``re`` engine, twice as fast as NLTK's own and with the same tokens
    (``preprocessing.nltk_engine``). Because
    ``NLTKWordTokenizer`` only splits the *final* full stop of a string, a small heuristic splits
    sentence-final full stops inside a line too ("world. How" -> ``world . How``) unless the word is a
    known abbreviation ("Mr.", "e.g.", initials). Runs of CJK characters (ideographs, kana, CJK and
    full-width punctuation, plus the quotes/ellipsis/dashes touching them) are segmented with ``jieba``
    when it is importable (``get_config()["cjk"] == "jieba"``), otherwise split into single characters
    (``"cjk": "char"``). Hangul is written with spaces between words, so Korean goes through NLTK.
    A curly apostrophe between two letters ("don’t") is normalised to ``'`` so that it splits like
    "don't" (``do``, ``n't``). Emoji and other pictographs (arrows, dingbats, symbols; a flag is a pair of
    regional indicators) are tokens of their own, with the skin-tone and variation modifiers that follow them:
    ``"great😀👍🏽"`` → ``great``, ``😀``, ``👍🏽``.
``"char"``
    Every character is a token, spaces included, so a character-level model learns spacing.
``"jieba"``
    ``jieba.lcut`` on the whole string; whitespace tokens are dropped.
``"wordpunct"``
    NLTK's ``WordPunctTokenizer`` rule, ``\w+|[^\w\s]+`` (runs of letters and digits, runs of other
    symbols), except that every CJK character is a token of its own. One regular expression: about 15×
    faster than ``"word"`` and needs no jieba. The classifier's default: its n-gram features
    (``preprocessing.ngrams``) recover words from characters, and NLTK's finer English rules (``n't``,
    abbreviations) measured no better there.

Options: ``lowercase`` lowercases the tokens; ``punctuation=False`` drops tokens made only of
punctuation (Unicode category ``P*``, CJK punctuation and NLTK's ````` / ``''`` quote tokens included).

Normalisation (``normalize=True``, every mode, the same in training and prediction): Unicode *format*
characters (category ``Cf``: zero-width space U+200B, zero-width joiner U+200D, word joiner U+2060, a BOM
U+FEFF inside the text, soft hyphen, bidirectional controls) are removed and the text is put in NFC, so that
``"hello\\u200b"`` and ``"hello"``, or a decomposed and a composed "é", are the same token. (Removing U+200D
splits an emoji sequence into its emoji; removing U+200C loses the non-joiner of Persian spelling.) Runs saved
before this option existed load with ``normalize=False`` and tokenise exactly as they were trained.

``detokenize`` joins tokens back into readable text: no space between two CJK tokens, none before closing
punctuation and clitics (``. , ! ? ) 's n't`` ...), none after opening brackets, quotes and currency
signs, single spaces elsewhere. For ordinary English and Chinese sentences
``detokenize(tokenize(s)) == s``; for any text ``tokenize(detokenize(tokenize(s)))`` is meant to equal
``tokenize(s)`` (whitespace runs, straight vs. NLTK quote forms and similar details are not preserved).

jieba is made deterministic and quiet: the tokenizer uses its own ``jieba.Tokenizer`` instance (words
that other code adds to jieba's global dictionary do not change our segmentation), built once per process
with the default dictionary, and jieba's "Building prefix dict" log lines are silenced.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata
from types import ModuleType
from typing import Any

__all__ = ["MODES", "Tokenizer", "TokenizerError", "is_wordlike", "jieba_available", "normalize_text"]

MODES: tuple[str, ...] = ("word", "char", "jieba", "wordpunct")
_CJK_MODES: tuple[str, ...] = ("jieba", "char")
_INSTALL_HINT = 'install it with: pip install "llm-unitscale[zh]"'


class TokenizerError(ValueError):
    """A tokenizer cannot be built or configured (bad option, or jieba needed but not installed)."""


# --------------------------------------------------------------------------------------------------
# Character classes
# --------------------------------------------------------------------------------------------------

# Core CJK characters: ideographs, kana, bopomofo, CJK symbols and punctuation (without the ideographic
# space U+3000, which is whitespace), CJK compatibility forms, full-width and half-width forms.
_CJK_CORE = (
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3001-\u303f"  # CJK symbols and punctuation (、。〈〉《》「」『』【】〔〕 ...)
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3100-\u312f"  # bopomofo
    "\u3190-\u31ff"  # kanbun, bopomofo extended, CJK strokes, katakana phonetic extensions
    "\u3200-\u33ff"  # enclosed CJK letters, CJK compatibility
    "\u3400-\u4dbf"  # CJK unified ideographs extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\ufe10-\ufe1f"  # vertical forms
    "\ufe30-\ufe4f"  # CJK compatibility forms
    "\uff01-\uffef"  # half-width and full-width forms (，！？：；（） ...)
    "\U00020000-\U0003134f"  # CJK unified ideographs extensions B-G
)
# Punctuation shared between CJK and Latin typography: part of a CJK run only when touching one.
_CJK_SHARED = "\u2018\u2019\u201c\u201d\u2026\u2014\u2015\u00b7"
_CJK_RUN_RE = re.compile(f"[{_CJK_SHARED}]*(?:[{_CJK_CORE}]+[{_CJK_SHARED}]*)+")
_CJK_CHAR_RE = re.compile(f"[{_CJK_CORE}]")
# "wordpunct" mode: a CJK character, a run of other word characters, or a run of other non-space symbols
_WORDPUNCT_RE = re.compile(f"[{_CJK_CORE}]|[^\\W{_CJK_CORE}]+|[^\\w\\s{_CJK_CORE}]+")
_CURLY_APOSTROPHE_RE = re.compile(r"(?<=[^\W\d_])\u2019(?=[^\W\d_])")
# Unicode format characters (category Cf, Unicode 15.1; tests/test_data_safety.py checks this Python's database).
_FORMAT_RE = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
# Emoji and other pictographs, each one token with its modifiers (skin tones, variation selectors, keycap);
# a flag is two regional indicators.
_PICTOGRAPH_RE = re.compile(
    "(?:[\U0001F1E6-\U0001F1FF]{2}"
    "|[\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf\u2900-\u297f\u2b00-\u2bff"
    "\U0001F000-\U0001FAFF])[\U0001F3FB-\U0001F3FF\uFE0E\uFE0F\u20E3]*"
)

# --------------------------------------------------------------------------------------------------
# Token classes used by the sentence-stop heuristic and by detokenize
# --------------------------------------------------------------------------------------------------

_ABBREVIATIONS = frozenset(
    {
        *("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "rev", "gen", "col", "capt", "lt", "sgt"),
        *("gov", "sen", "rep", "hon", "pres", "supt", "cmdr", "adm", "maj", "vs", "etc", "al", "fig", "figs"),
        *("eq", "eqs", "no", "nos", "vol", "vols", "pp", "ed", "eds", "approx", "dept", "est", "inc", "ltd"),
        *("co", "corp", "bros", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov"),
        *("dec", "mon", "tue", "tues", "wed", "thu", "thurs", "fri", "sat", "sun", "ave", "blvd", "rd", "ft"),
        *("op", "cf", "ca", "viz", "ch", "sec", "art", "univ", "assn"),
    }
)
# Tokens that take no space after them (opening brackets and quotes, currency signs) ...
_OPENING = frozenset(
    {"(", "[", "{", "``", "\u201c", "\u2018", "\u00ab", "\u300c", "\u300e", "$", "\u00a3", "\u20ac", "\u00a5"}
)
# ... and tokens that take no space before them (closing punctuation, brackets and quotes, n't).
_CLOSING = frozenset(
    {".", ",", "!", "?", ";", ":", ")", "]", "}", "''", "\u201d", "\u2019", "\u00bb", "%", "...", "..", "n't", "N'T"}
)
_CLITIC_RE = re.compile(r"^'(?:s|m|d|ll|re|ve)$", re.IGNORECASE)
# NLTK (MacIntyre) contractions split into two words: "cannot" -> "can", "not"; "'tis" -> "'t", "is".
_JOINED_PAIRS = frozenset(
    {
        ("can", "not"),
        ("d", "'ye"),
        ("gim", "me"),
        ("gon", "na"),
        ("got", "ta"),
        ("lem", "me"),
        ("more", "'n"),
        ("wan", "na"),
        ("'t", "is"),
        ("'t", "was"),
    }
)
_QUOTE_TOKENS = frozenset({"``", "''"})


def _is_cjk_token(token: str) -> bool:
    """Return whether ``token`` contains a core CJK character (ideograph, kana, CJK punctuation...)."""
    return _CJK_CHAR_RE.search(token) is not None


def is_wordlike(token: str) -> bool:
    """Whether ``token`` holds a letter, a digit or a symbol people write as a word (an emoji: category
    ``So``), as opposed to punctuation and spacing only."""
    return any(ch.isalnum() or unicodedata.category(ch) == "So" for ch in token)


def normalize_text(text: str) -> str:
    """Remove Unicode format characters (category ``Cf``) and compose to NFC (see the module docstring)."""
    if text.isascii():
        return text
    text = _FORMAT_RE.sub("", text)
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _split_pictographs(tokens: list[str]) -> list[str]:
    """Make every emoji or pictograph inside a token a token of its own."""
    out: list[str] = []
    for token in tokens:
        start = 0
        for match in _PICTOGRAPH_RE.finditer(token):
            if match.start() > start:
                out.append(token[start : match.start()])
            out.append(match.group())
            start = match.end()
        if start < len(token):
            out.append(token[start:])
    return out


def _is_dots(token: str) -> bool:
    """Return whether ``token`` is made only of full stops ("." or "...")."""
    return bool(token) and token.strip(".") == ""


def _is_punctuation(token: str) -> bool:
    """Return whether ``token`` is made only of punctuation (Unicode ``P*``) or is an NLTK quote token."""
    if token in _QUOTE_TOKENS:
        return True
    return bool(token) and all(unicodedata.category(ch).startswith("P") for ch in token)


# --------------------------------------------------------------------------------------------------
# jieba
# --------------------------------------------------------------------------------------------------

_jieba_lock = threading.Lock()
_jieba_segmenter: Any = None


def _import_jieba() -> ModuleType | None:
    """Import jieba, silence its logging and return it, or return None when it is not installed."""
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.CRITICAL)  # e.g. its "Dump cache file failed" traceback on a full disk
    return jieba


def jieba_available() -> bool:
    """Return whether the optional ``jieba`` segmenter can be imported."""
    return _import_jieba() is not None


def _segmenter() -> Any:
    """Return this module's own ``jieba.Tokenizer`` (default dictionary), created on first use.

    Raises:
        TokenizerError: jieba is not installed.
    """
    global _jieba_segmenter
    jieba = _import_jieba()
    if jieba is None:
        raise TokenizerError(f"Chinese word segmentation needs the jieba package; {_INSTALL_HINT}")
    with _jieba_lock:
        if _jieba_segmenter is None:
            segmenter = jieba.Tokenizer()
            segmenter.initialize()
            _jieba_segmenter = segmenter
        return _jieba_segmenter


def _jieba_cut(text: str) -> list[str]:
    """Segment ``text`` with jieba (HMM on, deterministic) and drop whitespace tokens."""
    return [tok for tok in _segmenter().lcut(text, HMM=True) if tok.strip()]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@functools.cache
def _word_tokenizer() -> Any:
    """NLTK's word tokenizer (``nltk_engine.FastWordTokenizer``), made on first use: importing NLTK takes
    1.3 s, which a character, jieba or BPE run does not need to pay."""
    from llm_unitscale.preprocessing.nltk_engine import FastWordTokenizer

    return FastWordTokenizer()


class Tokenizer:
    """Split text into tokens and join tokens back into text.

    Args:
        mode: ``"word"`` (NLTK + CJK segmentation), ``"char"`` (every character) or ``"jieba"``
            (jieba for everything).
        lowercase: Lowercase every token.
        punctuation: Keep punctuation-only tokens; ``False`` drops them.
        cjk: How ``"word"`` mode splits CJK runs: ``"jieba"``, ``"char"``, or ``None`` (default) for
            jieba when it is importable and single characters otherwise. Pinned by ``get_config`` so
            that a saved tokenizer splits text the same way when it is loaded again.
        normalize: Remove format characters and compose to NFC first (:func:`normalize_text`); a config
            without the key (a run saved before it existed) loads with ``False``.

    Raises:
        TokenizerError: unknown mode or cjk value, or jieba requested but not installed.
    """

    def __init__(
        self,
        mode: str = "word",
        lowercase: bool = False,
        punctuation: bool = True,
        cjk: str | None = None,
        normalize: bool = True,
    ) -> None:
        if mode not in MODES:
            raise TokenizerError(f"unknown tokenizer mode {mode!r}; expected one of {', '.join(MODES)}")
        if not all(isinstance(flag, bool) for flag in (lowercase, punctuation, normalize)):
            raise TokenizerError("tokenizer options 'lowercase', 'punctuation' and 'normalize' must be true or false")
        if cjk is not None and cjk not in _CJK_MODES:
            raise TokenizerError(f"unknown cjk segmentation {cjk!r}; expected 'jieba' or 'char'")
        if mode in ("char", "wordpunct"):
            resolved = "char"
        elif mode == "jieba":
            resolved = "jieba"
        elif cjk is None:
            resolved = "jieba" if jieba_available() else "char"
        else:
            resolved = cjk
        if resolved == "jieba" and not jieba_available():
            what = "tokenizer mode 'jieba'" if mode == "jieba" else "this tokenizer (cjk='jieba')"
            raise TokenizerError(f"{what} needs the jieba package, which is not installed; {_INSTALL_HINT}")
        self.mode = mode
        self.lowercase = lowercase
        self.punctuation = punctuation
        self.cjk = resolved
        self.normalize = normalize

    def __repr__(self) -> str:
        return (
            f"Tokenizer(mode={self.mode!r}, lowercase={self.lowercase}, "
            f"punctuation={self.punctuation}, cjk={self.cjk!r}, normalize={self.normalize})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    # ------------------------------------------------------------------ tokenize

    def tokenize(self, text: str) -> list[str]:
        """Split one line (or any string) of text into tokens.

        Args:
            text: The text. Newlines are treated as ordinary whitespace (in ``"char"`` mode they are
                tokens); callers that care about lines split them first.

        Returns:
            The tokens, after the ``lowercase`` and ``punctuation`` options are applied.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.tokenize expects a str, got {type(text).__name__}")
        if self.normalize:
            text = normalize_text(text)
        if self.mode == "char":
            tokens = list(text)
        elif self.mode == "wordpunct":
            tokens = _WORDPUNCT_RE.findall(text)
        elif self.mode == "jieba":
            tokens = _jieba_cut(text)
        else:
            tokens = self._word_tokens(text)
        if self.lowercase:
            tokens = [tok.lower() for tok in tokens]
        if not self.punctuation:
            tokens = [tok for tok in tokens if not _is_punctuation(tok)]
        return tokens

    def _word_tokens(self, text: str) -> list[str]:
        """``"word"`` mode: NLTK on the non-CJK stretches, jieba or characters on the CJK runs."""
        tokens: list[str] = []
        start = 0
        for match in _CJK_RUN_RE.finditer(text):
            tokens.extend(self._latin_tokens(text[start : match.start()]))
            run = match.group()
            if self.cjk == "jieba":
                tokens.extend(_jieba_cut(run))
            else:
                tokens.extend(ch for ch in run if not ch.isspace())
            start = match.end()
        tokens.extend(self._latin_tokens(text[start:]))
        return tokens

    def _latin_tokens(self, text: str) -> list[str]:
        """Tokenize a stretch without CJK characters with NLTK, then split inner sentence stops."""
        if not text.strip():
            return []
        if text.isascii():  # no curly apostrophe, no pictograph: skip both passes
            return _split_sentence_stops(_word_tokenizer().tokenize(text))
        text = _CURLY_APOSTROPHE_RE.sub("'", text)
        tokens = _word_tokenizer().tokenize(text)
        return _split_pictographs(_split_sentence_stops(tokens))

    # ------------------------------------------------------------------ detokenize

    def detokenize(self, tokens: list[str]) -> str:
        """Join tokens into readable text (the inverse of ``tokenize`` for ordinary sentences).

        ``"char"`` mode concatenates. Otherwise: no space between two CJK tokens, none before closing
        punctuation or a clitic (``'s``, ``n't``), none after an opening bracket, quote or currency
        sign, single spaces elsewhere; NLTK's ````` / ``''`` quote tokens become ``"``.
        """
        tokens = [str(tok) for tok in tokens]
        if self.mode == "char":
            return "".join(tokens)
        return _detokenize_words(tokens)

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        """Return the JSON-serialisable settings: ``mode``, ``lowercase``, ``punctuation``, ``cjk``, ``normalize``."""
        return {
            "mode": self.mode,
            "lowercase": self.lowercase,
            "punctuation": self.punctuation,
            "cjk": self.cjk,
            "normalize": self.normalize,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from ``get_config()``'s dictionary.

        Raises:
            TokenizerError: the dictionary is malformed, or names jieba when it is not installed.
        """
        if not isinstance(config, dict):
            raise TokenizerError(f"tokenizer config must be a dict, got {type(config).__name__}")
        known = {"mode", "lowercase", "punctuation", "cjk", "normalize"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TokenizerError(f"unknown tokenizer config keys: {', '.join(map(str, unknown))}")
        return cls(
            mode=config.get("mode", "word"),
            lowercase=config.get("lowercase", False),
            punctuation=config.get("punctuation", True),
            cjk=config.get("cjk"),
            normalize=config.get("normalize", False),
        )


def _split_sentence_stops(tokens: list[str]) -> list[str]:
    """Split ``word.`` into ``word``, ``.`` where a new sentence starts after it.

    NLTK's word tokenizer expects one sentence per call and only splits the last full stop. A token
    ending in a single ``.`` followed by a capitalised word or an opening quote/bracket is split unless
    it looks like an abbreviation: a known abbreviation, an initial ("J."), or dotted ("U.S.").
    """
    out: list[str] = []
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        stem = tok[:-1]
        if (
            nxt is not None
            and len(tok) > 1
            and tok.endswith(".")
            and "." not in stem
            and stem.isalnum()
            and not (len(stem) == 1 and stem.isalpha())
            and stem.lower() not in _ABBREVIATIONS
            and (nxt[:1].isupper() or nxt in _OPENING)
        ):
            out.extend((stem, "."))
        else:
            out.append(tok)
    return out


def _detokenize_words(tokens: list[str]) -> str:
    """Join word tokens with the spacing rules described in ``Tokenizer.detokenize``."""
    parts: list[str] = []
    prev: str | None = None
    prev_opens = False  # the previous token wants no space after it
    double_open = False  # a straight " quote is open
    single_open = False  # a standalone ' quote is open
    for i, tok in enumerate(tokens):
        if tok == "":
            continue
        text = tok
        opens = tok in _OPENING
        closes = tok in _CLOSING or _CLITIC_RE.match(tok) is not None
        if tok in _QUOTE_TOKENS:
            # NLTK never makes '' of a " at the start of a string: such a token was a literal ''.
            text = "''" if tok == "''" and prev is None else '"'
        elif tok == '"':
            opens, closes = not double_open, double_open
            double_open = not double_open
        elif tok == "'":
            # An opening quote at the start, after an opening bracket, or when another ' follows
            # (a quoted phrase); otherwise a closing quote or a possessive ("the students' books").
            later = any(t == "'" for t in tokens[i + 1 :])
            if not single_open and (prev is None or prev_opens or later):
                opens, closes, single_open = True, False, True
            else:
                opens, closes, single_open = False, True, False
        if prev is not None:
            space = not (
                prev_opens
                or closes
                or _is_cjk_token(prev)
                or _is_cjk_token(tok)
                or (prev.lower(), tok.lower()) in _JOINED_PAIRS
            ) or (_is_dots(prev) and _is_dots(tok))
            if space:
                parts.append(" ")
        parts.append(text)
        prev, prev_opens = tok, opens
    return "".join(parts)
