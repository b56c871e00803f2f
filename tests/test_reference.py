"""Tests of flashmoe.reference, the executable specification of the operator contract.

Parity with HF transformers' MoE blocks, routing and capacity rules against brute-force
Python loops, a float64 per-token loop for every expert variant, and argument validation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from flashmoe import reference


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def make_problem(seed, *, tokens=12, hidden=8, intermediate=6, experts=5, gated=True,
                 biases=False, dtype=torch.float64, scale=0.3):
    """Random inputs of :func:`reference.moe` (never zeros), as a dict of tensors."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    rows = 2 * intermediate if gated else intermediate
    problem = dict(
        x=randn(tokens, hidden, std=1.0),
        router_weight=randn(experts, hidden, std=0.7),
        w1=randn(experts, rows, hidden),
        w2=randn(experts, hidden, intermediate),
    )
    if biases:
        problem.update(router_bias=randn(experts), b1=randn(experts, rows), b2=randn(experts, hidden))
    return problem


# --------------------------------------------------------------------------- brute force

def _act(v, activation):
    if activation == "silu":
        return v / (1 + torch.exp(-v))
    if activation == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    if activation == "relu":
        return torch.clamp(v, min=0)
    if activation == "relu2":
        return torch.clamp(v, min=0) ** 2
    raise AssertionError(activation)


def brute_routing(scores_row, top_k):
    """Picks of one token: descending score, ties to the lower expert."""
    order = sorted(range(len(scores_row)), key=lambda e: (-scores_row[e], e))
    return order[:top_k]


def brute_admit(topk_ids, capacity):
    seen = {}
    admitted = []
    for row in topk_ids.tolist():
        admitted_row = []
        for expert in row:
            seen[expert] = seen.get(expert, 0) + 1
            admitted_row.append(capacity is None or seen[expert] <= capacity)
        admitted.append(admitted_row)
    return torch.tensor(admitted, dtype=torch.bool).reshape(topk_ids.shape)


def brute_moe(x, router_weight, w1, w2, *, top_k, gated=True, activation="silu", normalize=True,
              scoring="softmax", capacity_factor=None, router_bias=None, b1=None, b2=None):
    """float64 per-token, per-pick loop written from DESIGN.md, independent of reference.py."""
    tokens, _ = x.shape
    experts = router_weight.shape[0]
    intermediate = w2.shape[2]
    ids, weights = [], []
    for t in range(tokens):
        logits = router_weight @ x[t] + (0 if router_bias is None else router_bias)
        if scoring == "softmax":
            exps = torch.exp(logits - logits.max())
            scores = exps / exps.sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        picks = brute_routing(scores.tolist(), top_k)
        picked = torch.stack([scores[e] for e in picks])
        ids.append(picks)
        weights.append(picked / picked.sum() if normalize else picked)
    ids = torch.tensor(ids)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * tokens * top_k / experts)
    admitted = brute_admit(ids, capacity)
    rows = []
    for t in range(tokens):
        acc = torch.zeros_like(x[t])
        for j in range(top_k):
            if not admitted[t, j]:
                continue
            e = ids[t, j].item()
            h = w1[e] @ x[t] + (0 if b1 is None else b1[e])
            if gated:
                h = _act(h[:intermediate], activation) * h[intermediate:]
            else:
                h = _act(h, activation)
            out = w2[e] @ h + (0 if b2 is None else b2[e])
            acc = acc + weights[t][j] * out
        rows.append(acc)
    return torch.stack(rows), ids, admitted


# --------------------------------------------------------------------------- HF parity

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

HIDDEN, FFN, EXPERTS = 32, 16, 8


