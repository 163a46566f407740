"""Dynamic batching on long-lived inference threads: every forward pass of the server runs here.

Why a long-lived thread and not a thread pool. Torch's CPU kernels run on OpenMP, whose thread team
belongs to the thread that calls torch: every thread that ever runs a parallel op keeps a team of
``torch_threads - 1`` helpers alive. Running forwards from a pool (anyio's ``to_thread``, a
``ThreadPoolExecutor``) spreads them over many calling threads, so several teams hold more OpenMP
threads than there are cores; libgomp then stops spin-waiting and every parallel region of every
forward pays futex wake-ups (measured on 2 cores, 1-image forward of the quick classifier with 2
torch threads: 0.7 ms on one thread, 2.2 ms once a second thread has run torch, and worse on a
loaded machine). One :class:`InferenceWorker` thread that owns every torch call of its models keeps
one team, hot, and the event loop hands it work through a queue and gets results back through
asyncio futures: a handoff of tens of microseconds, never a forward on the loop.

Dynamic batching, after Triton's dynamic batcher (``max_queue_delay_microseconds``,
``preferred_batch_size``), TorchServe's ``batch_size`` / ``max_batch_delay`` and Ray Serve's
``@serve.batch``: requests to one model that wait together (from one key or many) run as one
forward of at most ``max_batch_images`` images; each request gets exactly its own rows, and its own
defenses run on them afterwards (:meth:`ModelBatcher.submit`'s ``finish``), keyed by its own key,
so nothing a request receives depends on who shared its forward. A request is never split across
forwards. With the default queue delay of 0 a request that finds the worker idle runs at once,
alone; requests that arrive while a forward runs are batched at its end (latency-neutral
batching). A positive delay holds the oldest request up to that long for company; preferred
batch sizes make the batcher cut a batch of the largest preferred size the queue can fill, at
once. When a forward fails, every request in it gets the error (and its caller refunds it alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from server.settings import BatchingOverride, ServerSettings
from server.stats import ModelStats, RequestTimes

logger = logging.getLogger("stealrange.server")

R = TypeVar("R")
RawOutputs = tuple[torch.Tensor, torch.Tensor | None]
RowsFinish = Callable[[torch.Tensor, RawOutputs], R]  # (x rows, raw output rows) -> a request's answer


@dataclass(frozen=True)
class BatchingPolicy:
    """How one model's requests are gathered into forwards (resolved from the settings)."""

    enabled: bool = True
    max_batch_images: int = 256  # images per forward; a larger request runs alone, never split
    max_queue_delay_ns: int = 0  # how long the oldest waiting request may be held for company
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_images < 1 or self.max_queue_delay_ns < 0:
            raise ValueError("max_batch_images must be >= 1 and the queue delay >= 0")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must be >= 1")

    def with_override(self, override: BatchingOverride) -> BatchingPolicy:
        """This policy with the fields ``override`` sets replaced."""
        return BatchingPolicy(
            enabled=self.enabled if override.enabled is None else override.enabled,
            max_batch_images=override.max_batch_images or self.max_batch_images,
            max_queue_delay_ns=(
                self.max_queue_delay_ns
                if override.max_queue_delay_us is None
                else override.max_queue_delay_us * 1000
            ),
            preferred_batch_sizes=(
                self.preferred_batch_sizes
                if override.preferred_batch_sizes is None
                else tuple(sorted(set(override.preferred_batch_sizes)))
            ),
        )


def policy_for(settings: ServerSettings, model: str) -> BatchingPolicy:
    """``model``'s batching policy: the server's settings, with its ``model_batching`` entry over them."""
    base = BatchingPolicy(
        enabled=settings.batching,
        max_batch_images=settings.batch_max_images or settings.max_batch,
        max_queue_delay_ns=settings.batch_queue_delay_us * 1000,
        preferred_batch_sizes=tuple(sorted(set(settings.batch_preferred_sizes))),
    )
    override = settings.model_batching.get(model)
    return base if override is None else base.with_override(override)


