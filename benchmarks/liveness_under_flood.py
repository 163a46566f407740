"""Liveness of the API while it is flooded with requests it refuses, measured phase by phase in one run.

One uvicorn worker (one torch thread) on a tiny untrained store (``clf``, ``enc`` on 1x28x28) and a
real redis-server, both on free loopback ports. A probe (its own process, so that the load
generator's GIL does not count) GETs ``/v2/health/live`` every 20 ms through each phase:

1. idle: nothing but the probe;
2. decoding flood: ``--clients`` keyed clients POST ``/v1/embeddings`` with ``--batch`` PNGs that
   each carry 64 zTXt chunks inflating to 1 MiB apiece (64 MiB of text per image, Pillow's cap),
   then one invalid image, so every request is a 422 and charges nothing;
3. unauthenticated body flood: clients POST 15 MiB JSON bodies to ``/v1/embeddings`` with no key
   (401);
4. honest: keyed requests of ``--batch`` clean PNGs (200), for comparison.

Per phase: requests sent, status codes, mean answer time, the probe's p50 / p99 / max and count,
the ratio of p99 to the idle p99, and how much the key's ``used`` (``GET /v1/usage``) rose (it
should rise in the honest phase only). Target: liveness p99 < 100 ms in every flood phase.

    .venv/bin/python benchmarks/liveness_under_flood.py [--seconds 10] [--clients 4] [--batch 64] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import secrets
import statistics
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.victim_process import victim_process

from harness import redis_single

PROBE_PERIOD = 0.020
PROBE_TIMEOUT = 10.0
TARGET_MS = 100.0
TEXT_CHUNKS = 64  # 64 x 1 MiB: Pillow's cap on the text it inflates per image
UNAUTH_BODY_BYTES = 15 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ fixtures


def build_store(root: Path) -> Path:
    """Two untrained 1x28x28 small CNNs, as the tests' ``model_store``: ``clf`` and ``enc``."""
    spec = InputSpec(channels=1, height=28, width=28)
    torch.manual_seed(0)
    clf = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    save_checkpoint(
        clf, card_for(clf, "clf", "small_cnn", input=spec, classes=[str(i) for i in range(10)]), root / "clf"
    )
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=spec), root / "enc")
    return root


# ------------------------------------------------------------------------------------------ payloads


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def clean_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def text_bomb_png(pixels: np.ndarray) -> bytes:
    """A valid 28x28 grey PNG with :data:`TEXT_CHUNKS` zTXt chunks, each inflating to 1 MiB."""
    height, width = pixels.shape
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    text = zlib.compress(b"a" * (1 << 20), 9)
    ztxt = b"".join(chunk(b"zTXt", b"k%d\0" % i + b"\0" + text) for i in range(TEXT_CHUNKS))
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    idat = chunk(b"IDAT", zlib.compress(rows, 9))
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + ztxt + idat + chunk(b"IEND", b"")


def embeddings_body(images: list[bytes]) -> bytes:
    items = [base64.b64encode(image).decode() for image in images]
    return json.dumps({"model": "enc", "input": items}).encode()


def unauth_body(size: int) -> bytes:
    """A well-formed embeddings body of exactly ``size`` bytes (one long base64 string)."""
    head, tail = b'{"model": "enc", "input": ["', b'"]}'
    return head + b"A" * (size - len(head) - len(tail)) + tail


# ------------------------------------------------------------------------------------------ probe


def probe(url: str, seconds: float, conn: Connection) -> None:
    """In its own process: GET /v2/health/live every 20 ms for ``seconds``; sends latencies (s)
    and the count of failed probes (a failure counts as the time it took) through ``conn``."""
    latencies: list[float] = []
    failures = 0
    with httpx.Client(base_url=url, timeout=PROBE_TIMEOUT, trust_env=False) as client:
        client.get("/v2/health/live")  # connect outside the measurement
        conn.send("ready")
        start = time.perf_counter()
        tick = start
        while tick < start + seconds:
            now = time.perf_counter()
            if now < tick:
                time.sleep(tick - now)
            sent = time.perf_counter()
            try:
                ok = client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - sent)
            failures += not ok
            tick += PROBE_PERIOD
    conn.send((latencies, failures))
    conn.close()


# ------------------------------------------------------------------------------------------ load


