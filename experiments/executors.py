"""Where the range's cells run: one after another in this process (:class:`LocalExecutor`, the
default) or as Ray tasks on a Ray cluster (:class:`RayExecutor`, ``stealrange run --executor ray``).

The runner (the driver) keeps the admin side of every cell: it creates the cell's API key, and once
the attack is done it reads the key's usage, flags and audit stream and writes the cell's line to
``results.jsonl``. An executor runs only the attacker side, :func:`attack_cell`: a :class:`CellJob`
(the cell, its :class:`~attacker_client.runs.StealingRunConfig` with the victim's URL and the cell's
API key, never the admin token) in, a :class:`CellOutcome` (the family's typed result, or the
error) out. Every executor hands outcomes to the driver in the order of the cells it was given, so
``results.jsonl`` has the same order whichever executor ran it, and a resumed run skips what is in
it.

Ray (an optional extra: ``pip install 'stealrange[ray]'``): each cell is one task asking for
``cpus_per_cell`` CPUs and, where the cluster has GPUs, one GPU (``gpus_per_cell``); its worker runs
torch with ``cpus_per_cell`` threads. The victim API is started once per run by the driver; its URL
must be reachable from every node (loopback on one machine; ``--victim-host`` on a cluster), and the
run folder (each cell's query cache, the run's reference scores), the model store and the data root
must be at the same absolute path on every node (shared storage). Ctrl-C cancels the tasks still
running, keeps the cells that finished, and leaves the victim API's clean-up to the runner.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from attacker_client.errors import VictimAPIError
from attacker_client.runs import RunResult, StealingRunConfig
from experiments.scenario import Cell

EXECUTORS = ("local", "ray")
"""The executors ``stealrange run --executor`` knows."""


class ExecutorError(ValueError):
    """An executor that cannot run here (Ray not installed, a cell no node can hold, ...)."""


@dataclass(frozen=True)
class CellJob:
    """The attacker side of one cell: what a worker needs to run it, and nothing of the admin's.

    ``key_id`` names the cell's API key for the driver (usage and audit after the cell); the worker
    holds only the key itself, in ``config``."""

    cell: Cell
    config: StealingRunConfig
    evaluation: BaseModel
    key_id: str

    def on_shared_paths(self) -> CellJob:
        """The same job with every path absolute, as the driver sees it: a worker on another node
        (or in another working directory) finds them at the same place on shared storage."""
        config = self.config
        absolute = {
            name: Path(value).absolute()
            for name in ("out", "victim_checkpoint", "data_root", "reference_cache", "victim_store")
            if (value := getattr(config, name)) is not None
        }
        return replace(self, config=config.model_copy(update=absolute))


@dataclass(frozen=True)
class CellOutcome:
    """What the attacker side of a cell came to: the family's typed result (status ``ok``), or the
    error (``failed``; ``error_code`` is the victim API's code when the API refused); ``seconds``
    is the attack's wall time on its worker."""

    status: Literal["ok", "failed"]
    seconds: float
    result: RunResult | None = None
    error: str | None = None
    error_code: str | None = None


def attack_cell(job: CellJob) -> CellOutcome:
    """Run the cell's attack through its family; never raises for the cell's own failure: the
    error is returned, and its traceback written to ``<out>/error.txt``."""
    started = time.perf_counter()
    try:
        result = job.cell.attack.family.run(job.config, job.evaluation)
    except Exception as exc:  # recorded; the run goes on
        out = Path(job.config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        code = getattr(exc, "code", None) if isinstance(exc, VictimAPIError) else None
        return CellOutcome(
            status="failed",
            seconds=time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}",
            error_code=code,
        )
    return CellOutcome(status="ok", seconds=time.perf_counter() - started, result=result)


Start = Callable[[Cell], CellJob]
"""The driver's side before a cell: create its key, return its job."""
Finish = Callable[[CellJob, CellOutcome], None]
"""The driver's side after a cell: read its key's usage and audit, write its results line."""


class Executor(Protocol):
    """Runs the attacker side of a run's cells.

    ``run`` calls ``start`` for a cell before its attack runs, and ``finish`` once per cell whose
    attack ran to an outcome, in the order of ``cells``, each as soon as it and every cell before it
    are done. On an interruption (``KeyboardInterrupt``) it stops the attacks still running, calls
    ``finish`` for those that had finished (still in order), and re-raises."""

    name: str

    def run(self, cells: Sequence[Cell], start: Start, finish: Finish) -> None: ...


class LocalExecutor:
    """Today's range: the cells one after another, in this process.

    ``threads``: torch's intra-op threads during the run (``None``: torch's default, one per core).
    A cell's numbers depend on it at float rounding (a reduction split over 2 threads sums in
    another order than over 1), so the same ``threads`` here and ``cpus_per_cell`` on Ray give the
    same numbers to the last bit."""

    name = "local"

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise ExecutorError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    def run(self, cells: Sequence[Cell], start: Start, finish: Finish) -> None:
        """Start, attack and finish each cell in turn (torch's thread count restored after)."""
        import torch

        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            for cell in cells:
                job = start(cell)
                finish(job, attack_cell(job))
        finally:
            torch.set_num_threads(before)


def import_ray() -> ModuleType:
    """The ``ray`` module, or an :class:`ExecutorError` that says how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ExecutorError(
            "--executor ray needs Ray: pip install 'stealrange[ray]' (or scripts/install.sh --dev)"
        ) from None


def attack_on_worker(job: CellJob, threads: int) -> CellOutcome:
    """A Ray task's body: :func:`attack_cell` with torch limited to the task's CPUs (a worker
    must not start one thread per core of a node that runs several cells at once)."""
    import torch

    torch.set_num_threads(threads)
    return attack_cell(job)


class RayExecutor:
    """The cells as Ray tasks, one per cell.

    ``address``: a running cluster's address (``HEAD_IP:6379``, as ``ray start --head`` prints it),
    ``"local"`` for a new local instance, or ``None``: Ray's own resolution
    (``$RAY_ADDRESS``, else the cluster last started on this machine, else a new local instance).
    ``num_cpus`` sizes a new local instance (``None``: every core). ``cpus_per_cell``: CPUs each
    task asks for, and its torch thread count. ``gpus_per_cell``: ``None`` asks for 1 GPU when the
    cluster has any and none otherwise. When this executor connects Ray, it disconnects it after the
    run (stopping a local instance it started); a Ray it finds connected is left as it is.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_cell: int = 1,
        gpus_per_cell: float | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        if cpus_per_cell < 1:
            raise ExecutorError(f"cpus_per_cell must be >= 1, got {cpus_per_cell}")
        if gpus_per_cell is not None and gpus_per_cell < 0:
            raise ExecutorError(f"gpus_per_cell must be >= 0, got {gpus_per_cell}")
        if num_cpus is not None and num_cpus < 1:
            raise ExecutorError(f"num_cpus must be >= 1, got {num_cpus}")
        if num_cpus is not None and address not in (None, "local"):
            raise ExecutorError("num_cpus sizes a new local Ray instance; a running cluster has its own")
        self.ray = import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.poll_seconds = poll_seconds

    def _connect(self) -> bool:
        """Connect Ray unless it is connected; True when this call connected it. The driver's
        SIGTERM handler is kept (``ray.init`` would replace it with one that exits at once)."""
        if self.ray.is_initialized():
            return False
        on_main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if on_main_thread else None
        self.ray.init(
            address=self.address,
            num_cpus=self.num_cpus,
            include_dashboard=False,
            logging_level="warning",
        )
        if on_main_thread:
            signal.signal(signal.SIGTERM, sigterm)
        return True

    def gpus_for_a_cell(self) -> float:
        """The GPUs each task asks for: as configured, else 1 when the cluster has a GPU."""
        if self.gpus_per_cell is not None:
            return self.gpus_per_cell
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _check_fits(self, gpus: float) -> None:
        """A task no node can hold would wait forever: refuse it before any key is made."""
        nodes = [node.get("Resources", {}) for node in self.ray.nodes() if node.get("Alive")]
        if not any(r.get("CPU", 0) >= self.cpus_per_cell and r.get("GPU", 0) >= gpus for r in nodes):
            have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in nodes)
            raise ExecutorError(
                f"no Ray node can hold a cell of {self.cpus_per_cell} CPU and {gpus:g} GPU "
                f"(nodes: {have or 'none'}); lower --cpus-per-cell / --gpus-per-cell"
            )

    def run(self, cells: Sequence[Cell], start: Start, finish: Finish) -> None:
        """Submit every cell as a task; finish them in the cells' order as they complete."""
        if not cells:
            return
        ray = self.ray
        connected_here = self._connect()
        try:
            gpus = self.gpus_for_a_cell()
            self._check_fits(gpus)
            task = ray.remote(attack_on_worker).options(
                num_cpus=self.cpus_per_cell,
                num_gpus=gpus,
                max_retries=0,  # a crashed cell is recorded as failed; a rerun retries it
                name="stealrange-cell",
            )
            jobs: list[CellJob] = []
            pending: dict[Any, int] = {}
            done: dict[int, CellOutcome] = {}
            try:
                for cell in cells:
                    job = start(cell)
                    jobs.append(job)
                    pending[task.remote(job.on_shared_paths(), self.cpus_per_cell)] = len(jobs) - 1
                written = 0
                while written < len(jobs):
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds)
                    for ref in ready:
                        index = pending.pop(ref)
                        done[index] = self._outcome(ref, jobs[index])
                    while written in done:
                        finish(jobs[written], done.pop(written))
                        written += 1
            except BaseException:
                self._stop(pending, jobs, done, finish)
                raise
        finally:
            if connected_here:
                ray.shutdown()

    def _outcome(self, ref: Any, job: CellJob) -> CellOutcome:
        """A finished task's outcome; a task that died (its worker crashed, killed for memory, a
        node lost) is a failed cell."""
        try:
            outcome: CellOutcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            out = Path(job.config.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(str(exc))
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return CellOutcome(status="failed", seconds=0.0, error=f"{type(exc).__name__}: {first}")
        return outcome

    def _stop(
        self, pending: dict[Any, int], jobs: list[CellJob], done: dict[int, CellOutcome], finish: Finish
    ) -> None:
        """On an interruption: keep what finished, cancel the rest, finish the kept ones in order.

        A task that ended in a Ray error now (a worker interrupted with the driver) is not a cell's
        result: it is left out, so a rerun runs it again."""
        ray = self.ray
        if pending:
            ready, running = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                index = pending.pop(ref)
                with contextlib.suppress(ray.exceptions.RayError):
                    done[index] = ray.get(ref, timeout=5)
            for ref in running:
                ray.cancel(ref, force=True)
        for index in sorted(done):
            finish(jobs[index], done[index])


def make_executor(
    name: str,
    address: str | None = None,
    cpus_per_cell: int | None = None,
    gpus_per_cell: float | None = None,
    num_cpus: int | None = None,
) -> Executor:
    """The executor ``stealrange run --executor NAME`` asks for. ``cpus_per_cell`` is each cell's
    torch threads with either (``None``: torch's default locally, 1 on Ray); Ray's own options
    given to the local executor are an :class:`ExecutorError` (they would be silently ignored)."""
    if name == "local":
        if address is not None or gpus_per_cell is not None or num_cpus is not None:
            raise ExecutorError("--address, --gpus-per-cell and --ray-cpus are options of --executor ray")
        return LocalExecutor(threads=cpus_per_cell)
    if name == "ray":
        return RayExecutor(
            address=address,
            num_cpus=num_cpus,
            cpus_per_cell=1 if cpus_per_cell is None else cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
        )
    raise ExecutorError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
