"""The one GGUF reader: a model file's header, metadata and tensor table, before llama.cpp sees it.

llama.cpp aborts or fails with a terse log line on some bad files; reading the file here first
turns a missing, truncated or foreign file into one clear message. The server checks every
model with it at start-up; the quantizer plans its work from the same reading. Tensor data
stays on disk (the `gguf` package memory-maps the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wicore_cpp.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


class GGUFError(ValueError):
    """The file is not a readable GGUF model; the message says why (without the path)."""


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor as the file describes it (ggml order: shape[0] is the row length)."""

    name: str
    ggml_type: str  # e.g. "F16", "Q4_K"
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """What the server and the quantizer need to know about a GGUF model file."""

    path: Path
    architecture: str
    size_bytes: int
    header_bytes: int  # metadata and tensor descriptions, up to the first tensor's data
    alignment: int
    context_length: int  # trained context; 0 when the file does not say
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    tensors: tuple[GGUFTensor, ...]  # in llama.cpp's order (by layer, then name)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        return sum(t.n_bytes for t in self.tensors) * 8 / max(1, self.n_elements)

    @property
    def has_tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)


def layer_of(tensor_name: str) -> int:
    """`blk.7.attn_q.weight` -> 7; -1 for tensors outside the layers."""
    m = _LAYER_RE.match(tensor_name)
    return int(m.group(1)) if m else -1


def read_gguf(path: Path) -> GGUFFile:
    """Read `path`'s metadata and tensor table. Raises GGUFError, or OSError if unreadable."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')")

    import gguf  # here: numpy-heavy, and the front end never needs it after start-up

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise GGUFError(f"damaged or truncated: {exc}") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"truncated: its tensors need {end} bytes but the file has {size}")

    def field(key: str, default: int | str | None = None) -> int | str | None:
        f = reader.get_field(key)
        if f is None:
            return default
        value = f.contents()
        return value[0] if isinstance(value, list) else value

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("no general.architecture: not a model")
    tensors = []
    for t in reader.tensors:
        try:
            type_name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        except ValueError:
            raise GGUFError(f"tensor {t.name} has unknown type {int(t.tensor_type)}") from None
        tensors.append(GGUFTensor(t.name, type_name, tuple(int(d) for d in t.shape),
                                  int(t.n_elements), int(t.n_bytes)))
    if not tensors:
        raise GGUFError("no tensors: not a model")
    tensors.sort(key=lambda t: (layer_of(t.name), t.name))
    n_head = int(field(f"{arch}.attention.head_count", 1) or 1)
    return GGUFFile(
        path=path,
        architecture=arch,
        size_bytes=size,
        header_bytes=int(reader.data_offset),
        alignment=int(reader.alignment),
        context_length=int(field(f"{arch}.context_length", 0) or 0),
        n_layer=int(field(f"{arch}.block_count", 0) or 0),
        n_head=n_head,
        n_head_kv=int(field(f"{arch}.attention.head_count_kv", n_head) or n_head),
        n_expert=int(field(f"{arch}.expert_count", 0) or 0),
        tensors=tuple(tensors),
    )


def check_model_file(path: Path) -> GGUFFile:
    """`read_gguf` for serving: ModelFileError naming the file and what is wrong with it."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    try:
        return read_gguf(path)
    except GGUFError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None
