"""`flashmoe-bench --world-size W`: expert parallelism across W local processes.

The command starts W processes itself (torch.multiprocessing, gloo over a file store; no torchrun
needed). Every rank holds its L = E / W experts, brings T tokens per call, and times each transport
of :func:`flashmoe.distributed.moe` call by call, back to back as a layer runs (no barrier between
calls). Rank 0 then times single-process ``flashmoe.moe`` on the same total W·T tokens with all
experts. Reported per (T, transport): each rank's median latency, tokens/s (W·T / slowest rank's
median), and the bytes each rank moves per call:

  payload   rows it sends to other ranks' experts + expert outputs it returns to other ranks
  control   symmetric: the E dispatch and E return SignalWords it writes (8 B each);
            all_to_all: the E row counts it sends (8 B each)

On a CUDA machine this path would use NCCL; this build's distributed layer runs on CPU tensors.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from typing import List

import torch

from .problem import make_inputs, make_weights

TRANSPORTS = ("symmetric", "all_to_all")


def _iterations(tokens: int, iters: int) -> int:
    return iters if tokens <= 16 else max(3, iters // 4)


def _rank_main(rank: int, world_size: int, store: str, shape, dtype, token_counts: List[int], iters: int,
               transports, single_threads: int, seed: int, result_path: str) -> None:
    import torch.distributed as dist

    import flashmoe
    import flashmoe.distributed as fd
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    device = torch.device("cpu")
    weights = make_weights(shape, dtype, device, seed=seed)
    local = shape.num_experts // world_size
    mine = slice(rank * local, (rank + 1) * local)
    w1, w2 = weights.w1[mine].clone(), weights.w2[mine].clone()
    full = weights if rank == 0 else None
    router_weight = weights.router_weight
    del weights
    options = dict(top_k=shape.top_k, gated=shape.gated, activation=shape.activation, normalize=shape.normalize,
                   scoring=shape.scoring, capacity_factor=shape.capacity_factor)
    config = fd.LayerConfig(shape.num_experts, shape.hidden_size, shape.ffn_size, shape.top_k, dtype, shape.gated,
                            shape.activation, shape.scoring, shape.normalize, shape.capacity_factor, False, False,
                            False)
    rows = []
    for tokens in token_counts:
        count = _iterations(tokens, iters)
        inputs = make_inputs(shape, tokens, dtype, device, seed=seed + 100 * rank + tokens, count=min(count, 8))
        for transport in transports:
            context = fd.Context(config, transport=transport, max_tokens=tokens, threads=1)
            with torch.no_grad():
                for x in inputs[:2]:  # warm-up
                    fd.moe(x, router_weight, w1, w2, **options, context=context)
                dist.barrier()
                samples = []
                for call in range(count):
                    x = inputs[call % len(inputs)]
                    started = time.perf_counter()
                    y, routing = fd.moe(x, router_weight, w1, w2, **options, context=context, return_routing=True)
                    samples.append((time.perf_counter() - started) * 1e3)
            # Bytes: rows per (this source, owner), gathered outside the timed calls.
            per_owner = routing.expert_counts.long().view(world_size, local).sum(dim=1)
            everyone = [torch.empty_like(per_owner) for _ in range(world_size)]
            dist.all_gather(everyone, per_owner)
            row_bytes = shape.hidden_size * x.element_size()
            sent = int(per_owner.sum() - per_owner[rank])
            returned = int(sum(int(counts[rank]) for q, counts in enumerate(everyone) if q != rank))
            control = 2 * shape.num_experts * 8 if transport == "symmetric" else shape.num_experts * 8
            medians: list = [None] * world_size
            dist.all_gather_object(medians, statistics.median(samples))
            rows.append(dict(tokens_per_rank=tokens, transport=transport, calls=count, median_ms_per_rank=medians,
                             slowest_median_ms=max(medians), tokens_per_s=world_size * tokens / max(medians) * 1e3,
                             payload_bytes_per_rank=(sent + returned) * row_bytes, control_bytes_per_rank=control,
                             rank0_samples_ms=samples if rank == 0 else None))
            context.destroy()
        dist.barrier()
        if rank == 0:  # single process, same total tokens, all experts
            torch.set_num_threads(single_threads)
            total = make_inputs(shape, world_size * tokens, dtype, device, seed=seed + 7 + tokens, count=min(count, 8))
            with torch.no_grad():
                for x in total[:2]:
                    flashmoe.moe(x, full.router_weight, full.w1, full.w2, **options)
                samples = []
                for call in range(count):
                    x = total[call % len(total)]
                    started = time.perf_counter()
                    flashmoe.moe(x, full.router_weight, full.w1, full.w2, **options)
                    samples.append((time.perf_counter() - started) * 1e3)
            torch.set_num_threads(1)
            median = statistics.median(samples)
            rows.append(dict(tokens_per_rank=tokens, transport=f"single-process ({single_threads} threads, "
                                                                   f"{world_size * tokens} tokens)",
                             calls=count, median_ms_per_rank=[median], slowest_median_ms=median,
                             tokens_per_s=world_size * tokens / median * 1e3, payload_bytes_per_rank=0,
                             control_bytes_per_rank=0, rank0_samples_ms=samples))
        dist.barrier()
    if rank == 0:
        with open(result_path, "w") as out:
            json.dump(rows, out)
    fd.destroy_all()
    dist.destroy_process_group()


def run(world_size: int, shape, dtype, token_counts: List[int], iters: int, transports, seed: int) -> List[dict]:
    """Starts world_size processes and returns rank 0's rows."""
    import torch.multiprocessing as mp
    if shape.num_experts % world_size:
        raise ValueError(f"--world-size {world_size} must divide E={shape.num_experts}")
    single_threads = min(world_size, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as work:
        result_path = os.path.join(work, "rows.json")
        mp.spawn(_rank_main, args=(world_size, os.path.join(work, "store"), shape, dtype, token_counts, iters,
                                   transports, single_threads, seed, result_path), nprocs=world_size, join=True)
        with open(result_path) as rows:
            return json.load(rows)


def format_rows(rows: List[dict], world_size: int) -> str:
    lines = [f"{'T/rank':>6}  {'transport':<40} {'n':>3} {'median ms per rank':<28} {'tokens/s':>10} "
             f"{'payload B/rank':>14} {'control B':>9}"]
    for row in rows:
        medians = " ".join(f"{m:8.2f}" for m in row["median_ms_per_rank"])
        lines.append(f"{row['tokens_per_rank']:>6}  {row['transport']:<40} {row['calls']:>3} {medians:<28} "
                     f"{row['tokens_per_s']:>10.0f} {row['payload_bytes_per_rank']:>14} "
                     f"{row['control_bytes_per_rank']:>9}")
    by_tokens: dict = {}
    for row in rows:
        by_tokens.setdefault(row["tokens_per_rank"], {})[row["transport"].split(" ")[0]] = row["slowest_median_ms"]
    for tokens, times in by_tokens.items():
        if "symmetric" in times and "all_to_all" in times:
            lines.append(f"# T/rank={tokens}: all_to_all / symmetric = {times['all_to_all'] / times['symmetric']:.2f}x"
                         + (f", single-process / symmetric = {times['single-process'] / times['symmetric']:.2f}x"
                            if "single-process" in times else ""))
    return "\n".join(lines)
