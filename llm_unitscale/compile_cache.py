"""XLA's compiled programs kept between runs: TensorFlow's persistent compilation cache, switched on safely.

A language model's training step (and the decoder of ``predict.py``) is compiled with XLA each run: ≈ 2.5 s of
the character recipe's start-up on 2 cores, the same program every time the model, its shapes and TensorFlow
are the same. The commands (``train.py``, ``predict.py``, ``evaluate.py``) keep the compiled programs in
``<cache>/xla/tf<version>-<cpu>`` — the cache folder of prepared corpora (:func:`prepared.cache_dir`), one
subfolder per TensorFlow version and processor, because a program is machine code for one CPU — and TensorFlow
loads a program instead of compiling it after checking that the whole HLO module matches, not only its hash.
The Python API does not switch it on: ``enable()`` is for programs that own their process.

TensorFlow writes each entry under a temporary name and renames it. It does not recompile an entry it cannot
read: the training step then fails. So before TensorFlow reads any, :func:`enable` deletes every entry that is
not a whole ``XlaSerializedCacheEntry`` (a zero-length file after a power cut, a damaged disk) and temporary
files an hour old (a write that never finished; a younger one may be another process's write in progress), and
leaves the cache off when its folder cannot be written or its disk has less than ``MIN_FREE_BYTES`` free
(TensorFlow's failed write would fail the compilation). Oldest entries go first when the folder holds more than
``MAX_BYTES``. ``LLM_UNITSCALE_XLA_CACHE=0`` switches it off; a ``--tf_xla_persistent_cache_directory``
of your own in ``TF_XLA_FLAGS`` is left alone.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
from pathlib import Path

#: The switch: "0" leaves XLA's cache off.
ENV = "LLM_UNITSCALE_XLA_CACHE"
#: TensorFlow's flag (read at the first XLA compilation, so setting it after ``import tensorflow`` works).
FLAG = "--tf_xla_persistent_cache_directory"
#: The folder is trimmed (oldest entries first) to this size: one entry of the character recipe is 3.2 MB.
MAX_BYTES = 1 << 30
#: Free space needed to switch the cache on: an entry is a few MB, and a failed write fails the compilation.
MIN_FREE_BYTES = 256 << 20
#: A temporary file this old is a write that never finished (another process's write takes milliseconds, and
#: deleting it mid-write would fail that process's compilation).
STALE_SECONDS = 3600.0
#: The fields of TensorFlow's ``XlaSerializedCacheEntry``: key, HLO module, executable.
_ENTRY_FIELDS = {1, 2, 3}


def processor_id() -> str:
    """A short hash of what the compiled code depends on: the CPU's model and instruction-set flags."""
    described = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        described += "".join(dict.fromkeys(lines))  # one core's lines: the others repeat them
    except OSError:
        pass
    return hashlib.sha256(described.encode("utf-8")).hexdigest()[:12]


def folder_for(cache_root: Path, tf_version: str) -> Path:
    """``<cache_root>/xla/tf<version>-<processor>``."""
    return Path(cache_root) / "xla" / f"tf{tf_version}-{processor_id()}"


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def is_whole_entry(path: Path) -> bool:
    """Whether ``path`` parses as protobuf fields 1–3 (each length-delimited) that end exactly at its end, with
    a non-empty executable (field 3): what a truncated or empty file never does. Reads the headers only."""
    size = path.stat().st_size
    seen: set[int] = set()
    with open(path, "rb") as entry:
        at = 0
        while at < size:
            entry.seek(at)
            head = entry.read(20)
            try:
                tag, used = _varint(head, 0)
                length, used = _varint(head, used)
            except ValueError:
                return False
            if tag & 7 != 2 or tag >> 3 not in _ENTRY_FIELDS:
                return False
            seen.add(tag >> 3)
            at += used + length
            if tag >> 3 == 3 and length == 0:
                return False
    return at == size and seen == _ENTRY_FIELDS


def tidy(folder: Path, max_bytes: int = MAX_BYTES) -> None:
    """Delete the entries that are not whole and temporary files older than ``STALE_SECONDS``, then the oldest
    entries while the folder holds more than ``max_bytes``."""
    entries = []
    for path in folder.iterdir():
        try:
            if not path.is_file():
                continue
            stat = path.stat()
            if path.suffix != ".pb":  # TensorFlow's temporary names end in .tmp: a write in progress, or
                if time.time() - stat.st_mtime > STALE_SECONDS:  # one that never finished
                    path.unlink()
                continue
            if not is_whole_entry(path):
                path.unlink()
                continue
        except OSError:
            continue  # gone meanwhile (another process tidying), or unreadable: TensorFlow will not load it
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size


def enable(cache_root: Path, tf_version: str, environ: os._Environ | dict | None = None) -> Path | None:
    """Point TensorFlow's XLA cache at :func:`folder_for` (``TF_XLA_FLAGS``), tidied first; returns the folder,
    or None when it stays off (switched off, the user's own setting, an unwritable folder, a nearly full disk,
    white space in the folder's path).
    Call it before the process's first XLA compilation."""
    environ = os.environ if environ is None else environ
    flags = environ.get("TF_XLA_FLAGS", "")
    if environ.get(ENV, "1") == "0" or FLAG in flags:
        return None
    folder = folder_for(cache_root, tf_version)
    if any(space.isspace() for space in str(folder)):
        return None  # TF_XLA_FLAGS is split at white space
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK) or shutil.disk_usage(folder).free < MIN_FREE_BYTES:
            return None
        tidy(folder)
    except OSError:
        return None
    environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={folder}".strip()
    return folder


def folder_in_use(environ: os._Environ | dict | None = None) -> Path | None:
    """The cache folder ``TF_XLA_FLAGS`` names (ours or the user's), or None."""
    flags = (os.environ if environ is None else environ).get("TF_XLA_FLAGS", "").split()
    return next((Path(flag.split("=", 1)[1]) for flag in flags if flag.startswith(f"{FLAG}=")), None)
