"""The one GGUF reader: a model file's header, metadata and tensor table, before llama.cpp sees it.

llama.cpp aborts or fails with a terse log line on some bad files; reading the file here first
turns a missing, truncated or foreign file into one clear message. The server checks every
model with it at start-up; the memory planner and the quantizer work from the same reading.

The header is parsed here rather than by `gguf.GGUFReader`, because that reader builds a numpy
view of every array in the metadata: for Gemma 3's 262,144-token vocabulary (three arrays of
that length, one of them strings) it took 10 s of a 46 s start-up. Only what a check or a plan
needs is decoded: scalars and short arrays; a long array is skipped and only its element type
and length are kept. Tensor data stays on disk (the file is memory-mapped, nothing is read
beyond the header). The format is GGUF versions 2 and 3, little-endian
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wicore_cpp.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# Arrays up to this length are decoded (per-layer settings, e.g. a sliding-window pattern);
# longer ones (the vocabulary) are skipped.
_MAX_DECODED_ARRAY = 4096

# ggml tensor types: id -> (name, elements per block, bytes per block), from ggml/include/ggml.h
# and the type_traits table in ggml/src/ggml.c of the pinned llama.cpp (llama-cpp-python
# 0.3.36). tests/test_gguf_file.py checks it against the `gguf` package's table.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
GGML_TYPE_IDS: dict[str, int] = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# GGUF metadata value types: id -> struct format (8: string, 9: array are handled apart).
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFError(ValueError):
    """The file is not a readable GGUF model; the message says why (without the path)."""


@dataclass(frozen=True, slots=True)
class GGUFArray:
    """A long metadata array that was skipped: its element type and length only."""

    element_type: int
    length: int


MetadataValue = int | float | bool | str | tuple | GGUFArray


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
    """What the server, the memory planner and the quantizer need to know about a GGUF file."""

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
    # Scalars and short arrays as they are; long arrays (the vocabulary) as GGUFArray.
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict, hash=False, compare=False)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        return sum(t.n_bytes for t in self.tensors) * 8 / max(1, self.n_elements)

    @property
    def has_tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)

    def arch_value(self, key: str, default: MetadataValue | None = None) -> MetadataValue | None:
        """`arch_value("embedding_length")` reads `gemma3.embedding_length` for a gemma3 file."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)


def layer_of(tensor_name: str) -> int:
    """`blk.7.attn_q.weight` -> 7; -1 for tensors outside the layers."""
    m = _LAYER_RE.match(tensor_name)
    return int(m.group(1)) if m else -1


def ggml_row_bytes(ggml_type: str, n_elements: int) -> int:
    """Bytes of `n_elements` values of a ggml type (a whole number of blocks)."""
    _, block, block_bytes = GGML_TYPES[GGML_TYPE_IDS[ggml_type]]
    return n_elements // block * block_bytes


class _Header:
    """A cursor over the memory-mapped header; any read past the end is a truncated file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def u32(self) -> int:
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise struct.error("string runs past the end of the file")
        data = self.buf[self.pos:end]
        self.pos = end
        return data.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.pos += 8 + _U64.unpack_from(self.buf, self.pos)[0]

    def value(self, vtype: int) -> MetadataValue:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFError(f"damaged: unknown metadata value type {vtype}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def array(self) -> tuple | GGUFArray:
        etype = self.u32()
        n = self.u64()
        if n <= _MAX_DECODED_ARRAY:
            return tuple(self.value(etype) for _ in range(n))
        if etype == _STRING:
            for _ in range(n):  # each string has its own length: walk them
                self.skip_string()
        elif etype in _SCALARS:
            self.pos += n * struct.calcsize(_SCALARS[etype])
        else:
            raise GGUFError(f"damaged: array of unsupported type {etype}")
        if self.pos > len(self.buf):
            raise struct.error("array runs past the end of the file")
        return GGUFArray(etype, n)


def read_gguf(path: Path) -> GGUFFile:
    """Read `path`'s metadata and tensor table. Raises GGUFError, or OSError if unreadable."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, size, _Header(buf))
            except (struct.error, IndexError, ValueError, OverflowError) as exc:
                if isinstance(exc, GGUFError):
                    raise
                raise GGUFError(f"damaged or truncated header: {exc}") from None


def _parse(path: Path, size: int, h: _Header) -> GGUFFile:
    h.pos = 4
    version = h.u32()
    if version not in (2, 3):
        if version > 0xFFFF:
            raise GGUFError("a big-endian GGUF file: llama.cpp here reads little-endian ones")
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = h.u64()
    n_kv = h.u64()
    if n_tensors > size or n_kv > size:  # each needs bytes of its own: a damaged count
        raise GGUFError(f"damaged: header claims {n_tensors} tensors and {n_kv} metadata keys")

    metadata: dict[str, MetadataValue] = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.u32())

    infos = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.u32()
        if n_dims > 8:
            raise GGUFError(f"damaged: tensor {name} has {n_dims} dimensions")
        shape = tuple(h.u64() for _ in range(n_dims))
        type_id = h.u32()
        offset = h.u64()
        infos.append((name, shape, type_id, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"damaged: general.alignment is {alignment!r}")
    data_start = (h.pos + alignment - 1) // alignment * alignment

    tensors = []
    end = 0
    for name, shape, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            raise GGUFError(f"tensor {name} has unknown type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        n_elements = 1
        for d in shape:
            n_elements *= d
        if shape and shape[0] % block:
            raise GGUFError(f"damaged: tensor {name}'s rows of {shape[0]} do not divide into "
                            f"{type_name} blocks of {block}")
        n_bytes = n_elements // block * block_bytes
        tensors.append(GGUFTensor(name, type_name, shape, n_elements, n_bytes))
        end = max(end, data_start + offset + n_bytes)
    if end > size:
        raise GGUFError(f"truncated: its tensors need {end} bytes but the file has {size}")

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("no general.architecture: not a model")
    if not tensors:
        raise GGUFError("no tensors: not a model")
    tensors.sort(key=lambda t: (layer_of(t.name), t.name))

    def number(key: str, default: int) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, tuple):  # per-layer values (e.g. head counts): the first layer's
            value = value[0] if value else default
        return int(value) if isinstance(value, int | float) else default

    n_head = number("attention.head_count", 1) or 1
    return GGUFFile(
        path=path,
        architecture=arch,
        size_bytes=size,
        header_bytes=data_start,
        alignment=alignment,
        context_length=number("context_length", 0),
        n_layer=number("block_count", 0),
        n_head=n_head,
        n_head_kv=number("attention.head_count_kv", n_head) or n_head,
        n_expert=number("expert_count", 0),
        tensors=tuple(tensors),
        metadata=metadata,
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
