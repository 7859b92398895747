"""The one writer of a run folder: claim ``--out``, train inside ``.NAME.partial/``, publish it whole.

``with RunWriter(out, overwrite, resume) as writer: … writer.publish()`` (what ``training.train`` does):

1. **Claim.** ``out`` must be absent, an empty folder, or an earlier run of ours (``runs.is_run_folder``),
   which is replaced only with ``--overwrite`` (or ``--resume``). A user's file or folder at ``out`` — the
   data file itself, say — is refused whatever the options (``files.OutputError``, exit status 2), and so is
   a symbolic link. An interrupted run waiting in ``.NAME.partial/`` is continued with ``--resume`` and
   discarded only with ``--overwrite``.
2. **Lock.** ``.NAME.lock`` beside the partial folder is held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` from
   the claim to the end, and holds the owner's pid: a second trainer into the same ``out`` fails at once
   (``"runs/x: another training (pid 1234) is writing this run folder; …"``). The kernel drops a flock when
   its process dies, so the lock of a killed run (its file still naming a dead pid) is simply taken over.
   On a file system without flock the pid in the file decides (alive: busy; dead: taken over).
3. **Publish.** ``files.replace_folder`` swaps the complete partial folder in with one atomic exchange, so a
   reader sees the old run or the new one — and, under the lock, never a mix of two runs.
4. **Clean up.** When training stops early the partial folder is kept if it holds a checkpoint (named in the
   message, with the ``--resume`` command) and removed otherwise: a refused run leaves nothing behind. A
   ``KeyboardInterrupt`` or a failed write (``files.WriteError``) is reworded to say which of the two it was.

Under ``MultiWorkerMirroredStrategy`` every worker but the chief trains in its own ``.NAME.partial-worker-I/``
(its checkpoints are what its ``--resume`` restores) under its own lock, and publishes its copy only where the
chief does not write (``--out`` on a disk of its own); on a shared ``--out`` the chief's run is the one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

from llm_unitscale import files, runs

LOCK_SUFFIX = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on ``path`` (a small file holding the owner's pid)."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``runs.RunError`` naming the process that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise runs.RunError(f"{self.label}: cannot create the lock file {self.path} "
                                    f"({(exc.strerror or str(exc)).lower()})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise self._busy(owner) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                owner = self._owner(fd)  # no flock here: the recorded pid decides
                if owner and owner != os.getpid() and _alive(owner):
                    os.close(fd)
                    raise self._busy(owner) from None
            # The previous holder unlinks the file when it is done: a lock on an unlinked inode locks nothing.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: the next owner then creates a fresh file
        os.close(self.fd)
        self.fd = None

    def _busy(self, owner: int | None) -> runs.RunError:
        who = f"another training (pid {owner})" if owner else "another training"
        return runs.RunError(f"{self.label}: {who} is writing this run folder; wait for it to finish or "
                             "choose another --out")

    @staticmethod
    def _owner(fd: int) -> int | None:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_step(work: Path) -> int | None:
    """The step of the resumable checkpoint in ``work``, or None when there is none."""
    try:
        state = json.loads((work / "checkpoints" / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not state.get("weights"):
        return None
    return int(state.get("step", 0))


class RunWriter:
    """Claim ``out`` for one training run, hold its lock, and publish or clean up (module docstring).

    ``worker``: this process's index among the writing workers of a multi-worker run (0: the chief, or a
    single process).
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                 log: TextIO = sys.stderr, worker: int = 0) -> None:
        self.out = Path(out)
        self.target = Path(os.path.abspath(out))
        if self.target == Path(self.target.anchor):
            raise files.OutputError(f"{out}: is the root folder; choose a run folder under it")
        self.overwrite, self.resume, self.log, self.worker = overwrite, resume, log, worker
        suffix = f"-worker-{worker}" if worker else ""
        self.work = runs.partial_dir(self.out).with_name(runs.partial_dir(self.out).name + suffix)
        self.checkpoints = self.work / "checkpoints"
        self.created = False
        self.published = False
        self._lock = RunLock(self.target.with_name(f".{self.target.name}{suffix}{LOCK_SUFFIX}"), str(out))

    # ------------------------------------------------------------------------------------------------- claim
    def __enter__(self) -> RunWriter:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = next((str(d) for d in reversed(self.out.parents) if d.exists() and not d.is_dir()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc)).lower()
            raise runs.RunError(f"{self.out}: cannot write the run folder ({reason})") from exc
        self._lock.acquire()
        try:
            self._claim()
        except BaseException:
            if self.created:
                shutil.rmtree(self.work, ignore_errors=True)
            self._lock.release()
            raise
        return self

    def _claim(self) -> None:
        hint = "choose another --out"
        exists = files.check_replaceable(self.target, self._replaceable, "a run folder", hint)
        earlier_run = exists and runs.is_run_folder(self.target)
        waiting = files.check_replaceable(self.work, self._replaceable, "an interrupted run", "move it away")
        step = checkpoint_step(self.work) if waiting else None
        if self.worker == 0 and earlier_run:
            if self.resume and not waiting:
                raise runs.RunError(f"{self.out}: this run is complete, there is nothing to resume; "
                                    "pass --overwrite to train it again")
            if not (self.overwrite or self.resume):
                raise runs.RunError(f"{self.out}: a run already exists here; pass --overwrite to replace it")
        if waiting and self.resume:
            if not (self.work / runs.MARKER).exists():
                runs.write_marker(self.work)
            return
        if step is not None and not self.overwrite:
            raise runs.RunError(f"{self.out}: an interrupted run waits in {self.work} (checkpoint at step {step}); "
                                "pass --resume to continue it or --overwrite to start afresh")
        if self.resume:
            print(f"{self.out}: no interrupted run to resume, starting a new one", file=self.log)
        if waiting:
            shutil.rmtree(self.work)
        try:
            self.work.mkdir()
            self.created = True
            runs.write_marker(self.work)
        except (OSError, files.WriteError) as exc:
            reason = exc.reason if isinstance(exc, files.WriteError) else (exc.strerror or str(exc)).lower()
            raise runs.RunError(f"{self.out}: cannot write the run folder ({reason})") from exc

    @staticmethod
    def _replaceable(path: Path) -> bool:
        """An earlier run (or interrupted run) of ours, or an empty folder."""
        return runs.is_run_folder(path) or (path.is_dir() and not any(path.iterdir()))

    # ----------------------------------------------------------------------------------------------- publish
    def publish(self) -> None:
        """Move the finished partial folder to ``out`` in one step.

        Another worker's copy goes to ``out`` only where no one else writes it (its lock is free: separate disks,
        or separate ``--out`` paths) and no run is there yet (or ``--overwrite``); otherwise it is dropped, as
        the chief publishes the same weights."""
        main_lock = None
        if self.worker:
            main_lock = RunLock(self.target.with_name(f".{self.target.name}{LOCK_SUFFIX}"), str(self.out))
            try:
                main_lock.acquire()
            except runs.RunError:
                main_lock = None
            if main_lock is None or (runs.is_run_folder(self.target) and not (self.overwrite or self.resume)):
                shutil.rmtree(self.work, ignore_errors=True)
                self.published = True
                if main_lock is not None:
                    main_lock.release()
                return
        try:
            files.check_replaceable(self.target, self._replaceable, "a run folder", "choose another --out")
            with files.writing("the run folder", self.out):
                files.replace_folder(Path(os.path.abspath(self.work)), self.target)
            self.published = True
            for stale in (self.target / "checkpoints").glob("*"):  # the published model.keras supersedes them
                stale.unlink()
        finally:
            if main_lock is not None:
                main_lock.release()

    # ------------------------------------------------------------------------------------------------- close
    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        try:
            replacement = self._stopped(exc) if exc is not None else None
            if exc is None and not self.published and self.created:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._lock.release()
        if replacement is not None and replacement is not exc:
            raise replacement from exc
        return False

    def _stopped(self, exc: BaseException) -> BaseException | None:
        """Keep a resumable partial folder, remove any other we created; reword interrupts and write failures."""
        from llm_unitscale.checkpoint import TrainingInterrupted

        if self.published:
            return None  # the run is complete and in place
        step = checkpoint_step(self.work) if self.work.is_dir() else None
        if step is None and self.created:
            shutil.rmtree(self.work, ignore_errors=True)
        kept = f"the last checkpoint (step {step}) is kept in {self.checkpoints}" if step is not None else None
        if isinstance(exc, KeyboardInterrupt):
            if kept:
                return TrainingInterrupted(f"interrupted; {kept}")
            return TrainingInterrupted("interrupted before the first checkpoint; nothing was kept", resumable=False)
        if isinstance(exc, TrainingInterrupted | FloatingPointError):
            return None
        if not isinstance(exc, files.WriteError):
            reason = files.write_failure(exc)
            if reason is None:
                return None
            exc = files.WriteError(reason, "the run folder")
        exc.where = self.out
        exc.note = kept or "nothing was kept"
        exc.resumable = kept is not None
        return exc
