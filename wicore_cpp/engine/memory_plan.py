"""The memory plan: what the served models will hold on each device, made before anything is
allocated (engine/memory_fit.py fits the settings left unset to it).

Per device (the host's RAM, each GPU) a plan counts what llama.cpp will allocate there:

- weights: on a GPU, the offloaded layers (and, for Gemma's tied embeddings, a copy of the
  embedding table as the output projection); on the host, the weights read from the
  memory-mapped file (the embedding table always stays there), plus the repacked copy
  llama.cpp's CPU backend makes of the quantized matrices its fast kernels use
  (`CPU_REPACK`: on x86 with AVX2, Q4_0, Q4_K, IQ4_NL and MXFP4 matrices);
- the KV cache by kind: full-attention layers hold `ctx_size` cells (padded to 256), Gemma's
  sliding-window layers `window x sequences + prefill_chunk` cells (WiCore runs llama.cpp with
  `swa_full = false` and one unified pool, see engine/backend.py), for the real number of
  sequences, `max_batch_size + urgent_slots (+ fair_slots with API keys) + prompt_cache_seqs`
  (a cached prefix keeps its
  own window of cells in the sliding-window layers);
- compute buffers, as llama.cpp itself reports them for these settings (a `no_alloc` context,
  engine/memory_probe.py), and the host's logits buffer;
- the prompt cache's host tier, when `prompt_cache_host_mib` sets it (its default takes a share
  of the RAM still free once the worker has loaded, so it never crowds out the plan).

The weights and KV figures are computed here from the GGUF header, layer by layer, following
llama.cpp's placement rules (src/llama-model.cpp, src/llama-kv-cache*.cpp of the pinned
source); the tests hold them to llama.cpp's own allocations.

This module is pure Python: it never imports llama_cpp, so the front end can hold plans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from wicore_cpp.gguf_file import GGUFArray, GGUFFile, GGUFTensor, ggml_row_bytes, layer_of

GiB = 1 << 30
MiB = 1 << 20
HOST = "CPU"  # the host pool's name, as llama.cpp names the CPU device
PAD_CELLS = 256  # llama.cpp pads n_ctx and the sliding-window cache to 256 cells
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
    # The prompt cache: sequence ids for cached prefixes (each keeps a window of cells in the
    # sliding-window layers) and the bytes of host RAM its host tier may hold.
    prompt_cache_seqs: int = 0
    prompt_cache: int = 0
    fair_slots: int = 0  # fair-share slots (with API keys only)

    @property
    def n_seq_max(self) -> int:
        return (self.max_batch_size + self.urgent_slots + self.fair_slots
                + self.prompt_cache_seqs)

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
        return round_up(self.ctx_size, PAD_CELLS)

    def swa_cells(self, shape: ModelShape) -> int:
        # llama_kv_cache_iswa: min(base size, pad(n_swa * n_seq_max + n_ubatch, 256)), with a
        # unified pool; n_ubatch = n_batch = prefill_chunk in the worker's context.
        return min(self.full_cells(),
                   round_up(shape.n_swa * self.n_seq_max + self.prefill_chunk, PAD_CELLS))


def round_up(n: int, to: int) -> int:
    """n rounded up to a multiple of `to`."""
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


def gib(n: int) -> str:
    """A size for people: GiB down to 0.1 GiB, then MiB."""
    if n == 0:
        return "0"
    if n >= GiB // 10:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"

