"""Charges per second on a Redis Cluster vs a single Redis, measured side by side in one run.

Both backends are started here on free loopback ports: one ``redis-server``, and a cluster of three
``redis-server --cluster-enabled yes`` masters (``tests/redis_servers.py``). Each is driven through
the server's own client (:func:`server.redis_client.make_redis`: a blocking pool on the single
node, the gated cluster client on the cluster) and :class:`server.accounting.Accounting`, so every
charge is one EVALSHA of ``charge.lua`` (budget, GCRA rate limit, audit stream), as the API does.

``--procs`` client processes (uvicorn workers, in effect) each keep ``--concurrency`` charges in
flight for ``--seconds``, round robin over ``--keys`` API keys (their hash tags spread them over
the cluster's slots). Rounds alternate single / cluster so that load from elsewhere on the machine
falls on both alike; the ratio is of the medians. Each round also reads every master's CPU time
(``INFO cpu``): a master near 100 % of a core is the bottleneck (Redis runs commands on one thread),
one well below it means the clients are.

    .venv/bin/python benchmarks/charge_rate.py [--procs 2] [--concurrency 64] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import redis
import redis.cluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the cluster harness lives with the tests (tests/redis_servers.py)

from server.accounting import Accounting  # noqa: E402
from server.redis_client import make_redis  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.redis_servers import redis_cluster, redis_single  # noqa: E402


def settings_for(url: str, cluster: bool, prefix: str) -> ServerSettings:
    return ServerSettings(redis_url=url, redis_cluster=cluster, redis_prefix=prefix)


async def create_keys(url: str, cluster: bool, prefix: str, n: int) -> list[str]:
    """``n`` API keys as the key store writes them: a huge budget and rate (never refused)."""
    redis = make_redis(settings_for(url, cluster, prefix))
    accounting = Accounting(redis, prefix)
    ids = [uuid.uuid4().hex[:16] for _ in range(n)]
    try:
        for key_id in ids:
            fields = {"budget": 10**12, "used": 0, "rate": "1000000.0", "burst": 10**9, "revoked": 0}
            await redis.hset(accounting.key_hash(key_id), mapping=fields)
    finally:
        await redis.aclose()
    return ids


async def drive(
    url: str, cluster: bool, prefix: str, ids: list[str], concurrency: int, start: float, seconds: float
) -> tuple[int, float]:
    """Charges completed by this process in ``[start, start + seconds)`` (wall clock), and the CPU
    seconds the process spent meanwhile (the client's cost: redis-py, asyncio, the accounting)."""
    redis = make_redis(settings_for(url, cluster, prefix))
    accounting = Accounting(redis, prefix)
    counted = 0
    try:
        # Warm: the scripts loaded and the connection pools filled, as in a running server.
        await asyncio.gather(*(accounting.charge(k, 1, "m", "label", "warm") for k in ids[:concurrency]))
        await asyncio.sleep(max(0.0, start - time.time()))
        end = start + seconds
        cpu = time.process_time()

        async def loop(i: int) -> None:
            nonlocal counted
            n = 0
            while time.time() < end:
                result = await accounting.charge(ids[(i + n) % len(ids)], 1, "m", "label", f"r{i}-{n}")
                if not result.ok:
                    raise RuntimeError(f"charge refused: {result.status.name}")
                n += 1
                if time.time() < end:
                    counted += 1

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        cpu = time.process_time() - cpu
    finally:
        await redis.aclose()
    return counted, cpu


def drive_process(*args: object) -> tuple[int, float]:
    return asyncio.run(drive(*args))  # type: ignore[arg-type]


def masters(url: str, cluster: bool) -> list[redis.Redis]:
    """A plain client to each master: the one node, or every master of the cluster."""
    if not cluster:
        return [redis.Redis.from_url(url)]
    with redis.cluster.RedisCluster.from_url(url) as client:
        return [redis.Redis(host=n.host, port=n.port) for n in client.get_primaries()]


def cpu_seconds(nodes: list[redis.Redis]) -> list[float]:
    """CPU seconds (user + sys) each redis-server has used so far (``INFO cpu``)."""
    return [float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in (n.info("cpu") for n in nodes)]


def measure(
    pool: ProcessPoolExecutor,
    url: str,
    cluster: bool,
    ids: list[str],
    prefix: str,
    args: argparse.Namespace,
    nodes: list[redis.Redis],
) -> tuple[float, list[float], float]:
    """Charges per second of ``--procs`` processes together over one round, each master's CPU use
    over the same window (fraction of one core: Redis runs commands on one thread), and the
    clients' CPU microseconds per charge."""
    start = time.time() + 2.0  # time for every process to start, connect and warm up
    jobs = [
        pool.submit(drive_process, url, cluster, prefix, ids, args.concurrency, start, args.seconds)
        for _ in range(args.procs)
    ]
    time.sleep(max(0.0, start - time.time()))
    before = cpu_seconds(nodes)
    time.sleep(max(0.0, start + args.seconds - time.time()))
    busy = [(b - a) / args.seconds for a, b in zip(before, cpu_seconds(nodes), strict=True)]
    done = [job.result() for job in jobs]
    charges = sum(n for n, _ in done)
    return charges / args.seconds, busy, sum(c for _, c in done) / charges * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes (like uvicorn workers)")
    parser.add_argument("--concurrency", type=int, default=64, help="charges in flight per process")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend, alternating")
    parser.add_argument("--keys", type=int, default=256, help="API keys charged round robin")
    args = parser.parse_args()

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        single = stack.enter_context(redis_single(root / "single")).url
        cluster = stack.enter_context(redis_cluster(root / "cluster"))
        backends = {"single node": (single, False), "cluster (3 masters)": (cluster, True)}
        ids = {
            name: asyncio.run(create_keys(url, c, prefix, args.keys)) for name, (url, c) in backends.items()
        }
        pool = stack.enter_context(
            ProcessPoolExecutor(max_workers=args.procs, mp_context=multiprocessing.get_context("spawn"))
        )
        nodes = {name: masters(url, c) for name, (url, c) in backends.items()}
        rates: dict[str, list[float]] = {name: [] for name in backends}
        cpu_us: dict[str, list[float]] = {name: [] for name in backends}
        client_us: dict[str, list[float]] = {name: [] for name in backends}
        for r in range(args.rounds):
            for name, (url, is_cluster) in backends.items():
                rate, busy, client = measure(pool, url, is_cluster, ids[name], prefix, args, nodes[name])
                rates[name].append(rate)
                cpu_us[name].append(sum(busy) / rate * 1e6)
                client_us[name].append(client)
                shares = ", ".join(f"{b:.0%}" for b in busy)
                print(
                    f"round {r + 1} {name}: {rate:,.0f} charges/s; CPU per charge: client {client:.0f} us, "
                    f"redis-server {cpu_us[name][-1]:.0f} us (busy {shares} of a core)",
                    flush=True,
                )

    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\n{args.procs} processes x {args.concurrency} in flight, {args.keys} keys, "
        f"{args.rounds} rounds of {args.seconds:g} s each, medians:"
    )
    for name, value in medians.items():
        cpu, client = statistics.median(cpu_us[name]), statistics.median(client_us[name])
        print(
            f"  {name}: {value:,.0f} charges/s; CPU per charge: client {client:.0f} us, server {cpu:.0f} us"
        )
    ratio = medians["cluster (3 masters)"] / medians["single node"]
    print(f"  cluster / single node: {ratio:.2f}")


if __name__ == "__main__":
    main()
