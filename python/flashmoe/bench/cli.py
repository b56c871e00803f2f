"""`flashmoe-bench`: time MoE layers across shapes, token counts, dtypes and backends.

Run `flashmoe-bench --help`; bench/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, List, Optional

import torch

from . import backends, hf_blocks, memory, report
from .configs import (ACTIVATIONS, NAMED_CONFIGS, SCORINGS, LayerShape, custom_shape, touched_weight_bytes,
                      useful_flops, weight_bytes)
from .problem import MoEProblem, make_inputs, make_weights, rotating_input_count
from .routing import ROUTINGS, mean_experts_hit, routing_stats, skewed_router_bias
from .timing import time_runner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CONFIG = "olmoe"
DEFAULT_TOKENS = [1, 16, 256]
DEFAULT_BACKENDS = "native,reference,hf-eager,hf-grouped-mm"
# Timed iterations when --iters is not given; --budget usually binds first on the CPU.
DEFAULT_ITERS = {"cpu": 10, "cuda": 50}
DEFAULT_BUDGET_S = 2.0
# Warm-up calls when --warmup is not given: at least one pass over the rotating
# inputs, because oneDNN JIT-compiles a kernel (~8 ms) for every new bf16 GEMM
# shape on the CPU, and each input routes a different number of tokens to each
# expert. Timing those compiles would measure the JIT, not the layer.
MIN_CUDA_WARMUP = 10


def _list_of(parse_item: Callable[[str], object], what: str):
    """An argparse type: a comma-separated list, each item checked by parse_item."""
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return [parse_item(item) for item in items]
    return parse


def _choice(choices, what: str):
    def parse(item: str) -> str:
        if item not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; choose from {', '.join(choices)}")
        return item
    return parse


def _positive_int(item: str) -> int:
    try:
        value = int(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {item!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(item: str) -> int:
    return 0 if item.strip() == "0" else _positive_int(item)


def _non_negative_float(item: str) -> float:
    return 0.0 if item.strip() in ("0", "0.0") else _positive_float(item)


def _positive_float(item: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {item!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {item!r}")
    return value


def _config_help() -> str:
    lines = ["named configurations (--config):"]
    for shape in NAMED_CONFIGS.values():
        lines.append(f"  {shape.name:14s} {shape.describe()}  [{shape.note}]")
    lines.append("backends (--backend):")
    for name, text in backends.BACKEND_HELP.items():
        lines.append(f"  {name:14s} {text}")
    lines.append(f"  {backends.FLOOR_BACKEND}  (with --floors) dense torch matmuls of the layer's FLOPs")
    lines.append(f"  {backends.COPY_FLOOR_BACKEND}      (with --floors) a device-to-device copy of the weight bytes "
                 "the layer reads (router, shared expert and hit experts): the memory-bandwidth floor")
    lines.append("routing (--routing): uniform = random router, no bias; skewed = Zipf router bias "
                 "calibrated so ~half the picks land on the hottest max(ceil(E/10), k) experts.")
    lines.append("Times are the median and p10-p90 of the timed calls (n, at most --iters, fewer when "
                 "--budget binds); bench/README.md explains every column.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoe-bench", description="Time flashmoe MoE layers against baselines and floors.",
        epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("layer shape")
    shape.add_argument("--config", "--shape", dest="config", type=_list_of(_choice(list(NAMED_CONFIGS), "config"), "config names"),
                       help=f"named shapes, comma-separated (default {DEFAULT_CONFIG} unless a custom "
                            "shape is given)")
    shape.add_argument("--hidden", type=_positive_int, help="H; overrides a named config, or defines a custom shape")
    shape.add_argument("--ffn", type=_positive_int, help="I, the FFN size of one expert")
    shape.add_argument("--experts", type=_positive_int,
                       help="E; on a named config this overrides its expert count (the config's name then "
                            "says so, e.g. deepseek-v3[E=32]), so a model whose experts do not fit in memory "
                            "runs with fewer; a group-limited router keeps its group count")
    shape.add_argument("--top-k", type=_positive_int, help="k")
    shape.add_argument("--plain", action="store_true", help="non-gated expert FFN (w1 is [E,I,H])")
    shape.add_argument("--activation", type=_choice(ACTIVATIONS, "activation"),
                       help=f"one of {', '.join(ACTIVATIONS)}")
    shape.add_argument("--scoring", type=_choice(SCORINGS, "scoring"), help=f"one of {', '.join(SCORINGS)}")
    shape.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="divide the top-k weights by their sum")
    shape.add_argument("--capacity-factor", type=_positive_float,
                       help="expert capacity ceil(cf*T*k/E); default dropless. expert-loop, grouped-mm "
                            "and the hf-* blocks support only dropless")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--tokens", type=_list_of(_positive_int, "token counts"),
                       default=DEFAULT_TOKENS,
                       help=f"token counts T, comma-separated (default {','.join(map(str, DEFAULT_TOKENS))})")
    sweep.add_argument("--dtype", type=_list_of(_choice(list(DTYPES), "dtype"), "dtypes"), default=["bf16"],
                       help="fp32, bf16 or fp16, comma-separated (default bf16)")
    sweep.add_argument("--backend", type=_list_of(_choice(list(backends.BACKENDS), "backend"), "backends"),
                       default=DEFAULT_BACKENDS.split(","),
                       help=f"comma-separated from {', '.join(backends.BACKENDS)} (default {DEFAULT_BACKENDS})")
    sweep.add_argument("--routing", type=_list_of(_choice(ROUTINGS, "routing"), "routings"),
                       default=["uniform"], help="uniform and/or skewed (default uniform)")
    sweep.add_argument("--floors", action="store_true",
                       help=f"also time the device's floors: '{backends.FLOOR_BACKEND}' (dense torch matmuls with "
                            f"the layer's FLOPs) and '{backends.COPY_FLOOR_BACKEND}' (a copy of the weight bytes the "
                            "layer reads, for the bandwidth floor)")
    sweep.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                       help="the 'rel err' column: each backend's ||y - ref|| / ||ref|| on the first input, "
                            "against flashmoe.reference in float64 on the same inputs and weights (default on; "
                            "holds a float64 copy of the weights)")
    sweep.add_argument("--baseline-max-tokens", type=_positive_int, metavar="T",
                       help=f"skip the slow pure-PyTorch baselines ({', '.join(backends.SLOW_BASELINES)}) for "
                            "token counts above T (their rows say 'skipped')")

    run = parser.add_argument_group("run")
    run.add_argument("--warmup", type=_non_negative_int,
                     help="untimed calls first (default: one per rotating input; at least 10 on cuda)")
    run.add_argument("--iters", type=_positive_int, help="timed calls at most (default cpu 10, cuda 50)")
    run.add_argument("--budget", type=_non_negative_float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                     help="time budget per row: warm-up stops after half of it, and the timed calls are "
                          "cut to fit the other half, at least one (default 2; 0 = no budget)")
    run.add_argument("--threads", type=_positive_int, help="torch.set_num_threads")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and the skewed bias")
    run.add_argument("--world-size", type=_positive_int, metavar="W",
                     help="expert parallelism: start W local processes (gloo) and time flashmoe.distributed's "
                          "transports against the single-process op on the same total tokens; --tokens are "
                          "per rank (first --config and --dtype)")
    run.add_argument("--loopback", type=_positive_int, metavar="W",
                     help="CUDA only: time W virtual ranks of the expert-parallel kernel in one launch on one GPU "
                          "(flashmoe.loopback) against the single-GPU op on the same total tokens; --tokens are "
                          "per rank (first --config and --dtype)")
    run.add_argument("--transport", type=_list_of(_choice(("symmetric", "all_to_all"), "transport"), "transports"),
                     default=["symmetric", "all_to_all"], help="with --world-size: transports to time")
    run.add_argument("--json", metavar="PATH", help="write every row and the environment as JSON "
                                                      "(results go in bench/results/)")
    return parser


def resolve_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[LayerShape]:
    dims = dict(hidden_size=args.hidden, ffn_size=args.ffn, num_experts=args.experts, top_k=args.top_k)
    options = dict(gated=False if args.plain else None, activation=args.activation, scoring=args.scoring,
                   normalize=args.normalize, capacity_factor=args.capacity_factor)
    if args.config:
        shapes = [NAMED_CONFIGS[name].override(**dims, **options) for name in args.config]
    elif any(value is not None for value in dims.values()):
        flags = dict(hidden_size="--hidden", ffn_size="--ffn", num_experts="--experts", top_k="--top-k")
        missing = [flags[key] for key, value in dims.items() if value is None]
        if missing:
            parser.error(f"a custom shape needs {', '.join(missing)} too (or pick a --config)")
        shapes = [custom_shape(**dims, **options)]
    else:
        shapes = [NAMED_CONFIGS[DEFAULT_CONFIG].override(**options)]
    for shape in shapes:
        if shape.top_k > shape.num_experts:
            parser.error(f"--top-k {shape.top_k} exceeds --experts {shape.num_experts} for {shape.name}")
        if shape.num_groups > 1:
            per_group = shape.num_experts // shape.num_groups
            if shape.num_experts % shape.num_groups or per_group < 2:
                parser.error(f"--experts {shape.num_experts}: {shape.name} routes within {shape.num_groups} "
                             f"groups, so E must be a multiple of {shape.num_groups} with at least 2 experts a group")
            if shape.topk_groups * per_group < shape.top_k:
                parser.error(f"--experts {shape.num_experts}: {shape.name}'s top {shape.topk_groups} of "
                             f"{shape.num_groups} groups hold {shape.topk_groups * per_group} experts, fewer than "
                             f"k={shape.top_k}")
    return shapes


def resolve_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch reports no CUDA device (torch "
                     f"{torch.__version__}, CUDA {torch.version.cuda})")
    if args.device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def check_memory(shapes, dtype_names, args, device) -> List[str]:
    """One message per (shape, dtype) that would not fit; empty when all fit."""
    available = memory.available_bytes(device)
    max_tokens = max(args.tokens)

    def needed(shape: LayerShape, dtype: torch.dtype) -> int:
        return memory.footprint_bytes(shape, dtype, max_tokens, args.iters, args.floors, args.accuracy)

    problems = []
    for shape in shapes:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            if memory.fits(needed(shape, dtype), available):
                continue
            message = (f"{shape.name} {dtype_name} at T={max_tokens} needs ~{memory.gib(needed(shape, dtype))} "
                       f"(weights {memory.gib(weight_bytes(shape, dtype))}) but {device} has "
                       f"{memory.gib(available)} available")
            # A group-limited router needs E a multiple of its groups and enough experts in its top groups.
            least = max(shape.top_k, shape.num_groups * max(2, -(-shape.top_k // shape.topk_groups))
                        if shape.num_groups > 1 else 0)
            smaller = dataclasses.replace(shape, num_experts=shape.num_experts // 2)
            while smaller.num_experts >= least and not memory.fits(needed(smaller, dtype), available):
                smaller = dataclasses.replace(smaller, num_experts=smaller.num_experts // 2)
            if smaller.num_experts >= least and smaller.num_experts % max(1, shape.num_groups) == 0:
                message += f"; --experts {smaller.num_experts} would fit"
            problems.append(message)
    return problems


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False, unit="row")


def measure(backend: str, problem: MoEProblem, args, device) -> dict:
    """Time one backend on one problem; errors become the row's result."""
    inputs = len(problem.inputs)
    if args.warmup is not None:
        warmup = args.warmup
    else:
        warmup = max(inputs, MIN_CUDA_WARMUP) if device.type == "cuda" else inputs
    if (args.baseline_max_tokens is not None and backend in backends.SLOW_BASELINES
            and problem.tokens > args.baseline_max_tokens):
        return {"status": "skipped", "error": None,
                "skip_reason": f"T > --baseline-max-tokens {args.baseline_max_tokens}"}
    try:
        runner = backends.build_runner(backend, problem)
    except (hf_blocks.HFBlockUnavailable, backends.Unsupported) as error:
        return {"status": "skipped", "error": None, "skip_reason": str(error)}
    except Exception as error:
        return {"status": "error", "error": f"{type(error).__name__}: {error}"}
    try:
        timing = time_runner(runner, warmup=warmup, iters=args.iters, inputs=inputs, device=device,
                             budget_s=args.budget or None)
        rel_err = None
        if args.accuracy and backend not in backends.FLOOR_BACKENDS:
            with torch.no_grad():
                rel_err = problem.relative_error(runner(0))
    except Exception as error:  # one failing backend must not end the sweep
        if device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory row must not starve the next one
        return {"status": "error", "error": f"{type(error).__name__}: {error}"}
    flops = useful_flops(problem.shape, problem.tokens)
    seconds = timing.median_ms / 1e3
    row = {
        "status": "ok", "error": None,
        "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
        "min_ms": min(timing.samples_ms), "max_ms": max(timing.samples_ms),
        "samples_ms": timing.samples_ms, "iterations": len(timing.samples_ms),
        "warmup_calls": timing.warmup_calls, "rel_err": rel_err,
        "tokens_per_s": problem.tokens / seconds if seconds > 0 else math.inf,
        "tflops": flops / seconds / 1e12 if seconds > 0 else math.inf,
    }
    if backend == backends.COPY_FLOOR_BACKEND:  # a copy does no FLOPs and serves no tokens
        row.update(tokens_per_s=None, tflops=None, bytes_copied=runner.copied_bytes,
                   copy_gbps=runner.bytes_moved / seconds / 1e9 if seconds > 0 else math.inf)
    del runner  # the floors hold device buffers of their own
    return row


