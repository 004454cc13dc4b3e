"""Turn llama.cpp's quantizer log into small typed events.

llama.cpp has no progress callback; it logs one line per tensor through its log callback, in
pieces (vendor/llama.cpp/src/llama-quant.cpp, llama_model_quantize_impl), here with the
padding shortened:

    "[   7/  54] blk.0.attn_q.weight - [   256,    256,      1,      1], type =    f16, "
    "converting to q4_K .. "
    "size =     0.12 MiB ->     0.04 MiB\\n"

A kept tensor logs only "size =    0.001 MiB"; a dry run logs "... MiB (q4_K)". Fallbacks are
logged before the first tensor line, one per tensor:

    "warning: blk.0.ffn_down.weight - ncols   1000 not divisible by 256
     (required for type    q4_K) -> falling back to    q5_0"

The parser is pure, so it is tested without llama.cpp; the quantizer process feeds it and sends
the events to the front process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wicore_cpp.engine.llama_log import LEVEL_CONT, LEVEL_ERROR, LEVEL_INFO

_START = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+),")
_CONVERTED = re.compile(r"converting to (\S+) \.\. size =\s*([\d.]+) MiB ->\s*([\d.]+) MiB")
_DRY_CONVERTED = re.compile(r"size =\s*([\d.]+) MiB ->\s*([\d.]+) MiB \((\S+)\)")
_KEPT = re.compile(r"size =\s*([\d.]+) MiB\s*$")
_FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
    r"\s*(\(WARNING: must use F16 due to unusual shape\))?\s*-> falling back to\s+(\S+)"
)
_TOTAL = re.compile(r"(model|quant) size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")
_FAILED = re.compile(r"failed to quantize: (.*)$")


@dataclass(frozen=True, slots=True)
class TensorStarted:
    """llama.cpp began tensor `index` of `total` (1-based)."""

    index: int
    total: int
    name: str


@dataclass(frozen=True, slots=True)
class TensorDone:
    """A tensor was written: converted (dst_type set) or copied as it was."""

    index: int
    total: int
    name: str
    src_type: str
    dst_type: str
    mib_before: float
    mib_after: float


@dataclass(frozen=True, slots=True)
class Fallback:
    """A tensor got another type than the mix asked for, because of its row length."""

    name: str
    ncols: int
    block: int
    wanted: str
    used: str


@dataclass(frozen=True, slots=True)
class SizeTotals:
    """llama.cpp's closing size line: `which` is "model" (input) or "quant" (output)."""

    which: str
    mib: float
    bpw: float


@dataclass(frozen=True, slots=True)
class LlamaError:
    """An error line from llama.cpp; `reason` is set on the final "failed to quantize" line."""

    text: str
    reason: str | None = None


Event = TensorStarted | TensorDone | Fallback | SizeTotals | LlamaError


class QuantizeLogParser:
    """Reassemble llama.cpp's log pieces into lines and parse each into events."""

    def __init__(self) -> None:
        self._line = ""
        self._level = LEVEL_INFO

    def feed(self, level: int, text: str) -> list[Event]:
        events: list[Event] = []
        for piece in text.splitlines(keepends=True):
            if self._line and level not in (LEVEL_CONT, self._level):
                # a new message before the last one ended its line, e.g. an error thrown right
                # after a fallback warning: parse the unfinished line on its own
                events.extend(self.flush())
            if not self._line:
                self._level = level if level != LEVEL_CONT else self._level
                started = _START.match(piece)
                if started:  # announce the tensor now: a big one takes a while to convert
                    events.append(TensorStarted(
                        int(started.group(1)), int(started.group(2)), started.group(3)
                    ))
            self._line += piece
            if self._line.endswith("\n"):
                events.extend(self._parse_line(self._line.rstrip("\n"), self._level))
                self._line = ""
        return events

    def flush(self) -> list[Event]:
        """Parse what is left when llama.cpp returns (its last piece may lack a newline)."""
        line, self._line = self._line, ""
        return self._parse_line(line, self._level) if line.strip() else []

    @staticmethod
    def _parse_line(line: str, level: int) -> list[Event]:
        started = _START.match(line)
        if started:
            index, total, name = int(started.group(1)), int(started.group(2)), started.group(3)
            src = started.group(4)
            if m := _CONVERTED.search(line):
                return [TensorDone(index, total, name, src, m.group(1),
                                   float(m.group(2)), float(m.group(3)))]
            if m := _DRY_CONVERTED.search(line):
                return [TensorDone(index, total, name, src, m.group(3),
                                   float(m.group(1)), float(m.group(2)))]
            if m := _KEPT.search(line):
                return [TensorDone(index, total, name, src, src,
                                   float(m.group(1)), float(m.group(1)))]
            return []
        if m := _FALLBACK.search(line):
            return [Fallback(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4),
                             m.group(6))]
        if m := _TOTAL.search(line):
            return [SizeTotals(m.group(1), float(m.group(2)), float(m.group(3)))]
        if level == LEVEL_ERROR and line.strip(" =\n"):
            m = _FAILED.search(line)
            return [LlamaError(line.strip(), m.group(1).strip() if m else None)]
        return []
