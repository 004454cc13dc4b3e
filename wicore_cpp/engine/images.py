"""Images in prompts, without llama.cpp: the projector file, decoding and checking an image, and
how an image stands in a prompt's token list.

An image reaches the engine as the bytes of a PNG, JPEG, WebP or GIF file. The tokenizer helper
decodes it (Pillow) to check it and to hash its pixels; the worker decodes it again when it
encodes it (libmtmd, engine/vision.py). In between, the prompt is a list of token ids in which
each image's positions hold *image tokens*: negative ids (never a vocabulary id) derived from the
hash of the image's pixels, one per position. The prompt cache and prefix routing compare token
lists, so a conversation that sends the same picture again reuses its KV cells, and a different
picture differs at its first position already (each position's id is 56 bits of its own hash).

Gemma 3's layout, as libmtmd's `mtmd_tokenize` makes it: the chat template writes
`<start_of_image>` where an image goes; the prompt holds that token, then the image's 256
positions, then `<end_of_image>`, the text on either side tokenized apart.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wicore_cpp.errors import InvalidRequest, ModelFileError
from wicore_cpp.gguf_file import GGUFError, read_gguf

if TYPE_CHECKING:
    from wicore_cpp.config import Config

# The formats a client may send, by Pillow's name; GIF gives its first frame.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# What Gemma 3's chat template writes for an image, and what libmtmd closes it with.
IMAGE_BEGIN = "<start_of_image>"
IMAGE_END = "<end_of_image>"
# Projector types whose images are always the same number of tokens (so the front end knows a
# prompt's length before a worker sees it).
FIXED_SIZE_PROJECTORS = {"gemma3": 4}  # type -> default pooling per side (clip.cpp)


@dataclass(slots=True, frozen=True)
class Projector:
    """A vision projector (mmproj GGUF) as the front end needs to know it."""

    path: Path
    projector_type: str
    image_tokens: int  # prompt positions one image takes
    image_size: int  # side of the square every image is resized to
    n_embd: int  # the text model's embedding width it projects onto
    size_bytes: int  # its weights, loaded beside the model's


def read_projector(path: Path) -> Projector:
    """Check a projector file and read what the server plans with. Raises ModelFileError naming
    the file and what is wrong with it (missing, not GGUF, not a vision projector this server
    can serve)."""
    if not path.is_file():
        raise ModelFileError(f"vision projector (mmproj) not found: {path}")
    try:
        gguf = read_gguf(path)
    except (GGUFError, OSError) as exc:
        raise ModelFileError(f"vision projector {path}: {exc}") from None
    meta = gguf.metadata
    kind = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if gguf.architecture != "clip" or not meta.get("clip.has_vision_encoder"):
        raise ModelFileError(f"{path} is not a vision projector (architecture "
                             f"{gguf.architecture!r}, no clip vision encoder)")
    if kind not in FIXED_SIZE_PROJECTORS:
        raise ModelFileError(f"{path}: projector type {kind!r} is not supported; WiCore serves "
                             f"Gemma 3's ({', '.join(FIXED_SIZE_PROJECTORS)})")
    try:
        image_size = int(meta["clip.vision.image_size"])
        patch_size = int(meta["clip.vision.patch_size"])
        n_embd = int(meta["clip.vision.projection_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: projector metadata {exc} is missing or invalid") from None
    n_merge = int(meta.get("clip.vision.projector.scale_factor",
                           FIXED_SIZE_PROJECTORS[kind]))
    if patch_size <= 0 or n_merge <= 0 or image_size % (patch_size * n_merge):
        raise ModelFileError(f"{path}: image size {image_size} does not divide into patches of "
                             f"{patch_size} pooled {n_merge}x{n_merge}")
    side = image_size // patch_size // n_merge
    return Projector(path, kind, side * side, image_size, n_embd,
                     sum(t.n_bytes for t in gguf.tensors))


def check_projectors(config: Config) -> dict[str, Projector]:
    """The vision projector of each served model that has one, checked. Raises
    ModelFileError for a projector that cannot be served."""
    out = {}
    for model_id, path in config.served_projectors().items():
        if path is None:
            continue
        projector = read_projector(path)
        if projector.image_tokens > config.prefill_chunk:
            # Gemma 3's image positions attend to each other (non-causal), so an image must be
            # decoded in one batch.
            raise ModelFileError(
                f"{path}: an image is {projector.image_tokens} tokens, decoded in one batch, "
                f"but prefill_chunk is {config.prefill_chunk}; raise prefill_chunk to at least "
                f"{projector.image_tokens} or turn images off (mmproj: {{{model_id!r}: \"\"}})")
        out[model_id] = projector
    return out


@dataclass(slots=True, frozen=True)
class ImageInput:
    """One image of a request, as the edge hands it over: the file's bytes, and the request
    parameter it came from (`messages[1].content[2].image_url`) for error messages."""

    param: str
    data: bytes


@dataclass(slots=True, frozen=True)
class PromptImage:
    """An image in a queued prompt: its positions [pos, pos + n_tokens), its pixel hash, and
    its file, which the worker decodes and encodes when its prefill reaches `pos`."""

    pos: int
    n_tokens: int
    digest: bytes
    data: bytes


@dataclass(slots=True, frozen=True)
class DecodedImage:
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, rows top to bottom

    @property
    def digest(self) -> bytes:
        """SHA-256 of the pixels and their size: the same picture in another file format, or
        re-encoded losslessly, is the same image."""
        h = hashlib.sha256(f"{self.width}x{self.height}:".encode())
        h.update(self.rgb)
        return h.digest()


def decode_image(data: bytes, param: str, max_pixels: int) -> DecodedImage:
    """Decode an image file to RGB (a GIF's first frame; alpha dropped, as libmtmd's own
    loader does). The size is checked from the header before any pixel is decoded. Raises
    InvalidRequest naming `param` for a corrupt, unsupported or too large image."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own cap, checked below, replaces Pillow's warning
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InvalidRequest("the image is not a PNG, JPEG, WebP or GIF file (or it is "
                             "corrupt)", param=param) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on hostile input
        raise InvalidRequest(f"the image cannot be read: {exc}", param=param) from None
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidRequest("the image has no pixels", param=param)
        if width * height > max_pixels:
            raise InvalidRequest(f"the image is {width}x{height} pixels, more than the "
                                 f"{max_pixels} this server takes", param=param)
        try:
            img.seek(0)
            rgb = img.convert("RGB")
            pixels = rgb.tobytes()
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise InvalidRequest(f"the image is corrupt: {exc}", param=param) from None
    return DecodedImage(width, height, pixels)


def image_tokens(digest: bytes, n_tokens: int) -> list[int]:
    """The ids that stand for an image's positions in a prompt: negative (never a vocabulary
    id), one 56-bit hash of the pixel hash per position."""
    out = []
    for i in range(n_tokens):
        h = hashlib.blake2b(digest, digest_size=7, person=i.to_bytes(16, "little"))
        out.append(-1 - int.from_bytes(h.digest(), "little"))
    return out


def is_image_token(token: int) -> bool:
    return token < 0
