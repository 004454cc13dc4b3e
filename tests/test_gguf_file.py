"""The GGUF reader: the same reading as the `gguf` package's, without decoding the vocabulary,
and one clear message for every kind of damaged file."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from tests.conftest import load_make_model
from wicore_cpp.gguf_file import GGML_TYPES, GGUFArray, GGUFError, read_gguf


def test_type_table_matches_the_gguf_package():
    known = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
             if t in gguf.GGML_QUANT_SIZES}
    for type_id, row in known.items():
        assert GGML_TYPES[type_id] == row
    # Types this llama.cpp has that the installed gguf package may not list yet.
    assert set(GGML_TYPES) - set(known) <= {42}


@pytest.fixture(scope="module")
def bench_q8(tmp_path_factory) -> Path:
    """A 32,768-token vocabulary: long enough that the reader skips its arrays."""
    return load_make_model().write_sparse_model(
        tmp_path_factory.mktemp("gguf") / "bench-q8.gguf", "bench", "q8_0")


@pytest.mark.parametrize("which", ["demo", "bench"])
def test_reads_what_the_gguf_package_reads(which, demo_model_path, bench_q8):
    path = demo_model_path if which == "demo" else bench_q8
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(path, "r")
    assert ours.header_bytes == theirs.data_offset and ours.alignment == theirs.alignment
    assert sorted((t.name, t.ggml_type, t.shape, t.n_elements, t.n_bytes) for t in ours.tensors) \
        == sorted((t.name, gguf.GGMLQuantizationType(int(t.tensor_type)).name,
                   tuple(int(d) for d in t.shape), int(t.n_elements), int(t.n_bytes))
                  for t in theirs.tensors)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts, not metadata
        value = ours.metadata[key]
        contents = field.contents()
        if isinstance(value, GGUFArray):
            assert value.length == len(contents) > 4096, key
        elif isinstance(value, tuple):
            assert list(value) == pytest.approx(contents), key
        else:
            assert value == pytest.approx(contents) if isinstance(value, float) else \
                value == contents, key
    assert ours.architecture == "gemma3" and ours.n_layer == theirs.fields[
        "gemma3.block_count"].contents()


def test_the_vocabulary_is_skipped_not_decoded(bench_q8):
    m = read_gguf(bench_q8)
    assert m.metadata["tokenizer.ggml.tokens"] == GGUFArray(element_type=8, length=32768)
    assert m.metadata["tokenizer.ggml.scores"] == GGUFArray(element_type=6, length=32768)
    assert isinstance(m.metadata["tokenizer.chat_template"], str)


def _header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


@pytest.mark.parametrize("make, message", [
    (lambda demo: demo[:200], "truncated"),
    (lambda demo: demo[: len(demo) * 2 // 3], "truncated"),
    (lambda demo: _header(version=1), "GGUF version 1 is not supported"),
    (lambda demo: b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (lambda demo: _header(n_kv=1) + _string("general.x") + struct.pack("<I", 99),
     "unknown metadata value type 99"),
    (lambda demo: _header(n_tensors=1, n_kv=1) + _string("general.architecture")
     + struct.pack("<I", 8) + _string("gemma3") + _string("w") + struct.pack("<I", 1)
     + struct.pack("<Q", 32) + struct.pack("<I", 77) + struct.pack("<Q", 0) + b"\0" * 256,
     "tensor w has unknown type 77"),
    (lambda demo: _header(n_kv=1) + _string("general.architecture") + struct.pack("<I", 8)
     + _string("gemma3"), "no tensors"),
    (lambda demo: _header(n_tensors=1) + _string("w") + struct.pack("<IQIQ", 1, 32, 0, 0)
     + b"\0" * 256, "no general.architecture"),
    (lambda demo: b"<html>", "not a GGUF file"),
])
def test_damaged_files_get_one_clear_message(make, message, demo_model_path, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(make(demo_model_path.read_bytes()))
    with pytest.raises(GGUFError, match=message):
        read_gguf(path)
