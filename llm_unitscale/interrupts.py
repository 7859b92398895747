"""Ctrl-C before a command has started: one line and exit status 130, not a traceback from inside TensorFlow.

The commands catch ``KeyboardInterrupt`` themselves (``cli._guard``), but ``import llm_unitscale`` — mostly
TensorFlow's import, 2–4 s — runs before any command code (``python -m llm_unitscale.train``, the console
scripts and the root scripts all import the package first). :func:`report_uncaught` sets ``sys.excepthook`` so
that an *uncaught* ``KeyboardInterrupt`` prints one line on stderr and ends the process with status 130; any
other exception goes to the hook that was there before. The package sets it only when its own import is
interrupted (a program that catches that interrupt sees no difference), the commands when they start.

A Ctrl-C that lands while Python runs a destructor or a callback (TensorFlow runs many) raises its
``KeyboardInterrupt`` there, where Python prints it and carries on: the interrupt is lost. Loops that must stop
on Ctrl-C (``predict.py`` answering line after line) use :func:`sticky_interrupt`, which also remembers it; so
does the package's own import, where a Ctrl-C inside numpy's import comes out as an ``ImportError``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

MESSAGE = "interrupted while starting up; nothing was written"


def report_uncaught(message: str = MESSAGE) -> None:
    """Make an uncaught KeyboardInterrupt print ``message`` and exit with status 130 (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_llm_unitscale", False):
        return

    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            previous(kind, value, traceback)
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        try:
            print(message, file=sys.stderr, flush=True)
        finally:
            os._exit(130)  # the hook runs as the interpreter unwinds: a SystemExit here would be a second error

    hook._llm_unitscale = True  # type: ignore[attr-defined]
    sys.excepthook = hook


@contextlib.contextmanager
def sticky_interrupt() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual and is remembered; the yielded ``check()`` raises it again
    at a safe point if the first one was swallowed (raised inside a destructor) or turned into another error
    (numpy's import turns one that lands inside it into an ``ImportError``).

    Only where Python's own Ctrl-C handler is in place, in the main thread: a program that ignores SIGINT (a
    background job) or handles it itself keeps its handler, and ``check()`` then does nothing.
    """
    caught = threading.Event()

    def handler(signum: int, frame: object) -> None:
        caught.set()
        raise KeyboardInterrupt

    def check() -> None:
        if caught.is_set():
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield check
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
