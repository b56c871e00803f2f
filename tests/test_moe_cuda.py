"""The CUDA kernel of flashmoe::moe_forward: parity with the float64 reference over the contract's
grid and the named model shapes, bit-reproducible runs, every output written whatever the
workspace holds, CUDA-graph capture, torch.compile, autograd, bad input, and stale state between
calls.

Every test is marked ``gpu``. The module skips as a whole where torch sees no CUDA device or
flashmoe was built without its CUDA backend (``flashmoe._C.cuda_compiled``); it still imports,
and nothing in it touches CUDA then. The reference always runs on float64 copies: on the CPU for
the small problems, on the GPU (one expert's weights at a time) for the named model shapes.
"""

import itertools
import math
import random
import warnings
import zlib

import pytest
import torch

import flashmoe
from conftest import (TOLERANCE, assert_routing_matches, check_nan_token_stays_in_its_row, dtype_id, inner_ties,
                      make_problem, native_problem, raw_addresses, rel_err, run_reference, same_bits)
from flashmoe import _C, reference
from flashmoe.bench.configs import NAMED_CONFIGS

CUDA_READY = bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and flashmoe built with its CUDA backend"),
]

CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TF32_TOLERANCE = 5e-3  # DESIGN.md "Checks"
INPUT_NAMES = ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2")
OUTPUT_NAMES = ("y", "topk_ids", "topk_weights", "expert_counts", "router_logits", "dropped")
BAD = (ValueError, TypeError)

TOKENS = (1, 3, 64, 257)
EXPERTS_TOP_K = sorted({(e, k) for e in (1, 4, 8, 64) for k in (1, 2, e) if k <= e})
CAPACITY_CASES = [(0.5, 8, 2), (1.0, 8, 2), (1.25, 4, 1), (0.3, 64, 2), (1.0, 4, 4), (0.01, 8, 2), (2.0, 8, 2)]


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    """Every test here runs with exact fp32 math (conftest's exact_fp32) unless it asks for TF32."""


@pytest.fixture
def tf32(exact_fp32):
    """torch.backends.cuda.matmul.allow_tf32 = True for the test; exact_fp32 restores the flag after it."""
    torch.backends.cuda.matmul.allow_tf32 = True


@pytest.fixture
def watchdog():
    """A hung kernel blocks the next synchronize forever: dump every stack and exit after 300 s."""
    import faulthandler
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def on_cuda(problem: dict) -> dict:
    return {name: tensor.cuda() for name, tensor in problem.items()}


def routing_to_cpu(routing) -> reference.Routing:
    return reference.Routing(*(tensor.cpu() for tensor in routing))


def run_cuda(problem: dict, **options):
    """flashmoe.moe (native) on CUDA copies of a CPU problem; (y, Routing) back on the CPU."""
    y, routing = flashmoe.moe(**on_cuda(problem), return_routing=True, backend="native", **options)
    assert y.is_cuda and all(tensor.is_cuda for tensor in routing)
    return y.cpu(), routing_to_cpu(routing)


def check_parity(problem: dict, **options):
    """CUDA against the float64 reference: y within DESIGN's tolerance and the routing exactly."""
    y, routing = run_cuda(problem, **options)
    ref_y, ref_routing = run_reference(problem, **options)
    dtype = problem["x"].dtype
    assert y.dtype == dtype and y.shape == problem["x"].shape
    assert torch.isfinite(y).all(), "non-finite output for finite inputs"
    check_routing(routing, ref_routing, problem, options)
    if y.numel():
        err = rel_err(y, ref_y)
        assert err <= TOLERANCE[dtype], f"rel err {err:.3g} > {TOLERANCE[dtype]:.3g}"
    return (y, routing), (ref_y, ref_routing)


def op_args(problem: dict, *, top_k, gated=True, activation="silu", normalize=True, scoring="softmax",
            capacity_factor=None) -> tuple:
    """Positional arguments of torch.ops.flashmoe.moe_forward."""
    return tuple(problem.get(name) for name in INPUT_NAMES) + (
        top_k, gated, activation, normalize, scoring, capacity_factor)


def assert_same_outputs(a, b, what: str):
    for name, first, second in zip(OUTPUT_NAMES, a, b):
        assert same_bits(first, second), f"{name} differs between {what}"


