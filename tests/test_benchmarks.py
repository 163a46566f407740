"""The serving benchmarks (serve_latency, serve_throughput, serving_micro) run end to end at tiny
sizes (a smoke run, not a measurement), so that a change to the server they drive cannot leave them
broken."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_benchmark(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--store", "/nonexistent", *args],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(110)
def test_serve_latency_runs_and_prints_its_ratios() -> None:
    out = run_benchmark(
        "serve_latency.py",
        *("--rounds", "1", "--requests", "20", "--clients", "4", "--per-client", "3"),
        *("--raw-repeats", "20", "--threads", "1"),
    )
    assert "untrained one of the same architecture" in out
    for mode in ("on ", "off"):
        line = re.search(rf"API, batching {mode}: p50 ({NUMBER}) .* = raw \+ (-?{NUMBER})", out)
        assert line is not None, out
        assert float(line.group(1)) > 0
    ratios = re.findall(rf"ratio to raw batch 4 ({NUMBER})", out)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), out
    # batching on: the statistics extension counted forwards of more than 0 images each
    batches = re.findall(rf"mean batch ({NUMBER})", out)
    assert len(batches) == 2 and float(batches[1]) == 1.0, out  # batching off: one request per forward


@pytest.mark.timeout(110)
def test_serve_throughput_runs_and_prints_its_ratios() -> None:
    out = run_benchmark(
        "serve_throughput.py", "--batch", "8", "--repeats", "3", "--latency-requests", "10", "--threads", "1"
    )
    assert re.search(rf"raw in-process forward +{NUMBER} images/s .*eager module {NUMBER}", out), out
    assert re.search(rf"API binary uint8 \(charged\) +{NUMBER} images/s +ratio to raw {NUMBER}", out), out
    assert re.search(rf"accounting on {NUMBER} ms, off {NUMBER} ms", out), out


def test_serving_micro_runs_every_probe() -> None:
    out = run_benchmark("serving_micro.py", "--repeats", "10", "--threads", "1")
    assert re.search(rf"hop .*calling thread {NUMBER} ms; from a pool of 4 {NUMBER} ms", out), out
    assert re.search(rf"pause .*back to back {NUMBER} ms; after a 2 ms sleep {NUMBER} ms", out), out
    assert re.search(rf"redis: a charge p50 back to back {NUMBER} ms; after 1 ms idle {NUMBER}", out), out
    assert re.search(rf"embedded fakeredis: a charge p50 {NUMBER} ms; an HGET {NUMBER} ms", out), out


def test_serve_latency_gil_probe_runs() -> None:
    out = run_benchmark("serve_latency.py", "--gil-probe", "--gil-repeats", "3", "--threads", "1")
    for mode in ("eager", "torchscript"):
        assert re.search(rf"{mode} +1 images: idle +{NUMBER}, busy +{NUMBER}", out), out
