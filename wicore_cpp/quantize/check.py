"""`--check`: how far the quantized model's next-token distributions moved from the original's.

Both models read the same built-in prompts; at every position we compare the two distributions
over the next token: KL(original || quantized) in nats, and whether the most likely token is the
same (top-1 agreement). The models are loaded one after the other, so a 27B check needs the
memory of the bigger model, not of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wicore_cpp.config import resolve_threads

# Short, varied text: prose, code, arithmetic, a list, translation, and Gemma's chat format.
PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain it boils at",
    "1, 1, 2, 3, 5, 8, 13, 21, 34,",
    "Translate to German: 'Good morning, how are you today?'\nGerman:",
    "<start_of_turn>user\nWrite a haiku about autumn leaves.<end_of_turn>\n<start_of_turn>model\n",
)
_N_CTX = 256


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The quality cost of a quantization on the built-in prompts."""

    mean_kl: float  # nats, averaged over every position of every prompt
    max_kl: float
    top1_agreement: float  # fraction of positions where both models rank the same token first
    n_positions: int
    n_prompts: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64 so tiny differences survive."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_distributions(
    original: list[np.ndarray], quantized: list[np.ndarray]
) -> CheckResult:
    """KL and top-1 agreement over positions; each array is (positions, vocab) of logits."""
    kls: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    for p_logits, q_logits in zip(original, quantized, strict=True):
        logp, logq = log_softmax(p_logits), log_softmax(q_logits)
        kls.append((np.exp(logp) * (logp - logq)).sum(axis=-1))
        agree.append(p_logits.argmax(axis=-1) == q_logits.argmax(axis=-1))
    kl, top1 = np.concatenate(kls), np.concatenate(agree)
    return CheckResult(
        mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1_agreement=float(top1.mean()),
        n_positions=int(kl.size), n_prompts=len(original),
    )


def _all_logits(
    model_path: str, n_threads: int, prompts: tuple[str, ...], tokens: list[list[int]] | None,
    **context: object,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits at every position of every prompt; tokenizes with this model when tokens is None.
    `context` goes to llama.cpp's context (e.g. type_k, type_v, flash_attn)."""
    from llama_cpp import Llama

    threads = resolve_threads(n_threads)
    llm = Llama(
        model_path=model_path, n_ctx=_N_CTX, n_batch=_N_CTX, n_ubatch=_N_CTX, logits_all=True,
        n_gpu_layers=0, n_threads=threads, n_threads_batch=threads, verbose=False, **context,
    )
    try:
        if tokens is None:
            # special=True: the chat prompt's <start_of_turn> must be one token, as in serving
            tokens = [llm.tokenize(p.encode(), add_bos=True, special=True)[:_N_CTX]
                      for p in prompts]
        logits = []
        for toks in tokens:
            llm.reset()
            llm.eval(toks)
            logits.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
        return logits, tokens
    finally:
        llm.close()


def compare_models(
    original_path: str, quantized_path: str, n_threads: int = 0,
    prompts: tuple[str, ...] = PROMPTS,
) -> CheckResult:
    """Run both models over the prompts (the same tokens for both) and compare."""
    original, tokens = _all_logits(original_path, n_threads, prompts, None)
    quantized, _ = _all_logits(quantized_path, n_threads, prompts, tokens)
    if original[0].shape[-1] != quantized[0].shape[-1]:
        raise ValueError("the two models have different vocabulary sizes")
    return compare_distributions(original, quantized)


def compare_kv_cache_types(
    model_path: str, kv_types: tuple[str, ...] = ("q8_0", "q4_0"), n_threads: int = 0,
    prompts: tuple[str, ...] = PROMPTS,
) -> dict[str, CheckResult]:
    """The quality cost of a quantized KV cache (`kv_cache_type`): the same model with an f16
    cache and with each of `kv_types`, flash attention on in all (a quantized V cache needs
    it), compared like two model files."""
    from wicore_cpp.engine.backend import KV_CACHE_TYPES

    reference, tokens = _all_logits(model_path, n_threads, prompts, None, flash_attn=True)
    results = {}
    for kv in kv_types:
        ggml_type = KV_CACHE_TYPES[kv]
        logits, _ = _all_logits(model_path, n_threads, prompts, tokens, flash_attn=True,
                                type_k=ggml_type, type_v=ggml_type)
        results[kv] = compare_distributions(reference, logits)
    return results
