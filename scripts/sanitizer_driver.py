"""A few small CUDA calls of flashmoe::moe_forward, for compute-sanitizer (scripts/compute_sanitizer.sh).

Inputs are drawn on the CPU and copied over, and every result is copied back and checked against
the float64 reference on the CPU, so the only kernels that touch the GPU's memory are flashmoe's
and torch's copies and fills. Exits 1 when a result is wrong or a second run is not bit-identical,
2 when CUDA or the CUDA backend is missing.

    python scripts/sanitizer_driver.py            # every case
    python scripts/sanitizer_driver.py --list     # the cases
    python scripts/sanitizer_driver.py --case 0,3 # some of them
"""

from __future__ import annotations

import argparse
import sys

import torch

import flashmoe
from flashmoe import _C, reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# (tokens, hidden, ffn, experts, top_k, dtype, options); biases on every other case.
CASES = [
    (1, 64, 96, 8, 2, torch.bfloat16, dict()),
    (130, 64, 96, 8, 2, torch.bfloat16, dict(capacity_factor=0.5)),
    (130, 40, 24, 4, 2, torch.float16, dict(gated=False, activation="gelu")),
    (1, 67, 45, 16, 4, torch.float32, dict(scoring="sigmoid", normalize=False, capacity_factor=1.0)),
    (130, 67, 45, 16, 4, torch.float32, dict(gated=False, activation="relu", capacity_factor=0.5)),
    (130, 136, 72, 8, 8, torch.bfloat16, dict(activation="gelu_tanh")),
    (130, 64, 96, 8, 2, torch.float32, dict(allow_tf32=True)),
    (1, 40, 24, 1, 1, torch.float16, dict(capacity_factor=2.0)),
]


def describe(index: int) -> str:
    tokens, hidden, ffn, experts, top_k, dtype, options = CASES[index]
    extra = " ".join(f"{key}={value}" for key, value in options.items())
    return (f"case {index}: T={tokens} H={hidden} I={ffn} E={experts} k={top_k} "
            f"{str(dtype).replace('torch.', '')} biases={index % 2 == 1} {extra}").rstrip()


def make_inputs(index: int) -> dict:
    tokens, hidden, ffn, experts, _top_k, dtype, options = CASES[index]
    generator = torch.Generator().manual_seed(1000 + index)
    rows = 2 * ffn if options.get("gated", True) else ffn

    def normal(*shape, std):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype)

    inputs = dict(x=normal(tokens, hidden, std=1.0), router_weight=normal(experts, hidden, std=hidden ** -0.5),
                  w1=normal(experts, rows, hidden, std=hidden ** -0.5), w2=normal(experts, hidden, ffn, std=ffn ** -0.5))
    if index % 2 == 1:
        inputs.update(router_bias=normal(experts, std=0.5), b1=normal(experts, rows, std=0.3),
                      b2=normal(experts, hidden, std=0.3))
    return inputs


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in BITS:
        return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))
    return torch.equal(a, b)


def run_case(index: int) -> list:
    """Problems found in one case (empty when it passed)."""
    tokens, _hidden, _ffn, experts, top_k, dtype, options = CASES[index]
    options = dict(options)
    allow_tf32 = options.pop("allow_tf32", False)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    inputs = make_inputs(index)
    on_gpu = {name: tensor.cuda() for name, tensor in inputs.items()}
    runs = []
    for _ in range(2):
        y, routing = flashmoe.moe(**on_gpu, top_k=top_k, return_routing=True, backend="native", **options)
        runs.append([y.cpu()] + [tensor.cpu() for tensor in routing])
    torch.cuda.synchronize()
    problems = [f"output {i} differs between two runs" for i, (a, b) in enumerate(zip(*runs)) if not same_bits(a, b)]

    y, topk_ids, _weights, expert_counts, dropped, _logits = runs[0]
    ref_y, ref_routing = reference.moe(**{n: t.double() for n, t in inputs.items()}, top_k=top_k,
                                       return_routing=True, **options)
    error = ((y.double() - ref_y).norm() / ref_y.norm()).item()
    tolerance = TF32_TOLERANCE if allow_tf32 else TOLERANCE[dtype]
    if not error <= tolerance:
        problems.append(f"y: rel err {error:.3g} > {tolerance:g}")
    ids = topk_ids.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= experts):
        problems.append("topk_ids out of range")
    if int(expert_counts.long().sum()) != tokens * top_k:
        problems.append(f"expert_counts sum {int(expert_counts.long().sum())} != T*k = {tokens * top_k}")
    capacity = reference.expert_capacity(options.get("capacity_factor"), tokens, top_k, experts)
    expected_dropped = 0 if capacity is None else int((expert_counts.long() - capacity).clamp_min(0).sum())
    if int(dropped) != expected_dropped:
        problems.append(f"dropped {int(dropped)} != {expected_dropped} from expert_counts")
    untied = ~boundary_ties(ref_routing.router_logits, top_k, options.get("scoring", "softmax"),
                            1e-2 if allow_tf32 else 1e-5)
    if not torch.equal(topk_ids[untied].sort(dim=-1).values, ref_routing.topk_ids[untied].sort(dim=-1).values):
        problems.append("the set of picks differs from the reference on a token without a near tie")
    return problems


def boundary_ties(logits: torch.Tensor, top_k: int, scoring: str, rtol: float) -> torch.Tensor:
    """[T] bool: the k-th and (k+1)-th best scores are within rtol (relative) of each other."""
    if top_k >= logits.shape[-1]:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    ordered = scores.sort(dim=-1, descending=True).values
    return (ordered[:, top_k - 1] - ordered[:, top_k]) < rtol * ordered[:, top_k - 1].abs()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="comma-separated case indices (default: all)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for index in range(len(CASES)):
            print(describe(index))
        return 0
    if not torch.cuda.is_available() or not getattr(_C, "cuda_compiled", False):
        print("sanitizer_driver: needs a CUDA device and flashmoe built with its CUDA backend", file=sys.stderr)
        return 2
    indices = range(len(CASES)) if not args.case else [int(item) for item in args.case.split(",")]
    failed = 0
    for index in indices:
        problems = run_case(index)
        print(f"{'FAIL' if problems else 'ok  '} {describe(index)}" + "".join(f"\n     {p}" for p in problems),
              flush=True)
        failed += bool(problems)
    torch.cuda.synchronize()
    print(f"sanitizer_driver: {len(indices) - failed} of {len(indices)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
