"""The routing options (issue 12): selection_bias, group-limited choice, routed_scaling_factor,
scoring="softmax_topk", the fp32 router of bf16/fp16 x, and weight_on="input".

The float64 reference against hand-computed cases, the guards of the shared validator, and the
native op against the reference (every option, every dtype, with capacity, bitwise across thread
counts, gradients against the reference's autograd)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flashmoe
from flashmoe import reference

F64 = torch.float64


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------- hand-computed (float64)

def test_group_limit_with_ties_keeps_lower_groups_and_experts():
    """sigmoid(0) = 0.5 exactly, so the keys are 0.5 + bias with dyadic biases: every group of two
    sums to exactly 1.0, the tie keeps groups 0 and 1, and within them 2 beats 3. Without the
    group limit expert 7 (0.875) and then 2 (0.625, tied with 4: the lower index) win."""
    logits = torch.zeros(1, 8, dtype=F64)
    bias = torch.tensor([0.25, -0.25, 0.125, -0.125, 0.125, -0.125, -0.375, 0.375], dtype=F64)
    ids, weights = reference.route(logits, 3, scoring="sigmoid", selection_bias=bias, num_groups=4, topk_groups=2)
    assert ids.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3, dtype=F64), rtol=0, atol=1e-15)
    ids, _ = reference.route(logits, 3, scoring="sigmoid", selection_bias=bias)
    assert ids.tolist() == [[7, 0, 2]]
    # num_groups = topk_groups: no limit.
    ids, _ = reference.route(logits, 3, scoring="sigmoid", selection_bias=bias, num_groups=4, topk_groups=4)
    assert ids.tolist() == [[7, 0, 2]]


def test_group_score_is_the_sum_of_the_two_best():
    """Group 0 holds one strong expert (0.9 + 0.1 + 0.1 = top two 1.0), group 1 two fair ones
    (0.6 + 0.6 = 1.2): the sum of the two best picks group 1, where the best single score would
    pick group 0."""
    scores = [0.9, 0.1, 0.1, 0.6, 0.6, 0.05]
    logits = torch.tensor([[_logit(p) for p in scores]], dtype=F64)
    ids, weights = reference.route(logits, 2, scoring="sigmoid", normalize=False, num_groups=2, topk_groups=1)
    assert ids.tolist() == [[3, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.6]], dtype=F64))
    # Groups of one: the group score is the expert's own key.
    ids, _ = reference.route(logits, 2, scoring="sigmoid", num_groups=6, topk_groups=2)
    assert ids.tolist() == [[0, 3]]


def test_selection_bias_changes_picks_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=F64)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=torch.float32)
    ids, weights = reference.route(logits, 2, scoring="sigmoid", normalize=False, selection_bias=bias)
    assert ids.tolist() == [[2, 0]]
    s = torch.sigmoid(torch.tensor([0.0, 2.0], dtype=F64))
    torch.testing.assert_close(weights[0], s, rtol=0, atol=0)
    ids, weights = reference.route(logits, 2, scoring="sigmoid", selection_bias=bias, routed_scaling_factor=2.5)
    torch.testing.assert_close(weights[0], s / s.sum() * 2.5, rtol=0, atol=0)
    # Unbiased: the two highest logits.
    ids, _ = reference.route(logits, 2, scoring="sigmoid")
    assert ids.tolist() == [[0, 1]]


def test_routed_scaling_factor_applies_after_normalisation():
    logits = torch.tensor([[0.5, -0.25, 1.0]], dtype=F64)
    ids, weights = reference.route(logits, 2, scoring="softmax", routed_scaling_factor=3.0)
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0, dtype=F64))
    p = torch.softmax(logits[0], 0)[[2, 0]]
    torch.testing.assert_close(weights[0], p / p.sum() * 3.0, rtol=0, atol=0)


def test_softmax_topk_is_a_softmax_over_the_k_picked_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 3.0]], dtype=F64)  # 1 and 4 tie: 1 first
    for normalize in (True, False):  # normalize has no effect
        ids, weights = reference.route(logits, 3, scoring="softmax_topk", normalize=normalize)
        assert ids.tolist() == [[1, 4, 2]]
        e = math.e
        expected = torch.tensor([[e, e, 1.0]], dtype=F64) / (2 * e + 1)
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-15)


def test_softmax_topk_includes_the_router_bias():
    x = torch.eye(3, dtype=F64)[:1]  # logits = router_weight[:, 0] + router_bias
    router_weight = torch.tensor([[1.0, 0, 0], [0.5, 0, 0], [0.0, 0, 0]], dtype=F64)
    router_bias = torch.tensor([0.0, 0.0, 2.0], dtype=F64)
    w1, w2 = torch.randn(3, 4, 3, dtype=F64), torch.randn(3, 3, 2, dtype=F64)
    _, routing = reference.moe(x, router_weight, w1, w2, top_k=2, scoring="softmax_topk", router_bias=router_bias,
                               return_routing=True)
    assert routing.topk_ids.tolist() == [[2, 0]]
    torch.testing.assert_close(routing.topk_weights, torch.softmax(torch.tensor([[2.0, 1.0]], dtype=F64), -1))


def test_weight_on_input_scales_the_row_and_combines_with_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    router_weight = torch.randn(3, 4, generator=g, dtype=F64)
    w1 = torch.randn(3, 6, 4, generator=g, dtype=F64)
    w2 = torch.randn(3, 4, 3, generator=g, dtype=F64)
    y, routing = reference.moe(x, router_weight, w1, w2, top_k=2, scoring="sigmoid", weight_on="input",
                               return_routing=True)
    expected = torch.zeros_like(x)
    for t in range(3):
        for j in range(2):
            e, w = int(routing.topk_ids[t, j]), routing.topk_weights[t, j]
            row = x[t] * w
            h = row @ w1[e].T
            expected[t] += (F.silu(h[:3]) * h[3:]) @ w2[e].T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y_output = reference.moe(x, router_weight, w1, w2, top_k=2, scoring="sigmoid")
    assert not torch.allclose(y, y_output)  # silu is not homogeneous: the two rules differ


def test_weight_on_input_rounds_the_row_once_to_x_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    topk_ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    topk_weights = torch.rand(4, 1, generator=g) + 0.3
    w1 = torch.randn(2, 3, 8, generator=g).to(torch.bfloat16)
    w2 = torch.randn(2, 8, 3, generator=g).to(torch.bfloat16)
    y = reference.moe(x, w1, w2, topk_ids=topk_ids, topk_weights=topk_weights, gated=False, activation="relu",
                      weight_on="input")
    rows = (x.float() * topk_weights).to(torch.bfloat16)
    expected = torch.stack([reference.expert_ffn(rows[t:t + 1], w1[int(topk_ids[t])], w2[int(topk_ids[t])],
                                                 gated=False, activation="relu")[0] for t in range(4)])
    torch.testing.assert_close(y, expected.float().to(torch.bfloat16), rtol=0, atol=0)


def test_fp32_router_computes_logits_from_upcast_x():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(5, 16, generator=g).to(dtype)
        router_weight, router_bias = torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
        w1, w2 = torch.randn(4, 6, 16, generator=g).to(dtype), torch.randn(4, 16, 3, generator=g).to(dtype)
        y, routing = reference.moe(x, router_weight, w1, w2, top_k=2, router_bias=router_bias, return_routing=True)
        assert y.dtype == dtype
        torch.testing.assert_close(routing.router_logits, F.linear(x.float(), router_weight, router_bias),
                                   rtol=1e-6, atol=1e-6)


def test_selection_bias_gets_no_gradient_and_scale_does():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g, dtype=F64, requires_grad=True)
    router_weight = torch.randn(8, 8, generator=g, dtype=F64, requires_grad=True)
    w1, w2 = torch.randn(8, 6, 8, generator=g, dtype=F64), torch.randn(8, 8, 3, generator=g, dtype=F64)
    bias = torch.randn(8, generator=g, dtype=F64, requires_grad=True)
    y = reference.moe(x, router_weight, w1, w2, top_k=2, scoring="sigmoid", selection_bias=bias, num_groups=4,
                      topk_groups=2, routed_scaling_factor=2.0)
    y.sum().backward()
    assert bias.grad is None
    assert x.grad is not None and router_weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- guards

def _args(dtype=torch.float32, experts=8, router_dtype=None):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, generator=g).to(dtype)
    router_weight = torch.randn(experts, 8, generator=g).to(router_dtype or dtype)
    w1 = torch.randn(experts, 6, 8, generator=g).to(dtype)
    w2 = torch.randn(experts, 8, 3, generator=g).to(dtype)
    return x, router_weight, w1, w2


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("options, error, match", [
    (dict(num_groups=3), ValueError, "num_groups must divide"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(num_groups=4, topk_groups=5), ValueError, "topk_groups must be in 1..num_groups=4"),
    (dict(num_groups=4, topk_groups=0), ValueError, "topk_groups"),
    (dict(num_groups=4, topk_groups=1, top_k=3), ValueError, "selectable"),
    (dict(selection_bias=torch.zeros(7)), ValueError, r"selection_bias must have shape \[E=8\]"),
    (dict(selection_bias=torch.zeros(8, dtype=torch.int32)), TypeError, "selection_bias must have a float dtype"),
    (dict(selection_bias=torch.zeros(8, device="meta")), ValueError, "selection_bias must be on device"),
    (dict(selection_bias=[0.0] * 8), TypeError, "selection_bias"),
    (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor"),
    (dict(weight_on="middle"), ValueError, "weight_on"),
    (dict(weight_on=1), TypeError, "weight_on"),
    (dict(scoring="softmax_top_k"), ValueError, "scoring"),
])
def test_guards(backend, options, error, match):
    x, router_weight, w1, w2 = _args()
    options = {"top_k": 2, **options}
    with pytest.raises(error, match=match):
        flashmoe.moe(x, router_weight, w1, w2, backend=backend, **options)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_router_dtype_guards(backend):
    x, router_weight, w1, w2 = _args(torch.bfloat16, router_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"router_weight must have dtype torch.bfloat16 .* or torch.float32"):
        flashmoe.moe(x, router_weight, w1, w2, top_k=2, backend=backend)
    x, router_weight, w1, w2 = _args(torch.float64, router_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"router_weight must have dtype torch.float64 \(the dtype of x\), got"):
        flashmoe.moe(x, router_weight, w1, w2, top_k=2, backend=backend)
    x, router_weight, w1, w2 = _args(torch.bfloat16, router_dtype=torch.float32)
    with pytest.raises(TypeError, match="router_bias must have dtype torch.float32 .the dtype of router_weight"):
        flashmoe.moe(x, router_weight, w1, w2, top_k=2, router_bias=torch.zeros(8, dtype=torch.bfloat16),
                     backend=backend)


@pytest.mark.parametrize("name, value", [("selection_bias", torch.zeros(8)), ("num_groups", 2), ("topk_groups", 2),
                                         ("routed_scaling_factor", 2.0)])
def test_routing_from_outside_refuses_router_options(name, value):
    x, _, w1, w2 = _args()
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match=f"{name} is an option of the router"):
        flashmoe.moe(x, w1, w2, topk_ids=ids, topk_weights=torch.ones(3, 2), backend="reference", **{name: value})


def test_layer_options_and_guards():
    layer = flashmoe.MoE(8, 4, 8, 2, scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2,
                         routed_scaling_factor=2.5, router_dtype=torch.float32, weight_on="input",
                         dtype=torch.bfloat16, backend="reference")
    assert layer.router_weight.dtype == torch.float32 and layer.w1.dtype == torch.bfloat16
    assert layer.selection_bias.dtype == torch.float32 and "selection_bias" in dict(layer.named_buffers())
    assert "selection_bias" not in dict(layer.named_parameters())
    x = torch.randn(5, 8).to(torch.bfloat16)
    with torch.no_grad():
        layer.selection_bias.copy_(torch.linspace(-1, 1, 8))
    y = layer(x)
    expected = reference.moe(x, layer.router_weight, layer.w1, layer.w2, top_k=2, scoring="sigmoid",
                             selection_bias=layer.selection_bias, num_groups=4, topk_groups=2,
                             routed_scaling_factor=2.5, weight_on="input")
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert "weight_on='input'" in repr(layer)
    with pytest.raises(TypeError, match="router_dtype"):
        flashmoe.MoE(8, 4, 8, 2, router_dtype=torch.float16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_groups must divide"):
        flashmoe.MoE(8, 4, 8, 2, num_groups=3)
    with pytest.raises(ValueError, match="selectable"):
        flashmoe.MoE(8, 4, 8, 4, num_groups=4, topk_groups=1)
    with pytest.raises(TypeError, match="selection_bias must be a bool"):
        flashmoe.MoE(8, 4, 8, 2, selection_bias=torch.zeros(8))


# ----------------------------------------------------------------------------- native against the reference

# (name, top_k, options); "router_f32" asks for a float32 router where x is bf16/fp16.
OPTION_SETS = [
    ("deepseek", 4, dict(scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2,
                         routed_scaling_factor=2.5)),
    ("groups-softmax", 3, dict(num_groups=8, topk_groups=3, normalize=False)),
    ("softmax_topk", 4, dict(scoring="softmax_topk", router_bias=True)),
    ("weight_on_input", 1, dict(scoring="sigmoid", weight_on="input")),
    ("weight_on_input-k3", 3, dict(weight_on="input", routed_scaling_factor=0.5)),
    ("router_f32", 2, dict(router_f32=True, router_bias=True, selection_bias=True)),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-12}


def _problem(dtype, options, seed=0, tokens=45, hidden=24, ffn=20, experts=16):
    """Random inputs (x, router_weight, w1, w2, b1, b2 and the options' tensors) and the options."""
    options = dict(options)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, to=dtype):
        return (torch.randn(*shape, generator=g, dtype=F64) * std).to(to)

    router_dtype = torch.float32 if options.pop("router_f32", False) and dtype in (torch.bfloat16, torch.float16) \
        else dtype
    problem = dict(x=randn(tokens, hidden), router_weight=randn(experts, hidden, std=hidden ** -0.5, to=router_dtype),
                   w1=randn(experts, 2 * ffn, hidden, std=hidden ** -0.5), w2=randn(experts, hidden, ffn, std=ffn ** -0.5),
                   b1=randn(experts, 2 * ffn, std=0.3), b2=randn(experts, hidden, std=0.3))
    if options.pop("router_bias", False):
        problem["router_bias"] = randn(experts, std=0.5, to=router_dtype)
    if options.pop("selection_bias", False):
        problem["selection_bias"] = randn(experts, std=0.5, to=torch.float32)
    return problem, options