def cuda_layer(hidden: int, ffn: int, experts: int, *, gated: bool, dtype: torch.dtype, seed: int) -> dict:
    """router_weight, w1, w2 drawn on the GPU directly in ``dtype`` (no float64 staging copy: a
    DeepSeek-V3 layer is 22 GiB in bf16). Same scales as conftest.make_problem."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def normal(*size, std):
        return torch.empty(size, dtype=dtype, device="cuda").normal_(0.0, std, generator=generator)

    rows = 2 * ffn if gated else ffn
    return dict(router_weight=normal(experts, hidden, std=1 / math.sqrt(hidden)),
                w1=normal(experts, rows, hidden, std=1 / math.sqrt(hidden)),
                w2=normal(experts, hidden, ffn, std=1 / math.sqrt(ffn)))


def reference_by_expert(problem: dict, *, top_k, gated=True, activation="silu", normalize=True, scoring="softmax",
                        capacity_factor=None):
    """reference.moe in float64 on the problem's device, with one expert's weights upcast at a time
    (reference.moe upcasts whole weight tensors: 90 GB for DeepSeek-V3). The same functions in the
    same order, so the same bits as reference.moe on float64 copies (test_reference_by_expert)."""
    x = problem["x"].double()
    router_bias = problem.get("router_bias")
    b1, b2 = problem.get("b1"), problem.get("b2")
    tokens, hidden = x.shape
    experts = problem["router_weight"].shape[0]
    logits = reference.router_logits(x, problem["router_weight"].double(),
                                     None if router_bias is None else router_bias.double())
    topk_ids, topk_weights = reference.route(logits, top_k, scoring=scoring, normalize=normalize)
    expert_counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=experts).to(torch.int32)
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    admitted = reference.admit(topk_ids, experts, capacity)
    dropped = (~admitted).sum(dtype=torch.int64)
    pick_outputs = torch.zeros(tokens * top_k, hidden, dtype=torch.float64, device=x.device)
    for expert, picks in reference.picks_by_expert(topk_ids, admitted, experts):
        expert_tokens = x.index_select(0, torch.div(picks, top_k, rounding_mode="floor"))
        pick_outputs[picks] = reference.expert_ffn(
            expert_tokens, problem["w1"][expert].double(), problem["w2"][expert].double(), gated=gated,
            activation=activation, b1=None if b1 is None else b1[expert].double(),
            b2=None if b2 is None else b2[expert].double())
    pick_outputs = pick_outputs.reshape(tokens, top_k, hidden)
    weights = torch.where(admitted, topk_weights, torch.zeros_like(topk_weights))
    y = weights[:, 0, None] * pick_outputs[:, 0]
    for slot in range(1, top_k):
        y = y + weights[:, slot, None] * pick_outputs[:, slot]
    return y, reference.Routing(topk_ids, topk_weights, expert_counts, dropped, logits)


def check_routing(routing, ref_routing, problem, options):
    """conftest.assert_routing_matches with the routing-relevant subset of flashmoe.moe options."""
    assert_routing_matches(routing, ref_routing, problem, top_k=options["top_k"],
                           scoring=options.get("scoring", "softmax"), normalize=options.get("normalize", True),
                           capacity_factor=options.get("capacity_factor"))


def shape_options(shape) -> dict:
    return dict(top_k=shape.top_k, gated=shape.gated, activation=shape.activation, normalize=shape.normalize,
                scoring=shape.scoring, capacity_factor=shape.capacity_factor)


# --------------------------------------------------------------------------- the build and the dispatch

def test_cuda_build_info():
    info = _C.cuda_build_info()
    assert {"archs", "cuda_version", "cutlass_version"} <= set(info)
    major, minor = torch.cuda.get_device_capability()
    assert info["archs"], "no target architecture recorded"
    assert flashmoe.ops.has_native_kernel(torch.device("cuda"))
    assert flashmoe.ops.has_native_kernel("cuda", torch.bfloat16)
    assert not flashmoe.ops.has_native_kernel("cuda", torch.float64)
    assert major >= 8, f"the CUDA kernel targets sm_80 and sm_90a; this device is sm_{major}{minor}"


def test_auto_backend_picks_the_cuda_kernel():
    problem = on_cuda(make_problem(0, tokens=33, hidden=67, ffn=45, experts=8, dtype=torch.bfloat16, top_k=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flashmoe")  # no "using the reference backend" warning
        auto = flashmoe.moe(**problem, top_k=2, backend="auto")
    native = flashmoe.moe(**problem, top_k=2, backend="native")
    assert auto.is_cuda and same_bits(auto, native)


def test_auto_backend_float64_falls_back_to_the_reference():
    problem = on_cuda(make_problem(1, tokens=9, hidden=16, ffn=8, experts=4, dtype=torch.float64, top_k=2))
    with pytest.warns(UserWarning, match="reference"):
        flashmoe.functional._warned_devices.discard(("cuda", torch.float64))
        y = flashmoe.moe(**problem, top_k=2, backend="auto")
    assert torch.equal(y, reference.moe(**problem, top_k=2))


# --------------------------------------------------------------------------- parity: the shape grid

@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("experts,top_k", EXPERTS_TOP_K, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", TOKENS)
def test_shape_grid(tokens, experts, top_k, dtype):
    seed = zlib.crc32(repr((tokens, experts, top_k, dtype_id(dtype))).encode())
    problem = make_problem(seed, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype, top_k=top_k)
    check_parity(problem, top_k=top_k)


OPTION_GRID = list(itertools.product(reference.ELEMENTWISE_ACTIVATIONS, (True, False), (True, False), ("softmax", "sigmoid"),
                                     (False, True)))


def _sampled_case(index):
    """Deterministic draw of the axes not crossed, for option combination ``index``."""
    rng = random.Random(index)
    dtype = CUDA_DTYPES[index % len(CUDA_DTYPES)]
    tokens = rng.choice(TOKENS)
    experts, top_k = rng.choice([(4, 2), (8, 2), (8, 1), (8, 8), (64, 2), (4, 4), (64, 8)])
    hidden, ffn = rng.choice([(67, 45), (130, 300), (40, 24), (256, 512), (130, 45)])
    return dtype, tokens, experts, top_k, hidden, ffn


@pytest.mark.parametrize("index", range(len(OPTION_GRID)),
                         ids=lambda i: "-".join(str(v) for v in OPTION_GRID[i]).replace("True", "T").replace("False", "F"))
def test_option_grid(index):
    activation, gated, normalize, scoring, biases = OPTION_GRID[index]
    dtype, tokens, experts, top_k, hidden, ffn = _sampled_case(index)
    problem = make_problem(2000 + index, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, gated=gated,
                           dtype=dtype, router_bias=biases, expert_bias=biases, top_k=top_k, scoring=scoring)
    check_parity(problem, top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
@pytest.mark.parametrize("scoring, hidden", [("softmax", 7168), ("sigmoid", 264)])
def test_fp32_router_of_half_x(scoring, hidden, dtype):
    """A float32 router (weight and bias) with bf16/fp16 x (issue 12, router precision): the gate task
    upcasts x and sums the logits in gate.cuh's fixed fp32 order, within the contract's logit bound
    at DeepSeek-V3's H = 7168, and the routing and y match the float64 reference."""
    problem = make_problem(4100 + hidden, tokens=19, hidden=hidden, ffn=32, experts=16, dtype=dtype,
                           router_bias=True, top_k=4, scoring=scoring)
    g = torch.Generator().manual_seed(hidden)
    problem["router_weight"] = torch.randn(16, hidden, generator=g) / math.sqrt(hidden)
    problem["router_bias"] = torch.randn(16, generator=g) * 0.5
    check_parity(problem, top_k=4, scoring=scoring)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", reference.ELEMENTWISE_ACTIVATIONS)
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_activation_every_dtype(activation, gated, dtype):
    problem = make_problem(7, tokens=64, hidden=130, ffn=300, experts=8, gated=gated, dtype=dtype,
                           expert_bias=True, top_k=2)
    check_parity(problem, top_k=2, gated=gated, activation=activation)


# H and I off every tile multiple (and the 1-wide degenerate case), then past typical K-chunks.
RAGGED_SHAPES = [(40, 24), (67, 45), (1, 1), (5, 3), (8, 8), (130, 600), (1100, 45), (530, 70), (4100, 72)]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden,ffn", RAGGED_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_ragged_hidden_and_ffn(gated, hidden, ffn, dtype):
    problem = make_problem(11, tokens=70, hidden=hidden, ffn=ffn, experts=4, gated=gated, dtype=dtype, top_k=2,
                           router_bias=hidden == 1, expert_bias=True)
    check_parity(problem, top_k=2, gated=gated, activation="gelu_tanh")


# --------------------------------------------------------------------------- parity: capacity and skew

