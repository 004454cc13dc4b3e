"""Backend sampling (the chain inside llama.cpp's decode graph) against the CPU path, on real
llama.cpp and the demo model: the same tokens greedily, the same distribution when sampled.

The distribution tests draw a few thousand first tokens per path with fixed seeds, so they are
deterministic; their bound is a chi-square test at a significance of 1e-6 (a correct sampler
fails it for one seed in a million), and each test also shows the bound rejects a sampler that
is really different (another temperature), so it can fail.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from wicore_cpp.engine.backend import BatchContext, Model, Sampler, runs_on_backend
from wicore_cpp.engine.batcher import ContinuousBatcher
from wicore_cpp.engine.messages import GenerateRequest, SamplingParams
from wicore_cpp.engine.queue import Priority
from wicore_cpp.engine.worker import uses_backend_sampling

N_SEQ = 16
DRAWS_PER_SEQ = 100  # 16 x 100 = 1,600 draws per path


@pytest.fixture(scope="module")
def model(demo_model_path):
    m = Model(demo_model_path)
    yield m
    m.close()


def prompt_of(model, text: str) -> list[int]:
    return model.tokenize(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
                          add_special=True)


def run_batcher(model, requests: list[GenerateRequest], backend: bool,
                ) -> tuple[dict[str, list[int]], set[str]]:
    """Every request to the end in one batcher; each one's tokens and which ran on the
    backend."""
    ctx = BatchContext(model, n_ctx=4096, n_batch=64, n_seq_max=4, threads=2, flash_attn="off",
                       backend_sampling=backend)
    batcher = ContinuousBatcher(model, ctx)
    for req in requests:
        batcher.submit(req)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    on_backend: set[str] = set()
    while not batcher.is_idle:
        on_backend |= {rid for (rid, _), s in batcher._active.items() if s.sampler.on_backend}
        for rid, _, _, ids, _, _, _ in batcher.step():
            tokens[rid] += ids
    ctx.close()
    return tokens, on_backend


def greedy(model, rid: str, text: str, **params) -> GenerateRequest:
    return GenerateRequest(rid, prompt_of(model, text),
                           SamplingParams(max_tokens=24, temperature=0, **params),
                           int(Priority.NORMAL))


def test_which_requests_may_sample_on_the_backend():
    assert runs_on_backend(SamplingParams(max_tokens=8, temperature=0.7, top_k=40, top_p=0.9,
                                          min_p=0.05, seed=1))
    assert runs_on_backend(SamplingParams(max_tokens=8, temperature=0))
    for cpu_only in (dict(grammar="root ::= \"a\""), dict(logit_bias=((1, 2.0),)),
                     dict(logprobs=0), dict(repetition_penalty=1.1),
                     dict(frequency_penalty=0.5), dict(presence_penalty=0.5), dict(n=2)):
        assert not runs_on_backend(SamplingParams(max_tokens=8, **cpu_only)), cpu_only


def test_backend_sampling_setting_resolves_by_offload():
    assert uses_backend_sampling("auto", offloaded=True)
    assert not uses_backend_sampling("auto", offloaded=False)
    assert uses_backend_sampling("on", offloaded=False)
    assert not uses_backend_sampling("off", offloaded=True)


def test_greedy_tokens_are_the_same_on_both_paths(model):
    requests = [greedy(model, "a", "Tell me about the sea."),
                greedy(model, "b", "Write a poem about a cat."),
                greedy(model, "c", "What is a hash table?")]
    on_cpu, none = run_batcher(model, requests, backend=False)
    on_gpu, used = run_batcher(model, requests, backend=True)
    assert none == set() and used == {"a", "b", "c"}
    assert all(len(t) == 24 for t in on_cpu.values())
    assert on_gpu == on_cpu


def test_a_batch_mixes_both_paths(model):
    """Sequences that need the logits (log-probabilities, a penalty) decode in the same batch
    as backend-sampled ones; each gets the tokens it gets alone on the CPU."""
    requests = [greedy(model, "plain", "Tell me about the sea."),
                greedy(model, "logprobs", "Write a poem about a cat.", logprobs=2),
                greedy(model, "penalty", "What is a hash table?", repetition_penalty=1.3)]
    on_cpu, _ = run_batcher(model, requests, backend=False)
    mixed, used = run_batcher(model, requests, backend=True)
    assert used == {"plain"}
    assert mixed == on_cpu


def test_a_seed_gives_the_same_tokens_however_the_prompt_is_chunked(model):
    """A chain runs only in steps where its sequence gets a token: prefill chunks before that
    must not spend its random draws."""
    prompt = prompt_of(model, "Tell me about the sea and the sky. " * 12)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    runs = []
    for n_batch in (16, 256):
        ctx = BatchContext(model, n_ctx=4096, n_batch=n_batch, n_seq_max=2, threads=2,
                           flash_attn="off", backend_sampling=True)
        batcher = ContinuousBatcher(model, ctx)
        batcher.submit(GenerateRequest("s", prompt, params, int(Priority.NORMAL)))
        tokens, steps, attached = [], 0, []
        while not batcher.is_idle:
            updates = batcher.step()
            steps += 1
            attached.append(len(ctx._attached))
            tokens += [t for _, _, _, ids, _, _, _ in updates for t in ids]
        ctx.close()
        runs.append((tokens, steps, attached))
    (chunked, chunked_steps, attached), (whole, whole_steps, _) = runs
    assert chunked_steps > whole_steps  # the prompt really took several steps
    assert attached[0] == 0  # nothing attached while the first chunks prefill
    assert len(chunked) == 16 and chunked == whole


def test_a_sequence_paused_for_an_urgent_one_resumes_with_its_seed(model):
    """A paused sequence's chain leaves the graph and comes back (llama.cpp aborts the
    process if one chain is attached twice): it resumes where its random state was."""
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11)

    def run(with_urgent: bool) -> tuple[dict[str, list[int]], bool]:
        ctx = BatchContext(model, n_ctx=4096, n_batch=64, n_seq_max=3, threads=2,
                           flash_attn="off", backend_sampling=True)
        batcher = ContinuousBatcher(model, ctx, max_batch_size=2)
        for rid in ("n1", "n2"):
            batcher.submit(GenerateRequest(rid, prompt_of(model, f"Story {rid}."), params,
                                           int(Priority.NORMAL)))
        tokens: dict[str, list[int]] = {}
        paused = False
        step = 0
        while not batcher.is_idle:
            if with_urgent and step == 3:
                batcher.submit(GenerateRequest(
                    "u", prompt_of(model, "Quick!"),
                    SamplingParams(max_tokens=24, temperature=0), int(Priority.URGENT)))
            for rid, _, _, ids, _, _, _ in batcher.step():
                tokens.setdefault(rid, []).extend(ids)
            seqs = {rid: s for (rid, _), s in batcher._active.items()}
            if "u" in seqs and "n2" in seqs and seqs["n2"].slot not in ctx._attached:
                paused = True  # n2 waits, its chain out of the graph
            step += 1
        ctx.close()
        return tokens, paused

    alone, _ = run(with_urgent=False)
    interrupted, paused = run(with_urgent=True)
    assert paused and len(interrupted["u"]) == 24
    assert interrupted["n1"] == alone["n1"] and interrupted["n2"] == alone["n2"]


# --------------------------------------------------------------------------- distributions


def draw_first_tokens(model, params: SamplingParams, backend: bool, seed: int) -> np.ndarray:
    """N_SEQ x DRAWS_PER_SEQ first tokens after one fixed prompt: N_SEQ sequences (seeds
    seed .. seed + 15) decode the prompt's last token together; the cache is cut back after
    each draw so every draw sees the same logits."""
    prompt = prompt_of(model, "Name a colour.")
    ctx = BatchContext(model, n_ctx=4096, n_batch=N_SEQ * 2, n_seq_max=N_SEQ, threads=2,
                       flash_attn="off", backend_sampling=backend)
    # The prompt but its last token in seq 0, shared with the others (no copy in the pool).
    for pos, token in enumerate(prompt[:-1]):
        ctx.add(token, pos, 0, False)
    assert ctx.decode() == 0
    samplers = []
    for s in range(N_SEQ):
        if s:
            ctx.copy_sequence(0, s)
        sampler = Sampler(dataclasses.replace(params, seed=seed + s), model,
                          on_backend=backend)
        assert ctx.attach(s, sampler) == backend
        samplers.append(sampler)
    last = len(prompt) - 1
    out = np.zeros((DRAWS_PER_SEQ, N_SEQ), dtype=np.int64)
    try:
        for d in range(DRAWS_PER_SEQ):
            ctx.clear_batch()
            idx = [ctx.add(prompt[-1], last, s, True) for s in range(N_SEQ)]
            assert ctx.decode() == 0
            out[d] = [samplers[s].sample(ctx, idx[s]) for s in range(N_SEQ)]
            for s in range(N_SEQ):
                ctx.trim(s, last)
    finally:
        for s, sampler in enumerate(samplers):
            ctx.detach(s)
            sampler.free()
        ctx.close()
    return out.ravel()


def chi_square_homogeneity(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sample chi-square statistic over the tokens drawn, tokens with fewer than 10 draws
    in both samples together pooled into one bin; returns (statistic, degrees of freedom)."""
    tokens = np.union1d(a, b)
    ca = np.array([(a == t).sum() for t in tokens], dtype=float)
    cb = np.array([(b == t).sum() for t in tokens], dtype=float)
    rare = (ca + cb) < 10
    if rare.any():
        ca = np.append(ca[~rare], ca[rare].sum())
        cb = np.append(cb[~rare], cb[rare].sum())
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    total = ca + cb
    ea, eb = total * na / (na + nb), total * nb / (na + nb)
    stat = float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())
    return stat, len(ca) - 1


