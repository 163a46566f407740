"""The victim API through the TestClient, on both backends (embedded fakeredis and a real Redis).

Every rejected request is checked three ways: its status, the error envelope
``{"error": {"type", "code", "message"}}``, and that it charged nothing (``GET /v1/usage``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.wire import BINARY_CONTENT_TYPE, HEADER_LENGTH, pack_binary, split_binary, take_binary
from server.app import create_app
from server.settings import ServerSettings
from tests.conftest import admin_headers, create_key, error_of, make_settings

INFER = "/v2/models/clf/infer"
ENC_INFER = "/v2/models/enc/infer"
CLF_OUTPUTS = ["logits", "probabilities", "label", "top_k_indices", "top_k_probabilities"]
NP_TYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64}


# --------------------------------------------------------------------------------------------- helpers


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def json_body(
    arr: np.ndarray,
    outputs: list[str] | None = None,
    datatype: str = "UINT8",
    parameters: dict[str, Any] | None = None,
    shape: list[int] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "images",
                "shape": list(arr.shape) if shape is None else shape,
                "datatype": datatype,
                "data": arr.reshape(-1).tolist(),
            }
        ]
    }
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    if parameters is not None:
        body["parameters"] = parameters
    return body


def binary_request(
    arr: np.ndarray,
    outputs: list[str] | None = None,
    datatype: str = "UINT8",
    parameters: dict[str, Any] | None = None,
    shape: list[int] | None = None,
    size: int | None = None,
    extra: bytes = b"",
) -> dict[str, Any]:
    """kwargs for ``client.post``: Triton's binary extension, outputs asked back as binary."""
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "images",
                "shape": list(arr.shape) if shape is None else shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": arr.nbytes if size is None else size},
            }
        ]
    }
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    if parameters is not None:
        header["parameters"] = parameters
    body, length = pack_binary(header, [arr])
    return {
        "content": body + extra,
        "headers": {HEADER_LENGTH: str(length), "Content-Type": BINARY_CONTENT_TYPE},
    }


def post_binary(
    client: TestClient, path: str, auth: dict[str, str], request: dict[str, Any]
) -> httpx.Response:
    return client.post(path, content=request["content"], headers={**auth, **request["headers"]})