@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor,experts,top_k", CAPACITY_CASES, ids=lambda v: str(v))
def test_capacity_drops(capacity_factor, experts, top_k, dtype):
    tokens = 257
    problem = make_problem(21, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype, top_k=top_k,
                           router_std=2.0)
    (y, routing), _ = check_parity(problem, top_k=top_k, capacity_factor=capacity_factor)
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    assert int(routing.dropped) == int((routing.expert_counts.long() - capacity).clamp_min(0).sum())
    if capacity_factor < 1.0:
        assert int(routing.dropped) > 0, "the case must actually drop picks"
    none_admitted = ~reference.admit(routing.topk_ids, experts, capacity).any(dim=1)
    if none_admitted.any():
        assert (y[none_admitted] == 0).all(), "a token whose every pick was dropped must get exactly 0"


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_capacity_with_biases_sigmoid(dtype):
    problem = make_problem(22, tokens=100, hidden=67, ffn=45, experts=8, gated=False, dtype=dtype,
                           router_bias=True, expert_bias=True, top_k=3, scoring="sigmoid")
    (_, routing), _ = check_parity(problem, top_k=3, gated=False, activation="relu", scoring="sigmoid",
                                   normalize=False, capacity_factor=0.7)
    assert int(routing.dropped) > 0


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
@pytest.mark.parametrize("top_k", (1, 2))
def test_all_tokens_on_one_expert(top_k, capacity_factor, dtype):
    experts, tokens = 8, 1000
    problem = make_problem(32, tokens=tokens, hidden=130, ffn=96, experts=experts, dtype=dtype, router_bias=True)
    bias = problem["router_bias"].clone()
    bias[5] = 30.0
    bias[2] = -30.0  # and one expert with no tokens at all
    problem["router_bias"] = bias
    (_, routing), _ = check_parity(problem, top_k=top_k, capacity_factor=capacity_factor)
    assert (routing.topk_ids[:, 0] == 5).all()
    assert routing.expert_counts[5] == tokens and routing.expert_counts[2] == 0


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
def test_zero_tokens(capacity_factor, dtype):
    problem = on_cuda(make_problem(41, tokens=0, hidden=67, ffn=45, experts=4, dtype=dtype, router_bias=True,
                                   expert_bias=True))
    y, routing = flashmoe.moe(**problem, top_k=2, capacity_factor=capacity_factor, return_routing=True,
                              backend="native")
    assert y.shape == (0, 67) and y.dtype == dtype and y.is_cuda
    assert routing.topk_ids.shape == (0, 2) and routing.router_logits.shape == (0, 4)
    assert routing.expert_counts.tolist() == [0, 0, 0, 0]
    assert int(routing.dropped) == 0


def test_leading_dims_flattened():
    problem = on_cuda(make_problem(42, tokens=60, hidden=67, ffn=45, experts=8, top_k=2))
    x3 = problem["x"].reshape(3, 4, 5, 67)
    y3 = flashmoe.moe(**{**problem, "x": x3}, top_k=2, backend="native")
    y2 = flashmoe.moe(**problem, top_k=2, backend="native")
    assert y3.shape == x3.shape and same_bits(y3.reshape(60, 67), y2)


# --------------------------------------------------------------------------- parity: TF32

@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
def test_tf32_within_tolerance(capacity_factor, gated, tf32):
    """allow_tf32 lets fp32 GEMMs (the router's included) round their inputs to TF32. The router's
    scores are drawn with relative gaps >= 1e-2, so routing still matches exactly."""
    top_k, experts = 2, 8
    problem = make_problem(50, tokens=128, hidden=256, ffn=512, experts=experts, gated=gated, dtype=torch.float32,
                           top_k=top_k, router_std=2.0, tie_rtol=1e-2, expert_bias=True)
    options = dict(top_k=top_k, gated=gated, capacity_factor=capacity_factor)
    y, routing = run_cuda(problem, **options)
    ref_y, ref_routing = run_reference(problem, **options)
    err = rel_err(y, ref_y)
    assert err <= TF32_TOLERANCE, f"tf32 rel err {err:.3g} > {TF32_TOLERANCE}"
    scale = ref_routing.router_logits.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(routing.router_logits.double(), ref_routing.router_logits, rtol=0, atol=1e-2 * scale)
    ordered = ~inner_ties(ref_routing.router_logits, top_k, "softmax", 1e-2)
    assert torch.equal(routing.topk_ids[ordered], ref_routing.topk_ids[ordered])
    assert torch.equal(routing.topk_ids.sort(dim=-1).values, ref_routing.topk_ids.sort(dim=-1).values)
    assert torch.equal(routing.expert_counts, ref_routing.expert_counts)
    assert int(routing.dropped) == int(ref_routing.dropped)
    again = run_cuda(problem, **options)
    assert same_bits(again[0], y), "TF32 results must be bit-reproducible too"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
def test_allow_tf32_does_not_touch_half_precision(dtype):
    problem = on_cuda(make_problem(51, tokens=64, hidden=130, ffn=96, experts=8, dtype=dtype, top_k=2))
    exact = flashmoe.moe(**problem, top_k=2, backend="native")
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by the autouse fixture
    assert same_bits(flashmoe.moe(**problem, top_k=2, backend="native"), exact)


# --------------------------------------------------------------------------- parity: the named model shapes

NAMED_SHAPES = {name: shape for name, shape in NAMED_CONFIGS.items()}
NAMED_SHAPES["paper-E64"] = NAMED_CONFIGS["paper"].override(num_experts=64)
NAMED_SHAPES["qwen3-30b-a3b-cf1"] = NAMED_CONFIGS["qwen3-30b-a3b"].override(capacity_factor=1.0)


@pytest.mark.parametrize("name", list(NAMED_SHAPES))
def test_named_config_bf16(name):
    """Mixtral, Qwen3-30B-A3B, OLMoE, DeepSeek-V3 (22 GiB of bf16 experts) and the FlashMoE paper
    layer at decode-like T, against the float64 reference computed on the GPU."""
    shape = NAMED_SHAPES[name]
    options = shape_options(shape)
    layer = cuda_layer(shape.hidden_size, shape.ffn_size, shape.num_experts, gated=shape.gated,
                       dtype=torch.bfloat16, seed=zlib.crc32(name.encode()))
    generator = torch.Generator(device="cuda").manual_seed(1)
    try:
        for tokens in (4, 33):
            x = torch.randn(tokens, shape.hidden_size, device="cuda", generator=generator).to(torch.bfloat16)
            problem = dict(layer, x=x)
            y, routing = flashmoe.moe(**problem, return_routing=True, backend="native", **options)
            ref_y, ref_routing = reference_by_expert(problem, **options)
            y, routing, ref_y, ref_routing = y.cpu(), routing_to_cpu(routing), ref_y.cpu(), routing_to_cpu(ref_routing)
            assert torch.isfinite(y).all()
            check_routing(routing, ref_routing, problem, options)
            err = rel_err(y, ref_y)
            assert err <= TOLERANCE[torch.bfloat16], f"{name} T={tokens}: rel err {err:.3g}"
    finally:
        del layer
        torch.cuda.empty_cache()


def test_reference_by_expert():
    """The low-memory reference of the named-shape tests is reference.moe, bit for bit."""
    for capacity_factor, gated in ((None, True), (0.5, False)):
        problem = on_cuda(make_problem(3, tokens=50, hidden=24, ffn=16, experts=8, gated=gated, router_bias=True,
                                       expert_bias=True))
        options = dict(top_k=2, gated=gated, activation="gelu", capacity_factor=capacity_factor)
        y, routing = reference_by_expert(problem, **options)
        ref_y, ref_routing = reference.moe(**{n: t.double() for n, t in problem.items()}, return_routing=True,
                                           **options)
        assert torch.equal(y, ref_y)
        for got, expected in zip(routing, ref_routing):
            assert torch.equal(got, expected)


