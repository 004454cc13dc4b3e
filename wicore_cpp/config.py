"""The one typed configuration object.

Values come from, in rising order of precedence: the model defaults below, a JSON file,
`WICORE_*` environment variables, and command-line flags. The result is validated once and
passed down; nothing reads the environment after this.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wicore_cpp.errors import ModelFileError

ENV_PREFIX = "WICORE_"
REAL_MODEL_ID = "gemma-3-27b-it"
REAL_MODEL_FILE = "gemma-3-27b-it-Q4_K_M.gguf"
DEMO_MODEL_ID = "gemma-3-demo"
DEMO_MODEL_FILE = "gemma-3-demo.gguf"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The API document's config file has a `logging` section; its keys map onto these settings.
LOGGING_SECTION = {
    "level": "log_level",
    "enable_request_logging": "log_requests",
    "enable_performance_logging": "log_performance",
    "performance_interval_s": "performance_log_interval_s",
    "format": "log_format",
    "llama_level": "llama_log_level",
}
# The KV pool a worker gets when ctx_size is left to the start-up fit and memory allows it.
DEFAULT_CTX_SIZE = 32768
GiB = 1 << 30


def resolve_threads(threads: int) -> int:
    """A `threads` setting as a count: 0 means the physical cores (hyper-threads slow
    llama.cpp down), everywhere: the server's workers, the quantizer and its --check."""
    if threads > 0:
        return threads
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def resolve_host_cache_bytes(config: Config) -> int:
    """Bytes of host memory one worker's prompt cache may use for evicted prefixes. The
    default (-1) is an eighth of the machine's RAM, at most a quarter of what is free at start,
    shared by all workers, and none on a machine with under 16 GiB."""
    if config.prompt_cache_share == 0:
        return 0
    if config.prompt_cache_host_mib >= 0:
        return config.prompt_cache_host_mib << 20
    import psutil

    memory = psutil.virtual_memory()
    if memory.total < 16 << 30:
        return 0
    num_workers = config.workers * len(config.served_models()[0])
    return int(min(memory.total / 8, memory.available / 4) / num_workers)


class ConfigError(ValueError):
    """The configuration is invalid; the message says which value and why."""


