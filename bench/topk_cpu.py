"""Times the native op's routing at large E and k on the CPU: the gate's top-k dominates a layer
of H = I = 1 (issue 16: the native top-k once grew as E·k²; E = k = 4096 took 76 s on 4 tokens).

    python bench/topk_cpu.py [--tokens 4] [--experts 256,512,4096] [--top-k 8,64,E] [--repeats 3]

Prints one row per (E, k): the median of `repeats` calls of flashmoe.moe(backend="native") with
one thread, and of the float64 reference for comparison. Copy the output to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import flashmoe


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: the cluster and its heap are built on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--experts", default="256,512,4096")
    parser.add_argument("--top-k", default="8,64,E", help="comma list; E means k = E")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="a (E, k) whose warm-up call takes longer is reported from that one call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# flashmoe {flashmoe.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread, load average {os.getloadavg()[0]:.2f}, T={args.tokens}, H=I=1, plain relu, softmax")
    print(f"{'E':>6} {'k':>6} {'native_s':>12} {'reference_s':>12}")
    generator = torch.Generator().manual_seed(16)
    for experts in (int(e) for e in args.experts.split(",")):
        x = torch.randn(args.tokens, 1, generator=generator)
        router_weight = torch.randn(experts, 1, generator=generator)
        w1 = torch.randn(experts, 1, 1, generator=generator)
        w2 = torch.randn(experts, 1, 1, generator=generator)
        for k_text in args.top_k.split(","):
            top_k = experts if k_text == "E" else int(k_text)
            options = dict(top_k=top_k, gated=False, activation="relu")

            def native():
                return flashmoe.moe(x, router_weight, w1, w2, backend="native", **options)

            def reference():
                return flashmoe.reference.moe(x.double(), router_weight.double(), w1.double(), w2.double(), **options)

            start = time.perf_counter()
            native()
            first = time.perf_counter() - start
            native_s = first if first > args.max_seconds else _time(native, args.repeats)
            reference_s = _time(reference, args.repeats)
            print(f"{experts:>6} {top_k:>6} {native_s:>12.6f} {reference_s:>12.6f}", flush=True)


if __name__ == "__main__":
    main()
