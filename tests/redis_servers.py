"""Real redis-servers for tests and benchmarks, on free loopback ports, torn down after: one node
(:func:`redis_single`), or a Redis Cluster of three ``redis-server --cluster-enabled yes`` masters
joined with ``redis-cli --cluster create`` (:func:`redis_cluster`, about a second).

Nothing is persisted (``--save ''``, no AOF); each node's ``nodes.conf`` lives in its own folder of
``workdir``. Each node gets a free client port and a free cluster-bus port (``--cluster-port``, Redis
7+), so it never collides with anything else on the machine. :func:`redis_cluster` yields the URL
of one node (``redis://127.0.0.1:<port>/0``); a cluster client discovers the others from it.
:func:`redis_single` yields a :class:`RedisNode` (its URL and pid).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import redis

from experiments.victim_process import free_port

BINARIES = ("redis-server", "redis-cli")


class RedisStartError(RuntimeError):
    """A redis-server did not start, or a cluster did not reach ``cluster_state:ok`` in time."""


class RedisNode(NamedTuple):
    """One running redis-server: its loopback port and its pid (benchmarks read its CPU time)."""

    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def missing_binaries() -> list[str]:
    """Which of redis-server and redis-cli are not on PATH (``scripts/install.sh`` installs both)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _wait_ping(client: redis.Redis, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise RedisStartError(f"redis-server exited with code {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RedisStartError("redis-server did not answer PING in time") from None
            time.sleep(0.02)


@contextmanager
def _node(workdir: Path, cluster: bool, timeout: float) -> Iterator[RedisNode]:
    """One redis-server on a free loopback port (cluster mode or not)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        shutil.which("redis-server") or "redis-server",
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    if cluster:
        command += [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000",
        ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port) as client:
            _wait_ping(client, proc, timeout)
        yield RedisNode(port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_single(workdir: Path, timeout: float = 10.0) -> Iterator[RedisNode]:
    """A single-node redis-server on a free loopback port (no persistence)."""
    if shutil.which("redis-server") is None:
        raise RedisStartError("not installed: redis-server (scripts/install.sh installs it)")
    with _node(workdir, cluster=False, timeout=timeout) as node:
        yield node


@contextmanager
def redis_cluster(workdir: Path, masters: int = 3, timeout: float = 30.0) -> Iterator[str]:
    """A cluster of ``masters`` masters (no replicas) on loopback; yields the URL of its first node.

    Returns once every node reports ``cluster_state:ok`` and knows every master, so the first
    command of a cluster client never meets a half-formed cluster."""
    if masters < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 masters")
    missing = missing_binaries()
    if missing:
        raise RedisStartError(f"not installed: {', '.join(missing)} (scripts/install.sh installs them)")
    with ExitStack() as stack:
        ports = [stack.enter_context(_node(workdir / f"node{i}", True, timeout)).port for i in range(masters)]
        create = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
        create += [f"127.0.0.1:{p}" for p in ports] + ["--cluster-replicas", "0", "--cluster-yes"]
        created = subprocess.run(
            create,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if created.returncode != 0:
            raise RedisStartError(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        _wait_formed(ports, timeout)
        yield f"redis://127.0.0.1:{ports[0]}/0"


def _wait_formed(ports: list[int], timeout: float) -> None:
    """Until every node says ``cluster_state:ok`` and counts every master (gossip done)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        with redis.Redis(port=port, decode_responses=True) as client:
            while True:
                info = client.cluster("INFO")
                if isinstance(info, str):  # older redis-py returns the raw text
                    info = dict(line.split(":", 1) for line in info.split() if ":" in line)
                state, known = str(info.get("cluster_state")), int(info.get("cluster_known_nodes", 0))
                if state == "ok" and known == len(ports):
                    break
                if time.monotonic() > deadline:
                    raise RedisStartError(f"node {port}: cluster_state={state}, known nodes={known}")
                time.sleep(0.05)
