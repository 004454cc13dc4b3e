"""In-process API tests: every endpoint, field and error, served by real workers on the demo
GGUF through llama.cpp."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import MODEL_ID, make_config, serve_in_process

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def assert_error(status: int, body: dict, want_status: int, want_type: str, param=None, code=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["type"] == want_type
    assert err["message"]
    assert err["code"] == (code or str(want_status))
    if param is not None:
        assert err["param"] == param


# -- informational endpoints ---------------------------------------------------------------------


async def test_root(api):
    status, body = await api.get("/")
    assert status == 200
    assert body["message"] == "wicore-cpp 推理引擎"
    assert body["version"] == "1.0.0"


async def test_models_list_and_get(api):
    status, body = await api.get("/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "wicore"
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    status, one = await api.get(f"/v1/models/{MODEL_ID}")
    assert status == 200 and one == card
    status, body = await api.get("/v1/models/nope")
    assert_error(status, body, 404, "invalid_request_error", code="model_not_found")


async def test_health_when_serving(api):
    status, body = await api.get("/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["engine"] == "wicore-cpp"
    assert body["scheduler"] == "running"
    # The document's value formats: strings, a float uptime, a percentage.
    float(body["uptime"])
    int(body["total_requests"])
    int(body["error_count"])
    assert body["error_rate"].endswith("%")


async def test_status_fields_follow_the_document(api):
    await api.chat(HELLO, max_tokens=2)
    status, body = await api.get("/status")
    assert status == 200
    assert body["server_running"] == "是"
    assert body["port"] == api.url.rsplit(":", 1)[1]
    assert body["uptime"].endswith("s")
    assert int(body["total_requests"]) >= 1
    lines = body["scheduler_status"].split("\n")
    assert lines[0] == "调度器状态:"
    for label in ("运行中: 是", "总请求数:", "已完成:", "失败:", "取消:", "活跃请求:", "队列长度:",
                  "成功率:", "平均处理时间:", "平均等待时间:"):
        assert any(line.strip().startswith(label) for line in lines), label
    q = body["queue_summary"].split("\n")
    assert q[0] == "队列状态:"
    for label in ("低优先级", "普通优先级", "高优先级", "紧急优先级", "活跃处理"):
        assert any(label in line and line.endswith("个请求") for line in q), label
    m = body["metrics"]
    assert m["total_requests"] == int(body["total_requests"])
    assert m["completed"] >= 1
    assert set(m["queued_by_priority"]) == {"low", "normal", "high", "urgent"}
    assert isinstance(m["mean_processing_s"], float) and m["mean_processing_s"] > 0
    assert len(m["workers"]) == 1 and m["workers"][0]["ready"] is True


async def test_unknown_route_and_wrong_method_use_error_shape(api):
    status, body = await api.get("/v2/nothing")
    assert_error(status, body, 404, "invalid_request_error")
    status, body = await api.get("/v1/chat/completions")
    assert_error(status, body, 405, "invalid_request_error")


# -- chat completions ----------------------------------------------------------------------------


async def test_chat_completion_shape_and_usage(api):
    status, body, headers = await api.chat(HELLO, max_tokens=12, temperature=0, return_token_ids=True)
    assert status == 200
    assert body["id"].startswith("req_") and headers["X-Request-Id"] == body["id"]
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL_ID
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] == len(choice["token_ids"]) <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 5


async def test_ids_are_unique(api):
    results = await asyncio.gather(*(api.chat(HELLO, max_tokens=1) for _ in range(6)))
    ids = {body["id"] for _, body, _ in results}
    assert len(ids) == 6


async def test_model_omitted_uses_default_and_unknown_is_404(api):
    status, body, _ = await api.chat(HELLO, max_tokens=2)
    assert status == 200 and body["model"] == MODEL_ID
    status, body, _ = await api.chat(HELLO, model="gpt-4", max_tokens=2)
    assert_error(status, body, 404, "invalid_request_error", param="model", code="model_not_found")


async def test_max_tokens_and_max_completion_tokens(api):
    _, body, _ = await api.chat(HELLO, max_tokens=3, temperature=0)
    assert body["usage"]["completion_tokens"] <= 3
    _, body, _ = await api.chat(HELLO, max_completion_tokens=4, max_tokens=50, temperature=0)
    assert body["usage"]["completion_tokens"] <= 4
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 4


async def test_greedy_is_deterministic_and_seed_repeats(api_without_cache):
    api = api_without_cache
    a = await api.chat(HELLO, max_tokens=24, temperature=0)
    b = await api.chat(HELLO, max_tokens=24, temperature=0)
    assert a[1]["choices"][0]["message"] == b[1]["choices"][0]["message"]
    s1 = await api.chat(HELLO, max_tokens=24, temperature=1.0, seed=7, return_token_ids=True)
    s2 = await api.chat(HELLO, max_tokens=24, temperature=1.0, seed=7, return_token_ids=True)
    assert s1[1]["choices"][0]["token_ids"] == s2[1]["choices"][0]["token_ids"]
    others = [await api.chat(HELLO, max_tokens=24, temperature=1.0, seed=s, return_token_ids=True)
              for s in (8, 9, 10)]
    assert any(o[1]["choices"][0]["token_ids"] != s1[1]["choices"][0]["token_ids"] for o in others)


async def test_sampling_parameters_change_the_output(api):
    base = await api.chat(HELLO, max_tokens=32, temperature=0, return_token_ids=True)
    penalised = await api.chat(HELLO, max_tokens=32, temperature=0, frequency_penalty=2.0,
                               presence_penalty=2.0, return_token_ids=True)
    base_ids = base[1]["choices"][0]["token_ids"]
    pen_ids = penalised[1]["choices"][0]["token_ids"]
    assert base[0] == penalised[0] == 200
    # Penalties only act on repeats; the greedy demo output repeats tokens, so they must differ.
    assert len(set(base_ids)) < len(base_ids)
    assert pen_ids != base_ids
    # top_p near 0 keeps only the most likely token: sampling at any temperature is greedy.
    narrow = await api.chat(HELLO, max_tokens=32, temperature=1.5, top_p=0.0, seed=3,
                            return_token_ids=True)
    assert narrow[1]["choices"][0]["token_ids"] == base_ids


async def test_content_parts_and_system_message(api):
    text = await api.chat([{"role": "user", "content": "Tell me a story"}], max_tokens=8,
                          temperature=0)
    parts = await api.chat([{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}],
                           max_tokens=8, temperature=0)
    assert text[1]["choices"][0]["message"] == parts[1]["choices"][0]["message"]
    with_system = await api.chat([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Tell me a story"}], max_tokens=2)
    assert with_system[0] == 200
    # Gemma folds the system text into the first user turn: more prompt tokens, same turns.
    assert with_system[1]["usage"]["prompt_tokens"] > text[1]["usage"]["prompt_tokens"]


async def test_template_rejects_non_alternating_roles(api):
    status, body, _ = await api.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert_error(status, body, 400, "invalid_request_error", param="messages")
    assert "alternate" in body["error"]["message"]


async def test_stop_sequences_are_never_emitted(api):
    _, full, _ = await api.chat(HELLO, max_tokens=40, temperature=0)
    text = full["choices"][0]["message"]["content"]
    assert len(text) > 12, text
    stop = text[8:11]
    cut = text.index(stop)
    _, stopped, _ = await api.chat(HELLO, max_tokens=40, temperature=0, stop=[stop, "zzzzqqq"])
    assert stopped["choices"][0]["message"]["content"] == text[:cut]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, streamed, _ = await api.stream(HELLO, max_tokens=40, temperature=0, stop=stop)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1] if e["choices"])
    assert content == text[:cut]


async def test_stream_shape(api):
    status, events, headers = await api.stream(HELLO, max_tokens=10, temperature=0,
                                                stream_options={"include_usage": True})
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] in ("stop", "length")
    content = chunks[1:-2]
    assert content and all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all("content" in c["choices"][0]["delta"] for c in content)
    assert usage_chunk["usage"]["completion_tokens"] <= 10
    # Without include_usage there is no usage chunk.
    _, plain, _ = await api.stream(HELLO, max_tokens=4)
    assert all("usage" not in c for c in plain[:-1])


async def test_stream_equals_non_stream_for_same_seed(api_without_cache):
    api = api_without_cache
    body = dict(max_tokens=48, temperature=0.9, seed=1234)
    _, whole, _ = await api.chat(HELLO, **body)
    _, events, _ = await api.stream(HELLO, **body)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_multibyte_characters_are_never_split(api, demo_model_path):
    """Incremental decoding per chunk must equal decoding all the tokens' bytes at once."""
    from llama_cpp import Llama

    vocab = Llama(str(demo_model_path), vocab_only=True, verbose=False)
    found = False
    for seed in range(40):
        _, events, _ = await api.stream([{"role": "user", "content": "量子计算 🙂 café"}],
                                        max_tokens=48, temperature=1.5, seed=seed,
                                        return_token_ids=True)
        chunks = [e["choices"][0] for e in events[1:-2]]
        text = "".join(c["delta"]["content"] for c in chunks)
        ids = [t for c in chunks for t in c["token_ids"]]
        whole = vocab.detokenize(ids).decode("utf-8", errors="replace")
        assert text == whole
        if any(len(c["delta"]["content"].encode()) != len(c["delta"]["content"]) for c in chunks):
            found = True
            break
    assert found, "no multi-byte output in 40 seeds: the test exercised nothing"


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"n": 5}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"priority": "asap"}, "priority"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(api, body, param):
    status, resp, _ = await api.chat(HELLO, **body) if "messages" not in body else await api.chat(**body)
    assert_error(status, resp, 400, "invalid_request_error", param=param)
    assert param.split("[")[0].split(".")[0] in resp["error"]["message"] or param == "priority"


