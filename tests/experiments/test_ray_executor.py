"""The range's cells as Ray tasks on a local Ray instance: the same numbers per cell as the local
executor, results in the scenario's order, resume through the shared query cache, Ctrl-C, and the
executor options checked before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from typer.testing import CliRunner

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.executors import (
    CellJob,
    CellOutcome,
    ExecutorError,
    LocalExecutor,
    RayExecutor,
    make_executor,
)
from experiments.results import RESULTS_FILE, CellLine, read_results
from experiments.runner import VICTIM_FILE, run_scenario
from experiments.scenario import load_scenario
from experiments.victim_process import reachable_address
from stealrange.cli import app
from tests.experiments.test_range import tiny_scenario, write

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def enc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one untrained small encoder, ``enc``."""
    store = tmp_path_factory.mktemp("ray_store")
    torch.manual_seed(0)
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=spec, dataset="synthetic"), store / "enc")
    return store


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A new local Ray instance of 2 CPUs for the module (the executors find it connected)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def ray_scenario(store: Path, **overrides: Any) -> dict[str, Any]:
    """The range tests' tiny scenario behind no defense (a keyed defense's noise depends on the
    run's random server secret, so only undefended cells can be equal across two runs)."""
    return tiny_scenario(store, defenses=[{"name": "none"}], defense_cost=None, **overrides)


VOLATILE = {"seconds", "wall_seconds", "url", "checkpoint"}
"""Fields that differ between two runs of the same cells: wall times, the victim's port, the
run folder's paths."""


