"""`wicore quantize INPUT.gguf OUTPUT.gguf --type Q4_K_M`: llama.cpp's quantizer, made safe.

Before any work: the type is known, the input is a GGUF model, the output folder exists, the
output is new (or --force), the estimated output fits on the disk. Then llama.cpp quantizes in
a child process into a temporary file beside the output, which is renamed only on success, so
a failure or Ctrl-C leaves no partial file and any earlier output untouched.

Exit codes: 0 done, 1 llama.cpp failed (or --check could not run), 2 bad input, 130 Ctrl-C.

cli.py imports this module for every subcommand, so it imports nothing heavy (llama_cpp, gguf,
numpy) until `run` is called.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wicore_cpp.config import resolve_threads

if TYPE_CHECKING:
    from collections.abc import Iterator

    from wicore_cpp.gguf_file import GGUFFile
    from wicore_cpp.quantize.check import CheckResult
    from wicore_cpp.quantize.child import QuantizeJob
    from wicore_cpp.quantize.console import Console
    from wicore_cpp.quantize.formats import QuantType
    from wicore_cpp.quantize.plan import Plan

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while working."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `wicore quantize` flags (cli.py calls this when it builds its parser)."""
    parser.description = (
        "Quantize a GGUF model with llama.cpp's quantizer, e.g. a Gemma 3 F16/BF16 file to "
        "Q4_K_M. The output is written to a temporary file and renamed only on success."
    )
    parser.add_argument("input", nargs="?", metavar="INPUT", help="GGUF model to read")
    parser.add_argument("output", nargs="?", metavar="OUTPUT", help="GGUF file to write")
    parser.add_argument("-t", "--type", dest="qtype", metavar="TYPE",
                        help="target type, e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M (see --list-types)")
    parser.add_argument("--list-types", action="store_true",
                        help="list the types with their bits per weight; with INPUT, also the "
                        "estimated output size of that file for each type")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="threads for quantizing and --check (default 0: the physical cores, "
                        "as for `wicore serve`)")
    parser.add_argument("--allow-requantize", action="store_true",
                        help="allow an input that is already quantized (costs quality)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("--leave-output", action="store_true",
                        help="keep the output projection unquantized: output.weight, or for "
                        "models with tied embeddings (Gemma 3) token_embd.weight")
    parser.add_argument("--dry-run", action="store_true",
                        help="estimate the output size and the tensor types; write nothing")
    parser.add_argument("--check", action="store_true",
                        help="after quantizing, compare next-token distributions of both "
                        "models on built-in prompts (KL divergence, top-1 agreement)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")


