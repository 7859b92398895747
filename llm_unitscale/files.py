"""Files at the edges: look before reading, never replace what is not ours, and a failed write in one line.

**Reading.** :func:`input_problem` stats a path before it is opened, so a symbolic-link loop, a dangling link,
a missing file, a folder and a file larger than the caller's bound each get their own message before a byte
is read (a 1 GB ``vocab.pkl`` is refused in microseconds, not after reading it). FIFOs and character devices
(``/dev/stdin``, a pipe) pass: they are read like files.

**Replacing.** An output path is created new, or it replaces an earlier output *of ours*, on purpose: a run
folder (``runs.is_run_folder``), a SavedModel export (``serving.is_export``), a PNG whose ``Software`` text
chunk starts with :data:`PNG_SOFTWARE` (every figure is saved with it: :func:`png_metadata`). Anything else —
a user's text file, a folder of their own, a symbolic link — is refused with :class:`OutputError` (exit
status 2) by :func:`check_replaceable`. :func:`replace_folder` swaps a finished folder in with one
``renameat2(RENAME_EXCHANGE)`` where the kernel and file system have it, so a reader sees the old folder or
the new one, never neither and never a mix (elsewhere: two renames, with a moment of neither).

**Writing.** Every file is written to a temporary name in its folder and renamed into place
(:func:`atomic_write_bytes`, :func:`atomic_write_json`, :func:`atomic_copy`): a reader sees the old file or
the new one, never half of one. A full disk (ENOSPC), the file-size limit (EFBIG, ``ulimit -f``:
:func:`ignore_file_size_signal` makes the write fail with EFBIG instead of SIGXFSZ killing the process), a
quota or a read-only file system are not bugs. :func:`writing` turns them — raised by Python (``OSError``) or
by TensorFlow's C++ writers (an ``OpError`` whose message carries the system's error text) — into
:class:`WriteError`: ``"runs/x: no space left on device while writing the checkpoint at step 10"`` (exit
status 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Start of the ``Software`` text chunk of every PNG this package writes (see :func:`png_metadata`).
PNG_SOFTWARE = "llm_unitscale"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: errno → how a write failure reads in a message. These are conditions of the machine, not bugs.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (the file size limit, ulimit -f, was reached)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class OutputError(ValueError):
    """An output path that may not be written (it holds something that is not ours): ``"PATH: problem"``."""


class WriteError(Exception):
    """A write that failed for a reason of the machine (full disk, size limit, quota): exit status 1.

    ``where`` is what the user knows (the run folder, the plot path), ``what`` the file or artefact being
    written, ``note`` what was kept; ``resumable`` says whether ``train.py --resume`` can continue.
    """

    def __init__(self, reason: str, what: str, where: str | os.PathLike | None = None) -> None:
        super().__init__(reason)
        self.reason, self.what, self.where = reason, what, where
        self.note: str | None = None
        self.resumable = False

    def __str__(self) -> str:
        where = f"{self.where}: " if self.where is not None else ""
        return f"{where}{self.reason} while writing {self.what}" + (f"; {self.note}" if self.note else "")


# --------------------------------------------------------------------------------------------------- reading
def human_bytes(size: float) -> str:
    """``1536`` → ``"1.5 KB"`` (powers of 1024, one decimal)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def input_problem(path: str | os.PathLike, max_bytes: int | None = None, kind: str = "file") -> str | None:
    """What stops ``path`` from being read as a ``kind``, or None when nothing does.

    Checked with ``stat`` alone (nothing is opened): ``"no such file"``, ``"a symbolic link loop (too many
    levels of symbolic links)"``, ``"a broken symbolic link (to TARGET)"``, ``"is a directory, not a KIND"``,
    ``"cannot read it (permission denied)"`` and the like. FIFOs and character devices pass, unless
    ``max_bytes`` is given: a file of ours has a size to check, so then only a regular file passes, and only
    up to ``max_bytes`` (``"is 1.0 GB, more than any KIND this package writes (at most 256.0 MB)"``).
    """
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (too many levels of symbolic links)"
        if exc.errno == errno.ENOENT:
            if os.path.islink(name):
                with contextlib.suppress(OSError):
                    return f"a broken symbolic link (to {os.readlink(name)}, which does not exist)"
            return "no such file"
        if exc.errno == errno.ENOTDIR:
            return "no such file (a part of the path is a file, not a folder)"
        return f"cannot read it ({(exc.strerror or str(exc)).lower()})"
    if stat.S_ISDIR(info.st_mode):
        return f"is a directory, not a {kind}"
    if max_bytes is not None and not stat.S_ISREG(info.st_mode):
        return f"is not a regular file (a pipe, device or socket), not a {kind}"
    if max_bytes is not None and info.st_size > max_bytes:
        return (f"is {human_bytes(info.st_size)}, more than any {kind} this package writes (at most "
                f"{human_bytes(max_bytes)}); not a {kind}?")
    return None


