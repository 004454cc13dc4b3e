#!/usr/bin/env python3
"""The memory tables of README.md and models/README.md, made by the memory planner.

For Gemma-3-27B-it's real shape in three files (Q4_K_M, Q8_0 and Google's QAT Q4_0), written
sparse by tools/make_model.py, the planner (wicore_cpp/engine/memory_plan.py and
memory_fit.py) computes what a GPU would hold with every layer offloaded, and what
`wicore serve` fits on cards of 24, 32, 48 and 80 GiB. The compute buffers are llama.cpp's
own figures for each context, from a no_alloc context on the CPU backend
(engine/memory_probe.py): the CUDA backend sizes the same graph, but no GPU was at hand to
measure its buffers, so they are the CPU's.

    python tools/memory_tables.py            # print the tables
    python tools/memory_tables.py --write    # replace them in README.md and models/README.md

tests/test_memory_plan.py checks that the READMEs hold exactly what this prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from wicore_cpp.config import DEFAULT_CTX_SIZE
from wicore_cpp.engine.memory_fit import fit
from wicore_cpp.engine.memory_plan import (
    HOST,
    ContextRequest,
    CpuFeatures,
    GiB,
    Measured,
    ModelLoad,
    ModelShape,
    Pool,
    Settings,
    make_plan,
)
from wicore_cpp.engine.memory_probe import MemoryProbe
from wicore_cpp.gguf_file import read_gguf

ROOT = Path(__file__).resolve().parent.parent
FILES = {"Q4_K_M": "q4_k_m", "Q8_0": "q8_0", "QAT Q4_0": "qat-q4_0"}
CONTEXTS = (8192, 32768, 131072)
CARDS_GIB = (24, 32, 48, 80)
GPU = "GPU"
MARGIN = GiB
BEGIN = "<!-- memory tables: made by tools/memory_tables.py, do not edit by hand -->"
END = "<!-- end of memory tables -->"
# The defaults the tables are for (config.py): 16 + 1 + 4 sequences, 512-token prefill chunks.
DEFAULTS = Settings(ctx_size=DEFAULT_CTX_SIZE, max_batch_size=16, urgent_slots=1,
                    n_gpu_layers=-1, kv_cache_type="f16", prefill_chunk=512, flash_attn="auto",
                    prompt_cache_seqs=4)


def _make_model_module():
    spec = importlib.util.spec_from_file_location("make_model", ROOT / "tools" / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_models(folder: Path) -> dict[str, Path]:
    """The three sparse 27B files (a few MB of disk each)."""
    make_model = _make_model_module()
    return {label: make_model.write_sparse_model(folder / f"gemma-3-27b-{dtype}.gguf",
                                                 "gemma-3-27b", dtype)
            for label, dtype in FILES.items()}


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


class _Planner:
    """The planner for a card of a given size holding every layer (or fewer, if fitted)."""

    def __init__(self, probe: MemoryProbe, path: Path) -> None:
        self.shape = ModelShape.from_gguf(read_gguf(path))
        self.probe = probe
        self.cache: dict[ContextRequest, Measured] = {}

    def compute(self, shape: ModelShape, s: Settings) -> Measured:
        # llama.cpp's compute buffers for the whole graph on one device (the CPU here), placed
        # on the card; the logits buffer stays on the host, as on a real card.
        request = ContextRequest(s.full_cells(), s.prefill_chunk, s.n_seq_max, s.n_outputs_max,
                                 s.kv_cache_type, s.flash_attn, 0)
        if request not in self.cache:
            self.cache[request] = self.probe.measure(shape.path, request)
        m = self.cache[request]
        return replace(m, compute={GPU: sum(m.compute.values())})

    def pools(self, card_gib: int) -> tuple[Pool, ...]:
        return (Pool(HOST, "host RAM", 1 << 40, 1 << 40, "assumed ample"),
                Pool(GPU, f"{card_gib} GiB card", card_gib * GiB, card_gib * GiB, "card size"))

    def load(self) -> tuple[ModelLoad, ...]:
        return (ModelLoad("gemma-3-27b-it", self.shape, ((GPU,),)),)


def tables(files: dict[str, Path]) -> str:
    """The markdown both READMEs carry between BEGIN and END."""
    need_rows, fit_rows = [], []
    with MemoryProbe() as probe:
        for label, path in files.items():
            planner = _Planner(probe, path)
            plans = [make_plan(planner.load(), replace(DEFAULTS, ctx_size=ctx),
                               planner.pools(80), MARGIN, CpuFeatures(), planner.compute)
                     for ctx in CONTEXTS]
            gpu = [p.usage[GPU] for p in plans]
            need_rows.append(
                f"| {label} | {_gib(planner.shape.file_bytes)} | {_gib(gpu[0].weights)} | "
                + " | ".join(_gib(u.kv) for u in gpu) + " | "
                + " | ".join(f"**{_gib(u.total)}**" for u in gpu) + " |")
            for kv in ("f16", "q8_0"):
                cells = []
                for card in CARDS_GIB:
                    result = fit(planner.load(), replace(DEFAULTS, kv_cache_type=kv), (), 4096,
                                 planner.pools(card), MARGIN, CpuFeatures(), planner.compute,
                                 explain=False)
                    cells.append(_fitted(result, planner.shape))
                fit_rows.append(f"| {label} | {kv} | " + " | ".join(cells) + " |")
    ctx_heads = [f"{c // 1024}K" for c in CONTEXTS]
    return "\n".join([
        BEGIN,
        "Need on the GPU with every layer offloaded, for 21 sequences (`max_batch_size` 16 + "
        "`urgent_slots` 1 + `prompt_cache_seqs` 4), an f16 KV cache and flash attention; total = weights + KV cache + "
        "compute buffers:",
        "",
        "| file | file size | weights on the GPU | " + " | ".join(f"KV {h}" for h in ctx_heads)
        + " | " + " | ".join(f"total {h}" for h in ctx_heads) + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(CONTEXTS)),
        *need_rows,
        "",
        "What `wicore serve` fits with its defaults (`ctx_size`, `max_batch_size`, "
        "`n_gpu_layers` and `prompt_cache_seqs` left unset) on a card with that much free "
        "memory, keeping a 1 GiB margin (\"no cache seqs\": the prompt cache gave up its own "
        "sequence ids, the first thing the fit gives up, and keeps finished sequences in idle "
        "decode slots only):",
        "",
        "| file | `kv_cache_type` | " + " | ".join(f"{c} GiB" for c in CARDS_GIB) + " |",
        "|---|---|" + "---|" * len(CARDS_GIB),
        *fit_rows,
        END,
    ])


def _fitted(result, shape: ModelShape) -> str:
    s = result.plan.settings
    if not result.fits:
        return "does not fit"
    parts = [f"ctx {s.ctx_size}"]
    if s.prompt_cache_seqs != DEFAULTS.prompt_cache_seqs:
        parts.append("no cache seqs" if s.prompt_cache_seqs == 0
                     else f"{s.prompt_cache_seqs} cache seqs")
    if s.max_batch_size != DEFAULTS.max_batch_size:
        parts.append(f"batch {s.max_batch_size}")
    layers = s.layers_on_gpu(shape)
    if layers < shape.n_layer + 1:
        parts.append(f"{layers}/{shape.n_layer + 1} layers")
    return ", ".join(parts)


def replace_section(text: str, section: str) -> str:
    """`text` with its generated section replaced by `section`."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + section + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="replace the tables in README.md and models/README.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        section = tables(write_models(Path(folder)))
    if not args.write:
        sys.stdout.write(section + "\n")
        return 0
    for readme in (ROOT / "README.md", ROOT / "models" / "README.md"):
        readme.write_text(replace_section(readme.read_text(encoding="utf-8"), section),
                          encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
