"""Token vocabulary: build from tokenized text, encode/decode, save as a pickle and load it safely.

Ids 0-3 are always the special tokens ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``; the other tokens follow
sorted by count (descending) and then by token, so the same corpus always gives the same ids.

File format (``vocab.pkl`` in a run folder): a pickle of a *plain* dictionary::

    {"format": "llm_unitscale.vocabulary", "version": 1,
     "tokens": ["<pad>", "<unk>", "<bos>", "<eos>", ...],   # every token, in id order
     "counts": {"the": 1234, ...}}                           # training counts (may be empty)

Such a pickle references no Python class or function, so ``Vocabulary.load`` reads it with an unpickler
that refuses *every* global reference: a tampered file that tries to call something (``os.system``,
``builtins.eval``...) is rejected before anything in it runs. Files are written atomically (a temporary
file in the same folder, then ``os.replace``), so a crash never leaves half a vocabulary behind.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BOS",
    "EOS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "Vocabulary",
    "VocabularyError",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
FORMAT_NAME = "llm_unitscale.vocabulary"
FORMAT_VERSION = 1
#: Largest vocab.pkl that ``load`` reads: a million tokens with their counts take ~20 MB. A larger file is
#: refused before it is read (a 1 GB file took 1.7 GB of memory and 7 s to be refused after reading it).
MAX_VOCAB_BYTES = 256 * 1024 * 1024

# Opcodes that reach objects outside the pickle (globals, extension registry, persistent ids). The
# unpickler below refuses globals anyway; the scan also refuses the rest, and names what it found.
_UNSAFE_OPCODES = frozenset(
    {
        "GLOBAL",
        "STACK_GLOBAL",
        "INST",
        "OBJ",
        "REDUCE",
        "BUILD",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "BINPERSID",
    }
)
# Modules whose names differ from the public one (os.system pickles as posix.system).
_MODULE_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}


class VocabularyError(ValueError):
    """A vocabulary file cannot be used. The message always starts with the file's path: ``"PATH: ..."``."""


