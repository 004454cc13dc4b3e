"""Images in chat (Gemma 3 vision): the demo model with its random-weight projector, through
llama.cpp's libmtmd, the worker's batch, the prompt cache and the official `openai` client.

Layers: the projector file and the prompt layout against libmtmd itself; the batcher one step at
a time; then end to end against real `wicore serve` processes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import (
    MODEL_ID,
    ROOT,
    ServerProcess,
    _wait_process_healthy,
    free_port,
    load_make_model,
)
from wicore_cpp.config import find_projector, load_config
from wicore_cpp.engine.images import (
    ImageInput,
    decode_image,
    image_tokens,
    read_projector,
)
from wicore_cpp.errors import InvalidRequest, ModelFileError

IMAGE_TOKENS = 256  # Gemma 3's, kept by the demo projector


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def noise(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


RED = Image.new("RGB", (64, 48), (220, 20, 20))


def image_message(text: str, *images: bytes, media_type="image/png") -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(d, media_type)}}
              for d in images]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="session")
def projector_path(tmp_path_factory) -> Path:
    """The demo model's projector, in a folder of its own: beside the F32 demo every other test
    serves it would give their servers images too."""
    mm = load_make_model()
    return mm.write_projector(tmp_path_factory.mktemp("mmproj") / "mmproj-demo-f16.gguf",
                              preset="demo")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, demo_model_path, projector_path) -> Path:
    """A models folder as `make demo-model` leaves it: the model, and its projector beside it
    under the name the server finds by itself."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "gemma-3-demo.gguf").symlink_to(demo_model_path)
    (folder / "mmproj-gemma-3-demo-f16.gguf").symlink_to(projector_path)
    return folder


# -- the projector and the prompt layout, against libmtmd ----------------------------------------


def test_projector_is_read_as_gemma_3_with_256_tokens(projector_path, demo_model_path,
                                                      model_dir):
    p = read_projector(projector_path)
    assert (p.projector_type, p.image_tokens, p.n_embd) == ("gemma3", IMAGE_TOKENS, 256)
    assert find_projector(model_dir / "gemma-3-demo.gguf") == \
        model_dir / "mmproj-gemma-3-demo-f16.gguf"
    assert find_projector(demo_model_path) is None
    with pytest.raises(ModelFileError, match="not a vision projector"):
        read_projector(demo_model_path)


def test_find_projector_takes_only_a_name_that_names_the_model(tmp_path):
    model = tmp_path / "gemma-3-27b-it-Q4_K_M.gguf"
    model.write_bytes(b"")
    (tmp_path / "mmproj-F16.gguf").write_bytes(b"")  # names no model
    (tmp_path / "mmproj-llava-f16.gguf").write_bytes(b"")  # another model's
    assert find_projector(model) is None
    (tmp_path / "mmproj-gemma-3-27b-it-f16.gguf").write_bytes(b"")
    assert find_projector(model) == tmp_path / "mmproj-gemma-3-27b-it-f16.gguf"


def test_mmproj_setting_overrides_and_turns_off(model_dir, demo_model_path, projector_path):
    model = str(model_dir / "gemma-3-demo.gguf")
    config = load_config(environ={}, flags={"model": model, "model_id": "m"})
    assert config.served_projectors() == {"m": model_dir / "mmproj-gemma-3-demo-f16.gguf"}
    config = load_config(environ={}, flags={"model": model, "model_id": "m",
                                            "mmproj": '{"m": ""}'})
    assert config.served_projectors() == {"m": None}
    config = load_config(environ={}, flags={"model": str(demo_model_path), "model_id": "m",
                                            "mmproj": json.dumps({"m": str(projector_path)})})
    assert config.served_projectors() == {"m": projector_path}
    config = load_config(environ={}, flags={"model": model, "model_id": "m",
                                            "mmproj": '{"other": "x.gguf"}'})
    with pytest.raises(ModelFileError, match="'other', which is not served"):
        config.served_projectors()


def test_image_tokens_are_negative_and_differ_per_image_and_position():
    a, b = image_tokens(b"a" * 32, 256), image_tokens(b"b" * 32, 256)
    assert all(t < 0 for t in a + b)
    assert len(set(a)) == 256 and not set(a) & set(b)
    assert a == image_tokens(b"a" * 32, 256)


def test_pixel_hash_ignores_the_file_format_but_not_the_pixels():
    lossless = {fmt: decode_image(png(noise(1), fmt, **kw), "p", 10**7).digest
                for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}))}
    assert lossless["PNG"] == lossless["WEBP"]
    assert lossless["GIF"] != lossless["PNG"]  # GIF's palette changes the pixels
    assert decode_image(png(noise(2)), "p", 10**7).digest != lossless["PNG"]


