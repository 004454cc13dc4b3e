"""The process's one llama.cpp log hook, for the engine and the quantizer alike.

llama.cpp's log hook is process-global C state and keeps a raw pointer to the callback for the
rest of the process: the Python object behind it must live as long, or a collected callback is
called from C (a segfault at the next log line). So there is exactly one per process, made by
`llama_log()` and never freed. By default it turns llama.cpp's pieces of lines into `logging`
records and remembers the last error; a process that wants the raw pieces (the quantizer
parses them for progress) sets a sink instead.

llama_cpp is imported only when the hook is installed, so the level numbers can be used by
code that must not load llama.cpp.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("wicore.llama")

# ggml_log_level in this version (ggml/include/ggml.h).
LEVEL_NONE, LEVEL_DEBUG, LEVEL_INFO, LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = 0, 1, 2, 3, 4, 5
# llama.cpp's INFO is hundreds of load-time lines; the `wicore.llama` logger has its own level
# (`llama_log_level`, WARNING by default), so they show only when asked for.
_LEVELS = {LEVEL_NONE: logging.DEBUG, LEVEL_DEBUG: logging.DEBUG, LEVEL_INFO: logging.INFO,
           LEVEL_WARN: logging.WARNING, LEVEL_ERROR: logging.ERROR}
# llama.cpp warnings that do not apply to how WiCore uses it. "n_ctx_seq > n_ctx_train": with
# a unified KV pool llama.cpp calls the whole pool one sequence's context, but the scheduler
# caps every sequence at the model's trained context. "failed to find a memory slot": the
# batcher evicts cached prompt prefixes and retries the batch, and logs what it did.
_NOT_A_WARNING = ("n_ctx_seq (", "failed to find a memory slot")

Sink = Callable[[int, str], None]


class LlamaLog:
    """Routes llama.cpp's log lines into `logging` (or a sink) and remembers the last error."""

    def __init__(self) -> None:
        import llama_cpp as lc

        self.last_error = ""
        self.sink: Sink | None = None  # when set, gets every raw (level, text) piece instead
        self._buffer = ""
        self._level = logging.DEBUG
        self._callback = lc.llama_log_callback(self._on_log)
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    @property
    def callback(self):
        """The ctypes callback itself, for other llama.cpp libraries' hooks (libmtmd's): it
        lives as long as the process, like this object."""
        return self._callback

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        try:
            decoded = (text or b"").decode("utf-8", errors="replace")
            if self.sink is not None:
                self.sink(int(level), decoded)
                return
            if level != LEVEL_CONT:
                self._level = _LEVELS.get(level, logging.DEBUG)
            self._buffer += decoded
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                if line.strip():
                    py_level = self._level
                    if py_level == logging.WARNING and any(s in line for s in _NOT_A_WARNING):
                        py_level = logging.DEBUG
                    if py_level >= logging.ERROR:
                        self.last_error = line.strip()
                    log.log(py_level, "%s", line.rstrip())
        except Exception:  # noqa: BLE001 - an exception must never cross into C
            pass


# See the module docstring: the one hook of this process, never collected.
_llama_log: LlamaLog | None = None


def llama_log() -> LlamaLog:
    """The process's one llama.cpp log hook, installed on first use."""
    global _llama_log
    if _llama_log is None:
        _llama_log = LlamaLog()
    return _llama_log