class BatchModel(Protocol):
    """What the batcher needs of a served model (:class:`server.registry.ServedModel`)."""

    @property
    def name(self) -> str: ...

    def to_model_input(self, images: np.ndarray) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> RawOutputs: ...


@dataclass(eq=False)
class _Job(Generic[R]):
    """One request waiting for its model's next forward, and where its answer goes."""

    images: np.ndarray
    finish: RowsFinish[R]
    times: RequestTimes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[R]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """On the loop: hand a result or an error to a waiting request (unless it stopped waiting)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any, error: BaseException | None
) -> None:
    """From the worker thread: settle ``future`` on its own loop (a closed loop has nobody waiting)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, value, error)


class ModelBatcher:
    """One served model's queue and batching policy, drained by its :class:`InferenceWorker`."""

    def __init__(
        self, model: BatchModel, policy: BatchingPolicy, worker: InferenceWorker, stats: ModelStats
    ) -> None:
        self.model = model
        self.policy = policy
        self.worker = worker
        self.stats = stats
        self.pending: deque[_Job[Any]] = deque()  # guarded by the worker's condition
        self.queued_images = 0
        worker.attach(self)

    async def submit(self, images: np.ndarray, times: RequestTimes, finish: RowsFinish[R]) -> R:
        """Queue one request's images for the model's next forward; ``finish(x_rows, raw_rows)``
        then runs on the worker with this request's own rows (and nobody else's), and its result
        comes back here. An error in the shared forward, or in ``finish``, is raised here."""
        loop = asyncio.get_running_loop()
        job: _Job[R] = _Job(images, finish, times, loop, loop.create_future())
        self.worker.enqueue(self, job)
        return await job.future

    def take(self, now_ns: int, flush: bool) -> tuple[list[_Job[Any]], int | None]:
        """The jobs of the next forward, or none yet and when to look again (the worker's lock held).

        Full (``max_batch_images`` queued) or a preferred size reachable: cut at once. Otherwise the
        oldest request waits until the queue delay has passed since it arrived (``flush``: not at
        all), then everything queued runs, up to ``max_batch_images``."""
        queue = self.pending
        if not queue:
            return [], None
        policy = self.policy
        if not policy.enabled:
            target = 0  # one request per forward
        elif self.queued_images >= policy.max_batch_images:
            target = policy.max_batch_images
        elif reachable := [s for s in policy.preferred_batch_sizes if s <= self.queued_images]:
            target = max(reachable)
        elif flush or now_ns >= queue[0].enqueued_ns + policy.max_queue_delay_ns:
            target = self.queued_images
        else:
            return [], queue[0].enqueued_ns + policy.max_queue_delay_ns
        jobs = [queue.popleft()]
        size = jobs[0].n
        while queue and size + queue[0].n <= target:
            size += queue[0].n
            jobs.append(queue.popleft())
        self.queued_images -= size
        return jobs, None

    def run(self, jobs: Sequence[_Job[Any]]) -> None:
        """On the worker: one forward over every job's images, then each job's own ``finish`` on its
        own rows. A failed forward fails every job; a failed ``finish`` fails its own job only."""
        started = time.perf_counter_ns()
        try:
            images = [job.images for job in jobs]
            if len(images) == 1:
                x = self.model.to_model_input(images[0])
            elif all(a.dtype == images[0].dtype for a in images):
                x = self.model.to_model_input(np.concatenate(images))
            else:  # uint8 and float32 requests in one forward: each converted on its own
                x = torch.cat([self.model.to_model_input(a) for a in images])
            converted = time.perf_counter_ns()
            raw = self.model.forward(x)
            computed = time.perf_counter_ns()
        except Exception as exc:
            logger.exception("forward of %d requests on %s failed", len(jobs), self.model.name)
            for job in jobs:
                _deliver(job.loop, job.future, None, exc)
            return
        # Counted before any answer leaves, so whoever reads the statistics after an answer sees
        # its forward; the outputs' time is added once every request of the batch has its own.
        size = sum(job.n for job in jobs)
        self.stats.record_batch(self.model.name, size, converted - started, computed - converted)
        output_ns = 0
        start = 0
        for job in jobs:
            stop = start + job.n
            rows = (raw[0][start:stop], None if raw[1] is None else raw[1][start:stop])
            job.times.queue_ns += started - job.enqueued_ns
            job.times.compute_input_ns += converted - started
            job.times.compute_infer_ns += computed - converted
            finish_started = time.perf_counter_ns()
            try:
                value, error = job.finish(x[start:stop], rows), None
            except Exception as exc:
                value, error = None, exc
            spent = time.perf_counter_ns() - finish_started
            job.times.compute_output_ns += spent
            output_ns += spent
            _deliver(job.loop, job.future, value, error)
            start = stop
        self.stats.record_batch_output(self.model.name, size, output_ns)


