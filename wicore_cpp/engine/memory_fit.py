"""The fit: settings left unset are fitted so that the memory plan (engine/memory_plan.py) fits
every device, and a plan that cannot fit is explained.

Fitting changes only settings left unset, in this order: the prompt cache's own sequence ids
(`prompt_cache_seqs`) go, then `ctx_size` shrinks (the largest that fits, never below
`ctx_size_min`), then `max_batch_size`, then `n_gpu_layers`; the later a setting comes, the
more it is kept. A setting given explicitly is never changed: if the plan
does not fit, start-up stops with one message naming the need, the free memory and settings
that would fit. Also here: the plan for a Config (its devices, workers and fixed settings) and
the plan as text for `wicore serve --dry-run`.

Pure Python, like the plan: llama.cpp's figures come through a `Probe`
(engine/memory_probe.py) in a helper process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from wicore_cpp.config import DEFAULT_CTX_SIZE, Config
from wicore_cpp.engine.memory_plan import (
    HOST,
    PAD_CELLS,
    ComputeSource,
    ContextRequest,
    CpuFeatures,
    HostReport,
    Measured,
    MemoryPlan,
    ModelLoad,
    ModelShape,
    Pool,
    Settings,
    Usage,
    gib,
    make_plan,
    round_up,
)
from wicore_cpp.gguf_file import GGUFFile

log = logging.getLogger("wicore.memory")


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


_STEP = PAD_CELLS  # contexts are tried in llama.cpp's cell padding


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
    base = requested
    if "prompt_cache_seqs" not in fixed and requested.prompt_cache_seqs:
        # The prompt cache's own sequence ids go first: without them it still keeps finished
        # sequences in idle decode slots, while each of them costs a window of cells in every
        # sliding-window layer (1.7 GiB for 4 of them with Gemma-3-27B at f16).
        base = replace(requested, prompt_cache_seqs=0)
        lighter = make_plan(loads, base, pools, margin, cpu, compute)
        if lighter.fits:
            steps = tuple(_steps(requested, base, pools, margin, cpu, loads, compute, first))
            return FitResult(lighter, steps, requested, fixed)

    bound = None
    if compute is not None:
        def bound(shape: ModelShape, s: Settings) -> Measured | None:
            return compute(shape, replace(s, ctx_size=max(s.ctx_size, requested.ctx_size),
                                          max_batch_size=max(s.max_batch_size,
                                                             requested.max_batch_size),
                                          n_gpu_layers=requested.n_gpu_layers))

    found = _search(loads, base, fixed, ctx_size_min, pools, margin, cpu, bound, compute)
    final = make_plan(loads, found, pools, margin, cpu, compute)
    if not final.fits and compute is not None:
        found = _search(loads, base, fixed, ctx_size_min, pools, margin, cpu, compute, compute)
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
        lo, hi = round_up(ctx_size_min, _STEP) // _STEP, requested.ctx_size // _STEP
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
    sequences, then layers (the prompt cache's sequence ids before all of them); each measured
    from the settings before it."""
    current = requested
    before = first
    for name in ("prompt_cache_seqs", "ctx_size", "max_batch_size", "n_gpu_layers"):
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


def _layers_text(n: int) -> str:
    return f"{n} layer{'' if n == 1 else 's'}"


# -- for a Config -----------------------------------------------------------------------------


class Probe(Protocol):
    """llama.cpp's answers (engine/memory_probe.MemoryProbe). Both raise RuntimeError when
    llama.cpp cannot answer."""

    def host(self) -> HostReport: ...

    def measure(self, model_path: Path, request: ContextRequest) -> Measured: ...


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
    for name in ("max_batch_size", "n_gpu_layers", "prompt_cache_seqs"):
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
    if config.prompt_cache_share > 0 and s.prompt_cache_seqs != config.prompt_cache_seqs:
        update["prompt_cache_seqs"] = s.prompt_cache_seqs
    return config.model_copy(update=update)


def settings_from_config(config: Config) -> Settings:
    return Settings(
        ctx_size=config.ctx_size or DEFAULT_CTX_SIZE,
        max_batch_size=config.max_batch_size,
        urgent_slots=config.urgent_slots,
        n_gpu_layers=config.n_gpu_layers,
        kv_cache_type=config.kv_cache_type,
        prefill_chunk=config.prefill_chunk,
        flash_attn="on" if config.kv_cache_type != "f16" else config.flash_attn,
        # The prompt cache's in-pool tier lives inside ctx_size; its sequence ids widen the
        # sliding-window cache. Its host tier counts when set; the default (-1) is sized in the
        # worker from the RAM still free after loading, so it cannot crowd out the plan.
        prompt_cache_seqs=config.num_seq_ids - config.max_running,
        fair_slots=config.num_fair_slots,
        prompt_cache=(config.prompt_cache_host_mib << 20
                      if config.prompt_cache_share > 0 and config.prompt_cache_host_mib > 0
                      else 0),
    )



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
           else "" for name in ("ctx_size", "max_batch_size", "n_gpu_layers",
                                  "prompt_cache_seqs")}
    lines.append(
        f"settings: ctx_size {s.ctx_size}{tag['ctx_size']}, max_batch_size "
        f"{s.max_batch_size}{tag['max_batch_size']} + urgent_slots {s.urgent_slots} + "
        + (f"fair_slots {s.fair_slots} + " if s.fair_slots else "") +
        f"prompt_cache_seqs {s.prompt_cache_seqs}{tag['prompt_cache_seqs']} = "
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
    full = f" ({_layers_text(one.shape.n_full_layers)} x {one.full_cells} cells)" if one and len(
        cells) == 1 else ""
    swa = (f" ({_layers_text(one.shape.n_layer - one.shape.n_full_layers)} x {one.swa_cells} cells)"
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
