"""Reading corpora, detecting the task, splitting, and ``tf.data`` input pipelines.

This module is the I/O edge for training data. It never guesses silently: every
problem with an input file is a :class:`DataError` whose message is one line of
the form ``"PATH: problem"`` (the CLI prints it and exits with status 2).

File formats
------------
* **Language modelling** (``task="lm"``): any UTF-8 text. Lines are not special.
* **Classification** (``task="classify"``): one example per line, either
  fastText style ``__label__pos some text`` (several leading ``__label__``
  prefixes are allowed; the first one is the label, the others are dropped) or
  ``pos<TAB>some text`` where the part before the first TAB is a short label
  without whitespace (at most :data:`MAX_TAB_LABEL_CHARS` characters).

:func:`detect_task` decides between the two: ``"classify"`` when at least
:data:`CLASSIFY_THRESHOLD` (90 %) of the non-blank lines carry a label, ``"lm"``
when none does, and an error for anything in between (pass ``--task`` to
override detection).

Pipelines
---------
TensorFlow is imported lazily (only by the functions that build datasets, such as
:func:`classify_dataset`) so that reading and validating a file, or ``--help``,
stays fast.

* :func:`lm_train_batches` samples a language model's training windows at
  uniformly random start offsets, batch ``k`` a pure function of ``k`` and the
  seed (``tf.random.stateless_uniform``), so a resumed run sees the batches an
  uninterrupted one sees; the windows are copied out of the ids (a memory map
  for a prepared corpus) by :func:`window_reader`.
* :func:`lm_eval_batches` gives the non-overlapping windows of
  :func:`lm_windows` for evaluation, in order, keeping the last partial batch.
* :func:`classify_dataset` and :func:`classify_train_batches` pad each batch
  with ``pad_id`` (0: models build their mask as ``x != 0``) to the length of
  its own longest example, and truncate longer ones to their **first**
  ``max_len`` tokens (the beginning of a review or a sentence usually carries
  its topic). Training batches are bucketed by length
  (:func:`classify_batch_plan`), so little of each batch is padding.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - import for annotations only
    import tensorflow as tf

__all__ = [
    "CLASSIFY_THRESHOLD",
    "MAX_TAB_LABEL_CHARS",
    "DataError",
    "classify_batch_plan",
    "classify_dataset",
    "classify_ids",
    "classify_steps_per_epoch",
    "classify_split",
    "corpus_hash",
    "detect_task",
    "label_counts",
    "lm_eval_batches",
    "lm_steps_per_epoch",
    "lm_train_batches",
    "classify_train_batches",
    "line_pieces",
    "lm_split",
    "lm_windows",
    "parse_labelled",
    "parse_labelled_line",
    "read_head",
    "read_text",
    "window_reader",
]

logger = logging.getLogger(__name__)

#: Fraction of non-blank lines that must be labelled for :func:`detect_task` to say "classify".
CLASSIFY_THRESHOLD = 0.9
#: Longest label accepted in the ``label<TAB>text`` format.
MAX_TAB_LABEL_CHARS = 40

_FASTTEXT_PREFIX = "__label__"
_FASTTEXT_RE = re.compile(r"^((?:__label__\S*\s*)+)(.*)$", re.DOTALL)
_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A problem with an input file, reported as one line ``"PATH: problem"``.

    ``DataError(path, problem)`` builds the message from its parts;
    ``DataError(message)`` takes a finished message (used where the caller adds
    the path itself, as :func:`detect_task` does without its ``path``
    argument). The parts are kept as :attr:`path` (``None`` when not given) and
    :attr:`problem`.
    """

    def __init__(self, path_or_message: object, problem: str | None = None) -> None:
        if problem is None:
            self.path: str | None = None
            self.problem = _one_line(str(path_or_message))
            message = self.problem
        else:
            raw_path = path_or_message
            self.path = (
                os.fspath(raw_path)
                if isinstance(raw_path, os.PathLike)
                else str(raw_path)
            )
            self.problem = _one_line(problem)
            message = f"{self.path}: {self.problem}"
        super().__init__(message)


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


# --------------------------------------------------------------------------- reading


