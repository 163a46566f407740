"""Data-parallel training (``common.distributed``): the sharding, and 2 real processes on gloo.

The reference for DDP is arithmetic: with a mean loss, 2 ranks at batch ``b`` whose shards of one
shared permutation interleave make the same SGD steps as 1 process at batch ``2b`` on that
permutation, so their weights must match the single-process run's to float tolerance.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from common import distributed
from common.distributed import DistributedContext, broadcast_call, shard
from common.training import TrainConfig, run_steps

N, BATCH, EPOCHS, WORLD = 64, 8, 3, 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(N, 6, generator=generator)
    return x, x @ torch.randn(6, 2, generator=generator) + 0.1 * torch.randn(N, 2, generator=generator)


def _train(batch_size: int, seen: list[torch.Tensor] | None = None) -> nn.Module:
    """A linear regression trained by run_steps (SGD, momentum, weight decay, cosine schedule)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    x, y = _data()

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if seen is not None:
            seen.append(batch.clone())
        return F.mse_loss(net(x[batch]), y[batch])

    config = TrainConfig(epochs=EPOCHS, batch_size=batch_size, lr=0.05, device="cpu", seed=3)
    run_steps(model, N, step, config, progress=False)
    return model


def _worker(rank: int, port: int, out: str, job: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result: dict[str, object] = {}
    try:
        context, device = distributed.init_from_env("auto")
        result["context"] = (context.rank, context.world_size, context.local_rank, str(device))
        if job == "train":
            seen: list[torch.Tensor] = []
            model = _train(BATCH, seen)
            result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result["seen"] = torch.cat(seen)
        else:
            calls: list[int] = []

            def answer() -> dict[str, int]:
                calls.append(1)
                return {"answer": 42}

            result["value"] = broadcast_call(answer)
            result["calls"] = len(calls)

            def fail() -> None:
                raise ValueError("the victim said no")

            try:
                broadcast_call(fail)
            except Exception as exc:  # what each rank sees
                result["error"] = f"{type(exc).__name__}: {exc}"
    except Exception:
        result["crash"] = traceback.format_exc()
    finally:
        distributed.shutdown()
        torch.save(result, Path(out) / f"rank{rank}.pt")


def _spawn(tmp_path: Path, job: str) -> list[dict[str, object]]:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), job), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def test_shard_splits_a_permutation_into_equal_disjoint_parts() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard(order, DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]  # 11 truncated to 9
    assert sorted(torch.cat(parts).tolist()) == sorted(order[:9].tolist())
    assert torch.equal(parts[1], order[torch.tensor([1, 4, 7])])
    assert torch.equal(shard(order, DistributedContext()), order)


def test_single_process_is_untouched() -> None:
    assert not dist.is_initialized()
    context, device = distributed.init_from_env("cpu")
    assert context == DistributedContext() and not context.enabled and context.is_main
    assert device == torch.device("cpu") and not dist.is_initialized()
    assert broadcast_call(lambda: 7) == 7
    net = nn.Linear(2, 2)
    assert distributed.wrap(net, device) is net
    assert distributed.mean_over_ranks(1.5) == 1.5


def test_ddp_on_two_gloo_processes_equals_one_process_at_twice_the_batch(tmp_path: Path) -> None:
    results = _spawn(tmp_path, "train")
    assert [r["context"] for r in results] == [(0, 2, 0, "cpu"), (1, 2, 1, "cpu")]

    # Every epoch the two ranks see disjoint halves of the samples, together all of them.
    seen = [r["seen"] for r in results]
    assert len(seen[0]) == len(seen[1]) == EPOCHS * N // WORLD
    for epoch in range(EPOCHS):
        part = slice(epoch * N // WORLD, (epoch + 1) * N // WORLD)
        assert sorted(torch.cat([seen[0][part], seen[1][part]]).tolist()) == list(range(N))

    # The ranks hold the same weights, and they are those of one process at batch 2 x BATCH.
    reference = _train(WORLD * BATCH).state_dict()
    torch.manual_seed(0)
    untrained = nn.Linear(6, 2).state_dict()
    for name, value in reference.items():
        assert torch.equal(results[0]["state"][name], results[1]["state"][name])
        torch.testing.assert_close(results[0]["state"][name], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(value, untrained[name])


def test_broadcast_call_runs_once_and_carries_failures_to_every_rank(tmp_path: Path) -> None:
    results = _spawn(tmp_path, "broadcast")
    assert [r["value"] for r in results] == [{"answer": 42}, {"answer": 42}]
    assert [r["calls"] for r in results] == [1, 0]  # only rank 0 ran it
    assert results[0]["error"] == "ValueError: the victim said no"
    assert results[1]["error"] == "RuntimeError: rank 0 failed: ValueError: the victim said no"


@pytest.mark.parametrize("world", [2, 4])
def test_shard_sizes_match_the_steps_each_rank_counts(world: int) -> None:
    order = torch.arange(50)
    sizes = {len(shard(order, DistributedContext(rank=r, world_size=world))) for r in range(world)}
    assert sizes == {50 // world}
