"""Decoding of encoded images sent to ``/v1/embeddings``, safe against decompression bombs.

Only allow-listed formats are opened; the declared width x height is checked against the pixel cap
and the model's input size from the header alone, before any pixel is decoded; the encoded size is
capped before base64 decoding.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

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


def decode_image(data: bytes, spec: InputSpec, formats: list[str], max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 [C, H, W] matching ``spec``, or a 422 / 413 saying why not."""
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
            image.load()
    except (InvalidInputError, PayloadTooLargeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError("image rejected as a decompression bomb", code="image_too_large") from None
    except Exception:
        allowed = ", ".join(formats)
        raise InvalidInputError(
            f"not a decodable image; accepted formats: {allowed}", code="invalid_image"
        ) from None
    mode = "L" if spec.channels == 1 else "RGB"
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[None] if spec.channels == 1 else array.transpose(2, 0, 1)