class _UnsafePickleError(Exception):
    """Raised inside the restricted unpickler when the pickle references a global."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for plain data only: every global (class or function) reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        raise _UnsafePickleError(f"it references {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _UnsafePickleError("it uses a persistent id")


def _scan_pickle(data: bytes) -> str | None:
    """Return a description of the first opcode that could run code, or None if there is none.

    Raises whatever ``pickletools.genops`` raises on a corrupt or truncated stream.
    """
    recent: list[str | None] = []  # arguments of the latest pushes (None: not a string push)
    for opcode, arg, _pos in pickletools.genops(data):
        if opcode.name in _UNSAFE_OPCODES:
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                return f"it references {_MODULE_ALIASES.get(module, module)}.{name}"
            if opcode.name == "STACK_GLOBAL" and len(recent) >= 2 and None not in recent[-2:]:
                module, name = str(recent[-2]), str(recent[-1])
                return f"it references {_MODULE_ALIASES.get(module, module)}.{name}"
            return f"it uses the {opcode.name} opcode"
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            recent = [*recent[-1:], str(arg)]
        elif opcode.name != "MEMOIZE":
            recent = [*recent[-1:], None]
    return None


class Vocabulary:
    """A mapping between tokens and integer ids, with the four special tokens at ids 0-3.

    Args:
        tokens: The ordinary tokens in id order (ids 4, 5, ...), without the special tokens.
        counts: Optional training counts of the tokens (kept for inspection and saved with the file).

    Raises:
        ValueError: a token is not a string, is repeated, or is one of the special tokens; or a count
            is not a non-negative integer.
    """

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    def __init__(self, tokens: list[str], counts: dict[str, int] | None = None) -> None:
        tokens = list(tokens)
        index: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for tok in tokens:
            if not isinstance(tok, str):
                raise ValueError(f"vocabulary tokens must be strings, got {type(tok).__name__}: {tok!r}")
            if tok in index:
                what = "a special token" if tok in SPECIAL_TOKENS else "repeated"
                raise ValueError(f"vocabulary token {tok!r} is {what}")
            index[tok] = len(index)
        clean_counts: dict[str, int] = {}
        for tok, count in (counts or {}).items():
            if not isinstance(tok, str) or isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"vocabulary count for {tok!r} must be a non-negative int, got {count!r}")
            clean_counts[tok] = count
        self._tokens: list[str] = [*SPECIAL_TOKENS, *tokens]
        self._index = index
        self.counts: dict[str, int] = clean_counts

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        token_lists: Iterable[list[str]],
        min_count: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Count tokens and keep the frequent ones.

        Args:
            token_lists: Tokenized texts (one list of tokens per line or document).
            min_count: Keep tokens seen at least this many times.
            max_size: Keep at most this many entries *including* the 4 special tokens (None: no limit).

        Returns:
            The vocabulary, ordered by count (descending) then token, so it is deterministic. Special
            tokens met in the text are not counted as ordinary tokens.
        """
        counter: Counter[str] = Counter()
        for tokens in token_lists:
            if isinstance(tokens, str):
                raise TypeError("Vocabulary.build expects lists of tokens, got a str (tokenize it first)")
            counter.update(tokens)
        return cls.from_counts(counter, min_count, max_size)

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """:meth:`build` from counted tokens (``{token: count}``; special tokens among them are dropped)."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < len(SPECIAL_TOKENS)
        ):
            raise ValueError(
                f"max_size must be None or an int >= {len(SPECIAL_TOKENS)} (it includes the special tokens), "
                f"got {max_size!r}"
            )
        kept = sorted(
            ((tok, n) for tok, n in counts.items() if n >= min_count and tok not in SPECIAL_TOKENS),
            key=lambda item: (-item[1], item[0]),
        )
        if max_size is not None:
            kept = kept[: max_size - len(SPECIAL_TOKENS)]
        return cls([tok for tok, _ in kept], dict(kept))

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._tokens == other._tokens and self.counts == other.counts

    def __repr__(self) -> str:
        preview = ", ".join(repr(t) for t in self._tokens[4:9])
        more = ", ..." if len(self._tokens) > 9 else ""
        return f"Vocabulary(size={len(self)}, tokens=[{preview}{more}])"

    @property
    def tokens(self) -> list[str]:
        """Every token in id order, the special tokens first (a copy)."""
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        """Return the id of ``token``, or ``unk_id`` when it is not in the vocabulary."""
        return self._index.get(token, self.unk_id)

    def id_to_token(self, i: int) -> str:
        """Return the token with id ``i``.

        Raises:
            IndexError: ``i`` is negative or not below ``len(self)``.
        """
        i = int(i)
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"token id {i} out of range for a vocabulary of {len(self._tokens)} tokens")
        return self._tokens[i]

    def encode(self, tokens: list[str]) -> list[int]:
        """Map tokens to ids; unknown tokens map to ``unk_id``. No ``<bos>``/``<eos>`` is added."""
        if isinstance(tokens, str):
            raise TypeError("Vocabulary.encode expects a list of tokens, got a str (tokenize it first)")
        get, unk = self._index.get, self.unk_id
        return [get(tok, unk) for tok in tokens]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> list[str]:
        """Map ids to tokens.

        Args:
            ids: Token ids (Python or NumPy integers).
            skip_special: Drop ``<pad>``, ``<bos>`` and ``<eos>``. ``<unk>`` is kept: it stands for a
                real (unknown) word of the text.

        Raises:
            IndexError: an id is out of range.
        """
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        return [self.id_to_token(i) for i in ids if int(i) not in skipped]

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """Return the plain dictionary that ``save`` pickles."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokens": list(self._tokens),
            "counts": dict(self.counts),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary to ``path`` as a pickle of a plain dict, atomically.

        The data goes to a temporary file in the same folder, which then replaces ``path`` in one
        ``os.replace``: readers see the old file or the new one, never a partial one.
        """
        from llm_unitscale.files import atomic_write_bytes

        atomic_write_bytes(path, pickle.dumps(self.to_dict(), protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary written by ``save``, refusing anything but plain data.

        Raises:
            VocabularyError: ``"PATH: problem"`` when the file is missing or unreadable, larger than
                :data:`MAX_VOCAB_BYTES` (refused before reading), truncated or
                corrupt, an unsafe pickle (it references a class or function; nothing in it is run),
                not a vocabulary, from an incompatible format version, or has malformed fields.
        """
        from llm_unitscale.files import input_problem

        problem = input_problem(path, MAX_VOCAB_BYTES, "vocabulary file")
        if problem == "no such file":
            raise VocabularyError(f"{path}: no such vocabulary file")
        if problem:
            raise VocabularyError(f"{path}: {problem}")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise VocabularyError(f"{path}: cannot read the vocabulary file ({exc.strerror or exc})") from None
        if not data:
            raise VocabularyError(f"{path}: empty file; not a vocabulary (truncated?)")
        try:
            unsafe = _scan_pickle(data)
            if unsafe is not None:
                raise _UnsafePickleError(unsafe)
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
        except _UnsafePickleError as exc:
            raise VocabularyError(
                f"{path}: refusing to load the vocabulary (unsafe pickle: {exc.what}); "
                "a vocabulary file holds plain data only"
            ) from None
        except Exception as exc:  # any unpickling failure means a corrupt file
            raise VocabularyError(
                f"{path}: not a readable vocabulary pickle (truncated or corrupt file: {type(exc).__name__}: {exc})"
            ) from None
        return cls._from_dict(obj, path)

    @classmethod
    def _from_dict(cls, obj: Any, path: str | os.PathLike[str]) -> Vocabulary:
        """Validate the unpickled object and build the vocabulary, with ``"PATH: problem"`` errors."""
        if not isinstance(obj, dict):
            raise VocabularyError(f"{path}: not a vocabulary file (it holds a {type(obj).__name__}, not a dict)")
        if obj.get("format") != FORMAT_NAME:
            raise VocabularyError(
                f"{path}: not a vocabulary file (format {obj.get('format')!r}, expected {FORMAT_NAME!r})"
            )
        if "version" not in obj:
            raise VocabularyError(f"{path}: malformed vocabulary: it has no 'version'")
        version = obj["version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise VocabularyError(f"{path}: made by an incompatible version {version!r}; expected {FORMAT_VERSION}")
        tokens, counts = obj.get("tokens"), obj.get("counts", {})
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise VocabularyError(f"{path}: malformed vocabulary: 'tokens' must be a list of strings")
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabularyError(f"{path}: malformed vocabulary: 'tokens' must start with {', '.join(SPECIAL_TOKENS)}")
        if not isinstance(counts, dict):
            raise VocabularyError(f"{path}: malformed vocabulary: 'counts' must be a dict")
        try:
            return cls(tokens[len(SPECIAL_TOKENS) :], counts)
        except ValueError as exc:
            raise VocabularyError(f"{path}: malformed vocabulary: {exc}") from None
