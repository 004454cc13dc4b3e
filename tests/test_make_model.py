"""tools/make_model.py: the synthetic Gemma 3 GGUF loads in llama.cpp and behaves like Gemma 3."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import gguf
import jinja2
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_model.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("wicore_make_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mm = _load_tool()
DEMO = mm.PRESETS["demo"]

UTF8_SAMPLES = [
    "Hello, world! How are you today?",
    "量子计算",
    "🙂",
    "Café, naïve, résumé, Ångström, jalapeño",
    "mixed 量子 🙂 text\n\twith  spaces and 123 digits",
    "",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory) -> Path:
    return mm.write_model(tmp_path_factory.mktemp("demo") / "gemma-3-demo.gguf", preset="demo")


@pytest.fixture(scope="module")
def llm(demo_path):
    model = llama_cpp.Llama(model_path=str(demo_path), n_ctx=2048, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def vocab(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def _chat_prompt(llm, user: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    template = llm.metadata["tokenizer.chat_template"]
    text = jinja2.Environment().from_string(template).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True
    )
    # The template writes <bos> itself: no added BOS, but parse the special tokens.
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def _greedy(llm, tokens: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) >= n or llm.token_eos() == tok or tok == mm.END_OF_TURN:
            break
    return out


def test_write_is_deterministic_and_atomic(tmp_path):
    a = mm.write_model(tmp_path / "a" / "nested" / "model.gguf", preset="demo", seed=0)
    b = mm.write_model(tmp_path / "b.gguf", preset="demo", seed=0)
    c = mm.write_model(tmp_path / "c.gguf", preset="demo", seed=1)
    assert a.is_file() and a.parent.name == "nested"
    assert _sha256(a) == _sha256(b)
    assert _sha256(a) != _sha256(c)
    # Nothing half-written is left beside the outputs.
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert leftovers == []
    assert a.stat().st_size < 8_000_000  # "a few MB"


def test_cli_writes_the_model(tmp_path):
    out = tmp_path / "cli.gguf"
    assert mm.main(["--preset", "demo", "--out", str(out), "--dtype", "f16"]) == 0
    assert out.is_file() and out.stat().st_size > 1_000_000


def test_loads_with_the_expected_shape(llm, demo_path):
    assert llm.n_vocab() == DEMO.n_vocab
    assert llm.n_embd() == DEMO.n_embd == 256
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == DEMO.n_ctx_train == 8192
    assert llama_cpp.llama_model_n_layer(llm.model) == DEMO.n_layer
    assert llama_cpp.llama_model_n_head(llm.model) == 4
    assert llama_cpp.llama_model_n_head_kv(llm.model) == 2
    assert llama_cpp.llama_model_n_swa(llm.model) == DEMO.sliding_window
    assert llm.metadata["general.architecture"] == "gemma3"
    # Every matrix row (ggml's ne0) divides by 256, so K-quants really quantize every matrix.
    reader = gguf.GGUFReader(demo_path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert len(matrices) == 1 + 7 * DEMO.n_layer  # tied output: no output.weight
    assert all(int(t.shape[0]) % 256 == 0 for t in matrices)
    assert {t.tensor_type.name for t in matrices} == {"F16"}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}


def test_special_tokens_and_end_of_generation(llm, vocab):
    def text(tok: int) -> str:
        return llama_cpp.llama_vocab_get_text(vocab, tok).decode()

    assert [text(i) for i in range(6)] == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"
    ]
    assert llama_cpp.llama_vocab_bos(vocab) == mm.BOS == 2
    assert llama_cpp.llama_vocab_eos(vocab) == mm.EOS == 1
    assert llama_cpp.llama_vocab_eot(vocab) == mm.END_OF_TURN == 5
    assert llama_cpp.llama_vocab_get_add_bos(vocab)
    assert not llama_cpp.llama_vocab_get_add_eos(vocab)
    assert llama_cpp.llama_vocab_is_eog(vocab, mm.END_OF_TURN)
    assert llama_cpp.llama_vocab_is_eog(vocab, mm.EOS)
    assert not llama_cpp.llama_vocab_is_eog(vocab, mm.START_OF_TURN)
    assert not llama_cpp.llama_vocab_is_eog(vocab, mm.BOS)
    assert text(mm.BYTE_TOKEN_BASE + 0x41) == "<0x41>"
    # Special tokens are parsed only when asked to.
    assert llm.tokenize(b"<end_of_turn>", add_bos=False, special=True) == [mm.END_OF_TURN]
    assert mm.END_OF_TURN not in llm.tokenize(b"<end_of_turn>", add_bos=False, special=False)
    assert llm.tokenize(b"hi", add_bos=True, special=False)[0] == mm.BOS


@pytest.mark.parametrize("text", UTF8_SAMPLES)
def test_utf8_round_trip(llm, text):
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert llm.detokenize(tokens).decode("utf-8") == text


def test_common_words_are_single_tokens(llm):
    assert len(llm.tokenize(b" hello", add_bos=False, special=False)) == 1
    assert len(llm.tokenize("量子计算".encode(), add_bos=False, special=False)) == 4
    assert len(llm.tokenize("🙂".encode(), add_bos=False, special=False)) == 4  # byte fallback


def test_chat_template_is_gemma3(llm):
    template = llm.metadata["tokenizer.chat_template"]
    assert template == mm.GEMMA3_CHAT_TEMPLATE
    assert llama_cpp.llama_model_chat_template(llm.model, None).decode() == template
    for fragment in (
        "{{ bos_token }}\n",
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}",
        "{%- set role = \"model\" -%}",
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}",
        "{{ message['content'] | trim }}",
        "{{ '<end_of_turn>\n' }}",
        "{{'<start_of_turn>model\n'}}",
        "Conversation roles must alternate user/assistant/user/assistant/...",
    ):
        assert fragment in template
    env = jinja2.Environment()
    render = env.from_string(template).render
    assert render(
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
        ],
        bos_token="<bos>",
        add_generation_prompt=True,
    ) == "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert render(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        bos_token="<bos>",
        add_generation_prompt=False,
    ) == (
        "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
        "<start_of_turn>user\nc<end_of_turn>\n"
    )


def test_greedy_generation_is_not_degenerate(llm):
    prompts = ["What is quantum computing?", "Write a poem about a cat.", "hi"]
    outputs = []
    for user in prompts:
        tokens = _chat_prompt(llm, user, system="You are a helpful assistant.")
        assert tokens[0] == mm.BOS and tokens.count(mm.BOS) == 1
        out = _greedy(llm, tokens, 32)
        assert len(out) == 32, "stopped early on an end-of-generation token"
        assert len(set(out)) >= 8, out  # not one token repeated forever
        assert out[:32] == _greedy(llm, tokens, 32)  # greedy is reproducible
        outputs.append(out)
    assert len({tuple(o) for o in outputs}) == len(outputs)


def test_f32_variant_loads(tmp_path):
    path = mm.write_model(tmp_path / "demo-f32.gguf", preset="demo", dtype="f32")
    f16_size = mm.write_model(tmp_path / "demo-f16.gguf", preset="demo").stat().st_size
    assert path.stat().st_size > 1.8 * f16_size
    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        assert model.n_vocab() == DEMO.n_vocab
        out = model.create_completion("Hello world", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 8
    finally:
        model.close()


def test_bench_vocabulary_is_unique():
    tokens, scores, types = mm.build_vocab(mm.PRESETS["bench"].n_vocab)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32768
    assert scores[mm.FIRST_NORMAL_TOKEN] > scores[-1]


def test_bench_262k_is_the_bench_shape_with_gemma_3s_vocabulary():
    """`make bench`'s model: the bench preset's layers, Gemma-3-27B's 262,144 tokens."""
    big, bench, real = mm.PRESETS["bench-262k"], mm.PRESETS["bench"], mm.PRESETS["gemma-3-27b"]
    assert big.n_vocab == real.n_vocab == 262144
    assert big._replace(name="bench", n_vocab=bench.n_vocab) == bench


