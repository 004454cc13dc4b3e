"""Logging set-up, the same in every process (front end, workers, tokenizers).

Text (`time LEVEL [process] logger: message`) or JSON (one object a line, for log shippers,
with a request line's fields as keys). llama.cpp's own output (`wicore.llama`: model loading,
hundreds of lines) has its own level, so `DEBUG` is WiCore's debug alone. aiohttp's access
log follows the log level: one line per HTTP request at INFO.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from wicore_cpp.config import Config

LLAMA_LOGGER = "wicore.llama"


@dataclass(slots=True, frozen=True)
class LogSettings:
    """What a process needs to set up its logging; small enough to pass to a child process."""

    level: str = "INFO"
    format: str = "text"  # or "json"
    llama_level: str = "WARNING"

    @classmethod
    def from_config(cls, config: Config) -> LogSettings:
        return cls(config.log_level.upper(), config.log_format, config.llama_log_level.upper())


def configure_logging(settings: LogSettings, process: str | None = None) -> None:
    """Route this process' logging to stderr as `settings` say. `process` names a child
    process ("worker-0", "tokenizer") in every line."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"process": process or "server"},
        ))
    else:
        where = f"{process} " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.getLogger(LLAMA_LOGGER).setLevel(settings.llama_level)