async def test_bad_priority_header_and_bad_json(api):
    async with api.session.post(f"{api.url}/v1/chat/completions", json={"messages": HELLO},
                                headers={"X-Priority": "whenever"}) as r:
        assert_error(r.status, await r.json(), 400, "invalid_request_error", param="X-Priority")
    # Also beside a good body priority (which would win): a bad header is not ignored.
    async with api.session.post(f"{api.url}/v1/chat/completions",
                                json={"messages": HELLO, "priority": "high"},
                                headers={"X-Priority": "whenever"}) as r:
        assert_error(r.status, await r.json(), 400, "invalid_request_error", param="X-Priority")
    async with api.session.post(f"{api.url}/v1/chat/completions", data=b"{not json") as r:
        assert_error(r.status, await r.json(), 400, "invalid_request_error")
    async with api.session.post(f"{api.url}/v1/chat/completions", data=b"[1, 2]") as r:
        assert_error(r.status, await r.json(), 400, "invalid_request_error")


async def test_priority_is_accepted_in_body_and_header(api):
    status, _, _ = await api.chat(HELLO, max_tokens=1, priority="urgent")
    assert status == 200
    async with api.session.post(f"{api.url}/v1/chat/completions",
                                json={"messages": HELLO, "max_tokens": 1},
                                headers={"X-Priority": "LOW"}) as r:
        assert r.status == 200


