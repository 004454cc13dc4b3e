#!/usr/bin/env python3
"""Write a small, deterministic, random-weight GGUF model of architecture ``gemma3``.

The file loads in llama.cpp like a real Gemma 3 checkpoint: same tensor layout, sliding-window
attention on most layers, a SentencePiece (``llama``) vocabulary with byte fallback, Gemma's
special tokens and Gemma 3's own chat template. The weights are random (seeded), so the text it
produces means nothing, but it costs the same to run as a trained model of the same shape.

    python tools/make_model.py --preset demo  --out models/gemma-3-demo.gguf
    python tools/make_model.py --preset bench --out models/bench-gemma3-q8_0.gguf
    python tools/make_model.py --preset bench-262k --out models/bench-gemma3-262k-q8_0.gguf
    python tools/make_model.py --preset demo  --out /tmp/demo-f32.gguf --dtype f32
    python tools/make_model.py --preset demo-swa32 --out /tmp/swa32.gguf --dtype f32
    python tools/make_model.py --preset gemma-3-27b --out /tmp/g27.gguf --dtype q4_k_m

The ``gemma-3-27b`` preset is Gemma-3-27B-it's exact shape (808 tensors, the real vocabulary
size, each tensor in the type a real file of that type has) written as a *sparse* file: header,
metadata and tensor table are real, the 15-27 GiB of weights are a hole of zeros that takes no
disk and no time to write. llama.cpp loads and runs it like the real model (its output is
meaningless), so memory planning and serving can be tested at the real scale.

Tests import :func:`write_model` from this file (``tools/`` is not a package).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np

log = logging.getLogger("make_model")

ARCH = "gemma3"

# Gemma 3's chat template, exactly as shipped in google/gemma-3-*-it tokenizer_config.json
# (and in the official gemma-3 GGUF files as tokenizer.chat_template).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate'
    ' user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# Special tokens, in Gemma's order (ids 0..5).
PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN = range(6)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# The image delimiters Gemma 3's template and llama.cpp's libmtmd write around an image. They are
# the last two ids of the vocabulary (in Gemma 3 they sit near its end too), so adding them moved
# no other token; their embedding rows are the ones the pieces they replaced had.
IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>"]
BYTE_TOKEN_BASE = len(SPECIAL_TOKENS)  # <0x00> .. <0xFF> follow the special tokens
FIRST_NORMAL_TOKEN = BYTE_TOKEN_BASE + 256

SPACE = "\u2581"  # SentencePiece's "▁"

_COMMON_WORDS = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do how
their if will up other about out many then them these so some her would make like him into time
has look two more write go see number no way could people my than first water been call who oil
its now find long down day did get come made may part hello world model user assistant system
answer question please thank thanks yes sure here help test tests token tokens text data server
request response stream chat message content role name value error result output input prompt
quick brown fox jumps over lazy dog cat house tree river city country computer science quantum
computing language learning machine small large good new old great high little own right big
after before because through where why again also back only well even very just know take work
think say give most tell try ask need feel become leave put mean keep let begin seem show hear
play run move live believe bring happen provide sit stand lose pay meet include continue set
learn change lead understand watch follow stop create speak read spend grow open walk win offer
remember love consider appear buy wait serve die send expect build stay fall cut reach kill
remain suggest raise pass sell require report decide pull
""".split()

_PUNCT = list(".,!?;:'\"()[]{}<>-_/\\|@#$%^&*+=~`")
_ACCENTED = list("éèêëàâäáãåçñóòôöõúùûüíìîïýÿßæøœÉÈÀÇÑÖÜ")
_CJK = list(
    "量子计算的是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生"
    "会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手"
    "十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此"
    "实回二理美点月明其种声全工己話語日本東京こんにちはありがとう"
)
_SPECIAL_PIECES = ["\n", "\n\n", "\t", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]


class Preset(NamedTuple):
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    sliding_window: int
    swa_pattern: int  # every swa_pattern-th layer is global, the others use the sliding window
    default_dtype: str


