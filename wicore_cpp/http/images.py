"""Image parts at the edge: each `image_url` becomes the bytes of an image file, or a 400 naming
the part.

`data:` URLs are always taken (base64 PNG, JPEG, WebP or GIF, at most `image_max_bytes`).
`http(s)` URLs are fetched only from the hosts in `image_url_hosts`: a server that fetches any
URL it is given lets its clients reach whatever the server can reach (SSRF). A fetch follows no
redirects, stops reading past `image_max_bytes` and gives up after `image_url_timeout_s`.
Whether the bytes are a valid image is decided later, by the tokenizer helper that decodes them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from urllib.parse import urlsplit

import aiohttp

from wicore_cpp.config import Config
from wicore_cpp.engine.client import ImageInput
from wicore_cpp.errors import InvalidRequest, excerpt
from wicore_cpp.http.chat_protocol import ImageRef

log = logging.getLogger("wicore.images")

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
_READ_CHUNK = 1 << 16


async def load_images(refs: list[ImageRef], config: Config) -> list[ImageInput]:
    """The files of a request's image parts, in order (fetched concurrently). Raises
    InvalidRequest naming the first part that cannot be used."""
    if not refs:
        return []
    if len(refs) > config.max_images:
        raise InvalidRequest(f"{len(refs)} images in one request; this server takes at most "
                             f"{config.max_images}", param=refs[config.max_images].param)
    fetched: dict[int, asyncio.Task[bytes]] = {}
    out: list[bytes | None] = []
    session: aiohttp.ClientSession | None = None
    try:
        for i, ref in enumerate(refs):
            scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
            if scheme == "data":
                out.append(_from_data_url(ref, config.image_max_bytes))
            elif scheme in ("http", "https"):
                _check_host(ref, config.image_url_hosts)
                if session is None:
                    session = aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=config.image_url_timeout_s))
                fetched[i] = asyncio.ensure_future(_fetch(session, ref, config))
                out.append(None)
            else:
                raise InvalidRequest("an image URL must be a data: URL (base64) or an http(s) "
                                     f"URL, not {excerpt(ref.url)}", param=ref.param)
        if fetched:
            results = await asyncio.gather(*fetched.values(), return_exceptions=True)
            for i, result in zip(fetched, results, strict=True):
                if isinstance(result, BaseException):
                    raise result
                out[i] = result
    finally:
        for task in fetched.values():
            task.cancel()
        if session is not None:
            await session.close()
    return [ImageInput(ref.param, data) for ref, data in zip(refs, out, strict=True)]


def _from_data_url(ref: ImageRef, max_bytes: int) -> bytes:
    header, sep, payload = ref.url.partition(",")
    if not sep:
        raise InvalidRequest("a data: URL needs a ',' before its data", param=ref.param)
    fields = [f.strip().lower() for f in header[5:].split(";")]
    media_type = fields[0] or "text/plain"
    if "base64" not in fields[1:]:
        raise InvalidRequest("an image data: URL must be base64 (data:image/png;base64,...)",
                             param=ref.param)
    if media_type not in MEDIA_TYPES:
        raise InvalidRequest(f"images of type {excerpt(media_type)} are not supported; send "
                             "PNG, JPEG, WebP or GIF", param=ref.param)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidRequest(f"the image is about {len(payload) * 3 // 4} bytes, more than the "
                             f"{max_bytes} this server takes", param=ref.param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image's base64 data is invalid", param=ref.param) from None
    if len(data) > max_bytes:
        raise InvalidRequest(f"the image is {len(data)} bytes, more than the {max_bytes} this "
                             "server takes", param=ref.param)
    if not data:
        raise InvalidRequest("the image is empty", param=ref.param)
    return data


def _check_host(ref: ImageRef, allowed: list[str]) -> None:
    if not allowed:
        raise InvalidRequest("this server does not fetch image URLs (image_url_hosts is "
                             "empty); send the image itself as a data: URL", param=ref.param)
    try:
        parts = urlsplit(ref.url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"invalid image URL {excerpt(ref.url)}", param=ref.param) from None
    if not host:
        raise InvalidRequest(f"the image URL {excerpt(ref.url)} has no host", param=ref.param)
    with_port = f"{host}:{port}" if port else host
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or pattern in (host, with_port):
            return
        if pattern.startswith("*.") and (host.endswith(pattern[1:]) or host == pattern[2:]):
            return
    raise InvalidRequest(f"this server does not fetch images from {excerpt(host)} (not in "
                         "image_url_hosts); send the image as a data: URL", param=ref.param)


async def _fetch(session: aiohttp.ClientSession, ref: ImageRef, config: Config) -> bytes:
    limit = config.image_max_bytes
    try:
        async with session.get(ref.url, allow_redirects=False) as r:
            if r.status != 200:
                raise InvalidRequest(f"fetching the image failed: HTTP {r.status} (redirects "
                                     "are not followed)", param=ref.param)
            if r.content_length is not None and r.content_length > limit:
                raise InvalidRequest(f"the image is {r.content_length} bytes, more than the "
                                     f"{limit} this server takes", param=ref.param)
            data = bytearray()
            async for chunk in r.content.iter_chunked(_READ_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise InvalidRequest(f"the image is more than the {limit} bytes this "
                                         "server takes", param=ref.param)
            return bytes(data)
    except TimeoutError:
        raise InvalidRequest(f"fetching the image took longer than "
                             f"{config.image_url_timeout_s:g} s", param=ref.param) from None
    except aiohttp.ClientError as exc:
        raise InvalidRequest(f"fetching the image failed: {type(exc).__name__}",
                             param=ref.param) from None
