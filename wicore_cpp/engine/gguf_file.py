"""Checks a GGUF file in Python before llama.cpp sees it.

llama.cpp aborts or fails with a terse log line on some bad files; reading the header and the
tensor table here first turns a missing, truncated or foreign file into one clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wicore_cpp.errors import ModelFileError

GGUF_MAGIC = b"GGUF"


@dataclass(slots=True, frozen=True)
class GGUFSummary:
    path: Path
    architecture: str
    context_length: int
    num_tensors: int
    size_bytes: int


def inspect_gguf(path: Path) -> GGUFSummary:
    """Header, metadata and tensor extents of `path`, or ModelFileError saying what is wrong."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")

    from gguf import GGUFReader  # import here: numpy-heavy, and only needed at start-up

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise ModelFileError(f"{path} is damaged or truncated: {exc}") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}"
        )

    def field(name: str):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    arch = field("general.architecture") or "unknown"
    return GGUFSummary(
        path=path,
        architecture=str(arch),
        context_length=int(field(f"{arch}.context_length") or 0),
        num_tensors=len(reader.tensors),
        size_bytes=size,
    )
