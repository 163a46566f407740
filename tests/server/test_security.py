"""What an outside audit of the victim API found (issue 15), each closed and kept closed.

Secrets with no usable default, unpaid CPU kept off the event loop, bodies read only after the key,
configured pipelines served as configured, per-key profiles, client hang-ups, the embedded Redis
kept to one process, the unmetered mode announced, the protocols' error bodies, Triton's model
configuration and statistics, and OpenAI's token counts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.wire import decode_infer_response, infer_request
from defenses.config import DefenseConfig, write_defense_config
from experiments.victim_process import ROOT, free_port
from server import images as server_images
from server import service as server_service
from server.app import create_app
from server.secrets import secrets_key
from server.settings import ServerSettings
from tests.conftest import admin_headers, create_key, error_of, make_settings, run_live_server

ENC_INFER = "/v2/models/enc/infer"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def text_bomb(image: np.ndarray, chunks: int = 8) -> bytes:
    """A valid PNG of ``image`` whose zTXt chunks inflate to 1 MiB each in Pillow."""
    clean = png(image)
    inflating = zlib.compress(b"a" * (1 << 20), 9)
    texts = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + inflating) for i in range(chunks))
    return clean[:33] + texts + clean[33:]  # after the signature (8) and IHDR (25)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed(client: TestClient, headers: dict[str, str], x: np.ndarray) -> np.ndarray:
    body, extra = infer_request(x, ["embedding"], binary=True)
    response = client.post(ENC_INFER, content=body, headers={**headers, **extra})
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    return decode_infer_response(response.content, length)["embedding"]


def used(client: TestClient, headers: dict[str, str]) -> int:
    return client.get("/v1/usage", headers=headers).json()["used"]


# ------------------------------------------------------------------------------------------ secrets


def test_empty_secrets_read_as_unset(monkeypatch: pytest.MonkeyPatch, model_store: Path) -> None:
    monkeypatch.setenv("STEALRANGE_ADMIN_TOKEN", "")
    monkeypatch.setenv("STEALRANGE_SERVER_SECRET", " ")
    monkeypatch.delenv("STEALRANGE_KEY_PEPPER", raising=False)
    settings = ServerSettings(model_store=model_store)
    assert settings.admin_token is None and settings.server_secret is None and settings.key_pepper is None
    monkeypatch.setenv("STEALRANGE_SERVER_SECRET", "too-short")
    with pytest.raises(ValueError, match="at least 16") as info:
        ServerSettings(model_store=model_store)
    assert "too-short" not in str(info.value)  # a refused secret is not echoed into a log


def test_unset_secret_is_random_shared_by_every_worker_and_never_logged(
    model_store: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two apps (two workers, or two replicas) on one Redis draw one secret between them; another
    deployment (another prefix) draws another. Keyed noise then differs between deployments, and no
    constant in the code reproduces it."""
    x = images(4)
    prefix = "tsecret-a"
    caplog.set_level(logging.INFO, logger="stealrange.server")

    def defended(store: Path, prefix: str) -> TestClient:
        settings = ServerSettings(
            model_store=store, redis_url=redis_url, admin_token="t" * 16, redis_prefix=prefix
        )
        return TestClient(create_app(settings))

    store = model_store.parent / "secret-store"
    shutil.copytree(model_store, store, dirs_exist_ok=True)
    write_defense_config(store / "enc", DefenseConfig(default=[{"name": "embedding_noise", "sigma": 0.5}]))
    with defended(store, prefix) as first, defended(store, prefix) as second:
        key_id, headers = (lambda r: (r["record"]["key_id"], {"Authorization": f"Bearer {r['api_key']}"}))(
            first.post("/admin/keys", json={}, headers={"Authorization": "Bearer " + "t" * 16}).json()
        )
        a = embed(first, headers, x)
        b = embed(second, headers, x)  # the other worker authenticates the key and adds the same noise
        np.testing.assert_array_equal(a, b)
        stored = first.app.state.redis
    with defended(store, "tsecret-b") as other:
        created = other.post("/admin/keys", json={}, headers={"Authorization": "Bearer " + "t" * 16}).json()
        c = embed(other, {"Authorization": f"Bearer {created['api_key']}"}, x)
        assert not np.allclose(a - c, 0)
    import redis as redis_sync

    values = redis_sync.Redis.from_url(redis_url).hgetall(secrets_key(prefix))
    assert set(values) == {b"server_secret", b"key_pepper"}
    assert all(len(v) == 64 for v in values.values())  # 32 random bytes, hex
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "generated a random one" in logged
    assert not any(v.decode() in logged for v in values.values())
    assert key_id and stored is not None