def _double(problem):
    return {name: tensor.double() for name, tensor in problem.items()}


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _bits(tensor):
    views = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}
    return tensor.view(views[tensor.dtype]) if tensor.dtype in views else tensor


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name, top_k, options", OPTION_SETS, ids=[case[0] for case in OPTION_SETS])
def test_native_matches_reference(name, top_k, options, dtype):
    problem, options = _problem(dtype, options)
    for capacity_factor in (None, 0.75):
        y, routing = flashmoe.moe(**problem, top_k=top_k, capacity_factor=capacity_factor, return_routing=True,
                                  backend="native", **options)
        y_ref, ref = reference.moe(**_double(problem), top_k=top_k, capacity_factor=capacity_factor,
                                   return_routing=True, **options)
        assert y.dtype == dtype and bool(torch.isfinite(y).all())
        assert torch.equal(routing.topk_ids, ref.topk_ids), f"{name}: routing differs from the reference"
        torch.testing.assert_close(routing.topk_weights.double(), ref.topk_weights,
                                   rtol=1e-12 if dtype == F64 else 1e-5, atol=1e-12 if dtype == F64 else 1e-6)
        assert torch.equal(routing.expert_counts, ref.expert_counts) and int(routing.dropped) == int(ref.dropped)
        assert capacity_factor is None or int(routing.dropped) > 0
        assert _rel_err(y, y_ref) <= TOLERANCE[dtype], f"{name}: error {_rel_err(y, y_ref):.2e}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name, top_k, options", OPTION_SETS, ids=[case[0] for case in OPTION_SETS])