def hf_block(name):
    """(block, top_k, normalize) for a tiny HF config, parameters randomized."""
    common = dict(hidden_size=HIDDEN, hidden_act="silu", experts_implementation="eager")
    if name == "mixtral":
        config = MixtralConfig(intermediate_size=FFN, num_local_experts=EXPERTS, num_experts_per_tok=2, **common)
        block, top_k, normalize = MixtralSparseMoeBlock(config), 2, True
    elif name.startswith("qwen3"):
        normalize = name.endswith("norm")
        config = Qwen3MoeConfig(moe_intermediate_size=FFN, num_experts=EXPERTS, num_experts_per_tok=4,
                                norm_topk_prob=normalize, **common)
        block, top_k = Qwen3MoeSparseMoeBlock(config), 4
    else:
        config = OlmoeConfig(intermediate_size=FFN, num_experts=EXPERTS, num_experts_per_tok=2, **common)
        block, top_k, normalize = OlmoeSparseMoeBlock(config), 2, config.norm_topk_prob
    g = torch.Generator().manual_seed(HF_BLOCKS.index(name))
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * 0.5)
        block.experts.gate_up_proj.copy_(torch.randn(block.experts.gate_up_proj.shape, generator=g) * 0.2)
        block.experts.down_proj.copy_(torch.randn(block.experts.down_proj.shape, generator=g) * 0.2)
    return block.eval(), top_k, normalize


HF_BLOCKS = ["mixtral", "qwen3_norm", "qwen3_nonorm", "olmoe"]


def assert_hf_parity(name, dtype, tol, seed):
    block, top_k, normalize = hf_block(name)
    block = block.to(dtype)
    v = torch.linspace(-4, 4, 101, dtype=dtype)
    assert torch.equal(block.experts.act_fn(v), F.silu(v)), "these configs use silu experts"
    x = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        expected = block(x).reshape(-1, HIDDEN)
        _, _, hf_ids = block.gate(x)
        y, routing = reference.moe(x, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj,
                                   top_k=top_k, normalize=normalize, return_routing=True)
    assert y.dtype == dtype and y.shape == x.shape
    y = y.reshape(-1, HIDDEN)
    if dtype == torch.float32:  # random fp32 scores are not tied; order is descending in both
        assert torch.equal(routing.topk_ids.long(), hf_ids.long())
        assert rel_err(y, expected) <= tol
        return
    # HF rounds bf16 logits to bf16 before the softmax; the contract keeps them in fp32.
    # A pick may flip only where the k-th and (k+1)-th fp32 logits lie within one bf16 ulp.
    same = (routing.topk_ids.long().sort(-1).values == hf_ids.long().sort(-1).values).all(-1)
    top = routing.router_logits.sort(-1, descending=True).values[:, top_k - 1:top_k + 1]
    near_tie = (top[:, 0] - top[:, 1]) <= 2.0**-7 * top.abs().max(-1).values
    assert (same | near_tie).all()
    assert same.sum() >= 0.9 * same.numel()
    assert rel_err(y[same], expected[same]) <= tol


@pytest.mark.parametrize("name", HF_BLOCKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_hf_parity(name, dtype, tol):
    assert_hf_parity(name, dtype, tol, seed=7)


def test_load_balancing_loss_matches_hf():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, EXPERTS, generator=g) * 2
    top_k = 3
    ids, _ = reference.route(logits, top_k)
    expected = load_balancing_loss_func((logits,), EXPERTS, top_k)
    got = reference.load_balancing_loss(logits, ids, EXPERTS)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got.item() > 1.0  # random logits are not perfectly balanced


def test_router_z_loss():
    logits = torch.randn(19, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 19
    assert abs(reference.router_z_loss(logits).item() - expected) <= 1e-12 * expected


# --------------------------------------------------------------------------- routing

def test_ties_go_to_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0] * 5, [0.0, 0.0, 5.0, 5.0, 0.0]])
    ids, weights = reference.route(logits, 3, normalize=False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [2, 3, 0]]
    assert ids.dtype == torch.int32
    torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids.long()), rtol=0, atol=0)


@pytest.mark.parametrize("experts,top_k", [(9, 4), (64, 8)])  # an unstable CPU sort reorders ties at E=64
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_random_ties_match_brute_force(scoring, experts, top_k):
    # Small-integer logits tie all the time.
    logits = torch.randint(0, 3, (64, experts), generator=torch.Generator().manual_seed(5)).float()
    ids, _ = reference.route(logits, top_k, scoring=scoring)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    assert ids.tolist() == [brute_routing(row, top_k) for row in scores.tolist()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_logits_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(21)
    x, weight, bias = (torch.randn(*shape, generator=g).to(dtype) for shape in [(40, 256), (16, 256), (16,)])
    logits = reference.router_logits(x, weight, bias)
    exact = F.linear(x.double(), weight.double(), bias.double())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)  # a bf16/fp16 output would miss
    assert reference.router_logits(x.double(), weight, bias).dtype == torch.float64


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_weights(scoring, normalize):
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(6)) * 2
    ids, weights = reference.route(logits, 3, scoring=scoring, normalize=normalize)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    picked = scores.gather(1, ids.long())
    assert (picked[:, :-1] >= picked[:, 1:]).all()
    assert ids.tolist() == [brute_routing(row, 3) for row in scores.tolist()]
    expected = picked / picked.sum(-1, keepdim=True) if normalize else picked
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert weights.dtype == torch.float32


