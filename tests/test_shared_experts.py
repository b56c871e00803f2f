"""Shared experts: shared_w1 [2S or S, H], shared_w2 [H, S] and the optional shared_gate [1, H].

The float64 reference against hand-computed values (with and without the gate), every guard, the
module's parameters, the backward ops against the reference's autograd, and the native CPU op
against the reference (every dtype, capacity, the gate, poisoned outputs, bitwise across thread
counts, both forms of the op).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import flashmoe
from conftest import DTYPES, TOLERANCE, dtype_id, make_problem, rel_err, same_bits
from flashmoe import _C, ops, reference


def shared_weights(seed, *, hidden, shared_ffn, gated=True, gate=False, dtype=torch.float32):
    """Random shared expert weights, std 1/sqrt(fan_in) (the gate's logits std ~1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    rows = 2 * shared_ffn if gated else shared_ffn
    weights = dict(shared_w1=randn(rows, hidden, std=1 / math.sqrt(hidden)),
                   shared_w2=randn(hidden, shared_ffn, std=1 / math.sqrt(shared_ffn)))
    if gate:
        weights["shared_gate"] = randn(1, hidden, std=1 / math.sqrt(hidden))
    return weights


def shared_problem(seed, *, tokens=37, hidden=24, ffn=16, experts=6, shared_ffn=10, gated=True, gate=False,
                   dtype=torch.float32, top_k=2):
    problem = make_problem(seed, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, gated=gated, dtype=dtype,
                           top_k=top_k)
    problem.update(shared_weights(seed + 1000, hidden=hidden, shared_ffn=shared_ffn, gated=gated, gate=gate,
                                  dtype=dtype))
    return problem


def double(problem: dict) -> dict:
    return {name: t.double() for name, t in problem.items()}


# --------------------------------------------------------------------------- the specification

@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_reference_matches_hand_computation(gate):
    """H=1, plain relu experts of I=1 and a plain relu shared expert of S=2: each term by hand.

    Routing from outside fixes the picks; token 1's second pick is the sentinel (zero), token 2 picks
    nothing but still gets the shared expert."""
    x = torch.tensor([[1.0], [-2.0], [3.0]], dtype=torch.float64)
    w1 = torch.tensor([[[1.0]], [[-1.0]]], dtype=torch.float64)  # f_e(x) = relu(w1_e x) * w2_e
    w2 = torch.tensor([[[10.0]], [[100.0]]], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2], [2, 2]])
    weights = torch.tensor([[0.25, 0.5], [2.0, 7.0], [5.0, 5.0]], dtype=torch.float64)
    shared_w1 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)  # s(x) = 3·relu(x) + 7·relu(-x/2)
    shared_w2 = torch.tensor([[3.0, 7.0]], dtype=torch.float64)
    shared_gate = torch.tensor([[0.5]], dtype=torch.float64) if gate else None
    y = reference.moe(x, w1, w2, topk_ids=ids, topk_weights=weights, gated=False, activation="relu",
                      shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate)
    routed = [0.25 * 10 * 1, 2.0 * 100 * 2, 0.0]
    shared = [3.0 * 1, 7.0 * 1, 3.0 * 3]
    scale = [1 / (1 + math.exp(-0.5 * v)) if gate else 1.0 for v in (1.0, -2.0, 3.0)]
    expected = torch.tensor([[r + g * s] for r, s, g in zip(routed, shared, scale)], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_reference_gated_shared_expert_is_a_dense_swiglu_mlp(gate):
    """With the router: y = the routed output + g · (silu(x·Gᵀ) ⊙ x·Uᵀ)·W2ᵀ, S != I."""
    problem = double(shared_problem(1, tokens=9, gate=gate))
    y = reference.moe(**problem, top_k=2)
    routed = reference.moe(**{k: v for k, v in problem.items() if not k.startswith("shared")}, top_k=2)
    x = problem["x"]
    gate_rows, up_rows = problem["shared_w1"].chunk(2)
    shared = (F.silu(x @ gate_rows.T) * (x @ up_rows.T)) @ problem["shared_w2"].T
    scale = torch.sigmoid(x @ problem["shared_gate"].T) if gate else 1.0
    torch.testing.assert_close(y, routed + scale * shared, rtol=1e-12, atol=1e-12)


def test_reference_capacity_drops_only_routed_work():
    """A tiny capacity drops picks, never the shared expert: y - routed(y) is the shared output."""
    problem = double(shared_problem(2, tokens=20))
    routed_only = {k: v for k, v in problem.items() if not k.startswith("shared")}
    y, routing = reference.moe(**problem, top_k=2, capacity_factor=0.25, return_routing=True)
    assert int(routing.dropped) > 0
    routed = reference.moe(**routed_only, top_k=2, capacity_factor=0.25)
    shared, _ = reference.shared_expert(problem["x"], problem["shared_w1"], problem["shared_w2"], gated=True,
                                        activation="silu")
    torch.testing.assert_close(y, routed + shared, rtol=1e-12, atol=1e-12)


def test_reference_shared_expert_uses_the_routed_activation_and_swiglu_options():
    problem = double(shared_problem(3, tokens=7, gated=True))
    x = problem["x"]
    y = reference.moe(**problem, top_k=2, activation="swiglu_oai", swiglu_limit=0.5, swiglu_alpha=1.5)
    routed = reference.moe(**{k: v for k, v in problem.items() if not k.startswith("shared")}, top_k=2,
                           activation="swiglu_oai", swiglu_limit=0.5, swiglu_alpha=1.5)
    gate_h, up_h = (x @ problem["shared_w1"].T).chunk(2, dim=-1)
    gate_h = gate_h.clamp(max=0.5)
    h = (up_h.clamp(-0.5, 0.5) + 1) * gate_h * torch.sigmoid(1.5 * gate_h)
    torch.testing.assert_close(y, routed + h @ problem["shared_w2"].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_reference_rounds_once(dtype):
    """In low precision each expert output (routed or shared) is rounded to x's dtype, the weighted
    picks (ascending j) and then g · shared are summed in fp32, and the sum is rounded once. (Each
    pick is recomputed alone here, which bf16/fp16 rounding hides and fp32's GEMMs may not.)"""
    problem = shared_problem(4, tokens=11, dtype=dtype, gate=True)
    y = reference.moe(**problem, top_k=2)
    x = problem["x"]
    ids, weights = reference.route(reference.router_logits(x, problem["router_weight"]), 2)
    total = torch.zeros(x.shape, dtype=torch.float32)
    for j in range(2):
        out = torch.stack([reference.expert_ffn(x[t:t + 1], problem["w1"][int(ids[t, j])],
                                                problem["w2"][int(ids[t, j])], gated=True, activation="silu")[0]
                           for t in range(x.shape[0])])
        assert out.dtype == dtype
        total = total + weights[:, j, None] * out.float()
    shared, scale = reference.shared_expert(x, problem["shared_w1"], problem["shared_w2"], problem["shared_gate"],
                                            gated=True, activation="silu")
    assert shared.dtype == dtype and scale.dtype == torch.float32 and scale.shape == (11, 1)
    assert same_bits(y, (total + scale * shared.float()).to(dtype))
    assert rel_err(y, reference.moe(**double(problem), top_k=2)) < TOLERANCE[dtype]


# --------------------------------------------------------------------------- guards

def _guard_args(**changes):
    problem = shared_problem(5, tokens=4, hidden=8, ffn=4, experts=4, shared_ffn=3, gate=True)
    problem.update(changes)
    return {k: v for k, v in problem.items() if v is not None}


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("changes, error, match", [
    (dict(shared_w2=None, shared_gate=None), ValueError, "shared_w1 was given without shared_w2"),
    (dict(shared_w1=None, shared_gate=None), ValueError, "shared_w2 was given without shared_w1"),
    (dict(shared_w1=None, shared_w2=None), ValueError, "shared_gate was given without shared_w1"),
    (dict(shared_w1=torch.randn(5, 8)), ValueError, r"shared_w1 must have shape \[2S, H=8\].*even"),
    (dict(shared_w1=torch.randn(6, 7)), ValueError, r"shared_w1 must have shape \[6, 8\]"),
    (dict(shared_w1=torch.randn(6)), ValueError, r"shared_w1 must have shape \[2S, H=8\]"),
    (dict(shared_w1=[[1.0]]), TypeError, "shared_w1 must be a torch.Tensor"),
    (dict(shared_w2=torch.randn(8, 4)), ValueError, r"shared_w2 must have shape \[8, 3\]"),
    (dict(shared_w2=torch.randn(3, 8)), ValueError, r"shared_w2 must have shape \[8, 3\]"),
    (dict(shared_gate=torch.randn(8)), ValueError, r"shared_gate must have shape \[1, 8\]"),
    (dict(shared_gate=torch.randn(2, 8)), ValueError, r"shared_gate must have shape \[1, 8\]"),
    (dict(shared_w1=torch.randn(6, 8, dtype=torch.float64)), TypeError, "shared_w1 must have dtype torch.float32"),
    (dict(shared_w2=torch.randn(8, 3, dtype=torch.bfloat16)), TypeError, "shared_w2 must have dtype torch.float32"),
    (dict(shared_gate=torch.randn(1, 8, dtype=torch.float16)), TypeError, "shared_gate must have dtype"),
    (dict(shared_w1=torch.randn(6, 8, device="meta")), ValueError, "shared_w1 must be on device cpu"),
    (dict(shared_gate=torch.randn(1, 8, device="meta")), ValueError, "shared_gate must be on device cpu"),
])
def test_guards(backend, changes, error, match):
    with pytest.raises(error, match=match):
        flashmoe.moe(**_guard_args(**changes), top_k=2, backend=backend)


def test_guard_plain_experts_take_s_rows():
    """Plain experts: shared_w1 [S, H] (any S >= 1, odd included) with shared_w2 [H, S]."""
    x = torch.randn(4, 8)
    reference.check_shared_expert(x, torch.randn(5, 8), torch.randn(8, 5), None, gated=False)
    with pytest.raises(ValueError, match=r"shared_w2 must have shape \[8, 5\]"):
        reference.check_shared_expert(x, torch.randn(5, 8), torch.randn(8, 2), None, gated=False)
    with pytest.raises(ValueError, match=r"shared_w1 must have shape \[S, H=8\] with S >= 1, got \[0, 8\]"):
        reference.check_shared_expert(x, torch.randn(0, 8), torch.randn(8, 0), None, gated=False)


def test_guard_gate_less_form():
    problem = _guard_args(shared_w2=None, shared_gate=None)
    problem.pop("router_weight")
    ids = torch.tensor([[0, 1]] * 4)
    with pytest.raises(ValueError, match="shared_w1 was given without shared_w2"):
        flashmoe.moe(**problem, topk_ids=ids, topk_weights=torch.ones(4, 2), backend="native")


@pytest.mark.parametrize("changes, error, match", [
    (dict(shared_ffn_size=-1), ValueError, "shared_ffn_size must be an int >= 0"),
    (dict(shared_ffn_size=2.0), TypeError, "shared_ffn_size must be an int"),
    (dict(shared_ffn_size=True), TypeError, "shared_ffn_size must be an int"),
    (dict(shared_gate=1), TypeError, "shared_gate must be a bool"),
    (dict(shared_gate=True), ValueError, "shared_gate=True .* needs shared_ffn_size > 0"),
])
def test_layer_guards(changes, error, match):
    with pytest.raises(error, match=match):
        flashmoe.MoE(8, 4, 4, 2, **changes)


# --------------------------------------------------------------------------- the module

@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_layer_parameters_and_forward(gated):
    torch.manual_seed(0)
    layer = flashmoe.MoE(16, 8, 4, 2, gated=gated, activation="silu" if gated else "relu", shared_ffn_size=5,
                         shared_gate=True, backend="reference")
    names = dict(layer.named_parameters())
    assert names["shared_w1"].shape == (10 if gated else 5, 16)
    assert names["shared_w2"].shape == (16, 5) and names["shared_gate"].shape == (1, 16)
    assert all(float(p.detach().abs().max()) > 0 for p in names.values())
    x = torch.randn(3, 5, 16)
    expected = reference.moe(x, layer.router_weight, layer.w1, layer.w2, top_k=2, gated=gated,
                             activation=layer.activation, shared_w1=layer.shared_w1, shared_w2=layer.shared_w2,
                             shared_gate=layer.shared_gate)
    assert same_bits(layer(x), expected)
    assert "shared_ffn_size=5, shared_gate=True" in repr(layer)
    plain = flashmoe.MoE(16, 8, 4, 2)
    assert plain.shared_w1 is None and plain.shared_w2 is None and plain.shared_gate is None
    assert "shared" not in repr(plain)


# --------------------------------------------------------------------------- gradients

def _reference_grads(problem, names, **options):
    leaves = {k: v.double().detach().requires_grad_(k in names) for k, v in problem.items()}
    y = reference.moe(**leaves, **options)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    (y * grad_y).sum().backward()
    return {k: leaves[k].grad for k in names}, grad_y


@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_backward_op_matches_reference_autograd(gate, capacity_factor):
    """moe_backward (the native op's backward) against autograd through the float64 reference."""
    problem = double(shared_problem(6, tokens=13, gate=gate, top_k=2))
    names = [k for k in problem if k != "router_bias"]
    expected, grad_y = _reference_grads(problem, names, top_k=2, capacity_factor=capacity_factor)
    _, routing = reference.moe(**problem, top_k=2, capacity_factor=capacity_factor, return_routing=True)
    grads = torch.ops.flashmoe.moe_backward(
        grad_y, None, None, problem["x"], problem["router_weight"], problem["w1"], problem["w2"], None, None, None,
        routing.topk_ids, 2, True, "silu", True, "softmax", capacity_factor, [True] * 10, None, None,
        shared_w1=problem["shared_w1"], shared_w2=problem["shared_w2"], shared_gate=problem.get("shared_gate"))
    assert len(grads) == 10
    for name, grad in zip(ops._GRAD_INPUTS, grads):
        if name in expected:
            torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-10, msg=name)
        else:
            assert grad.numel() == 0


def test_backward_op_takes_seven_flags_without_a_shared_expert():
    problem = double(shared_problem(7, tokens=5))
    for name in ("shared_w1", "shared_w2", "shared_gate"):
        problem.pop(name, None)
    _, routing = reference.moe(**problem, top_k=2, return_routing=True)
    args = (torch.ones_like(problem["x"]), None, None, problem["x"], problem["router_weight"], problem["w1"],
            problem["w2"], None, None, None, routing.topk_ids, 2, True, "silu", True, "softmax", None)
    assert len(torch.ops.flashmoe.moe_backward(*args, [True] * 7)) == 7
    with pytest.raises(ValueError, match="needs_grad must be a list of 10 bools"):
        torch.ops.flashmoe.moe_backward(*args, [True] * 7, None, None, shared_w1=torch.ones(4, 24, dtype=torch.float64),
                                        shared_w2=torch.ones(24, 2, dtype=torch.float64))


@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_experts_backward_op_matches_reference_autograd(gate):
    problem = double(shared_problem(8, tokens=11, gate=gate))
    problem.pop("router_weight")
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(11)])
    weights = torch.rand(11, 2, generator=g, dtype=torch.float64) + 0.1
    names = list(problem) + ["topk_weights"]
    leaves = {k: v.detach().requires_grad_() for k, v in {**problem, "topk_weights": weights}.items()}
    y = reference.moe(topk_ids=ids, **leaves)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * grad_y).sum().backward()
    grads = torch.ops.flashmoe.moe_experts_backward(
        grad_y, problem["x"], problem["w1"], problem["w2"], None, None, ids.int(), weights, True, "silu", None, None,
        None, [True] * 9, shared_w1=problem["shared_w1"], shared_w2=problem["shared_w2"],
        shared_gate=problem.get("shared_gate"))
    for name, grad in zip(ops._EXPERTS_GRAD_INPUTS, grads):
        if name in names:
            torch.testing.assert_close(grad, leaves[name].grad, rtol=1e-9, atol=1e-10, msg=name)
        else:
            assert grad.numel() == 0