def _ok_row(rows: List[dict], backend: str) -> Optional[dict]:
    return next((row for row in rows if row["backend"] == backend and row["status"] == "ok"), None)


def _add_comparisons(rows: List[dict]) -> None:
    """Ratios within one (config, dtype, routing, T) group; None where a side did not run.

    speedup_vs_reference / speedup_vs_grouped_mm: that backend's median / this median.
    dense_fraction: this TFLOP/s / the dense-matmul floor's TFLOP/s.
    weight_floor_ms: weight_bytes_touched / the copy floor's bandwidth (bytes read + written per
    second); over_weight_floor: this median / weight_floor_ms.
    """
    reference = _ok_row(rows, backends.REFERENCE_BACKEND)
    grouped_mm = _ok_row(rows, backends.GROUPED_MM_BACKEND)
    dense = _ok_row(rows, backends.FLOOR_BACKEND)
    copy = _ok_row(rows, backends.COPY_FLOOR_BACKEND)
    weight_floor_ms = None
    if copy is not None and copy["copy_gbps"]:
        weight_floor_ms = rows[0]["weight_bytes_touched"] / (copy["copy_gbps"] * 1e9) * 1e3
    for row in rows:
        ok = row["status"] == "ok"
        row["speedup_vs_reference"] = reference["median_ms"] / row["median_ms"] if ok and reference else None
        row["speedup_vs_grouped_mm"] = grouped_mm["median_ms"] / row["median_ms"] if ok and grouped_mm else None
        row["dense_fraction"] = (row["tflops"] / dense["tflops"]
                                 if ok and dense and row.get("tflops") and dense["tflops"] else None)
        row["weight_floor_ms"] = weight_floor_ms
        row["over_weight_floor"] = row["median_ms"] / weight_floor_ms if ok and weight_floor_ms else None


