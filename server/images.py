"""Decoding of encoded images sent to ``/v1/embeddings``, safe against decompression bombs.

Only allow-listed formats are opened; the declared width x height is checked against the pixel cap
and the model's input size from the header alone, before any pixel is decoded; the encoded size is
capped before base64 decoding. A PNG's ancillary chunks other than transparency are dropped before
Pillow sees them: compressed text chunks (``zTXt``/``iTXt``) inflate up to 64 MiB per image in
Pillow, unpaid CPU an attacker could make the server spend on images it then refuses. A batch is
decoded in two passes, every header first, so one bad image stops the request before any pixel of
the others is decoded. :func:`decode_batch` is CPU work: the routes run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from common.checkpoints import InputSpec
from server.errors import InvalidInputError, PayloadTooLargeError


def b64decode_limited(text: str, max_bytes: int, what: str = "input") -> bytes:
    """Strict base64 (a ``data:...;base64,`` prefix allowed) with the decoded size capped first."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLargeError(f"{what} is over {max_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{what} is not valid base64", code="invalid_base64") from None


T = TypeVar("T")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks Pillow needs to produce the pixels: the critical four and the transparency chunk.
PNG_KEPT_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS"})
PNG_MAX_CHUNKS = 4096


def strip_png(data: bytes) -> bytes:
    """A PNG with only :data:`PNG_KEPT_CHUNKS`; other data (not a PNG) is returned as it is.

    Walks the chunk headers without inflating anything; a truncated chunk or more than
    :data:`PNG_MAX_CHUNKS` chunks is a 422.
    """
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept = [PNG_SIGNATURE]
    offset, chunks = len(PNG_SIGNATURE), 0
    while offset < len(data):
        chunks += 1
        if offset + 12 > len(data) or chunks > PNG_MAX_CHUNKS:
            raise InvalidInputError(
                "not a well-formed PNG (truncated or too many chunks)", code="invalid_image"
            )
        (length,) = struct.unpack_from(">I", data, offset)
        end = offset + 12 + length
        if end > len(data):
            raise InvalidInputError("not a well-formed PNG (a chunk overruns the file)", code="invalid_image")
        if data[offset + 4 : offset + 8] in PNG_KEPT_CHUNKS:
            kept.append(data[offset:end])
        offset = end
    return b"".join(kept)


def decode_image(data: bytes, spec: InputSpec, formats: list[str], max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 [C, H, W] matching ``spec``, or a 422 / 413 saying why not."""
    return _load(_open(data, spec, formats, max_pixels), spec)


def _open(data: bytes, spec: InputSpec, formats: list[str], max_pixels: int) -> Image.Image:
    """Open ``data`` and check its header (format, pixel cap, size) without decoding a pixel."""
    data = strip_png(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLargeError(
                    f"image of {width}x{height} pixels is over the cap of {max_pixels}",
                    code="image_too_large",
                )
            if (height, width) != (spec.height, spec.width):
                raise InvalidInputError(
                    f"image is {width}x{height}; the model takes {spec.width}x{spec.height}",
                    code="invalid_shape",
                )
    except (InvalidInputError, PayloadTooLargeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError("image rejected as a decompression bomb", code="image_too_large") from None
    except Exception:
        raise InvalidInputError(
            f"not a decodable image; accepted formats: {', '.join(formats)}", code="invalid_image"
        ) from None
    return image


def _load(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decode an opened image's pixels into uint8 [C, H, W]."""
    try:
        image.load()
    except Exception:
        raise InvalidInputError("the image data is corrupt", code="invalid_image") from None
    mode = "L" if spec.channels == 1 else "RGB"
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[None] if spec.channels == 1 else array.transpose(2, 0, 1)


def decode_batch(
    items: Sequence[str],
    input_type: str,
    spec: InputSpec,
    formats: list[str],
    max_image_bytes: int,
    max_pixels: int,
) -> np.ndarray:
    """base64 images (``input_type`` "image") or raw uint8 tensors ("tensor") -> uint8 [n, C, H, W].

    Every item's size, base64 and header are checked before any pixel is decoded; errors name the
    item (``input[i]: ...``).
    """
    size = spec.channels * spec.height * spec.width
    raw: list[bytes] = []
    for i, item in enumerate(items):
        raw.append(b64decode_limited(item, max_image_bytes, what=f"input[{i}]"))
    if input_type == "tensor":
        for i, blob in enumerate(raw):
            if len(blob) != size:
                raise InvalidInputError(
                    f"input[{i}] has {len(blob)} bytes; a raw uint8 {spec.channels}x{spec.height}x"
                    f"{spec.width} tensor has {size}",
                    code="invalid_shape",
                )
        return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), *spec.shape)
    opened = [_named(i, _open, blob, spec, formats, max_pixels) for i, blob in enumerate(raw)]
    return np.stack([_named(i, _load, image, spec) for i, image in enumerate(opened)])


def _named(index: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with an input error's message prefixed by ``input[index]: ``."""
    try:
        return fn(*args)
    except (InvalidInputError, PayloadTooLargeError) as exc:
        exc.message = f"input[{index}]: {exc.message}"
        exc.detail = exc.message
        raise
