"""Routing from outside: flashmoe.moe(x, w1, w2, *, topk_ids, topk_weights), the gate-less entry.

The float64 reference against hand-computed values (the sentinel included), the native CPU op
against the reference and bitwise against the full op fed its own routing, gradients (x, weights,
biases and topk_weights), torch citizenship (opcheck, compile) and every guard.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashmoe
from conftest import TOLERANCE, DTYPES, dtype_id, make_problem, rel_err, same_bits
from flashmoe import _C, reference

BACKENDS = ("native", "reference")


def random_routing(seed, tokens, experts, top_k, *, dtype=torch.float32, sentinel_share=0.0,
                   ids_dtype=torch.int64):
    """Distinct ids per row (a random permutation's head), positive weights; a share of the picks
    replaced by the sentinel E."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, top_k, dtype=torch.int64)
    if sentinel_share:
        ids = torch.where(torch.rand(ids.shape, generator=g) < sentinel_share, torch.full_like(ids, experts), ids)
    weights = (torch.rand(tokens, top_k, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return ids.to(ids_dtype), weights


def experts_problem(seed, *, tokens=29, hidden=20, ffn=12, experts=6, gated=True, dtype=torch.float32,
                    expert_bias=False):
    problem = make_problem(seed, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, gated=gated, dtype=dtype,
                           expert_bias=expert_bias)
    problem.pop("router_weight")
    return problem


def double(tensors: dict) -> dict:
    return {name: t.double() if t.is_floating_point() else t for name, t in tensors.items()}


# --------------------------------------------------------------------------- the specification

def test_reference_matches_hand_computation_with_sentinel():
    """T=3, E=3, k=2, plain relu experts with I=1, H=1: every f_e(x) is a scalar one can do by hand."""
    x = torch.tensor([[1.0], [-2.0], [3.0]], dtype=torch.float64)
    w1 = torch.tensor([[[1.0]], [[-1.0]], [[2.0]]], dtype=torch.float64)  # f_e(x) = relu(w1_e x) * w2_e
    w2 = torch.tensor([[[10.0]], [[100.0]], [[1000.0]]], dtype=torch.float64)
    ids = torch.tensor([[0, 2], [1, 3], [3, 3]])  # 3 = E: the sentinel, twice in the last row
    weights = torch.tensor([[0.25, 0.5], [2.0, 7.0], [5.0, 5.0]], dtype=torch.float64)
    y, routing = reference.moe(x, w1, w2, topk_ids=ids, topk_weights=weights, gated=False, activation="relu",
                               return_routing=True)
    expected = torch.tensor([[0.25 * 10 * 1 + 0.5 * 1000 * 2], [2.0 * 100 * 2], [0.0]], dtype=torch.float64)
    assert torch.equal(y, expected)
    assert routing.expert_counts.tolist() == [1, 1, 1]
    assert int(routing.dropped) == 0 and routing.router_logits is None
    assert routing.topk_ids is ids and routing.topk_weights is weights


def test_reference_capacity_in_token_order_skips_sentinel():
    """C = ceil(0.5 * 4 * 2 / 2) = 2: expert 0 is picked by tokens 0, 1, 3 and admits 0 and 1; the
    sentinel picks of token 1 take no capacity."""
    ids = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1]])
    admitted = reference.admit(ids, 2, reference.expert_capacity(0.5, 4, 2, 2))
    assert admitted.tolist() == [[True, False], [False, True], [True, False], [False, True]]
    x = torch.randn(4, 3, dtype=torch.float64)
    w1, w2 = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    y, routing = reference.moe(x, w1, w2, topk_ids=ids, topk_weights=torch.ones(4, 2, dtype=torch.float64),
                               capacity_factor=0.5, return_routing=True)
    assert routing.expert_counts.tolist() == [3, 2] and int(routing.dropped) == 1
    f = [reference.expert_ffn(x, w1[e], w2[e], gated=True, activation="silu") for e in range(2)]
    torch.testing.assert_close(y, torch.stack([f[0][0], f[0][1], f[1][2], f[1][3]]), rtol=0, atol=1e-15)


def test_reference_gate_less_equals_router_form():
    problem = make_problem(1, tokens=17, hidden=8, ffn=6, experts=5, dtype=torch.float64, top_k=2,
                           expert_bias=True, tie_rtol=1e-6)
    y, routing = reference.moe(**problem, top_k=2, capacity_factor=0.7, return_routing=True)
    experts = {name: problem[name] for name in ("x", "w1", "w2", "b1", "b2")}
    y2 = reference.moe(**experts, topk_ids=routing.topk_ids, topk_weights=routing.topk_weights, capacity_factor=0.7)
    assert torch.equal(y, y2)


