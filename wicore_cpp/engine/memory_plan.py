"""The memory plan: what the served models will hold on each device, made before anything is
allocated, and the fit of the settings left unset so that it all fits.

Per device (the host's RAM, each GPU) a plan counts what llama.cpp will allocate there:

- weights: on a GPU, the offloaded layers (and, for Gemma's tied embeddings, a copy of the
  embedding table as the output projection); on the host, the weights read from the
  memory-mapped file (the embedding table always stays there), plus the repacked copy
  llama.cpp's CPU backend makes of the quantized matrices its fast kernels use
  (`CPU_REPACK`: on x86 with AVX2, Q4_0, Q4_K, IQ4_NL and MXFP4 matrices);
- the KV cache by kind: full-attention layers hold `ctx_size` cells (padded to 256), Gemma's
  sliding-window layers `window x sequences + prefill_chunk` cells (WiCore runs llama.cpp with
  `swa_full = false` and one unified pool, see engine/backend.py), for the real number of
  sequences, `max_batch_size + urgent_slots`;
- compute buffers, as llama.cpp itself reports them for these settings (a `no_alloc` context,
  engine/memory_probe.py), and the host's logits buffer;
- the prompt cache's host tier (0 until that cache has a setting: see `Settings.prompt_cache`).

The weights and KV figures are computed here from the GGUF header, layer by layer, following
llama.cpp's placement rules (src/llama-model.cpp, src/llama-kv-cache*.cpp of the pinned
source); the tests hold them to llama.cpp's own allocations.

Fitting changes only settings left unset, in this order: `ctx_size` shrinks (the largest that
fits, never below `ctx_size_min`), then `max_batch_size`, then `n_gpu_layers`; the later a
setting comes, the more it is protected. A setting given explicitly is never changed: if the
plan does not fit, start-up stops with a message naming the need, the free memory and settings
that would fit.

This module is pure Python: it never imports llama_cpp, so the front end can hold plans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from wicore_cpp.config import DEFAULT_CTX_SIZE, Config
from wicore_cpp.gguf_file import GGUFArray, GGUFFile, GGUFTensor, ggml_row_bytes, layer_of

log = logging.getLogger("wicore.memory")

GiB = 1 << 30
MiB = 1 << 20
HOST = "CPU"  # the host pool's name, as llama.cpp names the CPU device
_PAD_CELLS = 256  # llama.cpp pads n_ctx and the sliding-window cache to 256 cells
KV_GGML_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
# llama.cpp's default sliding-window pattern per architecture when the file does not say
# (load_swa_pattern: every n-th layer is a full-attention one).
_SWA_PATTERN_DEFAULT = {"gemma3": 6, "gemma2": 2, "cohere2": 4}


# -- what llama.cpp reports ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A ggml device other than the CPU, with its memory as ggml reports it."""

    name: str  # e.g. "CUDA0"
    description: str  # e.g. "NVIDIA GeForce RTX 4090"
    kind: str  # "gpu", "igpu", "accel"
    free: int
    total: int


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """The CPU backend's SIMD features: they decide which weights llama.cpp repacks.

    `repacks` follows ggml_repack_get_optimal_repack_type (ggml/src/ggml-cpu/repack.cpp) for
    x86 and ARM; RISC-V and s390x kernels are not covered (they would repack more).
    """

    avx2: bool = False
    avx512: bool = False
    neon: bool = False
    matmul_int8: bool = False
    dotprod: bool = False
    sve: bool = False
    sve_cnt: int = 0
    source: str = ""

    def repacks(self, ggml_type: str, rows: int) -> bool:
        """Whether a 2-D weight of this type and row count is repacked for MUL_MAT."""
        arm_i8mm = self.neon and self.matmul_int8
        arm_dot = self.neon and self.dotprod
        if ggml_type == "Q4_0":
            return ((self.avx2 or (self.sve and self.matmul_int8 and self.sve_cnt == 32))
                    and rows % 8 == 0) or ((arm_i8mm or arm_dot) and rows % 4 == 0)
        if ggml_type == "Q4_K":
            return (self.avx2 or arm_i8mm or arm_dot) and rows % 8 == 0
        if ggml_type == "Q2_K":
            return self.avx512 and rows % 8 == 0
        if ggml_type in ("Q5_K", "Q6_K"):
            return (arm_i8mm or arm_dot) and rows % 8 == 0
        if ggml_type in ("IQ4_NL", "MXFP4"):
            return (self.avx2 and rows % 8 == 0) or (arm_dot and rows % 4 == 0)
        if ggml_type in ("Q8_0", "Q1_0"):
            return (arm_i8mm or arm_dot) and rows % 4 == 0
        return False


