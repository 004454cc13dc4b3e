"""`wicore serve`: check the model files, plan memory, then run the HTTP server until SIGTERM
or Ctrl-C. `wicore serve --dry-run` stops after the plan and prints it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import orjson
from aiohttp import web

from wicore_cpp.config import DEFAULT_CTX_SIZE, Config, ConfigError
from wicore_cpp.engine.images import check_projectors
from wicore_cpp.engine.memory_fit import FitResult, describe, fitted_config, plan_for_config
from wicore_cpp.engine.memory_plan import gib
from wicore_cpp.errors import ModelFileError
from wicore_cpp.gguf_file import GGUFFile, check_model_file
from wicore_cpp.http.app import create_app
from wicore_cpp.http.connections import ConnectionLimits, GuardedAppRunner
from wicore_cpp.http.state import STATE
from wicore_cpp.logs import LogSettings, configure_logging

# Exit codes: 1 a failure (a bad model file, a port in use, workers that cannot load),
# 2 a configuration that cannot work (invalid settings, explicit settings that do not fit).
EXIT_FAILURE, EXIT_CONFIG = 1, 2

log = logging.getLogger("wicore")


def check_models(config: Config) -> dict[str, GGUFFile]:
    """Every served model file checked before any process starts. Raises ModelFileError."""
    models, note = config.served_models()
    if note:
        log.warning("%s", note)
    checked = {model_id: check_model_file(path) for model_id, path in models.items()}
    for model_id, projector in check_projectors(config).items():
        log.info("%s takes images: vision projector %s (%.1f MiB, %d tokens an image)",
                 model_id, projector.path, projector.size_bytes / 2**20, projector.image_tokens)
    return checked


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def _on_remote_ray(config: Config) -> bool:
    """Workers on another machine's Ray cluster: this machine's memory says nothing about
    theirs. (`local` runs them here, and is planned like worker processes.)"""
    return config.ray_address is not None and config.ray_address != "local"


def check_and_plan(config: Config) -> tuple[dict[str, GGUFFile], FitResult]:
    """The model files checked, then the memory plan, with llama.cpp's figures from a helper
    process (engine/memory_probe.py) that starts while the files are read. Raises
    ModelFileError (a bad file), ValueError (a setting the plan cannot use) or RuntimeError
    (llama.cpp does not start)."""
    from wicore_cpp.engine.memory_probe import MemoryProbe

    with MemoryProbe() as probe:
        models = check_models(config)
        for model_id, m in models.items():
            log.info("serving %s from %s (%s, %.1f MiB, trained context %d)", model_id, m.path,
                     m.architecture, m.size_bytes / 2**20, m.context_length)
        return models, plan_for_config(config, models, probe)


def run_server(config: Config) -> int:
    configure_logging(LogSettings.from_config(config))
    if config.ray_address is not None and not _has_ray():
        log.error("cannot start: ray_address is set but Ray is not installed; install the "
                  "`ray` extra: pip install 'wicore-cpp[ray]'")
        return 2
    # The port first: a taken one fails at once, not after the plan (seconds for a big model).
    sock = _listen(config)
    if sock is None:
        return EXIT_FAILURE
    prepared = _prepare(config)
    if isinstance(prepared, int):
        sock.close()
        return prepared
    return asyncio.run(_serve(*prepared, sock))


def _prepare(config: Config) -> tuple[Config, dict[str, GGUFFile]] | int:
    """The checked models and the config with its fitted settings, or an exit code."""
    if _on_remote_ray(config):
        try:
            models = check_models(config)
        except ModelFileError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_FAILURE
        log.info("memory plan skipped: the workers run on the Ray cluster at %s, whose devices "
                 "this machine does not see (an unset ctx_size is %d there)",
                 config.ray_address, DEFAULT_CTX_SIZE)
        return config, models
    try:
        models, result = check_and_plan(config)
    except ModelFileError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    except ValueError as exc:  # a setting the plan cannot use (gpu_ids naming no GPU)
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except RuntimeError as exc:  # llama.cpp itself does not start
        log.error("cannot start: the memory plan failed: %s", exc)
        return EXIT_FAILURE
    for step in result.steps:
        log.info("memory fit: %s", step.describe())
    if not result.fits:
        log.error("cannot start: %s", result.problem)
        return EXIT_CONFIG
    plan = result.plan
    s = plan.settings
    log.info("memory plan: ctx_size %d, %d sequences, kv cache %s; %s (--dry-run shows it all)",
             s.ctx_size, s.n_seq_max, s.kv_cache_type, "; ".join(
                 f"{p.name} needs {gib(plan.usage[p.name].total)} of {gib(plan.usable(p))} "
                 "usable" for p in plan.pools if plan.usage[p.name].total))
    return fitted_config(config, result), models


def dry_run(config: Config, as_json: bool) -> int:
    """`wicore serve --dry-run`: print the plan (text or JSON) on stdout and exit: 0 when it
    fits, 2 when it does not, 1 when a model file is bad."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _, result = check_and_plan(config)
    except (ModelFileError, RuntimeError) as exc:
        print(f"wicore serve: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_FAILURE
    except ValueError as exc:
        print(f"wicore serve: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_CONFIG
    if _on_remote_ray(config):
        print(f"wicore serve: the workers run on the Ray cluster at {config.ray_address}; "  # noqa: T201
              "this plan is for this machine's devices, not the cluster's", file=sys.stderr)
    if as_json:
        out = {**result.plan.as_dict(), "fits": result.fits, "problem": result.problem,
               "fit_steps": [{"setting": st.setting, "from": st.before, "to": st.after,
                              "device": st.pool, "need_before_bytes": st.need_before,
                              "need_after_bytes": st.need_after, "usable_bytes": st.usable}
                             for st in result.steps]}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write("\n".join(describe(result)) + "\n")
    return 0 if result.fits else EXIT_CONFIG


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a taken port fails in a second,
    not after the workers have loaded the model. Raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _exit_now(signame: str) -> None:
    """A second Ctrl-C (or SIGTERM) while draining: kill our processes and leave at once."""
    import psutil

    log.warning("second %s: exiting now without draining", signame)
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    logging.shutdown()
    os._exit(128 + signal.Signals[signame].value)


def _listen(config: Config) -> socket.socket | None:
    """bind_socket, or None after logging why not."""
    try:
        return bind_socket(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return None


async def _serve(config: Config, models: dict[str, GGUFFile],
                 sock: socket.socket | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0
    if sock is None:
        sock = _listen(config)
        if sock is None:
            return 1

    def on_fatal(message: str) -> None:
        nonlocal exit_code
        if exit_code == 0:
            log.error("cannot serve: %s", message)
            exit_code = 1
            stop.set()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            _exit_now(signame)
        stop.set()

    try:
        app = create_app(config, models, on_fatal)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    runner = GuardedAppRunner(
        app,
        ConnectionLimits.from_config(config),
        handle_signals=False,
        shutdown_timeout=config.shutdown_grace_s,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access"),
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        log.info("listening on http://%s:%d (pid %d)", config.host, runner.addresses[0][1],
                 os.getpid())
        _log_what_is_served(app)
        await stop.wait()
        log.info("shutting down: draining for up to %gs", config.shutdown_grace_s)
    finally:
        # Stops listening, drains in-flight requests (bounded), then stops the workers.
        await runner.cleanup()
        sock.close()
    log.info("server stopped")
    return exit_code


def _log_what_is_served(app: web.Application) -> None:
    """Start-up, in a few lines: each model's limits, who may call, what is logged."""
    state = app[STATE]
    config = state.config
    for model in state.engine.models.values():
        log.info("model %s: up to %d tokens per request (prompt + completion); %d worker(s) of "
                 "%d sequences; default max_tokens %d", model.model_id, model.context_length,
                 config.workers, config.max_batch_size, config.default_max_tokens)
    if state.keys is None:
        limits = _limit_text(config.rate_limit_per_minute,
                             config.rate_limit_tokens_per_minute, "client address")
        log.info("API keys: off (anyone who can reach the port may call, at any priority); "
                 "%s", limits)
    else:
        log.info("API keys: %d from %s; quota use in %s; /status and /metrics %s",
                 len(state.keys), config.api_keys, state.limits.usage.path
                 if state.limits.usage else "-",
                 "for admin keys only" if config.admin_only_monitoring else "open")
    if config.cors_origins:
        log.info("CORS: browsers may call from %s", ", ".join(config.cors_origins))
    log.info("metrics: GET /metrics (Prometheus); request log %s, performance log %s",
             "on" if config.log_requests else "off",
             f"every {config.performance_log_interval_s:g}s" if config.log_performance else "off")


def _limit_text(requests: int, tokens: int, per: str) -> str:
    parts = [f"{requests} requests a minute" if requests else "no request limit",
             f"{tokens} tokens a minute" if tokens else "no token limit"]
    return " and ".join(parts) + f" per {per}"