@dataclass
class Load:
    """What the load clients of one phase saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: str, elapsed: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.times.append(elapsed)


def load_client(
    url: str, body: bytes | None, headers: dict[str, str], deadline: float, max_requests: int, load: Load
) -> None:
    """POST ``body`` to /v1/embeddings until ``deadline`` or ``max_requests`` requests."""
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        for _ in range(max_requests):
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            try:
                status = str(
                    client.post(
                        "/v1/embeddings",
                        content=body,
                        headers={"Content-Type": "application/json", **headers},
                    ).status_code
                )
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            load.record(status, time.perf_counter() - started)


@dataclass
class PhaseResult:
    name: str
    load: Load
    latencies: list[float]
    failures: int
    used_delta: int
    flood: bool


def run_phase(
    name: str,
    url: str,
    seconds: float,
    clients: int,
    body: bytes | None,
    headers: dict[str, str],
    key_auth: dict[str, str],
    max_requests: int,
    flood: bool,
) -> PhaseResult:
    used_before = usage(url, key_auth)
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    prober = multiprocessing.get_context("fork").Process(target=probe, args=(url, seconds, sender))
    prober.start()
    if not receiver.poll(30):
        prober.kill()
        raise SystemExit("the liveness probe did not start")
    receiver.recv()
    load = Load()
    deadline = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=load_client, args=(url, body, headers, deadline, max_requests, load))
        for _ in range(clients if body is not None else 0)
    ]
    for thread in threads:
        thread.start()
    latencies, failures = receiver.recv()
    prober.join()
    for thread in threads:
        thread.join()
    time.sleep(0.5)  # let the server settle before the next phase
    return PhaseResult(name, load, latencies, failures, usage(url, key_auth) - used_before, flood)


def usage(url: str, auth: dict[str, str]) -> int:
    response = httpx.get(f"{url}/v1/usage", headers=auth, timeout=30, trust_env=False)
    response.raise_for_status()
    return int(response.json()["used"])


# ------------------------------------------------------------------------------------------ report


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def report(results: list[PhaseResult], args: argparse.Namespace) -> None:
    idle_p99 = ms(results[0].latencies, 99)
    print(
        f"\nliveness_under_flood: {args.seconds:g} s phases, {args.clients} clients, batch {args.batch}, "
        f"1 worker, 1 torch thread, real Redis; probe GET /v2/health/live every 20 ms"
    )
    header = (
        f"  {'phase':<16} {'sent':>5}  {'statuses':<22} {'answer ms':>9}  {'probes':>6} {'fail':>4} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'p99/idle':>8} {'used +':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in results:
        statuses = ", ".join(f"{code} x{n}" for code, n in sorted(r.load.statuses.items())) or "-"
        answer = f"{statistics.fmean(r.load.times) * 1000:9.1f}" if r.load.times else f"{'-':>9}"
        p99 = ms(r.latencies, 99)
        print(
            f"  {r.name:<16} {sum(r.load.statuses.values()):>5}  {statuses:<22} {answer}  "
            f"{len(r.latencies):>6} {r.failures:>4} {ms(r.latencies, 50):7.2f} {p99:7.2f} "
            f"{ms(r.latencies, 100):7.2f} {p99 / idle_p99:8.1f} {r.used_delta:>7}"
        )
    charged = [r.name for r in results if r.used_delta]
    honest_only = charged == ["honest"]
    print(
        f"  key usage rose in: {', '.join(charged) or 'no phase'}  ({'ok' if honest_only else 'UNEXPECTED'})"
    )
    floods = [r for r in results if r.flood]
    worst = max(floods, key=lambda r: ms(r.latencies, 99))
    under = all(ms(r.latencies, 99) < TARGET_MS and not r.failures for r in floods)
    print(
        f"  liveness p99 under {TARGET_MS:.0f} ms in every flood phase: {'yes' if under else 'NO'} "
        f"(worst: {worst.name}, p99 {ms(worst.latencies, 99):.2f} ms, {worst.failures} failed probes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=4, help="concurrent load clients per phase")
    parser.add_argument("--batch", type=int, default=64, help="images per embeddings request")
    parser.add_argument(
        "--max-requests", type=int, default=500, help="requests per client per phase, at most"
    )
    parser.add_argument("--quick", action="store_true", help="3 s phases, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3.0

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.batch, 28, 28), dtype=np.uint8)
    bombs = [text_bomb_png(p) for p in pixels]
    decoding_body = embeddings_body([*bombs, b"this is not an image"])
    honest_body = embeddings_body([clean_png(p) for p in pixels])
    flood_body = unauth_body(UNAUTH_BODY_BYTES)
    print(
        f"bodies: decoding flood {len(decoding_body) / 2**20:.1f} MiB ({len(bombs[0]) / 1024:.0f} KiB "
        f"per PNG, {TEXT_CHUNKS} MiB of text each), unauthenticated {len(flood_body) / 2**20:.1f} MiB, "
        f"honest {len(honest_body) / 2**20:.2f} MiB"
    )

    admin_token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="liveness-flood-") as tmp:
        root = Path(tmp)
        store = build_store(root / "store")
        (root / "redis").mkdir()
        env = {
            "STEALRANGE_ADMIN_TOKEN": admin_token,
            "STEALRANGE_TORCH_THREADS": "1",
            # set, so that the server does not warn that it generated them
            "STEALRANGE_KEY_PEPPER": secrets.token_hex(16),
            "STEALRANGE_SERVER_SECRET": secrets.token_hex(16),
        }
        with (
            redis_single(root / "redis") as redis_node,
            victim_process(store, redis_node.url, workers=1, env=env) as url,
        ):
            created = httpx.post(
                f"{url}/admin/keys",
                json={"name": "liveness-bench", "budget": 1_000_000_000},
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=30,
                trust_env=False,
            )
            created.raise_for_status()
            key_auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
            phase = partial(
                run_phase,
                url=url,
                seconds=args.seconds,
                clients=args.clients,
                key_auth=key_auth,
                max_requests=args.max_requests,
            )
            results = [
                phase("idle", body=None, headers={}, flood=False),
                phase("decoding flood", body=decoding_body, headers=key_auth, flood=True),
                phase("unauth flood", body=flood_body, headers={}, flood=True),
                phase("honest", body=honest_body, headers=key_auth, flood=False),
            ]
    report(results, args)


if __name__ == "__main__":
    main()