def run_sweep(shapes, args, device) -> List[dict]:
    backend_names = list(args.backend) + (list(backends.FLOOR_BACKENDS) if args.floors else [])
    total = len(shapes) * len(args.dtype) * len(args.routing) * len(args.tokens) * len(backend_names)
    progress = _progress(total)
    rows: List[dict] = []
    for shape in shapes:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            if progress is not None:
                progress.set_description(f"{shape.name} {dtype_name} making weights")
            weights = make_weights(shape, dtype, device, seed=args.seed)
            for routing in args.routing:
                skew = (skewed_router_bias(shape, weights.router_weight, torch.Generator().manual_seed(args.seed + 1))
                        if routing == "skewed" else None)
                router_bias = skew.router_bias.to(weights.router_weight.dtype) if skew else None
                for tokens in args.tokens:
                    count = rotating_input_count(tokens, shape.hidden_size, dtype, args.iters)
                    inputs = make_inputs(shape, tokens, dtype, device, seed=args.seed + 2 + tokens, count=count)
                    experts_hit = mean_experts_hit(shape, inputs, weights.router_weight, router_bias,
                                                   weights.selection_bias)
                    touched = touched_weight_bytes(shape, dtype, experts_hit)
                    problem = MoEProblem(shape, weights, router_bias, inputs, weight_bytes_touched=touched)
                    stats = routing_stats(shape, inputs[0], weights.router_weight, router_bias,
                                          skew.hot_experts if skew else None, weights.selection_bias)
                    stats["experts_hit_mean"] = round(experts_hit, 3)
                    group = []
                    for backend in backend_names:
                        if progress is not None:
                            progress.set_description(f"{shape.name} {dtype_name} T={tokens} {backend}")
                        row = {"config": shape.name, "shape": shape.describe(), "dtype": dtype_name,
                               "tokens": tokens, "routing": routing, "backend": backend,
                               "flops": useful_flops(shape, tokens), "rotating_inputs": len(inputs),
                               "weight_bytes_touched": touched, "routing_stats": stats}
                        row.update(measure(backend, problem, args, device))
                        group.append(row)
                        if progress is not None:
                            progress.update()
                    _add_comparisons(group)
                    rows.extend(group)
                    del problem, inputs
            del weights
    if progress is not None:
        progress.close()
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        shapes = resolve_shapes(args, parser)
        device = resolve_device(args, parser)
    except SystemExit as exit_:  # argparse has printed the usage error (or --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, shapes, device)
    finally:  # main() may be called in-process (tests); leave torch as it was
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: List[str], shapes: List[LayerShape], device: torch.device) -> int:
    if args.loopback is not None:
        return _run_loopback(args, argv, shapes[0], device)
    if args.world_size is not None:
        return _run_distributed(args, argv, shapes[0], device)
    if args.iters is None:
        args.iters = DEFAULT_ITERS[device.type]

    too_big = check_memory(shapes, args.dtype, args, device)
    if too_big:
        print("flashmoe-bench: error: not enough memory for:", file=sys.stderr)
        for line in too_big:
            print(f"  {line}", file=sys.stderr)
        print("try a smaller --dtype (bf16 halves fp32), fewer --experts, or fewer --tokens", file=sys.stderr)
        return 2

    env = report.environment(device, ["flashmoe-bench"] + argv)
    timer = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    warmup = "one warm-up call per rotating input" if args.warmup is None else f"{args.warmup} warm-up calls"
    budget = f", cut to a {args.budget:g} s budget per row" if args.budget else ""
    timing_note = (f"{timer}: median and p10-p90 of n <= {args.iters} timed calls after {warmup}{budget}; "
                   "inputs rotate; TFLOP/s counts router + expert GEMMs")
    if args.accuracy:
        timing_note += ("; rel err = ||y - y_ref|| / ||y_ref|| on the first input, y_ref = flashmoe.reference "
                        "in float64 on the same inputs and weights (each backend routes for itself)")
    if args.floors:
        timing_note += ("; %dense = TFLOP/s / dense-matmul-floor's; x wfloor = median / (weight bytes touched "
                        f"/ {backends.COPY_FLOOR_BACKEND} bandwidth)")
    report.print_lines(report.header_lines(env, shapes, timing_note))
    sys.stdout.flush()

    rows = run_sweep(shapes, args, device)
    print(report.format_table(rows))
    if args.json:
        path = report.write_json(args.json, env, dict(vars(args)), rows)
        print(f"# wrote {path}")
    failed = [row for row in rows if row["status"] == "error"]
    if failed:
        print(f"flashmoe-bench: {len(failed)} of {len(rows)} rows failed", file=sys.stderr)
        return 1
    return 0


