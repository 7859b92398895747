"""Signs of life on stderr for the long steps before training: reading, tokenising, Word2Vec.

``progress = Progress("tokenising big.txt", total, "characters"); progress.update(done); progress.close()``.
Work that ends within :data:`DELAY` seconds shows nothing (small inputs stay quiet, and one-line errors stay one
line). After that: on a terminal a ``keras.utils.Progbar``, redrawn in place; otherwise (a log file, a pipe)
one line every :data:`EVERY` seconds,
``tokenising big.txt: 12,500,000 of 50,000,000 characters (25%), 1,900,000 characters/s, ETA 20 s``, and a
last line when done. A count in bytes also shows MB/s first; ``extra="tokens"`` adds a second count and its rate
(``update(done, tokens)``): ``..., 3,100,000 tokens (620,000 tokens/s)``. ``LLM_UNITSCALE_PROGRESS_SECONDS`` sets both intervals (the tests use 0).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TextIO

#: Seconds of silence before the first sign of life, and between two lines when stderr is not a terminal.
DELAY = EVERY = 3.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("LLM_UNITSCALE_PROGRESS_SECONDS", EVERY)))
    except ValueError:
        return EVERY


class Progress:
    """Counts and rate of one long loop (see the module docstring); ``total`` None when unknown."""

    def __init__(self, what: str, total: int | None, unit: str, stream: TextIO | None = None,
                 extra: str | None = None) -> None:
        self.what, self.total, self.unit, self.extra = what, total, unit, extra
        self.extra_done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.every = _interval()
        self.started = self.last = time.perf_counter()
        self.done = 0
        self.shown = False
        self._bar = None
        try:
            self._terminal = self.stream.isatty()
        except (AttributeError, ValueError):
            self._terminal = False

    def update(self, done: int, extra: int | None = None) -> None:
        """Record that ``done`` units (and ``extra`` of the second count) are finished (absolute counts); show
        it when it is time."""
        self.done = done
        if extra is not None:
            self.extra_done = extra
        now = time.perf_counter()
        if now - self.last < self.every and (self.shown or now - self.started < self.every):
            return
        self.last = now
        self._show(now)

    def close(self, done: int | None = None) -> None:
        """A last line (or the bar's end) when anything was shown; ``done``: the final count."""
        if done is not None:
            self.done = done
        if self.shown:
            self._show(time.perf_counter(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The text of one progress line."""
        seconds = max(now - self.started, 1e-9)
        of = f" of {self.total:,}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        rate = f"{self.done / seconds:,.0f} {self.unit}/s"
        if self.unit == "bytes":
            rate = f"{self.done / seconds / 1e6:,.1f} MB/s, {rate}"
        if self.extra:
            rate += f", {self.extra_done:,} {self.extra} ({self.extra_done / seconds:,.0f} {self.extra}/s)"
        if final:
            return f"{self.what}: {self.done:,}{of} {self.unit}{share}, {rate}, done in {seconds:.1f} s"
        eta = (f", ETA {(self.total - self.done) * seconds / self.done:,.0f} s"
               if self.total and 0 < self.done < self.total else "")
        return f"{self.what}: {self.done:,}{of} {self.unit}{share}, {rate}{eta}"

    def _show(self, now: float, final: bool = False) -> None:
        self.shown = True
        if not self._terminal:
            print(self.line(now, final), file=self.stream, flush=True)
            return
        import keras

        with contextlib.redirect_stdout(self.stream):  # Progbar writes to stdout: stdout is for results
            if self._bar is None:
                print(f"{self.what} ({self.unit})", file=self.stream)
                self._bar = keras.utils.Progbar(self.total, unit_name=self.unit.rstrip("s") or "step")
            self._bar.update(self.done, finalize=final)