@pytest.mark.parametrize("data, match", [
    (b"not an image at all", "not a PNG, JPEG, WebP or GIF"),
    (png(RED, "BMP"), "not a PNG, JPEG, WebP or GIF"),
    (png(noise(3))[:200], "corrupt|cannot be read"),
    (png(Image.new("RGB", (2000, 1000))), "2000x1000 pixels, more than the 1000000"),
])
def test_bad_images_are_refused_naming_the_part(data, match):
    with pytest.raises(InvalidRequest, match=match) as exc:
        decode_image(data, "messages[0].content[1].image_url", 1_000_000)
    assert exc.value.param == "messages[0].content[1].image_url"


def test_prompt_layout_equals_libmtmds_own(demo_model_path, projector_path):
    """The tokenizer helper lays an image out without libmtmd; libmtmd's `mtmd_tokenize` on the
    same rendered prompt gives the same text tokens and an image chunk of the same length at
    the same place."""
    import ctypes

    from llama_cpp import mtmd_cpp as mt

    from wicore_cpp.engine import tokenizer
    from wicore_cpp.engine.backend import Model
    from wicore_cpp.engine.vision import VisionEncoder

    tokenizer._child_init(str(demo_model_path), tokenizer.LogSettings(level="WARNING"))
    state = tokenizer._child
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                             {"type": "image"},
                                             {"type": "text", "text": "with"},
                                             {"type": "image"}]}]
    tokens, spans = tokenizer._encode_with_images(state, messages, [b"x" * 32, b"y" * 32],
                                                  IMAGE_TOKENS)
    model = Model(demo_model_path)
    vision = VisionEncoder(projector_path, model, use_gpu=False, threads=2, flash_attn="off")
    try:
        text = state.template.render(messages).replace("<start_of_image>",
                                                       mt.mtmd_default_marker().decode())
        data = text.encode()
        rgb = (ctypes.c_uint8 * (8 * 8 * 3))()
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 2)(mt.mtmd_bitmap_init(8, 8, rgb),
                                                mt.mtmd_bitmap_init(8, 8, rgb))
        chunks = mt.mtmd_input_chunks_init()
        add_special = not text.startswith(state.model.info.bos_token)
        inp = mt.mtmd_input_text(data, len(data), add_special, True)
        assert mt.mtmd_tokenize(vision.ptr, chunks, ctypes.byref(inp), bitmaps, 2) == 0
        theirs: list[int] = []
        image_starts = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ids = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                theirs += [ids[j] for j in range(n.value)]
            else:
                image_starts.append(len(theirs))
                theirs += [-1] * mt.mtmd_input_chunk_get_n_tokens(chunk)
        mt.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            mt.mtmd_bitmap_free(b)
        ours = [-1 if t < 0 else t for t in tokens]
        assert ours == theirs
        assert [pos for pos, _, _ in spans] == image_starts
    finally:
        vision.close()
        model.close()


# -- the worker's batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["between-steps",
                                                             "encoder-thread"])