def test_configured_secret_wins_and_range_secret_is_random() -> None:
    import inspect

    from experiments import runner

    source = inspect.getsource(runner)
    assert 'f"range-{scenario.name}"' not in source
    assert '"STEALRANGE_SERVER_SECRET": secrets.token_urlsafe(32)' in source


# ------------------------------------------------------------------- unpaid CPU, off the event loop


def test_png_text_chunks_are_dropped_before_pillow() -> None:
    x = images(1)[0]
    bomb = text_bomb(x)
    stripped = server_images.strip_png(bomb)
    assert b"zTXt" not in stripped and len(stripped) < len(bomb) // 4
    image = Image.open(io.BytesIO(stripped))
    assert not getattr(image, "text", {})
    spec = server_images.InputSpec(channels=1, height=28, width=28)
    np.testing.assert_array_equal(server_images.decode_image(bomb, spec, ["PNG"], 1 << 22), x)
    assert server_images.strip_png(b"\xff\xd8 not a png") == b"\xff\xd8 not a png"
    with pytest.raises(server_images.InvalidInputError):
        server_images.strip_png(bomb[:40])  # a chunk that overruns the file


def test_a_bad_image_stops_the_batch_before_any_pixel_is_decoded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, auth = create_key(client)
    loads: list[int] = []
    real_load = server_images._load
    monkeypatch.setattr(server_images, "_load", lambda *a: loads.append(1) or real_load(*a))
    batch = [b64(text_bomb(x)) for x in images(6)] + [b64(b"\x89PNG\r\n\x1a\n garbage")]
    response = client.post("/v1/embeddings", json={"model": "enc", "input": batch}, headers=auth)
    assert response.status_code == 422 and error_of(response)["message"].startswith("input[6]: ")
    assert loads == [] and used(client, auth) == 0
    ok = client.post("/v1/embeddings", json={"model": "enc", "input": batch[:6]}, headers=auth)
    assert ok.status_code == 200 and len(loads) == 6 and used(client, auth) == 6


def thread_spies(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, set[int]], int]:
    """Spies on the CPU steps of a request (decode, parse, encode): the threads each ran on, and the
    event loop's thread."""
    threads: dict[str, set[int]] = {}
    loop_thread: list[int] = []

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            threads.setdefault(name, set()).add(threading.get_ident())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(server_service, "decode_batch", spy("decode", server_service.decode_batch))
    monkeypatch.setattr(server_service, "_parse_infer_body", spy("parse", server_service._parse_infer_body))
    from server.routes import kserve

    monkeypatch.setattr(kserve, "encode_infer_response", spy("encode", kserve.encode_infer_response))

    @client.app.get("/__loop_thread")
    async def loop_thread_id() -> dict[str, int]:
        loop_thread.append(threading.get_ident())
        return {}

    client.get("/__loop_thread")
    return threads, loop_thread[0]


