"""CPU cost of the dataflow runtime at W ranks against the single-rank operator, same total work.

    python bench/expert_parallel_cpu.py [--world-size 4] [--tokens 1024] [--repeats 5]

The same T tokens run once through flashmoe.moe (one rank, all threads) and once split evenly over
W simulated ranks (threads_per_rank = 1). Reports wall time and process CPU time (both medians).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashmoe
from flashmoe.testing import SimulatedCluster


def measure(fn, repeats):
    walls, cpus = [], []
    fn()  # warm-up
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    H, I, E, k, W, T = args.hidden, args.ffn, args.experts, args.top_k, args.world_size, args.tokens

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    x = randn(T, H, scale=1.0)
    router_weight, w1, w2 = randn(E, H, scale=H**-0.5), randn(E, 2 * I, H, scale=H**-0.5), randn(E, H, I, scale=I**-0.5)
    xs = list(x.chunk(W))
    cluster = SimulatedCluster(H, I, E, k, world_size=W, max_tokens=max(len(c) for c in xs), dtype=dtype)
    single = measure(lambda: flashmoe.moe(x, router_weight, w1, w2, top_k=k, backend="native"), args.repeats)
    multi = measure(lambda: cluster.forward(xs, router_weight, w1, w2), args.repeats)
    ys = cluster.forward(xs, router_weight, w1, w2)
    assert torch.equal(torch.cat(ys), flashmoe.moe(x, router_weight, w1, w2, top_k=k, backend="native"))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_isa {flashmoe.build_info()['cpu_isa']}")
    print(f"# H={H} I={I} E={E} k={k} T={T} {args.dtype}; W={W} ranks x 1 thread vs 1 rank x "
          f"{torch.get_num_threads()} threads; outputs bitwise equal")
    print(f"{'run':<22}{'wall ms':>10}{'cpu ms':>10}")
    print(f"{'single rank':<22}{single[0] * 1e3:>10.1f}{single[1] * 1e3:>10.1f}")
    print(f"{f'{W} simulated ranks':<22}{multi[0] * 1e3:>10.1f}{multi[1] * 1e3:>10.1f}")
    print(f"cpu time ratio (W={W} / single): {multi[1] / single[1]:.2f}")


if __name__ == "__main__":
    main()