PRESETS: dict[str, Preset] = {
    # A few MB; every row length is a multiple of 256 so K-quants really quantize it.
    "demo": Preset(
        name="demo", n_vocab=2048, n_embd=256, n_layer=3, n_head=4, n_head_kv=2, head_dim=64,
        n_ff=512, n_ctx_train=8192, sliding_window=512, swa_pattern=3, default_dtype="f16",
    ),
    # The demo with a 32-token sliding window: prompts of a few hundred tokens move the window
    # far past positions a prompt cache may want to reuse (Gemma-3-27B's window is 1024).
    "demo-swa32": Preset(
        name="demo-swa32", n_vocab=2048, n_embd=256, n_layer=3, n_head=4, n_head_kv=2,
        head_dim=64, n_ff=512, n_ctx_train=8192, sliding_window=32, swa_pattern=3,
        default_dtype="f16",
    ),
    # The shape (and so the cost to run) of a small real model: 222M parameters, 237 MB as Q8_0.
    "bench": Preset(
        name="bench", n_vocab=32768, n_embd=1024, n_layer=12, n_head=8, n_head_kv=4,
        head_dim=128, n_ff=4096, n_ctx_train=8192, sliding_window=512, swa_pattern=6,
        default_dtype="q8_0",
    ),
    # The bench shape with Gemma 3's real 262,144-token vocabulary (`make bench`'s model, 490 MB
    # as Q8_0): the output layer and sampling over 262k entries per sequence weigh in every
    # step as they do for Gemma-3-27B, where a small vocabulary would hide them.
    "bench-262k": Preset(
        name="bench-262k", n_vocab=262144, n_embd=1024, n_layer=12, n_head=8, n_head_kv=4,
        head_dim=128, n_ff=4096, n_ctx_train=8192, sliding_window=512, swa_pattern=6,
        default_dtype="q8_0",
    ),
    # google/gemma-3-27b-it's text model (its config.json): written sparse, see the module doc.
    "gemma-3-27b": Preset(
        name="gemma-3-27b", n_vocab=262144, n_embd=5376, n_layer=62, n_head=32, n_head_kv=16,
        head_dim=128, n_ff=21504, n_ctx_train=131072, sliding_window=1024, swa_pattern=6,
        default_dtype="q4_k_m",
    ),
}
SPARSE_PRESETS = frozenset({"gemma-3-27b"})

DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Types of the sparse presets: each tensor gets the type a real file of that kind gives it.
# q4_k_m and q8_0 follow llama.cpp's quantizer (wicore's port of its per-tensor choice, checked
# against llama.cpp in tests/test_quantize.py); qat-q4_0 is Google's QAT release
# (google/gemma-3-27b-it-qat-q4_0-gguf): every matrix Q4_0, the embedding table left F16.
SPARSE_DTYPES = {
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "qat-q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

# Weight scales, tuned on the demo preset (they carry over to any width). The output is tied to
# token_embd, so a token's own row both feeds the residual stream and scores it at the output: with
# ordinary scales a random model just repeats its input. A tiny embedding (row norm 0.02) leaves
# the residual to the context-dependent layer outputs; the output norm's weight then scales the
# logits back up (standard deviation about 6, median top-1/top-2 gap about 1.2), and q/k norm
# weights above one sharpen attention so that the context, not one hub token, drives the output.
# All other norm weights are ones.
EMBD_STD_TIMES_SQRT_D = 0.02
OUTPUT_NORM_WEIGHT = 300.0
QK_NORM_WEIGHT = 1.5
# Like Gemma 3: RoPE base 1M on the global layers, 10k on the sliding-window layers.
ROPE_FREQ_BASE = 1_000_000.0
ROPE_FREQ_BASE_SWA = 10_000.0
DAMPED_ROW_SCALE = {"special": 0.05, "byte": 0.3}


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a SentencePiece vocabulary of exactly n_vocab pieces."""
    tokens = list(SPECIAL_TOKENS)
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    types[UNK] = gguf.TokenType.UNKNOWN
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    pieces: dict[str, None] = {}  # ordered set: the most likely pieces first

    def add(piece: str) -> None:
        if piece and piece not in pieces:
            pieces[piece] = None

    # Most important first: the list is cut at n_vocab, so characters always make it in.
    add(SPACE)
    for piece in _SPECIAL_PIECES:
        add(piece)
    singles = (
        [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        + [str(d) for d in range(10)]
        + _PUNCT
        + _ACCENTED
    )
    for ch in singles:
        add(ch)
        add(SPACE + ch)
    for ch in _CJK:
        add(ch)
    # Whole words after a space, with every prefix so the SentencePiece merges can reach them.
    for word in _COMMON_WORDS:
        for end in range(2, len(word) + 1):
            add(SPACE + word[:end])
    for word in _COMMON_WORDS:
        add(word)
    for word in _COMMON_WORDS:
        cap = word.capitalize()
        for end in range(2, len(cap) + 1):
            add(SPACE + cap[:end])
        add(cap)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # Letter pairs, then triples, then quadruples (Gemma 3's 262,144 pieces need those), each
    # bare and after a space; a generator, so small vocabularies never build the long lists.
    fillers = itertools.chain.from_iterable(
        (prefix + "".join(combo) for combo in itertools.product(letters, repeat=n))
        for n in (2, 3, 4) for prefix in ("", SPACE)
    )
    n_normal = n_vocab - len(tokens)
    for piece in fillers:
        if len(pieces) >= n_normal:
            break
        add(piece)
    if len(pieces) < n_normal:
        raise ValueError(f"cannot make {n_vocab} distinct tokens")
    normal = list(pieces)[:n_normal - len(IMAGE_TOKENS)]

    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(normal))]
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    scores += [-float(len(normal))] * len(IMAGE_TOKENS)  # control tokens: scores unused
    tokens += IMAGE_TOKENS
    types += [gguf.TokenType.CONTROL] * len(IMAGE_TOKENS)
    assert len(tokens) == n_vocab and len(set(tokens)) == n_vocab
    assert all(len(t.encode("utf-8")) < 32 for t in tokens)  # llama-cpp-python detokenize limit
    return tokens, scores, [int(t) for t in types]


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _make_weights(p: Preset, rng: np.random.Generator):
    """Yield (name, float32 array) in the order they are written. numpy shape = reversed ggml."""
    d, hd = p.n_embd, p.head_dim
    embd = _normal(rng, (p.n_vocab, d), EMBD_STD_TIMES_SQRT_D / np.sqrt(d))
    # Special and byte tokens get small rows: with the output tied to the embedding they are then
    # rarely the greedy pick (no early end of turn, no stray invalid UTF-8 bytes).
    embd[:BYTE_TOKEN_BASE] *= DAMPED_ROW_SCALE["special"]
    embd[BYTE_TOKEN_BASE:FIRST_NORMAL_TOKEN] *= DAMPED_ROW_SCALE["byte"]
    yield "token_embd.weight", embd

    ones = np.ones(d, dtype=np.float32)
    for i in range(p.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", ones
        yield b + "attn_q.weight", _normal(rng, (p.n_head * hd, d), 1 / np.sqrt(d))
        yield b + "attn_k.weight", _normal(rng, (p.n_head_kv * hd, d), 1 / np.sqrt(d))
        yield b + "attn_v.weight", _normal(rng, (p.n_head_kv * hd, d), 1 / np.sqrt(d))
        yield b + "attn_q_norm.weight", np.full(hd, QK_NORM_WEIGHT, dtype=np.float32)
        yield b + "attn_k_norm.weight", np.full(hd, QK_NORM_WEIGHT, dtype=np.float32)
        yield b + "attn_output.weight", _normal(rng, (d, p.n_head * hd), 1 / np.sqrt(p.n_head * hd))
        yield b + "post_attention_norm.weight", ones
        yield b + "ffn_norm.weight", ones
        yield b + "ffn_gate.weight", _normal(rng, (p.n_ff, d), 1 / np.sqrt(d))
        yield b + "ffn_up.weight", _normal(rng, (p.n_ff, d), 1 / np.sqrt(d))
        yield b + "ffn_down.weight", _normal(rng, (d, p.n_ff), 1 / np.sqrt(p.n_ff))
        yield b + "post_ffw_norm.weight", ones
    yield "output_norm.weight", np.full(d, OUTPUT_NORM_WEIGHT, dtype=np.float32)


def _add_metadata(w: gguf.GGUFWriter, p: Preset, ftype: int, *, is_quantized: bool) -> None:
    """Everything but the tensors: hyperparameters, vocabulary, chat template."""
    if p.name in SPARSE_PRESETS:
        w.add_name(f"{p.name}-sparse")
        w.add_description("Gemma 3 shaped model whose weights are all zero (a sparse file)")
    else:
        w.add_name(f"gemma-3-{p.name}-random")
        w.add_description("Random-weight Gemma 3 shaped model for tests and benchmarks")
    w.add_file_type(int(ftype))
    if is_quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = build_vocab(p.n_vocab)

    w.add_context_length(p.n_ctx_train)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_key_length(p.head_dim)
    w.add_value_length(p.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(ROPE_FREQ_BASE)
    if p.sliding_window:
        w.add_sliding_window(p.sliding_window)
        w.add_sliding_window_pattern(p.swa_pattern)
        w.add_rope_freq_base_swa(ROPE_FREQ_BASE_SWA)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_pad_token_id(PAD)
    w.add_eot_token_id(END_OF_TURN)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(GEMMA3_CHAT_TEMPLATE)


def write_model(
    out_path: str | os.PathLike[str],
    preset: str = "demo",
    dtype: str | None = None,
    seed: int = 0,
) -> Path:
    """Write the model to out_path (atomically) and return the path."""
    if preset in SPARSE_PRESETS:
        return write_sparse_model(out_path, preset, dtype)
    p = PRESETS[preset]
    dtype = dtype or p.default_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    qtype, ftype = DTYPES[dtype]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f"{out.name}.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(w, p, ftype, is_quantized=qtype not in (gguf.GGMLQuantizationType.F32,
                                                              gguf.GGMLQuantizationType.F16))
        rng = np.random.default_rng(seed)
        for name, arr in _make_weights(p, rng):
            if arr.ndim == 1:
                w.add_tensor(name, arr)  # norms stay F32, as llama.cpp expects
            elif qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, arr)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def tensor_shapes(p: Preset):
    """Yield (name, numpy shape) of every tensor, in the order `_make_weights` writes them."""
    d, hd = p.n_embd, p.head_dim
    yield "token_embd.weight", (p.n_vocab, d)
    for i in range(p.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (d,)
        yield b + "attn_q.weight", (p.n_head * hd, d)
        yield b + "attn_k.weight", (p.n_head_kv * hd, d)
        yield b + "attn_v.weight", (p.n_head_kv * hd, d)
        yield b + "attn_q_norm.weight", (hd,)
        yield b + "attn_k_norm.weight", (hd,)
        yield b + "attn_output.weight", (d, p.n_head * hd)
        yield b + "post_attention_norm.weight", (d,)
        yield b + "ffn_norm.weight", (d,)
        yield b + "ffn_gate.weight", (p.n_ff, d)
        yield b + "ffn_up.weight", (p.n_ff, d)
        yield b + "ffn_down.weight", (d, p.n_ff)
        yield b + "post_ffw_norm.weight", (d,)
    yield "output_norm.weight", (d,)


def sparse_tensor_types(p: Preset, dtype: str) -> dict[str, str]:
    """Each tensor's ggml type in a real file of kind `dtype` (see SPARSE_DTYPES)."""
    shapes = dict(tensor_shapes(p))
    if dtype == "qat-q4_0":
        return {name: "F32" if len(shape) == 1 else "F16" if name == "token_embd.weight"
                else "Q4_0" for name, shape in shapes.items()}
    # What llama.cpp's quantizer makes of the BF16 release (1-D norms are F32 there).
    from wicore_cpp.gguf_file import GGUFFile, GGUFTensor, ggml_row_bytes
    from wicore_cpp.quantize.plan import plan_quantization

    tensors = []
    for name, shape in shapes.items():
        ggml_shape = tuple(reversed(shape))
        n = int(np.prod(shape))
        src = "F32" if len(shape) == 1 else "BF16"
        tensors.append(GGUFTensor(name, src, ggml_shape, n, ggml_row_bytes(src, n)))
    source = GGUFFile(Path(f"{p.name}-bf16.gguf"), ARCH, size_bytes=0, header_bytes=0,
                      alignment=32, context_length=p.n_ctx_train, n_layer=p.n_layer,
                      n_head=p.n_head, n_head_kv=p.n_head_kv, n_expert=0, tensors=tuple(tensors))
    type_name, main_format = {"q4_k_m": ("Q4_K_M", "Q4_K"), "q8_0": ("Q8_0", "Q8_0")}[dtype]
    plan = plan_quantization(source, type_name, main_format)
    return {t.name: t.dst_type for t in plan.tensors}


def write_sparse_model(out_path: str | os.PathLike[str], preset: str = "gemma-3-27b",
                       dtype: str | None = None) -> Path:
    """Write a sparse model: real header and tensor table, weights a hole of zeros.

    Zeros are valid data in every ggml type (scales of 0), so llama.cpp loads and runs it; the
    file takes a few MB of disk whatever its size.
    """
    from wicore_cpp.gguf_file import ggml_row_bytes

    p = PRESETS[preset]
    dtype = dtype or p.default_dtype
    if dtype not in SPARSE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SPARSE_DTYPES)}, not {dtype!r}")
    types = sparse_tensor_types(p, dtype)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{out.name}.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(w, p, SPARSE_DTYPES[dtype], is_quantized=True)
        alignment = w.data_alignment
        data_bytes = 0
        for name, shape in tensor_shapes(p):
            ggml_type = types[name]
            nbytes = ggml_row_bytes(ggml_type, int(np.prod(shape)))
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[ggml_type])
            data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, alignment)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        with tmp.open("r+b") as f:
            header = f.seek(0, os.SEEK_END)
            f.truncate(gguf.GGUFWriter.ggml_pad(header, alignment) + data_bytes)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


