"""Run llama.cpp's quantizer (and the --check comparison) in a child process.

`llama_model_quantize` is one blocking C call with no way to cancel it. Run in this process, a
Ctrl-C would wait for the whole model. So the call runs in a spawned child, and the front
process only reads events from a pipe: on Ctrl-C it terminates the child, which it can always
do, and then removes the half-written file. The child ignores SIGINT (a terminal sends Ctrl-C to
the whole process group) so that the front process alone decides what happens.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from wicore_cpp.engine.llama_log import LEVEL_ERROR, llama_log
from wicore_cpp.quantize.log_events import LlamaError, QuantizeLogParser

_POLL_S = 0.2
_TERMINATE_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1

@dataclass(frozen=True, slots=True)
class QuantizeJob:
    """Everything the child needs for one llama_model_quantize call."""

    input_path: str
    output_path: str
    ftype: int
    nthread: int
    allow_requantize: bool
    quantize_output_tensor: bool
    token_embedding_type: int | None  # keep token_embd in this ggml type (tied output)


@dataclass(frozen=True, slots=True)
class QuantizeFinished:
    """llama_model_quantize returned: 0 is success."""

    rc: int


@dataclass(frozen=True, slots=True)
class CheckJob:
    """Compare the next-token distributions of two models on built-in prompts."""

    original_path: str
    quantized_path: str
    n_threads: int


@dataclass(frozen=True, slots=True)
class CheckFailed:
    message: str


def _child_setup() -> None:
    """Leave Ctrl-C to the front process, and die with it if it is killed outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:
            os._exit(1)  # the front process died before prctl took effect


def quantize_main(job: QuantizeJob, conn: Connection) -> None:
    """Child entry point: quantize, sending parsed log events, then QuantizeFinished."""
    _child_setup()
    import llama_cpp

    parser = QuantizeLogParser()

    def on_line(level: int, text: str) -> None:
        for event in parser.feed(level, text):
            conn.send(event)

    llama_log().sink = on_line
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job.ftype
    params.nthread = job.nthread
    params.allow_requantize = job.allow_requantize
    params.quantize_output_tensor = job.quantize_output_tensor
    if job.token_embedding_type is not None:
        params.token_embedding_type = job.token_embedding_type
    rc = llama_cpp.llama_model_quantize(
        os.fsencode(job.input_path), os.fsencode(job.output_path), ctypes.byref(params)
    )
    for event in parser.flush():
        conn.send(event)
    conn.send(QuantizeFinished(int(rc)))
    conn.close()


def check_main(job: CheckJob, conn: Connection) -> None:
    """Child entry point: run the --check comparison, sending a CheckResult or CheckFailed."""
    _child_setup()
    errors: list[str] = []

    def on_line(level: int, text: str) -> None:
        # Loading a model logs hundreds of lines; keep only errors, for the failure message.
        if level == LEVEL_ERROR and text.strip():
            errors.append(text.strip())

    llama_log().sink = on_line
    from wicore_cpp.quantize.check import compare_models

    try:
        result = compare_models(job.original_path, job.quantized_path, job.n_threads)
    except Exception as exc:  # noqa: BLE001 - reported to the user, with llama.cpp's errors
        detail = f" ({errors[-1]})" if errors else ""
        conn.send(CheckFailed(f"{exc}{detail}"))
    else:
        conn.send(result)
    conn.close()


def run_in_child(
    target: Callable[[Any, Connection], None],
    job: Any,
    on_event: Callable[[Any], None],
    on_idle: Callable[[], None] | None = None,
) -> int | None:
    """Run target(job, conn) in a spawned process, passing each event it sends to on_event.

    Returns the child's exit code. Any exception here, KeyboardInterrupt included, terminates
    the child before it propagates, so no quantizer outlives the command.
    """
    ctx = multiprocessing.get_context("spawn")  # fork would copy a process that may hold llama.cpp
    recv_conn, send_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(job, send_conn), name="wicore-quantize", daemon=True)
    # The child inherits an ignored SIGINT, so Ctrl-C cannot hit it while it is still starting.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        proc.start()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    send_conn.close()  # so that recv() sees EOF once the child has gone
    try:
        while True:
            if recv_conn.poll(_POLL_S):
                try:
                    event = recv_conn.recv()
                except EOFError:
                    break
                on_event(event)
            elif on_idle is not None:
                on_idle()
        proc.join()
    except BaseException:
        stop_child(proc)
        raise
    finally:
        recv_conn.close()
    return proc.exitcode


def stop_child(proc: multiprocessing.process.BaseProcess) -> None:
    """Terminate the child and wait for it, killing it if it does not go."""
    if proc.is_alive():
        proc.terminate()
        proc.join(_TERMINATE_GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()


def llama_error_reason(events: list[Any]) -> str | None:
    """The most telling llama.cpp error among events: its "failed to quantize" reason."""
    errors = [e for e in events if isinstance(e, LlamaError)]
    for e in reversed(errors):
        if e.reason:
            return e.reason
    return errors[-1].text if errors else None