def run(args: argparse.Namespace) -> int:
    """`wicore quantize`: returns the exit code."""
    from wicore_cpp.quantize.console import Console

    console = Console(quiet=args.quiet)
    try:
        with _signals_raise():
            return _run(args, console)
    except UsageError as exc:
        console.error(str(exc))
        return EXIT_USAGE
    except Interrupted as exc:
        console.end_progress()
        console.error(f"interrupted ({exc}); no output was written")
        return exc.exit_code


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into Interrupted, so cleanup runs for both."""
    import threading

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(args: argparse.Namespace, console: Console) -> int:
    from wicore_cpp.quantize.formats import available_types

    types = available_types()
    if args.list_types:
        model = _read_input(args.input) if args.input else None
        _print_types(console, types, model)
        return EXIT_OK
    if not args.input:
        raise UsageError("missing INPUT (usage: wicore quantize INPUT OUTPUT --type TYPE)")
    qtype = _resolve_type(args.qtype, types)
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (physical cores) or more, not {args.threads}")
    if not args.output and not args.dry_run:
        raise UsageError("missing OUTPUT (usage: wicore quantize INPUT OUTPUT --type TYPE)")
    model = _read_input(args.input)
    output = _check_output(args, model.path) if args.output else None
    plan = _check_plan(args, model, qtype)
    free = _check_disk(plan, output) if output else None
    if args.dry_run or output is None:
        _print_estimate(console, model, plan, output, free)
        return EXIT_OK
    return _quantize(args, console, model, qtype, plan, output)


# --- checks before any work -------------------------------------------------------------------


def _resolve_type(name: str | None, types: dict[str, QuantType]) -> QuantType:
    from wicore_cpp.quantize.formats import resolve_type

    if not name:
        raise UsageError("missing --type (e.g. --type Q4_K_M; see --list-types)")
    qtype = resolve_type(name, types)
    if qtype is None:
        raise UsageError(f"unknown type {name!r}; `wicore quantize --list-types` shows them")
    if qtype.needs_imatrix:
        raise UsageError(
            f"type {qtype.name} needs an importance matrix (imatrix), which wicore quantize "
            "does not compute or load; use llama.cpp's llama-imatrix and llama-quantize "
            "--imatrix, or pick IQ3_S, Q2_K or a larger type"
        )
    return qtype


def _read_input(name: str) -> GGUFFile:
    from wicore_cpp.gguf_file import GGUFError, read_gguf

    path = Path(name)
    if not path.exists():
        raise UsageError(f"input file not found: {name}")
    if not path.is_file():
        raise UsageError(f"input is not a file: {name}")
    try:
        return read_gguf(path)
    except GGUFError as exc:
        raise UsageError(f"input is not a GGUF model: {name}: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read input {name}: {exc.strerror or exc}") from exc


def _check_output(args: argparse.Namespace, input_path: Path) -> Path:
    output = Path(args.output)
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"output folder does not exist: {folder}")
    if output.is_dir():
        raise UsageError(f"output is a folder, not a file: {output}")
    if output.exists():
        if output.resolve() == input_path.resolve() or os.path.samefile(output, input_path):
            raise UsageError(f"output is the input file: {output}")
        if not args.force:
            raise UsageError(f"output exists: {output} (pass --force to overwrite it)")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}")
    return output


def _check_plan(args: argparse.Namespace, model: GGUFFile, qtype: QuantType) -> Plan:
    from wicore_cpp.quantize.plan import plan_quantization

    plan = plan_quantization(model, qtype.name, qtype.main_format, leave_output=args.leave_output)
    if plan.impossible_tensors:
        t = plan.impossible_tensors[0]
        raise UsageError(f"{qtype.name} does not fit this model: {t.name}: {t.impossible}")
    if plan.imatrix_tensors:
        t = plan.imatrix_tensors[0]
        raise UsageError(
            f"{qtype.name} would put {t.name} in {t.dst_type}, which needs an importance matrix "
            "(not supported); pick another type"
        )
    requantized = plan.requantized()
    if requantized and not args.allow_requantize:
        kinds = sorted({t.src_type for t in requantized})
        raise UsageError(
            f"input is already quantized ({', '.join(kinds)} tensors); quantizing it again "
            "loses more quality than quantizing the F16/BF16 original. Pass "
            "--allow-requantize to do it anyway"
        )
    return plan


def _check_disk(plan: Plan, output: Path) -> int:
    import psutil

    free = int(psutil.disk_usage(str(output.parent)).free)
    # 1% on top: the estimate leaves out a few llama.cpp rules for models other than Gemma.
    need = int(plan.output_bytes * 1.01)
    if free < need:
        from wicore_cpp.quantize.console import format_bytes

        raise UsageError(
            f"not enough free disk in {output.parent}: the output needs about "
            f"{format_bytes(need)}, {format_bytes(free)} is free"
        )
    return free


# --- the work ---------------------------------------------------------------------------------


def _quantize(
    args: argparse.Namespace, console: Console, model: GGUFFile, qtype: QuantType, plan: Plan,
    output: Path,
) -> int:
    from wicore_cpp.quantize.child import QuantizeJob
    from wicore_cpp.quantize.console import format_bytes

    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial",
                                    dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    published = False
    try:
        try:
            job = QuantizeJob(
                input_path=str(model.path), output_path=str(tmp), ftype=qtype.ftype,
                nthread=resolve_threads(args.threads), allow_requantize=args.allow_requantize,
                quantize_output_tensor=not args.leave_output,
                token_embedding_type=_kept_embedding_type(args, model),
            )
            console.note(f"{model.path.name} -> {output.name} as {qtype.name}, about "
                         f"{format_bytes(plan.output_bytes)}")
            outcome = _run_quantizer(job, console)
            if outcome.error is not None:
                console.error(outcome.error)
                return EXIT_FAILED
            with _signals_deferred():  # so that "renamed" and "reported" never disagree
                _publish(tmp, output)
                published = True
        finally:
            tmp.unlink(missing_ok=True)  # after a successful rename it is already gone
        console.result(_summary(qtype, model, output, outcome))
        if args.check:
            return _run_check(args, console, model.path, output)
    except Interrupted as exc:
        if not published:
            raise
        console.error(f"interrupted ({exc}); {output} was written completely")
        return exc.exit_code
    return EXIT_OK


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then act on them."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, _frame: Any) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        raise Interrupted(pending[0])


def _kept_embedding_type(args: argparse.Namespace, model: GGUFFile) -> int | None:
    """With --leave-output and tied embeddings, token_embd is the output: keep its type."""
    from wicore_cpp.quantize.formats import ggml_type_id

    if not (args.leave_output and model.has_tied_embeddings):
        return None
    embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
    return ggml_type_id(embd.ggml_type) if embd else None


@dataclass(slots=True)
class _Outcome:
    """What the quantizer child reported."""

    events: list[Any] = field(default_factory=list)
    rc: int | None = None  # llama_model_quantize's return value, if it returned
    exit_code: int | None = None  # the child process's
    seconds: float = 0.0

    @property
    def error(self) -> str | None:
        from wicore_cpp.quantize.child import llama_error_reason

        if self.rc == 0 and self.exit_code == 0:
            return None
        reason = llama_error_reason(self.events)
        if self.rc not in (None, 0):
            return f"llama.cpp could not quantize the model: {reason or 'no reason given'}"
        how = (f"was killed by signal {-self.exit_code}" if self.exit_code and self.exit_code < 0
               else f"exited with code {self.exit_code}")
        return f"the quantizer process {how}" + (f": {reason}" if reason else "")


def _run_quantizer(job: QuantizeJob, console: Console) -> _Outcome:
    from wicore_cpp.quantize.child import QuantizeFinished, quantize_main, run_in_child
    from wicore_cpp.quantize.log_events import TensorDone, TensorStarted

    outcome = _Outcome()
    start = time.monotonic()

    def on_event(event: Any) -> None:
        elapsed = time.monotonic() - start
        if isinstance(event, TensorStarted):
            console.progress(event.index, event.total, event.name, elapsed, done=False)
        elif isinstance(event, TensorDone):
            console.progress(event.index, event.total, event.name, elapsed, done=True)
        elif isinstance(event, QuantizeFinished):
            outcome.rc = event.rc
        outcome.events.append(event)

    try:
        outcome.exit_code = run_in_child(
            quantize_main, job, on_event, on_idle=lambda: console.tick(time.monotonic() - start)
        )
    finally:
        console.end_progress()
    outcome.seconds = time.monotonic() - start
    return outcome


def _publish(tmp: Path, output: Path) -> None:
    """Make the finished file durable, give it normal permissions, and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the output is an ordinary file
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data must be on disk before the name points at it
    finally:
        os.close(fd)
    os.replace(tmp, output)
    dir_fd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _summary(qtype: QuantType, model: GGUFFile, output: Path, outcome: _Outcome) -> str:
    from wicore_cpp.quantize.console import (
        FallbackNote,
        describe_fallbacks,
        format_bytes,
        format_duration,
    )
    from wicore_cpp.quantize.log_events import Fallback, SizeTotals

    out_bytes = output.stat().st_size
    totals = {e.which: e for e in outcome.events if isinstance(e, SizeTotals)}
    bpw = totals["quant"].bpw if "quant" in totals else out_bytes * 8 / model.n_elements
    fallbacks = [
        FallbackNote(e.name, e.wanted.upper(), e.used.upper(),
                     f"row length {e.ncols} is not a multiple of {e.block}")
        for e in outcome.events if isinstance(e, Fallback)
    ]
    return (
        f"{qtype.name}: {model.path.name} {format_bytes(model.size_bytes)} -> {output.name} "
        f"{format_bytes(out_bytes)}, {bpw:.2f} bits per weight, "
        f"{format_duration(outcome.seconds)}; {describe_fallbacks(fallbacks)}"
    )


