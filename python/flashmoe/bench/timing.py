"""Per-iteration timers: perf_counter on the CPU, CUDA event pairs on a GPU.

A row gets a time budget. The first warm-up call is not charged to it (it may
be one-time setup) unless it alone overruns the whole budget; the other warm-up
calls stop before they would use more than half of it; the timed calls are cut
to what the other half allows at the speed of the fastest warm-up call, and
there is always at least one. A 15-second call then costs two calls, not twenty.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass(frozen=True)
class Timing:
    samples_ms: List[float]
    warmup_calls: int

    def percentile(self, q: float) -> float:
        """Linear interpolation between closest ranks (numpy's default)."""
        ordered = sorted(self.samples_ms)
        position = (len(ordered) - 1) * q / 100.0
        lower = int(position)
        upper = min(lower + 1, len(ordered) - 1)
        return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p10_ms(self) -> float:
        return self.percentile(10)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runner(run: Callable[[int], object], *, warmup: int, iters: int, inputs: int,
                device: torch.device, budget_s: Optional[float] = None) -> Timing:
    """Time up to `iters` calls of run(i), i rotating over `inputs`, after up to `warmup` calls."""
    with torch.inference_mode():
        warmup_calls, fastest_call_s = _warm_up(run, warmup, inputs, device, budget_s)
        if budget_s and fastest_call_s:
            iters = max(1, min(iters, int(budget_s / 2 / fastest_call_s)))
        if device.type == "cuda":
            samples = _time_cuda(run, iters, inputs, warmup_calls, device)
        else:
            samples = _time_host(run, iters, inputs, warmup_calls)
    return Timing(samples, warmup_calls)


def _warm_up(run, warmup: int, inputs: int, device: torch.device, budget_s: Optional[float]):
    """Returns (calls made, fastest call in seconds or None)."""
    _synchronize(device)
    fastest = None
    calls = 0
    for step in range(warmup):
        call_started = time.perf_counter()
        run(step % inputs)
        _synchronize(device)  # untimed, so syncing here costs nothing that is reported
        now = time.perf_counter()
        fastest = now - call_started if fastest is None else min(fastest, now - call_started)
        calls += 1
        if not budget_s:
            continue
        if calls == 1:
            if fastest >= budget_s:
                break
            budget_started = now
        elif now - budget_started + fastest > budget_s / 2:
            break
    return calls, fastest


def _time_host(run, iters: int, inputs: int, first: int) -> List[float]:
    samples = []
    for step in range(first, first + iters):
        start = time.perf_counter()
        run(step % inputs)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _time_cuda(run, iters: int, inputs: int, first: int, device: torch.device) -> List[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for step, (start, end) in enumerate(zip(starts, ends)):
        start.record()
        run((first + step) % inputs)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]