def test_cuda_checks_name_the_shared_tensors():
    """The CUDA kernel's own checks (run here through the function its kernel and fake call) name a
    shared expert tensor on another device."""
    problem = shared_problem(9, tokens=3, gate=True)
    for name in ("shared_w1", "shared_w2", "shared_gate"):
        shared = [problem[n] if n != name else problem[n].to("meta") for n in ("shared_w1", "shared_w2", "shared_gate")]
        with pytest.raises(ValueError, match=f"{name} must be on device cpu"):
            ops._validate_cuda(problem["x"], problem["router_weight"], problem["w1"], problem["w2"], None, None, None,
                               shared=tuple(shared))


# --------------------------------------------------------------------------- the native CPU op

NATIVE_CASES = [
    # (tokens, hidden, ffn, experts, shared_ffn, top_k): one row tile; several row tiles, S tiles and
    # hidden tiles with S > I (the intermediate buffers hold max(I, S)); S < I.
    dict(tokens=37, hidden=24, ffn=16, experts=6, shared_ffn=10, top_k=2),
    dict(tokens=150, hidden=530, ffn=40, experts=4, shared_ffn=270, top_k=2),
    dict(tokens=70, hidden=32, ffn=300, experts=5, shared_ffn=8, top_k=3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("case", range(len(NATIVE_CASES)))
def test_native_matches_reference(dtype, gate, capacity_factor, case):
    shape = NATIVE_CASES[case]
    problem = shared_problem(10 + case, dtype=dtype, gate=gate, **shape)
    y, routing = flashmoe.moe(**problem, top_k=shape["top_k"], capacity_factor=capacity_factor, backend="native",
                              return_routing=True)
    ref, ref_routing = reference.moe(**double(problem), top_k=shape["top_k"], capacity_factor=capacity_factor,
                                     return_routing=True)
    assert torch.equal(routing.topk_ids, ref_routing.topk_ids)
    if capacity_factor is not None:
        assert int(routing.dropped) == int(ref_routing.dropped) > 0
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOLERANCE[dtype]
    # The shared term is there: without it the error is large.
    without = reference.moe(**{k: v for k, v in double(problem).items() if not k.startswith("shared")},
                            top_k=shape["top_k"], capacity_factor=capacity_factor)
    assert rel_err(y, without) > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("gated, activation", [(True, "silu"), (False, "gelu_tanh"), (True, "swiglu_oai")])
def test_native_activations(dtype, gated, activation):
    problem = shared_problem(20, tokens=45, dtype=dtype, gate=True, gated=gated, shared_ffn=12)
    y = flashmoe.moe(**problem, top_k=2, gated=gated, activation=activation, backend="native")
    ref = reference.moe(**double(problem), top_k=2, gated=gated, activation=activation)
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_native_writes_every_output_element(dtype):
    """The raw entry into NaN-poisoned outputs: every element of y is written, and equals the op's."""
    from conftest import empty_outputs, native_problem, raw_addresses
    problem = shared_problem(21, tokens=70, dtype=dtype, gate=True)
    shared = {name: problem.pop(name) for name in ("shared_w1", "shared_w2", "shared_gate")}
    descriptor = native_problem(70, 24, 16, 6, dtype, top_k=2)
    descriptor.shared_ffn, descriptor.has_shared_gate = 10, True
    outputs = empty_outputs(problem, 2, poison=True)
    _C.moe_forward_cpu(problem=descriptor, **raw_addresses(problem, outputs), num_threads=2,
                                **{name: t.data_ptr() for name, t in shared.items()})
    assert not torch.isnan(outputs["y"]).any()
    expected = flashmoe.moe(**problem, **shared, top_k=2, backend="native")
    assert same_bits(outputs["y"], expected)


def test_native_raw_entry_checks_the_shared_pointers():
    from conftest import empty_outputs, native_problem, raw_addresses
    problem = shared_problem(22, tokens=5, gate=True)
    shared = {name: problem.pop(name) for name in ("shared_w1", "shared_w2", "shared_gate")}
    addresses = raw_addresses(problem, empty_outputs(problem, 2))
    descriptor = native_problem(5, 24, 16, 6, torch.float32, top_k=2)
    with pytest.raises(ValueError, match="shared_ffn disagrees with shared_w1/shared_w2"):
        _C.moe_forward_cpu(problem=descriptor, **addresses, num_threads=1,
                                    shared_w1=shared["shared_w1"].data_ptr(), shared_w2=shared["shared_w2"].data_ptr())
    descriptor.shared_ffn = 10
    with pytest.raises(ValueError, match="shared_ffn disagrees"):
        _C.moe_forward_cpu(problem=descriptor, **addresses, num_threads=1)
    with pytest.raises(ValueError, match="has_shared_gate disagrees with shared_gate"):
        _C.moe_forward_cpu(problem=descriptor, **addresses, num_threads=1,
                                    **{name: t.data_ptr() for name, t in shared.items()})
    descriptor.shared_ffn, descriptor.has_shared_gate = 0, True
    assert "has_shared_gate needs a shared expert" in descriptor.validate()
    descriptor.shared_ffn, descriptor.has_shared_gate = -1, False
    assert "shared_ffn must be >= 0" in descriptor.validate()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_native_bitwise_across_thread_counts(dtype, num_threads):
    problem = shared_problem(23, tokens=150, hidden=530, ffn=40, experts=4, shared_ffn=270, dtype=dtype, gate=True)
    outputs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outputs.append(flashmoe.moe(**problem, top_k=2, capacity_factor=0.75, backend="native"))
    assert all(same_bits(outputs[0], y) for y in outputs[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_native_gate_less_form(dtype, gate):
    """Routing from outside with a shared expert: against the reference, and bitwise equal to the
    router form fed its own routing."""
    problem = shared_problem(24, tokens=40, dtype=dtype, gate=gate)
    y_full, routing = flashmoe.moe(**problem, top_k=2, capacity_factor=0.6, backend="native", return_routing=True)
    router_weight = problem.pop("router_weight")
    del router_weight
    y = flashmoe.moe(**problem, topk_ids=routing.topk_ids, topk_weights=routing.topk_weights, capacity_factor=0.6,
                     backend="native")
    assert same_bits(y, y_full)
    ref = reference.moe(**double(problem), topk_ids=routing.topk_ids, topk_weights=routing.topk_weights.double(),
                        capacity_factor=0.6)
    assert rel_err(y, ref) < TOLERANCE[dtype]


def test_native_no_tokens():
    problem = shared_problem(25, tokens=0, gate=True)
    y = flashmoe.moe(**problem, top_k=2, backend="native")
    assert y.shape == (0, 24)


@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_native_autograd_matches_reference(gate):
    """flashmoe.moe's gradients (native forward, moe_backward) against the float64 reference's
    autograd, for x, every weight and the shared expert's."""
    problem = double(shared_problem(26, tokens=30, gate=gate))
    names = list(problem)
    expected, grad_y = _reference_grads(problem, names, top_k=2, capacity_factor=0.8)
    leaves = {k: v.detach().requires_grad_() for k, v in problem.items()}
    y = flashmoe.moe(**leaves, top_k=2, capacity_factor=0.8, backend="native")
    (y * grad_y).sum().backward()
    for name in names:
        torch.testing.assert_close(leaves[name].grad, expected[name], rtol=1e-9, atol=1e-10, msg=name)


def test_native_autograd_gate_less_form():
    problem = double(shared_problem(27, tokens=20, gate=True))
    problem.pop("router_weight")
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=g, dtype=torch.float64) + 0.1
    tensors = {**problem, "topk_weights": weights}
    grads = []
    for backend in ("native", "reference"):
        leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
        y = flashmoe.moe(topk_ids=ids, **leaves, backend=backend)
        y.sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in tensors:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-10, msg=name)


def test_layer_native_forward_and_backward():
    torch.manual_seed(1)
    layer = flashmoe.MoE(16, 8, 4, 2, shared_ffn_size=6, shared_gate=True, backend="native", dtype=torch.float64)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = layer(x)
    ref = reference.moe(x, layer.router_weight, layer.w1, layer.w2, top_k=2, shared_w1=layer.shared_w1,
                        shared_w2=layer.shared_w2, shared_gate=layer.shared_gate)
    assert rel_err(y, ref) < 1e-12
    y.square().sum().backward()
    assert all(layer.get_parameter(name).grad is not None for name in ("shared_w1", "shared_w2", "shared_gate"))


def test_opcheck():
    problem = shared_problem(28, tokens=9, gate=True)
    args = (problem["x"], problem["router_weight"], problem["w1"], problem["w2"], None, None, None, 2, True, "silu",
            True, "softmax", None, None, None, None, 1, 1, 1.0, "output", problem["shared_w1"], problem["shared_w2"],
            problem["shared_gate"])
    torch.library.opcheck(torch.ops.flashmoe.moe_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# --------------------------------------------------------------------------- expert parallelism

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
@pytest.mark.parametrize("world_size, chaos_seed, threads", [(2, None, 1), (2, 3, 2), (4, 5, 1)])
def test_simulated_ranks_bitwise_equal_the_single_process_op(dtype, gate, world_size, chaos_seed, threads):
    """W simulated ranks (the dataflow protocol, chaos: random delays and task order): each rank runs
    the replicated shared expert on its own tokens, and its y is the single-process op's, bit for bit."""
    from flashmoe.testing import simulate_expert_parallel
    counts = [70, 0, 33, 5][:world_size]
    problem = shared_problem(30, tokens=sum(counts), dtype=dtype, gate=gate, experts=4, hidden=40, ffn=24,
                             shared_ffn=300)
    xs = [x.contiguous() for x in problem.pop("x").split(counts)]
    ys = simulate_expert_parallel(xs, **problem, top_k=2, world_size=world_size, capacity_factor=0.75,
                                  chaos_seed=chaos_seed, threads_per_rank=threads)
    for rank, (x, y) in enumerate(zip(xs, ys)):
        expected = flashmoe.moe(x, **problem, top_k=2, capacity_factor=0.75, backend="native")
        assert same_bits(y, expected), f"rank {rank}"


def test_simulated_cluster_guards():
    from flashmoe.testing import SimulatedCluster
    problem = shared_problem(31, tokens=6, experts=4, gate=True)
    x = problem.pop("x")
    with pytest.raises(ValueError, match="with_shared_gate=True needs a shared expert"):
        SimulatedCluster(24, 16, 4, 2, world_size=2, max_tokens=8, with_shared_gate=True)
    cluster = SimulatedCluster(24, 16, 4, 2, world_size=2, max_tokens=8, shared_ffn_size=10)
    with pytest.raises(ValueError, match="shared_gate was given, but the cluster was built with with_shared_gate=False"):
        cluster.forward([x[:3], x[3:]], **problem)
    with pytest.raises(ValueError, match="shared_w1 is missing"):
        cluster.forward([x[:3], x[3:]], **{k: v for k, v in problem.items() if not k.startswith("shared")})
    cluster = SimulatedCluster(24, 16, 4, 2, world_size=2, max_tokens=8, shared_ffn_size=4, with_shared_gate=True)
    with pytest.raises(ValueError, match="shared_w1 must have 8 rows"):
        cluster.forward([x[:3], x[3:]], **problem)


def _distributed_scenario(rank, world_size):
    """flashmoe.distributed on real processes, both transports: y bitwise equal to the single-process
    op on the rank's tokens; gradients (the shared expert's: this rank's tokens' share) against it."""
    import flashmoe.distributed as fd
    from test_distributed import TRANSPORTS, local_weights
    for dtype, gate, capacity_factor, counts in ((torch.float32, True, None, (9, 70)),
                                                 (torch.bfloat16, False, 1.0, (0, 13)),
                                                 (torch.float64, True, 0.5, (21, 6))):
        problem = shared_problem(40, tokens=sum(counts), hidden=40, ffn=24, experts=4, shared_ffn=20, dtype=dtype,
                                 gate=gate)
        xs = [x.contiguous() for x in problem.pop("x").split(list(counts))]
        routed = {k: v for k, v in problem.items() if not k.startswith("shared")}
        shared = {k: v for k, v in problem.items() if k.startswith("shared")}
        x = xs[rank]
        expected, expected_routing = flashmoe.moe(x, **problem, top_k=2, capacity_factor=capacity_factor,
                                                  backend="native", return_routing=True)
        for transport in TRANSPORTS:
            y, routing = fd.moe(x, **local_weights(routed, rank, world_size), **shared, top_k=2, transport=transport,
                                capacity_factor=capacity_factor, return_routing=True)
            where = f"{dtype} transport={transport} rank={rank}"
            assert same_bits(y, expected), where
            assert same_bits(routing.topk_ids, expected_routing.topk_ids), where
        if dtype != torch.float64:
            continue
        # Gradients: single process over every rank's tokens (a local expert's gradient sums them all).
        grad_ys = [torch.randn(t.shape, generator=torch.Generator().manual_seed(r), dtype=dtype)
                   for r, t in enumerate(xs)]
        sums = {name: torch.zeros_like(t) for name, t in problem.items()}
        for r, x_r in enumerate(xs):
            leaves = {name: t.clone().requires_grad_() for name, t in problem.items()}
            x_leaf = x_r.clone().requires_grad_()
            (flashmoe.moe(x_leaf, **leaves, top_k=2, capacity_factor=capacity_factor, backend="native")
             * grad_ys[r]).sum().backward()
            for name, leaf in leaves.items():
                if name in ("router_weight",) or name.startswith("shared"):
                    if r == rank:
                        sums[name] = leaf.grad
                else:
                    sums[name] += leaf.grad
            if r == rank:
                expected_x = x_leaf.grad
        mine = {**local_weights({k: v for k, v in sums.items() if k in routed}, rank, world_size),
                **{k: v for k, v in sums.items() if k in shared}}
        for transport in TRANSPORTS:
            leaves = {name: t.clone().requires_grad_()
                      for name, t in {**local_weights(routed, rank, world_size), **shared}.items()}
            x_leaf = x.clone().requires_grad_()
            (fd.moe(x_leaf, **leaves, top_k=2, transport=transport, capacity_factor=capacity_factor)
             * grad_ys[rank]).sum().backward()
            torch.testing.assert_close(x_leaf.grad, expected_x, rtol=1e-10, atol=1e-12)
            for name, leaf in leaves.items():
                torch.testing.assert_close(leaf.grad, mine[name], rtol=1e-10, atol=1e-12,
                                           msg=f"grad {name} transport={transport} rank={rank}")
    # The module: ExpertParallelMoE.from_moe keeps the replicated shared expert.
    torch.manual_seed(5)
    layer = flashmoe.MoE(40, 24, 4, 2, shared_ffn_size=12, shared_gate=True)
    x = torch.randn(3 + rank, 2, 40)
    for transport in TRANSPORTS:
        sharded = fd.ExpertParallelMoE.from_moe(layer, transport=transport)
        assert sharded.shared_w1.shape == (24, 40) and sharded.shared_gate.shape == (1, 40)
        assert "shared_ffn_size=12" in repr(sharded)
        assert same_bits(sharded(x), layer(x))
    # Ranks must agree on the shared expert (a configuration no earlier call cached: both ranks create).
    problem = shared_problem(41, tokens=4, hidden=40, ffn=24, experts=4, shared_ffn=17, gate=rank == 0)
    x = problem.pop("x")
    mine = {**local_weights({k: v for k, v in problem.items() if not k.startswith("shared")}, rank, world_size),
            **{k: v for k, v in problem.items() if k.startswith("shared")}}
    with pytest.raises(ValueError, match="disagree on shared_gate"):
        fd.moe(x, **mine, top_k=2, transport="all_to_all")
    # Leave together: a rank that tears its process group down while its peer is still in a gloo
    # exchange aborts the peer at exit ("terminate called without an active exception").
    torch.distributed.barrier()


def test_distributed_world_of_two():
    from test_distributed import spawn
    spawn(2, _distributed_scenario)


# --------------------------------------------------------------------------- the CUDA kernel (GPU only)

CUDA_READY = bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and flashmoe built with its CUDA backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
@pytest.mark.parametrize("gate_less", [False, True], ids=["router", "given_routing"])
def test_cuda_matches_reference(dtype, gate, gate_less):
    """The kernel's shared-expert cell against the float64 reference (every element finite), and the
    same bits on a second run."""
    problem = shared_problem(50, tokens=300, hidden=136, ffn=40, experts=4, shared_ffn=200, dtype=dtype, gate=gate)
    cuda = {name: t.cuda() for name, t in problem.items()}
    options = dict(top_k=2, capacity_factor=0.8)
    if gate_less:
        _, routing = reference.moe(**problem, **options, return_routing=True)
        routing_options = dict(topk_ids=routing.topk_ids.cuda(), topk_weights=routing.topk_weights.cuda(),
                               capacity_factor=0.8)
        cuda.pop("router_weight")
        problem.pop("router_weight")
        y = flashmoe.moe(**cuda, **routing_options, backend="native")
        again = flashmoe.moe(**cuda, **routing_options, backend="native")
        ref = reference.moe(**double(problem), topk_ids=routing.topk_ids, topk_weights=routing.topk_weights.double(),
                            capacity_factor=0.8)
    else:
        y = flashmoe.moe(**cuda, **options, backend="native")
        again = flashmoe.moe(**cuda, **options, backend="native")
        ref = reference.moe(**double(problem), **options)
    assert torch.isfinite(y).all()
    assert same_bits(y, again)
    assert rel_err(y.cpu(), ref) < TOLERANCE[dtype]
