"""API keys, priority ceilings, per-key limits and their headers, token quotas (also across a
restart and a crash), Prometheus metrics after real traffic, CORS preflights, and the hint for
`gemma-3-27b-it` when only the demo is served. In-process servers with real workers, except
the crash test, which kills a real `wicore serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_ID, Served, make_config, serve_in_process

HELLO = [{"role": "user", "content": "Hello"}]
SECRETS = {
    "alice": "sk-alice-4c1d2b7e9f",
    "bob": "sk-bob-admin-77aa31c0",
    "carol": "sk-carol-5e0f3a9d21",
    "tok": "sk-tok-1b2c3d4e5f",
    "tok5": "sk-tok5-0a9b8c7d6e",
}
KEYS = {"keys": [
    {"name": "alice", "key": SECRETS["alice"], "requests_per_minute": 3},
    # The file may hold only the digest.
    {"name": "bob", "key_sha256": hashlib.sha256(SECRETS["bob"].encode()).hexdigest(),
     "max_priority": "urgent", "admin": True},
    {"name": "carol", "key": SECRETS["carol"], "priority": "low", "max_priority": "normal"},
    {"name": "tok", "key": SECRETS["tok"], "tokens_per_minute": 1000},
    {"name": "tok5", "key": SECRETS["tok5"], "tokens_per_minute": 5},
]}
RESET_FORMAT = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+s)$")


def write_keys(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


async def call(served: Served, key: str | None = None, path: str = "/v1/chat/completions",
               header: str = "bearer", method: str = "POST", **body):
    """One request with `key` sent the way `header` says; (status, json body, headers)."""
    headers = {}
    if key is not None:
        headers = ({"Authorization": f"Bearer {key}"} if header == "bearer"
                   else {"x-api-key": key} if header == "x-api-key"
                   else {"Authorization": key})
    if method == "POST":
        body = {"messages": HELLO, "max_tokens": 2, **body}
        ctx = served.session.post(served.url + path, json=body, headers=headers)
    else:
        ctx = served.session.get(served.url + path, headers=headers)
    async with ctx as r:
        data = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, data, r.headers.copy()


async def scrape(served: Served, key: str = SECRETS["bob"]) -> dict[tuple, float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    status, text, headers = await call(served, key, "/metrics", method="GET")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    """Sum of `name` over the samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
async def keyed(demo_model_path, tmp_path_factory):
    """One server with API keys on and monitoring for admin keys only."""
    tmp = tmp_path_factory.mktemp("keys")
    config = make_config(demo_model_path, api_keys=str(write_keys(tmp / "keys.json", KEYS)),
                         data_dir=str(tmp / "data"), admin_only_monitoring=True,
                         log_level="INFO")
    async with serve_in_process(config) as served:
        yield served


def assert_invalid_key(status: int, body: dict) -> None:
    assert status == 401, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"]