def test_batcher_encodes_one_image_a_step_and_a_bad_one_fails_alone(demo_model_path,
                                                                    projector_path, background):
    from wicore_cpp.engine.backend import BatchContext, Model
    from wicore_cpp.engine.batcher import ContinuousBatcher
    from wicore_cpp.engine.images import PromptImage
    from wicore_cpp.engine.messages import FINISH_ERROR, GenerateRequest, SamplingParams
    from wicore_cpp.engine.vision import VisionEncoder

    model = Model(demo_model_path)
    ctx = BatchContext(model, n_ctx=4096, n_batch=512, n_seq_max=4, threads=2,
                       flash_attn="off")
    vision = VisionEncoder(projector_path, model, use_gpu=False, threads=2, flash_attn="off",
                           background=background)
    try:
        b = ContinuousBatcher(model, ctx, vision=vision)
        head = model.tokenize("<start_of_turn>user\nLook<start_of_image>", add_special=True)
        tail = model.tokenize("<end_of_image><end_of_turn>\n<start_of_turn>model\n",
                              add_special=False)

        def request(rid: str, data: bytes) -> GenerateRequest:
            digest = decode_image(data, "p", 10**7).digest if data[:4] == b"\x89PNG" \
                else bytes(32)
            prompt = head + image_tokens(digest, IMAGE_TOKENS) + tail
            return GenerateRequest(rid, prompt, SamplingParams(max_tokens=4, temperature=0),
                                   images=(PromptImage(len(head), IMAGE_TOKENS, digest, data),))

        text = model.tokenize("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                              add_special=True)
        b.submit(GenerateRequest("text", text, SamplingParams(max_tokens=20, temperature=0)))
        b.step()
        b.submit(request("img1", png(RED)))
        b.submit(request("img2", png(noise(4))))
        b.submit(request("bad", b"garbage"))
        ended: dict[str, str] = {}
        steps_with_text_tokens = 0
        for _ in range(5000):  # images encode on their own thread, beside the steps
            before = {rid: s.n_cached for (rid, _), s in b._active.items()}
            updates = b.step()
            after = {rid: s.n_cached for (rid, _), s in b._active.items()}
            # At most one image's positions were decoded in this step.
            grew_by_image = [rid for rid in after if rid != "text"
                             and after[rid] - before.get(rid, 0) >= IMAGE_TOKENS]
            assert len(grew_by_image) <= 1
            for rid, _, _, ids, finish, error, _ in updates:
                if rid == "text" and ids:
                    steps_with_text_tokens += 1
                if finish is not None:
                    ended[rid] = finish if error is None else f"{finish}: {error}"
            if b.is_idle:
                break
        assert ended["img1"] in ("stop", "length") and ended["img2"] in ("stop", "length")
        assert ended["bad"].startswith(FINISH_ERROR) and "could not be encoded" in ended["bad"]
        assert ended["text"] in ("stop", "length")
        assert steps_with_text_tokens >= 3  # the text stream kept going while images arrived
    finally:
        vision.close()
        ctx.close()
        model.close()


# -- end to end -----------------------------------------------------------------------------------


class _ImageHost(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """A local web server holding images, the one host the server may fetch from."""
    _ImageHost.files = {"/red.png": png(RED), "/big.png": png(noise(5, (800, 800)))}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _start(demo_model_path, tmp_path_factory, name: str, *extra: str) -> ServerProcess:
    port = free_port()
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", "--port", str(port), "--threads", "2",
         "--ctx-size", "8192", "--flash-attn", "off", "--rate-limit-per-minute", "0",
         "--request-timeout-s", "600", *extra],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    asyncio.run(_wait_process_healthy(srv))
    return srv


@pytest.fixture(scope="module")
def server(demo_model_path, projector_path, image_host, tmp_path_factory):
    """The demo model with images (its projector named in `mmproj`) and the same file as a
    text-only model; small image caps; the one image host allowed; the prompt cache off, so that a
    request's output does not depend on what ran before it."""
    models = json.dumps({MODEL_ID: str(demo_model_path), "text": str(demo_model_path)})
    srv = _start(demo_model_path, tmp_path_factory, "images", "--models", models,
                 "--mmproj", json.dumps({MODEL_ID: str(projector_path)}), "--max-images", "3",
                 "--image-max-bytes", "300000", "--image-max-pixels", "1000000",
                 "--image-url-hosts", json.dumps([image_host]), "--prompt-cache-share", "0")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _text_tokens(client, model: str, text: str) -> int:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=1,
        temperature=0).usage.prompt_tokens


@pytest.mark.e2e
def test_models_say_which_take_images(client):
    cards = {m.id: m for m in client.models.list().data}
    assert "vision" in cards[MODEL_ID].capabilities and cards[MODEL_ID].image_tokens == 256
    assert "vision" not in cards["text"].capabilities and cards["text"].image_tokens == 0


@pytest.mark.e2e
def test_image_and_text_stream_an_answer_and_usage_counts_the_image(client):
    messages = image_message("What is in this picture?", png(RED))
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert text and finish in (["length"], ["stop"])
    # The image is its 256 positions and the two tokens around them.
    alone = _text_tokens(client, MODEL_ID, "What is in this picture?")
    assert usage.prompt_tokens == alone + IMAGE_TOKENS + 2
    full = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12,
                                          temperature=0)
    assert full.choices[0].message.content == text
    assert full.usage.prompt_tokens == usage.prompt_tokens
    two = client.chat.completions.create(
        model=MODEL_ID, messages=image_message("What is in this picture?", png(RED),
                                               png(noise(6))), max_tokens=1)
    assert two.usage.prompt_tokens == alone + 2 * (IMAGE_TOKENS + 2)