def test_k_equals_e():
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ids, weights = reference.route(logits, 6)
    assert (ids.sort(-1).values == torch.arange(6, dtype=torch.int32)).all()
    torch.testing.assert_close(weights, torch.softmax(logits, -1).sort(-1, descending=True).values)
    p = make_problem(9, experts=4)
    y, _, _ = brute_moe(**p, top_k=4)
    assert rel_err(reference.moe(**p, top_k=4), y) <= 1e-12


@pytest.mark.parametrize("top_k", [0, 6, -1])
def test_route_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        reference.route(torch.randn(3, 5), top_k)


# --------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("seed", range(6))
def test_admit_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    experts, top_k, tokens = 6, 2, 40
    skew = torch.linspace(0, 3, experts)  # skewed routing forces drops
    ids, _ = reference.route(torch.randn(tokens, experts, generator=g) + skew, top_k)
    capacity_factor = [0.25, 0.5, 1.0, 1.25, 2.0, 0.1][seed]
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    admitted = reference.admit(ids, experts, capacity)
    assert torch.equal(admitted, brute_admit(ids, capacity))
    counts = torch.bincount(ids.reshape(-1).long(), minlength=experts)
    assert (~admitted).sum().item() == sum(max(0, c - capacity) for c in counts.tolist())
    if capacity_factor < 1:
        assert (~admitted).any()


@pytest.mark.parametrize("capacity_factor", [0.3, 1.0, 1.7])
def test_capacity_moe_matches_brute_force(capacity_factor):
    p = make_problem(10, tokens=30, experts=4, biases=True)
    p["router_bias"] = torch.tensor([1.5, 0.5, 0.0, -0.5], dtype=torch.float64)  # skew: drops
    y, routing = reference.moe(**p, top_k=2, capacity_factor=capacity_factor, return_routing=True)
    expected, ids, admitted = brute_moe(**p, top_k=2, capacity_factor=capacity_factor)
    assert torch.equal(routing.topk_ids.long(), ids)
    assert rel_err(y, expected) <= 1e-12
    capacity = math.ceil(capacity_factor * 30 * 2 / 4)
    counts = torch.bincount(ids.reshape(-1), minlength=4)
    assert torch.equal(routing.expert_counts, counts.to(torch.int32))
    assert routing.dropped.dtype == torch.int64 and routing.dropped.dim() == 0
    assert routing.dropped.item() == (~admitted).sum().item() == sum(max(0, c - capacity) for c in counts.tolist())


def test_all_tokens_to_one_expert():
    p = make_problem(11, tokens=20, experts=4, biases=True)
    p["router_bias"] = torch.tensor([0.0, 0.0, 100.0, 0.0], dtype=torch.float64)
    y, routing = reference.moe(**p, top_k=1, capacity_factor=1.0, return_routing=True)
    capacity = 5  # ceil(1.0 * 20 * 1 / 4)
    assert routing.topk_ids.reshape(-1).tolist() == [2] * 20
    assert routing.expert_counts.tolist() == [0, 0, 20, 0]
    assert routing.dropped.item() == 20 - capacity
    assert (y[capacity:] == 0).all()
    kept = reference.expert_ffn(p["x"][:capacity], p["w1"][2], p["w2"][2], gated=True, activation="silu",
                                b1=p["b1"][2], b2=p["b2"][2])
    assert rel_err(y[:capacity], kept) <= 1e-12  # normalized top-1 weight is 1