class Config(BaseModel):
    """Every setting of a WiCore server. Field docs become the README's table and `--help`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Served model ids mapped to GGUF paths. Empty: gemma-3-27b-it from "
        "models/ when present, else the demo model.",
    )
    model: str | None = Field(None, description="Serve this one GGUF file (overrides `models`).")
    model_id: str | None = Field(None, description="Id for `--model`; defaults to the file stem.")
    models_dir: str = Field("models", description="Folder searched for the default models.")
    mmproj: dict[str, str] = Field(
        default_factory=dict,
        description="Served model ids mapped to their vision projector (mmproj GGUF); \"\" "
        "turns images off for that model. A model not listed uses a projector found beside "
        "its file whose name says it is that model's (mmproj-<model name>...gguf).",
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes per model.")
    gpu_ids: list[int] = Field(
        default_factory=list,
        description="GPU per worker, round-robin (CUDA_VISIBLE_DEVICES); empty: all visible.",
    )
    n_gpu_layers: int = Field(
        -1, ge=-1, description="Layers offloaded to the GPU; -1: all when the build can offload. "
        "Left unset, fewer are offloaded when nothing else makes the model fit.",
    )
    ctx_size: int = Field(
        0, ge=0, description="KV cache pool in tokens, shared by all of a worker's sequences; "
        "0: fitted at start-up, the largest up to 32768 that fits the free memory.",
    )
    ctx_size_min: int = Field(
        4096, ge=256, description="The smallest ctx_size the start-up fit may choose; below it, "
        "fewer sequences (an unset max_batch_size), then fewer offloaded layers.",
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="KV cache type: f16, q8_0 (half the memory of f16) or q4_0 (under a "
        "third); quantized types need flash attention (auto turns it on).",
    )
    memory_margin: ByteSize = Field(
        ByteSize(GiB), description="Memory the start-up fit leaves free on each device, "
        "e.g. 1GiB or 512MiB.",
    )
    memory_budget: ByteSize | None = Field(
        None, description="Plan for this much memory on each device the model uses instead of "
        "the free memory detected, e.g. 24GiB.",
    )
    threads: int = Field(0, ge=0, description="CPU threads per worker; 0: physical cores.")
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto", description="Flash attention: auto (llama.cpp decides per device), on or off."
    )
    backend_sampling: Literal["auto", "on", "off"] = Field(
        "auto", description="Sample inside llama.cpp's decode graph for requests that only use "
        "temperature, top_k, top_p, min_p and seed: auto (when layers are offloaded to a GPU; "
        "on the CPU it measured slower than sampling from the logits), on or off. Grammars, "
        "penalties, logit_bias, logprobs and n > 1 always sample from the logits.",
    )
    max_batch_size: int = Field(
        16, ge=1, le=256, description="Sequences one worker decodes at once."
    )
    urgent_slots: int = Field(
        1, ge=0, le=16, description="Extra sequence slots per worker that only urgent requests "
        "take; the lowest-priority sequence pauses meanwhile, so a step stays within "
        "max_batch_size.",
    )
    fair_slots: int = Field(
        1, ge=0, le=16, description="With api_keys: extra sequence slots per worker for fair "
        "share. While every batch slot is busy, a key with nothing running starts at once in "
        "one, and the key running the most sequences pauses its newest until the batch has "
        "room (a step stays within max_batch_size).",
    )
    prefill_chunk: int = Field(
        512, ge=16, le=8192, description="Most tokens in one decode step (long prompts are split)."
    )
    max_choices: int = Field(
        4, ge=1, le=64, description="Largest `n` (choices per request), at most max_batch_size: "
        "the choices share one prefill and each takes a sequence slot.",
    )
    grammar_budget_ms: int = Field(
        500, ge=0, description="Most time one step may spend looking for a token that a "
        "request's JSON schema or tool grammar allows; past it that request fails.",
    )
    prompt_cache_share: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of a worker's KV pool that cached prompt "
        "prefixes may hold while no running sequence needs the cells; 0 turns the prompt cache "
        "off.",
    )
    prompt_cache_seqs: int = Field(
        4, ge=0, le=64, description="Sequence ids per worker beyond the decode slots, for "
        "cached prefixes; each costs a window of KV cells in every sliding-window layer.",
    )
    prompt_cache_host_mib: int = Field(
        -1, ge=-1, description="Host memory per worker (MiB) for evicted prompt prefixes, put "
        "back when a request comes back for them; 0: off; -1: an eighth of RAM shared by the "
        "workers (at most a quarter of the free RAM), off under 16 GiB.",
    )
    max_images: int = Field(
        8, ge=0, le=64, description="Images one chat request may carry (each is 256 prompt "
        "tokens for Gemma 3); 0 refuses images.",
    )
    image_max_bytes: ByteSize = Field(
        ByteSize(20 << 20), description="Largest image file (a data: URL's decoded bytes, or a "
        "fetched image), e.g. 20MiB.",
    )
    image_max_pixels: int = Field(
        25_000_000, ge=1, description="Largest image in pixels (width x height), checked "
        "before it is decoded.",
    )
    image_url_hosts: list[str] = Field(
        default_factory=list, description="Hosts whose http(s) image URLs the server fetches "
        "(`images.example.com`, `*.example.com`, or `*` for any); empty: image URLs are "
        "refused and images come as data: URLs only.",
    )
    image_url_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for fetching one http(s) image URL.",
    )
    max_concurrent_requests: int = Field(
        32, ge=1, description="Requests admitted (running or queued) before 429."
    )
    max_queue_size: int = Field(256, ge=1, description="Most requests waiting for a worker.")
    max_seq_len: int = Field(
        131072, ge=16, description="Longest sequence (prompt + completion), bounded by ctx_size."
    )
    default_max_tokens: int = Field(512, ge=1, description="`max_tokens` when a request omits it.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for a request, waiting and running together."
    )
    rate_limit_per_minute: int = Field(
        100, ge=0, description="Requests a minute per client address; 0 turns the limit off."
    )
    aging_s: float = Field(
        5.0, gt=0, description="Seconds of waiting that raise a queued request one priority level."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    ray_address: str | None = Field(
        None, description="Run the workers as Ray actors on this cluster (`auto`, "
        "`ray://head:10001`, or `local` for a Ray instance started here); absent: local "
        "processes. Needs the `ray` extra.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each worker actor asks for; empty: {\"GPU\": 1} when the "
        "cluster has GPUs, else {\"CPU\": 1}.",
    )
    ray_model_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Model id -> the GGUF path Ray workers load (a shared filesystem, or a path "
        "present on every node); missing ids use the front end's path.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for a request's headers, from its first byte; "
        "then 408 and the connection closes.",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for a request's body, from the end of its headers; "
        "then 408 and the connection closes.",
    )
    idle_timeout_s: float = Field(
        30.0, gt=0, description="An open connection with no request under way is closed after "
        "this long (a new one that sends nothing, or a kept-alive one between requests).",
    )
    max_connections: int = Field(
        512, ge=1, description="Open client connections; one more is answered 503 and closed.",
    )
    # -- operating it: keys, limits, metrics, logs, browsers --------------------------------
    api_keys: str | None = Field(
        None, description="JSON file of API keys (names, priority tiers, limits, quotas); "
        "unset: no key is needed.",
    )
    admin_only_monitoring: bool = Field(
        False, description="With api_keys: /status and /metrics need a key marked admin.",
    )
    rate_limit_tokens_per_minute: int = Field(
        0, ge=0, description="Tokens (prompt + completion) a minute per client address, or per "
        "key without its own limit; 0 turns the limit off.",
    )
    data_dir: str = Field(
        "data", description="Folder for state that survives a restart (API keys' quota use).",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API "
        "(CORS), e.g. [\"https://app.example\"]; [\"*\"]: any; empty: off.",
    )
    log_requests: bool = Field(False, description="One log line per request when it ends.")
    log_performance: bool = Field(
        False, description="A performance line every performance_log_interval_s while busy.",
    )
    performance_log_interval_s: float = Field(
        10.0, gt=0, description="Seconds between performance lines.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json (one object a line, for log shippers).",
    )
    llama_log_level: str = Field(
        "WARNING", description="Level of llama.cpp's own output (model loading): DEBUG, INFO, "
        "WARNING or ERROR.",
    )

    @field_validator("llama_log_level")
    @classmethod
    def _check_llama_log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, not {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}")
        if self.max_batch_size > self.max_concurrent_requests:
            raise ValueError("max_batch_size cannot exceed max_concurrent_requests")
        if self.ray_address is not None and self.gpu_ids:
            raise ValueError("gpu_ids does not apply with ray_address: Ray assigns each worker "
                             "its GPU (see ray_resources)")
        if any(amount <= 0 for amount in self.ray_resources.values()):
            raise ValueError("ray_resources amounts must be positive")
        if self.num_seq_ids > 256:
            raise ValueError("max_batch_size + urgent_slots + fair_slots + prompt_cache_seqs "
                             "cannot exceed 256 (llama.cpp's sequence limit)")
        for host in self.image_url_hosts:
            if not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9.-]+(:\d+)?", host):
                raise ValueError(f"image_url_hosts: {host!r} is not a host name, *.domain or *")
        if self.kv_cache_type != "f16" and self.flash_attn == "off":
            # llama.cpp stores a quantized V cache only with flash attention (it refuses the
            # context otherwise); K and V share one setting here.
            raise ValueError(f"kv_cache_type {self.kv_cache_type} needs flash attention: "
                             "set flash_attn to auto or on, or kv_cache_type to f16")
        return self

    def is_set(self, name: str) -> bool:
        """Whether a setting was given (file, environment or flag) rather than defaulted; the
        start-up fit changes only settings that were not."""
        return name in self.model_fields_set

    @property
    def num_fair_slots(self) -> int:
        """Fair-share slots per worker: only keys make tenants, so none without api_keys."""
        return self.fair_slots if self.api_keys else 0

    @property
    def max_running(self) -> int:
        """Sequences a worker may hold at once: decode slots, urgent and fair-share slots."""
        return self.max_batch_size + self.urgent_slots + self.num_fair_slots

    @property
    def num_seq_ids(self) -> int:
        """llama.cpp sequence ids per worker: running sequences and cached prefixes."""
        cache = self.prompt_cache_seqs if self.prompt_cache_share > 0 else 0
        return self.max_running + cache

    def served_models(self) -> tuple[dict[str, Path], str | None]:
        """Model ids to serve and their files, plus a note when the demo stands in for Gemma.

        Raises ModelFileError when the default models are wanted and neither exists."""
        if self.model:
            path = Path(self.model)
            return {self.model_id or path.stem: path}, None
        if self.models:
            return {k: Path(v) for k, v in self.models.items()}, None
        real = Path(self.models_dir) / REAL_MODEL_FILE
        if real.exists():
            return {REAL_MODEL_ID: real}, None
        demo = Path(self.models_dir) / DEMO_MODEL_FILE
        # Absolute paths: `models_dir` is relative to the working directory, which is what
        # goes wrong when the server is started from somewhere else.
        if not demo.exists():
            raise ModelFileError(
                f"no model to serve: neither {real.absolute()} nor the demo model "
                f"{demo.absolute()} exists. Put the GGUF there (see models/README.md), make "
                f"the demo model (make demo-model), or name a file with --model or a folder "
                f"with --models-dir."
            )
        note = (
            f"{real.absolute()} not found: serving the demo model {DEMO_MODEL_ID!r} from "
            f"{demo.absolute()}. Put the real GGUF at {real.absolute()} (see models/README.md) "
            f"to serve {REAL_MODEL_ID!r}."
        )
        return {DEMO_MODEL_ID: demo}, note

    def served_projectors(self) -> dict[str, Path | None]:
        """Each served model id's vision projector (None: it takes no images): `mmproj` where
        it names one, else one found beside the model file (see `find_projector`). Raises
        ModelFileError when `mmproj` names a model that is not served."""
        models, _ = self.served_models()
        unknown = sorted(set(self.mmproj) - set(models))
        if unknown:
            raise ModelFileError(f"mmproj names {', '.join(map(repr, unknown))}, which "
                                 f"{'is' if len(unknown) == 1 else 'are'} not served (served: "
                                 f"{', '.join(map(repr, models))})")
        out: dict[str, Path | None] = {}
        for model_id, path in models.items():
            if model_id in self.mmproj:
                out[model_id] = Path(self.mmproj[model_id]) if self.mmproj[model_id] else None
            else:
                out[model_id] = find_projector(path)
        return out


# Precision tags a projector's file name may end with (mmproj-model-f16.gguf).
_PRECISION_TAG = re.compile(r"[-_.](f16|bf16|f32|q8_0|q4_0|q4_1|q5_0|q5_1|q6_k|q4_k_m)$")


def find_projector(model_path: Path) -> Path | None:
    """The vision projector beside a model file whose name says it is that model's: a GGUF
    named `mmproj-<name>[-f16].gguf` (or `<name>-mmproj...`) where the model's file name starts
    with `<name>` (`mmproj-gemma-3-27b-it-f16.gguf` for `gemma-3-27b-it-Q4_K_M.gguf`). Of
    several, the longest `<name>`; a bare `mmproj-f16.gguf` names no model and is not taken."""
    model_stem = model_path.stem.lower()
    best: tuple[int, str, Path] | None = None
    try:
        candidates = [p for p in model_path.parent.iterdir()
                      if p.suffix.lower() == ".gguf" and "mmproj" in p.name.lower()]
    except OSError:
        return None
    for candidate in candidates:
        name = _PRECISION_TAG.sub("", candidate.stem.lower())
        name = name.replace("mmproj", "").strip("-_. ")
        if name and model_stem.startswith(name):
            key = (len(name), candidate.name, candidate)
            if best is None or key[:2] > best[:2]:
                best = key
    return best[2] if best else None


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`WICORE_MAX_BATCH_SIZE=8` -> {"max_batch_size": "8"}; JSON for lists and maps."""
    out: dict[str, Any] = {}
    for name, field in Config.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        out[name] = _parse_structured(name, raw, field.annotation)
    return out