def _run_check(args: argparse.Namespace, console: Console, original: Path, output: Path) -> int:
    from wicore_cpp.quantize.check import CheckResult
    from wicore_cpp.quantize.child import CheckFailed, CheckJob, check_main, run_in_child

    console.note("checking: next-token distributions of both models on built-in prompts")
    results: list[CheckResult | CheckFailed] = []
    start = time.monotonic()
    job = CheckJob(str(original), str(output), resolve_threads(args.threads))
    exit_code = run_in_child(check_main, job, results.append)
    result = results[-1] if results else None
    if not isinstance(result, CheckResult):
        why = result.message if isinstance(result, CheckFailed) else f"exit code {exit_code}"
        console.error(f"check failed ({output} was written): {why}")
        return EXIT_FAILED
    console.result(_check_line(result, time.monotonic() - start))
    return EXIT_OK


def _check_line(result: CheckResult, seconds: float) -> str:
    from wicore_cpp.quantize.console import format_duration

    return (
        f"check: mean KL divergence {result.mean_kl:.4f} nats (max {result.max_kl:.4f}), "
        f"top-1 agreement {result.top1_agreement:.1%} over {result.n_positions} positions "
        f"of {result.n_prompts} prompts, {format_duration(seconds)}"
    )


# --- --list-types and --dry-run ---------------------------------------------------------------