def test_expert_with_zero_tokens():
    p = make_problem(12, tokens=25, experts=5)
    p["router_bias"] = torch.tensor([0.0, 0.0, 0.0, -1e4, 0.0], dtype=torch.float64)
    y, routing = reference.moe(**p, top_k=2, capacity_factor=1.5, return_routing=True)
    assert routing.expert_counts[3].item() == 0 and routing.expert_counts.sum().item() == 50
    expected, _, _ = brute_moe(**p, top_k=2, capacity_factor=1.5)
    assert rel_err(y, expected) <= 1e-12


def test_expert_capacity_expression():
    assert reference.expert_capacity(None, 100, 2, 8) is None
    assert reference.expert_capacity(1.0, 100, 2, 8) == 25
    assert reference.expert_capacity(1.25, 100, 2, 8) == 32  # 31.25 rounds up
    # Left to right in doubles: 1.1 * 45 * 2 / 3 = 33.00000000000001, so the ceil is 34;
    # grouping 1.1 * (45 * 2 / 3) would give exactly 33.
    assert reference.expert_capacity(1.1, 45, 2, 3) == 34
    assert reference.expert_capacity(2, 0, 4, 8) == 0
    # Clamped to T: an expert never gets more picks than there are tokens.
    assert reference.expert_capacity(2.2, 25, 3, 3) == 25
    assert reference.expert_capacity(1e300, 10, 8, 2) == 10
    assert reference.expert_capacity(1e308, 10**6, 8, 2) == 10**6  # the product overflows to inf


