"""`kv_cache_type`: a quantized KV cache really is what the worker's context holds, it serves,
its quality cost is measured, and what llama.cpp cannot do is refused up front."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_config, serve_in_process
from wicore_cpp.config import ConfigError, load_config
from wicore_cpp.quantize.check import compare_kv_cache_types

_CONTEXT = """
import sys
from pathlib import Path
from wicore_cpp.engine.backend import BackendError, BatchContext, Model
from wicore_cpp.engine.llama_log import llama_log
from wicore_cpp.engine.memory_probe import _LogCollector
lines = _LogCollector()
llama_log().sink = lines
model = Model(Path(sys.argv[1]))
ctx = BatchContext(model, n_ctx=1024, n_batch=64, n_seq_max=3, threads=1, flash_attn="auto",
                   kv_cache_type=sys.argv[2])
for line in lines.take():
    if "llama_kv_cache: size" in line or "flash_attn" in line.lower():
        print(line)
# A step asks for at most one token's logits per sequence; a fourth is refused in Python
# (llama.cpp would abort the process on it).
for seq in range(3):
    ctx.add(1, 0, seq, True)
try:
    ctx.add(2, 1, 0, True)
except BackendError as exc:
    print("refused:", exc)
ctx.clear_batch()
ctx.add(1, 0, 0, True)
assert ctx.decode() == 0
print("decoded")
"""


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_the_context_holds_the_chosen_type(kv, demo_model_path):
    out = subprocess.run([sys.executable, "-c", _CONTEXT, str(demo_model_path), kv],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    kv_lines = [line for line in out.stdout.splitlines() if "llama_kv_cache: size" in line]
    assert len(kv_lines) == 2  # full-attention and sliding-window layers
    assert all(f"K ({kv}):" in line and f"V ({kv}):" in line for line in kv_lines)
    assert "refused: more logits in one step than sequences" in out.stdout
    assert out.stdout.strip().endswith("decoded")


def test_quantized_cache_without_flash_attention_is_refused():
    with pytest.raises(ConfigError, match="kv_cache_type q8_0 needs flash attention"):
        load_config(environ={}, flags={"kv_cache_type": "q8_0", "flash_attn": "off"})
    with pytest.raises(ConfigError, match="kv_cache_type"):
        load_config(environ={"WICORE_KV_CACHE_TYPE": "q5_1"})
    assert load_config(environ={}, flags={"kv_cache_type": "q4_0"}).flash_attn == "auto"


async def test_serves_with_a_quantized_cache(demo_model_path):
    config = make_config(demo_model_path, kv_cache_type="q8_0", flash_attn="auto")
    async with serve_in_process(config) as served:
        status, body, _ = await served.chat(max_tokens=8, temperature=0)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        status, events, _ = await served.stream(max_tokens=8, temperature=0)
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if isinstance(e, dict) and e["choices"]) == body["choices"][0][
                           "message"]["content"]


def test_quality_cost_is_ordered(demo_model_path):
    """Measured as `wicore quantize --check` measures a model: q8_0 costs little, q4_0 more."""
    results = compare_kv_cache_types(str(demo_model_path), n_threads=2)
    q8, q4 = results["q8_0"], results["q4_0"]
    assert 0 < q8.mean_kl < q4.mean_kl
    assert q8.top1_agreement >= q4.top1_agreement and q8.n_positions > 100