@pytest.mark.slow
def test_large_token_count_olmoe_bf16(watchdog):
    shape = NAMED_CONFIGS["olmoe"]
    options = shape_options(shape)
    problem = cuda_layer(shape.hidden_size, shape.ffn_size, shape.num_experts, gated=shape.gated,
                         dtype=torch.bfloat16, seed=16384)
    generator = torch.Generator(device="cuda").manual_seed(2)
    problem["x"] = torch.randn(16384, shape.hidden_size, device="cuda", generator=generator).to(torch.bfloat16)
    y, routing = flashmoe.moe(**problem, return_routing=True, backend="native", **options)
    ref_y, ref_routing = reference_by_expert(problem, **options)
    assert torch.isfinite(y).all()
    check_routing(routing_to_cpu(routing), routing_to_cpu(ref_routing), problem, options)
    err = rel_err(y, ref_y)
    assert err <= TOLERANCE[torch.bfloat16], f"rel err {err:.3g}"
    # and with capacity: the admission order over 131072 picks
    options["capacity_factor"] = 1.0
    y, routing = flashmoe.moe(**problem, return_routing=True, backend="native", **options)
    ref_y, ref_routing = reference_by_expert(problem, **options)
    check_routing(routing_to_cpu(routing), routing_to_cpu(ref_routing), problem, options)
    assert int(routing.dropped) > 0
    assert rel_err(y, ref_y) <= TOLERANCE[torch.bfloat16]


# --------------------------------------------------------------------------- determinism

DETERMINISM_CASES = [
    # (tokens, hidden, ffn, experts, top_k, options)
    (257, 130, 300, 8, 2, dict()),
    (200, 67, 45, 64, 4, dict(capacity_factor=0.8)),
    (3, 530, 600, 4, 2, dict(gated=False, activation="gelu")),
    (2000, 256, 512, 16, 4, dict(scoring="sigmoid", normalize=False)),
    (1, 1024, 384, 128, 8, dict()),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DETERMINISM_CASES,
                         ids=lambda c: f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}" + "".join(f"-{v}" for v in c[5].values()))
def test_ten_runs_bit_identical(case, dtype):
    tokens, hidden, ffn, experts, top_k, options = case
    problem = on_cuda(make_problem(60, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, dtype=dtype,
                                   gated=options.get("gated", True), router_bias=True, expert_bias=True))
    args = op_args(problem, top_k=top_k, **options)
    first = torch.ops.flashmoe.moe_forward(*args)
    for run in range(9):
        assert_same_outputs(first, torch.ops.flashmoe.moe_forward(*args), f"run 0 and run {run + 1}")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("max_ctas", (2, 3, 17))
def test_bits_do_not_depend_on_the_grid(max_ctas, dtype, monkeypatch):
    """Every output element has one fixed arithmetic, whichever processor runs its task: a grid of
    2 CTAs (the OS CTA and one processor), 3 or 17 gives the bits of the occupancy-sized grid."""
    problem = on_cuda(make_problem(62, tokens=300, hidden=136, ffn=200, experts=8, dtype=dtype, router_bias=True,
                                   expert_bias=True))
    args = op_args(problem, top_k=2, capacity_factor=0.9)
    full_grid = torch.ops.flashmoe.moe_forward(*args)
    monkeypatch.setenv("FLASHMOE_CUDA_MAX_CTAS", str(max_ctas))
    assert_same_outputs(full_grid, torch.ops.flashmoe.moe_forward(*args), f"full grid and {max_ctas} CTAs")


def test_bad_cta_cap_is_a_clear_error(monkeypatch):
    problem = on_cuda(make_problem(63, tokens=4, hidden=32, ffn=16, experts=4, dtype=torch.bfloat16))
    monkeypatch.setenv("FLASHMOE_CUDA_MAX_CTAS", "1")
    with pytest.raises(ValueError, match="FLASHMOE_CUDA_MAX_CTAS"):
        torch.ops.flashmoe.moe_forward(*op_args(problem, top_k=2))


def test_runs_on_the_current_stream():
    """The kernel is enqueued on torch's current stream: on a side stream it must wait for the copy
    that fills its input there (a launch on another stream would read NaN)."""
    problem = on_cuda(make_problem(61, tokens=1000, hidden=256, ffn=128, experts=16, dtype=torch.bfloat16))
    expected = flashmoe.moe(**problem, top_k=4, backend="native")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.full_like(problem["x"], float("nan"))
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on this stream before x gets its values
        x.copy_(problem["x"])
        y = flashmoe.moe(**dict(problem, x=x), top_k=4, backend="native")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert same_bits(y, expected)


# --------------------------------------------------------------------------- the raw entry: every output written

def _raw_descriptor(problem, *, top_k, capacity_factor=None, **options):
    x = problem["x"]
    return native_problem(x.shape[0], x.shape[1], problem["w2"].shape[2], problem["router_weight"].shape[0],
                          x.dtype, top_k=top_k, capacity_factor=capacity_factor,
                          router_bias="router_bias" in problem, b1="b1" in problem, b2="b2" in problem, **options)