def _run_distributed(args: argparse.Namespace, argv: List[str], shape: LayerShape, device: torch.device) -> int:
    from . import distributed
    if device.type != "cpu":
        print("flashmoe-bench: error: --world-size runs flashmoe.distributed on CPU tensors in this build",
              file=sys.stderr)
        return 2
    if shape.num_experts % args.world_size:
        print(f"flashmoe-bench: error: --world-size {args.world_size} must divide E={shape.num_experts}",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype[0]]
    env = report.environment(device, ["flashmoe-bench"] + argv)
    iters = args.iters or 20
    report.print_lines(report.header_lines(env, [shape], (
        f"W={args.world_size} processes x 1 thread (gloo); time.perf_counter per call, back to back, median of "
        f"n calls per rank after 2 warm-ups; tokens/s = W*T / slowest rank's median; single-process runs W*T "
        f"tokens with all experts")))
    sys.stdout.flush()
    rows = distributed.run(args.world_size, shape, dtype, list(args.tokens), iters, list(args.transport), args.seed)
    print(distributed.format_rows(rows, args.world_size))
    if args.json:
        path = report.write_json(args.json, env, dict(vars(args)), rows)
        print(f"# wrote {path}")
    return 0


def _run_loopback(args: argparse.Namespace, argv: List[str], shape: LayerShape, device: torch.device) -> int:
    from .. import _C
    from ..loopback import MAX_LOOPBACK_WORLD
    from . import loopback

    def fail(message: str) -> int:
        print(f"flashmoe-bench: error: --loopback {args.loopback}: {message}", file=sys.stderr)
        return 2

    if device.type != "cuda":
        return fail("needs a CUDA device (virtual ranks share one GPU); this run is on the CPU")
    if not getattr(_C, "cuda_compiled", False):
        return fail("this flashmoe was built without its CUDA backend")
    if args.world_size is not None:
        return fail("give either --loopback or --world-size, not both")
    if not 2 <= args.loopback <= MAX_LOOPBACK_WORLD:
        return fail(f"W must be in [2, {MAX_LOOPBACK_WORLD}]")
    if shape.num_experts % args.loopback:
        return fail(f"W must divide E={shape.num_experts}")
    dtype = DTYPES[args.dtype[0]]
    env = report.environment(device, ["flashmoe-bench"] + argv)
    iters = args.iters or DEFAULT_ITERS["cuda"]
    report.print_lines(report.header_lines(env, [shape], (
        f"W={args.loopback} virtual ranks in one launch on one GPU; CUDA events, back to back, median of n calls "
        f"after 3 warm-ups; tokens/s = W*T / median; single GPU runs W*T tokens with all experts; GB/s = payload "
        f"+ control bytes of all ranks / median")))
    sys.stdout.flush()
    rows = loopback.run(args.loopback, shape, dtype, list(args.tokens), iters, args.seed, device)
    print(loopback.format_rows(rows))
    if args.json:
        path = report.write_json(args.json, env, dict(vars(args)), rows)
        print(f"# wrote {path}")
    return 0