# -- who may call ------------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_401_in_the_error_shape(keyed):
    wrong = "sk-not-a-real-key-123"
    for key, header in ((None, "bearer"), (wrong, "bearer"), (wrong, "x-api-key"),
                        (f"Basic {SECRETS['carol']}", "raw"), ("Bearer ", "raw")):
        status, body, _ = await call(keyed, key, header=header)
        assert_invalid_key(status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert wrong not in body["error"]["message"]
        assert SECRETS["carol"] not in body["error"]["message"]
    status, body, _ = await call(keyed, None, "/v1/models", method="GET")
    assert_invalid_key(status, body)
    # Liveness and the banner stay open.
    assert (await call(keyed, None, "/health", method="GET"))[0] == 200
    assert (await call(keyed, None, "/", method="GET"))[0] == 200


async def test_bearer_and_x_api_key_both_work(keyed):
    for header in ("bearer", "x-api-key"):
        status, body, _ = await call(keyed, SECRETS["carol"], header=header)
        assert status == 200, body
        assert body["object"] == "chat.completion"
    status, body, _ = await call(keyed, SECRETS["bob"], "/v1/models", method="GET")
    assert status == 200 and body["data"][0]["id"] == MODEL_ID


async def test_status_and_metrics_can_be_limited_to_admin_keys(keyed):
    for path in ("/status", "/metrics"):
        status, body, _ = await call(keyed, SECRETS["carol"], path, method="GET")
        assert status == 403, body
        assert body["error"]["code"] == "permission_denied"
        assert_invalid_key(*(await call(keyed, None, path, method="GET"))[:2])
        assert (await call(keyed, SECRETS["bob"], path, method="GET"))[0] == 200


async def test_a_key_asking_above_its_ceiling_gets_its_ceiling_and_a_header(keyed):
    before = await scrape(keyed)
    # carol: priority low, max_priority normal.
    status, _, headers = await call(keyed, SECRETS["carol"], priority="urgent")
    assert status == 200 and headers["X-Priority-Ceiling"] == "normal"
    status, _, headers = await call(keyed, SECRETS["carol"], priority="normal")
    assert status == 200 and "X-Priority-Ceiling" not in headers
    status, _, headers = await call(keyed, SECRETS["carol"])  # none asked: the key's own
    assert status == 200 and "X-Priority-Ceiling" not in headers
    # The X-Priority header is capped the same way.
    async with keyed.session.post(
            keyed.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
            headers={"Authorization": f"Bearer {SECRETS['carol']}", "X-Priority": "high"}) as r:
        assert r.status == 200 and r.headers["X-Priority-Ceiling"] == "normal"
    # bob may ask for urgent.
    status, _, headers = await call(keyed, SECRETS["bob"], priority="urgent")
    assert status == 200 and "X-Priority-Ceiling" not in headers
    after = await scrape(keyed)

    def runs(key: str, priority: str) -> float:
        return (total(after, "wicore_requests_total", key=key, priority=priority)
                - total(before, "wicore_requests_total", key=key, priority=priority))

    assert runs("carol", "normal") == 3 and runs("carol", "low") == 1
    assert runs("carol", "urgent") == 0 and runs("carol", "high") == 0
    assert runs("bob", "urgent") == 1


async def test_per_key_request_limit_with_headers_counting_down(keyed):
    remaining = []
    for _ in range(3):
        status, _, headers = await call(keyed, SECRETS["alice"])
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert RESET_FORMAT.match(headers["x-ratelimit-reset-requests"])
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    status, body, headers = await call(keyed, SECRETS["alice"])
    assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
    assert "alice" in body["error"]["message"] and SECRETS["alice"] not in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # Limits are per key: another key is not affected.
    assert (await call(keyed, SECRETS["carol"]))[0] == 200


async def test_per_key_token_limit_counts_down_by_the_tokens_used(keyed):
    spent = 0
    for max_tokens in (3, 5):
        status, body, headers = await call(keyed, SECRETS["tok"], max_tokens=max_tokens)
        assert status == 200
        spent += body["usage"]["total_tokens"]
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - spent)
        assert RESET_FORMAT.match(headers["x-ratelimit-reset-tokens"])
        assert "x-ratelimit-limit-requests" not in headers  # no request limit for this key
    # A key whose tokens a minute are spent is refused until they leave the window.
    assert (await call(keyed, SECRETS["tok5"]))[0] == 200
    status, body, headers = await call(keyed, SECRETS["tok5"])
    assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
    assert "tokens a minute" in body["error"]["message"]
    assert headers["x-ratelimit-remaining-tokens"] == "0" and "Retry-After" in headers