def device_index(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


GUARD = 4096  # elements of sentinel after each output, to catch writes past its end


def poisoned_outputs(problem: dict, top_k: int) -> tuple:
    """({name: output view}, {name: guard view}): outputs full of NaN / -7, each followed by a guard."""
    x = problem["x"]
    tokens, experts = x.shape[0], problem["router_weight"].shape[0]
    specs = dict(y=((tokens, x.shape[1]), x.dtype), topk_ids=((tokens, top_k), torch.int32),
                 topk_weights=((tokens, top_k), torch.float32), expert_counts=((experts,), torch.int32),
                 router_logits=((tokens, experts), torch.float32), dropped=((), torch.int64))
    outputs, guards = {}, {}
    for name, (shape, dtype) in specs.items():
        numel = math.prod(shape)
        buffer = torch.empty(numel + GUARD, dtype=dtype, device=x.device)
        buffer.fill_(float("nan") if dtype.is_floating_point else -7)
        outputs[name] = buffer[:numel].view(shape)
        guards[name] = buffer[numel:]
    return outputs, guards


def call_cuda_raw(problem: dict, outputs: dict, workspace: torch.Tensor, *, top_k, allow_tf32=False,
                  workspace_bytes=None, **options):
    descriptor = _raw_descriptor(problem, top_k=top_k, **options)
    device = device_index(problem["x"])
    needed = _C.cuda_workspace_bytes(descriptor, device, allow_tf32)
    workspace_bytes = needed if workspace_bytes is None else workspace_bytes
    assert workspace.numel() >= workspace_bytes

    _C.moe_forward_cuda(
        problem=descriptor, **raw_addresses(problem, outputs), workspace=workspace.data_ptr(),
        workspace_bytes=workspace_bytes, allow_tf32=allow_tf32, device=device,
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    return needed


def _assert_fully_written(outputs, guards, experts):
    for name in ("y", "topk_weights", "router_logits"):
        assert not outputs[name].isnan().any(), f"{name} has unwritten (NaN) elements"
    for name in ("topk_ids", "expert_counts", "dropped"):
        assert not (outputs[name] == -7).any(), f"{name} has unwritten (sentinel) elements"
    ids = outputs["topk_ids"].long()
    assert ids.numel() == 0 or (ids.min() >= 0 and ids.max() < experts)
    for name, guard in guards.items():
        untouched = guard.isnan().all() if guard.dtype.is_floating_point else (guard == -7).all()
        assert untouched, f"the kernel wrote past the end of {name}"


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 0.5))
@pytest.mark.parametrize("tokens", (1, 77, 1000))
def test_poisoned_outputs_and_garbage_workspace(tokens, capacity_factor, dtype):
    """Every output element is written, nothing past any output's end is, and the workspace may hold
    anything (0xFF, random bytes, the previous call's state): the results are the same bits."""
    experts, top_k = 8, 2
    cpu_problem = make_problem(5, tokens=tokens, hidden=67, ffn=300, experts=experts, dtype=dtype, router_bias=True,
                               expert_bias=True, top_k=top_k)
    problem = on_cuda(cpu_problem)
    options = dict(top_k=top_k, capacity_factor=capacity_factor)
    needed = _C.cuda_workspace_bytes(_raw_descriptor(problem, **options), device_index(problem["x"]), False)
    assert needed > 0
    buffer = torch.empty(needed + GUARD, dtype=torch.uint8, device="cuda")
    workspace, workspace_guard = buffer[:needed], buffer[needed:]
    generator = torch.Generator(device="cuda").manual_seed(7)
    runs = []
    for contents in ("0xFF", "random", "previous call's"):
        if contents == "0xFF":
            buffer.fill_(0xFF)
        elif contents == "random":
            workspace.copy_(torch.randint(0, 256, (needed,), dtype=torch.uint8, device="cuda", generator=generator))
            workspace_guard.fill_(0xA5)
        outputs, guards = poisoned_outputs(problem, top_k)
        guard_before = workspace_guard.clone()
        call_cuda_raw(problem, outputs, workspace, **options)
        torch.cuda.synchronize()
        _assert_fully_written(outputs, guards, experts)
        assert torch.equal(workspace_guard, guard_before), "the kernel wrote past workspace_bytes"
        runs.append(outputs)
    for contents, outputs in zip(("random", "previous call's"), runs[1:]):
        assert_same_outputs([runs[0][n] for n in OUTPUT_NAMES], [outputs[n] for n in OUTPUT_NAMES],
                            f"a 0xFF and a {contents} workspace")
    via_op = torch.ops.flashmoe.moe_forward(*op_args(problem, **options))
    assert_same_outputs(via_op, [runs[0][n] for n in OUTPUT_NAMES], "the op and the raw entry")

    outputs = {name: tensor.cpu() for name, tensor in runs[0].items()}
    routing = reference.Routing(outputs["topk_ids"], outputs["topk_weights"], outputs["expert_counts"],
                                outputs["dropped"], outputs["router_logits"])
    ref_y, ref_routing = run_reference(cpu_problem, **options)
    check_routing(routing, ref_routing, cpu_problem, options)
    assert rel_err(outputs["y"], ref_y) <= TOLERANCE[dtype]
    if capacity_factor is not None and tokens > 1:
        assert int(outputs["dropped"]) > 0


@pytest.mark.parametrize("field,value", [("top_k", 0), ("top_k", 9), ("tokens", -1), ("hidden", 0), ("ffn", 0),
                                         ("experts", 0), ("expert_capacity", -2)])
