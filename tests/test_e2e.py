"""End to end against a real `python -m wicore_cpp serve` process, driven by the clients users
have: the official `openai` library, Node's `fetch` (the API document's JavaScript example),
and `curl -N`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL_ID, ROOT, ServerProcess, _wait_process_healthy, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    """One real server process for this module's client tests."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("e2e") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(demo_model_path),
         "--model-id", MODEL_ID, "--port", str(port), "--threads", "2", "--ctx-size", "8192",
         "--flash-attn", "off",
         "--rate-limit-per-minute", "0"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
    )
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    asyncio.run(_wait_process_healthy(srv))
    yield srv
    assert srv.stop() == 0, srv.log()


def test_openai_client_non_streaming(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    resp = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 16
    # Errors surface as the client's typed exceptions.
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}],
                                       temperature=5)
    assert info.value.body["param"] == "temperature"


def test_openai_client_streaming_matches_non_streaming(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}],
                  max_tokens=32, temperature=0.7, seed=99)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_async_openai_client_concurrent_streams(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": f"Count to {i}"}],
            max_tokens=12, stream=True, seed=i)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(texts)
    await client.close()


JS_CLIENT = """
// The API document's streaming example (§ JavaScript), pointed at this server.
const BASE = process.argv[2];
async function* chatStream(message, options = {}) {
    const response = await fetch(BASE + '/v1/chat/completions', {
        method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({
            model: '%s',
            messages: [{role: 'user', content: message}],
            max_tokens: options.maxTokens || 512,
            stream: true,
            ...options
        })
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
        while (true) {
            const { done, value } = await reader.read();
            if (done) break;
            const chunk = decoder.decode(value);
            const lines = chunk.split('\\n');
            for (const line of lines) {
                if (line.startsWith('data: ')) {
                    const data = line.slice(6);
                    if (data !== '[DONE]') {
                        yield JSON.parse(data);
                    }
                }
            }
        }
    } finally {
        reader.releaseLock();
    }
}
(async () => {
    let text = '';
    let chunks = 0;
    for await (const chunk of chatStream('写一个 JavaScript 函数', {maxTokens: 24, temperature: 0})) {
        chunks += 1;
        if (chunk.choices && chunk.choices[0]?.delta?.content) {
            text += chunk.choices[0].delta.content;
        }
    }
    process.stdout.write(JSON.stringify({chunks, text}));
})();
""" % MODEL_ID


def test_node_fetch_streaming_example(server, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "stream.mjs"
    script.write_text(JS_CLIENT)
    out = subprocess.run([node, str(script), server.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["chunks"] >= 3  # role, content..., finish
    # Same request without streaming gives the same text.
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "写一个 JavaScript 函数"}],
                         "max_tokens": 24, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        whole = json.load(r)["choices"][0]["message"]["content"]
    assert result["text"] == whole


def test_curl_streaming(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                       "stream": True})
    out = subprocess.run([curl, "-sN", "-X", "POST", server.url + "/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant"}
    health = subprocess.run([curl, "-s", server.url + "/health"], capture_output=True, text=True)
    assert json.loads(health.stdout)["status"] == "healthy"


# -- start-up failures ---------------------------------------------------------------------------


def _serve(model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(model), "--port", "0", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


@pytest.mark.parametrize("kind", ["missing", "empty", "not-gguf", "truncated"])
def test_bad_model_file_fails_startup_cleanly(kind, demo_model_path, tmp_path):
    path = tmp_path / "model.gguf"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-gguf":
        path.write_bytes(b"<html>404 Not Found</html>" * 100)
    elif kind == "truncated":
        data = demo_model_path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    out = _serve(path)
    assert out.returncode == 1, out.stderr  # an ordinary failure, not a signal (C abort)
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr
    expected = {"missing": "not found", "empty": "not a GGUF", "not-gguf": "not a GGUF",
                "truncated": "truncated"}[kind]
    assert expected in errors[0] and str(path) in errors[0]


def test_invalid_configuration_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wicore_cpp", "serve", "--max-batch-size", "0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "max_batch_size" in out.stderr and "Traceback" not in out.stderr


def test_console_script_and_module_entry_points():
    wicore = Path(sys.executable).parent / "wicore"
    assert wicore.exists(), "the `wicore` console script is not installed"
    for cmd in ([str(wicore), "serve", "--help"], [sys.executable, "-m", "wicore_cpp", "serve", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert "--max-batch-size" in out.stdout and "--model-id" in out.stdout