async def test_keys_never_appear_in_logs_metrics_or_errors(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = []
    for secret in SECRETS.values():
        bodies.append((await call(keyed, secret))[1])
        bodies.append((await call(keyed, secret + "x"))[1])  # a near miss
        bodies.append((await call(keyed, secret, temperature=9))[1])  # a 400
    _, metrics_text, _ = await call(keyed, SECRETS["bob"], "/metrics", method="GET")
    _, status_body, _ = await call(keyed, SECRETS["bob"], "/status", method="GET")
    everything = caplog.text + metrics_text + json.dumps(bodies) + json.dumps(status_body)
    assert "alice" in metrics_text  # key names are there...
    for secret in SECRETS.values():
        assert secret not in everything  # ...the keys are not
        assert secret[:10] not in everything


# -- quotas ------------------------------------------------------------------------------------


async def test_spent_quota_is_429_insufficient_quota_and_survives_a_restart(
        demo_model_path, tmp_path):
    keys = write_keys(tmp_path / "keys.json", {"keys": [
        {"name": "q", "key": "sk-quota-0123456789", "token_quota": 5},
        {"name": "free", "key": "sk-free-0123456789"}]})
    config = make_config(demo_model_path, api_keys=str(keys), data_dir=str(tmp_path / "data"))
    async with serve_in_process(config) as served:
        status, body, _ = await call(served, "sk-quota-0123456789")
        assert status == 200 and body["usage"]["total_tokens"] > 5
        status, body, headers = await call(served, "sk-quota-0123456789")
        assert status == 429, body
        assert body["error"]["type"] == "insufficient_quota"
        assert body["error"]["code"] == "insufficient_quota"
        assert "Retry-After" not in headers  # waiting does not help
        assert (await call(served, "sk-free-0123456789"))[0] == 200
    async with serve_in_process(config) as served:  # a clean restart
        status, body, _ = await call(served, "sk-quota-0123456789")
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert (await call(served, "sk-free-0123456789"))[0] == 200


def _used_tokens(db: Path, name: str) -> int | None:
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            row = conn.execute("SELECT tokens FROM key_usage WHERE key_name = ?",
                               (name,)).fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


async def _post(url: str, key: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions",
                                json={"messages": HELLO, "max_tokens": 2},
                                headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


def test_quota_use_survives_a_crash(start_server, tmp_path):
    keys = write_keys(tmp_path / "keys.json", {"keys": [
        {"name": "q", "key": "sk-quota-0123456789", "token_quota": 5}]})
    data = tmp_path / "data"
    extra = ("--api-keys", str(keys), "--data-dir", str(data))
    server = start_server(*extra)
    status, body = asyncio.run(_post(server.url, "sk-quota-0123456789"))
    assert status == 200
    # Written within about a second; then the server dies without any chance to flush.
    deadline = time.monotonic() + 30
    while _used_tokens(data / "usage.sqlite3", "q") != body["usage"]["total_tokens"]:
        assert time.monotonic() < deadline, "usage never reached the database"
        time.sleep(0.1)
    server.stop(signal.SIGKILL)  # its workers exit when their pipe closes
    server = start_server(*extra)
    status, body = asyncio.run(_post(server.url, "sk-quota-0123456789"))
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_count_what_was_sent(keyed):
    before = await scrape(keyed)
    usages = {"carol": [], "bob": []}
    for _ in range(3):
        status, body, _ = await call(keyed, SECRETS["carol"], max_tokens=4)
        assert status == 200
        usages["carol"].append(body["usage"])
    for i in range(2):
        async with keyed.session.post(
                keyed.url + "/v1/chat/completions",
                json={"messages": HELLO, "max_tokens": 5, "stream": True, "seed": i,
                      "stream_options": {"include_usage": True}},
                headers={"Authorization": f"Bearer {SECRETS['bob']}"}) as r:
            assert r.status == 200
            events = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                      if line.startswith("data: {")]
        usages["bob"].append(events[-1]["usage"])
    assert (await call(keyed, "sk-wrong-0000000000"))[0] == 401
    after = await scrape(keyed)

    def delta(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for key, sent in usages.items():
        assert delta("wicore_requests_total", key=key, model=MODEL_ID) == len(sent)
        assert delta("wicore_prompt_tokens_total", key=key) == sum(
            u["prompt_tokens"] for u in sent)
        assert delta("wicore_completion_tokens_total", key=key) == sum(
            u["completion_tokens"] for u in sent)
    num = sum(len(s) for s in usages.values())
    outcomes = delta("wicore_requests_total", outcome="length") + delta(
        "wicore_requests_total", outcome="stop")
    assert outcomes == num
    for histogram in ("wicore_time_to_first_token_seconds", "wicore_request_duration_seconds",
                      "wicore_queue_wait_seconds"):
        assert delta(histogram + "_count", model=MODEL_ID) == num, histogram
        assert delta(histogram + "_sum") > 0
    # One gap between each two successive tokens of a request.
    assert delta("wicore_inter_token_latency_seconds_count") == sum(
        u["completion_tokens"] - 1 for s in usages.values() for u in s)
    assert delta("wicore_rejected_requests_total", key="", code="invalid_api_key") == 1
    # Gauges read from the engine at scrape time.
    assert {dict(ls)["priority"] for (n, ls) in after if n == "wicore_queue_length"} == {
        "low", "normal", "high", "urgent"}
    assert total(after, "wicore_queue_length") == 0
    assert total(after, "wicore_running_sequences") == 0
    assert total(after, "wicore_workers_ready", model=MODEL_ID) == 1
    assert total(after, "wicore_kv_cache_size_cells") == 16384
    assert total(after, "wicore_kv_cache_used_cells") == 0
    assert ("wicore_worker_restarts_total", (("model", MODEL_ID),)) in after
    # Names follow the conventions: wicore_ prefix, base units.
    names = {n for (n, _) in after if n.startswith("wicore_")}
    assert all(n.endswith(("_seconds_bucket", "_seconds_count", "_seconds_sum", "_total",
                           "_created", "_cells", "_length", "_sequences", "_ready",
                           "_in_flight", "_bytes", "_entries")) for n in names), names
    # carol asked the same thing three times: the prompt cache served the later two.
    assert delta("wicore_prompt_cache_hits_total") >= 2
    assert delta("wicore_prompt_cache_tokens_total") >= 2 * (usages["carol"][0]["prompt_tokens"]
                                                             - 1)
    assert total(after, "wicore_prompt_cache_cells", model=MODEL_ID) >= usages["carol"][0][
        "prompt_tokens"]
    assert total(after, "wicore_prompt_cache_entries", model=MODEL_ID) >= 1


# -- browsers and the demo -----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def demo_dir_server(demo_model_path, tmp_path_factory):
    """Only the demo model served from a models folder (as without the real GGUF), and CORS
    on for one origin."""
    models = tmp_path_factory.mktemp("models")
    (models / "gemma-3-demo.gguf").symlink_to(demo_model_path)
    config = make_config(demo_model_path, model=None, model_id=None, models_dir=str(models),
                         cors_origins=["https://app.example"])
    async with serve_in_process(config) as served:
        yield served


async def test_asking_for_gemma_27b_while_only_the_demo_is_served(demo_dir_server):
    status, body, _ = await demo_dir_server.chat(HELLO, model="gemma-3-27b-it", max_tokens=2)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    message = body["error"]["message"]
    assert "gemma-3-demo" in message and "gemma-3-27b-it-Q4_K_M.gguf" in message
    assert "models/README.md" in message
    status, body, _ = await demo_dir_server.chat(HELLO, model="gemma-3-demo", max_tokens=2)
    assert status == 200
    status, body, _ = await demo_dir_server.chat(HELLO, model="other", max_tokens=2)
    assert status == 404 and "demo" not in body["error"]["message"]


async def test_cors_preflight_and_response_headers(demo_dir_server):
    url = demo_dir_server.url + "/v1/chat/completions"
    session = demo_dir_server.session
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    async with session.options(url, headers=preflight) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert "content-type" in allowed and "authorization" in allowed
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    async with session.options(url, headers={**preflight, "Origin": "https://evil.example"}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    async with session.post(url, json={"messages": HELLO, "max_tokens": 2},
                            headers={"Origin": "https://app.example"}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "x-request-id" in r.headers["Access-Control-Expose-Headers"].lower()


async def test_cors_is_off_by_default(api):
    async with api.session.options(
            api.url + "/v1/chat/completions",
            headers={"Origin": "https://app.example",
                     "Access-Control-Request-Method": "POST"}) as r:
        assert r.status == 405
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_the_openapi_document_says_which_operations_need_a_key(keyed):
    """Both key schemes are described; every operation that needs a key names them (either
    one) and documents 401, open ones ask for none; and that is what the server does."""
    status, doc, _ = await call(keyed, SECRETS["carol"], "/openapi.json", method="GET")
    assert status == 200
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer",
                                     "description": schemes["bearerAuth"]["description"]}
    assert (schemes["apiKeyHeader"]["type"], schemes["apiKeyHeader"]["in"],
            schemes["apiKeyHeader"]["name"]) == ("apiKey", "header", "x-api-key")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method != "get" or "{" in path:
                continue
            status, _, _ = await call(keyed, None, path, method="GET")
            if op["security"] == []:
                assert status != 401, path
            else:
                assert op["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}], path
                assert "401" in op["responses"] and status == 401, path
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "403" in doc["paths"]["/metrics"]["get"]["responses"]  # admin keys only here
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] and "401" in chat["responses"]