def test_raw_entry_rejects_bad_problem(field, value):
    problem = on_cuda(make_problem(0, tokens=5, hidden=8, ffn=6, experts=8, router_bias=True, expert_bias=True))
    outputs, _ = poisoned_outputs(problem, 2)
    workspace = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    descriptor = _raw_descriptor(problem, top_k=2)
    setattr(descriptor, field, value)
    with pytest.raises(ValueError):
        _C.moe_forward_cuda(problem=descriptor, **raw_addresses(problem, outputs), workspace=workspace.data_ptr(),
                            workspace_bytes=workspace.numel(), allow_tf32=False, device=torch.cuda.current_device(),
                            stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()  # nothing was launched, and the context is healthy


@pytest.mark.parametrize("pointer", ("x", "router_weight", "w1", "w2", "y", "topk_ids", "topk_weights",
                                     "expert_counts", "router_logits", "dropped", "router_bias", "b1", "b2",
                                     "workspace"))
def test_raw_entry_rejects_null_pointers(pointer):
    problem = on_cuda(make_problem(0, tokens=5, hidden=8, ffn=6, experts=4, router_bias=True, expert_bias=True))
    outputs, _ = poisoned_outputs(problem, 2)
    descriptor = _raw_descriptor(problem, top_k=2)
    needed = _C.cuda_workspace_bytes(descriptor, torch.cuda.current_device(), False)
    workspace = torch.empty(needed, dtype=torch.uint8, device="cuda")
    addresses = dict(raw_addresses(problem, outputs), workspace=workspace.data_ptr())
    addresses[pointer] = 0
    with pytest.raises(ValueError):
        _C.moe_forward_cuda(problem=descriptor, **addresses, workspace_bytes=needed, allow_tf32=False, device=torch.cuda.current_device(),
                            stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


def test_raw_entry_rejects_small_workspace():
    problem = on_cuda(make_problem(0, tokens=50, hidden=8, ffn=6, experts=4))
    outputs, _ = poisoned_outputs(problem, 2)
    descriptor = _raw_descriptor(problem, top_k=2)
    needed = _C.cuda_workspace_bytes(descriptor, torch.cuda.current_device(), False)
    workspace = torch.empty(needed, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="workspace"):
        _C.moe_forward_cuda(problem=descriptor, **raw_addresses(problem, outputs), workspace=workspace.data_ptr(),
                            workspace_bytes=needed - 1, allow_tf32=False, device=torch.cuda.current_device(),
                            stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens,capacity_factor", [(64, None), (257, 0.5), (1, 1.0)], ids=str)
def test_cuda_graph_replays_match_eager(tokens, capacity_factor, dtype):
    options = dict(top_k=2, capacity_factor=capacity_factor)

    def draw(seed):
        return on_cuda(make_problem(seed, tokens=tokens, hidden=130, ffn=96, experts=8, dtype=dtype,
                                    router_bias=True, expert_bias=True, top_k=2))

    static = draw(70)
    args = op_args(static, **options)
    side = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.ops.flashmoe.moe_forward(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = torch.ops.flashmoe.moe_forward(*args)

    for seed in (71, 72, 73):
        fresh = draw(seed)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        eager = torch.ops.flashmoe.moe_forward(*op_args(fresh, **options))
        torch.cuda.synchronize()
        assert_same_outputs(static_outputs, eager, f"graph replay and eager call (inputs of seed {seed})")
    ref_y = reference.moe(**{n: t.double() for n, t in fresh.items()}, **options)
    assert rel_err(static_outputs[0], ref_y) <= TOLERANCE[dtype]

    first = [tensor.clone() for tensor in static_outputs]
    for output in static_outputs:  # a replay must rewrite everything, not rely on what is there
        output.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_outputs(first, static_outputs, "two replays on the same inputs")


_FIRST_CALL_CAPTURED = """
import torch, flashmoe
torch.manual_seed(0)
T, H, I, E = 33, 64, 48, 4
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
rw = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the process's first flashmoe call: occupancy query and all
    y = flashmoe.moe(x, rw, w1, w2, top_k=2, backend="native")
graph.replay()
torch.cuda.synchronize()
eager = flashmoe.moe(x, rw, w1, w2, top_k=2, backend="native")
assert torch.equal(y.view(torch.int16), eager.view(torch.int16)), "captured first call differs from eager"
print("first call captured: ok")
"""


def test_first_call_of_the_process_can_be_captured():
    """A user may capture the very first call: the one-time setup (function attributes, occupancy
    query) must be legal inside a stream capture. A fresh process, so nothing is cached yet."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FIRST_CALL_CAPTURED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "first call captured: ok" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------- torch.compile

def _moe_native(x, router_weight, w1, w2, router_bias, b1, b2):
    y, routing = flashmoe.moe(x, router_weight, w1, w2, top_k=2, router_bias=router_bias, b1=b1, b2=b2,
                              capacity_factor=1.0, return_routing=True, backend="native")
    return y * 2.0, routing.topk_ids, routing.topk_weights, routing.router_logits, routing.dropped


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    problem = on_cuda(make_problem(2, tokens=37, hidden=67, ffn=45, experts=8, dtype=dtype, router_bias=True,
                                   expert_bias=True))
    inputs = [problem.get(name) for name in INPUT_NAMES]
    eager = _moe_native(*inputs)
    got = torch.compile(_moe_native, fullgraph=True)(*inputs)
    for a, b in zip(eager, got):
        assert b.is_cuda and same_bits(a, b)


def test_compile_dynamic_token_counts():
    torch._dynamo.reset()
    compiled = torch.compile(_moe_native, fullgraph=True, dynamic=True)
    for index, (seed, tokens) in enumerate(((3, 37), (4, 91), (6, 5))):
        problem = on_cuda(make_problem(seed, tokens=tokens, hidden=67, ffn=45, experts=8, router_bias=True,
                                       expert_bias=True))
        inputs = [problem.get(name) for name in INPUT_NAMES]
        eager = _moe_native(*inputs)
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            got = compiled(*inputs)
        for a, b in zip(eager, got):
            assert same_bits(a, b)


# --------------------------------------------------------------------------- opcheck and autograd

OPCHECK_CASES = [
    (torch.float32, False, None, True),
    (torch.float32, True, 0.5, False),
    (torch.bfloat16, True, None, True),
]


@pytest.mark.parametrize("dtype,biases,capacity_factor,gated", OPCHECK_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_opcheck(dtype, biases, capacity_factor, gated):
    problem = on_cuda(make_problem(0, tokens=9, hidden=12, ffn=7, experts=4, dtype=dtype, gated=gated,
                                   router_bias=biases, expert_bias=biases, top_k=2, tie_rtol=1e-3))
    for tensor in problem.values():
        tensor.requires_grad_()
    torch.library.opcheck(torch.ops.flashmoe.moe_forward,
                          op_args(problem, top_k=2, gated=gated, capacity_factor=capacity_factor))


def _losses(y, routing, projection, weight_projection, experts):
    return ((y.double() * projection).sum() + (routing.topk_weights.double() * weight_projection).sum()
            + flashmoe.load_balancing_loss(routing.router_logits, routing.topk_ids, experts).double()
            + 0.1 * flashmoe.router_z_loss(routing.router_logits).double())


GRADIENT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", [
    dict(gated=True),
    dict(gated=False, activation="gelu", scoring="sigmoid", normalize=False),
    dict(gated=True, activation="relu", capacity_factor=0.6),
], ids=("gated", "plain-sigmoid", "gated-capacity"))
def test_gradients_match_float64_reference(options, dtype):
    """torch.autograd.grad through the CUDA op against autograd through the float64 reference, for
    every input, with y, the pick weights and the router logits (aux losses) all in the loss."""
    tokens, experts, top_k = 96, 8, 2
    gated = options["gated"]
    problem = make_problem(7, tokens=tokens, hidden=40, ffn=24, experts=experts, gated=gated, dtype=dtype,
                           router_bias=True, expert_bias=True, top_k=top_k, scoring=options.get("scoring", "softmax"),
                           tie_rtol=1e-4)
    generator = torch.Generator().manual_seed(8)
    projection = torch.randn(tokens, 40, generator=generator, dtype=torch.float64)
    weight_projection = torch.randn(tokens, top_k, generator=generator, dtype=torch.float64)

    leaves = {name: tensor.cuda().requires_grad_() for name, tensor in problem.items()}
    y, routing = flashmoe.moe(**leaves, top_k=top_k, return_routing=True, backend="native", **options)
    loss = _losses(y, routing, projection.cuda(), weight_projection.cuda(), experts)
    grads = torch.autograd.grad(loss, list(leaves.values()))

    ref_leaves = {name: tensor.double().requires_grad_() for name, tensor in problem.items()}
    ref_y, ref_routing = reference.moe(**ref_leaves, top_k=top_k, return_routing=True, **options)
    ref_loss = _losses(ref_y, ref_routing, projection, weight_projection, experts)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()))

    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert grad.is_cuda and grad.dtype == dtype and grad.shape == problem[name].shape, name
        err = rel_err(grad.cpu(), ref_grad)
        assert err <= GRADIENT_TOLERANCE[dtype], f"grad of {name}: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_module_on_cuda(dtype):
    torch.manual_seed(10)
    layer = flashmoe.MoE(67, 45, 8, 2, router_bias=True, expert_bias=True, capacity_factor=1.25, z_loss_coef=1e-3,
                         dtype=dtype).cuda()
    twin = flashmoe.MoE(67, 45, 8, 2, router_bias=True, expert_bias=True, capacity_factor=1.25, z_loss_coef=1e-3,
                        backend="reference", dtype=torch.float64)
    twin.load_state_dict({name: value.double().cpu() for name, value in layer.state_dict().items()})
    x = torch.randn(4, 25, 67, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    y, aux, routing = layer(x.to(dtype).cuda(), return_aux_loss=True, return_routing=True)
    ref_y, ref_aux, ref_routing = twin(x.to(dtype).double(), return_aux_loss=True, return_routing=True)
    assert y.is_cuda and y.shape == x.shape and y.dtype == dtype
    assert rel_err(y.cpu(), ref_y) <= TOLERANCE[dtype]
    problem = dict(x=x.reshape(-1, 67).to(dtype), router_weight=layer.router_weight.detach().cpu())
    assert_routing_matches(routing_to_cpu(routing), ref_routing, problem, top_k=2, capacity_factor=1.25)
    (y.float().square().sum() + aux).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.is_cuda and parameter.grad.dtype == dtype, name
        assert torch.isfinite(parameter.grad).all(), name


# --------------------------------------------------------------------------- bad input

def _small_cuda_problem(dtype=torch.float32):
    return on_cuda(make_problem(0, tokens=5, hidden=8, ffn=6, experts=4, dtype=dtype, router_bias=True,
                                expert_bias=True))


@pytest.mark.parametrize("name", INPUT_NAMES[1:])
def test_rejects_a_weight_on_the_cpu(name):
    problem = _small_cuda_problem()
    problem[name] = problem[name].cpu()
    for call in (lambda: flashmoe.moe(**problem, top_k=2, backend="native"),
                 lambda: torch.ops.flashmoe.moe_forward(*op_args(problem, top_k=2))):
        with pytest.raises(ValueError, match=rf"\b{name}\b.*device"):
            call()


def test_rejects_x_on_the_cpu():
    problem = _small_cuda_problem()
    problem["x"] = problem["x"].cpu()
    for backend in ("native", "auto"):
        with pytest.raises(ValueError, match="device"):
            flashmoe.moe(**problem, top_k=2, backend=backend)
    with pytest.raises(ValueError, match="device"):
        torch.ops.flashmoe.moe_forward(*op_args(problem, top_k=2))


def test_rejects_float64():
    problem = _small_cuda_problem(torch.float64)
    for call in (lambda: flashmoe.moe(**problem, top_k=2, backend="native"),
                 lambda: torch.ops.flashmoe.moe_forward(*op_args(problem, top_k=2))):
        with pytest.raises(TypeError, match=r"\bx\b.*float64"):
            call()


def _non_contiguous(tensor):
    """Same values and shape, transposed storage (or a strided slice for 1-d)."""
    if tensor.dim() == 1:
        return torch.stack([tensor, tensor], dim=1)[:, 0]
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_rejects_non_contiguous(name):
    problem = _small_cuda_problem()
    problem[name] = _non_contiguous(problem[name])
    assert not problem[name].is_contiguous()
    with pytest.raises(ValueError, match=rf"\b{name}\b.*contiguous"):
        torch.ops.flashmoe.moe_forward(*op_args(problem, top_k=2))


def _cuda_randn(*shape):
    return torch.randn(*shape, device="cuda")


@pytest.mark.parametrize("name,replacement,options", [
    ("router_weight", lambda: _cuda_randn(4, 9), {}),
    ("w1", lambda: _cuda_randn(4, 12, 9), {}),
    ("w1", lambda: _cuda_randn(3, 12, 8), {}),
    ("w1", lambda: _cuda_randn(4, 11, 8), {}),
    ("w2", lambda: _cuda_randn(4, 8, 7), {}),
    ("router_bias", lambda: _cuda_randn(5), {}),
    ("b1", lambda: _cuda_randn(4, 6), {}),
    ("b2", lambda: _cuda_randn(4, 6), {}),
    ("w1", lambda: _cuda_randn(4, 12, 8).bfloat16(), {}),
    ("top_k", None, dict(top_k=5)),
    ("capacity_factor", None, dict(capacity_factor=math.nan)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_rejects_wrong_shapes_and_options(name, replacement, options):
    problem = _small_cuda_problem()
    if replacement is not None:
        problem[name] = replacement()
    options = dict(dict(top_k=2), **options)
    with pytest.raises(BAD, match=rf"\b{name}\b"):
        flashmoe.moe(**problem, backend="native", **options)
    with pytest.raises(BAD, match=rf"\b{name}\b"):
        torch.ops.flashmoe.moe_forward(*op_args(problem, **options))
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", reference.ELEMENTWISE_ACTIVATIONS)
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_nan_token_stays_in_its_row(gated, activation, dtype, watchdog):
    check_nan_token_stays_in_its_row(run_cuda, gated=gated, activation=activation, dtype=dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
@pytest.mark.parametrize("scoring", ("softmax", "sigmoid"))
def test_nan_in_router_weight(scoring, capacity_factor, dtype, watchdog):
    """Expert 2's logit is NaN for every token. The reference (torch.sort) ranks a NaN score first,
    so every token picks expert 2 with a NaN weight and its y is NaN, unless capacity dropped all of
    its picks (then y is exactly 0)."""
    tokens, experts, top_k = 70, 8, 3
    problem = make_problem(9, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype)
    router_weight = problem["router_weight"].clone()
    router_weight[2, 5] = float("nan")
    problem["router_weight"] = router_weight
    options = dict(top_k=top_k, scoring=scoring, capacity_factor=capacity_factor)
    y, routing = run_cuda(problem, **options)
    ids = routing.topk_ids.long()
    assert ((ids >= 0) & (ids < experts)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "NaN scores produced a duplicate pick"
    assert int(routing.expert_counts.sum()) == tokens * top_k
    ref_y, ref_routing = run_reference(problem, **options)
    assert int(routing.dropped) == int(ref_routing.dropped)
    assert torch.equal(y.isnan().any(dim=1), ref_y.isnan().any(dim=1))
    finite = ~ref_y.isnan().any(dim=1)
    assert torch.equal(y[finite], torch.zeros_like(y[finite]))


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_all_nan_input_with_capacity_finishes(dtype, watchdog):
    problem = make_problem(11, tokens=257, hidden=67, ffn=45, experts=8, dtype=dtype, router_bias=True,
                           expert_bias=True)
    problem["x"] = torch.full_like(problem["x"], float("nan"))
    y, routing = run_cuda(problem, top_k=2, capacity_factor=0.5)
    assert int(routing.expert_counts.sum()) == 257 * 2
    capacity = reference.expert_capacity(0.5, 257, 2, 8)
    assert int(routing.dropped) == int((routing.expert_counts.long() - capacity).clamp_min(0).sum())
    assert y.isnan().any()


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("value", (float("inf"), float("-inf")), ids=("inf", "-inf"))
def test_inf_token(value, dtype, watchdog):
    tokens, bad = 64, 9
    problem = make_problem(10, tokens=tokens, hidden=67, ffn=45, experts=8, dtype=dtype, top_k=2)
    x = problem["x"].clone()
    x[bad, 0] = value
    problem["x"] = x
    y, routing = run_cuda(problem, top_k=2)
    assert not torch.isfinite(y[bad]).all()
    others = torch.arange(tokens) != bad
    ref_y = run_reference(dict(problem, x=x[others].contiguous()), top_k=2)[0]
    assert rel_err(y[others], ref_y) <= TOLERANCE[dtype]


# --------------------------------------------------------------------------- stale state between calls

def test_many_calls_with_changing_shapes(watchdog):
    """Token counts, dtypes, shapes and capacity change from call to call (the workspace and any
    cached launch state must follow); every call is checked against the reference."""
    layers = {
        "a": dict(hidden=256, ffn=128, experts=16, top_k=4, gated=True),
        "b": dict(hidden=67, ffn=45, experts=64, top_k=2, gated=False),
    }
    sequence = [
        (1, torch.bfloat16, "a", None), (1000, torch.bfloat16, "a", None), (5, torch.bfloat16, "a", None),
        (4096, torch.bfloat16, "a", None), (1, torch.bfloat16, "a", 1.0), (4096, torch.bfloat16, "a", 0.5),
        (0, torch.bfloat16, "a", None), (33, torch.float32, "b", None), (4096, torch.float16, "b", 1.0),
        (1, torch.float32, "a", None), (257, torch.bfloat16, "b", None), (2, torch.bfloat16, "a", 2.0),
    ]
    for step, (tokens, dtype, layer, capacity_factor) in enumerate(sequence):
        shape = layers[layer]
        problem = make_problem(100 + step, tokens=tokens, hidden=shape["hidden"], ffn=shape["ffn"],
                               experts=shape["experts"], gated=shape["gated"], dtype=dtype, router_bias=True,
                               expert_bias=True, top_k=shape["top_k"])
        options = dict(top_k=shape["top_k"], gated=shape["gated"], capacity_factor=capacity_factor)
        y, routing = run_cuda(problem, **options)
        if not tokens:
            assert y.shape == (0, shape["hidden"]) and not routing.expert_counts.any() and int(routing.dropped) == 0
            continue
        ref_y, ref_routing = run_reference(problem, **options)
        check_routing(routing, ref_routing, problem, options)
        err = rel_err(y, ref_y)
        assert err <= TOLERANCE[dtype], f"call {step} (T={tokens}, {dtype}, layer {layer}): rel err {err:.3g}"


# --------------------------------------------------------------------------- routing from outside, activations

CLAMPED_CASES = [("relu2", {}, False), ("swiglu_clamp", dict(swiglu_limit=0.6), True),
                 ("swiglu_clamp_post", dict(swiglu_limit=0.15), True), ("swiglu_oai", {}, True),
                 ("swiglu_oai", dict(swiglu_limit=0.6, swiglu_alpha=1.3), True)]


def given_routing(seed, tokens, experts, top_k, *, sentinel_share=0.2):
    """Distinct ids per row, a share of them the sentinel E; positive float32 weights (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    ids = torch.where(torch.rand(ids.shape, generator=g) < sentinel_share, torch.full_like(ids, experts), ids)
    return ids, torch.rand(tokens, top_k, generator=g) + 0.1


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CLAMPED_CASES, ids=lambda c: f"{c[0]}-{'gated' if c[2] else 'plain'}-{len(c[1])}")
def test_new_activations_every_dtype(case, dtype):
    activation, options, gated = case
    problem = make_problem(8, tokens=64, hidden=130, ffn=300, experts=8, gated=gated, dtype=dtype,
                           expert_bias=True, top_k=2)
    check_parity(problem, top_k=2, gated=gated, activation=activation, **options)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 0.6))
def test_gate_less_bitwise_equals_full_op(capacity_factor, dtype):
    """The kernel's gate-less path fed the routing its full path produced gives the same y bits."""
    problem = on_cuda(make_problem(9, tokens=257, hidden=130, ffn=96, experts=8, dtype=dtype, expert_bias=True,
                                   top_k=2))
    y, routing = flashmoe.moe(**problem, top_k=2, capacity_factor=capacity_factor, return_routing=True,
                              backend="native")
    experts = {name: problem[name] for name in ("x", "w1", "w2", "b1", "b2")}
    y2, routing2 = flashmoe.moe(**experts, topk_ids=routing.topk_ids, topk_weights=routing.topk_weights,
                                capacity_factor=capacity_factor, return_routing=True, backend="native")
    assert same_bits(y, y2)
    assert torch.equal(routing.expert_counts, routing2.expert_counts) and int(routing.dropped) == int(routing2.dropped)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [("silu", {}, True)] + CLAMPED_CASES, ids=lambda c: c[0])
def test_gate_less_matches_cpu_and_reference(case, dtype):
    activation, options, gated = case
    problem = make_problem(10, tokens=97, hidden=130, ffn=96, experts=8, gated=gated, dtype=dtype, expert_bias=True)
    del problem["router_weight"]
    ids, weights = given_routing(11, 97, 8, 3)
    arguments = dict(gated=gated, activation=activation, capacity_factor=0.7, **options)
    y, routing = flashmoe.moe(**on_cuda(problem), topk_ids=ids.cuda(), topk_weights=weights.cuda(),
                              return_routing=True, backend="native", **arguments)
    cpu_y, cpu_routing = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, return_routing=True,
                                      backend="native", **arguments)
    ref_y = reference.moe(**{n: t.double() for n, t in problem.items()}, topk_ids=ids, topk_weights=weights.double(),
                          **arguments)
    assert rel_err(y.cpu(), ref_y) <= TOLERANCE[dtype]
    assert torch.equal(routing.expert_counts.cpu(), cpu_routing.expert_counts)
    assert int(routing.dropped) == int(cpu_routing.dropped)


