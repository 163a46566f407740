"""What the serving benchmarks share (``serve_latency.py``, ``serve_throughput.py``,
``serving_micro.py``, ``liveness_under_flood.py``): the model they serve, the raw forward they
compare the API against, a real redis-server, API keys and CPU time.

The raw reference is the served model as the server's inference thread runs it
(:meth:`server.registry.ServedModel.forward`: uint8 -> [0, 1] -> the serving graph -> softmax), so a
ratio of the API to it is not flattered by a slower reference; the benchmarks print the eager
module's figure beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from server.registry import ModelRegistry, ServedModel
from server.settings import GraphMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the redis-server harness lives with the tests (tests/redis_servers.py)

from tests.redis_servers import redis_single  # noqa: E402

MODEL = "fmnist-classifier"


def ensure_store(store: Path | None) -> Path:
    """The store if it holds :data:`MODEL`, else a temporary store with an untrained one of its shape
    (a small CNN on 1x28x28: the speed of a forward does not depend on the weights)."""
    if store is not None and (store / MODEL / "card.json").is_file():
        return store
    print(f"(no trained {MODEL} in the store: benchmarking an untrained one of the same architecture)")
    tmp = Path(tempfile.mkdtemp())
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    spec = InputSpec(channels=1, height=28, width=28)
    card = card_for(model, MODEL, "small_cnn", input=spec, classes=list("0123456789"))
    save_checkpoint(model, card, tmp / MODEL)
    return tmp


def served_model(store: Path, graph_mode: GraphMode) -> ServedModel:
    """:data:`MODEL` as the server loads it (``graph_mode`` "torchscript": through its serving graph)."""
    return ModelRegistry.load(store, "cpu", graph_mode).models[MODEL]


def timed(
    run: Callable[[], object],
    repeats: int,
    warmup: int = 20,
    clock: Callable[[], float] = time.perf_counter,
    pause_s: float = 0.0,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` on ``clock`` (wall time by default;
    ``time.thread_time``: the calling thread's CPU), after ``warmup`` untimed ones; with
    ``pause_s``, each call after that long asleep."""
    times = []
    for i in range(repeats + warmup):
        if pause_s:
            time.sleep(pause_s)
        started = clock()
        run()
        if i >= warmup:
            times.append(clock() - started)
    return times


def forward_of(served: ServedModel, batch: int) -> Callable[[], object]:
    """One in-process forward of ``batch`` random uint8 images, as the server's inference thread
    runs it (:meth:`ServedModel.to_model_input`, then :meth:`ServedModel.forward`)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    return lambda: served.forward(served.to_model_input(images))


def raw_forward(served: ServedModel, batch: int, repeats: int, warmup: int = 20) -> list[float]:
    """Seconds of each of ``repeats`` in-process forwards of ``batch`` images (after ``warmup``),
    on the calling thread."""
    return timed(forward_of(served, batch), repeats, warmup)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (Linux ``/proc``; else 0)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def redis_for_api(url: str | None, embedded: bool) -> Iterator[tuple[str | None, int | None]]:
    """The Redis URL the API serves on (``url``; None: the embedded fakeredis, if ``embedded`` or no
    redis-server is installed; else a redis-server started here on a free loopback port) and the
    pid of the redis-server started here, if one was."""
    if url or embedded or shutil.which("redis-server") is None:
        if not (url or embedded):
            print("(no redis-server on PATH: the embedded fakeredis serves)")
        yield url, None
        return
    with tempfile.TemporaryDirectory() as workdir, redis_single(Path(workdir)) as node:
        yield node.url, node.pid


def make_keys(url: str, admin_token: str, count: int) -> list[str]:
    """``count`` new API keys with unlimited budget, through the admin API."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    return [
        httpx.post(f"{url}/admin/keys", json={"budget": -1}, headers=admin)
        .raise_for_status()
        .json()["api_key"]
        for _ in range(count)
    ]