def test_parsing_and_decoding_run_off_the_event_loop(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``inline_cpu_bytes=0`` every CPU step on a request runs in a worker thread."""
    client = make_client(inline_cpu_bytes=0)
    threads, loop = thread_spies(client, monkeypatch)
    _, auth = create_key(client)
    png_batch = [b64(png(x)) for x in images(2)]
    assert (
        client.post("/v1/embeddings", json={"model": "enc", "input": png_batch}, headers=auth).status_code
        == 200
    )
    body, extra = infer_request(images(2), ["embedding"], binary=True)
    assert client.post(ENC_INFER, content=body, headers={**auth, **extra}).status_code == 200
    assert set(threads) == {"decode", "parse", "encode"}
    assert loop not in set().union(*threads.values())


def test_only_small_tensor_work_runs_on_the_loop(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a KServe body (and an answer) of at most ``inline_cpu_bytes`` is parsed (encoded)
    on the loop, where it costs less than a thread hop; a larger one hops; and an encoded image is
    always decoded off the loop, however small its body: a small PNG can be a large image."""
    client = make_client(inline_cpu_bytes=4096)
    threads, loop = thread_spies(client, monkeypatch)
    _, auth = create_key(client)
    small, extra = infer_request(images(1), ["embedding"], binary=True)  # ~0.9 kB in, 256 B out
    assert client.post(ENC_INFER, content=small, headers={**auth, **extra}).status_code == 200
    assert threads["parse"] == {loop} and threads["encode"] == {loop}
    threads.clear()
    large, extra = infer_request(images(8), ["embedding"], binary=True)  # ~6.4 kB in
    assert client.post(ENC_INFER, content=large, headers={**auth, **extra}).status_code == 200
    assert loop not in threads["parse"]
    threads.clear()
    tiny_png = {"model": "enc", "input": b64(png(images(1)[0]))}
    assert client.post("/v1/embeddings", json=tiny_png, headers=auth).status_code == 200
    assert loop not in threads["decode"]


def test_embeddings_body_is_not_read_before_the_key(model_store: Path) -> None:
    """An unauthenticated body is never read (nor parsed): 401 after zero body bytes."""
    app = create_app(make_settings(model_store, None))
    read: list[int] = []
    body = b'{"model": "enc", "input": ["' + b"A" * (1 << 20) + b'"]}'

    async def main() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

        async def receive() -> dict[str, Any]:
            if not chunks:
                return {"type": "http.disconnect"}
            part = chunks.pop(0)
            read.append(len(part))
            return {"type": "http.request", "body": part, "more_body": bool(chunks)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/embeddings",
            "raw_path": b"/v1/embeddings",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "http_version": "1.1",
            "scheme": "http",
            "server": ("test", 80),
            "client": ("127.0.0.1", 1),
            "root_path": "",
        }
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 401
    assert read == []


def test_client_disconnect_mid_upload_is_no_server_error(
    model_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-body: no exception escapes the app (uvicorn would log a 500 with a
    traceback), nothing is charged."""
    app = create_app(make_settings(model_store, None))
    caplog.set_level(logging.INFO)

    async def main() -> tuple[list[dict[str, Any]], int]:
        sent: list[dict[str, Any]] = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                created = (await http.post("/admin/keys", json={}, headers=admin_headers())).json()
            token = f"Bearer {created['api_key']}".encode()
            parts = [
                {"type": "http.request", "body": b'{"inputs": [', "more_body": True},
                {"type": "http.disconnect"},
            ]

            async def receive() -> dict[str, Any]:
                return parts.pop(0) if parts else {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": ENC_INFER,
                "raw_path": ENC_INFER.encode(),
                "query_string": b"",
                "headers": [(b"authorization", token), (b"content-type", b"application/json")],
                "http_version": "1.1",
                "scheme": "http",
                "server": ("test", 80),
                "client": ("127.0.0.1", 1),
                "root_path": "",
            }
            await app(scope, receive, send)  # must not raise
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                usage = await http.get("/v1/usage", headers={"Authorization": token.decode()})
        return sent, usage.json()["used"]

    sent, charged = asyncio.run(main())
    assert sent[0]["status"] == 499 and charged == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_json_count_is_checked_before_the_data_is_converted(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, auth = create_key(client)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted before the element count was checked")

    monkeypatch.setattr(server_service, "tensor_from_json", never)
    body = {"inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    response = client.post(ENC_INFER, json=body, headers=auth)
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_tensor"
    assert "needs 1568 values, got 784" in error_of(response)["message"]


def test_large_json_bodies_are_sent_to_the_binary_extension(make_client: Any) -> None:
    client = make_client(max_json_tensor_bytes=2048)
    _, auth = create_key(client)
    x = images(1)
    body = {
        "inputs": [
            {"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": x.ravel().tolist()}
        ]
    }
    response = client.post(ENC_INFER, json=body, headers=auth)
    assert response.status_code == 413 and "binary tensor extension" in error_of(response)["message"]
    assert used(client, auth) == 0
    payload, extra = infer_request(x, ["embedding"], binary=True)
    assert client.post(ENC_INFER, content=payload, headers={**auth, **extra}).status_code == 200


# -------------------------------------------------------------------------- pipelines and profiles


@pytest.fixture
def profiled_store(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "enc",
        DefenseConfig(
            default=[{"name": "embedding_noise", "sigma": 0.5}],
            tiers={"research": []},
            profiles={"suspect": [{"name": "embedding_rounding", "decimals": 0}]},
        ),
    )
    return store


def test_configured_empty_tier_is_undefended_and_profiles_apply(
    profiled_store: Path, model_store: Path
) -> None:
    x = images(3)
    with TestClient(create_app(make_settings(model_store, None))) as plain:
        _, headers = create_key(plain)
        reference = embed(plain, headers, x)
    with TestClient(create_app(make_settings(profiled_store, None, expose_defense=True))) as client:
        _, research = create_key(client, tier="research")
        np.testing.assert_allclose(embed(client, research, x), reference, atol=1e-6)  # undefended
        _, standard = create_key(client)
        assert not np.allclose(embed(client, standard, x), reference, atol=1e-3)  # the default: noise
        _, suspect = create_key(client, tier="research", defense_profile="suspect")
        np.testing.assert_allclose(embed(client, suspect, x), reference.round(0), atol=1e-6)
        record = client.get("/v1/usage", headers=suspect)
        assert record.status_code == 200
        unknown = client.post("/admin/keys", json={"defense_profile": "lenient"}, headers=admin_headers())
        assert unknown.status_code == 422 and error_of(unknown)["code"] == "unknown_defense_profile"


# --------------------------------------------------------------------- processes and accounting


def test_several_workers_refuse_the_embedded_redis(model_store: Path) -> None:
    """``uvicorn --workers 2`` with no Redis URL: the second worker refuses the embedded Redis and
    uvicorn stops the whole server (each worker would otherwise count budgets on its own)."""
    env = {
        **os.environ,
        "STEALRANGE_MODEL_STORE": str(model_store),
        "STEALRANGE_TORCH_THREADS": "1",
    }
    env.pop("STEALRANGE_REDIS_URL", None)
    command = [sys.executable, "-m", "uvicorn", "server.app:create_app", "--factory", "--workers", "2"]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    # The server stops by itself (uvicorn's parent exits 0 once a worker failed its startup).
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert "another worker of this server already uses the embedded Redis" in done.stderr
    assert "failed to start, stopping the parent process" in done.stderr
    # One worker on the embedded Redis is fine (the live tests run that way).
    with run_live_server(model_store, None, workers=1) as url:
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_unmetered_mode_is_announced(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stealrange.server")
    client = make_client(accounting_enabled=False)
    _, auth = create_key(client, budget=1)
    body, extra = infer_request(images(3), ["embedding"], binary=True)
    response = client.post(ENC_INFER, content=body, headers={**auth, **extra})
    assert response.status_code == 200 and response.headers["x-stealrange-unmetered"] == "true"
    assert any("WITHOUT charging" in r.getMessage() for r in caplog.records)
    metered = make_client()
    _, auth = create_key(metered)
    assert (
        "x-stealrange-unmetered"
        not in metered.post(ENC_INFER, content=body, headers={**auth, **extra}).headers
    )


# -------------------------------------------------------------------------------------- protocols


def test_error_bodies_follow_each_protocol(client: TestClient) -> None:
    _, auth = create_key(client)
    kserve = client.get("/v2/models/nope", headers=auth).json()
    assert kserve == {"error": "model 'nope' not found", "code": "model_not_found", "type": "not_found"}
    openai = client.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=auth).json()
    assert openai == {
        "error": {
            "message": "model 'nope' not found",
            "type": "not_found",
            "param": None,
            "code": "model_not_found",
        }
    }
    invalid = client.post("/v1/embeddings", json={"model": "enc", "input": 3}, headers=auth).json()
    assert invalid["error"]["param"] == "input.str" or invalid["error"]["param"].startswith("input")
    too_big = client.post(ENC_INFER, content=b"x" * 100, headers={**auth, "content-length": str(1 << 30)})
    assert isinstance(too_big.json()["error"], str) and too_big.json()["code"] == "payload_too_large"


def test_triton_model_configuration_and_statistics(client: TestClient) -> None:
    _, auth = create_key(client)
    _, enc_only = create_key(client, models=["enc"])
    config = client.get("/v2/models/enc/config", headers=auth).json()
    assert config["name"] == "enc" and config["max_batch_size"] == 256
    assert config["input"] == [
        {"name": "images", "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW", "dims": [1, 28, 28]}
    ]
    assert config["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "format": None, "dims": [64]}]
    clf = client.get("/v2/models/clf/config", headers=auth).json()
    assert {o["name"] for o in clf["output"]} == {
        "probabilities",
        "label",
        "top_k_indices",
        "top_k_probabilities",
    }

    empty = client.get("/v2/models/enc/stats", headers=auth).json()["model_stats"][0]
    assert empty["inference_count"] == 0 and empty["last_inference"] == 0
    for n in (3, 5):
        embed(client, auth, images(n))
    stats = client.get("/v2/models/enc/stats", headers=auth).json()["model_stats"][0]
    assert stats["name"] == "enc" and stats["inference_count"] == 8 and stats["execution_count"] == 2
    phases = stats["inference_stats"]
    assert phases["success"]["count"] == 2 and phases["fail"]["count"] == 0
    assert all(phases[p]["ns"] > 0 for p in ("success", "compute_infer"))
    assert phases["success"]["ns"] >= phases["compute_infer"]["ns"]
    assert stats["last_inference"] > 1.7e12
    every = client.get("/v2/models/stats", headers=enc_only).json()["model_stats"]
    assert [s["name"] for s in every] == ["enc"]  # only the models this key may query
    assert len(client.get("/v2/models/stats", headers=auth).json()["model_stats"]) == 2
    assert client.get("/v2/models/stats").status_code == 401
    assert "model_configuration" in client.get("/v2").json()["extensions"]


def test_embeddings_usage_counts_images_as_tokens(client: TestClient) -> None:
    _, auth = create_key(client)
    batch = [b64(png(x)) for x in images(3)]
    usage = client.post("/v1/embeddings", json={"model": "enc", "input": batch}, headers=auth).json()["usage"]
    assert usage == {"images": 3, "prompt_tokens": 3, "total_tokens": 3}