def test_gate_less_graph_capture_reads_no_ids():
    """Captured in a CUDA graph (no host read of the ids), replays match eager; bad ids then
    contribute zero instead of failing or writing out of bounds."""
    problem = on_cuda(make_problem(12, tokens=64, hidden=130, ffn=96, experts=8, dtype=torch.bfloat16))
    del problem["router_weight"]
    ids, weights = given_routing(13, 64, 8, 2)
    ids, weights = ids.int().cuda(), weights.cuda()
    args = (problem["x"], problem["w1"], problem["w2"], None, None, ids, weights, True, "silu", None, None, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.flashmoe.moe_experts_forward(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = torch.ops.flashmoe.moe_experts_forward(*args)
    graph.replay()
    eager = torch.ops.flashmoe.moe_experts_forward(*args)
    assert same_bits(static[0], eager[0])
    ids[0] = torch.tensor([-5, 1000], dtype=torch.int32)  # out of range: contributes zero, never read out of bounds
    ids[1] = torch.tensor([3, 3], dtype=torch.int32)  # a repeat: only the first pick counts
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static[0][0].float(), torch.zeros_like(static[0][0].float()))
    assert torch.isfinite(static[0].float()).all()


def test_gate_less_gradients_match_reference():
    problem = make_problem(14, tokens=41, hidden=64, ffn=48, experts=6, dtype=torch.float32, expert_bias=True)
    del problem["router_weight"]
    ids, weights = given_routing(15, 41, 6, 2)
    names = list(problem)

    def grads(tensors, routing_weights, topk_ids, backend):
        leaves = [t.clone().requires_grad_() for t in list(tensors.values()) + [routing_weights]]
        y = flashmoe.moe(**dict(zip(names, leaves[:-1])), topk_ids=topk_ids, topk_weights=leaves[-1], backend=backend)
        return torch.autograd.grad(y.square().sum(), leaves)

    got = grads(on_cuda(problem), weights.cuda(), ids.cuda(), "native")
    want = grads({n: t.double() for n, t in problem.items()}, weights.double(), ids, "reference")
    for name, a, b in zip(names + ["topk_weights"], got, want):
        assert rel_err(a.cpu(), b) <= 1e-5, name


def test_gate_less_rejects_bad_ids_eagerly():
    problem = on_cuda(make_problem(16, tokens=4, hidden=16, ffn=8, experts=4))
    del problem["router_weight"]
    with pytest.raises(ValueError, match=r"repeats expert 1 in row 0"):
        flashmoe.moe(**problem, topk_ids=torch.tensor([[1, 1]] * 4, device="cuda"),
                     topk_weights=torch.rand(4, 2, device="cuda"), backend="native")
    with pytest.raises(ValueError, match=r"topk_ids\[2, 1\] = 7"):
        flashmoe.moe(**problem, topk_ids=torch.tensor([[0, 1], [0, 1], [0, 7], [0, 1]], device="cuda"),
                     topk_weights=torch.rand(4, 2, device="cuda"), backend="native")
