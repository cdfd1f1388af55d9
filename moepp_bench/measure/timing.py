"""Interleaved timing: every case runs once per round, rounds alternate direction, so drift and thermal or
neighbour noise hit all cases alike and ratios between cases stay meaningful on a noisy machine.

CPU: wall clock (perf_counter) around each call. CUDA: events recorded around each call after a
synchronize, read after the round; optionally each case is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TimingStats:
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]


def _cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture fn once on a side stream and return a replay; fn must not sync with the host."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up allocator pools before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: str = "cpu",
    cuda_graphs: bool = False,
    on_call: Callable[[str], None] | None = None,
) -> dict[str, TimingStats]:
    """Run every case warmup times, then `repeats` rounds of one timed call each; returns times per case."""
    cuda = device.startswith("cuda")
    if cuda and cuda_graphs:
        cases = {name: _cuda_graph(fn) for name, fn in cases.items()}
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
            if on_call:
                on_call(name)
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                cases[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                cases[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if on_call:
                on_call(name)
    return {name: TimingStats(ts) for name, ts in times.items()}


class StageClock:
    """Collects per-stage durations from a layer's `marker` callback (one forward at a time)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")
        self.totals_ms: dict[str, list[float]] = {}
        self.last = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def __call__(self, stage: str) -> None:
        now = self._now()
        self.totals_ms.setdefault(stage, []).append((now - self.last) * 1e3)
        self.last = now

    def medians(self) -> dict[str, float]:
        return {stage: statistics.median(ts) for stage, ts in self.totals_ms.items()}