class InferenceWorker:
    """One long-lived thread that runs every forward (and every other torch call of a request) of
    the models attached to it, with its own ``torch_threads``.

    Work comes in from the event loop (:meth:`enqueue`, :meth:`call`) under a condition lock that
    the thread holds only to pick its next job, never while it computes."""

    def __init__(self, name: str, torch_threads: int) -> None:
        self.name = name
        self.torch_threads = torch_threads
        self._cond = threading.Condition()
        self._batchers: list[ModelBatcher] = []
        self._calls: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def attach(self, batcher: ModelBatcher) -> None:
        with self._cond:
            self._batchers.append(batcher)

    def start(self) -> None:
        """Start the thread if it is not running (the app's lifespan; the first request would)."""
        with self._cond:
            self._stopping = False
            self._spawn()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the thread (the app's lifespan, at shutdown). Work that
        comes later starts a new one."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def enqueue(self, batcher: ModelBatcher, job: _Job[Any]) -> None:
        """Queue ``job`` on ``batcher`` (from the event loop: the lock is held for microseconds)."""
        with self._cond:
            batcher.pending.append(job)
            batcher.queued_images += job.n
            self._spawn()
            self._cond.notify()

    async def call(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on this worker's thread (before any waiting batch) and return its result:
        the torch work of a request that cannot be part of a batch (a stateful defense's output)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()

        def run() -> None:
            try:
                value, error = fn(), None
            except Exception as exc:
                value, error = None, exc
            _deliver(loop, future, value, error)

        with self._cond:
            self._calls.append(run)
            self._spawn()
            self._cond.notify()
        return await future

    def _spawn(self) -> None:
        """Start the thread unless one runs (the lock held). A thread that is stopping but has not
        yet left :meth:`_next` still runs what is queued now."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()

    def _main(self) -> None:
        torch.set_num_threads(self.torch_threads)  # this thread's own OpenMP team
        while (work := self._next()) is not None:
            try:
                work()
            except Exception:  # every job settles its own futures; this is a bug, not a request's error
                logger.exception("inference worker %s: unexpected error", self.name)

    def _next(self) -> Callable[[], None] | None:
        """The next thing to run: a call, else the batch of the model whose oldest request is
        oldest; None once stopping with nothing left."""
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft()
                now = time.perf_counter_ns()
                wake_at: int | None = None
                waiting = sorted(
                    (b for b in self._batchers if b.pending), key=lambda b: b.pending[0].enqueued_ns
                )
                for batcher in waiting:
                    jobs, due = batcher.take(now, flush=self._stopping)
                    if jobs:
                        return partial(batcher.run, jobs)
                    if due is not None:
                        wake_at = due if wake_at is None else min(wake_at, due)
                if self._stopping and not waiting:
                    self._thread = None  # under the lock: work queued from now on starts a new thread
                    return None
                self._cond.wait(None if wake_at is None else max(0, wake_at - now) / 1e9)