# ------------------------------------------------------------------------------------------------- replacing
def png_metadata() -> dict[str, str]:
    """``savefig(..., metadata=png_metadata())``: the mark by which :func:`is_our_png` knows our figures."""
    from llm_unitscale import __version__

    return {"Software": f"{PNG_SOFTWARE} {__version__}"}


def is_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG file (its signature)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == _PNG_SIGNATURE
    except OSError:
        return False


def is_our_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG written by this package (its ``Software`` tEXt chunk; chunk headers only)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return False
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return False
                length, kind = struct.unpack(">I4s", header)
                if kind == b"tEXt" and length <= 4096:
                    key, _, value = handle.read(length).partition(b"\x00")
                    if key == b"Software":
                        return value.decode("latin-1").startswith(PNG_SOFTWARE)
                    handle.seek(4, os.SEEK_CUR)
                elif kind == b"IEND":
                    return False
                else:
                    handle.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return False


def check_replaceable(path: str | os.PathLike, is_ours: Callable[[Path], bool], ours: str, hint: str) -> bool:
    """May an output go to ``path``? False: nothing is there. True: an earlier output of ours is there
    (``is_ours``), to be replaced. Otherwise :class:`OutputError`: ``"PATH: exists and is not OURS; refusing
    to replace it (HINT)"``; a symbolic link is never replaced (what it points to may be anything)."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError(f"{path}: cannot check the output path ({(exc.strerror or str(exc)).lower()})") from exc
    if stat.S_ISLNK(info.st_mode):
        raise OutputError(f"{path}: is a symbolic link; refusing to replace it ({hint})")
    if is_ours(path):
        return True
    what = "a directory" if stat.S_ISDIR(info.st_mode) else "a file"
    raise OutputError(f"{path}: {what} that is not {ours}; refusing to replace it ({hint})")


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system (or kernel) without the exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` (absent, an empty folder, or one the caller checked is
    ours), then delete what was there. ``rename`` never replaces a non-empty folder or a file, so a path that
    changed since the caller's check makes this fail rather than destroy it."""
    if not os.path.lexists(target) or (target.is_dir() and not any(target.iterdir())):
        os.rename(new, target)
    elif _rename_exchange(new, target):
        shutil.rmtree(new)  # it now holds the earlier folder
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- writing
def ignore_file_size_signal() -> None:
    """Past ``ulimit -f`` a write raises SIGXFSZ, whose default action kills the process; ignored, the write
    fails with EFBIG instead and becomes one line (CPython ignores it at start-up already; a library may not)."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def write_failure(exc: BaseException) -> str | None:
    """How a failed write reads (``"no space left on device"``), or None when ``exc`` is not one.

    Follows the exception's causes and recognises an ``OSError`` by errno, anything else (TensorFlow's
    ``OpError`` from its event writers, h5py's errors) by the system's error text in its message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return WRITE_ERRNOS[exc.errno]
        if not isinstance(exc, OSError | KeyboardInterrupt):
            text = str(exc)
            for code, reason in WRITE_ERRNOS.items():
                if code not in (errno.EACCES, errno.EPERM) and os.strerror(code) in text:
                    return reason
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(what: str, where: str | os.PathLike | None = None) -> Iterator[None]:
    """Run a write; a failure of the machine (:func:`write_failure`) becomes ``WriteError(reason, what,
    where)``, anything else passes unchanged. Nested, the outermost ``what`` (the purpose: "the checkpoint at
    step 10") wins over the inner one (a file name: "state.json")."""
    try:
        yield
    except WriteError as exc:
        exc.what = what
        exc.where = where if where is not None else exc.where
        raise
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        raise WriteError(reason, what, where) from exc


# ---------------------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    def copy(handle: Any) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 16 * 1024 * 1024)

    _atomic_write(path, copy)


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    path = Path(path)
    with writing(path.name, path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
