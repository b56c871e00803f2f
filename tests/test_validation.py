"""Issue 16's reproducers: every entry point (flashmoe.moe, MoE, MoE.from_hf,
simulate_expert_parallel, SimulatedCluster, torch.ops.flashmoe.moe_forward / moe_backward)
validates through the one shared validator (flashmoe.reference.validate and its option table)
and answers bad input with a ValueError or TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashmoe
from flashmoe import reference
from flashmoe.testing import SimulatedCluster, simulate_expert_parallel

BAD = (ValueError, TypeError)
T, H, I, E, K = 5, 8, 6, 4, 2


def _problem(seed=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(T, H, generator=g, dtype=dtype), router_weight=torch.randn(E, H, generator=g, dtype=dtype),
                w1=torch.randn(E, 2 * I, H, generator=g, dtype=dtype) / 3, w2=torch.randn(E, H, I, generator=g, dtype=dtype) / 3)


# ---- flashmoe.moe and MoE ----

@pytest.mark.parametrize("backend", ["native", "reference", "auto"])
def test_huge_int_capacity_factor_is_named_not_an_overflow_error(backend):
    with pytest.raises(ValueError, match="capacity_factor"):
        flashmoe.moe(**_problem(), top_k=K, capacity_factor=10**400, backend=backend)
    with pytest.raises(ValueError, match="capacity_factor"):
        flashmoe.MoE(H, I, E, K, capacity_factor=10**400)


@pytest.mark.parametrize("argument", ["backend", "activation", "scoring"])
def test_an_array_for_a_string_option_is_a_named_type_error(argument):
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=argument):
        flashmoe.moe(**_problem(), top_k=K, **{argument: np.array(["native", "silu"])})
    with pytest.raises(TypeError, match=argument):
        flashmoe.MoE(H, I, E, K, **{argument: np.array(["a", "b"])})


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float32"])
def test_module_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        flashmoe.MoE(H, I, E, K, dtype=dtype)


@pytest.mark.parametrize("changes,argument", [
    (dict(load_balancing_coef="a"), "load_balancing_coef"), (dict(load_balancing_coef=float("nan")), "load_balancing_coef"),
    (dict(z_loss_coef=[1.0]), "z_loss_coef"), (dict(router_bias="yes"), "router_bias"),
    (dict(expert_bias=1), "expert_bias"), (dict(gated=1), "gated"), (dict(normalize=None), "normalize"),
])
def test_module_options_are_checked(changes, argument):
    with pytest.raises(BAD, match=argument):
        flashmoe.MoE(H, I, E, K, **changes)


def test_meta_tensors_with_auto_infer_shapes_and_the_reference_says_why_not():
    meta = {name: t.to("meta") for name, t in _problem().items()}
    y, routing = flashmoe.moe(**meta, top_k=K, return_routing=True)
    assert y.device.type == "meta" and y.shape == (T, H) and routing.topk_ids.shape == (T, K)
    with pytest.raises(ValueError, match="meta"):
        flashmoe.moe(**meta, top_k=K, backend="reference")


def test_return_routing_must_be_a_bool():
    with pytest.raises(TypeError, match="return_routing"):
        flashmoe.moe(**_problem(), top_k=K, return_routing="yes")


# ---- MoE.from_hf ----

class _Gate(nn.Module):
    def __init__(self, weight, top_k):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
        self.top_k = top_k


class _Experts(nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=gate_up.is_floating_point())
        self.down_proj = nn.Parameter(down, requires_grad=down.is_floating_point())
        self.act_fn = nn.SiLU()


class _Block(nn.Module):
    """The attributes MoE.from_hf reads from an HF v5 sparse-MoE block."""

    def __init__(self, gate_weight, gate_up, down, top_k=K):
        super().__init__()
        self.gate = _Gate(gate_weight, top_k)
        self.experts = _Experts(gate_up, down)


def _block(**changes):
    p = _problem()
    parts = dict(gate_weight=p["router_weight"], gate_up=p["w1"], down=p["w2"], top_k=K)
    parts.update(changes)
    return _Block(**parts)


def test_from_hf_of_a_valid_block_matches_the_reference():
    block = _block()
    layer = flashmoe.MoE.from_hf(block)
    x = _problem(17)["x"]
    with torch.no_grad():
        y = layer(x)
    ref = reference.moe(x.double(), block.gate.weight.double(), block.experts.gate_up_proj.double(),
                        block.experts.down_proj.double(), top_k=K)
    assert (y.double() - ref).norm() <= 1e-5 * ref.norm()


@pytest.mark.parametrize("changes,error,argument", [
    (dict(top_k=1.7), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_k=E + 1), ValueError, "top_k"),
    (dict(gate_up=torch.randn(2 * I, H)), ValueError, "gate_up_proj"),
    (dict(gate_up=torch.randn(E, 2 * I + 1, H)), ValueError, "gate_up_proj"),
    (dict(down=torch.randn(E, H, I + 1)), ValueError, "down_proj"),
    (dict(down=torch.randn(H, I)), ValueError, "down_proj"),
    (dict(gate_weight=torch.randn(E + 1, H)), ValueError, "gate.weight"),
    (dict(gate_weight=torch.randint(0, 3, (E, H), dtype=torch.int32)), TypeError, "gate.weight"),
    (dict(gate_weight=torch.randn(E, H, dtype=torch.float64)), TypeError, "gate.weight"),
])
def test_from_hf_rejects_malformed_blocks_by_name(changes, error, argument):
    with pytest.raises(error, match=argument):
        flashmoe.MoE.from_hf(_block(**changes))


# ---- simulate_expert_parallel and SimulatedCluster ----

def _ranks(counts=(3, 4)):
    p = _problem()
    x = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(5))
    return list(x.split(list(counts))), p


@pytest.mark.parametrize("top_k", [1.5, True, "2", None])
def test_simulate_top_k_is_checked_by_name(top_k):
    xs, p = _ranks()
    with pytest.raises(TypeError, match="top_k"):
        simulate_expert_parallel(xs, p["router_weight"], p["w1"], p["w2"], top_k=top_k, world_size=2)


def test_simulate_int_tensors_name_the_tensor_not_a_dtype_parameter():
    xs, p = _ranks()
    with pytest.raises(TypeError, match=r"xs\[0\]"):
        simulate_expert_parallel([x.to(torch.int32) for x in xs], p["router_weight"].to(torch.int32),
                                 p["w1"].to(torch.int32), p["w2"].to(torch.int32), top_k=K, world_size=2)


def test_simulate_one_rank_with_another_hidden_size_is_the_one_named():
    xs, p = _ranks()
    xs[1] = torch.randn(4, H + 1)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        simulate_expert_parallel(xs, p["router_weight"], p["w1"], p["w2"], top_k=K, world_size=2)


def test_simulate_checks_world_size_against_xs():
    xs, p = _ranks()
    with pytest.raises(ValueError, match="world_size"):
        simulate_expert_parallel(xs, p["router_weight"], p["w1"], p["w2"], top_k=K, world_size=4)


@pytest.mark.parametrize("changes,argument", [
    (dict(top_k=1.5), "top_k"), (dict(gated="yes"), "gated"), (dict(with_b1=1), "with_b1"),
    (dict(watchdog_seconds="a"), "watchdog_seconds"), (dict(watchdog_seconds=float("inf")), "watchdog_seconds"),
    (dict(chaos_seed=2**64), "chaos_seed"), (dict(chaos_seed=1.5), "chaos_seed"), (dict(hidden_size=2**70), "hidden"),
    (dict(max_tokens=2**70), "max_tokens"),
])
def test_cluster_construction_is_checked_by_name(changes, argument):
    args = dict(hidden_size=H, ffn_size=I, num_experts=E, top_k=K, world_size=2, max_tokens=8)
    args.update(changes)
    sizes = [args.pop(name) for name in ("hidden_size", "ffn_size", "num_experts", "top_k")]
    with pytest.raises(BAD, match=argument):
        SimulatedCluster(*sizes, **args)


# ---- the raw ops ----

def _forward_and_grads():
    p = _problem()
    options = [K, True, "silu", True, "softmax", None]
    outputs = torch.ops.flashmoe.moe_forward(p["x"], p["router_weight"], p["w1"], p["w2"], None, None, None, *options)
    grad_y = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    args = dict(grad_y=grad_y, grad_topk_weights=None, grad_router_logits=None, x=p["x"],
                router_weight=p["router_weight"], w1=p["w1"], w2=p["w2"], router_bias=None, b1=None, b2=None,
                topk_ids=outputs[1], top_k=K, gated=True, activation="silu", normalize=True, scoring="softmax",
                capacity_factor=None, needs_grad=[True] * 4 + [False] * 3)
    return args


def _backward(args):
    return torch.ops.flashmoe.moe_backward(*args.values())


def test_raw_backward_of_valid_arguments_runs():
    grads = _backward(_forward_and_grads())
    assert grads[0].shape == (T, H) and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("change,error,argument", [
    (lambda a: a.update(topk_ids=a["topk_ids"] + E), ValueError, "topk_ids"),
    (lambda a: a.update(topk_ids=a["topk_ids"] - E), ValueError, "topk_ids"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:, :1]), ValueError, "topk_ids"),
    (lambda a: a.update(topk_ids=a["topk_ids"].float()), TypeError, "topk_ids"),
    (lambda a: a.update(grad_y=torch.randn(T + 1, H)), ValueError, "grad_y"),
    (lambda a: a.update(grad_y=torch.randn(T, H).to(torch.int64)), TypeError, "grad_y"),
    (lambda a: a.update(grad_topk_weights=torch.randn(T, K + 1)), ValueError, "grad_topk_weights"),
    (lambda a: a.update(grad_router_logits=torch.randn(T, E - 1)), ValueError, "grad_router_logits"),
    (lambda a: a.update(scoring="bogus"), ValueError, "scoring"),
    (lambda a: a.update(activation="bogus"), ValueError, "activation"),
    (lambda a: a.update(top_k=E + 1), ValueError, "top_k"),
    (lambda a: a.update(needs_grad=[True] * 6), ValueError, "needs_grad"),
    (lambda a: a.update(needs_grad=[True] * 8), ValueError, "needs_grad"),
    (lambda a: a.update(w2=torch.randn(E, H, I + 1)), ValueError, "w2"),
])
def test_raw_backward_checks_its_arguments(change, error, argument):
    args = _forward_and_grads()
    change(args)
    with pytest.raises(error, match=argument):
        _backward(args)


def test_raw_forward_checks_options_through_the_shared_validator():
    p = _problem()
    with pytest.raises(ValueError, match="scoring"):
        torch.ops.flashmoe.moe_forward(p["x"], p["router_weight"], p["w1"], p["w2"], None, None, None, K, True,
                                       "silu", True, "bogus", None)
    with pytest.raises(ValueError, match="capacity_factor"):
        torch.ops.flashmoe.moe_forward(p["x"], p["router_weight"], p["w1"], p["w2"], None, None, None, K, True,
                                       "silu", True, "softmax", float("nan"))


def test_one_option_table_serves_every_entry_point():
    """A new option is one row of reference.OPTION_CHECKS; validate_options refuses unknown ones."""
    assert list(reference.OPTION_CHECKS)[:6] == ["top_k", "gated", "activation", "scoring", "normalize",
                                                 "capacity_factor"]
    with pytest.raises(TypeError, match="unknown option"):
        reference.validate_options(E, bogus=1)
