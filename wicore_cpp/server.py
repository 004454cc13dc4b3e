"""`wicore serve`: check the model files, then run the HTTP server until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.errors import ModelFileError
from wicore_cpp.gguf_file import GGUFFile, check_model_file
from wicore_cpp.http.app import create_app

log = logging.getLogger("wicore")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per request is aiohttp's access log; keep it unless debugging is off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def check_models(config: Config) -> dict[str, GGUFFile]:
    """Every served model file checked before any process starts. Raises ModelFileError."""
    models, note = config.served_models()
    if note:
        log.warning("%s", note)
    return {model_id: check_model_file(path) for model_id, path in models.items()}


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def run_server(config: Config) -> int:
    configure_logging(config.log_level)
    if config.ray_address is not None and not _has_ray():
        log.error("cannot start: ray_address is set but Ray is not installed; install the "
                  "`ray` extra: pip install 'wicore-cpp[ray]'")
        return 2
    try:
        models = check_models(config)
    except ModelFileError as exc:
        log.error("cannot start: %s", exc)
        return 1
    for model_id, m in models.items():
        log.info("serving %s from %s (%s, %.1f MiB, trained context %d)", model_id, m.path,
                 m.architecture, m.size_bytes / 2**20, m.context_length)

    return asyncio.run(_serve(config, models))


async def _serve(config: Config, models: dict[str, GGUFFile]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0

    def on_fatal(message: str) -> None:
        nonlocal exit_code
        if exit_code == 0:
            log.error("cannot serve: %s", message)
            exit_code = 1
            stop.set()

    app = create_app(config, models, on_fatal)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.shutdown_grace_s,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access"),
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
            return 1
        log.info("listening on http://%s:%d (pid %d)", config.host, runner.addresses[0][1],
                 os.getpid())
        await stop.wait()
        log.info("shutting down: draining for up to %gs", config.shutdown_grace_s)
    finally:
        # Stops listening, drains in-flight requests (bounded), then stops the workers.
        await runner.cleanup()
    log.info("server stopped")
    return exit_code