def _parse_structured(name: str, raw: str, annotation: Any) -> Any:
    text = str(annotation)
    if text.startswith(("dict", "list")):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{name}: expected JSON, got {raw!r} ({exc})") from None
    return raw


def _flatten_logging_section(data: dict[str, Any]) -> dict[str, Any]:
    """The API document's `{"logging": {"level": ..., "enable_request_logging": ...}}`
    mapped onto the flat settings (`log_level`, `log_requests`, ...)."""
    section = data.get("logging")
    if section is None:
        return data
    if not isinstance(section, dict):
        raise ConfigError("logging: expected a JSON object")
    out = {k: v for k, v in data.items() if k != "logging"}
    for key, value in section.items():
        name = LOGGING_SECTION.get(key)
        if name is None:
            known = ", ".join(LOGGING_SECTION)
            raise ConfigError(f"logging.{key}: unknown; expected one of {known}")
        if name in out:
            raise ConfigError(f"logging.{key} and {name} both set; keep one")
        out[name] = value
    return out


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Merge file < environment < flags and validate once. Raises ConfigError."""
    merged: dict[str, Any] = {}
    environ = dict(os.environ) if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object")
        merged.update(_flatten_logging_section(data))
    merged.update(_env_overrides(environ))
    for name, value in (flags or {}).items():
        if value is None:
            continue
        field = Config.model_fields.get(name)
        if field is None:
            raise ConfigError(f"unknown setting {name!r}")
        merged[name] = _parse_structured(name, value, field.annotation) if isinstance(value, str) else value
    try:
        return Config(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