def test_native_bitwise_across_thread_counts(name, top_k, options, dtype, num_threads):
    problem, options = _problem(dtype, options, seed=1, tokens=70)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        y, routing = flashmoe.moe(**problem, top_k=top_k, capacity_factor=0.9, return_routing=True, backend="native",
                                  **options)
        runs.append((y, routing))
    for y, routing in runs[1:]:
        assert torch.equal(_bits(y), _bits(runs[0][0]))
        assert torch.equal(routing.topk_ids, runs[0][1].topk_ids)
        assert torch.equal(_bits(routing.topk_weights), _bits(runs[0][1].topk_weights))
        assert torch.equal(_bits(routing.router_logits), _bits(runs[0][1].router_logits))


@pytest.mark.parametrize("name, top_k, options", OPTION_SETS, ids=[case[0] for case in OPTION_SETS])
def test_native_gradients_match_reference_autograd(name, top_k, options):
    """float64: the native op's backward (explicit formulas) against torch autograd through the
    reference, for y and the routing's weights and logits; selection_bias gets no gradient."""
    problem, options = _problem(F64, options, seed=2, tokens=20)
    g = torch.Generator().manual_seed(3)
    grad_y = torch.randn(20, 24, generator=g, dtype=F64)
    grad_w = torch.randn(20, top_k, generator=g, dtype=F64)
    grad_logits = torch.randn(20, 16, generator=g, dtype=F64)
    grads = {}
    for backend in ("native", "reference"):
        inputs = {name_: tensor.clone().requires_grad_(name_ != "selection_bias") for name_, tensor in problem.items()}
        y, routing = flashmoe.moe(**inputs, top_k=top_k, capacity_factor=0.9, return_routing=True, backend=backend,
                                  **options)
        loss = (y * grad_y).sum() + (routing.topk_weights * grad_w).sum() + (routing.router_logits * grad_logits).sum()
        loss.backward()
        grads[backend] = {name_: tensor.grad for name_, tensor in inputs.items()}
        assert grads[backend].get("selection_bias") is None
    for name_, grad in grads["reference"].items():
        if grad is None:
            continue
        torch.testing.assert_close(grads["native"][name_], grad, rtol=1e-9, atol=1e-10, msg=f"{name}: grad of {name_}")


