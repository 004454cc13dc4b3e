"""Everything `wicore quantize` shows its user, in one place.

This is a command-line tool, so it talks to the terminal on purpose: results (the summary, the
type list, a dry run's estimate) go to stdout, and the progress bar, notes and errors go to
stderr, so `wicore quantize ... > log` keeps the result and still shows progress.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

PROG = "wicore quantize"


def format_bytes(n: float) -> str:
    """Binary units, as llama.cpp and `ls -h` use: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"


@dataclass(frozen=True, slots=True)
class FallbackNote:
    """One tensor that got another type than the mix asked for, and why."""

    name: str
    wanted: str
    used: str
    reason: str


def describe_fallbacks(fallbacks: Iterable[FallbackNote], limit: int = 3) -> str:
    """'no fallbacks', or e.g. '2 tensors fell back: blk.0.ffn_down.weight q4_K->q5_0 (...)'."""
    items = list(fallbacks)
    if not items:
        return "no fallbacks"
    shown = [f"{f.name} {f.wanted}->{f.used} ({f.reason})" for f in items[:limit]]
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    noun = "tensor" if len(items) == 1 else "tensors"
    return f"{len(items)} {noun} fell back: " + "; ".join(shown) + more


def describe_type_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {t}" for t, n in counts.most_common())


class Console:
    """Writes results to stdout and progress, notes and errors to stderr."""

    def __init__(
        self, *, quiet: bool = False, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.is_tty = self.err.isatty()
        self._bar_shown = False
        self._last_decile = -1
        self._state: tuple[int, int, str] = (0, 0, "")

    # --- results and messages ---------------------------------------------------------------

    def result(self, text: str) -> None:
        self._clear_bar()
        try:
            print(text, file=self.out, flush=True)  # noqa: T201 - CLI output
        except BrokenPipeError:
            # `wicore quantize --list-types | head`: the reader left; say nothing more there
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())

    def note(self, text: str) -> None:
        """A remark for the user; --quiet silences it."""
        if not self.quiet:
            self._clear_bar()
            print(f"{PROG}: {text}", file=self.err, flush=True)  # noqa: T201 - CLI output

    def error(self, text: str) -> None:
        self._clear_bar()
        print(f"{PROG}: error: {text}", file=self.err, flush=True)  # noqa: T201 - CLI output

    # --- progress over tensors --------------------------------------------------------------

    def progress(self, index: int, total: int, name: str, elapsed: float, done: bool) -> None:
        """Tensor `index` of `total` started (done=False) or was written (done=True)."""
        if self.quiet or total <= 0:
            return
        self._state = (index if done else index - 1, total, name)
        if self.is_tty:
            self._draw_bar(elapsed)
            return
        # Not a terminal (a log file, CI): a line per tenth of the way, not one per tensor.
        decile = (index * 10) // total if done else -1
        if decile > self._last_decile:
            self._last_decile = decile
            print(  # noqa: T201 - CLI output
                f"[{index:>4}/{total:>4}] {index * 100 // total:3d}%  {name}  {_clock(elapsed)}",
                file=self.err, flush=True,
            )

    def tick(self, elapsed: float) -> None:
        """Keep the clock moving while llama.cpp works on one big tensor."""
        if self.is_tty and self._bar_shown and not self.quiet:
            self._draw_bar(elapsed)

    def end_progress(self) -> None:
        self._clear_bar()

    def _draw_bar(self, elapsed: float) -> None:
        finished, total, name = self._state
        width = shutil.get_terminal_size((80, 20)).columns
        counter = f"{finished:>{len(str(total))}}/{total}"
        bar_width = max(10, min(30, width // 4))
        filled = bar_width * finished // max(1, total)
        bar = "[" + "=" * filled + " " * (bar_width - filled) + "]"
        line = f"{bar} {counter} {_clock(elapsed)} {name}"
        print("\r\x1b[K" + line[: width - 1], end="", file=self.err, flush=True)  # noqa: T201
        self._bar_shown = True

    def _clear_bar(self) -> None:
        if self._bar_shown:
            print("\r\x1b[K", end="", file=self.err, flush=True)  # noqa: T201 - CLI output
            self._bar_shown = False
