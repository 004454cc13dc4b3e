"""Which type each tensor will get, and how big the output file will be, before any work.

From the input's tensor table (read by `wicore_cpp.gguf_file`, as the server reads its
models), a Python port of llama.cpp's per-tensor type choice (`llama_tensor_get_type` and the
functions it calls in vendor/llama.cpp/src/llama-quant.cpp, llama-cpp-python 0.3.36). The port
covers what decides
the types of dense models such as Gemma 3: which tensors are quantized, the mixes (_S/_M/_L),
the tied-embedding rule and the fallback for rows that do not divide into blocks. It leaves out
rules that need facts the file does not carry (Llama-2-70B's attn_v bump keyed on the model
size) and GLM-5-next's own rules, so for those models it is an estimate, as its name says.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from wicore_cpp.gguf_file import GGUFFile, GGUFTensor, layer_of
from wicore_cpp.quantize.formats import block_layout

# Never quantized although 2-D and named "...weight" (tensor_allows_quantization).
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

# The IQ1/IQ2 family shares a set of rules in llama.cpp.
_IQ12 = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
_IMATRIX_FORMATS = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
_FLOAT_FORMATS = frozenset({"F32", "F16", "BF16"})

# tensor_type_fallback: where a type goes when a row does not divide into its blocks.
_FALLBACK = {
    **dict.fromkeys(
        ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"
    ),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """The type one tensor gets, and why if it is not the one asked for."""

    name: str
    src_type: str
    dst_type: str
    src_bytes: int
    dst_bytes: int
    fallback: str | None = None  # why, when the row length forced another type than...
    fallback_from: str | None = None  # ...this one, which the mix chose
    needs_imatrix: bool = False
    impossible: str | None = None  # why llama.cpp will refuse this tensor (no fallback type)


@dataclass(frozen=True, slots=True)
class Plan:
    """Every tensor's type, and the estimated output size."""

    type_name: str
    tensors: tuple[TensorPlan, ...]
    header_bytes: int
    alignment: int
    n_elements: int

    @property
    def output_bytes(self) -> int:
        return self.header_bytes + sum(_pad(t.dst_bytes, self.alignment) for t in self.tensors)

    @property
    def bpw(self) -> float:
        return sum(t.dst_bytes for t in self.tensors) * 8 / max(1, self.n_elements)

    @property
    def fallbacks(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.fallback)

    @property
    def impossible_tensors(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.impossible)

    @property
    def imatrix_tensors(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.needs_imatrix)

    def requantized(self) -> tuple[TensorPlan, ...]:
        """Tensors already quantized in the input that would be converted again."""
        return tuple(
            t for t in self.tensors
            if t.src_type not in _FLOAT_FORMATS and t.dst_type != t.src_type
        )

    def type_counts(self) -> Counter[str]:
        return Counter(t.dst_type for t in self.tensors)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _allows_quantization(t: GGUFTensor, quantize_output: bool) -> bool:
    n_dims = len(t.shape)
    while n_dims > 1 and t.shape[n_dims - 1] == 1:  # ggml_n_dims ignores trailing 1s
        n_dims -= 1
    if n_dims < 2 or not t.name.endswith("weight") or t.name in _KEEP_NAMES:
        return False
    if not quantize_output and t.name == "output.weight":
        return False
    return not any(s in t.name for s in _KEEP_SUBSTRINGS)


def _category(name: str) -> str:
    """tensor_get_category, in its order of tests."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, cat in (
        ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if needle in name:
            return "attn_qkv" if needle == "attn_qkv.weight" else cat
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (
        (i_layer - n_layers // 8) % 3 == 2
    )


@dataclass(slots=True)
class _Counters:
    """llama.cpp's quantize_state_impl counters: the i-th tensor of a kind gets its rule."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    seen: dict[str, int] = field(default_factory=dict)