def test_fp32_router_gradients_come_back_in_fp32():
    problem, options = _problem(torch.bfloat16, dict(router_f32=True, router_bias=True), seed=4)
    inputs = {name: tensor.clone().requires_grad_() for name, tensor in problem.items()}
    y = flashmoe.moe(**inputs, top_k=2, backend="native", **options)
    y.float().square().sum().backward()
    assert inputs["router_weight"].grad.dtype == torch.float32 and inputs["router_bias"].grad.dtype == torch.float32
    assert inputs["x"].grad.dtype == torch.bfloat16 and inputs["router_weight"].grad.abs().sum() > 0
    ref = {name: tensor.detach().double().requires_grad_() for name, tensor in problem.items()}
    reference.moe(**ref, top_k=2).square().sum().backward()
    assert _rel_err(inputs["router_weight"].grad, ref["router_weight"].grad) < 5e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_routing_from_outside_with_weight_on_input(dtype):
    problem, _ = _problem(dtype, {}, seed=5)
    del problem["router_weight"]
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(16, generator=g)[:3] for _ in range(45)]).to(torch.int32)
    weights = torch.rand(45, 3, generator=g, dtype=F64) + 0.2
    results = {}
    for backend in ("native", "reference"):
        inputs = problem if backend == "native" else _double(problem)
        topk_weights = (weights if dtype == F64 or backend == "reference" else weights.float()).clone().requires_grad_()
        x, w1, w2 = inputs["x"], inputs["w1"], inputs["w2"]
        y = flashmoe.moe(x, w1, w2, b1=inputs["b1"], b2=inputs["b2"], topk_ids=ids, topk_weights=topk_weights,
                         capacity_factor=0.8, weight_on="input", backend=backend)
        y.double().sum().backward()
        results[backend] = (y, topk_weights.grad)
    (y, grad), (y_ref, grad_ref) = results["native"], results["reference"]
    assert _rel_err(y, y_ref) <= TOLERANCE[dtype]
    assert _rel_err(grad, grad_ref) <= max(TOLERANCE[dtype] * 5, 1e-10)