def _print_types(
    console: Console, types: dict[str, QuantType], model: GGUFFile | None
) -> None:
    from wicore_cpp.quantize.console import format_bytes
    from wicore_cpp.quantize.formats import ALIASES
    from wicore_cpp.quantize.plan import plan_quantization

    plans = {q.name: plan_quantization(model, q.name, q.main_format)
             for q in types.values()} if model is not None else {}
    # largest first: by this file's estimate when there is one, else by the main format
    rows = sorted(types.values(), key=lambda q: (
        -(plans[q.name].output_bytes if plans else q.bpw), q.name))
    head = f"{'TYPE':<10} {'BITS/WEIGHT':>11}"
    if plans:
        head += f"  {'EST. SIZE':>10} {'EST. BPW':>8}"
    lines = [head + "  LLAMA.CPP SAYS"]
    for q in rows:
        line = f"{q.name:<10} {q.bpw:>11.2f}"
        if plans:
            plan = plans[q.name]
            line += f"  {format_bytes(plan.output_bytes):>10} {plan.bpw:>8.2f}"
        line += f"  {q.llama_note.strip()}"
        if q.remark:
            line += f"  [{q.remark}]"
        lines.append(line)
    lines += [
        "",
        "BITS/WEIGHT: of the type's main tensor format. Mixes (_S, _M, _L) keep some tensors "
        "in a larger type,",
        "and norms stay F32, so whole files come out larger; llama.cpp's sizes are for "
        "Llama-3-8B or 7B.",
        "Also accepted: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()) + ".",
    ]
    if model is not None:
        lines.insert(0, f"Estimated sizes for {model.path.name} "
                        f"({format_bytes(model.size_bytes)}, {model.bpw:.2f} bits per weight):")
    console.result("\n".join(lines))


def _print_estimate(
    console: Console, model: GGUFFile, plan: Plan, output: Path | None, free: int | None
) -> None:
    from wicore_cpp.quantize.console import (
        FallbackNote,
        describe_fallbacks,
        describe_type_counts,
        format_bytes,
    )

    fallbacks = [
        FallbackNote(t.name, t.fallback_from or "", t.dst_type, t.fallback or "")
        for t in plan.fallbacks
    ]
    lines = [
        f"dry run, nothing written: {plan.type_name} estimate",
        f"  input:   {model.path}  {format_bytes(model.size_bytes)}, {model.bpw:.2f} bits "
        f"per weight, {len(model.tensors)} tensors",
        f"  output:  about {format_bytes(plan.output_bytes)}, {plan.bpw:.2f} bits per weight "
        f"({plan.output_bytes / model.size_bytes:.0%} of the input)",
        f"  tensors: {describe_type_counts(plan.type_counts())}",
        f"  {describe_fallbacks(fallbacks)}",
    ]
    if output is not None and free is not None:
        lines.append(f"  disk:    {format_bytes(free)} free in {output.parent}")
    console.result("\n".join(lines))
