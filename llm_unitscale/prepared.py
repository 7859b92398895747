"""Prepared language-model corpora: a text file streamed, tokenised in parallel, and kept as a memory-mapped
array of token ids in a cache, so that a corpus of gigabytes trains in bounded memory and a second run on the
same data starts at once (nanoGPT's ``train.bin``).

Where: ``--cache DIR``, else ``$LLM_UNITSCALE_CACHE``, else ``$XDG_CACHE_HOME/llm_unitscale``, else
``~/.cache/llm_unitscale`` (:func:`cache_dir`). A shared cache rather than the run folder, so that every run
on the same data — another ``--out``, other model options — reuses one preparation, and run folders stay small.
Each prepared corpus is a folder ``prepared-KEY/`` (KEY: :func:`cache_key`, a hash of the file's bytes and of
every setting that changes the ids: tokenizer, ``--val-fraction``, ``--min-count``, ``--max-vocab``,
``--encoding``, ``--errors``) holding

* ``tokens.bin``: the ids of the training part then of the validation part, ``uint16`` when the vocabulary
  has at most 65,536 entries, else ``uint32`` (read with ``numpy.memmap``);
* ``vocab.pkl`` (the run folder's format), ``validation.txt`` (the held-out text), ``tokenizer.json`` (BPE);
* ``manifest.json``: the format, the settings, the dtype, the token counts of both parts, the SHA-256 of the
  text (``config.json``'s ``data_sha256``) and the preparation's time. It is written last, into a temporary
  folder that is then renamed: a folder without it is never used, and a crash leaves no half entry.

How (:func:`prepare`), in passes over the file that each hold one chunk at a time:

1. *hash*: the file's bytes → the cache key, and chunk boundaries every :data:`CHUNK_BYTES` at a line break
   (an encoding in which a line break is not the byte ``\\n``, UTF-16 or UTF-32, makes one chunk). A cache hit
   ends here.
2. *read*: each chunk decoded and checked as ``data.read_text`` does (same messages), its characters counted;
   then the validation split, the file's last ``--val-fraction`` of characters cut at a line break exactly as
   :func:`split_tail` cuts the whole text (:func:`cut_index` needs only the chunk holding the cut point).
3. *tokenise*: chunks are tokenised by one process per core (``multiprocessing``), each into ids of its own
   growing table, which this process maps to one table for the corpus and spills to disk; the training part's
   counts are merged as chunks come back. Then the vocabulary (the serial ``Vocabulary.build`` rule: count, then token) and one pass that maps the spill
   to ``tokens.bin``. The ids are exactly the serial path's, :func:`lm_ids` over :func:`split_tail`'s two
   parts (tests/test_prepared.py).

Progress with rates and an ETA goes to stderr (``progress.Progress``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from unittest import mock

import numpy as np

from llm_unitscale import data as data_mod
from llm_unitscale import files
from llm_unitscale.progress import Progress

__all__ = ["BPE_SAMPLE_BYTES", "CACHE_ENV", "CHUNK_BYTES", "Prepared", "bpe_sample", "cache_dir", "cache_key",
           "cut_index", "id_lines", "keeps_empty_lines", "line_ids", "line_texts", "lm_ids", "prepare", "split_tail", "tokenize_lines"]

#: Environment variable naming the cache folder (``--cache`` wins over it).
CACHE_ENV = "LLM_UNITSCALE_CACHE"
#: Environment variable setting the number of tokenising processes (default: the cores this process may use).
WORKERS_ENV = "LLM_UNITSCALE_WORKERS"
FORMAT, VERSION = "llm_unitscale.prepared", 1
MANIFEST, TOKENS = "manifest.json", "tokens.bin"
#: Bytes per chunk handed to one tokenising process (a chunk ends at the first line break after this many).
CHUNK_BYTES = 8 * 1024 * 1024
#: Bytes read at a time by the passes that stream the file.
BLOCK_BYTES = 16 * 1024 * 1024
#: Most bytes of the training part the BPE trainer reads (:func:`bpe_sample`).
BPE_SAMPLE_BYTES = 64 * 1024 * 1024
#: Ids read from the spill at a time when it is written as ``tokens.bin``.
MAP_IDS = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------- text → ids
def cut_index(text: str, fraction: float, length: int | None = None, offset: int = 0) -> int:
    """Where :func:`split_tail` starts the tail, as an index into ``text``.

    ``text`` may be one piece, starting at character ``offset``, of a text of ``length`` characters, as long
    as it holds the cut point ``int(length × (1 − fraction))`` and starts right after a line break (or at the
    start): the cut goes after the last line break before the cut point if that lies beyond
    ``length × (1 − 2.5 fraction)``, else after the last space there, else at the cut point itself.
    """
    length = len(text) if length is None else length
    cut = int(length * (1.0 - fraction)) - offset
    floor = length * (1.0 - 2.5 * fraction)
    for sep in ("\n", " "):
        at = text.rfind(sep, 0, cut)
        if at >= 0:
            at += offset
        elif sep == "\n":
            at = offset - 1  # the piece before this one ends with a line break (or there is none: -1)
        if at > floor:
            return at + 1 - offset
    return cut


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split off the last ``fraction`` of the text at a line break (or a space) near that point."""
    at = cut_index(text, fraction)
    return text[:at], text[at:]