def chi_square_critical(df: int, z: float = 4.753) -> float:
    """The chi-square quantile for a one-sided normal z (4.753: significance 1e-6), by the
    Wilson-Hilferty approximation (accurate to a few percent from df = 3 up)."""
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=1, temperature=1.5),
    SamplingParams(max_tokens=1, temperature=2.5, top_k=20, top_p=0.98, min_p=0.005),
], ids=["temperature", "top-k-top-p-min-p"])
def test_sampled_tokens_follow_the_same_distribution_on_both_paths(model, params):
    on_cpu = draw_first_tokens(model, params, backend=False, seed=1000)
    on_gpu = draw_first_tokens(model, params, backend=True, seed=5000)
    assert len(np.unique(on_cpu)) >= 6  # a spread distribution, or the test would say little
    stat, df = chi_square_homogeneity(on_cpu, on_gpu)
    assert df >= 3
    assert stat < chi_square_critical(df), (stat, df)
    # The same bound rejects a sampler that really differs: a lower temperature.
    colder = dataclasses.replace(params, temperature=params.temperature * 0.5)
    other = draw_first_tokens(model, colder, backend=True, seed=9000)
    stat, df = chi_square_homogeneity(on_cpu, other)
    assert stat > chi_square_critical(df), (stat, df)
