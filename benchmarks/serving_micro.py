"""The micro-measurements behind docs/serving.md's "where the time went", each side by side in one run.

1. ``hop``: a 1-image forward of the served model, p50, on the calling thread; from a thread pool of
   4 threads (as anyio's ``to_thread`` spreads work); on one long-lived second thread; and on the
   calling thread again after the others ran torch (their OpenMP teams stay alive). With 2 torch
   threads the pool pays for several OpenMP teams on few cores; with 1 there is no team.
2. ``pause``: the forward's own CPU time (thread clock) back to back, after a 2 ms pause (sleeping),
   and on a thread woken from a condition wait after the same pause (as the inference thread is).
3. ``redis``: one charge (the accounting's Lua script) on a real redis-server, p50 wall time back to
   back and after 1 ms / 3 ms idle (the cost of a hand-off after an idle gap on this machine), and
   a plain HGET; then a charge and an HGET on the embedded fakeredis, which runs in the event loop's
   own thread (Redis emulated in Python: each ``redis.call`` of the script is a Python command).

Run in a fresh process (the OpenMP teams of an earlier probe would change a later one):

    .venv/bin/python benchmarks/serving_micro.py [--probe hop|pause|redis] [--threads 2]
        [--serving-graph torchscript|eager]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from server.accounting import Accounting
from server.redis_client import make_redis
from server.registry import ServedModel
from server.settings import ServerSettings

from harness import ROOT, ensure_store, forward_of, redis_for_api, served_model, timed


def p50_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run()``, in ms (after 20 untimed calls)."""
    return statistics.median(timed(run, repeats)) * 1000


def hop(served: ServedModel, threads: int, repeats: int) -> None:
    forward = forward_of(served, 1)
    first = p50_ms(forward, repeats)
    with ThreadPoolExecutor(4) as pool:
        pooled = p50_ms(lambda: pool.submit(forward).result(), repeats)
    result: list[float] = []
    second = threading.Thread(target=lambda: result.append(p50_ms(forward, repeats)))
    second.start()
    second.join()
    again = p50_ms(forward, repeats)
    print(
        f"hop ({threads} torch threads): 1-image forward p50 on the calling thread {first:.2f} ms; "
        f"from a pool of 4 {pooled:.2f} ms; on a second "
        f"thread {result[0]:.2f} ms; on the calling thread again {again:.2f} ms"
    )


def pause(served: ServedModel, threads: int, repeats: int) -> None:
    forward = forward_of(served, 1)

    def cpu_ms(gap_s: float) -> float:
        return statistics.median(timed(forward, repeats, clock=time.thread_time, pause_s=gap_s)) * 1000

    hot, after_pause = cpu_ms(0.0), cpu_ms(0.002)
    cond = threading.Condition()
    woken: list[float] = []
    turn = [0]

    def worker() -> None:
        for i in range(repeats + 20):
            with cond:
                while turn[0] <= i:
                    cond.wait()
            started = time.thread_time()
            forward()
            if i >= 20:
                woken.append(time.thread_time() - started)

    thread = threading.Thread(target=worker)
    thread.start()
    for _ in range(repeats + 20):
        time.sleep(0.002)
        with cond:
            turn[0] += 1
            cond.notify()
    thread.join()
    print(
        f"pause ({threads} torch threads): 1-image forward CPU p50 back to back {hot:.2f} ms; "
        f"after a 2 ms sleep {after_pause:.2f} ms; on a thread woken from a wait after 2 ms "
        f"{statistics.median(woken) * 1000:.2f} ms"
    )


async def charge_and_hget_ms(url: str | None, gaps_s: tuple[float, ...], repeats: int) -> list[float]:
    """p50 ms of a charge (``charge.lua`` through :class:`Accounting`, as the API runs it) after each
    idle gap in ``gaps_s``, then of a plain HGET back to back; on ``url`` (None: the embedded
    fakeredis, with the server's own client)."""
    client = make_redis(ServerSettings(redis_url=url))
    accounting = Accounting(client, "micro")
    await client.hset(accounting.key_hash("k"), mapping={"budget": -1, "used": 0, "rate": 0})

    async def p50(command: Callable[[], Awaitable[object]], gap_s: float) -> float:
        times = []
        for i in range(repeats + 20):
            if gap_s:
                await asyncio.sleep(gap_s)
            started = time.perf_counter()
            await command()
            if i >= 20:
                times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    def charge() -> Awaitable[object]:
        return accounting.charge("k", 1, "m", "probabilities", "r")

    def hget() -> Awaitable[object]:
        return client.hget(accounting.key_hash("k"), "used")

    try:
        return [*[await p50(charge, gap) for gap in gaps_s], await p50(hget, 0.0)]
    finally:
        await client.aclose()


def redis_costs(repeats: int) -> None:
    with redis_for_api(None, False) as (url, _):
        if url is None:
            print("redis: no redis-server installed: skipped")
        else:
            back, one, three, hget = asyncio.run(charge_and_hget_ms(url, (0.0, 0.001, 0.003), repeats))
            print(
                f"redis: a charge p50 back to back {back:.2f} ms; after 1 ms idle {one:.2f} ms; "
                f"after 3 ms idle {three:.2f} ms; an HGET {hget:.2f} ms"
            )
    charge, hget = asyncio.run(charge_and_hget_ms(None, (0.0,), repeats))
    print(f"embedded fakeredis: a charge p50 {charge:.2f} ms; an HGET {hget:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--probe", choices=["hop", "pause", "redis"], action="append")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=300, help="timed repeats of each measurement")
    parser.add_argument("--serving-graph", choices=["torchscript", "eager"], default="torchscript")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probes = args.probe or ["hop", "pause", "redis"]
    if {"hop", "pause"} & set(probes):
        served = served_model(ensure_store(args.store), args.serving_graph)
    for probe in probes:
        if probe == "redis":
            redis_costs(args.repeats)
        else:
            (hop if probe == "hop" else pause)(served, args.threads, args.repeats)


if __name__ == "__main__":
    main()
