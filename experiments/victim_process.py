"""Start the victim API as its own process on a free loopback port, and stop it without orphans.

uvicorn runs in a new session (process group), so stopping it reaches its worker processes too:
SIGTERM to the group, then SIGKILL after a grace period. On Linux the kernel also sends it SIGTERM
when its parent dies (``PR_SET_PDEATHSIG``), so not even a SIGKILLed runner leaves it behind. Used
by the range runner, the benchmarks and the tests.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from server.settings import KEEP_ALIVE_S

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1


class VictimStartError(RuntimeError):
    """The victim process exited or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reachable_address(host: str) -> str:
    """The address others reach a server bound to ``host`` at: ``host`` itself, or for the
    wildcard ``0.0.0.0`` this machine's address on its default route (no packet is sent)."""
    if host != "0.0.0.0":
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the parent exits (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@contextmanager
def victim_process(
    model_store: Path,
    redis_url: str | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120.0,
    log_level: str = "warning",
    pid_file: Path | None = None,
    host: str = "127.0.0.1",
) -> Iterator[str]:
    """Serve ``create_app`` with uvicorn on a free port; yields the base URL once ready.

    ``host``: the address it binds (loopback by default; another machine's workers need an address
    they reach, or ``0.0.0.0``: every interface, the URL then naming this machine's address).

    ``pid_file``: where to write ``{"pid", "url"}`` while it runs (removed when it stops), so a
    supervisor (or a test) can check that nothing is left behind."""
    port = free_port(host)
    environment = {**os.environ, "STEALRANGE_MODEL_STORE": str(model_store), **(env or {})}
    if redis_url:
        environment["STEALRANGE_REDIS_URL"] = redis_url
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "server.app:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        log_level,
        "--timeout-keep-alive",
        str(KEEP_ALIVE_S),
    ]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=environment, start_new_session=True, preexec_fn=_die_with_parent
    )
    address = reachable_address(host)
    url = f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
    if pid_file is not None:
        pid_file.write_text(json.dumps({"pid": proc.pid, "url": url}) + "\n")
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise VictimStartError(
                    f"the victim API exited with code {proc.returncode} before it was ready"
                )
            if time.monotonic() > deadline:
                raise VictimStartError(f"the victim API was not ready within {ready_timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        stop_process_group(proc)
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
