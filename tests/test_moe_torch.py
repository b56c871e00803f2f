"""flashmoe as a torch citizen: opcheck, torch.compile, autograd (gradcheck and parity with
autograd through the reference), the nn.Module, and from_hf against HF transformers blocks."""

import pytest
import torch
from torch import nn

import flashmoe
from conftest import TOLERANCE, make_problem, rel_err, same_bits
from flashmoe import reference

INPUT_NAMES = ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2")


def op_args(problem, *, top_k, gated=True, activation="silu", normalize=True, scoring="softmax",
            capacity_factor=None):
    """Positional arguments of torch.ops.flashmoe.moe_forward."""
    return tuple(problem.get(name) for name in INPUT_NAMES) + (
        top_k, gated, activation, normalize, scoring, capacity_factor)


# --------------------------------------------------------------------------- opcheck

OPCHECK_CASES = [
    (torch.float32, False, None, True),
    (torch.float32, True, 0.5, True),
    (torch.float64, True, None, False),
    (torch.float64, False, 0.75, True),
]


@pytest.mark.parametrize("dtype,biases,capacity_factor,gated", OPCHECK_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_opcheck(dtype, biases, capacity_factor, gated):
    problem = make_problem(0, tokens=9, hidden=12, ffn=7, experts=4, dtype=dtype, gated=gated, router_bias=biases,
                           expert_bias=biases, top_k=2, tie_rtol=1e-3)
    for tensor in problem.values():
        tensor.requires_grad_()
    torch.library.opcheck(torch.ops.flashmoe.moe_forward,
                          op_args(problem, top_k=2, gated=gated, capacity_factor=capacity_factor))


def test_opcheck_no_grad():
    problem = make_problem(1, tokens=5, hidden=12, ffn=7, experts=4, router_bias=True, expert_bias=True)
    torch.library.opcheck(torch.ops.flashmoe.moe_forward, op_args(problem, top_k=3, scoring="sigmoid"))


# --------------------------------------------------------------------------- torch.compile

def _moe_native(x, router_weight, w1, w2, router_bias, b1, b2):
    y, routing = flashmoe.moe(x, router_weight, w1, w2, top_k=2, router_bias=router_bias, b1=b1, b2=b2,
                              capacity_factor=1.0, return_routing=True, backend="native")
    return y * 2.0, routing.topk_ids, routing.topk_weights, routing.router_logits, routing.dropped


def _inputs(problem):
    return [problem.get(name) for name in INPUT_NAMES]


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    problem = make_problem(2, tokens=37, hidden=67, ffn=45, experts=8, router_bias=True, expert_bias=True)
    compiled = torch.compile(_moe_native, fullgraph=True)
    eager = _moe_native(*_inputs(problem))
    got = compiled(*_inputs(problem))
    for a, b in zip(eager, got):
        assert same_bits(a, b)


def test_compile_dynamic_two_token_counts():
    torch._dynamo.reset()
    compiled = torch.compile(_moe_native, fullgraph=True, dynamic=True)
    for index, (seed, tokens) in enumerate(((3, 37), (4, 91), (6, 5))):
        problem = make_problem(seed, tokens=tokens, hidden=67, ffn=45, experts=8, router_bias=True, expert_bias=True)
        eager = _moe_native(*_inputs(problem))
        # One graph serves every token count: a recompile after the first call is a failure.
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            got = compiled(*_inputs(problem))
        assert got[0].shape == (tokens, 67)
        for a, b in zip(eager, got):
            assert same_bits(a, b)


def test_compile_backward_matches_eager():
    torch._dynamo.reset()
    problem = make_problem(5, tokens=20, hidden=16, ffn=12, experts=4, dtype=torch.float64, top_k=2, tie_rtol=1e-3)

    def loss_fn(x, router_weight, w1, w2):
        y, routing = flashmoe.moe(x, router_weight, w1, w2, top_k=2, return_routing=True, backend="native")
        return y.square().sum() + routing.topk_weights.sum()

    leaves = [problem[name].clone().requires_grad_() for name in INPUT_NAMES[:4]]
    eager_grads = torch.autograd.grad(loss_fn(*leaves), leaves)
    compiled_grads = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(*leaves), leaves)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- gradcheck (float64)