def test_sparse_gemma_3_27b_has_the_real_shape(gemma_27b_files, tmp_path):
    """The 27B preset: 808 tensors in the real files' types, 15.4 GiB that take no disk."""
    from collections import Counter

    from wicore_cpp.gguf_file import read_gguf

    path = gemma_27b_files["Q4_K_M"]
    m = read_gguf(path)
    assert len(m.tensors) == 808 and m.n_layer == 62 and m.context_length == 131072
    assert Counter(t.ggml_type for t in m.tensors) == {"Q4_K": 374, "F32": 373, "Q6_K": 61}
    assert round(m.size_bytes / 2**30, 1) == 15.4
    assert path.stat().st_blocks * 512 < 64 * 2**20  # a hole, not 15 GiB of zeros on disk
    embd = m.tensor("token_embd.weight")
    assert embd.shape == (5376, 262144) and embd.ggml_type == "Q6_K"
    assert m.metadata["tokenizer.ggml.tokens"].length == 262144
    assert m.arch_value("attention.sliding_window") == 1024

    # write_model dispatches the sparse preset (the fixture used write_sparse_model).
    again = mm.write_model(tmp_path / "again.gguf", "gemma-3-27b")
    with again.open("rb") as a, path.open("rb") as b:
        assert a.read(1 << 16) == b.read(1 << 16)
    qat = read_gguf(gemma_27b_files["QAT Q4_0"])
    assert Counter(t.ggml_type for t in qat.tensors) == {"Q4_0": 434, "F32": 373, "F16": 1}
    assert round(qat.size_bytes / 2**30, 1) == 16.0  # Google's file: 17.2 GB
    q8 = read_gguf(gemma_27b_files["Q8_0"])
    assert Counter(t.ggml_type for t in q8.tensors) == {"Q8_0": 435, "F32": 373}
    with pytest.raises(ValueError, match="dtype must be one of"):
        mm.write_model(tmp_path / "x.gguf", "gemma-3-27b", "f16")


def test_sparse_model_loads_and_runs_in_llama_cpp(tmp_path):
    """Zeros are valid weights in every type: a sparse file of the demo's shape and Q4_K_M's
    types loads and decodes like any model."""
    path = mm.write_sparse_model(tmp_path / "demo-q4km.gguf", "demo", "q4_k_m")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        out = llm.create_completion("Hello", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def test_tensor_shapes_match_the_written_weights():
    rng = __import__("numpy").random.default_rng(0)
    written = [(name, arr.shape) for name, arr in mm._make_weights(DEMO, rng)]
    assert written == list(mm.tensor_shapes(DEMO))