class _TypeChooser:
    """llama_tensor_get_type_impl for one model and one target type, counters included."""

    def __init__(self, model: GGUFFile, ftype: str, default: str) -> None:
        self.model = model
        self.ftype = ftype
        self.default = default
        self.n_gqa = model.n_head // max(1, model.n_head_kv)
        self.c = _Counters()
        self.c.n_attention_wv = sum(
            1 for t in model.tensors if _category(t.name) in ("attn_v", "attn_qkv")
        )

    def _layer(self, counter: int, name: str) -> tuple[int, int]:
        if self.model.n_expert > 1:
            return layer_of(name), self.model.n_layer
        return counter, self.model.n_layer

    def choose(self, t: GGUFTensor) -> str:  # noqa: C901 - mirrors llama.cpp's branch order
        ft, new, m, c = self.ftype, self.default, self.model, self.c
        cat = _category(t.name)
        is_attn_v = cat in ("attn_v", "attn_qkv")
        if cat == "output" or (m.has_tied_embeddings and cat == "token_embd"):
            qk = block_layout(new)[0]
            if ft == "MXFP4_MOE" or m.architecture == "falcon" or t.shape[0] % qk != 0:
                return "Q8_0"
            if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                return "Q5_K"
            return new if new == "Q8_0" else "Q6_K"
        if ft == "MXFP4_MOE":
            return "MXFP4" if len(t.shape) > 2 and t.shape[2] > 1 else "Q8_0"
        if cat == "token_embd":
            if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return "Q2_K"
            if ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return "IQ3_S"
            if ft in ("TQ1_0", "TQ2_0", "Q2_0"):
                return "Q4_K"
            return new
        if ft in _IQ12:
            return self._iq12(cat, is_attn_v, new)
        if is_attn_v:
            new = self._attn_v(new)
            c.i_attention_wv += 1
            return new
        if cat == "attn_k":
            if m.n_expert == 8:
                return "Q8_0"
            return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ft, new)
        if cat == "attn_q":
            return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ft, new)
        if cat == "ffn_down":
            i_layer, n_layer = self._layer(c.i_ffn_down, t.name)
            c.i_ffn_down += 1
            return self._ffn_down(new, i_layer, n_layer)
        if cat == "attn_output":
            return self._attn_output(new)
        if cat == "attn_qkv":  # unreachable: attn_qkv counts as attn_v above, as in llama.cpp
            return new
        if cat in ("ffn_gate", "ffn_up"):
            counter = c.i_ffn_gate if cat == "ffn_gate" else c.i_ffn_up
            i_layer, n_layer = self._layer(counter, t.name)
            if cat == "ffn_gate":
                c.i_ffn_gate += 1
            else:
                c.i_ffn_up += 1
            if ft == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
                return "IQ3_XXS"
        return new

    def _iq12(self, cat: str, is_attn_v: bool, new: str) -> str:
        ft, m, c = self.ftype, self.model, self.c
        to_iq3s = ft in ("IQ2_S", "IQ2_M")
        if is_attn_v:
            c.i_attention_wv += 1
            if self.n_gqa >= 4 or m.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if to_iq3s else "Q2_K"
        if m.n_expert == 8 and cat == "attn_k":
            return "Q4_K"
        if cat == "ffn_down":
            first = c.i_ffn_down < m.n_layer // 8
            c.i_ffn_down += 1
            if first:
                return "IQ3_S" if to_iq3s else "Q2_K"
            return new
        if cat == "attn_output":
            if m.n_expert == 8:
                return "Q5_K"
            if ft in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS"
            if to_iq3s:
                return "IQ3_S"
        return new

    def _attn_v(self, new: str) -> str:
        ft, m, c, gqa4 = self.ftype, self.model, self.c, self.n_gqa >= 4
        if ft == "Q2_K":
            new = "Q4_K" if gqa4 else "Q3_K"
        elif ft == "Q2_K_S" and gqa4:
            new = "Q4_K"
        elif ft == "IQ3_XXS":
            new = "Q4_K" if gqa4 else "IQ3_S"  # IQ3_S without an imatrix, which wicore never has
        elif ft in ("IQ3_XS", "IQ3_S") and gqa4:
            new = "Q4_K"
        elif ft == "IQ3_M":
            new = "Q4_K"
        elif ft == "Q3_K_M":
            new = "Q5_K" if c.i_attention_wv < 2 else "Q4_K"
        elif ft == "Q3_K_L":
            new = "Q5_K"
        elif ft in ("IQ4_NL", "IQ4_XS") and gqa4:
            new = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(c.i_attention_wv, c.n_attention_wv):
            new = "Q6_K"
        elif ft == "Q4_K_S" and c.i_attention_wv < 4:
            new = "Q5_K"
        if m.n_expert == 8:
            new = "Q8_0"
        return new

    def _ffn_down(self, new: str, i_layer: int, n_layer: int) -> str:
        ft, m, falcon = self.ftype, self.model, self.model.architecture == "falcon"
        first8 = i_layer < n_layer // 8
        if ft == "Q2_K":
            return "Q3_K"
        if ft == "Q2_K_S":
            return "Q4_K" if first8 else new
        if ft == "IQ3_XXS":  # the no-imatrix branch
            return "Q4_K" if first8 else "Q3_K"
        if ft == "Q3_K_M":
            if i_layer < n_layer // 16:
                return "Q5_K"
            return "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K"
        if ft == "IQ3_M" and (first8 or (m.n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            return "Q4_K"
        if ft == "IQ3_M":
            return new
        if ft == "Q3_K_L":
            return "Q4_K" if falcon else "Q5_K"
        if ft == "Q4_K_M":
            if falcon:
                if i_layer < n_layer // 16:
                    return "Q6_K"
                return "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K"
            return "Q6_K" if _use_more_bits(i_layer, n_layer) else new
        if first8 and ft in ("IQ4_NL", "IQ4_XS"):
            return "Q5_K"
        if ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            return "Q6_K"
        if ft == "Q4_K_S" and not falcon and first8:
            return "Q5_K"
        return new

    def _attn_output(self, new: str) -> str:
        ft, m = self.ftype, self.model
        if m.architecture == "falcon":
            return "Q4_K" if ft == "Q3_K_L" else new
        if m.n_expert == 8:
            bump = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                    "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"}
            return "Q5_K" if ft in bump else new
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                "IQ3_M": "Q4_K"}.get(ft, new)