@pytest.mark.parametrize("capacity_factor,exc", [
    (0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
    ("1.0", TypeError), (True, TypeError),
])
def test_capacity_factor_validation(capacity_factor, exc):
    with pytest.raises(exc, match="capacity_factor"):
        reference.expert_capacity(capacity_factor, 10, 2, 4)
    with pytest.raises(exc, match="capacity_factor"):
        reference.moe(**make_problem(13), top_k=2, capacity_factor=capacity_factor)


# --------------------------------------------------------------------------- float64 per-token loop

@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("activation", reference.ELEMENTWISE_ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
def test_float64_matches_per_token_loop(gated, activation, biases):
    seed = 100 + 8 * gated + 2 * reference.ELEMENTWISE_ACTIVATIONS.index(activation) + biases
    p = make_problem(seed, gated=gated, biases=biases)
    for scoring, normalize in [("softmax", True), ("sigmoid", False)]:
        y, routing = reference.moe(**p, top_k=2, gated=gated, activation=activation, scoring=scoring,
                                   normalize=normalize, return_routing=True)
        expected, ids, _ = brute_moe(**p, top_k=2, gated=gated, activation=activation, scoring=scoring,
                                     normalize=normalize)
        assert y.dtype == torch.float64 and routing.topk_weights.dtype == torch.float64
        assert routing.router_logits.dtype == torch.float64
        assert torch.equal(routing.topk_ids.long(), ids)
        assert rel_err(y, expected) <= 1e-12


def test_gradients_match_per_token_loop():
    p = {k: v.requires_grad_() for k, v in make_problem(14, biases=True).items()}
    upstream = torch.randn(12, 8, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    got = torch.autograd.grad((reference.moe(**p, top_k=2, capacity_factor=0.8) * upstream).sum(), list(p.values()))
    want = torch.autograd.grad((brute_moe(**p, top_k=2, capacity_factor=0.8)[0] * upstream).sum(), list(p.values()))
    for name, a, b in zip(p, got, want):
        assert rel_err(a, b) <= 1e-12, name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision_within_contract_of_float64(dtype, tol):
    p = {k: v.to(dtype) for k, v in make_problem(16, tokens=64, hidden=64, intermediate=32, experts=8).items()}
    y, routing = reference.moe(**p, top_k=2, return_routing=True)
    ref, ref_routing = reference.moe(**{k: v.double() for k, v in p.items()}, top_k=2, return_routing=True)
    assert y.dtype == dtype and routing.topk_weights.dtype == torch.float32
    assert torch.equal(routing.topk_ids, ref_routing.topk_ids)
    assert rel_err(y, ref) <= tol


def test_leading_dims_and_determinism():
    p = make_problem(17, tokens=12, dtype=torch.float32)
    flat = reference.moe(**p, top_k=2)
    x3 = p.pop("x").reshape(3, 4, 8)
    y3 = reference.moe(x3, **p, top_k=2)
    assert y3.shape == (3, 4, 8) and torch.equal(y3.reshape(12, 8), flat)
    assert torch.equal(reference.moe(x3, **p, top_k=2), y3)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_zero_tokens(capacity_factor):
    p = make_problem(18, dtype=torch.float32)
    p["x"] = p["x"][:0]
    y, routing = reference.moe(**p, top_k=2, capacity_factor=capacity_factor, return_routing=True)
    assert y.shape == (0, 8) and y.dtype == torch.float32
    assert routing.topk_ids.shape == (0, 2) and routing.router_logits.shape == (0, 5)
    assert routing.expert_counts.tolist() == [0] * 5 and routing.dropped.item() == 0


# --------------------------------------------------------------------------- validation

def _bad_inputs():
    """(argument name, change to the keyword arguments of moe, exception type)."""
    p = make_problem(19, dtype=torch.float32, biases=True)  # E=5, H=8, I=6, gated
    x, rw, w1, w2 = p["x"], p["router_weight"], p["w1"], p["w2"]
    return [
        ("x", dict(x=x.tolist()), TypeError),
        ("x", dict(x=x.to(torch.int32)), TypeError),
        ("x", dict(x=x[0]), ValueError),
        ("x", dict(x=x[:, :0]), ValueError),
        ("router_weight", dict(router_weight=rw[:, :7]), ValueError),
        ("router_weight", dict(router_weight=rw[:0]), ValueError),
        ("router_weight", dict(router_weight=rw.double()), TypeError),
        ("router_weight", dict(router_weight=rw.to("meta")), ValueError),
        ("router_weight", dict(router_weight=None), TypeError),
        ("w1", dict(w1=w1[:4]), ValueError),
        ("w1", dict(w1=w1[:, :11]), ValueError),  # gated needs an even row count
        ("w1", dict(w1=w1[:, :, :7]), ValueError),
        ("w1", dict(w1=w1[0]), ValueError),
        ("w1", dict(w1=w1.half()), TypeError),
        ("w2", dict(w2=w2[:, :, :5]), ValueError),
        ("w2", dict(w2=w2.transpose(1, 2)), ValueError),
        ("w2", dict(w2=w2.to("meta")), ValueError),
        ("w2", dict(w2=w2.bfloat16()), TypeError),
        ("w2", dict(gated=False), ValueError),  # plain: w1 [E, 12, H] wants w2 [E, H, 12]
        ("router_bias", dict(router_bias=p["router_bias"][:4]), ValueError),
        ("router_bias", dict(router_bias=p["router_bias"].double()), TypeError),
        ("b1", dict(b1=p["b1"][:, :6]), ValueError),
        ("b1", dict(b1=p["b1"].to("meta")), ValueError),
        ("b2", dict(b2=p["b2"][:, :7]), ValueError),
        ("b2", dict(b2=p["b2"].half()), TypeError),
        ("top_k", dict(top_k=0), ValueError),
        ("top_k", dict(top_k=6), ValueError),
        ("top_k", dict(top_k=True), TypeError),
        ("top_k", dict(top_k=2.0), TypeError),
        ("gated", dict(gated=1), TypeError),
        ("activation", dict(activation="swish"), ValueError),
        ("activation", dict(activation=None), TypeError),
        ("scoring", dict(scoring="softplus"), ValueError),
        ("scoring", dict(scoring=0), TypeError),
        ("capacity_factor", dict(capacity_factor=float("inf")), ValueError),
    ], p


@pytest.mark.parametrize("case", range(len(_bad_inputs()[0])))
def test_validation_names_the_argument(case):
    cases, p = _bad_inputs()
    name, change, exc = cases[case]
    kwargs = dict(p, top_k=2)
    kwargs.update(change)
    with pytest.raises(exc, match=rf"^{name} must"):
        reference.moe(**kwargs)


def test_validate_accepts_good_arguments():
    p = make_problem(20, dtype=torch.bfloat16, biases=True)
    reference.validate(p["x"], p["router_weight"], p["w1"], p["w2"], top_k=5, gated=True, activation="gelu",
                       scoring="sigmoid", capacity_factor=2, router_bias=p["router_bias"], b1=p["b1"], b2=p["b2"])