def test_cuda_computes_every_routing_option():
    """The CUDA kernel refuses no routing option: the fp32 router of bf16/fp16 x runs in its gate task
    like the rest (tests/cpp/test_cuda_emulation.cpp checks it against the CPU backend), so neither _C
    nor the op keeps a refusal to consult."""
    from flashmoe import _C, ops
    assert not hasattr(_C, "cuda_lacks_routing_options")
    assert not hasattr(ops, "_refuse_cuda_routing_options")


def test_opcheck_with_routing_options():
    problem, options = _problem(F64, dict(scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2,
                                          routed_scaling_factor=2.5, weight_on="input"), seed=7, tokens=9)
    for name, tensor in problem.items():
        tensor.requires_grad_(name != "selection_bias")
    args = (problem["x"], problem["router_weight"], problem["w1"], problem["w2"], None, problem["b1"], problem["b2"],
            3, True, "silu", True, "sigmoid", 0.9, None, None, problem["selection_bias"], 4, 2, 2.5, "input")
    torch.library.opcheck(torch.ops.flashmoe.moe_forward, args)
    args = args[:11] + ("softmax_topk",) + args[12:15] + (None, 1, 1, 1.0, "output")
    torch.library.opcheck(torch.ops.flashmoe.moe_forward, args)