# --------------------------------------------------------------------------- native CPU op

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 0.6))
@pytest.mark.parametrize("gated", (True, False))
def test_native_bitwise_equals_full_op(dtype, capacity_factor, gated):
    """The gate-less op fed the routing the full op produced gives the full op's y, bit for bit."""
    problem = make_problem(3, tokens=45, hidden=40, ffn=24, experts=7, gated=gated, dtype=dtype, expert_bias=True)
    y, routing = flashmoe.moe(**problem, top_k=3, gated=gated, capacity_factor=capacity_factor, return_routing=True,
                              backend="native")
    experts = {name: problem[name] for name in ("x", "w1", "w2", "b1", "b2")}
    for ids in (routing.topk_ids, routing.topk_ids.long()):
        y2, routing2 = flashmoe.moe(**experts, topk_ids=ids, topk_weights=routing.topk_weights, gated=gated,
                                    capacity_factor=capacity_factor, return_routing=True, backend="native")
        assert same_bits(y, y2)
        assert torch.equal(routing.expert_counts, routing2.expert_counts)
        assert int(routing.dropped) == int(routing2.dropped)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 0.5))
def test_native_matches_float64_reference(dtype, capacity_factor):
    problem = experts_problem(4, tokens=53, dtype=dtype, expert_bias=True)
    ids, weights = random_routing(5, 53, 6, 3, dtype=dtype, sentinel_share=0.2)
    y, routing = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, capacity_factor=capacity_factor,
                              return_routing=True, backend="native")
    ref_y, ref_routing = reference.moe(**double(problem), topk_ids=ids, topk_weights=weights.double(),
                                       capacity_factor=capacity_factor, return_routing=True)
    assert y.dtype == dtype and y.shape == problem["x"].shape
    assert rel_err(y, ref_y) <= TOLERANCE[dtype]
    assert torch.equal(routing.expert_counts, ref_routing.expert_counts)
    assert int(routing.dropped) == int(ref_routing.dropped)
    assert capacity_factor is None or int(routing.dropped) > 0


def test_native_leading_dims_and_weights_in_x_dtype():
    problem = experts_problem(6, tokens=24, dtype=torch.bfloat16)
    ids, weights = random_routing(7, 24, 6, 2, dtype=torch.bfloat16)
    x = problem.pop("x")
    y = flashmoe.moe(x.reshape(4, 6, -1), **problem, topk_ids=ids, topk_weights=weights, backend="native")
    flat = flashmoe.moe(x, **problem, topk_ids=ids, topk_weights=weights.float(), backend="native")
    assert y.shape == (4, 6, x.shape[1]) and same_bits(y.reshape(flat.shape), flat)


def test_native_all_sentinel_and_zero_tokens():
    problem = experts_problem(8, tokens=5)
    ids = torch.full((5, 2), 6)
    y, routing = flashmoe.moe(**problem, topk_ids=ids, topk_weights=torch.rand(5, 2), return_routing=True,
                              backend="native")
    assert torch.equal(y, torch.zeros_like(y)) and routing.expert_counts.sum() == 0 and int(routing.dropped) == 0
    empty = experts_problem(8, tokens=0)
    y = flashmoe.moe(**empty, topk_ids=torch.empty(0, 2, dtype=torch.int64), topk_weights=torch.empty(0, 2),
                     backend="native")
    assert y.shape == (0, 20)


def test_native_top_k_above_local_experts_with_sentinels():
    """HF's expert-parallel mode: k = 4 picks over E = 2 local experts, the rest sentinels."""
    problem = experts_problem(9, tokens=11, experts=2)
    ids = torch.tensor([[0, 2, 1, 2], [2, 2, 2, 2], [1, 2, 2, 0]] * 3 + [[2, 1, 2, 2], [0, 2, 2, 2]])
    weights = torch.rand(11, 4)
    y = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, backend="native")
    ref = reference.moe(**double(problem), topk_ids=ids, topk_weights=weights.double())
    assert rel_err(y, ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=dtype_id)
