"""Serving throughput and accounting overhead, measured side by side in one run.

On the same model and the same torch threads:

1. raw in-process forward at batch 256, images/s, of the served model as the server's inference
   thread runs it (uint8 -> [0, 1] -> the serving graph -> softmax; the eager module beside it);
2. the API over HTTP, Triton binary uint8 at batch 256, accounting on, images/s;
3. the same through JSON;
4. accounting on vs off: p50 latency of 1-image requests (binary), and the difference.

The API runs as its own uvicorn process on a free loopback port (embedded Redis, or ``--redis-url``).
Targets (issue): API binary / raw forward >= 0.85; accounting adds <= 1 ms p50 per request.

    .venv/bin/python benchmarks/serve_throughput.py [--store model_store] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from common.wire import infer_request
from experiments.victim_process import victim_process
from server.registry import ServedModel

from harness import MODEL, ROOT, ensure_store, make_keys, raw_forward, served_model


def raw_images_per_s(served: ServedModel, batch: int, repeats: int) -> float:
    """Images/s of ``repeats`` in-process forwards of ``batch`` images, one after another (as
    :func:`api_throughput` counts the API's)."""
    times = raw_forward(served, batch, repeats, warmup=2)
    return batch * len(times) / sum(times)


def api_throughput(url: str, auth: dict[str, str], images: np.ndarray, repeats: int, binary: bool) -> float:
    with httpx.Client(base_url=url, headers=auth, timeout=120) as client:
        path = f"/v2/models/{MODEL}/infer"

        def send() -> None:
            body, headers = infer_request(images, ["probabilities"], binary=binary)
            client.post(path, content=body, headers=headers).raise_for_status()

        for _ in range(2):
            send()
        started = time.perf_counter()
        for _ in range(repeats):
            send()
        return repeats * len(images) / (time.perf_counter() - started)


def p50_latency_ms(url: str, auth: dict[str, str], requests: int) -> float:
    image = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    body, headers = infer_request(image, ["probabilities"])
    times = []
    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        for i in range(requests + 20):
            started = time.perf_counter()
            client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers).raise_for_status()
            if i >= 20:
                times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    store = ensure_store(args.store)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 1, 28, 28), dtype=np.uint8)
    token = secrets.token_urlsafe(32)  # a fresh random token per run: no secret has a default
    env = {"STEALRANGE_TORCH_THREADS": str(args.threads), "STEALRANGE_ADMIN_TOKEN": token}
    raw = raw_images_per_s(served_model(store, "torchscript"), args.batch, args.repeats)
    raw_eager = raw_images_per_s(served_model(store, "eager"), args.batch, args.repeats)
    with victim_process(store, args.redis_url, env=env) as url:
        auth = {"Authorization": f"Bearer {make_keys(url, token, 1)[0]}"}
        binary = api_throughput(url, auth, images, args.repeats, binary=True)
        as_json = api_throughput(url, auth, images, max(3, args.repeats // 4), binary=False)
        on_ms = p50_latency_ms(url, auth, args.latency_requests)
    with victim_process(store, args.redis_url, env={**env, "STEALRANGE_ACCOUNTING_ENABLED": "false"}) as url:
        auth = {"Authorization": f"Bearer {make_keys(url, token, 1)[0]}"}
        off_ms = p50_latency_ms(url, auth, args.latency_requests)

    backend = args.redis_url or "embedded fakeredis"
    print(f"\nserve_throughput: batch {args.batch}, {args.threads} torch threads, Redis: {backend}")
    print(
        f"  raw in-process forward      {raw:9.0f} images/s   (the serving graph, as the server runs it; "
        f"eager module {raw_eager:.0f} images/s)"
    )
    print(
        f"  API binary uint8 (charged)  {binary:9.0f} images/s   ratio to raw {binary / raw:.3f}"
        "  (target >= 0.85)"
    )
    print(f"  API JSON (charged)          {as_json:9.0f} images/s   ratio to raw {as_json / raw:.3f}")
    print(
        f"  p50 latency, 1 image: accounting on {on_ms:.2f} ms, off {off_ms:.2f} ms, "
        f"overhead {on_ms - off_ms:+.2f} ms  (target <= 1 ms)"
    )


if __name__ == "__main__":
    main()