GRADCHECK_CASES = [
    dict(gated=True),
    dict(gated=False, activation="gelu", biases=True),
    dict(gated=True, activation="gelu_tanh", biases=True, scoring="sigmoid"),
    dict(gated=True, normalize=False),
    dict(gated=False, activation="silu", normalize=False, scoring="sigmoid", biases=True),
    dict(gated=True, capacity_factor=0.5, biases=True),
    dict(gated=False, activation="relu", capacity_factor=0.5),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck(case):
    case = dict(case)
    biases = case.pop("biases", False)
    gated = case.get("gated", True)
    tokens, experts, top_k = 5, 4, 2
    problem = make_problem(6, tokens=tokens, hidden=6, ffn=4, experts=experts, gated=gated, dtype=torch.float64,
                           router_bias=biases, expert_bias=biases, top_k=top_k,
                           scoring=case.get("scoring", "softmax"), tie_rtol=1e-3)
    names = [name for name in INPUT_NAMES if name in problem]
    if case.get("capacity_factor") is not None:
        routing = flashmoe.moe(**problem, top_k=top_k, return_routing=True, backend="native", **case)[1]
        assert int(routing.dropped) > 0, "the capacity case must drop picks"

    def fn(*tensors):
        inputs = dict(zip(names, tensors))
        y, routing = flashmoe.moe(**inputs, top_k=top_k, return_routing=True, backend="native", **case)
        return y, routing.topk_weights, routing.router_logits

    leaves = tuple(problem[name].clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- gradients vs the reference

def _losses(y, routing, projection, weight_projection, experts):
    return ((y * projection).sum() + (routing.topk_weights * weight_projection).sum()
            + flashmoe.load_balancing_loss(routing.router_logits, routing.topk_ids, experts)
            + 0.1 * flashmoe.router_z_loss(routing.router_logits))


@pytest.mark.parametrize("options", [
    dict(gated=True),
    dict(gated=False, activation="gelu", scoring="sigmoid", normalize=False),
    dict(gated=True, activation="relu", capacity_factor=0.6),
], ids=("gated", "plain-sigmoid", "gated-capacity"))
def test_gradients_match_reference(options):
    tokens, experts, top_k = 96, 8, 2
    gated = options["gated"]
    problem = make_problem(7, tokens=tokens, hidden=40, ffn=24, experts=experts, gated=gated, dtype=torch.float64,
                           router_bias=True, expert_bias=True, top_k=top_k,
                           scoring=options.get("scoring", "softmax"), tie_rtol=1e-6)
    g = torch.Generator().manual_seed(8)
    projection = torch.randn(tokens, 40, generator=g, dtype=torch.float64)
    weight_projection = torch.randn(tokens, top_k, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("native", "reference"):
        leaves = {name: tensor.clone().requires_grad_() for name, tensor in problem.items()}
        y, routing = flashmoe.moe(**leaves, top_k=top_k, return_routing=True, backend=backend, **options)
        loss = _losses(y, routing, projection, weight_projection, experts)
        grads[backend] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for name in problem:
        err = rel_err(grads["native"][name], grads["reference"][name])
        assert err <= 1e-10, f"grad of {name}: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_low_precision_gradients(dtype):
    """Gradients come back in each parameter's dtype and agree with float64 autograd."""
    problem = make_problem(9, tokens=64, hidden=40, ffn=24, experts=8, dtype=dtype, router_bias=True,
                           expert_bias=True, top_k=2)
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in problem.items()}
    y = flashmoe.moe(**leaves, top_k=2, backend="native")
    grads = torch.autograd.grad(y.float().square().sum(), list(leaves.values()))
    ref_leaves = {name: tensor.double().requires_grad_() for name, tensor in problem.items()}
    ref_y = reference.moe(**ref_leaves, top_k=2)
    ref_grads = torch.autograd.grad(ref_y.square().sum(), list(ref_leaves.values()))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == problem[name].shape
        assert rel_err(grad, ref_grad) <= tolerance, name


# --------------------------------------------------------------------------- nn.Module

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("float32", "float64"))
def test_module_forward_backward(dtype):
    torch.manual_seed(10)
    layer = flashmoe.MoE(67, 45, 8, 2, router_bias=True, expert_bias=True, capacity_factor=1.25,
                         z_loss_coef=1e-3, backend="native", dtype=dtype)
    twin = flashmoe.MoE(67, 45, 8, 2, router_bias=True, expert_bias=True, capacity_factor=1.25,
                        z_loss_coef=1e-3, backend="reference", dtype=torch.float64)
    twin.load_state_dict({name: value.double() for name, value in layer.state_dict().items()})
    x = torch.randn(4, 25, 67, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    y, aux, routing = layer(x.to(dtype), return_aux_loss=True, return_routing=True)
    ref_y, ref_aux, ref_routing = twin(x, return_aux_loss=True, return_routing=True)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref_y) <= TOLERANCE[dtype]
    assert torch.equal(routing.topk_ids, ref_routing.topk_ids)
    torch.testing.assert_close(aux.double(), ref_aux, rtol=1e-5, atol=1e-7)
    (y.square().sum() + aux).backward()
    (ref_y.square().sum() + ref_aux).backward()
    for (name, parameter), ref_parameter in zip(layer.named_parameters(), twin.parameters()):
        assert parameter.grad is not None and parameter.grad.dtype == dtype, name
        assert rel_err(parameter.grad, ref_parameter.grad) <= (1e-4 if dtype == torch.float32 else 1e-10), name


# --------------------------------------------------------------------------- from_hf

def _hf_blocks():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hidden, ffn, experts, top_k = 48, 40, 8, 2
    return {
        "mixtral": lambda: MixtralSparseMoeBlock(transformers.MixtralConfig(
            hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=top_k)),
        "qwen3-norm": lambda: Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
            hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=True)),
        "qwen3-nonorm": lambda: Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
            hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=False)),
        "olmoe": lambda: OlmoeSparseMoeBlock(transformers.OlmoeConfig(
            hidden_size=hidden, intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k)),
        "olmoe-norm": lambda: OlmoeSparseMoeBlock(transformers.OlmoeConfig(
            hidden_size=hidden, intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=True)),
    }


