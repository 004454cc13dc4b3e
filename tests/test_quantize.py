"""`wicore quantize` on the demo model: real llama.cpp runs, bad input, Ctrl-C, serving the result.

The models come from tools/make_model.py (demo preset: gemma3, 3 layers, rows of 256), written
once per session. Quantizations run through `python -m wicore_cpp quantize`, as a user runs
them; the bad-input cases call the command's `run` in-process, which is faster and tests the
same code.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest

from wicore_cpp.cli import build_parser
from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.gguf_file import GGUFFile, GGUFTensor, read_gguf
from wicore_cpp.quantize import command as quantize
from wicore_cpp.quantize.check import compare_distributions, compare_models
from wicore_cpp.quantize.formats import (
    available_types,
    ggml_type_id,
    resolve_type,
    unknown_binding_names,
)
from wicore_cpp.quantize.log_events import (
    Fallback,
    LlamaError,
    QuantizeLogParser,
    SizeTotals,
    TensorDone,
    TensorStarted,
)
from wicore_cpp.quantize.plan import plan_quantization

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_RE = re.compile(
    r"^(?P<type>\S+): (?P<inp>\S+) [\d.]+ \S+ -> (?P<out>\S+) [\d.]+ \S+, "
    r"(?P<bpw>[\d.]+) bits per weight, [\d.]+ s; (?P<fallbacks>.*)$"
)
CHECK_RE = re.compile(
    r"^check: mean KL divergence (?P<kl>[\d.]+) nats \(max [\d.]+\), "
    r"top-1 agreement (?P<top1>[\d.]+)% over (?P<n>\d+) positions of 6 prompts"
)


def _make_model_module():
    spec = importlib.util.spec_from_file_location("make_model", ROOT / "tools" / "make_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model in F32, F16 and Q8_0, in a folder of their own."""
    folder = tmp_path_factory.mktemp("quantize-models")
    make_model = _make_model_module()
    return {
        dtype: make_model.write_model(folder / f"demo-{dtype}.gguf", preset="demo", dtype=dtype)
        for dtype in ("f32", "f16", "q8_0")
    }