@pytest.mark.e2e
def test_the_pixels_reach_the_model(client):
    """Different pictures, different answers; the same pixels in another format, the same."""
    def answer(data: bytes, media_type="image/png") -> str:
        return client.chat.completions.create(
            model=MODEL_ID, messages=image_message("Describe", data, media_type=media_type),
            max_tokens=10, temperature=0).choices[0].message.content

    picture = noise(7)
    answers = {answer(png(RED)), answer(png(noise(8))), answer(png(picture))}
    assert len(answers) == 3
    assert answer(png(picture, "WEBP", lossless=True), "image/webp") == answer(png(picture))
    assert answer(png(picture.convert("RGB"), "JPEG", quality=95), "image/jpeg")
    gif = png(picture, "GIF", save_all=True, append_images=[RED.resize(picture.size)])
    assert answer(gif, "image/gif") == answer(png(Image.open(io.BytesIO(gif)).convert("RGB")))


@pytest.mark.e2e
def test_images_and_text_streams_together_without_cross_talk(server):
    """Two image requests and eight text streams at once; each equals its lone run."""
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    image_requests = [image_message("What is this?", png(RED)),
                      image_message("And this one?", png(noise(9)))]
    text_requests = [[{"role": "user", "content": f"Tell me a story about the number {i}"}]
                     for i in range(8)]
    everything = image_requests + text_requests

    async def run(messages) -> str:
        stream = await aclient.chat.completions.create(model=MODEL_ID, messages=messages,
                                                       max_tokens=24, temperature=0,
                                                       stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream
                        if c.choices])

    async def main():
        lone = [await run(m) for m in everything]
        together = await asyncio.gather(*(run(m) for m in everything))
        await aclient.close()
        return lone, together

    lone, together = asyncio.run(main())
    assert together == lone
    assert len(set(lone)) > 5  # the requests really differ


def _refused(client, messages, model=MODEL_ID) -> dict:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    err = exc.value.body
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    return err


def _parts(*urls: str, text="Look") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls]}]


@pytest.mark.e2e
@pytest.mark.parametrize("url, match", [
    (data_url(b"this is not a picture"), "not a PNG, JPEG, WebP or GIF"),
    (data_url(png(RED, "BMP"), "image/png"), "not a PNG, JPEG, WebP or GIF"),
    (data_url(png(RED), "image/bmp"), "type 'image/bmp' are not supported"),
    ("data:image/png;base64,@@@not-base64@@@", "base64 data is invalid"),
    ("data:image/png,rawdata", "must be base64"),
    (data_url(png(noise(10))[:300]), "corrupt|cannot be read"),
    (data_url(png(noise(11, (400, 400)))), "more than the 300000"),  # about 480 kB
    (data_url(png(Image.new("RGB", (1500, 1000)))), "1500x1000 pixels, more than the 1000000"),
    ("ftp://example.com/a.png", "data: URL \\(base64\\) or an http\\(s\\) URL"),
    ("https://example.com/a.png", "does not fetch images from 'example.com'"),
])
def test_each_bad_image_is_a_400_naming_its_part(client, url, match):
    err = _refused(client, _parts(data_url(png(RED)), url))
    assert err["param"] == "messages[0].content[2].image_url", err
    assert __import__("re").search(match, err["message"]), err["message"]


@pytest.mark.e2e
def test_too_many_images_detail_low_and_images_outside_user_messages(client):
    four = _parts(*[data_url(png(RED))] * 4)
    err = _refused(client, four)
    assert "4 images" in err["message"] and "at most 3" in err["message"]
    assert err["param"] == "messages[0].content[4].image_url"
    low = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(png(RED)), "detail": "low"}}]}]
    assert _refused(client, low)["param"] == "messages[0].content[0].image_url.detail"
    assistant = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(RED))}}]},
        {"role": "user", "content": "and?"}]
    err = _refused(client, assistant)
    assert "user messages only" in err["message"] and err["param"] == "messages[1].content"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    assert "only 'text' and 'image_url'" in _refused(client, audio)["message"]
    marker = _parts(data_url(png(RED)), text="a <start_of_image> in the text")
    assert "remove it from the text" in _refused(client, marker)["message"]