def read_text(
    path: str | os.PathLike[str], encoding: str = "utf-8", errors: str = "strict"
) -> str:
    """Read a text file, validate it and return its text with ``\\n`` line ends.

    A UTF-8 byte-order mark is removed and CRLF / CR line ends become ``\\n``. The path is checked with
    ``stat`` first (``files.input_problem``: a symbolic-link loop is named as such); a FIFO or ``/dev/stdin``
    is read like a file. A large file is read in pieces with a sign of life on stderr (``progress``).

    Args:
        path: the file to read.
        encoding: any codec Python knows (default UTF-8).
        errors: ``"strict"`` (default) rejects undecodable bytes; ``"replace"``
            or ``"ignore"`` accept them (the CLI's ``--errors`` option).

    Raises:
        DataError: ``"PATH: problem"`` when the file is missing, is a directory,
            cannot be read, is empty or whitespace only, looks binary (contains
            NUL bytes; UTF-16 files are recognised and named as such), or is not
            valid in ``encoding`` (the message gives the line number and byte
            offset of the first bad byte and suggests ``--errors replace``), or
            when ``encoding`` / ``errors`` are unknown.
    """
    from llm_unitscale.files import input_problem

    name = os.fspath(path)
    problem = input_problem(name, kind="text file")
    if problem:
        raise DataError(name, problem)
    try:
        raw = _read_bytes(name)
    except OSError as exc:
        raise DataError(name, f"cannot read file: {exc.strerror or exc}") from exc
    if not raw:
        raise DataError(name, "file is empty")

    text = decode_text(raw, name, encoding, errors)
    if not text.strip():
        raise DataError(name, "file contains only whitespace")
    return text


def decode_text(raw: bytes | bytearray, name: str, encoding: str = "utf-8", errors: str = "strict",
                first: bool = True, line: int = 1, offset: int = 0) -> str:
    """Validate and decode bytes of ``name`` (the whole file, or a piece of it that ends at a line break) into
    text with ``\\n`` line ends: :func:`read_text`'s checks and messages. ``first``: the piece starts the file
    (a byte-order mark is removed); ``line`` and ``offset``: the line number and byte offset in the file where
    the piece starts, for the message of a NUL byte or an undecodable byte.

    Raises:
        DataError: see :func:`read_text` (every problem but an empty or whitespace-only file).
    """
    codec = _codec_name(name, encoding)
    try:
        codecs.lookup_error(errors)
    except LookupError as exc:
        raise DataError(name, f"unknown --errors handler {errors!r}") from exc
    wide = codec.startswith(("utf_16", "utf_32"))
    if not wide and b"\x00" in raw:
        if first and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(
                name,
                "looks like UTF-16 text (byte-order mark found); pass --encoding utf-16",
            )
        at = raw.index(b"\x00")
        nul_line = line + raw.count(b"\n", 0, at)
        raise DataError(
            name,
            f"looks like a binary file (NUL byte at line {nul_line}, "
            f"byte offset {offset + at}); expected a text file",
        )
    skipped = offset  # bytes before ``raw`` (and of a UTF-8 BOM removed), to report offsets in the file
    if first and codec in ("utf_8", "utf_8_sig") and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
        skipped += len(_UTF8_BOM)
    try:
        text = raw.decode(encoding, errors)
    except UnicodeDecodeError as exc:
        bad_line = line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1)
        raise DataError(
            name,
            f"invalid {encoding} at line {bad_line} (byte offset {exc.start + skipped}, "
            f"byte {column} of the line: "
            f"{exc.reason}); fix the file, pass --encoding, or pass --errors replace",
        ) from exc
    if first:
        text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


#: How much of a file ``--task auto`` reads to tell a language-model corpus from a classifier's lines.
HEAD_BYTES = 4 * 1024 * 1024


def read_head(path: str | os.PathLike[str], encoding: str = "utf-8", errors: str = "strict",
              max_bytes: int = HEAD_BYTES) -> str:
    """The text of the whole lines in the first ``max_bytes`` of a regular file (all of it when it is no
    larger, or when the encoding's line break is not the byte ``\\n``), checked as :func:`read_text` does."""
    name = os.fspath(path)
    size = os.path.getsize(name) if os.path.isfile(name) else None
    if size is None or size <= max_bytes or _codec_name(name, encoding).startswith(("utf_16", "utf_32")):
        return read_text(name, encoding, errors)
    try:
        with open(name, "rb") as handle:
            raw = handle.read(max_bytes)
    except OSError as exc:
        raise DataError(name, f"cannot read file: {exc.strerror or exc}") from exc
    end = raw.rfind(b"\n") + 1
    return decode_text(raw[: end or len(raw)], name, encoding, errors)


