"""llama.cpp's own memory figures for the start-up plan, from a short-lived helper process.

The plan is made before anything is allocated, and it needs llama.cpp: which devices the build
sees and how much memory each has free (ggml's device API), which CPU kernels repack weights,
and what a context of given settings allocates. llama.cpp answers the last question without
allocating: a model loaded with `no_alloc` reads only the file's metadata, and a context made
from it reserves nothing but logs the KV cache and compute buffer sizes it would allocate.

Why a helper process, and not the front end or a worker: the front end never imports llama_cpp
(tests/test_layering.py), and the plan must exist before any worker starts, because its result
(the fitted ctx_size, batch and offload) is what every worker is started with and what the
scheduler admits requests against; several workers, of several models, may share one device, so
no one worker could plan for it alone. The helper loads no weights, and whatever llama.cpp holds
is gone with it when the plan is done.

Everything llama.cpp says here arrives as log lines (its figures are not in the C API of this
version: `llama_get_memory_breakdown` returns a C++ map), parsed by `parse_log`. llama.cpp's own
fit (`common_fit_params`, vendor/llama.cpp/common/fit.cpp) is in its `common` library, which
the wheel does not ship; WiCore's fit (engine/memory_fit.py) works the same way (a no_alloc
model and context, a margin per device, a smallest context) in its own order of what gives way.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from wicore_cpp.engine.memory_plan import (
    ContextRequest,
    CpuFeatures,
    DeviceInfo,
    HostReport,
    Measured,
)

log = logging.getLogger("wicore.memory")

_MiB = 1 << 20
_GGML_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# ggml_type ids of the KV cache types offered (ggml/include/ggml.h).
KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}

_KV_LINE = re.compile(
    r"llama_kv_cache: size = +[\d.]+ MiB \( *(?P<cells>\d+) cells, +(?P<layers>\d+) layers, "
    r"+(?P<seqs>\d+)/\d+ seqs\), K \((?P<ktype>\w+)\): +(?P<k>[\d.]+) MiB, "
    r"V \((?P<vtype>\w+)\): +(?P<v>[\d.]+) MiB")
_COMPUTE_LINE = re.compile(r": +(?P<buf>\S+) compute buffer size = +(?P<mib>[\d.]+) MiB")
_OUTPUT_LINE = re.compile(r": +(?P<buf>\S+) +output buffer size = +(?P<mib>[\d.]+) MiB")
_MODEL_LINE = re.compile(r"load_tensors: +(?P<buf>\S+) model buffer size = +(?P<mib>[\d.]+) MiB")
_FA_LINE = re.compile(r"Flash Attention (?P<state>enabled|not supported)")


class ProbeError(RuntimeError):
    """llama.cpp could not answer (a model it cannot load, a context it refuses)."""


@dataclass(slots=True)
class _LogCollector:
    """llama.cpp's log pieces, reassembled into lines."""

    lines: list[str] = field(default_factory=list)
    _partial: str = ""

    def __call__(self, _level: int, text: str) -> None:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        if self._partial:
            lines.append(self._partial)
            self._partial = ""
        return lines


def parse_log(lines: list[str]) -> Measured:
    """The sizes llama.cpp logs while it loads a model and makes a context."""
    kv = []
    compute: dict[str, int] = {}
    output: dict[str, int] = {}
    model: dict[str, int] = {}
    flash_attn = None
    for line in lines:
        if m := _KV_LINE.search(line):
            kv.append((int(m["cells"]), int(m["layers"]),
                       round(float(m["k"]) * _MiB), round(float(m["v"]) * _MiB)))
        elif m := _COMPUTE_LINE.search(line):
            compute[m["buf"]] = compute.get(m["buf"], 0) + round(float(m["mib"]) * _MiB)
        elif m := _OUTPUT_LINE.search(line):
            output[m["buf"]] = output.get(m["buf"], 0) + round(float(m["mib"]) * _MiB)
        elif m := _MODEL_LINE.search(line):
            model[m["buf"]] = model.get(m["buf"], 0) + round(float(m["mib"]) * _MiB)
        elif m := _FA_LINE.search(line):
            flash_attn = m["state"] == "enabled"
    return Measured(kv=tuple(kv), compute=compute, output=output, model_buffers=model,
                    flash_attn=flash_attn)


class MemoryProbe:
    """The helper process. Use as a context manager; each call is one round trip."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self._timeout_s = timeout_s
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    def __enter__(self) -> MemoryProbe:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=probe_main, args=(child,), name="wicore-memory-probe",
                                    daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()

    def _call(self, *request: object) -> object:
        assert self._conn is not None, "use MemoryProbe as a context manager"
        try:
            self._conn.send(request)
            if not self._conn.poll(self._timeout_s):
                raise ProbeError(f"llama.cpp did not answer within {self._timeout_s:g}s")
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode if self._process else None
            raise ProbeError(f"the memory probe process died (exit code {code})") from None
        if not ok:
            raise ProbeError(str(value))
        return value

    def host(self) -> HostReport:
        """The machine's devices, their free memory, and the CPU's repacking kernels."""
        return self._call("host")  # type: ignore[return-value]

    def measure(self, model_path: Path, request: ContextRequest) -> Measured:
        """What llama.cpp would allocate for the KV cache and compute buffers (no_alloc)."""
        return self._call("measure", model_path, request)  # type: ignore[return-value]


# -- the helper process -----------------------------------------------------------------------


def probe_main(conn: Connection) -> None:
    """Process entry point: answer requests until None or EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    state = _ProbeState()
    try:
        while True:
            request = conn.recv()
            if request is None:
                break
            try:
                if request[0] == "host":
                    conn.send((True, state.host()))
                else:
                    conn.send((True, state.measure(*request[1:])))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
                conn.send((False, str(exc) or type(exc).__name__))
    except (EOFError, OSError):
        pass
    finally:
        state.close()


