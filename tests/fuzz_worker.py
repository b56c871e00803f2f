"""The child side of tests/test_fuzz.py: runs fuzz cases read as JSON lines from stdin, one at a time.

For each case it prints ``BEGIN i`` before running it and ``END i <verdict> <detail>`` after, flushing
both, so a crash or a hang leaves the case it was in on record for the parent. Verdicts:

- ``named``: a ValueError or TypeError whose message names an argument;
- ``ok``: a result within the contract of the float64 reference (or, where the inputs make the
  comparison meaningless, the right shape, dtype and finiteness);
- ``violation``: anything else (another exception, an unnamed error, a wrong result).

Run by hand: ``python tests/fuzz_worker.py < cases.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flashmoe  # noqa: E402
from flashmoe import reference  # noqa: E402
from flashmoe.testing import SimulatedCluster, simulate_expert_parallel  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "int32": torch.int32}
# The contract's bounds (DESIGN.md "Checks"), times 10: fuzz shapes go down to H = I = 1.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-1, torch.float16: 5e-2}
# Every argument a message may name.
ARGUMENT_NAMES = ("x", "xs", "router_weight", "w1", "w2", "router_bias", "b1", "b2", "top_k", "gated", "activation",
                  "scoring", "normalize", "capacity_factor", "backend", "return_routing", "hidden", "ffn", "experts",
                  "num_experts", "hidden_size", "ffn_size", "dtype", "max_tokens", "tokens", "world_size",
                  "threads_per_rank", "grad_y", "topk_ids", "needs_grad", "block", "load_balancing_coef")


def decode(value):
    """JSON stand-ins for what JSON cannot hold."""
    if isinstance(value, dict) and "special" in value:
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge_int": 10**400,
                "int64_overflow": 2**70}[value["special"]]
    return value


def make_tensor(spec, generator):
    """spec: shape, dtype, layout (contiguous / transposed / offset / expanded), values, scale."""
    shape, dtype = tuple(spec["shape"]), DTYPES[spec["dtype"]]
    layout, values = spec["layout"], spec["values"]

    def draw(*size):
        base = torch.randn(tuple(size), generator=generator, dtype=torch.float64) * spec["scale"]
        if values != "normal" and base.numel():
            flat = base.reshape(-1)
            special = {"nan": math.nan, "inf": math.inf, "huge": 3e38, "denormal": 1e-41}[values]
            flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=generator)] = special
        return base.to(dtype)  # the layout is made after the cast, which would copy it away

    if layout == "transposed" and len(shape) >= 2:
        return draw(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "offset":
        return draw(math.prod(shape) + 3)[3:].view(shape)
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        return draw(1, *shape[1:]).expand(shape)
    return draw(*shape)


def named(error: Exception) -> bool:
    message = str(error)
    return any(f"{name}" in message for name in ARGUMENT_NAMES)


def finite_inputs(case) -> bool:
    return all(spec["values"] in ("normal", "denormal") for spec in case["tensors"].values() if spec)


def check_result(case, tensors, options, x, y) -> str:
    """'' when y (for tokens x) is within the contract of the float64 reference, else why not."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        return f"y has shape {getattr(y, 'shape', None)} dtype {getattr(y, 'dtype', None)}, x {tuple(x.shape)} {x.dtype}"
    if not finite_inputs(case) or x.numel() == 0:
        return ""  # NaN / Inf / huge inputs: the contract asks for no crash, no hang, NaN stays NaN
    doubles = {name: (None if t is None else t.double()) for name, t in tensors.items()}
    ref = reference.moe(x.double(), doubles["router_weight"], doubles["w1"], doubles["w2"],
                        router_bias=doubles.get("router_bias"), b1=doubles.get("b1"), b2=doubles.get("b2"), **options)
    # Routing is only comparable away from ties within rounding (conftest.boundary_ties).
    from conftest import boundary_ties

    logits = reference.router_logits(x.double().reshape(-1, x.shape[-1]), doubles["router_weight"],
                                     doubles.get("router_bias"))
    if bool(boundary_ties(logits, options["top_k"], options.get("scoring", "softmax"), 1e-3).any()):
        return ""
    if not torch.isfinite(y).all():
        return "y is not finite for finite inputs" if torch.isfinite(ref).all() else ""
    norm = ref.norm().item()
    if norm < 1e-3 * math.sqrt(ref.numel()):
        return ""  # cancelled to ~0: no relative bound means anything
    error = (y.double() - ref).norm().item() / norm
    return "" if error <= TOLERANCE[x.dtype] else f"relative error {error:.3g} > {TOLERANCE[x.dtype]}"