@pytest.mark.e2e
def test_a_text_only_model_refuses_images_clearly(client):
    err = _refused(client, _parts(data_url(png(RED))), model="text")
    assert "does not take images" in err["message"] and "mmproj" in err["message"]
    assert err["param"] == "messages[0].content[1].image_url"
    ok = client.chat.completions.create(model="text", messages=[{"role": "user",
                                                                  "content": "hi"}],
                                        max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.e2e
def test_image_urls_from_the_allowed_host(client, image_host):
    inline = client.chat.completions.create(
        model=MODEL_ID, messages=_parts(data_url(png(RED))), max_tokens=8, temperature=0)
    fetched = client.chat.completions.create(
        model=MODEL_ID, messages=_parts(f"http://{image_host}/red.png"), max_tokens=8,
        temperature=0)
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    err = _refused(client, _parts(f"http://{image_host}/missing.png"))
    assert "HTTP 404" in err["message"] and err["param"] == "messages[0].content[1].image_url"
    err = _refused(client, _parts(f"http://{image_host}/big.png"))
    assert "more than the 300000" in err["message"]


@pytest.mark.e2e
def test_a_resent_image_reuses_its_kv_and_another_does_not(demo_model_path, model_dir,
                                                           tmp_path_factory):
    """With the prompt cache on, and the projector found beside the model by its name."""
    srv = _start(demo_model_path, tmp_path_factory, "images-cache", "--model",
                 str(model_dir / "gemma-3-demo.gguf"), "--model-id", MODEL_ID)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert client.models.retrieve(MODEL_ID).image_tokens == IMAGE_TOKENS

        def ask(messages):
            r = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                               max_tokens=6, temperature=0)
            return r, r.usage.prompt_tokens_details.cached_tokens

        first, cached = ask(image_message("What is this?", png(RED)))
        assert cached == 0
        again, cached = ask(image_message("What is this?", png(RED)))
        assert cached == first.usage.prompt_tokens - 1  # all but the last token
        assert again.choices[0].message.content == first.choices[0].message.content
        # The next turn of that conversation reuses the image too.
        turn2 = image_message("What is this?", png(RED)) + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Are you sure?"}]
        _, cached = ask(turn2)
        assert cached > IMAGE_TOKENS
        # Another picture with the same text: only what comes before the image is reused.
        other, cached = ask(image_message("What is this?", png(noise(12))))
        assert cached < IMAGE_TOKENS  # at most the text before the image
        assert other.choices[0].message.content != first.choices[0].message.content
        # The same pixels as WebP: the same image, so its KV is reused.
        _, cached = ask(image_message("What is this?", png(RED, "WEBP", lossless=True),
                                      media_type="image/webp"))
        assert cached == first.usage.prompt_tokens - 1
    finally:
        assert srv.stop() == 0, srv.log()


def test_image_inputs_cross_the_process_boundary():
    import pickle

    image = ImageInput("messages[0].content[1].image_url", b"\x89PNG")
    assert pickle.loads(pickle.dumps(image)) == image


def test_memory_plan_counts_the_projector_per_worker_where_it_runs(demo_model_path,
                                                                   projector_path):
    from wicore_cpp.engine.memory_plan import (
        HOST,
        CpuFeatures,
        ModelLoad,
        ModelShape,
        Pool,
        Settings,
        make_plan,
    )
    from wicore_cpp.gguf_file import read_gguf

    shape = ModelShape.from_gguf(read_gguf(demo_model_path))
    size = read_projector(projector_path).size_bytes
    assert size > 400_000
    s = Settings(ctx_size=4096, max_batch_size=4, urgent_slots=0, n_gpu_layers=-1,
                 kv_cache_type="f16", prefill_chunk=512, flash_attn="off")
    gib = 1 << 30
    pools = (Pool(HOST, "", gib, gib, ""), Pool("CUDA0", "", gib, gib, ""))

    def weights(workers, projector_bytes):
        plan = make_plan((ModelLoad("m", shape, workers, projector_bytes),), s, pools, 0,
                         CpuFeatures(), None)
        return {name: u.weights for name, u in plan.usage.items()}

    host_only = weights(((), ()), 0)
    assert weights(((), ()), size)[HOST] == host_only[HOST] + 2 * size  # one copy per worker
    on_gpu = weights((("CUDA0",),), 0)
    with_projector = weights((("CUDA0",),), size)
    assert with_projector["CUDA0"] == on_gpu["CUDA0"] + size
    assert with_projector[HOST] == on_gpu[HOST]


def test_bench_images_makes_distinct_valid_pictures_and_times_tokens():
    from tests.test_bench import bench
    a, b = bench._noise_png(1, (32, 24)), bench._noise_png(2, (32, 24))
    assert decode_image(a, "p", 10**6).width == 32
    assert decode_image(a, "p", 10**6).digest != decode_image(b, "p", 10**6).digest
    res = bench.RequestResult(index=0, start=1.0, ttft=0.5, gaps=[0.1, 0.2])
    assert bench._token_times(res) == pytest.approx([1.5, 1.6, 1.8])
    args = bench.build_parser().parse_args(["images", "--model", "m.gguf", "--images", "2"])
    assert (args.command, args.images, args.streams) == ("images", 2, 8)