class ProjectorPreset(NamedTuple):
    """A Gemma 3 vision tower (SigLIP) and its projector onto the text model's embeddings."""

    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    image_size: int  # every image is resized to a square of this side
    patch_size: int
    n_merge: int  # patches averaged per side before the projection (Gemma 3: 4)

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the prompt: Gemma 3's 256 for every preset here."""
        return (self.image_size // self.patch_size // self.n_merge) ** 2


# Gemma 3's real tower is 27 layers of width 1152 (about 400M parameters) over 896 px images: 4096
# patches of 14 px, average-pooled 4x4 into 256 tokens. The demo keeps the 256 tokens and the
# patches but takes 448 px images pooled 2x2 (attention over 1024 patches, not 4096) and a narrow,
# shallow tower, so tests on two busy cores encode an image in a small fraction of a second.
PROJECTOR_PRESETS: dict[str, ProjectorPreset] = {
    "demo": ProjectorPreset(n_embd=64, n_layer=2, n_head=2, n_ff=128, image_size=448,
                            patch_size=14, n_merge=2),
    "demo-swa32": ProjectorPreset(n_embd=64, n_layer=2, n_head=2, n_ff=128, image_size=448,
                                  patch_size=14, n_merge=2),
    # Gemma 3's own input size and pooling (896 px, 4096 patches pooled 4x4), a narrow tower.
    "bench": ProjectorPreset(n_embd=128, n_layer=2, n_head=2, n_ff=512, image_size=896,
                             patch_size=14, n_merge=4),
}
# SigLIP's preprocessing constants in Gemma 3's processor (mean and std 0.5 on every channel).
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def projector_path_for(model_path: str | os.PathLike[str]) -> Path:
    """Where `make demo-model` puts a model's projector: `mmproj-<model stem>-f16.gguf`
    beside it, the name the server finds by itself."""
    model = Path(model_path)
    return model.with_name(f"mmproj-{model.stem}-f16.gguf")


def _projector_weights(p: ProjectorPreset, n_embd_text: int, rng: np.random.Generator):
    """Yield (name, float32 array) of a Gemma 3 projector, named as llama.cpp's clip loader
    looks them up (tools/mtmd/clip-impl.h). numpy shape = reversed ggml shape."""
    d, n_patches = p.n_embd, (p.image_size // p.patch_size) ** 2
    yield "v.patch_embd.weight", _normal(rng, (d, 3, p.patch_size, p.patch_size),
                                         1 / np.sqrt(3 * p.patch_size**2))
    yield "v.patch_embd.bias", np.zeros(d, dtype=np.float32)
    yield "v.position_embd.weight", _normal(rng, (n_patches, d), 0.02)
    ones, zeros = np.ones(d, dtype=np.float32), np.zeros(d, dtype=np.float32)
    for i in range(p.n_layer):
        b = f"v.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            yield b + part + ".weight", _normal(rng, (d, d), 1 / np.sqrt(d))
            yield b + part + ".bias", zeros
        yield b + "ln1.weight", ones
        yield b + "ln1.bias", zeros
        yield b + "ln2.weight", ones
        yield b + "ln2.bias", zeros
        # up: d -> n_ff, down: n_ff -> d (the loader swaps them back if a file has them reversed)
        yield b + "ffn_up.weight", _normal(rng, (p.n_ff, d), 1 / np.sqrt(d))
        yield b + "ffn_up.bias", np.zeros(p.n_ff, dtype=np.float32)
        yield b + "ffn_down.weight", _normal(rng, (d, p.n_ff), 1 / np.sqrt(p.n_ff))
        yield b + "ffn_down.bias", zeros
    yield "v.post_ln.weight", ones
    yield "v.post_ln.bias", zeros
    yield "mm.soft_emb_norm.weight", ones
    # Applied transposed: (vision width -> text width). Small, like the text embedding rows, so
    # an image does not swamp the random model's residual stream.
    yield "mm.input_projection.weight", _normal(rng, (d, n_embd_text),
                                                EMBD_STD_TIMES_SQRT_D / np.sqrt(n_embd_text))


def write_projector(out_path: str | os.PathLike[str], preset: str = "demo",
                    dtype: str = "f16", seed: int = 0) -> Path:
    """Write a random-weight Gemma 3 projector (mmproj GGUF) that fits `preset`'s text model,
    atomically, and return its path. llama.cpp's libmtmd loads it like Google's own
    (mmproj-model-f16.gguf): 256 tokens per image, the same preprocessing, gibberish output."""
    if preset not in PROJECTOR_PRESETS:
        raise ValueError(f"no projector preset {preset!r}; one of {sorted(PROJECTOR_PRESETS)}")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"projector dtype must be f32 or f16, not {dtype!r}")
    p, text = PROJECTOR_PRESETS[preset], PRESETS[preset]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{out.name}.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, "clip")
        w.add_name(f"gemma-3-{preset}-random-mmproj")
        w.add_description("Random-weight Gemma 3 vision projector for tests and benchmarks")
        w.add_file_type(int(DTYPES[dtype][1]))
        w.add_string("clip.projector_type", "gemma3")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.embedding_length", p.n_embd)
        w.add_uint32("clip.vision.feed_forward_length", p.n_ff)
        w.add_uint32("clip.vision.block_count", p.n_layer)
        w.add_uint32("clip.vision.projection_dim", text.n_embd)
        w.add_uint32("clip.vision.attention.head_count", p.n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_uint32("clip.vision.image_size", p.image_size)
        w.add_uint32("clip.vision.patch_size", p.patch_size)
        w.add_uint32("clip.vision.projector.scale_factor", p.n_merge)
        w.add_array("clip.vision.image_mean", IMAGE_MEAN)
        w.add_array("clip.vision.image_std", IMAGE_STD)
        rng = np.random.default_rng(seed)
        for name, arr in _projector_weights(p, text.n_embd, rng):
            # Like the converter: matrices (and the patch kernel) in the file's type, the rest F32.
            if arr.ndim >= 2 and dtype == "f16" and name != "v.position_embd.weight":
                arr = arr.astype(np.float16)
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--out", required=True, help="path of the GGUF file to write")
    parser.add_argument("--dtype", choices=sorted({*DTYPES, *SPARSE_DTYPES}), default=None,
                        help="weight type (default: f16 for demo, q8_0 for bench, q4_k_m for "
                        "gemma-3-27b; q4_k_m and qat-q4_0 only for gemma-3-27b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmproj", nargs="?", const="", default=None, metavar="PATH",
                        help="also write the preset's vision projector (Gemma 3 mmproj GGUF), to "
                        "PATH or, without one, beside --out as mmproj-<stem>-f16.gguf")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    p = PRESETS[args.preset]
    out = write_model(args.out, preset=args.preset, dtype=args.dtype, seed=args.seed)
    size = out.stat().st_size
    log.info("wrote %s (%s preset, %s, %d layers, vocab %d): %.1f MB", out, args.preset,
             args.dtype or p.default_dtype, p.n_layer, p.n_vocab, size / 1e6)
    if args.mmproj is not None:
        proj = write_projector(args.mmproj or projector_path_for(out), preset=args.preset,
                               seed=args.seed)
        log.info("wrote %s (%s projector, %d tokens an image): %.1f MB", proj, args.preset,
                 PROJECTOR_PRESETS[args.preset].image_tokens, proj.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