@dataclass(frozen=True, slots=True)
class HostReport:
    """What the machine has, as llama.cpp's build sees it (engine/memory_probe.py)."""

    gpu_offload: bool  # the build can offload (CUDA, Metal, ...)
    devices: tuple[DeviceInfo, ...]  # ggml's devices other than the CPU, in ggml's order
    cpu: CpuFeatures
    host_available: int  # RAM available to new allocations (psutil), bytes
    host_total: int


@dataclass(frozen=True, slots=True)
class Measured:
    """Sizes llama.cpp logged for one simulated context (engine/memory_probe.py)."""

    kv: tuple[tuple[int, int, int, int], ...]  # per cache: (cells, layers, K bytes, V bytes)
    compute: dict[str, int]  # buffer name ("CPU", "CUDA0", "CUDA_Host") -> bytes
    output: dict[str, int]  # the logits buffer, by buffer name
    model_buffers: dict[str, int]  # weight buffers llama.cpp made (sizes are 0 in no_alloc)
    flash_attn: bool | None  # what flash_attn "auto" resolved to, when it was auto


# -- the model and the settings --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What decides a model's memory, read from its GGUF header."""

    path: Path
    file_bytes: int
    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int  # sliding window in tokens; 0: none
    is_swa: tuple[bool, ...]  # per layer
    kv_width: tuple[tuple[int, int], ...]  # per layer: K and V values per cell
    tensors: tuple[GGUFTensor, ...]
    tied_output: bool

    @classmethod
    def from_gguf(cls, m: GGUFFile) -> ModelShape:
        n_layer = m.n_layer
        n_embd = _int(m.arch_value("embedding_length"), 0)
        head_k = _int(m.arch_value("attention.key_length"), n_embd // max(1, m.n_head))
        head_v = _int(m.arch_value("attention.value_length"), head_k)
        heads_kv = _per_layer(m.arch_value("attention.head_count_kv"), n_layer, m.n_head_kv)
        n_swa = _int(m.arch_value("attention.sliding_window"), 0)
        pattern = m.arch_value("attention.sliding_window_pattern")
        if n_swa <= 0:
            is_swa = (False,) * n_layer
        elif isinstance(pattern, tuple) and len(pattern) >= n_layer:
            is_swa = tuple(bool(x) for x in pattern[:n_layer])
        else:
            n = _int(pattern, _SWA_PATTERN_DEFAULT.get(m.architecture, 0))
            # Without a known pattern every layer is counted as a full one: an overestimate.
            is_swa = tuple(n > 0 and i % n < n - 1 for i in range(n_layer))
        tokens = m.metadata.get("tokenizer.ggml.tokens")
        embd = m.tensor("token_embd.weight")
        if isinstance(tokens, GGUFArray):
            n_vocab = tokens.length
        elif isinstance(tokens, tuple):
            n_vocab = len(tokens)
        else:
            n_vocab = embd.shape[1] if embd and len(embd.shape) > 1 else 0
        return cls(
            path=m.path, file_bytes=m.size_bytes, architecture=m.architecture, n_layer=n_layer,
            n_embd=n_embd, n_vocab=n_vocab, n_ctx_train=m.context_length, n_swa=n_swa,
            is_swa=is_swa, kv_width=tuple((head_k * h, head_v * h) for h in heads_kv),
            tensors=m.tensors, tied_output=m.has_tied_embeddings,
        )

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_full_layers(self) -> int:
        return self.is_swa.count(False)


def _int(value: object, default: int) -> int:
    if isinstance(value, tuple):
        value = value[0] if value else default
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _per_layer(value: object, n_layer: int, default: int) -> tuple[int, ...]:
    if isinstance(value, tuple) and len(value) >= n_layer:
        return tuple(int(v) for v in value[:n_layer])
    return (_int(value, default),) * n_layer


@dataclass(frozen=True, slots=True)
class Settings:
    """The settings that decide memory, as the plan (and the fit) sees them."""

    ctx_size: int
    max_batch_size: int
    urgent_slots: int
    n_gpu_layers: int  # -1: all
    kv_cache_type: str
    prefill_chunk: int
    flash_attn: str
    # The prompt cache's host-memory tier (issue 8): bytes of host RAM it may hold. Its setting
    # does not exist yet; `settings_from_config` is where it is to be read.
    prompt_cache: int = 0

    @property
    def n_seq_max(self) -> int:
        return self.max_batch_size + self.urgent_slots

    @property
    def n_outputs_max(self) -> int:
        # Each sequence asks for at most one token's logits per decode step (the last prompt
        # token, or its newest token), so the worker's context reserves logits for that many
        # rows rather than for a whole prefill chunk (engine/backend.py).
        return self.n_seq_max

    def layers_on_gpu(self, shape: ModelShape) -> int:
        """Offloaded layers, counting the output layer as llama.cpp does (all: n_layer + 1)."""
        n = shape.n_layer + 1
        return n if self.n_gpu_layers < 0 else min(self.n_gpu_layers, n)

    def full_cells(self) -> int:
        return _pad(self.ctx_size, _PAD_CELLS)

    def swa_cells(self, shape: ModelShape) -> int:
        # llama_kv_cache_iswa: min(base size, pad(n_swa * n_seq_max + n_ubatch, 256)), with a
        # unified pool; n_ubatch = n_batch = prefill_chunk in the worker's context.
        return min(self.full_cells(),
                   _pad(shape.n_swa * self.n_seq_max + self.prefill_chunk, _PAD_CELLS))


def settings_from_config(config: Config) -> Settings:
    return Settings(
        ctx_size=config.ctx_size or DEFAULT_CTX_SIZE,
        max_batch_size=config.max_batch_size,
        urgent_slots=config.urgent_slots,
        n_gpu_layers=config.n_gpu_layers,
        kv_cache_type=config.kv_cache_type,
        prefill_chunk=config.prefill_chunk,
        flash_attn="on" if config.kv_cache_type != "f16" else config.flash_attn,
        # The prompt cache (issue 8): its in-pool tier lives inside ctx_size and costs nothing
        # here; its host-memory tier is to be read from its setting here, once there is one.
        prompt_cache=0,
    )


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# -- devices -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    """A memory the plan places things in: the host's RAM, or one GPU's memory."""

    name: str  # HOST, or ggml's device name ("CUDA0")
    description: str
    free: int  # what the plan may use, before the margin
    total: int
    source: str  # where `free` comes from

    @property
    def is_host(self) -> bool:
        return self.name == HOST


@dataclass(slots=True)
class Usage:
    """What one pool holds, by kind, in bytes."""

    weights: int = 0  # GPU: offloaded weights; host: weights read from the mapped file
    repacked: int = 0  # host: llama.cpp's repacked copy of quantized weights (CPU_REPACK)
    kv_full: int = 0  # KV cache of full-attention layers
    kv_swa: int = 0  # KV cache of sliding-window layers
    compute: int = 0  # llama.cpp's compute buffers
    output: int = 0  # host: the logits buffer
    prompt_cache: int = 0  # host: the prompt cache's host tier

    @property
    def total(self) -> int:
        return (self.weights + self.repacked + self.kv_full + self.kv_swa + self.compute
                + self.output + self.prompt_cache)

    @property
    def kv(self) -> int:
        return self.kv_full + self.kv_swa

    def add(self, other: Usage) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# Compute and output buffers for one worker of a model: {buffer name: bytes} each, keyed like
# llama.cpp's buffers ("CPU", "CUDA0", "CUDA_Host"). engine/memory_probe.py measures them;
# None when llama.cpp could not say.
ComputeSource = Callable[[ModelShape, Settings], "Measured | None"]


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One served model: its shape and, per worker, the GPUs that worker sees."""

    model_id: str
    shape: ModelShape
    worker_gpus: tuple[tuple[str, ...], ...]  # one entry per worker: pool names of its GPUs


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """One model's part of a plan: where its layers go and what one worker of it holds."""

    model_id: str
    shape: ModelShape
    n_workers: int
    layers_on_gpu: int  # of n_layer + 1
    full_cells: int
    swa_cells: int
    per_worker: dict[str, Usage]  # the first worker's usage per pool


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Per pool, everything the served models will hold, for one set of settings."""

    settings: Settings
    pools: tuple[Pool, ...]
    margin: int
    models: tuple[ModelPlan, ...]
    usage: dict[str, Usage]  # pool name -> all workers of all models together
    measured: bool  # compute buffers from llama.cpp (True) or not counted

    def usable(self, pool: Pool) -> int:
        return max(0, pool.free - self.margin)

    def short(self) -> list[tuple[Pool, int, int]]:
        """(pool, need, usable) for every pool that is over its usable memory."""
        return [(p, self.usage[p.name].total, self.usable(p)) for p in self.pools
                if p.name in self.usage and self.usage[p.name].total > self.usable(p)]

    @property
    def fits(self) -> bool:
        return not self.short()

    def as_dict(self) -> dict:
        """The plan for `--dry-run --json`: plain numbers (bytes) and names."""
        return {
            "fits": self.fits,
            "settings": {**asdict(self.settings), "n_seq_max": self.settings.n_seq_max},
            "margin_bytes": self.margin,
            "compute_measured_by_llama_cpp": self.measured,
            "devices": [
                {"name": p.name, "description": p.description, "free_bytes": p.free,
                 "total_bytes": p.total, "free_source": p.source,
                 "usable_bytes": self.usable(p),
                 "need_bytes": self.usage.get(p.name, Usage()).total,
                 "need": asdict(self.usage.get(p.name, Usage()))}
                for p in self.pools
            ],
            "models": [
                {"model_id": m.model_id, "path": str(m.shape.path), "workers": m.n_workers,
                 "file_bytes": m.shape.file_bytes, "n_layer": m.shape.n_layer,
                 "layers_on_gpu": m.layers_on_gpu,
                 "kv_full": {"layers": m.shape.n_full_layers, "cells": m.full_cells},
                 "kv_swa": {"layers": m.shape.n_layer - m.shape.n_full_layers,
                            "cells": m.swa_cells if m.shape.n_swa else 0,
                            "window": m.shape.n_swa},
                 "per_worker": {name: asdict(u) for name, u in m.per_worker.items()}}
                for m in self.models
            ],
        }


def layer_pools(shape: ModelShape, n_on_gpu: int, gpus: tuple[Pool, ...]) -> list[str]:
    """The pool of each layer, 0..n_layer (n_layer: the output layer), as llama.cpp assigns
    them: the last `n_on_gpu` layers go to the GPUs, split in proportion to their free memory."""
    n_all = shape.n_layer + 1
    if not gpus or n_on_gpu <= 0:
        return [HOST] * n_all
    start = max(n_all - n_on_gpu, 0)
    total = sum(g.free for g in gpus) or len(gpus)
    bounds, acc = [], 0.0
    for g in gpus:
        acc += (g.free or 1) / total
        bounds.append(acc)
    pools = []
    for il in range(n_all):
        if il < start:
            pools.append(HOST)
            continue
        x = (il - start) / n_on_gpu
        index = next((i for i, b in enumerate(bounds) if x < b), len(gpus) - 1)
        pools.append(gpus[index].name)
    return pools


def _is_matrix(t: GGUFTensor) -> bool:
    return len(t.shape) >= 2 and t.shape[1] > 1


def worker_usage(
    shape: ModelShape,
    settings: Settings,
    gpus: tuple[Pool, ...],
    cpu: CpuFeatures,
    measured: Measured | None,
) -> dict[str, Usage]:
    """What one worker of `shape` holds in each pool."""
    use: dict[str, Usage] = {HOST: Usage()}
    for g in gpus:
        use[g.name] = Usage()
    placement = layer_pools(shape, settings.layers_on_gpu(shape) if gpus else 0, gpus)
    out_pool = placement[shape.n_layer]

    for t in shape.tensors:
        if t.name == "token_embd.weight":
            pool = HOST  # llama.cpp keeps the input layer on the CPU, read from the map
        else:
            layer = layer_of(t.name)
            pool = out_pool if layer < 0 else placement[layer]
        if pool != HOST:
            use[pool].weights += t.n_bytes
        elif t.name != "token_embd.weight" and _is_matrix(t) and cpu.repacks(t.ggml_type,
                                                                            t.shape[1]):
            use[HOST].repacked += t.n_bytes
        else:
            use[HOST].weights += t.n_bytes
    embd = next((t for t in shape.tensors if t.name == "token_embd.weight"), None)
    if shape.tied_output and embd is not None:
        # The output projection is the embedding table, a second tensor wherever the output
        # layer's buffer type differs from the input's (TENSOR_DUPLICATED in llama-model.cpp).
        if out_pool != HOST:
            use[out_pool].weights += embd.n_bytes
        elif cpu.repacks(embd.ggml_type, embd.shape[1]):
            use[HOST].repacked += embd.n_bytes

    k_type = v_type = KV_GGML_TYPES[settings.kv_cache_type]
    full, swa = settings.full_cells(), settings.swa_cells(shape)
    for il in range(shape.n_layer):
        k, v = shape.kv_width[il]
        per_cell = ggml_row_bytes(k_type, k) + ggml_row_bytes(v_type, v)
        if shape.is_swa[il]:
            use[placement[il]].kv_swa += per_cell * swa
        else:
            use[placement[il]].kv_full += per_cell * full

    if measured is not None:
        gpu_names = [g.name for g in gpus]
        for buffers, kind in ((measured.compute, "compute"), (measured.output, "output")):
            for name, size in buffers.items():
                target = _buffer_pool(name, gpu_names, out_pool)
                setattr(use[target], kind, getattr(use[target], kind) + size)
    use[HOST].prompt_cache += settings.prompt_cache
    return use


def _buffer_pool(buffer: str, gpu_names: list[str], out_pool: str) -> str:
    """The pool a llama.cpp buffer lives in: a GPU's own buffers are named after it
    ("CUDA0"); host buffers are "CPU", "CUDA_Host", ..."""
    if buffer in gpu_names:
        return buffer
    if buffer == HOST or buffer.endswith("_Host") or not gpu_names:
        return HOST
    # A GPU the helper process saw under another name (a worker pinned to one GPU sees it as
    # its device 0): the GPU that holds the output layer, where the big buffers are.
    return out_pool


def make_plan(
    loads: Iterable[ModelLoad],
    settings: Settings,
    pools: tuple[Pool, ...],
    margin: int,
    cpu: CpuFeatures,
    compute: ComputeSource | None,
) -> MemoryPlan:
    """The plan for `settings`: each model's workers, summed per pool."""
    by_name = {p.name: p for p in pools}
    usage = {p.name: Usage() for p in pools}
    models = []
    all_measured = compute is not None
    for load in loads:
        measured = compute(load.shape, settings) if compute is not None else None
        all_measured = all_measured and measured is not None
        first: dict[str, Usage] | None = None
        for gpu_names in load.worker_gpus:
            gpus = tuple(by_name[n] for n in gpu_names)
            use = worker_usage(load.shape, settings, gpus, cpu, measured)
            if first is None:
                first = use
            else:
                # Workers map the same file: its pages are in the page cache once. Their
                # repacked copies, caches and buffers are their own.
                use = {**use, HOST: replace(use[HOST], weights=0)}
            for name, u in use.items():
                usage[name].add(u)
        on_gpu = settings.layers_on_gpu(load.shape) if load.worker_gpus[0] else 0
        models.append(ModelPlan(
            model_id=load.model_id, shape=load.shape, n_workers=len(load.worker_gpus),
            layers_on_gpu=on_gpu, full_cells=settings.full_cells(),
            swa_cells=settings.swa_cells(load.shape), per_worker=first or {}))
    return MemoryPlan(settings=settings, pools=pools, margin=margin, models=tuple(models),
                      usage=usage, measured=all_measured)


# -- fitting -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitStep:
    """One setting the fit changed, with the numbers that made it."""

    setting: str
    before: int
    after: int
    pool: str
    need_before: int
    need_after: int
    usable: int

    def describe(self) -> str:
        before = "all" if self.setting == "n_gpu_layers" and self.before < 0 else self.before
        return (f"{self.setting} {before} -> {self.after}: at {before} the plan needs "
                f"{gib(self.need_before)} on {self.pool}, {gib(self.usable)} usable; "
                f"at {self.after} it needs {gib(self.need_after)}")


@dataclass(frozen=True, slots=True)
class FitResult:
    """The plan start-up will use, how it was reached, and whether it fits."""

    plan: MemoryPlan
    steps: tuple[FitStep, ...]
    requested: Settings
    fixed: tuple[str, ...]  # settings given explicitly, never changed
    problem: str | None = None  # why it cannot fit (start-up stops with exit code 2)

    @property
    def fits(self) -> bool:
        return self.problem is None


def gib(n: int) -> str:
    """A size for people: GiB down to 0.1 GiB, then MiB."""
    if n == 0:
        return "0"
    if n >= GiB // 10:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def _layers(n: int) -> str:
    return f"{n} layer{'' if n == 1 else 's'}"


_STEP = _PAD_CELLS  # contexts are tried in llama.cpp's cell padding


def fit(
    loads: tuple[ModelLoad, ...],
    requested: Settings,
    fixed: Iterable[str],
    ctx_size_min: int,
    pools: tuple[Pool, ...],
    margin: int,
    cpu: CpuFeatures,
    compute: ComputeSource | None,
    *,
    explain: bool = True,
) -> FitResult:
    """Fit the settings not in `fixed` so that the plan fits every pool.

    Lexicographic: the most protected setting (n_gpu_layers) is kept as high as it can be with
    the others at their lowest, then max_batch_size, then ctx_size takes what is left; each
    search is a bisection, since more of any of them never needs less memory.

    Asking llama.cpp costs a tenth of a second per context but a model load (seconds) per
    offload count, so the searches for layers and sequences count compute buffers as llama.cpp
    sizes them for the requested settings (which are larger: buffers only grow with context
    and sequences); the context search, last, uses its exact figures. Should the plan found not
    fit after all (a different offload split), the searches run again with exact figures.
    """
    fixed = tuple(fixed)
    first = make_plan(loads, requested, pools, margin, cpu, compute)
    if first.fits:
        return FitResult(first, (), requested, fixed)

    bound = None
    if compute is not None:
        def bound(shape: ModelShape, s: Settings) -> Measured | None:
            return compute(shape, replace(s, ctx_size=max(s.ctx_size, requested.ctx_size),
                                          max_batch_size=max(s.max_batch_size,
                                                             requested.max_batch_size),
                                          n_gpu_layers=requested.n_gpu_layers))

    found = _search(loads, requested, fixed, ctx_size_min, pools, margin, cpu, bound, compute)
    final = make_plan(loads, found, pools, margin, cpu, compute)
    if not final.fits and compute is not None:
        found = _search(loads, requested, fixed, ctx_size_min, pools, margin, cpu, compute,
                        compute)
        final = make_plan(loads, found, pools, margin, cpu, compute)
    steps = tuple(_steps(requested, found, pools, margin, cpu, loads, compute, first))
    if final.fits:
        return FitResult(final, steps, requested, fixed)
    problem = (_explain(final, requested, fixed, loads, ctx_size_min, pools, margin, cpu,
                        compute) if explain else "does not fit")
    return FitResult(final, steps, requested, fixed, problem=problem)


def _search(loads: tuple[ModelLoad, ...], requested: Settings, fixed: tuple[str, ...],
            ctx_size_min: int, pools: tuple[Pool, ...], margin: int, cpu: CpuFeatures,
            coarse: ComputeSource | None, exact: ComputeSource | None) -> Settings:
    """The lexicographic search of `fit`: layers and sequences with `coarse` compute figures,
    the context with `exact` ones."""
    def fits(s: Settings, compute: ComputeSource | None = coarse) -> bool:
        return make_plan(loads, s, pools, margin, cpu, compute).fits

    has_gpu = any(load.worker_gpus[0] for load in loads)
    can_ctx = "ctx_size" not in fixed and requested.ctx_size > ctx_size_min
    can_batch = "max_batch_size" not in fixed and requested.max_batch_size > 1
    s = replace(requested,
                ctx_size=ctx_size_min if can_ctx else requested.ctx_size,
                max_batch_size=1 if can_batch else requested.max_batch_size)
    if "n_gpu_layers" not in fixed and has_gpu:
        top = max(load.shape.n_layer for load in loads) + 1
        start = top if requested.n_gpu_layers < 0 else min(requested.n_gpu_layers, top)
        best = _largest(0, start, lambda n: fits(replace(s, n_gpu_layers=n)))
        if best is not None and best < start:
            s = replace(s, n_gpu_layers=best)
    if can_batch:
        best = _largest(1, requested.max_batch_size, lambda n: fits(replace(s, max_batch_size=n)))
        s = replace(s, max_batch_size=requested.max_batch_size if best is None else best)
    if can_ctx:
        lo, hi = _pad(ctx_size_min, _STEP) // _STEP, requested.ctx_size // _STEP
        best = _largest(lo, hi, lambda n: fits(replace(s, ctx_size=n * _STEP), exact))
        if best is None:
            s = replace(s, ctx_size=ctx_size_min)
        else:
            s = replace(s, ctx_size=requested.ctx_size if best == hi else best * _STEP)
    return s


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest n in [lo, hi] with ok(n), assuming ok is monotone (true, then false)."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _worst(plan: MemoryPlan) -> tuple[str, int, int]:
    """The pool furthest over (or nearest to) its usable memory: (name, need, usable)."""
    rows = [(p.name, plan.usage[p.name].total, plan.usable(p)) for p in plan.pools
            if plan.usage[p.name].total > 0]
    return max(rows, key=lambda r: r[1] - r[2])


def _steps(requested: Settings, final: Settings, pools: tuple[Pool, ...], margin: int,
           cpu: CpuFeatures, loads: tuple[ModelLoad, ...], compute: ComputeSource | None,
           first: MemoryPlan) -> Iterable[FitStep]:
    """One step per changed setting, in the order fitting gives them up: context, then
    sequences, then layers; each measured from the settings before it."""
    current = requested
    before = first
    for name in ("ctx_size", "max_batch_size", "n_gpu_layers"):
        old, new = getattr(current, name), getattr(final, name)
        if old == new:
            continue
        current = replace(current, **{name: new})
        after = make_plan(loads, current, pools, margin, cpu, compute)
        pool, need, usable = _worst(before)
        yield FitStep(name, old, new, pool, need, after.usage[pool].total, usable)
        before = after


def _explain(plan: MemoryPlan, requested: Settings, fixed: tuple[str, ...],
             loads: tuple[ModelLoad, ...], ctx_size_min: int, pools: tuple[Pool, ...],
             margin: int, cpu: CpuFeatures, compute: ComputeSource | None) -> str:
    """One message: what is needed where, what is free, and settings that would fit."""
    parts = []
    for pool, need, usable in plan.short():
        u = plan.usage[pool.name]
        parts.append(
            f"{pool.name} needs {gib(need)} (weights {gib(u.weights + u.repacked)}, KV cache "
            f"{gib(u.kv)}, compute {gib(u.compute + u.output)}) but has {gib(pool.free)} "
            f"free ({pool.source}), {gib(usable)} after the {gib(margin)} margin")
    s = plan.settings
    given = ", ".join(f"{name} {getattr(s, name)}" for name in fixed
                      if name in ("ctx_size", "max_batch_size", "n_gpu_layers"))
    message = "the memory plan does not fit: " + "; ".join(parts) + (
        f" (with {given} as set" + (f", kv_cache_type {s.kv_cache_type}" if s.kv_cache_type
                                    != "f16" else "") + ")" if given else "")
    suggestion = _suggest(loads, requested, ctx_size_min, pools, margin, cpu, compute)
    return message + ". " + suggestion


def _suggest(loads: tuple[ModelLoad, ...], requested: Settings, ctx_size_min: int,
             pools: tuple[Pool, ...], margin: int, cpu: CpuFeatures,
             compute: ComputeSource | None) -> str:
    """Settings that would fit, found by fitting with nothing fixed (and then a smaller
    KV cache type)."""
    for kv in dict.fromkeys((requested.kv_cache_type, "q8_0", "q4_0")):
        trial = replace(requested, kv_cache_type=kv, flash_attn="on" if kv != "f16"
                        else requested.flash_attn)
        result = fit(loads, trial, (), ctx_size_min, pools, margin, cpu, compute, explain=False)
        if result.fits:
            s = result.plan.settings
            flags = [f"--ctx-size {s.ctx_size}", f"--max-batch-size {s.max_batch_size}"]
            if any(load.worker_gpus[0] for load in loads):
                flags.append(f"--n-gpu-layers {s.layers_on_gpu(loads[0].shape)}")
            if kv != "f16":
                flags.append(f"--kv-cache-type {kv}")
            return "These settings would fit: " + " ".join(flags)
    pool, need, usable = _worst(result.plan)  # the last try: the smallest there is
    s = result.plan.settings
    return (f"Nothing fits: even ctx_size {s.ctx_size} with max_batch_size {s.max_batch_size} "
            f"and a q4_0 KV cache needs {gib(need)} on {pool}, {gib(usable)} usable; a smaller "
            "model file (wicore quantize) or more memory is needed")


# -- from a Config -----------------------------------------------------------------------------


class Probe(Protocol):
    """llama.cpp's answers (engine/memory_probe.MemoryProbe). Both raise RuntimeError when
    llama.cpp cannot answer."""

    def host(self) -> HostReport: ...

    def measure(self, model_path: Path, request: ContextRequest) -> Measured: ...


@dataclass(frozen=True, slots=True)
class ContextRequest:
    """One context for llama.cpp to simulate: the settings that decide its memory."""

    n_ctx: int
    n_batch: int
    n_seq_max: int
    n_outputs_max: int
    kv_cache_type: str
    flash_attn: str
    n_gpu_layers: int


def pools_for(config: Config, host: HostReport) -> tuple[Pool, ...]:
    """The host and the GPUs the workers may use, with the memory each may plan for."""
    budget = int(config.memory_budget) if config.memory_budget is not None else None
    gpus = [d for d in host.devices if d.kind in ("gpu", "igpu")] if host.gpu_offload else []
    host_pool = Pool(HOST, "host RAM", host.host_available, host.host_total,
                     "available RAM, psutil")
    if budget is not None and not gpus:
        host_pool = replace(host_pool, free=budget, source="--memory-budget")
    pools = [host_pool]
    for d in gpus:
        if budget is not None:
            pools.append(Pool(d.name, d.description, budget, d.total, "--memory-budget"))
        else:
            pools.append(Pool(d.name, d.description, d.free, d.total, "ggml_backend_dev_memory"))
    return tuple(pools)


def loads_for(config: Config, shapes: dict[str, ModelShape],
              pools: tuple[Pool, ...]) -> tuple[ModelLoad, ...]:
    """Each model's workers and the GPUs each sees (engine/workers.py: gpu_ids round-robin,
    one CUDA_VISIBLE_DEVICES entry per worker; without gpu_ids every worker sees every GPU)."""
    gpus = [p.name for p in pools if not p.is_host]
    for gpu_id in config.gpu_ids:
        if gpus and not 0 <= gpu_id < len(gpus):
            raise ValueError(f"gpu_ids names GPU {gpu_id}, but llama.cpp sees {len(gpus)} "
                             f"({', '.join(gpus)})")
    loads = []
    for model_id, shape in shapes.items():
        workers = []
        for i in range(config.workers):
            if not gpus:
                workers.append(())
            elif config.gpu_ids:
                workers.append((gpus[config.gpu_ids[i % len(config.gpu_ids)]],))
            else:
                workers.append(tuple(gpus))
        loads.append(ModelLoad(model_id, shape, tuple(workers)))
    return tuple(loads)


def fixed_settings(config: Config) -> tuple[str, ...]:
    """The settings the fit may not change: those given explicitly."""
    fixed = []
    if config.ctx_size:
        fixed.append("ctx_size")
    for name in ("max_batch_size", "n_gpu_layers"):
        if config.is_set(name):
            fixed.append(name)
    return tuple(fixed)


def plan_for_config(config: Config, models: dict[str, GGUFFile], probe: Probe) -> FitResult:
    """The start-up plan: devices from the probe (or the budget), settings fitted."""
    host = probe.host()
    pools = pools_for(config, host)
    shapes = {model_id: ModelShape.from_gguf(m) for model_id, m in models.items()}
    loads = loads_for(config, shapes, pools)
    uses_gpu = any(load.worker_gpus[0] for load in loads)
    cache: dict[tuple[Path, ContextRequest], Measured | None] = {}

    def compute(shape: ModelShape, s: Settings) -> Measured | None:
        request = ContextRequest(
            n_ctx=s.full_cells(), n_batch=s.prefill_chunk, n_seq_max=s.n_seq_max,
            n_outputs_max=s.n_outputs_max, kv_cache_type=s.kv_cache_type,
            flash_attn=s.flash_attn, n_gpu_layers=s.layers_on_gpu(shape) if uses_gpu else 0)
        key = (shape.path, request)
        if key not in cache:
            try:
                cache[key] = probe.measure(shape.path, request)
            except RuntimeError as exc:
                # The worker will meet the same refusal and report it; the plan goes on with
                # the weights and the KV cache, which do not need llama.cpp.
                log.warning("memory plan without compute buffers for %s: %s", shape.path, exc)
                cache[key] = None
        return cache[key]

    return fit(loads, settings_from_config(config), fixed_settings(config), config.ctx_size_min,
               pools, int(config.memory_margin), host.cpu, compute)


def fitted_config(config: Config, result: FitResult) -> Config:
    """`config` with the fitted settings filled in, as the workers and scheduler get it."""
    s = result.plan.settings
    update = {"ctx_size": s.ctx_size, "max_batch_size": s.max_batch_size}
    if s.n_gpu_layers != config.n_gpu_layers:
        update["n_gpu_layers"] = s.n_gpu_layers
    return config.model_copy(update=update)


# -- what it says ------------------------------------------------------------------------------


def describe(result: FitResult) -> list[str]:
    """The plan as text lines: settings, then each device's need by kind (for --dry-run)."""
    plan = result.plan
    s = plan.settings
    lines = []
    for m in plan.models:
        swa_layers = m.shape.n_layer - m.shape.n_full_layers
        lines.append(
            f"model {m.model_id}: {m.shape.path} ({gib(m.shape.file_bytes)}, "
            f"{m.shape.n_layer} layers: {m.shape.n_full_layers} full-attention"
            + (f", {swa_layers} with a {m.shape.n_swa}-token window" if m.shape.n_swa else "")
            + f"), {m.n_workers} worker{'s' if m.n_workers > 1 else ''}, "
            f"{m.layers_on_gpu} of {m.shape.n_layer + 1} layers on the GPU")
    fitted = {step.setting for step in result.steps}
    has_gpu = any(not p.is_host for p in plan.pools)
    layers = "all" if s.n_gpu_layers < 0 else str(s.n_gpu_layers)
    tag = {name: " (fitted)" if name in fitted else " (set)" if name in result.fixed
           else "" for name in ("ctx_size", "max_batch_size", "n_gpu_layers")}
    lines.append(
        f"settings: ctx_size {s.ctx_size}{tag['ctx_size']}, max_batch_size "
        f"{s.max_batch_size}{tag['max_batch_size']} + urgent_slots {s.urgent_slots} = "
        f"{s.n_seq_max} sequences, n_gpu_layers "
        f"{layers + tag['n_gpu_layers'] if has_gpu else 'none (no GPU offload)'}, "
        f"kv_cache_type {s.kv_cache_type}, flash_attn {s.flash_attn}, prefill_chunk "
        f"{s.prefill_chunk}")
    for step in result.steps:
        lines.append(f"fit: {step.describe()}")
    for pool in plan.pools:
        u = plan.usage[pool.name]
        if pool.is_host or u.total:
            lines.extend(_pool_lines(plan, pool, u))
    if not plan.measured:
        lines.append("(compute buffers not counted: llama.cpp could not simulate the context)")
    lines.append("fits" if result.fits else str(result.problem))
    return lines


def _pool_lines(plan: MemoryPlan, pool: Pool, u: Usage) -> list[str]:
    cells = {m.model_id: m for m in plan.models}
    rows = [("weights" + (" (mapped from the file)" if pool.is_host else ""), u.weights)]
    if pool.is_host:
        rows.append(("weights repacked for the CPU (CPU_REPACK)", u.repacked))
    one = next(iter(cells.values()), None)
    full = f" ({_layers(one.shape.n_full_layers)} x {one.full_cells} cells)" if one and len(
        cells) == 1 else ""
    swa = (f" ({_layers(one.shape.n_layer - one.shape.n_full_layers)} x {one.swa_cells} cells)"
           if one and len(cells) == 1 and one.shape.n_swa else "")
    rows += [(f"KV cache, full-attention layers{full}", u.kv_full),
             (f"KV cache, sliding-window layers{swa}", u.kv_swa),
             ("compute buffers", u.compute)]
    if pool.is_host:
        rows += [("logits buffer", u.output),
                 ("prompt cache, host tier", u.prompt_cache)]
    usable = plan.usable(pool)
    head = (f"{pool.name} ({pool.description}): {gib(pool.free)} free ({pool.source}), "
            f"{gib(usable)} usable after the {gib(plan.margin)} margin")
    verdict = "fits" if u.total <= usable else "DOES NOT FIT"
    body = [f"  {label:<58} {gib(size):>10}" for label, size in rows if size or pool.is_host]
    return [head, *body, f"  {'total':<58} {gib(u.total):>10}  {verdict}"]