def decode_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    """Output tensors of an infer response, JSON or binary."""
    assert response.status_code == 200, response.text
    if HEADER_LENGTH.lower() in response.headers:
        assert response.headers["content-type"] == BINARY_CONTENT_TYPE
        header, blob = split_binary(response.content, int(response.headers[HEADER_LENGTH]))
        arrays = take_binary(header["outputs"], blob)
    else:
        header = response.json()
        arrays = [None] * len(header["outputs"])
    result = {}
    for entry, array in zip(header["outputs"], arrays, strict=True):
        if array is None:
            array = np.asarray(entry["data"], dtype=NP_TYPES[entry["datatype"]]).reshape(entry["shape"])
        assert list(array.shape) == entry["shape"]
        result[entry["name"]] = np.array(array)
    return result


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr.reshape(arr.shape[-2:]), mode="L").save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` 8-bit grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    """``status`` with exactly the error body of the route's protocol: on ``/v2`` KServe v2's
    ``{"error": "<message>", "code", "type"}``, elsewhere OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``. Returns ``{"type", "code", "message"}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if response.request.url.path.startswith("/v2"):
        assert set(body) == {"error", "code", "type"}, body
        assert all(isinstance(v, str) and v for v in body.values()), body
        error = {"type": body["type"], "code": body["code"], "message": body["error"]}
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        error = {k: body["error"][k] for k in ("type", "code", "message")}
        assert body["error"]["param"] is None or isinstance(body["error"]["param"], str), body
    assert all(isinstance(v, str) and v for v in error.values()), body
    if code is not None:
        assert error["code"] == code, body
    return error


def used(client: TestClient, auth: dict[str, str]) -> int:
    response = client.get("/v1/usage", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["used"]


def assert_rejected(
    client: TestClient,
    auth: dict[str, str],
    send: Callable[[], httpx.Response],
    status: int,
    code: str | None = None,
) -> httpx.Response:
    """``send()`` is refused with ``status`` / ``code`` in the envelope and charges nothing."""
    before = used(client, auth)
    response = send()
    assert_error(response, status, code)
    assert used(client, auth) == before
    return response


def audit(client: TestClient, key_id: str) -> list[dict[str, str]]:
    response = client.get(f"/admin/keys/{key_id}/audit", headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------ discovery and metadata


def test_server_health_and_metadata(client: TestClient) -> None:
    server = client.get("/v2")
    assert server.status_code == 200
    assert server.json()["name"] == "stealrange" and "binary_tensor_data" in server.json()["extensions"]
    assert client.get("/v2/health/live").json()["live"] is True
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    # no key: how many models, never their names
    assert ready.json()["detail"] == {"models": 2, "redis": True}
    assert "clf" not in ready.text and "enc" not in ready.text
    _, auth = create_key(client)
    for name in ("clf", "enc"):
        model_ready = client.get(f"/v2/models/{name}/ready", headers=auth)
        assert model_ready.status_code == 200 and model_ready.json()["ready"] is True
    assert_error(client.get("/v2/models/clf/ready"), 401, "invalid_api_key")
    assert_error(client.get("/v2/models/nope/ready", headers=auth), 404, "model_not_found")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.put("/v2"), 405)


def test_model_metadata_per_tier(client: TestClient) -> None:
    _, standard = create_key(client)
    _, label = create_key(client, tier="label")
    _, research = create_key(client, tier="research")

    meta = client.get("/v2/models/clf", headers=standard)
    assert meta.status_code == 200, meta.text
    meta = meta.json()
    assert meta["name"] == "clf" and meta["kind"] == "classifier"
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert meta["input_datatypes"] == ["UINT8", "FP32"]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["normalisation"] == {"mean": [0.5], "std": [0.5]}
    assert meta["allowed_outputs"] == ["probabilities", "label", "top_k_indices", "top_k_probabilities"]
    assert meta["default_outputs"] == ["probabilities"]
    assert meta["output_modes"]["label"] == ["label"]
    assert "logits" in meta["output_modes"]["research"]
    assert meta["max_batch"] == 256
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert outputs["label"]["datatype"] == "INT64"

    assert client.get("/v2/models/clf", headers=label).json()["allowed_outputs"] == ["label"]
    assert client.get("/v2/models/clf", headers=label).json()["default_outputs"] == ["label"]
    assert client.get("/v2/models/clf", headers=research).json()["allowed_outputs"] == CLF_OUTPUTS

    enc = client.get("/v2/models/enc", headers=standard).json()
    assert enc["kind"] == "encoder" and enc["embedding_dim"] == 64
    assert enc["allowed_outputs"] == ["embedding"]
    assert enc["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}]
    assert client.get("/v2/models/enc", headers=label).json()["allowed_outputs"] == []

    assert_error(client.get("/v2/models/nope", headers=standard), 404, "model_not_found")
    assert_error(client.get("/v2/models/clf"), 401, "invalid_api_key")


def test_v1_models_and_usage(client: TestClient) -> None:
    key_id, auth = create_key(client, name="alice", budget=50, rate=2.5, burst=7)
    models = client.get("/v1/models", headers=auth)
    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert [(m["id"], m["kind"], m["object"]) for m in models.json()["data"]] == [
        ("clf", "classifier", "model"),
        ("enc", "encoder", "model"),
    ]
    _, enc_only = create_key(client, models=["enc"])
    assert [m["id"] for m in client.get("/v1/models", headers=enc_only).json()["data"]] == ["enc"]

    usage = client.get("/v1/usage", headers=auth)
    assert usage.status_code == 200
    assert usage.json() == {
        "key_id": key_id,
        "name": "alice",
        "tier": "standard",
        "models": ["*"],
        "budget": 50,
        "used": 0,
        "remaining": 50,
        "rate": {"images_per_second": 2.5, "burst": 7},
        "revoked": False,
        "flags": {},
    }
    _, unlimited = create_key(client, budget=-1)
    assert client.get("/v1/usage", headers=unlimited).json()["remaining"] == -1
    assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert_error(client.get("/v1/usage"), 401, "invalid_api_key")


# ------------------------------------------------------------------------------------------ inference


def test_json_and_binary_agree_and_charge_n(client: TestClient) -> None:
    _, auth = create_key(client, tier="research", budget=100)
    batch = images(3)
    params = {"top_k": 3}

    as_json = client.post(INFER, json=json_body(batch, CLF_OUTPUTS, parameters=params), headers=auth)
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.headers["x-budget-used"] == "3"
    assert as_json.headers["x-budget-remaining"] == "97"
    assert as_json.headers["x-budget-limit"] == "100"
    assert used(client, auth) == 3
    json_out = decode_outputs(as_json)

    as_binary = post_binary(client, INFER, auth, binary_request(batch, CLF_OUTPUTS, parameters=params))
    assert as_binary.headers["content-type"] == BINARY_CONTENT_TYPE
    assert as_binary.headers["x-budget-used"] == "6"
    assert as_binary.headers["x-budget-remaining"] == "94"
    assert used(client, auth) == 6
    binary_out = decode_outputs(as_binary)

    assert list(json_out) == list(binary_out) == CLF_OUTPUTS
    for name in CLF_OUTPUTS:
        assert json_out[name].dtype == binary_out[name].dtype
        np.testing.assert_allclose(json_out[name], binary_out[name], rtol=1e-6, atol=1e-7)
    probs, logits = json_out["probabilities"], json_out["logits"]
    assert probs.shape == logits.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(json_out["label"], logits.argmax(axis=1))
    assert json_out["top_k_indices"].shape == json_out["top_k_probabilities"].shape == (3, 3)
    np.testing.assert_array_equal(json_out["top_k_indices"][:, 0], json_out["label"])
    np.testing.assert_allclose(
        json_out["top_k_probabilities"], np.take_along_axis(probs, json_out["top_k_indices"], 1), rtol=1e-6
    )

    # binary input, JSON output (no binary_data asked for) and the reverse agree too
    mixed = binary_request(batch, None, parameters=params)
    header = json.loads(mixed["content"][: int(mixed["headers"][HEADER_LENGTH])])
    header["outputs"] = [{"name": "probabilities"}]
    body, length = pack_binary(header, [batch])
    response = client.post(INFER, content=body, headers={**auth, HEADER_LENGTH: str(length)})
    assert response.headers["content-type"] == "application/json"
    np.testing.assert_allclose(decode_outputs(response)["probabilities"], probs, rtol=1e-6, atol=1e-7)
    everything_binary = json_body(batch, ["label"], parameters={"binary_data_output": True})
    response = client.post(INFER, json=everything_binary, headers=auth)
    np.testing.assert_array_equal(decode_outputs(response)["label"], json_out["label"])
    assert used(client, auth) == 12


def test_fp32_equals_uint8_over_255(client: TestClient) -> None:
    _, auth = create_key(client, tier="research")
    batch = images(2, seed=1)
    scaled = batch.astype(np.float32) / np.float32(255)
    outs = ["logits", "probabilities"]
    reference = decode_outputs(client.post(INFER, json=json_body(batch, outs), headers=auth))
    by_json = decode_outputs(client.post(INFER, json=json_body(scaled, outs, "FP32"), headers=auth))
    by_binary = decode_outputs(post_binary(client, INFER, auth, binary_request(scaled, outs, "FP32")))
    for name in outs:
        np.testing.assert_allclose(by_json[name], reference[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(by_binary[name], reference[name], rtol=1e-5, atol=1e-6)
    assert used(client, auth) == 6


def test_default_outputs_and_request_id(client: TestClient) -> None:
    key_id, auth = create_key(client)
    # The client's id is kept beside the server's, never in its place: audit entries cannot be
    # spoofed or made to collide by a client.
    response = client.post(INFER, json=json_body(images(2)), headers={**auth, "X-Request-ID": "req-42.a:b"})
    server_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", server_id)
    assert response.headers["x-client-request-id"] == "req-42.a:b"
    body = response.json()
    assert body["id"] == server_id and body["model_name"] == "clf"
    assert [o["name"] for o in body["outputs"]] == ["probabilities"]
    event = audit(client, key_id)[-1]
    assert event["request_id"] == server_id and event["client_request_id"] == "req-42.a:b"
    again = client.post(
        INFER, json=json_body(images(1)), headers={**auth, "X-Client-Request-ID": "req-42.a:b"}
    )
    assert again.headers["x-request-id"] != server_id
    assert audit(client, key_id)[-1]["request_id"] == again.headers["x-request-id"]
    kserve_id = client.post(INFER, json={**json_body(images(1)), "id": "mine"}, headers=auth)
    assert kserve_id.json()["id"] == "mine"  # the protocol's own request id is echoed as sent

    generated = client.post(INFER, json=json_body(images(1)), headers=auth).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert audit(client, key_id)[-1]["request_id"] == generated
    unsafe = client.get("/v2", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/v2").headers["x-request-id"])
    # errors carry the ids too
    refused = client.get("/v1/usage", headers={"X-Request-ID": "abc"})
    assert refused.status_code == 401 and refused.headers["x-client-request-id"] == "abc"
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])
    with_id = {**json_body(images(1)), "id": "mine"}
    assert client.post(INFER, json=with_id, headers=auth).json()["id"] == "mine"


def test_embeddings_agree_with_kserve(client: TestClient) -> None:
    _, auth = create_key(client)
    batch = images(2, seed=2)
    reference = decode_outputs(client.post(ENC_INFER, json=json_body(batch), headers=auth))["embedding"]
    assert reference.shape == (2, 64) and reference.dtype == np.float32
    assert used(client, auth) == 2

    encoded = [png(img) for img in batch]
    variants: list[dict[str, Any]] = [
        {"input": [b64(p) for p in encoded]},
        {"input": [f"data:image/png;base64,{b64(p)}" for p in encoded]},
        {"input": [b64(img.tobytes()) for img in batch], "input_type": "tensor"},
        {"input": [b64(p) for p in encoded], "encoding_format": "base64"},
        {"input": [b64(img.tobytes()) for img in batch], "input_type": "tensor", "encoding_format": "base64"},
    ]
    expected_used = 2
    for variant in variants:
        response = client.post("/v1/embeddings", json={"model": "enc", **variant}, headers=auth)
        assert response.status_code == 200, (variant.keys(), response.text)
        body = response.json()
        expected_used += 2
        assert body["object"] == "list" and body["model"] == "enc"
        assert body["usage"]["images"] == 2
        assert response.headers["x-budget-used"] == str(expected_used)
        assert [item["index"] for item in body["data"]] == [0, 1]
        assert all(item["object"] == "embedding" for item in body["data"])
        if variant.get("encoding_format") == "base64":
            vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
        else:
            vectors = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(vectors, reference, rtol=1e-5, atol=1e-5)
    assert used(client, auth) == expected_used

    single = client.post("/v1/embeddings", json={"model": "enc", "input": b64(encoded[0])}, headers=auth)
    assert single.json()["usage"]["images"] == 1
    np.testing.assert_allclose(single.json()["data"][0]["embedding"], reference[0], rtol=1e-5, atol=1e-5)
    assert used(client, auth) == expected_used + 1


# --------------------------------------------------------------------------------------------- auth


def test_every_bad_key_gets_the_same_401(client: TestClient) -> None:
    key_id, auth = create_key(client)
    api_key = auth["Authorization"].removeprefix("Bearer ")
    secret = api_key.split("-", 2)[2]
    other_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    revoked_id, revoked = create_key(client)
    assert client.delete(f"/admin/keys/{revoked_id}", headers=admin_headers()).status_code == 200

    bad_headers = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Basic {api_key}"},
        {"Authorization": f"Bearer sr-{'0' * 16}-{secret}"},
        {"Authorization": f"Bearer sr-{key_id}-{other_secret}"},
        {"Authorization": f"Bearer {api_key}x"},
        {"X-API-Key": f"sr-{key_id}-{other_secret}"},
        revoked,
    ]
    bodies = []
    for headers in bad_headers:
        for send in (
            lambda h=headers: client.get("/v1/usage", headers=h),
            lambda h=headers: client.post(INFER, json=json_body(images(1)), headers=h),
        ):
            response = assert_rejected(client, auth, send, 401, "invalid_api_key")
            bodies.append(error_of(response))
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["type"] == "authentication_error"

    # the key in the query string is never read
    for param in ("api_key", "key", "access_token"):
        send = lambda p=param: client.get("/v1/usage", params={p: api_key})  # noqa: E731
        assert error_of(assert_rejected(client, auth, send, 401, "invalid_api_key")) == bodies[0]

    # X-API-Key works like Bearer
    by_header = client.post(INFER, json=json_body(images(2)), headers={"X-API-Key": api_key})
    assert by_header.status_code == 200, by_header.text
    assert client.get("/v1/usage", headers={"X-API-Key": api_key}).json()["used"] == 2
    assert used(client, auth) == 2


def test_bad_inference_header_length_bytes_is_400(model_store: Path, backend: str | None) -> None:
    """A non-ASCII digit (latin-1 superscript two) in the header length is a 400, not a 500.

    The TestClient re-encodes header values, so this goes through httpx's raw ASGI transport.
    """
    app = create_app(make_settings(model_store, backend))

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        ):
            response = await http.post("/admin/keys", json={}, headers=admin_headers())
            auth = {"Authorization": f"Bearer {response.json()['api_key']}"}
            request = binary_request(images(1))
            response = await http.post(
                INFER, content=request["content"], headers={**auth, HEADER_LENGTH: b"\xb2"}
            )
            assert_error(response, 400, "invalid_header")
            assert (await http.get("/v1/usage", headers=auth)).json()["used"] == 0

    asyncio.run(main())


# --------------------------------------------------------------------------------------- tiers, admin


def test_tiers_and_model_permissions(client: TestClient) -> None:
    _, label = create_key(client, tier="label")
    send = lambda: client.post(INFER, json=json_body(images(1), ["probabilities"]), headers=label)  # noqa: E731
    assert error_of(assert_rejected(client, label, send, 403, "mode_not_allowed"))["type"] == (
        "permission_error"
    )
    send = lambda: post_binary(client, INFER, label, binary_request(images(1), ["logits"]))  # noqa: E731
    assert_rejected(client, label, send, 403, "mode_not_allowed")
    send = lambda: client.post(INFER, json=json_body(images(1), ["label", "top_k_indices"]), headers=label)  # noqa: E731
    assert_rejected(client, label, send, 403, "mode_not_allowed")
    send = lambda: client.post(ENC_INFER, json=json_body(images(1)), headers=label)  # noqa: E731
    assert_rejected(client, label, send, 403, "mode_not_allowed")
    labels = decode_outputs(client.post(INFER, json=json_body(images(2)), headers=label))
    assert list(labels) == ["label"] and labels["label"].shape == (2,)
    assert used(client, label) == 2

    _, standard = create_key(client)
    send = lambda: client.post(INFER, json=json_body(images(1), ["logits"]), headers=standard)  # noqa: E731
    assert_rejected(client, standard, send, 403, "mode_not_allowed")
    send = lambda: client.post(INFER, json=json_body(images(1), ["bogus"]), headers=standard)  # noqa: E731
    assert_rejected(client, standard, send, 422, "unknown_output")

    # A model this key may not query answers exactly as a model that does not exist: the key
    # learns nothing of it (the lookup and the access check are one step).
    _, enc_only = create_key(client, models=["enc"])
    missing = error_of(client.get("/v2/models/nope", headers=enc_only))
    for path in ("", "/ready", "/config", "/stats"):
        hidden = client.get(f"/v2/models/clf{path}", headers=enc_only)
        assert error_of(hidden) == {**missing, "message": missing["message"].replace("nope", "clf")}
    for send in (
        lambda: client.post(INFER, json=json_body(images(1)), headers=enc_only),
        lambda: post_binary(client, INFER, enc_only, binary_request(images(1), ["label"])),
        lambda: client.get("/v2/models/clf", headers=enc_only),
    ):
        assert_rejected(client, enc_only, send, 404, "model_not_found")
    assert client.post(ENC_INFER, json=json_body(images(1)), headers=enc_only).status_code == 200
    _, clf_only = create_key(client, models=["clf"])
    send = lambda: client.post(  # noqa: E731
        "/v1/embeddings", json={"model": "enc", "input": b64(png(images(1)[0]))}, headers=clf_only
    )
    assert_rejected(client, clf_only, send, 404, "model_not_found")


def test_admin_auth_and_key_lifecycle(client: TestClient, model_store: Path, backend: str | None) -> None:
    key_id, auth = create_key(client)
    for path, method in [
        ("/admin/keys", "GET"),
        ("/admin/keys", "POST"),
        (f"/admin/keys/{key_id}", "GET"),
        (f"/admin/keys/{key_id}", "DELETE"),
        (f"/admin/keys/{key_id}/audit", "GET"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, auth):
            response = client.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert_error(response, 401, "invalid_admin_token")
    assert client.get("/v1/usage", headers=auth).json()["revoked"] is False

    disabled = TestClient(
        create_app(ServerSettings(model_store=model_store, redis_url=backend, redis_prefix="tdisabled"))
    )
    with disabled:
        assert_error(disabled.get("/admin/keys", headers=admin_headers()), 403, "admin_disabled")
        assert_error(disabled.post("/admin/keys", json={}, headers=admin_headers()), 403, "admin_disabled")
    # An empty token (what `--admin-token "$TOKEN"` becomes with $TOKEN unset) is no token: the
    # admin API stays disabled, and no credential, empty or not, opens it.
    for empty in ("", "   "):
        open_door = TestClient(
            create_app(
                ServerSettings(
                    model_store=model_store, redis_url=backend, redis_prefix="tempty", admin_token=empty
                )
            )
        )
        with open_door:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer  "}):
                response = open_door.post("/admin/keys", json={}, headers=headers)
                assert_error(response, 403, "admin_disabled")
    with pytest.raises(ValueError, match="at least 16"):
        ServerSettings(model_store=model_store, admin_token="short")

    assert_error(
        client.post("/admin/keys", json={"defense_profile": "nope"}, headers=admin_headers()),
        422,
        "unknown_defense_profile",
    )
    spec = {
        "name": "bob",
        "budget": 7,
        "rate": 3.0,
        "burst": 9,
        "tier": "research",
        "models": ["clf"],
        "defense_profile": None,
    }
    created = client.post("/admin/keys", json=spec, headers=admin_headers())
    assert created.status_code == 201, created.text
    api_key = created.json()["api_key"]
    assert re.fullmatch(r"sr-[0-9a-f]{16}-[A-Za-z0-9_-]{43}", api_key)
    record = created.json()["record"]
    assert {k: record[k] for k in spec} == spec
    assert record["used"] == 0 and record["revoked"] is False
    new_id = record["key_id"]
    secret = api_key.split("-", 2)[2]

    listed = client.get("/admin/keys", headers=admin_headers())
    assert listed.status_code == 200
    assert {k["key_id"] for k in listed.json()["keys"]} == {key_id, new_id}
    shown = client.get(f"/admin/keys/{new_id}", headers=admin_headers())
    assert shown.status_code == 200 and shown.json()["name"] == "bob"
    for text in (listed.text, shown.text):
        assert secret not in text and api_key not in text
        assert "secret" not in text and "hash" not in text

    bearer = {"Authorization": f"Bearer {api_key}"}
    assert client.post(INFER, json=json_body(images(2), ["logits"]), headers=bearer).status_code == 200
    events = audit(client, new_id)
    assert [(e["event"], e["n"], e["model"], e["mode"]) for e in events] == [("charge", "2", "clf", "logits")]
    assert client.get(f"/admin/keys/{new_id}", headers=admin_headers()).json()["used"] == 2

    revoked = client.delete(f"/admin/keys/{new_id}", headers=admin_headers())
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert secret not in revoked.text
    assert_error(client.get("/v1/usage", headers=bearer), 401, "invalid_api_key")
    assert client.get(f"/admin/keys/{new_id}", headers=admin_headers()).json()["revoked"] is True

    for method, path in [
        ("GET", "/admin/keys/0000000000000000"),
        ("DELETE", "/admin/keys/0000000000000000"),
        ("GET", "/admin/keys/0000000000000000/audit"),
    ]:
        assert_error(client.request(method, path, headers=admin_headers()), 404, "key_not_found")
    for bad_spec in ({"budget": -2}, {"tier": "NOT OK"}, {"surprise": 1}, {"rate": -1}, {"burst": 0}):
        assert_error(client.post("/admin/keys", json=bad_spec, headers=admin_headers()), 422)
    assert_error(client.get(f"/admin/keys/{key_id}/audit?count=0", headers=admin_headers()), 422)


# ------------------------------------------------------------------------------ limits and bad input


def chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def fp32(values: list[float], n: int = 1) -> np.ndarray:
    arr = np.full((n, 1, 28, 28), 0.5, dtype=np.float32)
    arr.reshape(-1)[: len(values)] = values
    return arr


# (id, model path, request kwargs builder, status, code)
BAD_INFER: list[tuple[str, str, Callable[[], dict[str, Any]], int, str]] = [
    (
        "unknown-model",
        "/v2/models/nope/infer",
        lambda: {"json": json_body(images(1))},
        404,
        "model_not_found",
    ),
    ("shape-3d", INFER, lambda: {"json": json_body(images(1), shape=[1, 28, 28])}, 422, "invalid_shape"),
    (
        "shape-wrong-hw",
        INFER,
        lambda: {"json": json_body(images(1), shape=[1, 1, 14, 56])},
        422,
        "invalid_shape",
    ),
    ("shape-negative-dim", INFER, lambda: {"json": json_body(images(1), shape=[1, 1, 28, -5])}, 422, None),
    ("shape-huge-dim", INFER, lambda: {"json": json_body(images(1), shape=[1, 10**30, 28, 28])}, 422, None),
    ("shape-empty-batch", INFER, lambda: {"json": json_body(images(0))}, 422, "empty_batch"),
    ("shape-negative-batch", INFER, lambda: {"json": json_body(images(1), shape=[-1, 1, 28, 28])}, 422, None),
    ("dtype-int64", INFER, lambda: {"json": json_body(images(1), datatype="INT64")}, 422, "invalid_dtype"),
    ("dtype-fp64", INFER, lambda: {"json": json_body(images(1), datatype="FP64")}, 422, "invalid_dtype"),
    ("dtype-unknown", INFER, lambda: {"json": json_body(images(1), datatype="BYTES")}, 422, "invalid_dtype"),
    ("fp32-above-1", INFER, lambda: {"json": json_body(fp32([1.5]), datatype="FP32")}, 422, "invalid_range"),
    (
        "fp32-negative",
        INFER,
        lambda: {"json": json_body(fp32([-0.1]), datatype="FP32")},
        422,
        "invalid_range",
    ),
    (
        "fp32-nan-json",
        INFER,
        lambda: {
            "content": json.dumps(json_body(fp32([float("nan")]), datatype="FP32")),
            "headers": {"Content-Type": "application/json"},
        },
        422,
        "invalid_range",
    ),
    (
        "fp32-inf-json",
        INFER,
        lambda: {
            "content": json.dumps(json_body(fp32([float("inf")]), datatype="FP32")),
            "headers": {"Content-Type": "application/json"},
        },
        422,
        "invalid_range",
    ),
    ("fp32-nan-binary", INFER, lambda: binary_request(fp32([np.nan]), datatype="FP32"), 422, "invalid_range"),
    (
        "fp32-above-1-binary",
        INFER,
        lambda: binary_request(fp32([2.0]), datatype="FP32"),
        422,
        "invalid_range",
    ),
    (
        "fp32-huge-int-json",
        INFER,
        lambda: {
            "content": json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, 1, 28, 28],
                            "datatype": "FP32",
                            "data": [10**400] + [0] * 783,
                        }
                    ]
                }
            ),
            "headers": {"Content-Type": "application/json"},
        },
        422,
        None,
    ),
    (
        "uint8-out-of-range",
        INFER,
        lambda: {
            "json": {
                "inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [256] * 784}]
            }
        },
        422,
        "invalid_tensor",
    ),
    (
        "uint8-huge-int",
        INFER,
        lambda: {
            "json": {
                "inputs": [
                    {"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [10**30] * 784}
                ]
            }
        },
        422,
        None,
    ),
    (
        "data-too-short",
        INFER,
        lambda: {"json": json_body(images(2), shape=[3, 1, 28, 28])},
        422,
        "invalid_tensor",
    ),
    (
        "data-too-long",
        INFER,
        lambda: {"json": json_body(images(2), shape=[1, 1, 28, 28])},
        422,
        "invalid_tensor",
    ),
    (
        "data-missing",
        INFER,
        lambda: {"json": {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8"}]}},
        422,
        "invalid_tensor",
    ),
    (
        "data-not-numbers",
        INFER,
        lambda: {
            "json": {
                "inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [{}] * 784}]
            }
        },
        422,
        "invalid_tensor",
    ),
    (
        "data-deeply-nested",
        INFER,
        lambda: {
            "content": '{"inputs":[{"name":"x","shape":[1,1,28,28],"datatype":"UINT8","data":'
            + "[" * 900
            + "]" * 900
            + "}]}",
            "headers": {"Content-Type": "application/json"},
        },
        422,
        "invalid_tensor",
    ),
    ("no-inputs", INFER, lambda: {"json": {"inputs": []}}, 422, "invalid_request_body"),
    ("two-inputs", INFER, lambda: {"json": {"inputs": json_body(images(1))["inputs"] * 2}}, 422, None),
    ("body-not-object", INFER, lambda: {"json": [1, 2, 3]}, 422, "invalid_request_body"),
    (
        "invalid-json",
        INFER,
        lambda: {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("empty-body", INFER, lambda: {"content": b""}, 400, "invalid_json"),
    ("not-utf8", INFER, lambda: {"content": b"\xff\xfe\xfd"}, 400, "invalid_json"),
    ("deeply-nested-json", INFER, lambda: {"content": b"[" * 100_000}, 400, "invalid_json"),
    (
        "top-k-zero",
        INFER,
        lambda: {"json": json_body(images(1), parameters={"top_k": 0})},
        422,
        "invalid_top_k",
    ),
    (
        "top-k-11",
        INFER,
        lambda: {"json": json_body(images(1), parameters={"top_k": 11})},
        422,
        "invalid_top_k",
    ),
    (
        "top-k-string",
        INFER,
        lambda: {"json": json_body(images(1), parameters={"top_k": "3"})},
        422,
        "invalid_top_k",
    ),
    (
        "top-k-bool",
        INFER,
        lambda: {"json": json_body(images(1), parameters={"top_k": True})},
        422,
        "invalid_top_k",
    ),
    (
        "top-k-float",
        INFER,
        lambda: {"json": json_body(images(1), parameters={"top_k": 2.0})},
        422,
        "invalid_top_k",
    ),
    (
        "binary-header-longer-than-body",
        INFER,
        lambda: {**binary_request(images(1)), "headers": {HEADER_LENGTH: "100000"}},
        422,
        "invalid_tensor",
    ),
    (
        "binary-header-length-not-int",
        INFER,
        lambda: {**binary_request(images(1)), "headers": {HEADER_LENGTH: "12a"}},
        400,
        "invalid_header",
    ),
    (
        "binary-header-length-negative",
        INFER,
        lambda: {**binary_request(images(1)), "headers": {HEADER_LENGTH: "-5"}},
        400,
        "invalid_header",
    ),
    (
        "binary-header-length-zero",
        INFER,
        lambda: {**binary_request(images(1)), "headers": {HEADER_LENGTH: "0"}},
        422,
        None,
    ),
    (
        "binary-header-too-short",
        INFER,
        lambda: {**binary_request(images(1)), "headers": {HEADER_LENGTH: "20"}},
        422,
        "invalid_tensor",
    ),
    (
        "binary-header-not-object",
        INFER,
        lambda: {"content": b"[1,2]" + bytes(784), "headers": {HEADER_LENGTH: "5"}},
        422,
        "invalid_tensor",
    ),
    ("binary-size-too-small", INFER, lambda: binary_request(images(2), size=784), 422, "invalid_tensor"),
    ("binary-size-overruns", INFER, lambda: binary_request(images(1), size=2000), 422, "invalid_tensor"),
    ("binary-size-negative", INFER, lambda: binary_request(images(1), size=-1), 422, "invalid_tensor"),
    (
        "binary-shape-mismatch",
        INFER,
        lambda: binary_request(images(1), shape=[2, 1, 28, 28]),
        422,
        "invalid_tensor",
    ),
    (
        "binary-trailing-bytes",
        INFER,
        lambda: binary_request(images(1), extra=b"\0" * 3),
        422,
        "invalid_tensor",
    ),
    (
        "binary-dtype-int64",
        INFER,
        lambda: binary_request(images(1).astype(np.int64), datatype="INT64"),
        422,
        None,
    ),
    (
        "embedding-outputs-on-classifier",
        INFER,
        lambda: {"json": json_body(images(1), ["embedding"])},
        422,
        "unknown_output",
    ),
]


@pytest.mark.parametrize(
    ("path", "build", "status", "code"), [case[1:] for case in BAD_INFER], ids=[case[0] for case in BAD_INFER]
)
def test_bad_infer_requests_are_rejected_and_free(
    client: TestClient, path: str, build: Callable[[], dict[str, Any]], status: int, code: str | None
) -> None:
    _, auth = create_key(client)
    request = build()
    headers = {**auth, **request.pop("headers", {})}
    assert_rejected(client, auth, lambda: client.post(path, headers=headers, **request), status, code)
    assert client.post(INFER, json=json_body(images(1)), headers=auth).status_code == 200
    assert used(client, auth) == 1


def embeddings_body(items: list[str] | str, **extra: Any) -> dict[str, Any]:
    return {"json": {"model": "enc", "input": items, **extra}}


def image_of(fmt: str) -> str:
    return b64(png(images(1)[0], fmt))


BAD_EMBEDDINGS: list[tuple[str, Callable[[], dict[str, Any]], int, str | None]] = [
    ("unknown-model", lambda: {"json": {"model": "nope", "input": image_of("PNG")}}, 404, "model_not_found"),
    ("classifier", lambda: {"json": {"model": "clf", "input": image_of("PNG")}}, 422, "not_an_encoder"),
    ("wrong-size-png", lambda: embeddings_body(b64(png(np.zeros((27, 28), np.uint8)))), 422, "invalid_shape"),
    ("bmp", lambda: embeddings_body(image_of("BMP")), 422, "invalid_image"),
    ("gif", lambda: embeddings_body(image_of("GIF")), 422, "invalid_image"),
    ("not-an-image", lambda: embeddings_body(b64(b"hello world, not a png")), 422, "invalid_image"),
    ("truncated-png", lambda: embeddings_body(b64(png(images(1)[0])[:60])), 422, "invalid_image"),
    ("bomb", lambda: embeddings_body(b64(png_bomb())), 413, "image_too_large"),
    ("bomb-under-pil-limit", lambda: embeddings_body(b64(png_bomb(4000, 4000))), 413, "image_too_large"),
    ("invalid-base64", lambda: embeddings_body("!!!not base64!!!"), 422, "invalid_base64"),
    ("base64-bad-padding", lambda: embeddings_body("abc"), 422, "invalid_base64"),
    ("non-ascii-base64", lambda: embeddings_body("ééé="), 422, "invalid_base64"),
    ("one-bad-in-batch", lambda: embeddings_body([image_of("PNG"), "%%%"]), 422, "invalid_base64"),
    ("empty-list", lambda: embeddings_body([]), 422, "empty_batch"),
    (
        "tensor-wrong-length",
        lambda: embeddings_body(b64(bytes(783)), input_type="tensor"),
        422,
        "invalid_shape",
    ),
    ("tensor-given-png", lambda: embeddings_body(image_of("PNG"), input_type="tensor"), 422, "invalid_shape"),
    (
        "bad-encoding-format",
        lambda: embeddings_body(image_of("PNG"), encoding_format="hex"),
        422,
        "invalid_input",
    ),
    ("bad-input-type", lambda: embeddings_body(image_of("PNG"), input_type="audio"), 422, "invalid_input"),
    ("input-not-string", lambda: embeddings_body([1, 2]), 422, "invalid_input"),  # type: ignore[list-item]
    ("missing-model", lambda: {"json": {"input": image_of("PNG")}}, 422, "invalid_input"),
    (
        "invalid-json",
        lambda: {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    (
        "deeply-nested-json",
        lambda: {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
        400,
        None,
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "code"),
    [case[1:] for case in BAD_EMBEDDINGS],
    ids=[case[0] for case in BAD_EMBEDDINGS],
)
def test_bad_embeddings_requests_are_rejected_and_free(
    client: TestClient, build: Callable[[], dict[str, Any]], status: int, code: str | None
) -> None:
    _, auth = create_key(client)
    request = build()
    headers = {**auth, **request.pop("headers", {})}
    assert_rejected(
        client, auth, lambda: client.post("/v1/embeddings", headers=headers, **request), status, code
    )


def test_batch_and_image_limits(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_batch=4, max_image_pixels=100, max_image_bytes=2000)
    _, auth = create_key(client)
    assert client.get("/v2/models/clf", headers=auth).json()["max_batch"] == 4
    for send in (
        lambda: client.post(INFER, json=json_body(images(5)), headers=auth),
        lambda: post_binary(client, INFER, auth, binary_request(images(5), ["label"])),
        lambda: client.post(INFER, json=json_body(images(1), shape=[10**12, 1, 28, 28]), headers=auth),
        lambda: client.post(
            "/v1/embeddings",
            json={"model": "enc", "input": [b64(bytes(784))] * 5, "input_type": "tensor"},
            headers=auth,
        ),
    ):
        assert_rejected(client, auth, send, 413, "batch_too_large")
    assert client.post(INFER, json=json_body(images(4)), headers=auth).status_code == 200
    assert used(client, auth) == 4

    # a 28x28 PNG is over a pixel cap of 100
    send = lambda: client.post(  # noqa: E731
        "/v1/embeddings", json={"model": "enc", "input": b64(png(images(1)[0]))}, headers=auth
    )
    error = error_of(assert_rejected(client, auth, send, 413, "image_too_large"))
    assert error["type"] == "invalid_request"
    # an encoded image over max_image_bytes
    big = b64(bytes(3000))
    send = lambda: client.post("/v1/embeddings", json={"model": "enc", "input": big}, headers=auth)  # noqa: E731
    assert_rejected(client, auth, send, 413, "image_too_large")
    # raw tensors are not decoded images: the pixel cap does not apply, the shape does
    tensor = {"model": "enc", "input": b64(bytes(784)), "input_type": "tensor"}
    assert client.post("/v1/embeddings", json=tensor, headers=auth).status_code == 200
    assert used(client, auth) == 5


def test_body_size_cap(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=4096)
    _, auth = create_key(client)
    too_big = json.dumps(json_body(images(2))).encode()
    assert len(too_big) > 4096
    binary = binary_request(images(6))
    assert len(binary["content"]) > 4096
    embedding = json.dumps({"model": "enc", "input": [b64(bytes(784))] * 5, "input_type": "tensor"}).encode()
    assert len(embedding) > 4096
    json_type = {"Content-Type": "application/json"}
    for send in (
        lambda: client.post(INFER, content=too_big, headers={**auth, **json_type}),
        lambda: post_binary(client, INFER, auth, binary),
        lambda: client.post("/v1/embeddings", content=embedding, headers={**auth, **json_type}),
        # no Content-Length: a chunked body is counted as it streams
        lambda: client.post(INFER, content=chunks(too_big), headers={**auth, **json_type}),
        lambda: client.post(INFER, content=chunks(binary["content"]), headers={**auth, **binary["headers"]}),
        lambda: client.post("/v1/embeddings", content=chunks(embedding), headers={**auth, **json_type}),
        # a declared length over the cap is refused before auth
        lambda: client.post(INFER, content=too_big, headers=json_type),
    ):
        response = assert_rejected(client, auth, send, 413, "payload_too_large")
        assert error_of(response)["type"] == "invalid_request"
        assert "x-request-id" in response.headers
    small = json.dumps(json_body(images(1))).encode()
    assert len(small) < 4096
    streamed = client.post(INFER, content=chunks(small), headers={**auth, **json_type})
    assert streamed.status_code == 200, streamed.text
    assert used(client, auth) == 1


# ------------------------------------------------------------------------------ budget and rate limit


def test_budget_exhaustion(client: TestClient) -> None:
    key_id, auth = create_key(client, budget=5)
    for expected in (2, 4):
        response = client.post(INFER, json=json_body(images(2)), headers=auth)
        assert response.status_code == 200
        assert response.headers["x-budget-used"] == str(expected)
        assert response.headers["x-budget-remaining"] == str(5 - expected)
    send = lambda: client.post(INFER, json=json_body(images(2)), headers=auth)  # noqa: E731
    refused = assert_rejected(client, auth, send, 429, "budget_exhausted")
    assert error_of(refused)["type"] == "budget_exhausted"
    assert refused.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.headers
    assert refused.headers["x-budget-used"] == "4" and refused.headers["x-budget-remaining"] == "1"
    send = lambda: client.post(  # noqa: E731
        "/v1/embeddings",
        json={"model": "enc", "input": [b64(bytes(784))] * 2, "input_type": "tensor"},
        headers=auth,
    )
    assert assert_rejected(client, auth, send, 429, "budget_exhausted").headers["x-should-retry"] == "false"
    assert used(client, auth) == 4

    last = post_binary(client, INFER, auth, binary_request(images(1), ["label"]))
    assert last.status_code == 200 and last.headers["x-budget-remaining"] == "0"
    usage = client.get("/v1/usage", headers=auth).json()
    assert (usage["used"], usage["remaining"]) == (5, 0)
    send = lambda: client.post(INFER, json=json_body(images(1)), headers=auth)  # noqa: E731
    assert_rejected(client, auth, send, 429, "budget_exhausted")
    assert [e["event"] for e in audit(client, key_id)] == ["charge"] * 3


def test_rate_limit(client: TestClient) -> None:
    _, auth = create_key(client, rate=1.0, burst=2)
    first = client.post(INFER, json=json_body(images(2)), headers=auth)
    assert first.status_code == 200
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy"):
        assert name.lower() in first.headers
    assert first.headers["ratelimit-limit"] == first.headers["x-ratelimit-limit"] == "2"
    assert first.headers["ratelimit-remaining"] == "0"

    send = lambda: client.post(INFER, json=json_body(images(2)), headers=auth)  # noqa: E731
    limited = assert_rejected(client, auth, send, 429, "rate_limited")
    assert error_of(limited)["type"] == "rate_limited"
    retry_after = limited.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 3
    retry_ms = limited.headers["retry-after-ms"]
    assert retry_ms.isdigit() and 0 < int(retry_ms) <= 2100
    assert int(retry_after) * 1000 >= int(retry_ms)
    for name in (
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
        "RateLimit-Policy",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ):
        assert name.lower() in limited.headers, name
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert limited.headers["x-should-retry"] != "false"

    send = lambda: client.post(INFER, json=json_body(images(3)), headers=auth)  # noqa: E731
    over_burst = assert_rejected(client, auth, send, 413, "batch_over_burst")
    assert error_of(over_burst)["type"] == "invalid_request"
    assert used(client, auth) == 2


def test_tiny_rate_is_refused(client: TestClient) -> None:
    for rate in (1e-300, 1e-4):
        response = client.post("/admin/keys", json={"rate": rate}, headers=admin_headers())
        assert response.status_code == 422
        assert error_of(response)["type"] == "invalid_input"
    assert client.post("/admin/keys", json={"rate": 1e-3}, headers=admin_headers()).status_code == 201


# -------------------------------------------------------------------------------------------- refund


def test_failed_inference_is_refunded(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id, auth = create_key(client, budget=10, rate=100.0, burst=10)
    assert client.post(INFER, json=json_body(images(1)), headers=auth).status_code == 200

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA fell over")

    monkeypatch.setattr(client.app.state.registry.models["clf"], "forward", broken)
    send = lambda: client.post(INFER, json=json_body(images(3)), headers={**auth, "X-Request-ID": "boom"})  # noqa: E731
    response = assert_rejected(client, auth, send, 503, "inference_failed")
    assert "CUDA" not in response.text
    events = audit(client, key_id)
    assert [(e["event"], e["n"]) for e in events] == [("charge", "1"), ("charge", "3"), ("refund", "3")]
    assert events[1]["request_id"] == events[2]["request_id"] == response.headers["x-request-id"]
    assert events[1]["client_request_id"] == "boom"
    stats = client.get("/v2/models/clf/stats", headers=auth).json()["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] == 1 and stats["fail"]["count"] == 1
    assert events[2]["used"] == "1"
    monkeypatch.undo()
    # the refund gave the rate bucket back too: a full burst of 9 more still fits
    assert client.post(INFER, json=json_body(images(9)), headers=auth).status_code == 200
    assert used(client, auth) == 10


# ------------------------------------------------------------------------------------------- openapi


def test_openapi_documents_limits_and_binary(client: TestClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    spec = spec.json()
    description = spec["info"]["description"]
    for word in ("max_batch", "max_body_bytes", "Retry-After", "budget_exhausted", "x-should-retry"):
        assert word in description, word
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    assert set(body["content"]) == {"application/json", "application/octet-stream"}
    assert HEADER_LENGTH in body["description"]
    infer_responses = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert {"401", "403", "404", "413", "422", "429"} <= set(infer_responses)
    assert "/v1/embeddings" in spec["paths"] and "/admin/keys" in spec["paths"]
    # every $ref resolves inside the document (pydantic's "#/$defs/..." would not)
    refs = re.findall(r'"\$ref":\s*"([^"]+)"', json.dumps(spec))
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, ref
            node = node[part]
    infer_schema = body["content"]["application/json"]["schema"]
    assert {"name", "shape", "datatype"} <= set(infer_schema["properties"]["inputs"]["items"]["properties"])
