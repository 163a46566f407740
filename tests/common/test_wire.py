"""Tests of common.wire: KServe v2 tensors in JSON and in Triton's binary extension."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.wire import (
    DATATYPES,
    WireError,
    datatype_of,
    element_count,
    pack_binary,
    split_binary,
    take_binary,
    tensor_from_bytes,
    tensor_from_json,
    tensor_to_json,
)


def binary_entry(name: str, array: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype_of(array),
        "parameters": {"binary_data_size": array.nbytes},
    }


def round_trip(arrays: list[np.ndarray]) -> list[np.ndarray | None]:
    header = {"inputs": [binary_entry(f"t{i}", a) for i, a in enumerate(arrays)]}
    body, length = pack_binary(header, arrays)
    parsed, blob = split_binary(body, length)
    assert parsed == header
    return take_binary(parsed["inputs"], blob)


# --- round trips -----------------------------------------------------------------------------------


def test_uint8_and_float32_round_trip():
    images = np.arange(2 * 1 * 3 * 4, dtype=np.uint8).reshape(2, 1, 3, 4)
    scores = np.array([[0.5, -1.25, 3e-8], [np.inf, -0.0, 7.0]], dtype=np.float32)
    out = round_trip([images, scores])
    assert out[0] is not None and out[1] is not None
    assert out[0].dtype == np.uint8 and out[0].shape == images.shape
    assert np.array_equal(out[0], images)
    assert out[1].dtype == np.float32
    assert out[1].tobytes() == scores.tobytes()


def test_binary_layout_is_header_then_little_endian_bytes():
    values = np.array([1.0, -2.5], dtype=">f4")  # big-endian in memory: must go out little-endian
    header = {"outputs": [binary_entry("x", values)]}
    body, length = pack_binary(header, [values])
    assert json.loads(body[:length]) == header
    assert body[length:] == struct.pack("<2f", 1.0, -2.5)
    assert len(body) == length + 8
    (decoded,) = take_binary(header["outputs"], split_binary(body, length)[1])
    assert decoded is not None
    assert decoded.dtype == np.dtype("<f4")
    assert decoded.tolist() == [1.0, -2.5]


def test_uint8_is_one_byte_a_pixel():
    images = np.full((3, 1, 28, 28), 7, dtype=np.uint8)
    body, length = pack_binary({"inputs": [binary_entry("images", images)]}, [images])
    assert len(body) - length == images.size
    assert body[length:] == b"\x07" * images.size


def test_take_binary_mixes_inline_and_binary_entries():
    a = np.array([1, 2, 3], dtype=np.int32)
    b = np.array([[True, False]])
    entries = [
        binary_entry("a", a),
        {"name": "inline", "shape": [1], "datatype": "FP32", "data": [1.0]},
        binary_entry("b", b),
    ]
    body, length = pack_binary({"inputs": entries}, [a, b])
    header, blob = split_binary(body, length)
    out = take_binary(header["inputs"], blob)
    assert out[1] is None
    assert out[0] is not None and np.array_equal(out[0], a)
    assert out[2] is not None and np.array_equal(out[2], b)


def test_take_binary_with_no_binary_entries():
    assert take_binary([{"name": "x", "data": [1]}], memoryview(b"")) == [None]


DTYPE_NAMES = sorted(DATATYPES)


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    name = draw(st.sampled_from(DTYPE_NAMES))
    dtype = DATATYPES[name]
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder(">")
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return draw(hnp.arrays(dtype, shape))


@settings(max_examples=50, derandomize=True, deadline=None)
@given(arrays=st.lists(wire_arrays(), min_size=1, max_size=3))
def test_binary_round_trip_property(arrays: list[np.ndarray]):
    out = round_trip(arrays)
    for sent, got in zip(arrays, out, strict=True):
        assert got is not None
        little = sent.astype(sent.dtype.newbyteorder("<"))
        assert got.shape == sent.shape
        assert got.dtype == little.dtype
        assert got.tobytes() == little.tobytes()  # bit-exact, NaN and -0.0 included


@settings(max_examples=50, derandomize=True, deadline=None)
@given(array=wire_arrays())
def test_json_round_trip_property(array: np.ndarray):
    entry = json.loads(json.dumps(tensor_to_json("x", array)))  # NaN/inf survive Python's json
    got = tensor_from_json(entry["data"], entry["datatype"], entry["shape"])
    assert got.shape == array.shape
    assert got.dtype == array.dtype.newbyteorder("<")
    if array.dtype.kind == "f":  # NaN payloads may change through Python floats; values may not
        assert np.array_equal(got, array, equal_nan=True)
        numbers = ~np.isnan(array)  # JSON's NaN has no sign; -0.0 keeps its own
        assert np.array_equal(np.signbit(got[numbers]), np.signbit(array[numbers]))
    else:
        assert np.array_equal(got, array)


# --- JSON tensors ----------------------------------------------------------------------------------


def test_tensor_from_json_flat_and_nested():
    flat = tensor_from_json([1, 2, 3, 4, 5, 6], "UINT8", [2, 3])
    nested = tensor_from_json([[1, 2, 3], [4, 5, 6]], "UINT8", [2, 3])
    assert flat.dtype == np.uint8
    assert flat.shape == (2, 3)
    assert np.array_equal(flat, nested)
    assert flat.tolist() == [[1, 2, 3], [4, 5, 6]]
    floats = tensor_from_json([[0.5], [1]], "FP32", [1, 2])
    assert floats.dtype == np.float32
    assert floats.tolist() == [[0.5, 1.0]]
    assert tensor_from_json([], "FP32", [0, 3]).shape == (0, 3)


def test_tensor_to_json_entry():
    entry = tensor_to_json("logits", np.array([[1.5, 2.0]], dtype=np.float32))
    assert entry == {"name": "logits", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.0]}


@pytest.mark.parametrize("bad", [256, -1, 1000])
def test_uint8_json_out_of_range(bad: int):
    with pytest.raises(WireError, match="out of range"):
        tensor_from_json([0, bad], "UINT8", [2])


def test_int8_json_range_bounds():
    assert tensor_from_json([-128, 127], "INT8", [2]).tolist() == [-128, 127]
    with pytest.raises(WireError):
        tensor_from_json([128], "INT8", [1])


@pytest.mark.parametrize(
    ("data", "shape"),
    [([1, 2, 3], [2, 2]), ([1, 2, 3, 4, 5], [2, 2]), ([], [1]), ([[1, 2], [3, 4]], [3])],
)
def test_json_wrong_count(data: Any, shape: list[int]):
    with pytest.raises(WireError, match="values"):
        tensor_from_json(data, "FP32", shape)


@pytest.mark.parametrize("data", [["a", "b"], [[1, 2], [3]], [{"x": 1}]])
def test_json_not_numbers(data: Any):
    with pytest.raises(WireError):
        tensor_from_json(data, "FP32", [2])


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 5, 0])
def test_wrong_byte_count(size: int):
    with pytest.raises(WireError, match="needs 4 bytes"):
        tensor_from_bytes(b"\x00" * size, "UINT8", [2, 2])


def test_trailing_bytes():
    a = np.zeros(4, dtype=np.uint8)
    entry = binary_entry("a", a)
    with pytest.raises(WireError, match="2 bytes after"):
        take_binary([entry], memoryview(a.tobytes() + b"xx"))


@pytest.mark.parametrize("size", [5, 100, -1, "4", 1.5])
def test_overrun_and_bad_sizes(size: Any):
    entry = {"name": "a", "shape": [4], "datatype": "UINT8", "parameters": {"binary_data_size": size}}
    with pytest.raises(WireError, match="overruns"):
        take_binary([entry], memoryview(b"\x00" * 4))


def test_size_that_disagrees_with_shape():
    entry = {"name": "a", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 4}}
    with pytest.raises(WireError, match="needs 3 bytes"):
        take_binary([entry], memoryview(b"\x00" * 4))


@pytest.mark.parametrize("length", [-1, 0, 1, 100])
def test_bad_header_length(length: int):
    body, _ = pack_binary({"a": 1}, [])
    assert len(body) < 100
    with pytest.raises(WireError, match="does not fit"):
        split_binary(body, length)


@pytest.mark.parametrize("head", [b"{nope}", b"\xff\xfe{}", b"[1, 2]", b'"str"'])
def test_bad_header_contents(head: bytes):
    with pytest.raises(WireError):
        split_binary(head + b"\x00\x01", len(head))


@pytest.mark.parametrize("shape", [[-1, 2], [2, -3], [1.5], ["2"], [None]])
def test_negative_or_non_integer_shapes(shape: list[Any]):
    with pytest.raises(WireError, match="invalid shape"):
        element_count(shape)
    with pytest.raises(WireError, match="invalid shape"):
        tensor_from_bytes(b"", "UINT8", shape)
    with pytest.raises(WireError, match="invalid shape"):
        tensor_from_json([], "UINT8", shape)


def test_absurd_shape():
    with pytest.raises(WireError, match="too many"):
        element_count([1 << 21, 1 << 21])
    assert element_count([]) == 1
    assert element_count([2, 0, 5]) == 0


@pytest.mark.parametrize("datatype", ["BYTES", "FP8", "uint8", "UINT16", ""])
def test_unsupported_datatypes(datatype: str):
    with pytest.raises(WireError, match="unsupported datatype"):
        tensor_from_bytes(b"", datatype, [0])
    with pytest.raises(WireError, match="unsupported datatype"):
        tensor_from_json([], datatype, [0])


@pytest.mark.parametrize(("name", "dtype"), sorted(DATATYPES.items()))
def test_datatype_of_each_dtype(name: str, dtype: np.dtype):
    assert datatype_of(np.zeros(2, dtype=dtype)) == name
    assert datatype_of(np.zeros(2, dtype=dtype.newbyteorder(">"))) == name


def test_datatype_of_native_numpy_types():
    expected = {
        np.bool_: "BOOL",
        np.uint8: "UINT8",
        np.int8: "INT8",
        np.int32: "INT32",
        np.int64: "INT64",
        np.float16: "FP16",
        np.float32: "FP32",
        np.float64: "FP64",
    }
    for scalar, name in expected.items():
        assert datatype_of(np.zeros(1, dtype=scalar)) == name


@pytest.mark.parametrize("dtype", [np.complex64, np.uint16, np.uint64, np.dtype("U3"), np.object_])
def test_datatype_of_unsupported(dtype: Any):
    with pytest.raises(WireError, match="no KServe v2 datatype"):
        datatype_of(np.zeros(1, dtype=dtype))


@pytest.mark.parametrize(
    ("data", "datatype"),
    [
        ([1.5, 2], "UINT8"),
        (["7", 1], "UINT8"),
        ([10**30, 1], "INT64"),
        (["a", 1.0], "FP32"),
    ],
)
def test_tensor_from_json_is_strict_about_json_types(data: list, datatype: str) -> None:
    with pytest.raises(WireError):
        tensor_from_json(data, datatype, [2])


def test_tensor_from_json_accepts_ints_for_floats() -> None:
    assert tensor_from_json([1, 2.5], "FP32", [2]).tolist() == [1.0, 2.5]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_request_and_response_helpers_round_trip(binary: bool) -> None:
    from common.wire import HEADER_LENGTH, decode_infer_response, infer_request

    images = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    body, headers = infer_request(images, ["label", "probabilities"], binary=binary, parameters={"top_k": 2})
    length = headers.get(HEADER_LENGTH)
    header, blob = split_binary(body, int(length)) if binary else (json.loads(body), memoryview(b""))
    assert header["parameters"]["top_k"] == 2
    assert [o["name"] for o in header["outputs"]] == ["label", "probabilities"]
    assert all(o["parameters"]["binary_data"] is binary for o in header["outputs"])
    sent = (
        take_binary(header["inputs"], blob)[0]
        if binary
        else tensor_from_json(**{k: header["inputs"][0][k] for k in ("data", "datatype", "shape")})
    )
    assert np.array_equal(sent, images)

    outputs = [np.array([3, 1], dtype=np.int64), np.full((2, 3), 0.25, dtype=np.float32)]
    response = {
        "outputs": [
            {"name": n, "shape": list(a.shape), "datatype": datatype_of(a)}
            for n, a in zip(["label", "probabilities"], outputs, strict=True)
        ]
    }
    if binary:
        for entry, array in zip(response["outputs"], outputs, strict=True):
            entry["parameters"] = {"binary_data_size": array.nbytes}
        raw, size = pack_binary(response, outputs)
        decoded = decode_infer_response(raw, str(size))
    else:
        for entry, array in zip(response["outputs"], outputs, strict=True):
            entry["data"] = array.reshape(-1).tolist()
        decoded = decode_infer_response(json.dumps(response).encode(), None)
    assert np.array_equal(decoded["label"], outputs[0]) and np.array_equal(
        decoded["probabilities"], outputs[1]
    )