def test_raw_entry_writes_every_output(dtype):
    """_C.moe_forward_cpu with routing_given: y, expert_counts and dropped poisoned, all written; no
    router pointer is read."""
    problem = experts_problem(10, tokens=33, dtype=dtype, expert_bias=True)
    ids, weights = random_routing(11, 33, 6, 2, dtype=reference.accumulate_dtype(dtype), sentinel_share=0.1,
                                  ids_dtype=torch.int32)
    x = problem["x"]
    descriptor = flashmoe.ops.problem_shape(20, 12, 6, 2, gated=True, activation="silu", normalize=None,
                                            scoring=None, dtype=dtype, has_router_bias=False, has_b1=True,
                                            has_b2=True, routing_given=True)
    descriptor.tokens, descriptor.expert_capacity = 33, -1
    y = torch.full_like(x, float("nan"))
    counts = torch.full((6,), -7, dtype=torch.int32)
    dropped = torch.full((), -7, dtype=torch.int64)
    _C.moe_forward_cpu(problem=descriptor, x=x.data_ptr(), router_weight=0, router_bias=0, w1=problem["w1"].data_ptr(),
                       b1=problem["b1"].data_ptr(), w2=problem["w2"].data_ptr(), b2=problem["b2"].data_ptr(),
                       y=y.data_ptr(), topk_ids=ids.data_ptr(), topk_weights=weights.data_ptr(),
                       expert_counts=counts.data_ptr(), router_logits=0, dropped=dropped.data_ptr(), num_threads=2)
    assert not y.isnan().any()
    ref_y, ref_routing = reference.moe(**double(problem), topk_ids=ids, topk_weights=weights.double(),
                                       return_routing=True)
    assert rel_err(y, ref_y) <= TOLERANCE[dtype]
    assert torch.equal(counts, ref_routing.expert_counts) and int(dropped) == 0


def test_assign_slots_skips_out_of_range_and_repeats():
    """The kernels' own rule (core/capacity.h routed_pick): an id outside [0, E) or a repeat in its
    row goes nowhere, so a cell never exceeds T rows even for input Python would reject."""
    counts, offsets, pick_row, row_token, dropped = _C.assign_slots([0, 3, 1, 1, -4, 0], 3, 2, 3, -1)
    assert counts == [2, 1, 0] and pick_row == [0, -1, 2, -1, -1, 1] and row_token == [0, 2, 1] and dropped == 0


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("case", [dict(), dict(capacity_factor=0.5, expert_bias=True),
                                  dict(gated=False, activation="gelu", expert_bias=True)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_gradcheck_reference_and_native(case):
    """float64 gradcheck of x, w1, w2, b1, b2 and topk_weights, through the reference and the native op."""
    case = dict(case)
    expert_bias = case.pop("expert_bias", False)
    problem = experts_problem(12, tokens=7, hidden=5, ffn=3, experts=4, dtype=torch.float64,
                              gated=case.get("gated", True), expert_bias=expert_bias)
    ids, weights = random_routing(13, 7, 4, 2, dtype=torch.float64, sentinel_share=0.2)
    names = list(problem)
    leaves = [problem[name].clone().requires_grad_() for name in names] + [weights.clone().requires_grad_()]
    for backend in BACKENDS:
        def fn(*tensors):
            return flashmoe.moe(**dict(zip(names, tensors[:-1])), topk_ids=ids, topk_weights=tensors[-1],
                                backend=backend, **case)
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_native_gradients_match_reference(dtype):
    problem = experts_problem(14, tokens=31, dtype=dtype, expert_bias=True)
    ids, weights = random_routing(15, 31, 6, 3, dtype=dtype, sentinel_share=0.15)
    grad_y = torch.randn(31, 20, generator=torch.Generator().manual_seed(16)).to(dtype)
    names = list(problem)

    def grads(backend, tensors, routing_weights):
        leaves = [tensors[name].clone().requires_grad_() for name in names] + [routing_weights.clone().requires_grad_()]
        y = flashmoe.moe(**dict(zip(names, leaves[:-1])), topk_ids=ids, topk_weights=leaves[-1], capacity_factor=0.8,
                         backend=backend)
        return torch.autograd.grad(y, leaves, grad_y.to(y.dtype))

    native = grads("native", problem, weights)
    ref = grads("reference", double(problem), weights.double())
    sentinel = ids == 6
    assert torch.equal(native[-1][sentinel], torch.zeros_like(native[-1][sentinel]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(names + ["topk_weights"], native, ref):
        assert got.dtype == dtype, name
        assert rel_err(got, want) <= tolerance, name


# --------------------------------------------------------------------------- torch citizenship

def test_opcheck():
    problem = experts_problem(17, tokens=9, hidden=12, ffn=7, experts=4, expert_bias=True)
    ids, weights = random_routing(18, 9, 4, 2, sentinel_share=0.2, ids_dtype=torch.int32)
    args = [problem[name].requires_grad_() for name in ("x", "w1", "w2", "b1", "b2")]
    torch.library.opcheck(torch.ops.flashmoe.moe_experts_forward,
                          (*args, ids, weights.requires_grad_(), True, "swiglu_oai", 0.75, None, None))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    problem = experts_problem(19, tokens=37)
    ids, weights = random_routing(20, 37, 6, 2, sentinel_share=0.1)

    def fn(x, w1, w2, topk_weights):
        return flashmoe.moe(x, w1, w2, topk_ids=ids, topk_weights=topk_weights, capacity_factor=1.0,
                            activation="swiglu_clamp", swiglu_limit=0.5, backend="native") * 2.0

    leaves = [problem["x"], problem["w1"], problem["w2"], weights]
    eager = fn(*leaves)
    assert same_bits(torch.compile(fn, fullgraph=True)(*leaves), eager)
    leaves = [t.clone().requires_grad_() for t in leaves]
    eager_grads = torch.autograd.grad(fn(*leaves).sum(), leaves)
    compiled_grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*leaves).sum(), leaves)
    for a, b in zip(eager_grads, compiled_grads):
        assert same_bits(a, b)


def test_inference_mode():
    problem = experts_problem(21, tokens=13)
    ids, weights = random_routing(22, 13, 6, 2)
    with torch.inference_mode():
        y = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, backend="native")
    assert same_bits(y, flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, backend="native"))