async def test_prompt_longer_than_context_is_rejected_before_queueing(api):
    _, before = await api.get("/status")
    long_text = "hello world " * 5000  # > 8192 tokens, the demo model's trained context
    status, body, _ = await api.chat([{"role": "user", "content": long_text}])
    assert_error(status, body, 400, "invalid_request_error", param="messages",
                 code="context_length_exceeded")
    assert "8192" in body["error"]["message"]
    _, after = await api.get("/status")
    assert after["metrics"]["total_requests"] == before["metrics"]["total_requests"]


async def test_max_tokens_is_clipped_to_the_context(demo_model_path):
    """A prompt that fits leaves room for at most context - prompt tokens; no error.

    Its own server with a 256-token context (`max_seq_len`), so the prompt and the room left
    are small and quick on any machine, and a request deadline no slow machine reaches."""
    limit = 256
    config = make_config(demo_model_path, max_seq_len=limit, request_timeout_s=3600)

    def words(n: int) -> list[dict]:
        return [{"role": "user", "content": "hello world " * n}]

    async with serve_in_process(config) as served:
        # How many tokens a repeat costs, to build a prompt a few tokens short of the limit.
        _, small, _ = await served.chat(words(10), max_tokens=1)
        _, large, _ = await served.chat(words(20), max_tokens=1)
        per_repeat = (large["usage"]["prompt_tokens"] - small["usage"]["prompt_tokens"]) / 10
        base = small["usage"]["prompt_tokens"] - 10 * per_repeat
        n = int((limit - 8 - base) / per_repeat)
        status, body, _ = await served.chat(words(n), max_tokens=100000, temperature=0)
        assert status == 200, body
        usage = body["usage"]
        assert limit - 20 < usage["prompt_tokens"] < limit
        assert 1 <= usage["completion_tokens"] <= limit - usage["prompt_tokens"]
        assert usage["total_tokens"] <= limit
        if body["choices"][0]["finish_reason"] == "length":
            assert usage["total_tokens"] == limit
        # A little more and it no longer fits at all.
        status, body, _ = await served.chat(words(n + int(20 / per_repeat) + 1), max_tokens=1)
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