def numbers(line: CellLine) -> dict[str, Any]:
    """A results line without what differs from run to run: wall times, the victim's URL, the key's
    id, run-folder paths, the audit's timestamps (its event and image counts stay)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    raw = line.model_dump(mode="json")
    raw["key"].pop("id")
    raw["audit"] = {"events": raw["audit"]["events"], "images": raw["audit"]["images"]}
    return strip(raw)


def test_ray_cells_equal_the_local_executors_in_order_and_resume(
    enc_store: Path, tmp_path: Path, local_ray: None
) -> None:
    scenario = load_scenario(write(tmp_path / "tiny.yaml", ray_scenario(enc_store)))
    order = [cell.id for cell in scenario.cells()]
    assert len(order) == 4
    local_dir = run_scenario(
        scenario, runs=tmp_path / "local", progress=False, executor=LocalExecutor(threads=1)
    )
    # The victim bound on every interface: the workers reach it at this machine's address.
    ray_dir = run_scenario(
        scenario,
        runs=tmp_path / "ray",
        progress=False,
        executor=RayExecutor(cpus_per_cell=1),
        victim_host="0.0.0.0",
    )
    local_lines, ray_lines = read_results(local_dir), read_results(ray_dir)
    assert [line.cell for line in local_lines] == [line.cell for line in ray_lines] == order
    for local, remote in zip(local_lines, ray_lines, strict=True):
        assert remote.ok and remote.key is not None
        assert remote.result.queries.spent == remote.key.used == remote.audit.images > 0
        assert remote.result.victim.url.startswith(f"http://{reachable_address('0.0.0.0')}:")
        assert numbers(remote) == numbers(local)  # every score, loss and count, to the last bit
        assert (ray_dir / "cells" / remote.cell / "result.json").is_file()
    assert any((ray_dir / "references").iterdir())  # the run's reference scores, shared by the tasks
    assert not (ray_dir / VICTIM_FILE).exists() and ray.is_initialized()  # the fixture's Ray stays

    # Resume on Ray: finished cells are skipped; a dropped one runs again from its query cache.
    before = (ray_dir / RESULTS_FILE).read_text().splitlines()
    dropped = order[3]
    kept = [text for text in before if f'"{dropped}"' not in text]
    (ray_dir / RESULTS_FILE).write_text("\n".join(kept) + "\n")
    run_scenario(scenario, runs=tmp_path / "ray", progress=False, executor=RayExecutor())
    after = (ray_dir / RESULTS_FILE).read_text().splitlines()
    assert after[:3] == kept and len(after) == 4
    rerun = CellLine.model_validate_json(after[3])
    assert rerun.cell == dropped and rerun.result.queries.spent == 0
    assert rerun.result.queries.cache_hits == rerun.result.queries.planned > 0
    assert numbers(rerun)["result"]["evaluation"] == numbers(ray_lines[3])["result"]["evaluation"]


def test_a_cell_no_node_can_hold_is_refused_before_any_key(
    enc_store: Path, tmp_path: Path, local_ray: None
) -> None:
    cells = load_scenario(write(tmp_path / "s.yaml", ray_scenario(enc_store))).cells()
    started: list[str] = []

    def start(cell: Any) -> CellJob:
        started.append(cell.id)
        raise AssertionError("no key may be made for a cell that cannot run")

    def finish(job: CellJob, outcome: CellOutcome) -> None:
        raise AssertionError("nothing ran")

    with pytest.raises(ExecutorError, match=r"no Ray node can hold a cell of 3 CPU.*2 CPU / 0 GPU"):
        RayExecutor(cpus_per_cell=3).run(cells, start, finish)
    with pytest.raises(ExecutorError, match="1 GPU"):
        RayExecutor(gpus_per_cell=1).run(cells, start, finish)
    assert started == [] and ray.is_initialized()


def test_executor_options_are_checked_before_anything_runs(enc_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match="options of --executor ray"):
        make_executor("local", address="10.0.0.1:6379")
    with pytest.raises(ExecutorError, match="options of --executor ray"):
        make_executor("local", gpus_per_cell=1)
    with pytest.raises(ExecutorError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(ExecutorError, match="a running cluster has its own"):
        make_executor("ray", address="10.0.0.1:6379", num_cpus=2)
    with pytest.raises(ExecutorError, match="cpus_per_cell must be >= 1"):
        RayExecutor(cpus_per_cell=0)
    with pytest.raises(ExecutorError, match="threads must be >= 1"):
        LocalExecutor(threads=0)
    assert isinstance(make_executor("local", cpus_per_cell=2), LocalExecutor)
    assert make_executor("ray").cpus_per_cell == 1  # type: ignore[attr-defined]

    path = write(tmp_path / "s.yaml", ray_scenario(enc_store))
    runs = tmp_path / "runs"
    cli = CliRunner()
    result = cli.invoke(app, ["run", str(path), "--runs", str(runs), "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2 and "options of --executor ray" in " ".join(result.output.split())
    result = cli.invoke(app, ["run", str(path), "--runs", str(runs), "--executor", "dask"])
    assert result.exit_code == 2 and "dask" in result.output
    assert not runs.exists()  # nothing was made


def test_ctrl_c_cancels_the_tasks_keeps_finished_cells_and_leaves_nothing(
    enc_store: Path, tmp_path: Path
) -> None:
    """The CLI on its own local Ray instance: SIGINT once a cell is written; the runner exits 130,
    the cells written are whole and in the scenario's order, and no process of the run is left (the
    victim's process group, and Ray's processes in the runner's)."""
    scenario = ray_scenario(enc_store, budgets=[40, 80, 120, 160, 200, 240])
    path = write(tmp_path / "s.yaml", scenario)
    order = [cell.id for cell in load_scenario(path).cells()]
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "stealrange.cli", "run", str(path), "--runs", str(runs)]
    runner = subprocess.Popen(
        [*command, "--executor", "ray", "--ray-cpus", "2"],
        cwd=ROOT,
        env={**os.environ, "STEALRANGE_NO_PROGRESS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: Ray's processes join it
    )
    results, pid_file = runs / "tiny" / RESULTS_FILE, runs / "tiny" / VICTIM_FILE
    deadline = time.monotonic() + 100
    while not (results.is_file() and results.read_text().strip()):
        assert runner.poll() is None, runner.stdout.read().decode() if runner.stdout else ""
        assert time.monotonic() < deadline, "no cell finished"
        time.sleep(0.1)
    victim = json.loads(pid_file.read_text())["pid"]
    runner.send_signal(signal.SIGINT)
    output = runner.communicate(timeout=60)[0].decode()
    assert runner.returncode == 130, output
    assert "interrupted" in output
    written = [line.cell for line in read_results(runs / "tiny")]
    assert all(line.ok for line in read_results(runs / "tiny"))
    assert 1 <= len(written) < len(order) and written == [c for c in order if c in written]
    assert not pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(victim, 0)
    deadline = time.monotonic() + 20
    while True:  # Ray's local instance goes with ray.shutdown(): its processes exit
        try:
            os.killpg(runner.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "Ray processes were left behind"
        time.sleep(0.2)


def test_connecting_ray_keeps_the_drivers_sigterm_handler() -> None:
    """``ray.init`` installs a SIGTERM handler that exits at once; the executor puts the driver's
    back, so SIGTERM still stops a run cleanly (victim API stopped, exit 130) as without Ray."""
    code = (
        "import signal, ray\n"
        "from experiments.executors import RayExecutor\n"
        "def handler(signum, frame): pass\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "assert RayExecutor(address='local', num_cpus=1)._connect() and ray.is_initialized()\n"
        "kept = signal.getsignal(signal.SIGTERM) is handler\n"
        "ray.shutdown()\n"
        "print('kept' if kept else 'replaced')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "kept", done.stderr
