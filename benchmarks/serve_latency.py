"""Serving single images fast: per-request latency and dynamic batching, side by side in one run.

On the same model and the same torch threads:

1. the raw in-process forward of 1 image (uint8 -> [0, 1] -> softmax, on the calling thread):
   p50 and p99 latency; and of a batch of 64: images/s;
2. the API over HTTP (binary uint8, 1-image requests, accounting on, keys with unlimited budget),
   with dynamic batching on and then off (``STEALRANGE_BATCHING``), each its own uvicorn process:
   - sequential requests: p50 and p99 latency, and their ratio to the raw 1-image forward;
   - ``--clients`` concurrent clients (64) of 1-image requests over 8 keys: images/s, and its ratio
     to the raw batch-64 forward; the mean batch the server ran (inference_count / execution_count
     of the statistics extension).

Targets (issue 19): p50 <= raw + 1.5 ms; concurrent images/s >= 0.6 x raw batch-64 forward.
Beside the wall-clock figures, the server process's CPU time (user + system, all its threads, from
``/proc``) per request: it does not inflate when other processes load the machine, so it shows
where a change saves work even when the latencies are noisy.
Redis: ``--redis-url``, else a redis-server started here on a free loopback port (the embedded
fakeredis with ``--embedded``). The clients speak HTTP/1.1 over raw asyncio streams (keep-alive,
one prebuilt request), so that on a small machine the load generator takes as little CPU from the
server as it can; every answer's status is checked, and one answer's outputs are decoded.

    .venv/bin/python benchmarks/serve_latency.py [--store model_store] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch

from common.wire import decode_infer_response, infer_request
from experiments.victim_process import victim_process
from server.registry import ServedModel

from harness import (
    MODEL,
    ROOT,
    cpu_seconds,
    ensure_store,
    forward_of,
    make_keys,
    raw_forward,
    redis_for_api,
    served_model,
    timed,
)

KEYS = 8


def gil_probe(store: Path, repeats: int) -> None:
    """A forward on a second thread while this one is idle, then while it runs Python without a
    pause (as a busy event loop does): the eager module waits for the GIL after every op, the
    serving graph does not (:mod:`server.graphs`)."""

    def on_thread(served: ServedModel, batch: int, busy: bool) -> float:
        times: list[float] = []
        forward = forward_of(served, batch)
        warmup = max(2, repeats // 6)
        thread = threading.Thread(target=lambda: times.extend(timed(forward, repeats, warmup)))
        thread.start()
        while thread.is_alive():
            if busy:  # pure Python for 1 ms at a time, as a loop with ready callbacks
                until = time.perf_counter() + 0.001
                while time.perf_counter() < until:
                    pass
            else:
                time.sleep(0.01)
        return statistics.median(times) * 1000

    print(
        "\ngil probe: median ms of a forward on a second thread "
        f"(switch interval {sys.getswitchinterval()} s)"
    )
    for mode in ("eager", "torchscript"):
        served = served_model(store, mode)
        cells = [
            f"{batch:>2d} images: idle {on_thread(served, batch, False):7.2f}, "
            f"busy {on_thread(served, batch, True):7.2f}"
            for batch in (1, 32)
        ]
        print(f"  {mode:<11s} " + "   ".join(cells))


class Connection:
    """One keep-alive HTTP/1.1 connection sending one prebuilt request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
        }
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def http_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The raw bytes of a POST of ``body`` to ``path``."""
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def sequential(url: str, request: bytes, count: int) -> list[float]:
    """Seconds of each of ``count`` requests sent one after another (after a warm-up)."""
    conn = await Connection.open(url)
    times = []
    try:
        for i in range(count + 50):
            started = time.perf_counter()
            status, _, body = await conn.send(request)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            if i >= 50:
                times.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return times


async def concurrent(url: str, requests: list[bytes], clients: int, per_client: int) -> float:
    """Images/s of ``clients`` connections each sending ``per_client`` 1-image requests back to back."""
    conns = [await Connection.open(url) for _ in range(clients)]

    async def client(i: int, count: int) -> None:
        for _ in range(count):
            status, _, body = await conns[i].send(requests[i % len(requests)])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")

    try:
        await asyncio.gather(*(client(i, 5) for i in range(clients)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(i, per_client) for i in range(clients)))
        return clients * per_client / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


def api_requests(url: str, token: str) -> tuple[list[bytes], str]:
    """One prebuilt 1-image request per key (``KEYS`` unlimited keys), checked once; and a key."""
    keys = make_keys(url, token, KEYS)
    image = np.random.default_rng(1).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    body, wire = infer_request(image, ["probabilities"], binary=True)
    path = f"/v2/models/{MODEL}/infer"
    requests = [http_request(url, path, body, {**wire, "authorization": f"Bearer {k}"}) for k in keys]
    check = httpx.post(url + path, content=body, headers={**wire, "Authorization": f"Bearer {keys[0]}"})
    check.raise_for_status()
    values = decode_infer_response(check.content, check.headers.get("inference-header-content-length"))
    assert values["probabilities"].shape == (1, 10)
    return requests, keys[0]


def measure_round(
    url: str,
    pid: int,
    redis_pid: int | None,
    requests: list[bytes],
    key: str,
    served: ServedModel,
    args: argparse.Namespace,
) -> dict[str, float]:
    """One round, side by side: the raw forwards (1 image, batch ``clients``), then the API's
    sequential latency and concurrent throughput, with the CPU each process spent per request."""
    raw_one = raw_forward(served, 1, args.raw_repeats)
    raw_batch = args.clients / statistics.median(raw_forward(served, args.clients, 15))
    cpu_started = cpu_seconds(pid)
    latency = asyncio.run(sequential(url, requests[0], args.requests))
    cpu_sequential = (cpu_seconds(pid) - cpu_started) / (args.requests + 50)
    before = stats_counts(url, key)
    cpu_started = cpu_seconds(pid)
    client_started = time.process_time()
    redis_started = cpu_seconds(redis_pid) if redis_pid else 0.0
    throughput = asyncio.run(concurrent(url, requests, args.clients, args.per_client))
    count = args.clients * (args.per_client + 5)
    after = stats_counts(url, key)
    raw_p50 = statistics.median(raw_one) * 1000
    return {
        "raw_p50": raw_p50,
        "raw_p99": float(np.percentile(raw_one, 99)) * 1000,
        "raw_batch": raw_batch,
        "p50": statistics.median(latency) * 1000,
        "p99": float(np.percentile(latency, 99)) * 1000,
        "overhead_ms": statistics.median(latency) * 1000 - raw_p50,
        "throughput": throughput,
        "ratio": throughput / raw_batch,
        "mean_batch": (after[0] - before[0]) / max(1, after[1] - before[1]),
        "cpu_sequential_ms": cpu_sequential * 1000,
        "cpu_concurrent_ms": (cpu_seconds(pid) - cpu_started) / count * 1000,
        "cpu_client_ms": (time.process_time() - client_started) / count * 1000,
        "cpu_redis_ms": ((cpu_seconds(redis_pid) - redis_started) / count * 1000) if redis_pid else 0.0,
    }


def stats_counts(url: str, key: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model, from Triton's statistics extension."""
    entry = httpx.get(f"{url}/v2/models/{MODEL}/stats", headers={"Authorization": f"Bearer {key}"})
    stats = entry.raise_for_status().json()["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--embedded", action="store_true", help="serve on the embedded fakeredis")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--requests", type=int, default=300, help="sequential 1-image requests")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=10, help="requests of each concurrent client")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of raw forwards then the API")
    parser.add_argument("--raw-repeats", type=int, default=300, help="raw 1-image forwards per round")
    parser.add_argument(
        "--serving-graph", choices=["torchscript", "eager"], default="torchscript", help="as the server's"
    )
    parser.add_argument(
        "--gil-probe", action="store_true", help="only: forwards on a thread beside an idle or busy one"
    )
    parser.add_argument("--gil-repeats", type=int, default=60, help="timed forwards per GIL-probe cell")
    parser.add_argument("--queue-delay-us", type=int, default=0, help="STEALRANGE_BATCH_QUEUE_DELAY_US")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="more server settings"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    store = ensure_store(args.store)
    if args.gil_probe:
        gil_probe(store, args.gil_repeats)
        return
    served = served_model(store, args.serving_graph)
    eager_p50 = statistics.median(raw_forward(served_model(store, "eager"), 1, args.raw_repeats)) * 1000
    token = secrets.token_urlsafe(32)  # a fresh random token per run: no secret has a default
    env = {
        "STEALRANGE_TORCH_THREADS": str(args.threads),
        "STEALRANGE_ADMIN_TOKEN": token,
        "STEALRANGE_BATCH_QUEUE_DELAY_US": str(args.queue_delay_us),
        "STEALRANGE_SERVING_GRAPH": args.serving_graph,
        **dict(item.split("=", 1) for item in args.server_env),
    }
    results: dict[bool, list[dict[str, float]]] = {}
    with redis_for_api(args.redis_url, args.embedded) as (redis_url, redis_pid):
        for batching in (True, False):
            server_env = {**env, "STEALRANGE_BATCHING": str(batching).lower()}
            pid_file = Path(tempfile.mkdtemp()) / "victim.json"
            with victim_process(store, redis_url, env=server_env, pid_file=pid_file) as url:
                pid = int(json.loads(pid_file.read_text())["pid"])
                requests, key = api_requests(url, token)
                results[batching] = [
                    measure_round(url, pid, redis_pid, requests, key, served, args)
                    for _ in range(args.rounds)
                ]

    backend = args.redis_url or ("embedded fakeredis" if args.embedded else "redis-server started here")
    print(
        f"\nserve_latency: 1-image requests, {args.threads} torch threads, Redis: {backend}, "
        f"queue delay {args.queue_delay_us} us, serving graph {args.serving_graph}; "
        f"{args.rounds} rounds, each the raw forwards then the API: median [min, max] over rounds"
    )

    def spread(rounds: list[dict[str, float]], name: str, fmt: str) -> str:
        values = [r[name] for r in rounds]
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"

    every = [r for rounds in results.values() for r in rounds]
    print(
        f"  raw in-process forward, 1 image    p50 {spread(every, 'raw_p50', '.2f')} ms   "
        f"p99 {spread(every, 'raw_p99', '.2f')} ms   (eager module p50 {eager_p50:.2f} ms)"
    )
    print(f"  raw in-process forward, batch {args.clients:<4d} {spread(every, 'raw_batch', '.0f')} images/s")
    for batching, rounds in results.items():
        name = "on " if batching else "off"
        print(
            f"  API, batching {name}: p50 {spread(rounds, 'p50', '.2f')} ms = raw + "
            f"{spread(rounds, 'overhead_ms', '.2f')} ms (target raw + 1.5 ms)   "
            f"p99 {spread(rounds, 'p99', '.2f')} ms"
        )
        print(
            f"      {args.clients} concurrent clients: {spread(rounds, 'throughput', '.0f')} images/s, "
            f"ratio to raw batch {args.clients} {spread(rounds, 'ratio', '.3f')} (target >= 0.6), "
            f"mean batch {spread(rounds, 'mean_batch', '.1f')}"
        )
        print(
            f"      CPU per request: server sequential {spread(rounds, 'cpu_sequential_ms', '.2f')} ms, "
            f"concurrent {spread(rounds, 'cpu_concurrent_ms', '.2f')} ms; "
            f"clients {spread(rounds, 'cpu_client_ms', '.2f')} ms, "
            f"redis-server {spread(rounds, 'cpu_redis_ms', '.2f')} ms"
        )


if __name__ == "__main__":
    main()