def _fallback(t: GGUFTensor, wanted: str) -> tuple[str, str | None, str | None]:
    """tensor_type_fallback: (type used, why not `wanted`, why llama.cpp will refuse it)."""
    ncols = t.shape[0]
    block = block_layout(wanted)[0]
    if ncols % block == 0:
        return wanted, None, None
    reason = f"row length {ncols} is not a multiple of {block}, as {wanted} needs"
    if wanted not in _FALLBACK and block > 32:
        return wanted, None, f"{reason}, and llama.cpp has no fallback type for {wanted}"
    used = _FALLBACK.get(wanted, wanted)
    if ncols % block_layout(used)[0] != 0:
        used = "F16"
    return used, reason, None


def _requires_imatrix(name: str, dst: str, ftype: str) -> bool:
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if dst == "Q2_K":
        return ftype == "Q2_K_S"
    return dst in _IMATRIX_FORMATS


def plan_quantization(
    model: GGUFFile, type_name: str, main_format: str, *, leave_output: bool = False
) -> Plan:
    """The type llama.cpp will give each tensor for `type_name` (e.g. Q4_K_M -> main Q4_K).

    leave_output keeps the output projection in its input type: output.weight, or with tied
    embeddings (Gemma 3) token_embd.weight, which is also the output projection.
    """
    chooser = _TypeChooser(model, type_name, main_format)
    is_quantized_target = main_format not in _FLOAT_FORMATS
    plans = []
    for t in model.tensors:
        dst, reason, impossible, chosen = t.ggml_type, None, None, None
        if _allows_quantization(t, quantize_output=not leave_output):
            if leave_output and model.has_tied_embeddings and t.name == "token_embd.weight":
                dst = t.ggml_type
            elif is_quantized_target:
                chosen = chooser.choose(t)
                dst, reason, impossible = _fallback(t, chosen)
            else:
                dst = main_format
        plans.append(TensorPlan(
            name=t.name, src_type=t.ggml_type, dst_type=dst, src_bytes=t.n_bytes,
            dst_bytes=t.n_bytes if dst == t.ggml_type else _tensor_bytes(t, dst),
            fallback=reason, fallback_from=chosen if reason else None, impossible=impossible,
            needs_imatrix=dst != t.ggml_type and _requires_imatrix(t.name, dst, type_name),
        ))
    # llama.cpp writes the input's metadata plus general.quantization_version and file_type.
    header = _pad(model.header_bytes + 96, model.alignment)
    return Plan(type_name, tuple(plans), header, model.alignment, model.n_elements)


def _tensor_bytes(t: GGUFTensor, ggml_type: str) -> int:
    block_elems, block_bytes = block_layout(ggml_type)
    return t.n_elements // block_elems * block_bytes
