"""Property-based fuzzing of the API on the embedded fakeredis backend.

1. schemathesis, from the app's own OpenAPI document, over every operation. Most cases carry valid
   credentials (an unlimited API key as ``X-API-Key``, the admin token on ``/admin``) and name a served
   model, so that fuzzing gets past auth and routing; one in four is sent with only what schemathesis
   generated. Property: never a 5xx, and every 4xx has the error envelope.
2. Hypothesis strategies aimed at what a schema-driven generator rarely reaches: near-valid infer
   tensors (JSON and binary) and embeddings inputs. Property: never a 5xx, every error has the
   envelope, and a request charges exactly its n images when served and nothing otherwise.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.python import asgi

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from common.wire import BINARY_CONTENT_TYPE, HEADER_LENGTH, pack_binary
from server.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings

MAX_EXAMPLES = 25


def build_model_store() -> Path:
    """The same two untrained models as the ``model_store`` fixture, in a temporary folder.

    schemathesis's fixture-based lazy schema does not work with this pytest (it sets
    ``node._nodeid``), so the schema is loaded at import time from an app built here.
    """
    store = Path(tempfile.mkdtemp(prefix="fuzz_store_"))
    atexit.register(shutil.rmtree, store, True)
    spec = InputSpec(channels=1, height=28, width=28)
    torch.manual_seed(0)
    clf = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    classes = [str(i) for i in range(10)]
    save_checkpoint(clf, card_for(clf, "clf", "small_cnn", input=spec, classes=classes), store / "clf")
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=spec), store / "enc")
    return store


APP = create_app(make_settings(build_model_store(), None, max_batch=8))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


@pytest.fixture(scope="module")
def api_key() -> str:
    """An unlimited key, created through schemathesis's own ASGI client (its event loop serves the app)."""
    with asgi.get_client(APP) as client:
        response = client.post(
            "/admin/keys",
            json={"budget": -1, "tier": "research"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert response.status_code == 201, response.text
    return response.json()["api_key"]


def steer(case: schemathesis.Case, api_key: str) -> dict[str, str]:
    """Point most cases at real models / the real key, and return credentials for the call.

    Decided by a hash of the case, so it is deterministic: a quarter keeps the generated path
    parameters, a quarter is sent with only what schemathesis generated (no valid credentials).
    """
    fingerprint = zlib.crc32(repr((case.method, case.path, case.path_parameters, case.body)).encode())
    params = case.path_parameters or {}
    if "name" in params and fingerprint >> 2 & 3:
        case.path_parameters = {**params, "name": "clf" if fingerprint >> 4 & 1 else "enc"}
    if isinstance(case.body, dict) and "model" in case.body and fingerprint >> 2 & 3:
        case.body = {**case.body, "model": "clf" if fingerprint >> 5 & 1 else "enc"}
    if "key_id" in params and fingerprint >> 2 & 3 and case.method.upper() == "GET":
        case.path_parameters = {**params, "key_id": api_key.split("-")[1]}
    if fingerprint & 3 == 0:
        return {}
    if case.path.startswith("/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # Bearer wins over X-API-Key, so a generated Authorization header must not shadow the valid key
    if case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
    return {"X-API-Key": api_key}


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, api_key: str) -> None:
    response = case.call(headers=steer(case, api_key))
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_envelope(response.json(), case.formatted_path)


def assert_envelope(body: Any, path: str) -> None:
    """KServe v2's string ``error`` on ``/v2`` routes, OpenAI's error object elsewhere."""
    assert isinstance(body, dict), body
    if path.startswith("/v2"):
        assert set(body) == {"error", "code", "type"}, body
        assert all(isinstance(v, str) and v for v in body.values()), body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert all(
            isinstance(body["error"][k], str) and body["error"][k] for k in ("message", "type", "code")
        )


# ------------------------------------------------------------------- targeted strategies (Hypothesis)

DATATYPES = ["UINT8", "FP32", "INT64", "FP64", "FP16", "INT8", "BOOL", "BYTES", "uint8", ""]
SPECIAL_VALUES = st.one_of(
    st.integers(-300, 300),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 10**400, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["7", "", None, True, [], [1, 2], {}]),
)
DIM = st.one_of(st.sampled_from([1, 28, 28]), st.integers(-3, 40), st.sampled_from([0, 10**20]))


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes, int]:
    """(model, extra headers, body, n): a valid infer request, JSON or binary, with each of its parts
    broken in one draw out of six, so that most requests are near-valid and some are served."""

    def maybe(valid: Any, broken: st.SearchStrategy[Any]) -> Any:
        return draw(broken) if draw(st.integers(0, 5)) == 0 else valid

    model = draw(st.sampled_from(["clf", "enc"]))
    n = draw(st.integers(1, 3))
    n = maybe(n, st.integers(-2, 10))
    shape = [n, *(maybe(d, DIM) for d in (1, 28, 28))]
    shape = maybe(shape, st.lists(DIM, max_size=6))
    datatype = maybe(draw(st.sampled_from(["UINT8", "FP32"])), st.sampled_from(DATATYPES))
    count = int(np.prod(shape)) if shape and all(0 <= d <= 40 for d in shape) else draw(st.integers(0, 50))
    count = max(0, min(count + maybe(0, st.sampled_from([-1, 1, -784])), 10 * 784))
    fill = 0.5 if datatype == "FP32" else 7
    names = (
        ["label", "probabilities", "top_k_indices", "top_k_probabilities"]
        if model == "clf"
        else ["embedding"]
    )
    outputs = maybe(
        draw(st.none() | st.lists(st.sampled_from(names), max_size=3)),
        st.lists(st.sampled_from(["logits", "embedding", "label", "nope", ""]), max_size=3),
    )
    header: dict[str, Any] = {"inputs": [{"name": "images", "shape": shape, "datatype": datatype}]}
    if draw(st.booleans()):
        header["parameters"] = {
            "top_k": maybe(draw(st.integers(1, 10)), st.integers(-2, 12) | SPECIAL_VALUES)
        }
    binary = draw(st.booleans())
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": draw(st.booleans())}} for o in outputs]
    if not binary:
        data: list[Any] = [fill] * count
        for _ in range(maybe(0, st.integers(1, 3))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(SPECIAL_VALUES)
        header["inputs"][0]["data"] = data
        return model, {"Content-Type": "application/json"}, json.dumps(header).encode(), n
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}.get(datatype, np.uint8)
    array = np.full(count, fill, dtype=dtype)
    if datatype == "FP32" and count:
        array[draw(st.integers(0, count - 1))] = maybe(0.25, st.floats(width=32))
    size = array.nbytes + maybe(0, st.sampled_from([-1, 1, -(10**6)]))
    header["inputs"][0]["parameters"] = {"binary_data_size": size}
    body, length = pack_binary(header, [array])
    body += maybe(b"", st.sampled_from([b"\0", b"junk"]))
    length += maybe(0, st.sampled_from([1, -1, 10**6, -length]))
    return model, {HEADER_LENGTH: str(length), "Content-Type": BINARY_CONTENT_TYPE}, body, n