# --------------------------------------------------------------------------- guards

def _call(backend, **changes):
    problem = experts_problem(23, tokens=6, experts=4)
    ids, weights = random_routing(24, 6, 4, 2)
    arguments = dict(problem, topk_ids=ids, topk_weights=weights)
    arguments.update(changes)
    x, w1, w2 = arguments.pop("x"), arguments.pop("w1"), arguments.pop("w2")
    return flashmoe.moe(x, w1, w2, backend=backend, **arguments)


def _ids(rows):
    return torch.tensor(rows + [[0, 1]] * (6 - len(rows)))


BAD_ROUTING = [
    ("id-negative", dict(topk_ids=_ids([[-1, 0]])), ValueError, r"topk_ids.*\[0, E=4\).*topk_ids\[0, 0\] = -1"),
    ("id-above-sentinel", dict(topk_ids=_ids([[0, 1], [5, 0]])), ValueError, r"topk_ids\[1, 0\] = 5"),
    ("id-repeated", dict(topk_ids=_ids([[0, 1], [2, 2]])), ValueError, r"repeats expert 2 in row 1"),
    ("ids-float", dict(topk_ids=torch.zeros(6, 2)), TypeError, r"topk_ids must have dtype torch.int32 or torch.int64"),
    ("ids-int16", dict(topk_ids=torch.zeros(6, 2, dtype=torch.int16)), TypeError, r"topk_ids"),
    ("ids-1d", dict(topk_ids=torch.zeros(6, dtype=torch.int64)), ValueError, r"topk_ids must have shape \[T=6, k\]"),
    ("ids-wrong-T", dict(topk_ids=torch.zeros(5, 2, dtype=torch.int64)), ValueError, r"topk_ids must have shape"),
    ("ids-k-0", dict(topk_ids=torch.zeros(6, 0, dtype=torch.int64), topk_weights=torch.zeros(6, 0)), ValueError,
     r"k >= 1"),
    ("ids-list", dict(topk_ids=[[0, 1]] * 6), TypeError, r"topk_ids must be a torch.Tensor"),
    ("weights-missing", dict(topk_weights=None), ValueError, r"topk_weights is missing"),
    ("ids-missing", dict(topk_ids=None), ValueError, r"topk_ids is missing"),
    ("weights-float16", dict(topk_weights=torch.rand(6, 2, dtype=torch.float16)), TypeError,
     r"topk_weights must have dtype torch.float32"),
    ("weights-int", dict(topk_weights=torch.ones(6, 2, dtype=torch.int64)), TypeError, r"topk_weights"),
    ("weights-shape", dict(topk_weights=torch.rand(6, 3)), ValueError, r"topk_weights must have the shape of topk_ids"),
    ("top_k", dict(top_k=2), ValueError, r"top_k is an option of the router"),
    ("normalize", dict(normalize=True), ValueError, r"normalize is an option of the router"),
    ("scoring", dict(scoring="softmax"), ValueError, r"scoring is an option of the router"),
    ("router_bias", dict(router_bias=torch.zeros(4)), ValueError, r"router_bias is an option of the router"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_ROUTING, ids=lambda c: c[0])
def test_rejects_bad_routing(case, backend):
    _, changes, error, message = case
    with pytest.raises(error, match=message):
        _call(backend, **changes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_a_router_with_topk_ids(backend):
    problem = experts_problem(25, tokens=6, experts=4)
    ids, weights = random_routing(26, 6, 4, 2)
    router = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"router_weight must be None when topk_ids is given"):
        flashmoe.moe(problem["x"], router, problem["w1"], problem["w2"], topk_ids=ids, topk_weights=weights,
                     backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sentinel_may_repeat(backend):
    y = _call(backend, topk_ids=_ids([[4, 4], [4, 0]]))
    assert torch.isfinite(y).all()


def test_op_wants_int32_ids_and_accumulate_weights():
    problem = experts_problem(27, tokens=4, experts=4)
    ids, weights = random_routing(28, 4, 4, 2)
    args = [problem[name] for name in ("x", "w1", "w2")] + [None, None]
    with pytest.raises(TypeError, match=r"topk_ids must have dtype torch.int32 for flashmoe::moe_experts_forward"):
        torch.ops.flashmoe.moe_experts_forward(*args, ids, weights, True, "silu", None, None, None)
    with pytest.raises(TypeError, match=r"topk_weights must have dtype torch.float64"):
        torch.ops.flashmoe.moe_experts_forward(*[a.double() if a is not None else None for a in args],
                                               ids.int(), weights, True, "silu", None, None, None)
    with pytest.raises(ValueError, match=r"repeats expert"):
        torch.ops.flashmoe.moe_experts_forward(*args, torch.tensor([[1, 1]] * 4, dtype=torch.int32), weights, True,
                                               "silu", None, None, None)


def test_router_form_unchanged_defaults_still_reject_none():
    problem = make_problem(29, tokens=4, hidden=8, ffn=4, experts=4)
    with pytest.raises(TypeError, match=r"scoring must be a str"):
        flashmoe.moe(**problem, top_k=2, scoring=None)
    with pytest.raises(TypeError, match=r"router_weight must be a torch.Tensor"):
        flashmoe.moe(problem["x"], w1=problem["w1"], w2=problem["w2"], top_k=2)


# --------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 23), st.integers(1, 5), st.integers(1, 6),
       st.sampled_from([None, 0.3, 1.0]), st.floats(0.0, 0.6))
def test_native_matches_reference_on_random_routings(seed, tokens, experts, top_k, capacity_factor, sentinel_share):
    """Any valid routing (k up to E + 1, sentinels anywhere, capacity): counts and dropped exactly,
    y within fp32's bound, and rows whose every pick is a sentinel exactly zero."""
    rng = torch.Generator().manual_seed(seed)
    problem = experts_problem(seed % 1000, tokens=tokens, hidden=9, ffn=5, experts=experts)
    rows = []
    for _ in range(tokens):
        row = torch.randperm(experts, generator=rng)[:top_k].tolist()
        row += [experts] * (top_k - len(row))
        rows.append([experts if torch.rand((), generator=rng) < sentinel_share else e for e in row])
    ids = torch.tensor(rows, dtype=torch.int64).reshape(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=rng) + 0.1
    y, routing = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, capacity_factor=capacity_factor,
                              return_routing=True, backend="native")
    ref_y, ref_routing = reference.moe(**double(problem), topk_ids=ids, topk_weights=weights.double(),
                                       capacity_factor=capacity_factor, return_routing=True)
    assert torch.equal(routing.expert_counts, ref_routing.expert_counts)
    assert int(routing.dropped) == int(ref_routing.dropped)
    all_sentinel = (ids == experts).all(dim=1)
    assert torch.equal(y[all_sentinel], torch.zeros_like(y[all_sentinel]))
    if ref_y.norm() > 0:
        assert rel_err(y, ref_y) <= TOLERANCE[torch.float32]


def test_bits_do_not_depend_on_threads(num_threads):
    problem = experts_problem(30, tokens=70, expert_bias=True)
    ids, weights = random_routing(31, 70, 6, 3, sentinel_share=0.2)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, capacity_factor=0.9,
                                    backend="native"))
    assert all(same_bits(results[0], other) for other in results[1:])
