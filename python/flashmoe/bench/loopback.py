"""`flashmoe-bench --loopback W`: W virtual ranks of the EP kernel on one GPU (flashmoe.loopback).

One cooperative launch runs every rank, so a call's latency is every rank's. For each T (tokens per
rank) it times the loopback world (CUDA events, back-to-back calls, no status check inside the
timed loop: the words are checked once after it) against the single-GPU op on the same W·T tokens
with all E experts, and reports per (T, mode):

  median ms per rank   the launch's median (all ranks run in it)
  tokens/s             W·T / median
  payload B/rank       admitted rows a rank sends to other ranks' experts + rows it returns to other
                       ranks (H·element bytes each), mean over ranks
  control B/rank       the 8-byte dispatch and return SignalWords it writes to peers: 2·(E − L)·8
  GB/s                 (payload + control) of all ranks / median: what the GPU's memory moved between
                       heaps (loopback stores stay in one GPU's memory; over NVLink the same bytes cross links)
"""

from __future__ import annotations

import statistics
from typing import List

import torch

from .. import _C
from .problem import make_inputs, make_weights


def _time(run, iters: int, warmup: int, device) -> List[float]:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def bytes_per_rank(counts: List[List[int]], capacities: List[int], world_size: int, hidden: int,
                   element_size: int) -> tuple:
    """(payload bytes of each rank, control bytes of a rank) from every rank's expert_counts and capacity
    (-1: dropless): a rank sends its admitted rows of other ranks' experts and returns the rows other
    ranks sent to its experts."""
    experts = len(counts[0])
    local = experts // world_size
    admitted = [[c if cap < 0 else min(c, cap) for c in rank_counts] for rank_counts, cap in zip(counts, capacities)]
    payload = []
    for r in range(world_size):
        mine = range(r * local, (r + 1) * local)
        sent = sum(a for e, a in enumerate(admitted[r]) if e not in mine)
        returned = sum(admitted[s][e] for s in range(world_size) if s != r for e in mine)
        payload.append((sent + returned) * hidden * element_size)
    return payload, 2 * (experts - local) * 8


def run(world_size: int, shape, dtype, token_counts: List[int], iters: int, seed: int, device) -> List[dict]:
    import flashmoe
    from ..loopback import LoopbackWorld
    weights = make_weights(shape, dtype, device, seed=seed)
    full = dict(router_weight=weights.router_weight, w1=weights.w1, w2=weights.w2)
    options = dict(shape.moe_options(), **weights.options())
    rows = []
    for tokens in token_counts:
        xs = [make_inputs(shape, tokens, dtype, device, seed=seed + 100 * r + tokens, count=1)[0]
              for r in range(world_size)]
        with torch.inference_mode(), LoopbackWorld(world_size, **full, max_tokens=tokens, **options) as world:
            outputs = world.forward(xs)  # checked: a first call that gives up raises here
            samples = _time(lambda: world.forward(xs, check=False), iters, 3, device)
            world.check_status()
        counts = [out[3].tolist() for out in outputs]
        capacities = [-1 if shape.capacity_factor is None else
                      _C.expert_capacity(shape.capacity_factor, tokens, shape.top_k, shape.num_experts)
                      for _ in range(world_size)]
        payload, control = bytes_per_rank(counts, capacities, world_size, shape.hidden_size, xs[0].element_size())
        median = statistics.median(samples)
        moved = sum(payload) + world_size * control
        rows.append(dict(tokens_per_rank=tokens, mode=f"loopback W={world_size}", calls=len(samples),
                         median_ms_per_rank=[median] * world_size, tokens_per_s=world_size * tokens / median * 1e3,
                         payload_bytes_per_rank=round(sum(payload) / world_size), control_bytes_per_rank=control,
                         gb_per_s=moved / (median * 1e-3) / 1e9, samples_ms=samples))
        x_all = torch.cat(xs)
        with torch.inference_mode():
            single = _time(lambda: flashmoe.moe(x_all, **full, **options, backend="native"), iters, 3, device)
        median = statistics.median(single)
        rows.append(dict(tokens_per_rank=tokens, mode=f"single GPU, {world_size * tokens} tokens", calls=len(single),
                         median_ms_per_rank=[median], tokens_per_s=world_size * tokens / median * 1e3,
                         payload_bytes_per_rank=0, control_bytes_per_rank=0, gb_per_s=0.0, samples_ms=single))
    return rows


def format_rows(rows: List[dict]) -> str:
    lines = [f"{'T/rank':>6}  {'mode':<28} {'n':>3} {'median ms/rank':>14} {'tokens/s':>12} {'payload B/rank':>14} "
             f"{'control B':>9} {'GB/s':>8}"]
    for row in rows:
        lines.append(f"{row['tokens_per_rank']:>6}  {row['mode']:<28} {row['calls']:>3} "
                     f"{row['median_ms_per_rank'][0]:>14.3f} {row['tokens_per_s']:>12.0f} "
                     f"{row['payload_bytes_per_rank']:>14} {row['control_bytes_per_rank']:>9} {row['gb_per_s']:>8.1f}")
    return "\n".join(lines)
