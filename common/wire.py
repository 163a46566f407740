"""The wire format both sides speak: KServe v2 / Open Inference Protocol tensors, JSON or binary.

Triton's binary tensor extension: the body is a JSON header followed by the raw little-endian bytes
of each tensor whose ``parameters.binary_data_size`` is set, in order; the header's length travels
in the ``Inference-Header-Content-Length`` HTTP header. A batch of uint8 images thus crosses the
wire at one byte a pixel instead of several characters of JSON.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"

# KServe v2 datatype -> little-endian numpy dtype. BYTES (strings) is not used by this project.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "INT8": np.dtype("<i1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}


_JSON_KIND = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


class WireError(ValueError):
    """A tensor or body that does not follow the protocol."""


def datatype_of(array: np.ndarray) -> str:
    """KServe datatype name of a numpy array's dtype."""
    try:
        return _BY_DTYPE[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise WireError(f"dtype {array.dtype} has no KServe v2 datatype") from None


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Number of elements of a shape; negative or absurd dimensions are errors."""
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or dim < 0:
            raise WireError(f"invalid shape {list(shape)}: dimensions must be non-negative integers")
        count *= dim
        if count > 1 << 40:
            raise WireError(f"invalid shape {list(shape)}: too many elements")
    return count


def tensor_from_bytes(buffer: bytes | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Decode raw little-endian bytes into an array of ``shape``, checking the byte count."""
    if datatype not in DATATYPES:
        raise WireError(f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    dtype = DATATYPES[datatype]
    expected = element_count(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise WireError(
            f"tensor of shape {shape} and datatype {datatype} needs {expected} bytes, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_from_json(data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """Decode a JSON ``data`` list (flat, row-major; nested lists are flattened) into an array."""
    if datatype not in DATATYPES:
        raise WireError(f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    count = element_count(shape)
    dtype = DATATYPES[datatype]
    try:
        flat = np.asarray(data).reshape(-1)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise WireError(f"data is not a list of numbers: {exc}") from None
    # Strict JSON types: integers for integer tensors, numbers for float tensors, booleans for BOOL;
    # no strings, no silent truncation of 1.5 to 1.
    accepted = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if flat.size and flat.dtype.kind not in accepted:
        raise WireError(f"data of a {datatype} tensor must be JSON {_JSON_KIND[dtype.kind]}")
    if flat.size != count:
        raise WireError(f"shape {shape} needs {count} values, got {flat.size}")
    if dtype.kind in "iu" and flat.size:
        info = np.iinfo(dtype)
        if flat.min() < info.min or flat.max() > info.max:
            raise WireError(f"values out of range for {datatype} [{info.min}, {info.max}]")
    return flat.astype(dtype).reshape(shape)


def tensor_to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """A KServe output/input entry with the data inline as a flat list."""
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype_of(array),
        "data": array.reshape(-1).tolist(),
    }


def pack_binary(header: dict[str, Any], tensors: list[np.ndarray]) -> tuple[bytes, int]:
    """JSON header + raw tensor bytes; returns the body and the header length for the HTTP header."""
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [head]
    parts.extend(np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<")).tobytes() for t in tensors)
    return b"".join(parts), len(head)


def split_binary(body: bytes, header_length: int) -> tuple[dict[str, Any], memoryview]:
    """Split a binary-extension body into its parsed JSON header and the bytes after it."""
    if header_length < 2 or header_length > len(body):
        raise WireError(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"the JSON header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("the JSON header must be an object")
    return header, memoryview(body)[header_length:]


def take_binary(entries: list[dict[str, Any]], blob: memoryview) -> list[np.ndarray | None]:
    """Slice ``blob`` among the entries that declare ``parameters.binary_data_size`` (in order).

    Entries without it get ``None`` (their data is inline JSON). Every byte must be accounted for.
    """
    out: list[np.ndarray | None] = []
    offset = 0
    for entry in entries:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise WireError(f"tensor {entry.get('name')!r}: binary_data_size {size} overruns the body")
        out.append(tensor_from_bytes(blob[offset : offset + size], entry["datatype"], entry["shape"]))
        offset += size
    if offset != len(blob):
        raise WireError(f"{len(blob) - offset} bytes after the last binary tensor")
    return out


def infer_request(
    images: np.ndarray,
    outputs: list[str] | None = None,
    binary: bool = True,
    parameters: dict[str, Any] | None = None,
    input_name: str = "images",
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a KServe v2 infer request for one image batch.

    ``binary``: Triton binary tensors both ways (the input as raw bytes, the outputs requested with
    ``binary_data``); else plain JSON. ``outputs`` None lets the server pick the key's default.
    """
    entry: dict[str, Any] = {"name": input_name, "shape": list(images.shape), "datatype": datatype_of(images)}
    header: dict[str, Any] = {"inputs": [entry]}
    if parameters:
        header["parameters"] = dict(parameters)
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    if binary:
        header.setdefault("parameters", {})["binary_data_output"] = True
        entry["parameters"] = {"binary_data_size": images.nbytes}
        body, length = pack_binary(header, [images])
        return body, {HEADER_LENGTH: str(length), "content-type": BINARY_CONTENT_TYPE}
    entry["data"] = images.reshape(-1).tolist()
    return json.dumps(header, separators=(",", ":")).encode(), {"content-type": "application/json"}


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output name -> array of a KServe v2 infer response, JSON or binary."""
    if header_length is not None:
        header, blob = split_binary(body, int(header_length))
    else:
        header, blob = json.loads(body), memoryview(b"")
    entries = header.get("outputs", [])
    binary = take_binary(entries, blob)
    return {
        e["name"]: b if b is not None else tensor_from_json(e["data"], e["datatype"], e["shape"])
        for e, b in zip(entries, binary, strict=True)
    }