def line_texts(text: str) -> tuple[list[str], list[int]]:
    """The pieces of every line of ``text`` (``data.line_pieces``) and, per line, the index after its last
    piece."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # a final line break ends the last line, it does not start an empty one
    texts: list[str] = []
    line_ends: list[int] = []
    for line in lines:
        texts.extend(data_mod.line_pieces(line))
        line_ends.append(len(texts))
    return texts, line_ends


def tokenize_lines(tokenizer: Any, text: str, what: str | None = None) -> tuple[list[list[str]], list[int]]:
    """Tokenise ``text`` once: the tokens of every piece of every line (``data.line_pieces``; empty lists
    kept) and, per line, the index after its last piece. ``what``: show progress on stderr under that name.
    A tokenizer with ``tokenize_many`` (BPE) gets all pieces in one call."""
    texts, line_ends = line_texts(text)
    many = getattr(tokenizer, "tokenize_many", None)
    if many is not None:
        return many(texts), line_ends
    progress = Progress(what, len(text), "characters") if what else None
    pieces: list[list[str]] = []
    done = 0
    for piece in texts:
        pieces.append(tokenizer.tokenize(piece))
        done += len(piece)
        if progress is not None and (len(pieces) % 64 == 0 or len(piece) > 4096):  # a clock read is ~1 µs
            progress.update(done)
    if progress is not None:
        progress.close(len(text))
    return pieces, line_ends


def line_ids(vocab: Any, pieces: list[list[str]], line_ends: list[int], keep_empty: bool = False) -> np.ndarray:
    """Token ids for language modelling from :func:`tokenize_lines`: each line's tokens, then ``<eos>``
    (an empty line too with ``keep_empty``). ``vocab``: anything with ``encode`` and ``eos_id``."""
    ids: list[int] = []
    start = 0
    for end in line_ends:
        line = [token for tokens in pieces[start:end] for token in tokens]
        if line or keep_empty:
            ids.extend(vocab.encode(line))
            ids.append(vocab.eos_id)
        start = end
    return np.asarray(ids, dtype=np.int32)


def keeps_empty_lines(tokenizer: Any) -> bool:
    """Char and BPE mode keep empty lines as a lone ``<eos>`` (paragraphs, verse); word and jieba mode skip
    them."""
    return getattr(tokenizer, "mode", None) in ("char", "bpe")


def lm_ids(tokenizer: Any, vocab: Any, text: str) -> np.ndarray:
    """Token ids of a text for language modelling: each line's tokens followed by ``<eos>``, the line break.

    In char and BPE mode every line break is kept, so an empty line is a lone ``<eos>`` and a model learns
    paragraphs and verse; in word and jieba mode empty lines are skipped. A final line break ends the last
    line, it does not start an empty one.
    """
    return line_ids(vocab, *tokenize_lines(tokenizer, text), keep_empty=keeps_empty_lines(tokenizer))


def prompt_ids(tokenizer: Any, vocab: Any, text: str) -> list[int]:
    """A language model's ids for a prompt: ``<eos>`` (the line start every training window follows) then the
    tokens of :func:`lm_ids`, whose line breaks are ``<eos>``; the text ends mid-line unless it ends in one."""
    ids = [int(i) for i in lm_ids(tokenizer, vocab, text)]
    return [vocab.eos_id, *(ids if text.endswith("\n") else ids[:-1])]


def lm_text(tokenizer: Any, vocab: Any, ids: Any) -> str:
    """Text of language-model ids (the inverse of :func:`lm_ids`): each ``<eos>`` a line break, the pieces
    between them detokenized; padding and ``<bos>`` dropped."""
    lines: list[list[int]] = [[]]
    for i in ids:
        if int(i) == vocab.eos_id:
            lines.append([])
        else:
            lines[-1].append(int(i))
    return "\n".join(tokenizer.detokenize(vocab.decode(line)) for line in lines)


def id_lines(ids: np.ndarray, vocab: Any) -> tuple[list[list[str]], int, int]:
    """Word2Vec's sentences from language-model ids: (lines, epochs, all lines) as ``embeddings.word2vec_plan``
    picks them from the non-empty lines (split at ``<eos>``), only the sampled lines decoded to tokens."""
    from llm_unitscale.preprocessing.embeddings import word2vec_sampling

    ids = np.asarray(ids)  # a prepared corpus is a np.memmap: slice a plain view of it, not 45k memmap objects
    ends = np.flatnonzero(ids == vocab.eos_id)
    if len(ids) and (not len(ends) or ends[-1] != len(ids) - 1):  # a last line without its <eos>
        ends = np.append(ends, len(ids))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    step, epochs = word2vec_sampling(int(np.sum(ends - starts)))
    tokens = np.array(vocab.tokens, dtype=object)
    lines = [tokens[ids[a:b]].tolist() for a, b in zip(starts[::step], ends[::step], strict=True)]
    return lines, epochs, len(starts)


class _Table:
    """A vocabulary that grows: ``encode`` gives every new token the next id (a worker's own ids)."""

    eos_id = 3

    def __init__(self, seed: list[str]) -> None:
        self.index = {token: i for i, token in enumerate(seed)}
        self.seeded = len(seed)

    @property
    def size(self) -> int:
        return len(self.index)

    def encode(self, tokens: list[str]) -> list[int]:
        index = self.index
        return [index.setdefault(token, len(index)) for token in tokens]

    def new_tokens(self) -> list[str]:
        return list(self.index)[self.seeded:]


# ------------------------------------------------------------------------------------------------- the cache
def cache_dir(given: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``given`` (``--cache``), else ``$LLM_UNITSCALE_CACHE``, else
    ``$XDG_CACHE_HOME/llm_unitscale``, else ``~/.cache/llm_unitscale``."""
    if given:
        return Path(given)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm_unitscale"


def cache_key(file_sha256: str, settings: dict) -> str:
    """The name of a prepared corpus: a hash of the file's bytes and of the settings that change its ids."""
    blob = json.dumps({"file": file_sha256, "format": VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def default_workers() -> int:
    """Tokenising processes: ``$LLM_UNITSCALE_WORKERS``, else the cores this process may run on."""
    with contextlib.suppress(ValueError):
        return max(1, int(os.environ.get(WORKERS_ENV, "")))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Prepared:
    """A prepared corpus: its folder, manifest, vocabulary, tokenizer and memory-mapped ids."""

    path: Path
    manifest: dict
    vocab: Any
    tokenizer: Any
    ids: np.ndarray  # numpy.memmap of tokens.bin
    reused: bool

    @property
    def train(self) -> np.ndarray:
        """The training part's ids (a view of the memory map)."""
        return self.ids[: self.manifest["train_tokens"]]

    @property
    def val(self) -> np.ndarray:
        """The validation part's ids (a view of the memory map)."""
        return self.ids[self.manifest["train_tokens"]:]

    def summary(self) -> str:
        """One line for the log: reused or made, where, its size, and how long the preparation took."""
        m = self.manifest
        return (f"prepared corpus: {'reusing ' if self.reused else ''}{self.path} ({m['train_tokens']:,} training "
                f"and {m['val_tokens']:,} validation tokens, vocabulary {m['vocab_size']:,}, {m['dtype']}; "
                f"prepared in {m['seconds']:.1f} s with {m['workers']} process{'es' * (m['workers'] > 1)})")

    @property
    def val_path(self) -> Path:
        """The held-out text (the file's last ``--val-fraction``)."""
        return self.path / "validation.txt"


def _is_entry(path: Path) -> bool:
    """Whether ``path`` is a prepared corpus of ours (a folder whose manifest names our format)."""
    try:
        return path.is_dir() and json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _load(path: Path, tokenizer: Any) -> Prepared | None:
    """The prepared corpus in ``path``, or None when it is missing or incomplete."""
    from llm_unitscale.preprocessing import Vocabulary, VocabularyError
    from llm_unitscale.preprocessing.bpe import BpeTokenizer
    from llm_unitscale.preprocessing.tokenizer import TokenizerError

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        dtype = np.dtype(manifest["dtype"])
        count = manifest["train_tokens"] + manifest["val_tokens"]
        if manifest.get("format") != FORMAT or (path / TOKENS).stat().st_size != count * dtype.itemsize:
            return None
        vocab = Vocabulary.load(path / "vocab.pkl")
        if tokenizer is None:
            tokenizer = BpeTokenizer.load(path / "tokenizer.json", manifest["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError, VocabularyError, TokenizerError):
        return None
    ids = np.memmap(path / TOKENS, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    return Prepared(path, manifest, vocab, tokenizer, ids, reused=True)


def prepare(data: str, tokenizer: dict, *, val_fraction: float = 0.1, min_count: int = 1,
            max_vocab: int | None = 20000, encoding: str = "utf-8", errors: str = "strict",
            cache: str | os.PathLike | None = None, workers: int | None = None,
            log: TextIO = sys.stderr) -> Prepared:
    """The prepared corpus of the file ``data`` for ``tokenizer`` (a tokenizer config: ``Tokenizer.get_config``,
    or ``{"mode": "bpe", "vocab_size": N, "lowercase": ..., "normalize": ...}``), from the cache or made now.

    Raises:
        DataError: ``"PATH: problem"`` for a file that cannot be read or decoded, is empty, whitespace only,
            or holds no word (``data.read_text``'s messages).
        OutputError: the cache path is not a folder, or the entry's path holds something not ours.
    """
    from llm_unitscale.preprocessing import Tokenizer

    problem = files.input_problem(data, kind="text file")
    if problem:
        raise data_mod.DataError(data, problem)
    settings = {"tokenizer": tokenizer, "val_fraction": val_fraction, "encoding": encoding, "errors": errors,
                **({} if tokenizer.get("mode") == "bpe" else {"min_count": min_count, "max_vocab": max_vocab})}
    data_mod.decode_text(b"", data, encoding, errors)  # an unknown --encoding or --errors: one line, now
    scan = _scan(data, encoding)
    if scan.size == 0:
        raise data_mod.DataError(data, "file is empty")
    folder = cache_dir(cache)
    entry = folder / f"prepared-{cache_key(scan.sha256, settings)}"
    text_tokenizer = None if tokenizer.get("mode") == "bpe" else Tokenizer.from_config(tokenizer)
    found = _load(entry, text_tokenizer) if entry.is_dir() else None
    if found is not None:
        return found
    if folder.exists() and not folder.is_dir():
        raise files.OutputError(f"{folder}: the cache path is not a folder; pass --cache DIR")
    files.check_replaceable(entry, _is_entry, "a prepared corpus", "pass another --cache")  # before the work
    with files.writing("the prepared corpus", folder):
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=folder))
    try:
        with files.writing("the prepared corpus", entry):
            _make(data, scan, tokenizer, text_tokenizer, settings, work, workers or default_workers(),
                  log, min_count, max_vocab)
            if files.check_replaceable(entry, _is_entry, "a prepared corpus", "pass another --cache"):
                if _load(entry, text_tokenizer) is None:  # an entry of ours that no longer reads back
                    files.replace_folder(work, entry)
            else:
                with contextlib.suppress(OSError):  # another process published the same corpus first
                    os.rename(work, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prepared = _load(entry, text_tokenizer)
    if prepared is None:
        raise files.WriteError("it could not be read back", "the prepared corpus", entry)
    prepared.reused = False
    return prepared


# ------------------------------------------------------------------------------------------------- the passes
@dataclass
class _Scan:
    sha256: str
    size: int
    chunks: list[tuple[int, int]]  # byte ranges, each ending after a line break (or at the end of the file)


def _line_safe(encoding: str) -> bool:
    """Whether a line break is the byte ``\\n`` and no other character contains that byte."""
    import codecs

    name = codecs.lookup(encoding).name.replace("-", "_")
    return not name.startswith(("utf_16", "utf_32", "utf_7", "iso2022", "hz"))


def _blocks(path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        left = math.inf if end is None else end - start
        while left > 0 and (block := handle.read(int(min(BLOCK_BYTES, left)))):
            left -= len(block)
            yield block


def _scan(path: str, encoding: str) -> _Scan:
    """Pass 1: the SHA-256 of the file's bytes and its chunks (see the module docstring)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path) if os.path.isfile(path) else None
    progress = Progress(f"hashing {path}", size, "bytes")
    chunks: list[tuple[int, int]] = []
    safe = _line_safe(encoding)
    start = offset = 0
    try:
        for block in _blocks(path):
            digest.update(block)
            while safe and offset + len(block) - start > CHUNK_BYTES:
                newline = block.find(b"\n", max(start + CHUNK_BYTES - offset, 0))
                if newline < 0:
                    break
                chunks.append((start, offset + newline + 1))
                start = offset + newline + 1
            offset += len(block)
            progress.update(offset)
    except OSError as exc:
        raise data_mod.DataError(path, f"cannot read file: {exc.strerror or exc}") from exc
    progress.close(offset)
    if offset > start:
        chunks.append((start, offset))
    return _Scan(digest.hexdigest(), offset, chunks)


def _read_chunk(path: str, start: int, end: int, encoding: str, errors: str, line: int = 1) -> str:
    """The text of the bytes ``start:end`` (see ``data.decode_text``)."""
    try:
        raw = b"".join(_blocks(path, start, end))
    except OSError as exc:
        raise data_mod.DataError(path, f"cannot read file: {exc.strerror or exc}") from exc
    return data_mod.decode_text(raw, path, encoding, errors, first=start == 0, line=line, offset=start)


def _read(path: str, scan: _Scan, encoding: str, errors: str) -> tuple[list[int], str]:
    """Pass 2: every chunk decoded and checked; its characters counted. Returns the counts and the SHA-256 of
    the text's UTF-8 (``data.corpus_hash`` of the whole text)."""
    digest = hashlib.sha256()
    progress = Progress(f"reading {path}", scan.size, "bytes")
    chars, line, words = [], 1, False
    for start, end in scan.chunks:
        text = _read_chunk(path, start, end, encoding, errors, line)
        line += text.count("\n")
        digest.update(text.encode("utf-8"))
        chars.append(len(text))
        words = words or not text.isspace()
        progress.update(end)
    progress.close(scan.size)
    if not words:
        raise data_mod.DataError(path, "file contains only whitespace")
    return chars, digest.hexdigest()


# Per-process state of a tokenising worker (set by _start_worker).
_WORKER: dict[str, Any] = {}


def _start_worker(path: str, tokenizer: Any, encoding: str, errors: str, seed: list[str]) -> None:
    _WORKER.update(path=path, tokenizer=tokenizer, encoding=encoding, errors=errors, seed=seed)


def _tokenise(task: tuple[int, int, int, int | None]) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """One chunk (characters ``a:b`` of the bytes ``start:end``) → (its new tokens, its ids in the worker's
    table, the count of each id, its bytes)."""
    start, end, a, b = task
    w = _WORKER
    text = _read_chunk(w["path"], start, end, w["encoding"], w["errors"])[a:b]
    tokenizer = w["tokenizer"]
    table = _Table(w["seed"])  # BPE's seed is the whole vocabulary: its table never grows
    if hasattr(tokenizer, "encode_many"):  # BPE: the library's ids, no token strings, every line kept
        texts, line_ends = line_texts(text)
        flat, counts = tokenizer.encode_many(texts)
        ends = np.concatenate([[0], np.cumsum(counts)])[line_ends]
        ids = np.insert(flat, ends, np.int32(table.eos_id))  # what line_ids gives, without a loop per token
    else:
        pieces, line_ends = tokenize_lines(tokenizer, text)
        ids = line_ids(table, pieces, line_ends, keep_empty=keeps_empty_lines(tokenizer))
    return table.new_tokens(), ids, np.bincount(ids, minlength=table.size), end - start


@contextlib.contextmanager
def _tokenised(tasks: list, workers: int, initargs: tuple) -> Iterator[tuple[Iterator, int]]:
    """(the results of :func:`_tokenise` over ``tasks`` in order, processes): a pool of ``workers`` processes, or this
    process when one is enough (one core, or a corpus of one chunk)."""
    if workers < 2 or len({task[:2] for task in tasks}) < 2:
        _start_worker(*initargs)
        try:
            yield map(_tokenise, tasks), 1
        finally:
            _WORKER.clear()
        return
    # fork: the workers start at once with the tokenizer loaded (spawn would import TensorFlow in each).
    # ProcessPoolExecutor, not Pool: a worker that dies (killed, out of memory) fails the run, it does not hang it.
    context = multiprocessing.get_context("fork")
    processes = min(workers, len(tasks))
    # The BPE library's threads (its trainer ran in this process) are not forked: say so, or it warns in each worker.
    with mock.patch.dict(os.environ, TOKENIZERS_PARALLELISM="false"), ProcessPoolExecutor(
            processes, context, _start_worker, initargs) as pool:
        try:
            yield pool.map(_tokenise, tasks), processes
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _make(data: str, scan: _Scan, config: dict, tokenizer: Any, settings: dict, work: Path, workers: int,
          log: TextIO, min_count: int, max_vocab: int | None) -> dict:
    """Passes 2 and 3 into the folder ``work``; returns the manifest (written last)."""
    from llm_unitscale.preprocessing import SPECIAL_TOKENS, Vocabulary
    from llm_unitscale.preprocessing.bpe import BpeTokenizer
    from llm_unitscale.preprocessing.tokenizer import is_wordlike

    started = time.perf_counter()
    encoding, errors = settings["encoding"], settings["errors"]
    chars, text_sha256 = _read(data, scan, encoding, errors)
    total = sum(chars)
    starts = np.concatenate([[0], np.cumsum(chars)])
    k = int(np.searchsorted(starts, int(total * (1.0 - settings["val_fraction"])), side="right")) - 1
    chunk = _read_chunk(data, *scan.chunks[k], encoding, errors)
    at = cut_index(chunk, settings["val_fraction"], total, int(starts[k]))
    train_tasks = [(s, e, 0, None) for s, e in scan.chunks[:k]] + ([(*scan.chunks[k], 0, at)] if at else [])
    val_tasks = ([(*scan.chunks[k], at, None)] if at < len(chunk) else []) + [
        (s, e, 0, None) for s, e in scan.chunks[k + 1:]]
    with open(work / "validation.txt", "w", encoding="utf-8", newline="") as handle:
        handle.write(chunk[at:])
        for start, end, _, _ in val_tasks[1 if at < len(chunk) else 0:]:
            handle.write(_read_chunk(data, start, end, encoding, errors))
    del chunk

    if tokenizer is None:
        sample = bpe_sample(train_tasks)
        part = sum(e - s for s, e, _, _ in train_tasks)
        what = ("the training part" if len(sample) == len(train_tasks) else
                f"{sum(e - s for s, e, _, _ in sample) / 1e6:,.0f} MB of the {part / 1e6:,.0f} MB training part "
                f"({len(sample)} of {len(train_tasks)} chunks, evenly spread)")
        print(f"training a byte-level BPE of {config['vocab_size']:,} tokens on {what} of {data}", file=log)
        bpe_started = time.perf_counter()
        tokenizer = BpeTokenizer.train(_training_lines(data, sample, encoding, errors), config["vocab_size"],
                                       config.get("lowercase", False), config.get("normalize", True))
        print(f"trained the BPE in {time.perf_counter() - bpe_started:.1f} s", file=log)
        tokenizer.save(work / "tokenizer.json")
        seed = [*SPECIAL_TOKENS, *tokenizer.pieces()]
    else:
        seed = list(SPECIAL_TOKENS)

    index = {token: i for i, token in enumerate(seed)}
    counts = np.zeros(len(index), dtype=np.int64)
    lengths = [0, 0]
    progress = Progress(f"tokenising {data}", scan.size, "bytes", extra="tokens")
    done = 0
    tasks = train_tasks + val_tasks
    initargs = (data, tokenizer, encoding, errors, seed)
    with open(work / "spill.bin", "wb") as spill, _tokenised(tasks, workers, initargs) as (results, processes):
        for number, (new, ids, local_counts, size) in enumerate(results):
            to_global = np.concatenate([np.arange(len(seed)), [index.setdefault(t, len(index)) for t in new]])
            to_global = to_global.astype(np.int64)
            spill.write(to_global[ids].astype(np.int32).tobytes())
            training = number < len(train_tasks)
            lengths[not training] += len(ids)
            if training:
                if len(counts) < len(index):
                    counts = np.concatenate([counts, np.zeros(len(index) - len(counts), np.int64)])
                counts[to_global] += local_counts
            done += size
            progress.update(min(done, scan.size), sum(lengths))
    progress.close(scan.size)

    tokens = list(index)
    counts = np.concatenate([counts, np.zeros(len(index) - len(counts), np.int64)])
    counts[: len(SPECIAL_TOKENS)] = 0  # special tokens met in the text are not counted (Vocabulary.build)
    if not any(is_wordlike(tokenizer.detokenize([tokens[i]])) for i in np.flatnonzero(counts)):
        raise data_mod.DataError(data, "no words found, only punctuation, symbols or spaces")
    seen = {tokens[i]: int(counts[i]) for i in np.flatnonzero(counts)}
    if config.get("mode") == "bpe":
        vocab = Vocabulary(seed[len(SPECIAL_TOKENS):], seen)
    else:
        vocab = Vocabulary.from_counts(seen, min_count=min_count, max_size=max_vocab)
    final = np.array([vocab.token_to_id(token) for token in tokens], dtype=np.int64)
    dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
    # Plain reads and writes, not memory maps: the pages of a mapped 4 GB spill count as this process's
    # resident memory (6.6 GB peak for 1 GB of text in char mode), those of a file read in blocks do not.
    with open(work / "spill.bin", "rb") as spilled, open(work / TOKENS, "wb") as out:
        while (block := np.fromfile(spilled, dtype=np.int32, count=MAP_IDS)).size:
            out.write(final[block].astype(dtype).tobytes())
    (work / "spill.bin").unlink()
    vocab.save(work / "vocab.pkl")
    manifest = {
        "format": FORMAT, "version": VERSION, "file": os.path.abspath(data), "file_sha256": scan.sha256,
        "data_sha256": text_sha256, "bytes": scan.size, "characters": total, "settings": settings,
        "tokenizer": tokenizer.get_config(), "dtype": np.dtype(dtype).name, "train_tokens": lengths[0],
        "val_tokens": lengths[1], "vocab_size": len(vocab), "seconds": round(time.perf_counter() - started, 3),
        "workers": processes,
    }
    from llm_unitscale.files import atomic_write_json

    atomic_write_json(work / MANIFEST, manifest)
    return manifest


def bpe_sample(train_tasks: list) -> list:
    """The chunks the BPE is trained on: all of them up to :data:`BPE_SAMPLE_BYTES`, else that many bytes of
    chunks spread evenly over the training part (merges learnt from a sample of a big corpus are those of the
    whole, and training on all of 1 GB would take longer than encoding it)."""
    sizes = [end - start for start, end, _, _ in train_tasks]
    if sum(sizes) <= BPE_SAMPLE_BYTES:
        return train_tasks
    count = max(1, round(len(train_tasks) * BPE_SAMPLE_BYTES / sum(sizes)))
    picks = np.unique(np.linspace(0, len(train_tasks) - 1, count).round().astype(int))
    return [train_tasks[i] for i in picks]


def _training_lines(data: str, tasks: list, encoding: str, errors: str) -> Iterator[str]:
    """The lines of the training part, one chunk in memory at a time (what the BPE trainer reads)."""
    for start, end, a, b in tasks:
        yield from _read_chunk(data, start, end, encoding, errors)[a:b].split("\n")
