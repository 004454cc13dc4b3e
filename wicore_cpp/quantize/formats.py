"""The quantization types `wicore quantize` offers, and what each one is.

The numbers come from llama-cpp-python's bindings (`LLAMA_FTYPE_*`), so a type is offered only
when the installed llama.cpp has it. What the bindings cannot say is copied here from the
vendored llama.cpp source (0.3.36): each type's main tensor format from
`llama_ftype_get_default_type` (src/llama-quant.cpp) and llama.cpp's own one-line description
from `QUANT_OPTIONS` (tools/quantize/quantize.cpp). Block layouts come from the `gguf` package.

llama_cpp is imported only when the table is built, not when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# (name, main tensor format, llama.cpp's QUANT_OPTIONS description), in QUANT_OPTIONS order.
_SOURCE_TABLE: tuple[tuple[str, str, str], ...] = (
    ("Q1_0", "Q1_0", "1.125 bpw quantization"),
    ("Q2_0", "Q2_0", "2.25 bpw quantization (group 64)"),
    ("Q4_0", "Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B"),
    ("Q4_1", "Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    ("MXFP4_MOE", "MXFP4", "MXFP4 MoE"),
    ("Q5_0", "Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    ("Q5_1", "Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    ("IQ2_XXS", "IQ2_XXS", "2.06 bpw quantization"),
    ("IQ2_XS", "IQ2_XS", "2.31 bpw quantization"),
    ("IQ2_S", "IQ2_XS", "2.5  bpw quantization"),
    ("IQ2_M", "IQ2_S", "2.7  bpw quantization"),
    ("IQ1_S", "IQ1_S", "1.56 bpw quantization"),
    ("IQ1_M", "IQ1_M", "1.75 bpw quantization"),
    ("TQ1_0", "TQ1_0", "1.69 bpw ternarization"),
    ("TQ2_0", "TQ2_0", "2.06 bpw ternarization"),
    ("Q2_K", "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    ("Q2_K_S", "Q2_K", "2.96G, +3.1836 ppl @ Llama-3-8B"),
    ("IQ3_XXS", "IQ3_XXS", "3.06 bpw quantization"),
    ("IQ3_S", "IQ3_S", "3.44 bpw quantization"),
    ("IQ3_M", "IQ3_S", "3.66 bpw quantization mix"),
    ("IQ3_XS", "IQ3_S", "3.3 bpw quantization"),
    ("Q3_K_S", "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    ("Q3_K_M", "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    ("Q3_K_L", "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    ("IQ4_NL", "IQ4_NL", "4.50 bpw non-linear quantization"),
    ("IQ4_XS", "IQ4_XS", "4.25 bpw non-linear quantization"),
    ("Q4_K_S", "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    ("Q4_K_M", "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    ("Q5_K_S", "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    ("Q5_K_M", "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    ("Q6_K", "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    ("Q8_0", "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
    ("F16", "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    ("BF16", "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    ("F32", "F32", "26.00G              @ 7B"),
)

# llama.cpp's quantize tool accepts these short names too.
ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Binding constants deliberately not offered: NVFP4 has no entry in this version's
# llama_ftype_get_default_type (llama.cpp rejects it as "invalid output file type"), and
# GUESSED is a marker for files without a type, not a target.
EXCLUDED_BINDING_NAMES = frozenset({"NVFP4", "GUESSED"})

# Types whose files contain tensors llama.cpp refuses to write without an importance matrix
# (tensor_requires_imatrix in src/llama-quant.cpp: IQ1_*, IQ2_XXS/XS/S and IQ3_XXS tensors,
# and Q2_K inside a Q2_K_S file; IQ3_XS puts attn_k in IQ3_XXS). wicore does not compute or
# load imatrix files, so it refuses these up front instead of failing half-way.
NEEDS_IMATRIX = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
)

# Short remarks where llama.cpp's description alone would mislead (from src/llama-quant.cpp).
_REMARKS: dict[str, str] = {
    "MXFP4_MOE": "MoE models: experts MXFP4, all else Q8_0",
    "TQ1_0": "ternary models only",
    "TQ2_0": "ternary models only",
}

# Block layouts the installed gguf package does not know yet: (elements, bytes) per block,
# from vendor/llama.cpp/ggml/src/ggml-common.h (block_q2_0: fp16 scale + 64 2-bit values).
_EXTRA_BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {"Q2_0": (64, 18)}

# ggml type ids of the types above that gguf does not list (ggml/include/ggml.h).
_EXTRA_TYPE_IDS: dict[str, int] = {"Q2_0": 42}


def block_layout(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml tensor type, e.g. Q4_K -> (256, 144)."""
    if ggml_type in _EXTRA_BLOCK_LAYOUTS:
        return _EXTRA_BLOCK_LAYOUTS[ggml_type]
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]


def ggml_type_id(ggml_type: str) -> int:
    """The numeric ggml type, as llama.cpp's C structs take it."""
    if ggml_type in _EXTRA_TYPE_IDS:
        return _EXTRA_TYPE_IDS[ggml_type]
    return int(GGMLQuantizationType[ggml_type])


def bits_per_weight(ggml_type: str) -> float:
    """Bits per weight of one tensor format, exact from its block layout."""
    elements, nbytes = block_layout(ggml_type)
    return nbytes * 8 / elements


@dataclass(frozen=True, slots=True)
class QuantType:
    """One target type of llama.cpp's quantizer."""

    name: str  # as users type it: "Q4_K_M"
    ftype: int  # llama_ftype value from the bindings
    main_format: str  # ggml type most tensors get: "Q4_K"
    llama_note: str  # llama.cpp's own description
    needs_imatrix: bool

    @property
    def bpw(self) -> float:
        """Bits per weight of the main format; mixes (_M, _L) put a few tensors higher."""
        return bits_per_weight(self.main_format)

    @property
    def remark(self) -> str:
        if self.needs_imatrix:
            return "needs an importance matrix: not supported"
        return _REMARKS.get(self.name, "")


def _binding_ftypes() -> dict[str, int]:
    import llama_cpp

    found: dict[str, int] = {}
    for attr, value in vars(llama_cpp).items():
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            found[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(value)
        elif attr == "LLAMA_FTYPE_ALL_F32":
            found["F32"] = int(value)
        elif attr == "LLAMA_FTYPE_GUESSED":
            found["GUESSED"] = int(value)
    return found


def available_types() -> dict[str, QuantType]:
    """Every type the installed llama.cpp can quantize to, by name."""
    ftypes = _binding_ftypes()
    types: dict[str, QuantType] = {}
    for name, main_format, note in _SOURCE_TABLE:
        if name not in ftypes or name in EXCLUDED_BINDING_NAMES:
            continue
        types[name] = QuantType(name, ftypes[name], main_format, note, name in NEEDS_IMATRIX)
    return types


def unknown_binding_names() -> set[str]:
    """Binding constants this table has no entry for: a newer llama.cpp added a type."""
    known = {name for name, _, _ in _SOURCE_TABLE} | EXCLUDED_BINDING_NAMES
    return set(_binding_ftypes()) - known


def resolve_type(name: str, types: dict[str, QuantType]) -> QuantType | None:
    """Look a user-typed name up, case-insensitively, aliases included."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    return types.get(key)
