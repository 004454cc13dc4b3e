"""The start-up memory plan: its figures against what llama.cpp allocates, the fit of unset
settings, `wicore serve --dry-run`, and the READMEs' tables.

Gemma-3-27B itself is a sparse file of its exact shape (tools/make_model.py, preset
gemma-3-27b): llama.cpp plans for it (no_alloc) in a fraction of a second. Real allocations are
checked on small models here and on the 27B file in tests/test_big_model.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from tests.conftest import MODEL_ID, ROOT, load_make_model, load_tool
from wicore_cpp.config import load_config
from wicore_cpp.engine.memory_fit import fit, plan_for_config, settings_from_config
from wicore_cpp.engine.memory_plan import (
    HOST,
    ContextRequest,
    CpuFeatures,
    GiB,
    MiB,
    ModelLoad,
    ModelShape,
    Pool,
    Settings,
    make_plan,
)
from wicore_cpp.engine.memory_probe import MemoryProbe
from wicore_cpp.gguf_file import read_gguf


def _memory_tables():
    return load_tool("memory_tables")


@pytest.fixture(scope="module")
def g27(gemma_27b_files) -> dict[str, Path]:
    return gemma_27b_files


@pytest.fixture(scope="module")
def probe():
    with MemoryProbe() as p:
        yield p


@pytest.fixture(scope="module")
def bench_q4km(tmp_path_factory) -> Path:
    """The bench model's shape with Q4_K_M's types: llama.cpp repacks its Q4_K matrices."""
    return load_make_model().write_sparse_model(
        tmp_path_factory.mktemp("bench-q4km") / "bench-q4km.gguf", "bench", "q4_k_m")


DEFAULTS = settings_from_config(load_config(environ={}, flags={}))
# The issue's 17 sequences: the defaults without the prompt cache's own 4 sequence ids.
NO_CACHE_SEQS = replace(DEFAULTS, prompt_cache_seqs=0)


def _within(ours: int, theirs: int, tolerance: float = 0.02) -> bool:
    return abs(ours - theirs) <= tolerance * max(theirs, 1)


# -- the figures against llama.cpp -------------------------------------------------------------


@pytest.mark.parametrize("ctx, batch, kv, chunk", [
    (32768, 16, "f16", 512), (8192, 16, "f16", 512), (131072, 4, "q8_0", 512),
    (4096, 1, "q4_0", 256), (20000, 8, "f16", 1024),
])
def test_kv_cache_is_what_llama_cpp_reserves(g27, probe, ctx, batch, kv, chunk):
    """Both kinds of layers, for the real number of sequences (max_batch_size + urgent_slots +
    prompt_cache_seqs),
    as llama.cpp's own KV cache reports them for the same context (no_alloc)."""
    shape = ModelShape.from_gguf(read_gguf(g27["Q4_K_M"]))
    s = replace(DEFAULTS, ctx_size=ctx, max_batch_size=batch, kv_cache_type=kv,
                prefill_chunk=chunk, flash_attn="on")
    plan = make_plan((ModelLoad("m", shape, ((),)),), s, (Pool(HOST, "", GiB, GiB, ""),), 0,
                     CpuFeatures(), None)
    measured = probe.measure(shape.path, ContextRequest(
        s.ctx_size, chunk, s.n_seq_max, s.n_outputs_max, kv, "on", 0))
    (full_cells, full_layers, fk, fv), (swa_cells, swa_layers, sk, sv) = measured.kv
    m = plan.models[0]
    assert (m.full_cells, shape.n_full_layers) == (full_cells, full_layers) == (
        (ctx + 255) // 256 * 256, 10)
    assert (m.swa_cells, 62 - shape.n_full_layers) == (swa_cells, swa_layers) == (
        min(full_cells, (1024 * s.n_seq_max + chunk + 255) // 256 * 256), 52)
    usage = plan.usage[HOST]
    assert _within(usage.kv_full, fk + fv, 0.0001) and _within(usage.kv_swa, sk + sv, 0.0001)


def test_the_issues_figures_for_the_27b_defaults(g27):
    """10 layers x 32,768 cells = 2,560 MiB and 52 layers x 17,920 cells = 7,280 MiB for 17
    sequences; the prompt cache's 4 sequence ids add 4 windows: 52 x 22,016 cells."""
    shape = ModelShape.from_gguf(read_gguf(g27["Q4_K_M"]))
    plan = make_plan((ModelLoad("m", shape, ((),)),), NO_CACHE_SEQS, (Pool(HOST, "", 0, 0, ""),),
                     0, CpuFeatures(avx2=True), None)
    u = plan.usage[HOST]
    assert (u.kv_full, u.kv_swa) == (2560 * MiB, 7280 * MiB)
    assert DEFAULTS.prompt_cache_seqs == 4
    cached = make_plan((ModelLoad("m", shape, ((),)),), DEFAULTS, (Pool(HOST, "", 0, 0, ""),), 0,
                       CpuFeatures(avx2=True), None).usage[HOST]
    assert (cached.kv_full, cached.kv_swa) == (2560 * MiB, 22016 * 7280 // 17920 * MiB)
    # On an AVX2 CPU llama.cpp repacks the 374 Q4_K matrices: 11.4 GiB beside the mapped file.
    assert round(u.repacked / GiB, 1) == 11.4 and u.weights + u.repacked == shape.weight_bytes


_REAL_LOAD = """
import sys
from pathlib import Path
from wicore_cpp.engine.backend import BatchContext, Model
from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.engine.memory_probe import _LogCollector, parse_log
import dataclasses, orjson
lines = _LogCollector()
llama_log().sink = lines
path, n_ctx, n_batch, n_seq, kv, fa = sys.argv[1:7]
model = Model(Path(path))
ctx = BatchContext(model, n_ctx=int(n_ctx), n_batch=int(n_batch), n_seq_max=int(n_seq),
                   threads=1, flash_attn=fa, kv_cache_type=kv)
print(orjson.dumps(dataclasses.asdict(parse_log(lines.take()))).decode())
"""


def _real_allocation(path: Path, s: Settings) -> dict:
    """llama.cpp's buffers when the worker's own code loads the model and makes its context."""
    out = subprocess.run(
        [sys.executable, "-c", _REAL_LOAD, str(path), str(s.ctx_size), str(s.prefill_chunk),
         str(s.n_seq_max), s.kv_cache_type, s.flash_attn],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)


@pytest.mark.parametrize("which, settings", [
    ("bench-q4km", dict(ctx_size=8192)),
    ("bench-q4km", dict(ctx_size=2048, max_batch_size=3, kv_cache_type="q8_0")),
    ("demo-f32", dict(ctx_size=16384, flash_attn="off")),
])
def test_plan_agrees_with_what_llama_cpp_allocates(which, settings, bench_q4km, demo_model_path,
                                                   probe):
    """Weights (mapped and repacked), KV cache, compute and logits buffers within 2% of the
    buffers llama.cpp allocates when the worker's code loads the model for real."""
    path = bench_q4km if which == "bench-q4km" else demo_model_path
    config = load_config(environ={}, flags={"model": str(path), **settings})
    result = plan_for_config(config, {"m": read_gguf(path)}, probe)
    assert result.fits and result.plan.measured
    u = result.plan.usage[HOST]
    real = _real_allocation(path, result.plan.settings)
    buffers = real["model_buffers"]
    assert _within(u.repacked, buffers.get("CPU_REPACK", 0))
    if which == "bench-q4km":
        assert u.repacked > 0.5 * u.weights  # Q4_K matrices really are repacked on this CPU
    # The mapped buffer spans the file from its first tensor to its last (token_embd, then the
    # layers, then output_norm), repacked ones included: every weight the plan counts.
    assert _within(u.weights + u.repacked, buffers["CPU_Mapped"])
    (full_cells, _, fk, fv), (swa_cells, _, sk, sv) = real["kv"]
    assert _within(u.kv_full, fk + fv) and _within(u.kv_swa, sk + sv)
    assert (result.plan.models[0].full_cells, result.plan.models[0].swa_cells) == (full_cells,
                                                                                  swa_cells)
    assert _within(u.compute, sum(real["compute"].values()))
    assert _within(u.output, sum(real["output"].values()))


# -- the fit -----------------------------------------------------------------------------------


def _gpu_plan(shape: ModelShape, card_gib: float, requested: Settings, fixed=(), ctx_min=4096):
    pools = (Pool(HOST, "", 1 << 40, 1 << 40, ""),
             Pool("CUDA0", "", int(card_gib * GiB), int(card_gib * GiB), ""))
    return fit((ModelLoad("m", shape, (("CUDA0",),)),), requested, fixed, ctx_min, pools, GiB,
               CpuFeatures(avx2=True), None)


def test_gpu_placement_follows_llama_cpp(g27):
    """All layers offloaded: the GPU holds every layer and a copy of the tied embedding table
    as the output projection; the host keeps the table itself. Offloading n layers moves the
    last ones (and the output layer) to the GPU, with their KV cache."""
    shape = ModelShape.from_gguf(read_gguf(g27["Q4_K_M"]))
    embd = shape.tensors[[t.name for t in shape.tensors].index("token_embd.weight")].n_bytes
    full = _gpu_plan(shape, 80, NO_CACHE_SEQS).plan
    gpu, host = full.usage["CUDA0"], full.usage[HOST]
    assert gpu.weights == shape.weight_bytes and host.weights == embd and host.repacked == 0
    assert (gpu.kv_full, gpu.kv_swa, host.kv) == (2560 * MiB, 7280 * MiB, 0)

    part = _gpu_plan(shape, 80, replace(DEFAULTS, n_gpu_layers=13)).plan  # 12 layers + output
    gpu, host = part.usage["CUDA0"], part.usage[HOST]
    on_gpu = sum(t.n_bytes for t in shape.tensors if t.name.startswith(
        tuple(f"blk.{i}." for i in range(50, 62))) or t.name == "output_norm.weight")
    assert gpu.weights == on_gpu + embd
    assert gpu.kv_full == 2 * 256 * MiB  # layers 53 and 59 of the ten full-attention ones
    assert host.weights + host.repacked == shape.weight_bytes - on_gpu
    assert host.repacked > 0  # the CPU's layers are repacked, the GPU's never


def test_fit_shrinks_the_context_first(g27):
    shape = ModelShape.from_gguf(read_gguf(g27["Q4_K_M"]))
    result = _gpu_plan(shape, 24, DEFAULTS)
    s = result.plan.settings
    assert result.fits and 4096 <= s.ctx_size < 32768 and s.ctx_size % 256 == 0
    assert (s.max_batch_size, s.n_gpu_layers) == (16, -1)
    assert [st.setting for st in result.steps] == ["prompt_cache_seqs", "ctx_size"]
    assert s.prompt_cache_seqs == 0
    from wicore_cpp.engine.memory_fit import describe

    text = "\n".join(describe(result))
    assert f"fit: ctx_size 32768 -> {s.ctx_size}: at 32768 the plan needs " in text
    assert "CUDA0 (): 24.0 GiB free" in text and text.endswith("fits")
    # The largest: one more step of 256 cells would not fit.
    assert not make_plan((ModelLoad("m", shape, (("CUDA0",),)),),
                         replace(s, ctx_size=s.ctx_size + 256), result.plan.pools, GiB,
                         CpuFeatures(), None).fits


def test_fit_then_sequences_then_layers(g27):
    shape = ModelShape.from_gguf(read_gguf(g27["Q8_0"]))  # 26.7 GiB of weights
    on_32 = _gpu_plan(shape, 32, DEFAULTS)
    assert on_32.fits and on_32.plan.settings.n_gpu_layers == -1
    on_29 = _gpu_plan(shape, 29.5, DEFAULTS)  # 1.8 GiB beside the weights: not 17 sequences
    s = on_29.plan.settings
    assert on_29.fits and 4096 <= s.ctx_size < 32768 and 1 <= s.max_batch_size < 16
    assert s.n_gpu_layers == -1
    assert [st.setting for st in on_29.steps] == ["prompt_cache_seqs", "ctx_size",
                                                  "max_batch_size"]
    on_24 = _gpu_plan(shape, 24, DEFAULTS)
    assert on_24.fits and 0 < on_24.plan.settings.n_gpu_layers < 63
    assert "n_gpu_layers" in [st.setting for st in on_24.steps]


def test_explicit_settings_are_never_changed(g27):
    shape = ModelShape.from_gguf(read_gguf(g27["Q8_0"]))
    kept = _gpu_plan(shape, 24, DEFAULTS, fixed=("max_batch_size",))
    assert kept.fits and kept.plan.settings.max_batch_size == 16
    assert kept.plan.settings.n_gpu_layers < 63  # layers gave way instead
    stuck = _gpu_plan(shape, 24, replace(DEFAULTS, n_gpu_layers=63), fixed=("n_gpu_layers",))
    assert not stuck.fits and stuck.plan.settings.n_gpu_layers == 63
    assert "CUDA0 needs" in stuck.problem and "n_gpu_layers 63 as set" in stuck.problem
    low = _gpu_plan(shape, 24, DEFAULTS, ctx_min=8192)
    assert low.plan.settings.ctx_size >= 8192


def test_repacking_follows_the_cpu(g27):
    """Which matrices llama.cpp repacks depends on the CPU: none without AVX2 (x86)."""
    shape = ModelShape.from_gguf(read_gguf(g27["QAT Q4_0"]))
    load = (ModelLoad("m", shape, ((),)),)
    pool = (Pool(HOST, "", 0, 0, ""),)
    avx2 = make_plan(load, DEFAULTS, pool, 0, CpuFeatures(avx2=True), None).usage[HOST]
    plain = make_plan(load, DEFAULTS, pool, 0, CpuFeatures(), None).usage[HOST]
    embd = next(t for t in shape.tensors if t.name == "token_embd.weight")
    assert embd.ggml_type == "F16" and plain.repacked == 0
    assert avx2.weights == embd.n_bytes + sum(t.n_bytes for t in shape.tensors
                                              if t.ggml_type == "F32")
    assert avx2.repacked == plain.weights - avx2.weights


def test_devices_workers_and_what_counts_as_set(g27):
    """The pools a Config plans for (a budget replaces the free memory of each GPU, or of the
    host without one), the GPUs each worker sees (gpu_ids round-robin), and which settings the
    fit may change."""
    from wicore_cpp.engine.memory_fit import fitted_config, fixed_settings, loads_for, pools_for
    from wicore_cpp.engine.memory_plan import DeviceInfo, HostReport

    cards = (DeviceInfo("CUDA0", "RTX 4090", "gpu", 23 * GiB, 24 * GiB),
             DeviceInfo("CUDA1", "RTX 4090", "gpu", 22 * GiB, 24 * GiB))
    host = HostReport(True, cards, CpuFeatures(avx2=True), 100 * GiB, 128 * GiB)
    config = load_config(environ={}, flags={"workers": 3, "gpu_ids": "[1, 0]"})
    pools = pools_for(config, host)
    assert [(p.name, p.free) for p in pools] == [(HOST, 100 * GiB), ("CUDA0", 23 * GiB),
                                                ("CUDA1", 22 * GiB)]
    shape = ModelShape.from_gguf(read_gguf(g27["Q4_K_M"]))
    (load,) = loads_for(config, {"m": shape}, pools)
    assert load.worker_gpus == (("CUDA1",), ("CUDA0",), ("CUDA1",))
    plan = make_plan((load,), DEFAULTS, pools, GiB, host.cpu, None)
    assert plan.usage["CUDA1"].weights == 2 * plan.usage["CUDA0"].weights == 2 * (
        shape.weight_bytes)
    # The mapped file is in the page cache once, however many workers map it.
    assert plan.usage[HOST].weights == next(
        t.n_bytes for t in shape.tensors if t.name == "token_embd.weight")

    budget = load_config(environ={"WICORE_MEMORY_BUDGET": "30GiB"}, flags={})
    assert [p.free for p in pools_for(budget, host)] == [100 * GiB, 30 * GiB, 30 * GiB]
    cpu_only = replace(host, gpu_offload=False)
    assert [(p.name, p.free, p.source) for p in pools_for(budget, cpu_only)] == [
        (HOST, 30 * GiB, "--memory-budget")]
    shared = loads_for(load_config(environ={}, flags={}), {"m": shape}, pools)
    assert shared[0].worker_gpus == (("CUDA0", "CUDA1"),)  # no gpu_ids: every GPU, split
    with pytest.raises(ValueError, match="gpu_ids names GPU 2"):
        loads_for(load_config(environ={}, flags={"gpu_ids": "[2]"}), {"m": shape}, pools)

    assert fixed_settings(load_config(environ={}, flags={})) == ()
    assert fixed_settings(load_config(environ={"WICORE_MAX_BATCH_SIZE": "16"},
                                      flags={"ctx_size": 8192, "n_gpu_layers": -1})) == (
        "ctx_size", "max_batch_size", "n_gpu_layers")
    fitted = _gpu_plan(shape, 24, DEFAULTS)
    config = fitted_config(load_config(environ={}, flags={}), fitted)
    assert config.ctx_size == fitted.plan.settings.ctx_size < 32768
    assert (config.max_batch_size, config.n_gpu_layers) == (16, -1)


# -- wicore serve --dry-run --------------------------------------------------------------------


def dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wicore_cpp", "serve", "--dry-run", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_budget_of_20gib_fits_a_smaller_context(g27):
    out = dry_run("--model", str(g27["Q4_K_M"]), "--memory-budget", "20GiB", "--json")
    assert out.returncode == 0, out.stderr
    plan = orjson.loads(out.stdout)
    assert plan["fits"] and 4096 <= plan["settings"]["ctx_size"] < 32768
    host = plan["devices"][0]
    assert host["free_bytes"] == 20 * GiB and host["free_source"] == "--memory-budget"
    assert host["need_bytes"] <= host["usable_bytes"] == 19 * GiB
    assert [s["setting"] for s in plan["fit_steps"]] == ["prompt_cache_seqs", "ctx_size"]
    assert plan["fit_steps"][0]["need_before_bytes"] > 19 * GiB


def test_budget_of_64gib_keeps_the_defaults(g27):
    out = dry_run("--model", str(g27["Q4_K_M"]), "--memory-budget", "64GiB", "--json")
    assert out.returncode == 0, out.stderr
    plan = orjson.loads(out.stdout)
    assert plan["fits"] and plan["fit_steps"] == []
    assert (plan["settings"]["ctx_size"], plan["settings"]["n_seq_max"]) == (32768, 21)
    need = plan["devices"][0]["need"]
    assert (need["kv_full"], need["kv_swa"]) == (2560 * MiB, 22016 * 7280 // 17920 * MiB)


def test_explicit_context_that_does_not_fit_exits_2_with_the_numbers(g27, probe):
    """`wicore serve` stops before starting anything, with one message: the need, the free
    memory, and settings that would fit (which do)."""
    out = subprocess.run(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(g27["Q4_K_M"]),
         "--port", "0", "--memory-budget", "20GiB", "--ctx-size", "131072"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "listening" not in out.stderr and "Traceback" not in out.stderr
    message = errors[0]
    assert "CPU needs 32.8 GiB" in message and "20.0 GiB free (--memory-budget)" in message
    assert "ctx_size 131072 as set" in message
    suggested = message.split("These settings would fit: ", 1)[1].split()
    assert suggested[0] == "--ctx-size" and int(suggested[1]) < 32768
    flags = {name.removeprefix("--").replace("-", "_"): value
             for name, value in zip(suggested[::2], suggested[1::2], strict=True)}
    config = load_config(environ={}, flags={"model": str(g27["Q4_K_M"]),
                                            "memory_budget": "20GiB", **flags})
    again = plan_for_config(config, {"m": read_gguf(g27["Q4_K_M"])}, probe)
    assert again.fits and again.steps == ()


def test_dry_run_text_and_bad_flags(g27):
    out = dry_run("--model", str(g27["QAT Q4_0"]), "--memory-budget", "20GiB",
                  "--ctx-size", "32768")
    assert out.returncode == 2
    assert "KV cache, sliding-window layers (52 layers x 17920 cells)" in out.stdout
    assert "weights repacked for the CPU (CPU_REPACK)" in out.stdout
    assert "DOES NOT FIT" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("the memory plan does not fit: CPU needs")
    bad = dry_run("--model", str(g27["QAT Q4_0"]), "--memory-budget", "lots")
    assert bad.returncode == 2 and "memory_budget" in bad.stderr
    json_alone = subprocess.run([sys.executable, "-m", "wicore_cpp", "serve", "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json_alone.returncode == 2 and "--dry-run" in json_alone.stderr


@pytest.mark.e2e
def test_start_up_fit_reaches_the_workers(start_server, demo_model_path):
    """A budget too small for 32,768 cells: the server logs the fit and its worker's context is
    the planned one."""
    flags = ("--ctx-size", "0", "--memory-margin", "0", "--memory-budget", "100MiB",
             "--flash-attn", "off")
    out = dry_run("--model", str(demo_model_path), *flags, "--threads", "2", "--json")
    planned = orjson.loads(out.stdout)["settings"]["ctx_size"]
    assert out.returncode == 0 and planned < 8192
    server = start_server(*flags)
    log = server.log()
    assert f"memory fit: ctx_size 32768 -> {planned}: at 32768 the plan needs" in log
    assert f"(n_ctx={planned}," in log
    # The scheduler admits against the fitted context: a prompt longer than it is refused.
    assert _chat(server.url, "Hello")[0] == 200
    status, body = _chat(server.url, "hello world " * planned)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert str(planned) in body["error"]["message"]
    # SIGTERM, not the fixture's SIGKILL: the server takes its helper processes down with it.
    assert server.stop() == 0


def _chat(url: str, text: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{url}/v1/chat/completions", method="POST",
        data=orjson.dumps({"model": MODEL_ID, "max_tokens": 4,
                           "messages": [{"role": "user", "content": text}]}),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


# -- the READMEs -------------------------------------------------------------------------------


def test_readme_memory_tables_are_the_planners(g27):
    tables = _memory_tables()
    section = tables.tables(g27)
    for readme in ("README.md", "models/README.md"):
        text = (ROOT / readme).read_text(encoding="utf-8")
        ours = text.split(tables.BEGIN, 1)[1].split(tables.END, 1)[0]
        assert tables.BEGIN + ours + tables.END == section, (
            f"{readme}: run `python tools/memory_tables.py --write`")


def test_readme_dry_run_example_matches_a_fresh_run(g27, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("$ wicore serve --dry-run --memory-budget 20GiB\n", 1)[1]
    example = example.split("```", 1)[0]
    (tmp_path / "gemma-3-27b-it-Q4_K_M.gguf").symlink_to(g27["Q4_K_M"])
    out = dry_run("--models-dir", str(tmp_path), "--memory-budget", "20GiB")
    assert out.returncode == 0, out.stderr
    assert example == out.stdout.replace(str(tmp_path), "models")