def wicore_quantize(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wicore_cpp", "quantize", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def run_inprocess(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    args = build_parser().parse_args(["quantize", *map(str, argv)])
    rc = quantize.run(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tensor_types(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- real quantizations -------------------------------------------------------------------------

CASES = [("f32", "Q8_0"), ("f16", "Q4_0"), ("f16", "Q4_K_M")]


@pytest.fixture(scope="session")
def quantized(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess[str]]]:
    """Each case of CASES quantized once; F32 -> Q8_0 and F16 -> Q4_K_M (the README's example)
    with --check."""
    folder = tmp_path_factory.mktemp("quantized")
    results = {}
    for dtype, qtype in CASES:
        out = folder / f"demo-{qtype}-from-{dtype}.gguf"
        extra = ["--check"] if qtype in ("Q8_0", "Q4_K_M") else []
        # one thread: steadier than two on a small, shared CI machine
        proc = wicore_quantize(models[dtype], out, "--type", qtype, "--threads", "1", *extra)
        results[(dtype, qtype)] = (out, proc)
    return results


@pytest.mark.parametrize(("dtype", "qtype"), CASES)
def test_quantize_demo_model(
    dtype: str, qtype: str, models: dict[str, Path], quantized: dict
) -> None:
    out, proc = quantized[(dtype, qtype)]
    assert proc.returncode == 0, proc.stderr
    # The summary: one line, sizes, bits per weight, fallbacks (none: rows are multiples of 256)
    summary = SUMMARY_RE.match(proc.stdout.splitlines()[0])
    assert summary, proc.stdout
    assert summary["type"] == qtype and summary["out"] == out.name
    assert summary["fallbacks"] == "no fallbacks"
    # Progress over tensors went to stderr and reached the last tensor.
    n_tensors = len(tensor_types(models[dtype]))
    assert f"[{n_tensors:>4}/{n_tensors:>4}] 100%" in proc.stderr
    # The file is a GGUF whose matrices have the target type; norms stay F32.
    types = tensor_types(out)
    main_format = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K"}[qtype]
    assert types["blk.0.attn_q.weight"] == main_format
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert set(types.values()) <= {"F32", "Q8_0", "Q6_K", "Q4_0", "Q4_K"}
    # The estimate made before any work matches what llama.cpp wrote, to the byte here.
    plan = plan_quantization(read_gguf(models[dtype]), qtype, main_format)
    assert {t.name: t.dst_type for t in plan.tensors} == types
    assert abs(plan.output_bytes - out.stat().st_size) <= 256
    assert float(summary["bpw"]) == pytest.approx(plan.bpw, abs=0.01)
    # Nothing else was left beside it, and the file has ordinary permissions.
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    assert out.stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_check_prints_kl_and_top1(quantized: dict) -> None:
    _, proc = quantized[("f32", "Q8_0")]
    assert proc.returncode == 0, proc.stderr
    check = CHECK_RE.match(proc.stdout.splitlines()[1])
    assert check, proc.stdout
    assert 0 <= float(check["kl"]) < 1.0  # Q8_0 moves a distribution only a little
    assert 0 <= float(check["top1"]) <= 100 and int(check["n"]) > 50


def test_readme_quantize_example_matches_a_fresh_run(quantized: dict) -> None:
    """The README's `wicore quantize ... --check` example is what the command prints today."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("$ wicore quantize models/gemma-3-demo.gguf", 1)[1].split("```", 1)[0]

    def figures(text: str) -> list[str]:
        # Sizes, bits per weight, KL, agreement and counts; not file names or timings.
        lines = [line for line in text.splitlines() if line.startswith(("Q4_K_M:", "check:"))]
        return [re.sub(r"\S+\.gguf|, [\d.]+ s\b", "", line) for line in lines]

    _, proc = quantized[("f16", "Q4_K_M")]
    assert proc.returncode == 0, proc.stderr
    assert len(figures(example)) == 2
    assert figures(example) == figures(proc.stdout)


def test_check_of_a_model_against_itself_is_zero(models: dict[str, Path]) -> None:
    result = compare_models(str(models["f16"]), str(models["f16"]), n_threads=2,
                            prompts=("Hello there, how are", "1, 2, 3,"))
    assert result.mean_kl == pytest.approx(0.0, abs=1e-9)
    assert result.top1_agreement == 1.0 and result.n_prompts == 2


def test_compare_distributions_math() -> None:
    p = np.array([[0.0, 0.0], [2.0, 0.0]])
    q = np.array([[0.0, 0.0], [0.0, 2.0]])
    result = compare_distributions([p], [q])
    # position 0: identical -> 0; position 1: KL of softmax([2,0]) vs softmax([0,2])
    s = 1 / (1 + math.exp(-2))
    expected = s * math.log(s / (1 - s)) + (1 - s) * math.log((1 - s) / s)
    assert result.mean_kl == pytest.approx(expected / 2)
    assert result.top1_agreement == 0.5 and result.n_positions == 2


def test_output_loads_and_generates_in_process(quantized: dict) -> None:
    from llama_cpp import Llama

    out, proc = quantized[("f16", "Q4_K_M")]
    assert proc.returncode == 0, proc.stderr
    llm = Llama(model_path=str(out), n_ctx=256, verbose=False)
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
        )
    finally:
        llm.close()
    assert reply["usage"]["completion_tokens"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.e2e
def test_quantized_output_serves_a_chat_completion(quantized: dict, tmp_path: Path) -> None:
    out, proc = quantized[("f16", "Q4_K_M")]
    assert proc.returncode == 0, proc.stderr
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(out), "--model-id", "q",
         "--port", str(port), "--rate-limit-per-minute", "0"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if _http("GET", f"{base}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 120 s"
            time.sleep(0.25)
        status, reply = _http("POST", f"{base}/v1/chat/completions", {
            "model": "q", "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8, "temperature": 0,
        })
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["message"]["content"] or choice["finish_reason"] in ("stop", "length")
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- options ------------------------------------------------------------------------------------


def test_dry_run_estimates_and_writes_nothing(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.gguf"
    rc, stdout, _ = run_inprocess(capsys, models["f16"], out, "--type", "Q4_K_M", "--dry-run")
    assert rc == 0
    assert listing(tmp_path) == []
    plan = plan_quantization(read_gguf(models["f16"]), "Q4_K_M", "Q4_K")
    assert "dry run, nothing written" in stdout
    assert f"{plan.bpw:.2f} bits per weight" in stdout
    assert "free in" in stdout
    # OUTPUT is optional for a dry run
    rc, stdout, _ = run_inprocess(capsys, models["f16"], "--type", "Q8_0", "--dry-run")
    assert rc == 0 and "Q8_0 estimate" in stdout


def test_force_overwrites_and_leave_output_keeps_tied_embeddings(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    proc = wicore_quantize(models["f16"], out, "--type", "Q4_0", "--force", "--leave-output",
                           "--quiet", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress, no notes
    types = tensor_types(out)
    # Gemma 3 ties its output to token_embd: --leave-output keeps it F16 (else Q6_K)
    assert types["token_embd.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    assert listing(tmp_path) == ["out.gguf"]


def test_allow_requantize(models: dict[str, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "re.gguf"
    rc, _, err = run_inprocess(capsys, models["q8_0"], out, "--type", "Q4_0")
    assert rc == 2 and "already quantized (Q8_0 tensors)" in err and "--allow-requantize" in err
    assert listing(tmp_path) == []
    proc = wicore_quantize(models["q8_0"], out, "--type", "Q4_0", "--allow-requantize", "-q")
    assert proc.returncode == 0, proc.stderr
    assert tensor_types(out)["blk.0.ffn_up.weight"] == "Q4_0"


def test_list_types() -> None:
    proc = wicore_quantize("--list-types")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    for name, bpw in (("Q8_0", "8.50"), ("Q6_K", "6.56"), ("Q5_K_M", "5.50"),
                      ("Q4_K_M", "4.50"), ("Q4_0", "4.50"), ("IQ4_NL", "4.50")):
        assert rows[name].split()[1] == bpw, rows[name]
    assert "needs an importance matrix" in rows["IQ2_XS"]
    assert "needs an importance matrix" not in rows["Q4_K_M"]
    assert "NVFP4" not in rows


def test_list_types_with_input_estimates_each(models: dict[str, Path]) -> None:
    proc = wicore_quantize("--list-types", models["f16"])
    assert proc.returncode == 0, proc.stderr
    assert "Estimated sizes for demo-f16.gguf" in proc.stdout
    q8 = next(line for line in proc.stdout.splitlines() if line.startswith("Q8_0 "))
    assert "MiB" in q8


def test_every_binding_type_is_known_and_offered() -> None:
    # A newer llama-cpp-python with a new LLAMA_FTYPE_* must update the table on purpose.
    assert unknown_binding_names() == set()
    types = available_types()
    assert {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL"} <= set(types)
    assert resolve_type("q4_k", types) is types["Q4_K_M"]  # llama.cpp's alias, any case


def test_plan_matches_llama_cpp_dry_run_for_every_type(models: dict[str, Path]) -> None:
    """The Python port of llama.cpp's type choice agrees with llama.cpp, tensor by tensor."""
    import llama_cpp

    parser = QuantizeLogParser()
    events: list = []
    model = read_gguf(models["f16"])
    hook = llama_log()  # the process's one llama.cpp log hook, as the quantizer child uses it
    hook.sink = lambda level, text: events.extend(parser.feed(level, text))
    try:
        for qtype in available_types().values():
            events.clear()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = qtype.ftype
            params.dry_run = True
            rc = llama_cpp.llama_model_quantize(
                str(models["f16"]).encode(), b"/nonexistent/dry-run.gguf", ctypes.byref(params)
            )
            assert rc == 0, (qtype.name, events)
            theirs = {e.name: e.dst_type.upper() for e in events if isinstance(e, TensorDone)}
            plan = plan_quantization(model, qtype.name, qtype.main_format)
            assert {t.name: t.dst_type for t in plan.tensors} == theirs, qtype.name
            quant_mib = next(e.mib for e in events
                             if isinstance(e, SizeTotals) and e.which == "quant")
            assert sum(t.dst_bytes for t in plan.tensors) / 2**20 == pytest.approx(
                quant_mib, abs=0.01)
            assert bool(plan.imatrix_tensors) == qtype.needs_imatrix, qtype.name
    finally:
        hook.sink = None


# --- bad input: one message, exit code 2, nothing written -----------------------------------


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _assert_usage_error(rc: int, err: str, message: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wicore quantize: error: ") and message in lines[0], err


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda m, d: [d / "missing.gguf", d / "o.gguf", "-t", "Q4_0"], "input file not found"),
    (lambda m, d: [m["text"], d / "o.gguf", "-t", "Q4_0"], "input is not a GGUF model"),
    (lambda m, d: [m["truncated"], d / "o.gguf", "-t", "Q4_0"], "input is not a GGUF model"),
    (lambda m, d: [m["f16"], d / "o.gguf", "-t", "Q4_Z"], "unknown type 'Q4_Z'"),
    (lambda m, d: [m["f16"], d / "o.gguf", "-t", "IQ2_XS"], "needs an importance matrix"),
    (lambda m, d: [m["f16"], d / "o.gguf"], "missing --type"),
    (lambda m, d: [m["f16"], "-t", "Q4_0"], "missing OUTPUT"),
    (lambda m, d: ["-t", "Q4_0"], "missing INPUT"),
    (lambda m, d: [m["f16"], d / "o.gguf", "-t", "Q4_0", "--threads", "-1"], "--threads"),
    (lambda m, d: [m["f16"], d / "no" / "o.gguf", "-t", "Q4_0"], "output folder does not exist"),
    (lambda m, d: [m["f16"], d / "exists.gguf", "-t", "Q4_0"], "output exists"),
    (lambda m, d: [m["f16"], m["f16"], "-t", "Q4_0", "--force"], "output is the input file"),
])
def test_bad_input(
    make_args, message: str, models: dict[str, Path], out_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(models["f16"].read_bytes()[:200])
    (out_dir / "exists.gguf").write_bytes(b"earlier output")
    inputs = {**models, "text": text, "truncated": truncated}
    before = {p: p.read_bytes() for p in out_dir.iterdir()}
    rc, _, err = run_inprocess(capsys, *make_args(inputs, out_dir))
    _assert_usage_error(rc, err, message)
    assert {p: p.read_bytes() for p in out_dir.iterdir()} == before  # nothing written


def test_not_enough_disk(
    models: dict[str, Path], out_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = psutil.disk_usage
    monkeypatch.setattr(psutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, _, err = run_inprocess(capsys, models["f16"], out_dir / "o.gguf", "-t", "Q4_K_M")
    _assert_usage_error(rc, err, "not enough free disk")
    assert "1000 B is free" in err
    assert listing(out_dir) == []


def test_bad_input_exit_code_through_the_cli(out_dir: Path) -> None:
    proc = wicore_quantize(out_dir / "missing.gguf", out_dir / "o.gguf", "--type", "Q4_K_M")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"wicore quantize: error: input file not found: {out_dir / 'missing.gguf'}"
    )


def test_failure_inside_llama_cpp_exits_1_and_keeps_earlier_output(out_dir: Path) -> None:
    # A GGUF file our checks accept but llama.cpp cannot load (unknown architecture).
    alien = out_dir.parent / "alien.gguf"
    writer = gguf.GGUFWriter(alien, "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((256, 256), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = out_dir / "o.gguf"
    out.write_bytes(b"earlier output")
    proc = wicore_quantize(alien, out, "--type", "Q8_0", "--force")
    assert proc.returncode == 1
    assert "llama.cpp could not quantize the model: unknown model architecture" in proc.stderr
    assert listing(out_dir) == ["o.gguf"] and out.read_bytes() == b"earlier output"


# --- Ctrl-C -------------------------------------------------------------------------------------


def _quantizer_child(parent: psutil.Process, timeout: float = 30) -> psutil.Process:
    """The spawned process that runs llama.cpp (not multiprocessing's resource tracker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in parent.children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.01)
    raise AssertionError("the quantizer process did not start")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_run_leaves_no_partial_file(
    signum: signal.Signals, models: dict[str, Path], out_dir: Path
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM in the middle of a run."""
    out = out_dir / "out.gguf"
    out.write_bytes(b"earlier output")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "quantize", str(models["f32"]), str(out),
         "--type", "Q4_K_M", "--force", "--threads", "1", "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        worker = _quantizer_child(psutil.Process(proc.pid))
        # Let llama.cpp run in 2 ms slices until it has written into the temporary file, then
        # hold it there: a run caught in the middle, whatever the speed of this machine.
        deadline = time.monotonic() + 60
        while True:
            worker.suspend()
            partial = [p for p in out_dir.iterdir() if p.name.endswith(".partial")]
            if partial and partial[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "llama.cpp never wrote to the temporary file"
            worker.resume()
            time.sleep(0.002)
        assert out.read_bytes() == b"earlier output"
        proc.send_signal(signum)
        worker.resume()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr  # 130 for Ctrl-C
    assert "interrupted" in stderr
    assert listing(out_dir) == ["out.gguf"]  # the partial file is gone
    assert out.read_bytes() == b"earlier output"  # and the earlier output untouched
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


# --- llama.cpp's log, parsed --------------------------------------------------------------------


def test_log_parser_reassembles_pieces() -> None:
    parser = QuantizeLogParser()
    head = ("[   7/  54] blk.0.attn_q.weight                  - [   256,    256,      1,      "
            "1], type =    f16, ")
    # the tensor is announced as soon as its first piece arrives
    assert parser.feed(2, head) == [TensorStarted(7, 54, "blk.0.attn_q.weight")]
    assert parser.feed(2, "converting to q4_K .. ") == []
    assert parser.feed(2, "size =     0.12 MiB ->     0.04 MiB\n") == [
        TensorDone(7, 54, "blk.0.attn_q.weight", "f16", "q4_K", 0.12, 0.04)
    ]
    kept = ("[   1/  54] output_norm.weight                   - [   256,      1,      1,      "
            "1], type =    f32, ")
    assert parser.feed(2, kept)[0] == TensorStarted(1, 54, "output_norm.weight")
    assert parser.feed(2, "size =    0.001 MiB\n") == [
        TensorDone(1, 54, "output_norm.weight", "f32", "f32", 0.001, 0.001)
    ]
    assert parser.feed(2, "llama_model_quantize_impl: quant size  =     2.55 MiB (5.02 BPW)\n") \
        == [SizeTotals("quant", 2.55, 5.02)]


def test_log_parser_fallbacks_and_errors() -> None:
    parser = QuantizeLogParser()
    events = parser.feed(3, "warning: blk.0.ffn_down.weight                - ncols   1000 not "
                            "divisible by 256 (required for type    q4_K) ")
    events += parser.feed(3, "-> falling back to    q5_0\n")
    assert events == [Fallback("blk.0.ffn_down.weight", 1000, 256, "q4_K", "q5_0")]
    events = parser.feed(3, "warning: x.weight - ncols     40 not divisible by  32 (required "
                            "for type    q4_0) (WARNING: must use F16 due to unusual shape) ")
    events += parser.feed(3, "-> falling back to     f16\n")
    assert events == [Fallback("x.weight", 40, 32, "q4_0", "f16")]
    # an error thrown right after a warning that never ended its line
    parser.feed(3, "warning: y.weight - ncols 288 not divisible by 128 (required for type q1_0) ")
    events = parser.feed(4, "llama_model_quantize: failed to quantize: no fallback for q1_0\n")
    assert events == [LlamaError("llama_model_quantize: failed to quantize: no fallback for q1_0",
                                 "no fallback for q1_0")]


def test_plan_counts_fallbacks_like_llama_cpp() -> None:
    # Not a file: a GGUFFile from a tensor list with a row length K-quants cannot take.
    tensors = (
        GGUFTensor("token_embd.weight", "F16", (288, 100), 28800, 57600),
        GGUFTensor("blk.0.ffn_down.weight", "F16", (320, 288), 92160, 184320),
        GGUFTensor("blk.0.ffn_up.weight", "F16", (40, 64), 2560, 5120),
    )
    model = GGUFFile(Path("x.gguf"), "gemma3", size_bytes=0, header_bytes=1024, alignment=32,
                     context_length=0, n_layer=1, n_head=8, n_head_kv=4, n_expert=0,
                     tensors=tensors)
    plan = {t.name: t for t in plan_quantization(model, "Q4_K_M", "Q4_K").tensors}
    assert plan["token_embd.weight"].dst_type == "Q8_0"  # tied output, 288 % 256 != 0
    assert plan["blk.0.ffn_down.weight"].dst_type == "Q8_0"  # Q6_K (more bits) -> Q8_0
    assert plan["blk.0.ffn_down.weight"].fallback_from == "Q6_K"
    assert plan["blk.0.ffn_up.weight"].dst_type == "F16"  # 40 is not a multiple of 32 either
    assert ggml_type_id("Q4_K") == 12 and ggml_type_id("Q2_0") == 42


def test_parser_wiring_matches_cli() -> None:
    parser = argparse.ArgumentParser()
    quantize.add_arguments(parser)
    args = parser.parse_args(["in.gguf", "out.gguf", "-t", "Q4_K_M", "--threads", "3", "--force",
                              "--leave-output", "--allow-requantize", "--check", "-q"])
    assert (args.input, args.output, args.qtype, args.threads) == (
        "in.gguf", "out.gguf", "Q4_K_M", 3)
    assert args.force and args.leave_output and args.allow_requantize and args.check and args.quiet
    assert Counter(vars(args).values())[False] == 2  # --dry-run and --list-types left off
