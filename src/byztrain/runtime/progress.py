"""Progress display that suits where the output goes.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (a CI log, `make demo > log`, a notebook cell) a
redrawn bar becomes thousands of carriage-return fragments, so it prints one plain line every `every_s`
seconds instead (and at the end): the count, the caller's fields (loss, accuracy, bans), elapsed time, ETA.
Both offer the part of tqdm's interface the runtime uses: update, set_postfix, write, close.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def on_terminal() -> bool:
    """Whether a redrawn bar would be seen as one: stdout and stderr (tqdm's stream) are both terminals."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, every_s: float = 30.0):
    """A tqdm bar on a terminal, else a PlainProgress printing to stdout."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
    return PlainProgress(total, desc=desc, unit=unit, initial=initial, every_s=every_s)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PlainProgress:
    """A line at the first update, then at most one per `every_s` seconds (0: every update), and one at the
    end; never a carriage return."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        every_s: float = 30.0,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.started = self.last_line = clock()
        self.fields: dict[str, Any] = {}
        self.printed_n: int | None = None  # the count the last line showed
        self.first: tuple[int, float] | None = None  # (count, time) at the first update: the rate starts there

    def set_postfix(self, fields: dict[str, Any] | None = None, refresh: bool = False, **kwargs: Any) -> None:
        self.fields = {**(fields or {}), **kwargs}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.first is None:
            self.first = (self.n, now)  # what came before it (setup, a first evaluation) is no guide to the rate
        if self.printed_n is None or self.n >= self.total or now - self.last_line >= self.every_s:
            self._line(now)

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.printed_n is not None and self.printed_n != self.n:
            self._line(self.clock())  # stopped early: say where

    def line(self, now: float) -> str:
        elapsed = now - self.started
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"{format_duration(elapsed)} elapsed")
        if self.first is not None and self.first[0] < self.n < self.total:
            rate = (now - self.first[1]) / (self.n - self.first[0])
            parts.append(f"ETA {format_duration(rate * (self.total - self.n))}")
        return ", ".join(parts)

    def _line(self, now: float) -> None:
        self.last_line, self.printed_n = now, self.n
        self.write(self.line(now))