def _rank_inputs(x, world):
    """x split over `world` ranks (the last ones possibly empty)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and isinstance(world, int) and 0 < world <= 8):
        return [x]
    xs = list(x.split(max(1, -(-x.shape[0] // world)))) if x.shape[0] else []
    return xs + [x[:0]] * (world - len(xs))


def call_entry(case, tensors, options, generator) -> list:
    """Runs the case's entry point; returns [(x, y)] pairs to check (one per rank when ranked)."""
    entry, x = case["entry"], tensors["x"]
    biases = dict(router_bias=tensors.get("router_bias"), b1=tensors.get("b1"), b2=tensors.get("b2"))
    if entry in ("native", "reference", "auto"):
        return [(x, flashmoe.moe(x, tensors["router_weight"], tensors["w1"], tensors["w2"], backend=entry, **biases,
                                 **options))]
    if entry == "module":
        rw, w1 = tensors["router_weight"], tensors["w1"]
        sizes = dict(case["sizes"])
        layer_options = {name: value for name, value in options.items() if name != "top_k"}
        layer = flashmoe.MoE(decode(sizes["hidden"]), decode(sizes["ffn"]), decode(sizes["experts"]),
                             options["top_k"], dtype=w1.dtype, **layer_options)
        with torch.no_grad():
            for name in ("router_weight", "w1", "w2"):
                getattr(layer, name).copy_(tensors[name])
            return [(x, layer(x))]
    if entry == "from_hf":
        block = nn.Module()
        block.gate, block.experts = nn.Module(), nn.Module()
        def parameter(tensor):  # HF blocks hold Parameters; ints cannot require grad
            return nn.Parameter(tensor, requires_grad=tensor.is_floating_point())

        block.gate.weight, block.gate.top_k = parameter(tensors["router_weight"]), options["top_k"]
        block.gate.norm_topk_prob = options["normalize"]
        block.experts.gate_up_proj, block.experts.down_proj = parameter(tensors["w1"]), parameter(tensors["w2"])
        block.experts.act_fn = nn.SiLU()
        layer_options = {name: options[name] for name in ("scoring", "capacity_factor")}
        layer = flashmoe.MoE.from_hf(block, **layer_options)
        with torch.no_grad():
            return [(x, layer(x))]
    if entry in ("raw_forward", "raw_backward"):
        args = [x, tensors["router_weight"], tensors["w1"], tensors["w2"], biases["router_bias"], biases["b1"],
                biases["b2"], options["top_k"], options["gated"], options["activation"], options["normalize"],
                options["scoring"], options["capacity_factor"]]
        outputs = torch.ops.flashmoe.moe_forward(*args)
        if entry == "raw_backward":
            grad_y = torch.randn(outputs[0].shape, generator=generator).to(outputs[0].dtype)
            grads = torch.ops.flashmoe.moe_backward(grad_y, None, None, *args[:7], outputs[1], *args[7:],
                                                    case["needs_grad"])
            for grad, tensor, need in zip(grads, args[:7], case["needs_grad"]):
                if need and tensor is not None and (grad.shape != tensor.shape or not torch.isfinite(grad).all()
                                                    and finite_inputs(case)):
                    raise AssertionError(f"gradient {tuple(grad.shape)} for an input {tuple(tensor.shape)}, "
                                         f"finite: {bool(torch.isfinite(grad).all())}")
        return [(x, outputs[0])]
    if entry in ("simulate", "cluster"):
        world = decode(case["world_size"])
        xs = _rank_inputs(x, world)
        if entry == "simulate":
            ys = simulate_expert_parallel(xs, tensors["router_weight"], tensors["w1"], tensors["w2"], world_size=world,
                                          **biases, **options)
        else:
            rw, w2 = tensors["router_weight"], tensors["w2"]
            shape = (rw.shape[1], w2.shape[-1], rw.shape[0]) if rw.dim() == 2 and w2.dim() == 3 else (1, 1, 1)
            cluster = SimulatedCluster(*shape, options["top_k"], world_size=world,
                                       max_tokens=decode(case["max_tokens"]), dtype=x.dtype, gated=options["gated"],
                                       activation=options["activation"], normalize=options["normalize"],
                                       scoring=options["scoring"], with_router_bias=biases["router_bias"] is not None,
                                       with_b1=biases["b1"] is not None, with_b2=biases["b2"] is not None,
                                       watchdog_seconds=30)
            ys = cluster.forward(xs, tensors["router_weight"], tensors["w1"], tensors["w2"],
                                 capacity_factor=options["capacity_factor"], **biases)
        # Capacity is per (source rank, expert): each rank equals the layer on its own tokens.
        return list(zip(xs, ys))
    raise AssertionError(f"unknown entry {entry}")


def run_case(case) -> tuple[str, str]:
    generator = torch.Generator().manual_seed(case["seed"])
    tensors = {name: (None if spec is None else make_tensor(spec, generator)) for name, spec in case["tensors"].items()}
    options = {name: decode(value) for name, value in case["options"].items()}
    torch.set_num_threads(case["threads"])
    try:
        pairs = call_entry(case, tensors, options, generator)
    except (ValueError, TypeError) as error:
        if named(error):
            return "named", f"{type(error).__name__}: {str(error)[:160]}"
        return "violation", f"unnamed {type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001 - any other exception is a finding
        return "violation", f"{type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}"
    if case["entry"] == "from_hf":  # what the block means: a gated SiLU layer
        options = dict(options, gated=True, activation="silu", normalize=bool(options["normalize"]))
    for x, y in pairs:
        why = check_result(case, tensors, options, x, y)
        if why:
            return "violation", why
    return "ok", ""


def main() -> None:
    for index, line in enumerate(sys.stdin):
        case = json.loads(line)
        print(f"BEGIN {index}", flush=True)
        verdict, detail = run_case(case)
        print(f"END {index} {verdict} {json.dumps(detail)}", flush=True)


if __name__ == "__main__":
    main()