#: Bytes read at a time, so that a large file shows progress (``progress.Progress``).
READ_CHUNK = 16 * 1024 * 1024


def _read_bytes(name: str) -> bytes | bytearray:
    """The whole file, read ``READ_CHUNK`` bytes at a time into one buffer, with progress on stderr."""
    from llm_unitscale.progress import Progress

    with open(name, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size if os.path.isfile(name) else 0
        progress = Progress(f"reading {name}", size or None, "bytes")
        if size:
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            while done < size and (n := handle.readinto(view[done : done + READ_CHUNK])):
                done += n
                progress.update(done)
            view.release()
            del buffer[done:]  # the file may have shrunk since it was measured ...
            buffer += handle.read()  # ... or grown
            progress.close()
            return buffer
        pieces, done = [], 0
        while piece := handle.read(READ_CHUNK):
            pieces.append(piece)
            done += len(piece)
            progress.update(done)
        progress.close()
        return b"".join(pieces)


def _codec_name(path: str, encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name.replace("-", "_")
    except LookupError as exc:
        raise DataError(path, f"unknown encoding {encoding!r}") from exc


# --------------------------------------------------------------------------- labels and task


#: Longest piece of a line handed to the tokenizer at once (a very long line is split at a space before this).
PIECE_CHARS = 32768


def line_pieces(line: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Split a line into pieces of at most ``max_chars`` characters, at the last whitespace before the limit
    when there is one, so that a file that is one multi-megabyte line is tokenised (and fed to Word2Vec, which
    truncates sentences at 10,000 words) piece by piece."""
    pieces, start = [], 0
    while len(line) - start > max_chars:  # positions, not slices of the rest: linear in the line's length
        end = start + max_chars
        cut = max(line.rfind(" ", start, end), line.rfind("\t", start, end))
        cut = cut + 1 if cut > start else end
        pieces.append(line[start:cut])
        start = cut
    pieces.append(line[start:])
    return pieces


def parse_labelled_line(line: str) -> tuple[str, str] | None:
    """Split one classification line into ``(label, text)``, or ``None`` if it has no label.

    ``"__label__pos some text"`` gives ``("pos", "some text")`` (fastText; with
    several leading ``__label__`` prefixes the first is the label and the
    others are dropped). ``"pos\\tsome text"`` gives ``("pos", "some text")``
    when the part before the first TAB is a label of at most
    :data:`MAX_TAB_LABEL_CHARS` characters without whitespace. The text is
    stripped and may be empty (``"__label__pos"`` gives ``("pos", "")``).
    """
    stripped = line.strip()
    if not stripped:
        return None
    if stripped.startswith(_FASTTEXT_PREFIX):
        match = _FASTTEXT_RE.match(stripped)
        if match is not None:
            first = match.group(1).split()[0][len(_FASTTEXT_PREFIX) :]
            if first:
                return first, match.group(2).strip()
        return None
    label, tab, text = line.lstrip(" \n\r").partition("\t")
    label = label.strip()
    if (
        tab
        and label
        and len(label) <= MAX_TAB_LABEL_CHARS
        and not any(ch.isspace() for ch in label)
    ):
        return label, text.strip()
    return None


def detect_task(lines: list[str], path: str | os.PathLike[str] | None = None) -> str:
    """Return ``"classify"`` or ``"lm"`` from the lines of a corpus.

    ``"classify"`` when at least :data:`CLASSIFY_THRESHOLD` (90 %) of the
    non-blank lines are labelled (see :func:`parse_labelled_line`; the number of
    distinct labels is not checked here), ``"lm"`` when no line is labelled (or
    there is no non-blank line).

    Raises:
        DataError: (a ``ValueError``) for a mix, naming the counts and the first
            labelled and first unlabelled line. Its message starts with
            ``"PATH: "`` when ``path`` is given; otherwise the caller adds it.
    """
    labelled = 0
    total = 0
    first_labelled: int | None = None
    first_plain: int | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        total += 1
        if parse_labelled_line(line) is not None:
            labelled += 1
            if first_labelled is None:
                first_labelled = number
        elif first_plain is None:
            first_plain = number
    if labelled == 0:
        return "lm"
    if labelled >= CLASSIFY_THRESHOLD * total:
        return "classify"
    problem = (
        f"cannot tell the task: {labelled} of {total} non-blank lines "
        f"({100.0 * labelled / total:.1f} %) carry a label (e.g. line {first_labelled}) "
        f"and {total - labelled} do not (e.g. line {first_plain}); a classification file needs "
        f"'__label__NAME text' or 'NAME<TAB>text' on at least "
        f"{CLASSIFY_THRESHOLD:.0%} of its lines, "
        "a language-model file on none; fix the file or pass --task"
    )
    if path is None:
        raise DataError(problem)
    raise DataError(path, problem)


def parse_labelled(lines: list[str]) -> tuple[list[str], list[str]]:
    """Parse classification lines into ``(labels, texts)``.

    Blank lines are skipped, and so are lines without a label or with an empty
    text (:func:`detect_task` allows up to 10 % of such lines; their number is
    logged as a warning).
    """
    labels: list[str] = []
    texts: list[str] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        parsed = parse_labelled_line(line)
        if parsed is None or not parsed[1]:
            skipped += 1
            continue
        labels.append(parsed[0])
        texts.append(parsed[1])
    if skipped:
        logger.warning(
            "skipped %d non-blank line(s) without a label or without text", skipped
        )
    return labels, texts


# --------------------------------------------------------------------------- language modelling


def _as_ids(ids: np.ndarray) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"token ids must be a 1-D array, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
    return array


def lm_split(
    ids: np.ndarray, val_fraction: float = 0.1, seq_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into ``(train, validation)``: validation is the held-out tail.

    The two results are disjoint contiguous slices (``ids[:k]`` and ``ids[k:]``), so
    no window ever crosses the split. The validation part gets
    ``round(len(ids) * val_fraction)`` tokens, raised to at least ``seq_len + 1``
    (one full window) when ``seq_len`` is given, while the training part keeps at
    least one window too. ``val_fraction=0`` returns an empty validation array.

    Raises:
        ValueError: if ``val_fraction`` is outside ``[0, 1)`` or the corpus is
            shorter than two windows (``2 * (seq_len + 1)`` tokens; 4 tokens
            without ``seq_len``), saying how many tokens are needed.
    """
    array = _as_ids(ids)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(array)
    window = (seq_len if seq_len is not None else 1) + 1
    if val_fraction == 0.0:
        if n < window:
            raise ValueError(
                f"the corpus has {n} tokens; at least {window} are needed for one window"
            )
        return array, array[n:]
    if n < 2 * window:
        of_len = f" of seq_len {seq_len}" if seq_len is not None else ""
        raise ValueError(
            f"the corpus has {n} tokens; at least {2 * window} are needed for one "
            f"training and one validation window{of_len} (use a longer text or a "
            "smaller --seq-len)"
        )
    n_val = max(round(n * val_fraction), window)
    n_val = min(n_val, n - window)
    return array[: n - n_val], array[n - n_val :]


def lm_windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping next-token windows ``x, y`` of shape ``(n, seq_len)``.

    Window ``i`` covers ``ids[i*seq_len : i*seq_len + seq_len + 1]``; ``x`` is its
    first ``seq_len`` tokens and ``y`` the same shifted by one
    (``y[i, t] == x[i, t + 1]``), so consecutive windows share one token and
    every token but the first is a target exactly once:
    ``n = (len(ids) - 1) // seq_len``. Built with numpy's
    ``sliding_window_view(ids, seq_len + 1)[::seq_len]`` and returned as
    contiguous, writable copies of the input dtype.

    Raises:
        ValueError: if ``seq_len < 1`` or there are fewer than ``seq_len + 1`` tokens.
    """
    array = _as_ids(ids)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(array) < seq_len + 1:
        raise ValueError(
            f"{len(array)} tokens are too few for one window of seq_len {seq_len} "
            f"(need {seq_len + 1})"
        )
    windows = np.lib.stride_tricks.sliding_window_view(array, seq_len + 1)[::seq_len]
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def lm_steps_per_epoch(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """Training steps per epoch: ``num_tokens // seq_len`` windows in whole batches, at least one."""
    return max(1, (num_tokens // seq_len) // batch_size)


#: Batches each dataset here keeps ready ahead of the training step.
PREFETCH = 2


def prefetched(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` prefetching :data:`PREFETCH` batches, with tf.data's autotuner switched off.

    Why not ``prefetch(tf.data.AUTOTUNE)``: the autotuner runs a model thread that sleeps for up to a minute
    between optimisation rounds, and destroying an iterator waits for that thread to wake. Measured with
    TensorFlow 2.21 on a loaded 2-core machine: in 2 of 4 runs, 36–37 s passed between the last training step
    and the return of ``model.fit`` (gdb: ``RootDataset::Iterator::~Iterator`` waiting in
    ``Model::OptimizeLoop``). The batches here are a gather or a slice, so a fixed pipeline costs nothing.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(PREFETCH).with_options(options)


def window_reader(ids: np.ndarray, seq_len: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """``read(starts)``: the int32 windows ``ids[s : s + seq_len + 1]`` for a 1-D int64 tensor of start offsets,
    copied out of ``ids`` by NumPy (``tf.numpy_function``), so ``ids`` — a ``numpy.memmap`` of a corpus of
    gigabytes — is never copied whole into a tensor: only the pages under the windows are read."""
    import tensorflow as tf

    array = _as_ids(ids)
    span = np.arange(seq_len + 1, dtype=np.int64)

    def gather(starts: np.ndarray) -> np.ndarray:
        return array[starts[:, None] + span[None, :]].astype(np.int32)

    def read(starts: tf.Tensor) -> tf.Tensor:
        windows = tf.numpy_function(gather, [starts], tf.int32, stateful=False)
        return tf.ensure_shape(windows, [None, seq_len + 1])

    return read


def lm_train_batches(
    ids: np.ndarray, seq_len: int, batch_size: int, seed: int, start_step: int, stop_step: int
) -> tf.data.Dataset:
    """Training batches ``start_step … stop_step − 1`` of a language model, each a pure function of its step.

    Batch ``k`` holds ``batch_size`` windows of ``seq_len + 1`` tokens starting at offsets drawn by
    ``tf.random.stateless_uniform(seed=[k, seed])`` — uniform over the corpus — so a run resumed at step ``k``
    sees exactly the batches an uninterrupted run sees.
    Yields ``(x, y)`` int32 of shape ``(batch_size, seq_len)``, ``y`` shifted by one token. The windows are
    read from ``ids`` (a memory map for a prepared corpus) by :func:`window_reader`.
    """
    import tensorflow as tf

    if len(ids) < seq_len + 1:
        raise ValueError(f"{len(ids)} tokens are too few for one window of seq_len {seq_len}")
    read = window_reader(ids, seq_len)
    max_start = len(ids) - seq_len - 1

    def make_batch(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        starts = tf.random.stateless_uniform([batch_size], seed=tf.stack([step, tf.constant(seed, tf.int64)]),
                                             minval=0, maxval=max_start + 1, dtype=tf.int64)
        windows = tf.ensure_shape(read(starts), [batch_size, seq_len + 1])
        return windows[:, :-1], windows[:, 1:]

    steps = tf.data.Dataset.range(start_step, stop_step)
    return prefetched(steps.map(make_batch, deterministic=True))


def lm_eval_batches(ids: np.ndarray, seq_len: int, batch_size: int) -> tf.data.Dataset:
    """The non-overlapping windows of :func:`lm_windows` in order, ``batch_size`` at a time (the last batch
    partial), read from ``ids`` batch by batch (:func:`window_reader`): evaluation in bounded memory. Every
    token after the first is scored exactly once, up to the final incomplete window.

    Raises:
        ValueError: for ``seq_len < 1``, ``batch_size < 1``, fewer than ``seq_len + 1`` tokens, or an id
            outside ``[0, 2**31)``.
    """
    import tensorflow as tf

    ids = _as_ids(ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"{len(ids)} tokens are too few for one window of seq_len {seq_len} (need {seq_len + 1})")
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise ValueError("token ids must lie in [0, 2**31)")
    windows = (len(ids) - 1) // seq_len
    read = window_reader(ids, seq_len)

    def make_batch(first: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        starts = tf.range(first, tf.minimum(first + batch_size, windows), dtype=tf.int64) * seq_len
        batch = read(starts)
        return batch[:, :-1], batch[:, 1:]

    firsts = tf.data.Dataset.range(0, windows, batch_size)
    return prefetched(firsts.map(make_batch, deterministic=True))


# --------------------------------------------------------------------------- classification


def classify_split(
    labels: list[str], texts: list[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Stratified split into ``((train_labels, train_texts), (val_labels, val_texts))``.

    Each class puts ``round(count * val_fraction)`` randomly chosen examples into
    validation, at least one when it has two or more examples and never all of
    them (a single-example class stays in training). Both parts keep the
    original order of the examples. Deterministic for ``seed``.

    Raises:
        ValueError: if the lists differ in length or ``val_fraction`` is outside ``[0, 1)``.
    """
    if len(labels) != len(texts):
        raise ValueError(f"{len(labels)} labels but {len(texts)} texts")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    val_mask = np.zeros(len(labels), dtype=bool)
    if val_fraction > 0.0:
        for label in sorted(by_label):
            indices = np.asarray(by_label[label])
            count = len(indices)
            if count < 2:
                continue
            k = min(max(round(count * val_fraction), 1), count - 1)
            val_mask[rng.permutation(indices)[:k]] = True
    train = (
        [labels[i] for i in np.flatnonzero(~val_mask)],
        [texts[i] for i in np.flatnonzero(~val_mask)],
    )
    val = (
        [labels[i] for i in np.flatnonzero(val_mask)],
        [texts[i] for i in np.flatnonzero(val_mask)],
    )
    return train, val


#: Bucketing: an epoch's examples are sorted by length within pools of this many batches (see
#: :func:`classify_batch_plan`).
BUCKET_BATCHES = 32


def classify_batch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                        bucket_batches: int = BUCKET_BATCHES) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one training epoch: shuffled, then bucketed by length.

    The examples are permuted with ``np.random.default_rng([seed, epoch])``, cut into pools of
    ``bucket_batches × batch_size``, each pool sorted by length (stable) and cut into batches, and the
    epoch's batches are shuffled again with the same generator. Padding each batch to its own longest
    example then wastes little (BucketIterator-style, torchtext), while the order stays random. At most
    one batch per pool is short. A pure function of its arguments, so a resumed run sees the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def classify_steps_per_epoch(n: int, batch_size: int, bucket_batches: int = BUCKET_BATCHES) -> int:
    """Batches per epoch of :func:`classify_batch_plan` for ``n`` examples."""
    pool = batch_size * bucket_batches
    full, rest = divmod(n, pool)
    return full * bucket_batches + -(-rest // batch_size)


def _ragged(token_ids: list, max_len: int) -> tuple[tf.RaggedTensor, np.ndarray]:
    """The sequences (each cut to its first ``max_len`` ids) as an int32 RaggedTensor, and their lengths."""
    import tensorflow as tf

    rows = [np.asarray(seq[:max_len], dtype=np.int32) for seq in token_ids]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    values = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    return tf.RaggedTensor.from_row_lengths(values, lengths), lengths


def _check_examples(token_ids: list, label_ids: list[int], batch_size: int, max_len: int) -> None:
    if len(token_ids) != len(label_ids):
        raise ValueError(f"{len(token_ids)} token sequences but {len(label_ids)} labels")
    if not len(token_ids):
        raise ValueError("no examples")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def classify_ids(tokenizer: Any, vocab: Any, texts: list[str], max_tokens: int, features: Any = None,
                 token_lines: list[list[str]] | None = None) -> list[Any]:
    """A classifier's input ids for each text: its first ``max_tokens`` tokens' vocabulary ids (``[<unk>]``
    for a text with no token), or with ``features`` (a ``BagOfNgrams``) their bag of n-gram features (empty
    for a text with no token: the model then falls back on its bias, the class prior). ``token_lines``:
    the texts already tokenised."""
    if token_lines is None:
        token_lines = [tokenizer.tokenize(t) for t in texts]
    token_lines = [tokens[:max_tokens] for tokens in token_lines]
    if features is not None:
        return features.encode(token_lines, vocab)
    return [vocab.encode(tokens) or [vocab.unk_id] for tokens in token_lines]


def classify_dataset(
    token_ids: list,
    label_ids: list[int],
    batch_size: int,
    max_len: int,
    shuffle: bool = True,
    seed: int = 0,
    pad_id: int = 0,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of padded ``(x, y)`` int32 batches: ``x`` (batch, L), ``y`` (batch,).

    Each sequence keeps its **first** ``max_len`` ids, and each batch is padded with ``pad_id`` (0 by
    default; models build their mask as ``x != 0``, so id 0 must be reserved for padding) to the length L of
    its own longest sequence. ``shuffle=False`` (evaluation) keeps the examples in order; ``shuffle=True``
    batches one epoch of :func:`classify_batch_plan` (bucketed by length; ``seed``). The last partial batch
    is kept (classification sets are small; no example is dropped). Prefetched by :func:`prefetched`.

    Raises:
        ValueError: for mismatched lengths, an empty input, ``max_len < 1`` or ``batch_size < 1``.
    """
    _check_examples(token_ids, label_ids, batch_size, max_len)
    ragged, lengths = _ragged(token_ids, max_len)
    y = np.asarray(label_ids, dtype=np.int32)
    if shuffle:
        batches = classify_batch_plan(lengths, batch_size, seed, 0)
    else:
        batches = [np.arange(i, min(i + batch_size, len(y))) for i in range(0, len(y), batch_size)]
    return _batches_dataset(ragged, y, batches, pad_id)


def classify_train_batches(
    token_ids: list, label_ids: list[int], batch_size: int, max_len: int, seed: int,
    start_step: int, stop_step: int, pad_id: int = 0,
) -> tf.data.Dataset:
    """Training batches ``start_step … stop_step − 1`` of a classifier, each a pure function of its step.

    With ``S`` = :func:`classify_steps_per_epoch` steps per epoch, step ``k`` is batch ``k mod S`` of
    epoch ``k div S`` of :func:`classify_batch_plan` (shuffled, bucketed by length), padded to its own
    longest sequence as in :func:`classify_dataset`. So a resumed run sees exactly the batches an
    uninterrupted run sees.
    """
    _check_examples(token_ids, label_ids, batch_size, max_len)
    ragged, lengths = _ragged(token_ids, max_len)
    per_epoch = classify_steps_per_epoch(len(lengths), batch_size)
    plans: dict[int, list[np.ndarray]] = {}
    batches = []
    for step in range(start_step, stop_step):
        epoch = step // per_epoch
        if epoch not in plans:
            plans = {epoch: classify_batch_plan(lengths, batch_size, seed, epoch)}
        batches.append(plans[epoch][step % per_epoch])
    return _batches_dataset(ragged, np.asarray(label_ids, dtype=np.int32), batches, pad_id)


def _batches_dataset(ragged: tf.RaggedTensor, y: np.ndarray, batches: list[np.ndarray], pad_id: int
                     ) -> tf.data.Dataset:
    """(x, y) per batch of example indices: x the batch's rows of ``ragged`` padded to their longest."""
    import tensorflow as tf

    width = max((len(b) for b in batches), default=1)
    index = np.full((len(batches), width), -1, dtype=np.int64)
    for row, batch in enumerate(batches):
        index[row, : len(batch)] = batch
    labels = tf.constant(y)

    def make_batch(chosen: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        chosen = chosen[chosen >= 0]
        x = tf.gather(ragged, chosen).to_tensor(default_value=pad_id)
        return tf.ensure_shape(x, [None, None]), tf.gather(labels, chosen)

    dataset = tf.data.Dataset.from_tensor_slices(index)
    return prefetched(dataset.map(make_batch, deterministic=True))


def label_counts(labels: list[str]) -> dict[str, int]:
    """Examples per label, most frequent first (ties by name) -- for logs and error messages."""
    return dict(sorted(Counter(labels).items(), key=lambda item: (-item[1], item[0])))


# --------------------------------------------------------------------------- hashing


def corpus_hash(text: str) -> str:
    """SHA-256 hex digest of the text's UTF-8 bytes, recorded in the run's ``config.json``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