def _random_block(kind, dtype, seed):
    block = _hf_blocks()[kind]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            std = 0.3 if name == "gate.weight" else 0.15
            parameter.copy_(torch.randn(parameter.shape, generator=g) * std)
    return block.to(dtype)


HF_KINDS = ("mixtral", "qwen3-norm", "qwen3-nonorm", "olmoe", "olmoe-norm")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
@pytest.mark.parametrize("kind", HF_KINDS)
def test_from_hf_matches_block(kind, dtype):
    block = _random_block(kind, dtype, seed=12)
    layer = flashmoe.MoE.from_hf(block, backend="native")
    x = torch.randn(3, 21, 48, generator=torch.Generator().manual_seed(13)).to(dtype)
    with torch.no_grad():
        expected = block(x)
        y, routing = layer(x, return_routing=True)
        hf_ids = block.gate(x)[2]
    assert y.shape == expected.shape and y.dtype == dtype
    # HF rounds bf16 router logits to bf16 before the top-k, so near ties may pick differently there.
    agree = (routing.topk_ids.long().sort(dim=-1).values == hf_ids.sort(dim=-1).values).all(dim=-1)
    if dtype == torch.float32:
        assert agree.all()
    assert agree.float().mean() >= 0.9
    rows = agree.reshape(3, 21)
    err = rel_err(y[rows], expected[rows])
    assert err <= (2e-5 if dtype == torch.float32 else 3e-2), f"rel err {err:.3g}"


@pytest.mark.parametrize("kind", ("mixtral", "qwen3-nonorm"))
def test_from_hf_shares_parameters_and_gradients(kind):
    block = _random_block(kind, torch.float32, seed=14)
    layer = flashmoe.MoE.from_hf(block)
    assert layer.router_weight is block.gate.weight
    assert layer.w1.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert layer.w2.data_ptr() == block.experts.down_proj.data_ptr()
    assert layer.router_weight.data_ptr() == block.gate.weight.data_ptr()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(15))
    grads = {}
    for name, module in (("hf", block), ("flashmoe", layer)):
        block.zero_grad(set_to_none=True)
        module(x).square().sum().backward()
        grads[name] = [block.gate.weight.grad.clone(), block.experts.gate_up_proj.grad.clone(),
                       block.experts.down_proj.grad.clone()]
    for hf_grad, grad in zip(grads["hf"], grads["flashmoe"]):
        assert rel_err(grad, hf_grad) <= 1e-4

    copy = flashmoe.MoE.from_hf(block, share_parameters=False)
    assert copy.w1.data_ptr() != block.experts.gate_up_proj.data_ptr()
    assert torch.equal(copy.w1, block.experts.gate_up_proj)


@pytest.mark.parametrize("module", [nn.Linear(4, 4), nn.Sequential(), nn.Module()], ids=("linear", "seq", "bare"))
def test_from_hf_rejects_unrelated_module(module):
    with pytest.raises(TypeError, match="block"):
        flashmoe.MoE.from_hf(module)