def encoded(data: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(data, mode="L").save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


VALID_PNG = encoded(np.full((28, 28), 9, np.uint8), "PNG")
VALID_JPEG = encoded(np.arange(784, dtype=np.uint32).astype(np.uint8).reshape(28, 28), "JPEG")
IMAGE_ITEMS = st.one_of(
    st.sampled_from(["BMP", "GIF", "TIFF", "PNG"]).flatmap(
        lambda fmt: st.tuples(st.integers(1, 60), st.integers(1, 60)).map(
            lambda hw: encoded(np.zeros(hw, np.uint8), fmt)
        )
    ),
    st.binary(max_size=900).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),
)


@st.composite
def embeddings_requests(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    valid = st.sampled_from([VALID_PNG, "data:image/png;base64," + VALID_PNG, VALID_JPEG])
    items = draw(st.lists(valid | valid | IMAGE_ITEMS, max_size=10))
    tensor = draw(st.integers(0, 5)) == 0
    if tensor:
        items = [base64.b64encode(bytes(draw(st.sampled_from([784, 784, 783, 0])))).decode() for _ in items]
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["enc", "enc", "enc", "clf", "nope"])),
        "input": items[0] if len(items) == 1 and draw(st.booleans()) else items,
        "input_type": draw(st.sampled_from(["tensor"] if tensor else ["image", "image", "tensor", "video"])),
        "encoding_format": draw(st.sampled_from(["float", "base64", "float", "base64", "hex"])),
    }
    return body, len(items)


@pytest.fixture(scope="module")
def client(api_key: str) -> Iterator[Any]:
    with asgi.get_client(APP) as http:
        http.headers["X-API-Key"] = api_key
        yield http


def used(client: Any) -> int:
    response = client.get("/v1/usage")
    assert response.status_code == 200, response.text
    return response.json()["used"]


def check_charged(client: Any, response: Any, before: int, n: int, path: str) -> None:
    """No 5xx; errors have the envelope; served requests charge n, refused ones nothing."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code == 200:
        assert used(client) == before + n
    else:
        assert_envelope(response.json(), path)
        assert used(client) == before


TARGETED = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@TARGETED
@given(request=infer_requests())
def test_infer_tensors(client: Any, request: tuple[str, dict[str, str], bytes, int]) -> None:
    model, headers, body, n = request
    before = used(client)
    response = client.post(f"/v2/models/{model}/infer", data=body, headers=headers)
    check_charged(client, response, before, n, "/v2/models/{model}/infer")


@TARGETED
@given(request=embeddings_requests())
def test_embeddings_inputs(client: Any, request: tuple[dict[str, Any], int]) -> None:
    body, n = request
    before = used(client)
    response = client.post("/v1/embeddings", json=body)
    check_charged(client, response, before, n, "/v1/embeddings")
    if response.status_code == 200:
        usage = response.json()["usage"]
        assert usage == {"images": n, "prompt_tokens": n, "total_tokens": n}