class _ProbeState:
    """llama.cpp inside the helper: no_alloc models, loaded once per (file, offload)."""

    def __init__(self) -> None:
        import llama_cpp as lc

        from wicore_cpp.engine.llama_log import llama_log

        self.lc = lc
        self.log = _LogCollector()
        llama_log().sink = self.log
        lc.llama_backend_init()
        self._models: dict[tuple[Path, int], tuple[int, list[str]]] = {}

    def host(self) -> HostReport:
        import psutil

        lc = self.lc
        ram = psutil.virtual_memory()
        return HostReport(
            gpu_offload=bool(lc.llama_supports_gpu_offload()),
            devices=_ggml_devices(),
            cpu=_cpu_features(),
            host_available=int(ram.available),
            host_total=int(ram.total),
        )

    def _model(self, path: Path, n_gpu_layers: int) -> tuple[int, list[str]]:
        key = (path, n_gpu_layers)
        if key not in self._models:
            lc = self.lc
            params = lc.llama_model_default_params()
            params.n_gpu_layers = n_gpu_layers
            params.no_alloc = True  # metadata only: nothing is read or allocated
            params.load_mode = lc.LLAMA_LOAD_MODE_NONE  # no_alloc cannot map the file
            self.log.take()
            ptr = lc.llama_model_load_from_file(str(path).encode(), params)
            lines = self.log.take()
            if not ptr:
                errors = [line for line in lines if "error" in line.lower()]
                raise ProbeError(f"llama.cpp cannot load {path}: "
                                 f"{errors[-1].strip() if errors else 'see its log'}")
            self._models[key] = (ptr, lines)
        return self._models[key]

    def measure(self, path: Path, request: ContextRequest) -> Measured:
        lc = self.lc
        model, load_lines = self._model(path, request.n_gpu_layers)
        params = lc.llama_context_default_params()
        params.n_ctx = request.n_ctx
        params.n_batch = request.n_batch
        params.n_ubatch = request.n_batch
        params.n_seq_max = request.n_seq_max
        params.n_outputs_max = request.n_outputs_max
        params.kv_unified = True  # as the worker makes it (backend.BatchContext)
        params.swa_full = False
        params.flash_attn_type = _FLASH_ATTN[request.flash_attn]
        params.type_k = params.type_v = KV_TYPE_IDS[request.kv_cache_type]
        params.no_perf = True
        self.log.take()
        ctx = lc.llama_init_from_model(model, params)
        lines = self.log.take()
        if not ctx:
            errors = [line for line in lines if "error" in line.lower() or "fail" in line.lower()]
            raise ProbeError(f"llama.cpp refuses a context of {request.n_ctx} tokens: "
                             f"{errors[-1].strip() if errors else 'see its log'}")
        lc.llama_free(ctx)
        return parse_log(load_lines + lines)

    def close(self) -> None:
        for ptr, _ in self._models.values():
            self.lc.llama_model_free(ptr)
        self._models.clear()


def _ggml_devices() -> tuple[DeviceInfo, ...]:
    """ggml's devices with their free and total memory (ggml_backend_dev_memory)."""
    import ctypes

    from llama_cpp._ggml import libggml

    libggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    libggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    libggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in (libggml.ggml_backend_dev_name, libggml.ggml_backend_dev_description):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    libggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_dev_type.restype = ctypes.c_int
    libggml.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    libggml.ggml_backend_dev_memory.restype = None
    devices = []
    for i in range(libggml.ggml_backend_dev_count()):
        dev = libggml.ggml_backend_dev_get(i)
        kind = _GGML_DEVICE_KINDS.get(libggml.ggml_backend_dev_type(dev), "other")
        if kind == "cpu":
            continue  # the host: its RAM is measured with psutil (ggml says "all free")
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        libggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(DeviceInfo(
            name=(libggml.ggml_backend_dev_name(dev) or b"?").decode(),
            description=(libggml.ggml_backend_dev_description(dev) or b"").decode(),
            kind=kind, free=int(free.value), total=int(total.value)))
    return tuple(devices)


def _cpu_features() -> CpuFeatures:
    """The CPU backend's SIMD features, which decide the weights it repacks (ggml_cpu_has_*)."""
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-cpu*.so*")) + sorted(lib_dir.glob("libggml*.dylib"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            has = {name: bool(getattr(lib, f"ggml_cpu_has_{name}")())
                   for name in ("avx2", "avx512", "neon", "matmul_int8", "dotprod", "sve")}
            sve_cnt = int(lib.ggml_cpu_get_sve_cnt()) if has["sve"] else 0
        except (OSError, AttributeError):
            continue
        return CpuFeatures(**has, sve_cnt=sve_cnt, source=f"ggml ({path.name})")
    log.warning("cannot read the CPU backend's features from %s; assuming no weight repacking",
                lib_dir)
    return CpuFeatures(source="unknown")
