"""The expert activations of the 2026 families: relu2 and the three clamped SwiGLUs.

The float64 reference against values worked out by hand (clamp edges, NaN), the native CPU op
against the reference in every dtype with capacity, both forms (router and routing from outside),
gradients (gradcheck on the reference and the native op, native backward against autograd through
the reference), the options' guards and MoE.
"""

import math

import pytest
import torch

import flashmoe
from conftest import TOLERANCE, dtype_id, make_problem, rel_err
from flashmoe import reference

LIMIT = 0.6  # small enough that the random inputs below cross it on both sides
CASES = [
    ("relu2", {}, False),
    ("relu2", {}, True),
    ("swiglu_clamp", dict(swiglu_limit=LIMIT), True),
    ("swiglu_clamp_post", dict(swiglu_limit=0.15), True),
    ("swiglu_oai", {}, True),
    ("swiglu_oai", dict(swiglu_limit=LIMIT, swiglu_alpha=1.3), True),
]


def case_id(case):
    activation, options, gated = case
    return "-".join([activation, "gated" if gated else "plain"] + [f"{k}={v}" for k, v in options.items()])


def _silu(v):
    return v / (1 + math.exp(-v))


def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


# --------------------------------------------------------------------------- the formulas, by hand

# (g, u) pairs straddling every clamp edge for L = 2: below, at and above -L, 0, L.
EDGE_PAIRS = [(-3.0, -3.0), (-2.0, -2.0), (-0.5, 0.25), (0.0, 1.0), (1.5, 2.0), (2.0, 2.5), (3.0, -7.0), (9.0, 0.5)]


def hand_glu(activation, g, u, limit, alpha):
    """The formulas of docs/operator.md in plain Python floats."""
    if activation == "swiglu_clamp":
        return _silu(min(g, limit)) * max(-limit, min(u, limit))
    if activation == "swiglu_clamp_post":
        return min(_silu(g), limit) * max(-limit, min(u, limit))
    if activation == "swiglu_oai":
        gate = min(g, limit)
        return (max(-limit, min(u, limit)) + 1) * gate * _sigmoid(alpha * gate)
    assert activation == "relu2"
    return max(g, 0.0) ** 2 * u


@pytest.mark.parametrize("activation", reference.GATED_ACTIVATIONS + ("relu2",))
def test_reference_formulas_by_hand(activation):
    limit, alpha = 2.0, 1.702
    gate = torch.tensor([g for g, _ in EDGE_PAIRS], dtype=torch.float64)
    up = torch.tensor([u for _, u in EDGE_PAIRS], dtype=torch.float64)
    options = dict(swiglu_limit=limit, swiglu_alpha=alpha if activation == "swiglu_oai" else None) \
        if activation != "relu2" else {}
    got = reference.gated_activation(gate, up, activation, **options)
    want = torch.tensor([hand_glu(activation, g, u, limit, alpha) for g, u in EDGE_PAIRS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


def test_reference_known_values():
    """A few numbers worked out on paper: silu(2) = 2σ(2) = 1.7615941559557649."""
    g = torch.tensor([5.0, 5.0], dtype=torch.float64)
    u = torch.tensor([-9.0, 0.5], dtype=torch.float64)
    # swiglu_clamp, L = 2: silu(min(5, 2)) * clamp(u) = 1.76159... * (-2) and * 0.5
    torch.testing.assert_close(reference.gated_activation(g, u, "swiglu_clamp", 2.0),
                               torch.tensor([-3.5231883119115298, 0.88079707797788245], dtype=torch.float64))
    # swiglu_clamp_post, L = 2: min(silu(5) = 4.96653, 2) * clamp(u) = 2 * (-2), 2 * 0.5
    torch.testing.assert_close(reference.gated_activation(g, u, "swiglu_clamp_post", 2.0),
                               torch.tensor([-4.0, 1.0], dtype=torch.float64))
    # swiglu_oai defaults L = 7, alpha = 1.702: g' = 5, (clamp(u) + 1) * 5 * σ(8.51)
    sig = 1 / (1 + math.exp(-8.51))
    torch.testing.assert_close(reference.gated_activation(g, u, "swiglu_oai"),
                               torch.tensor([-6 * 5 * sig, 1.5 * 5 * sig], dtype=torch.float64))


def test_reference_nan_propagates():
    nan = torch.tensor([math.nan], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    for activation in reference.GATED_ACTIVATIONS:
        assert reference.gated_activation(nan, one, activation, 1.0).isnan().all()
        assert reference.gated_activation(one, nan, activation, 1.0).isnan().all()


# --------------------------------------------------------------------------- native CPU op

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_router_form_matches_reference(case, dtype):
    activation, options, gated = case
    problem = make_problem(40, tokens=47, hidden=36, ffn=20, experts=6, gated=gated, dtype=dtype, expert_bias=True,
                           top_k=2)
    y, routing = flashmoe.moe(**problem, top_k=2, gated=gated, activation=activation, capacity_factor=0.7,
                              return_routing=True, backend="native", **options)
    double = {name: t.double() for name, t in problem.items()}
    ref = reference.moe(**double, top_k=2, gated=gated, activation=activation, capacity_factor=0.7, **options)
    assert int(routing.dropped) > 0
    assert rel_err(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_gate_less_matches_reference(case, dtype):
    activation, options, gated = case
    problem = make_problem(41, tokens=39, hidden=36, ffn=20, experts=6, gated=gated, dtype=dtype, expert_bias=True)
    del problem["router_weight"]
    g = torch.Generator().manual_seed(42)
    ids = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(39)])  # 6 = E: the sentinel
    weights = torch.rand(39, 3, generator=g)
    y = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, gated=gated, activation=activation,
                     backend="native", **options)
    double = {name: t.double() for name, t in problem.items()}
    ref = reference.moe(**double, topk_ids=ids, topk_weights=weights.double(), gated=gated, activation=activation,
                        **options)
    assert rel_err(y, ref) <= TOLERANCE[dtype]


def test_clamps_are_active():
    """The limits above do clamp: the clamped and unclamped SwiGLU differ on these inputs."""
    problem = make_problem(41, tokens=39, hidden=36, ffn=20, experts=6, expert_bias=True)
    base = flashmoe.moe(**problem, top_k=2, backend="native")
    for activation, options, _ in CASES[2:4]:
        clamped = flashmoe.moe(**problem, top_k=2, activation=activation, backend="native", **options)
        assert rel_err(clamped, base) > 0.05, activation


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case):
    """float64 gradcheck through the reference and through the native op (its explicit backward)."""
    activation, options, gated = case
    problem = make_problem(43, tokens=6, hidden=5, ffn=4, experts=4, gated=gated, dtype=torch.float64,
                           expert_bias=True, top_k=2, tie_rtol=1e-3)
    names = list(problem)
    leaves = [problem[name].clone().requires_grad_() for name in names]
    for backend in ("reference", "native"):
        def fn(*tensors):
            return flashmoe.moe(**dict(zip(names, tensors)), top_k=2, gated=gated, activation=activation,
                                backend=backend, **options)
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5), backend


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_gradients_match_reference(case):
    activation, options, gated = case
    problem = make_problem(44, tokens=33, hidden=24, ffn=16, experts=5, gated=gated, expert_bias=True, top_k=2)
    grad_y = torch.randn(33, 24, generator=torch.Generator().manual_seed(45))
    names = list(problem)

    def grads(backend, tensors):
        leaves = [tensors[name].clone().requires_grad_() for name in names]
        y = flashmoe.moe(**dict(zip(names, leaves)), top_k=2, gated=gated, activation=activation, backend=backend,
                         **options)
        return torch.autograd.grad(y, leaves, grad_y.to(y.dtype))

    native = grads("native", problem)
    ref = grads("reference", {name: t.double() for name, t in problem.items()})
    for name, got, want in zip(names, native, ref):
        assert rel_err(got, want) <= 1e-5, name


# --------------------------------------------------------------------------- guards and MoE

BAD_OPTIONS = [
    (dict(activation="swiglu_oai", gated=False), ValueError, r"activation='swiglu_oai'.*needs gated=True"),
    (dict(activation="swiglu_clamp"), ValueError, r"needs swiglu_limit"),
    (dict(activation="swiglu_clamp_post"), ValueError, r"needs swiglu_limit"),
    (dict(activation="swiglu_clamp", swiglu_limit=0.0), ValueError, r"swiglu_limit must be"),
    (dict(activation="swiglu_clamp", swiglu_limit=-1.0), ValueError, r"swiglu_limit must be"),
    (dict(activation="swiglu_clamp", swiglu_limit=math.nan), ValueError, r"swiglu_limit must be"),
    (dict(activation="swiglu_clamp", swiglu_limit=math.inf), ValueError, r"swiglu_limit must be"),
    (dict(activation="swiglu_clamp", swiglu_limit=True), TypeError, r"swiglu_limit must be"),
    (dict(activation="swiglu_clamp", swiglu_limit="7"), TypeError, r"swiglu_limit must be"),
    (dict(activation="swiglu_oai", swiglu_alpha=0.0), ValueError, r"swiglu_alpha must be"),
    (dict(activation="swiglu_clamp", swiglu_limit=1.0, swiglu_alpha=1.0), ValueError,
     r"swiglu_alpha applies only to activation='swiglu_oai'"),
    (dict(activation="silu", swiglu_limit=1.0), ValueError, r"swiglu_limit applies only"),
    (dict(activation="relu2", swiglu_alpha=1.0), ValueError, r"swiglu_alpha applies only"),
]


@pytest.mark.parametrize("backend", ("native", "reference"))
@pytest.mark.parametrize("case", BAD_OPTIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c[0].items()))
def test_rejects_bad_options(case, backend):
    options, error, message = case
    options = dict(options)
    gated = options.pop("gated", True)
    problem = make_problem(46, tokens=4, hidden=8, ffn=4, experts=4, gated=gated)
    with pytest.raises(error, match=message):
        flashmoe.moe(**problem, top_k=2, gated=gated, backend=backend, **options)
    del problem["router_weight"]
    with pytest.raises(error, match=message):
        flashmoe.moe(**problem, topk_ids=torch.tensor([[0, 1]] * 4), topk_weights=torch.rand(4, 2), gated=gated,
                      backend=backend, **options)
    with pytest.raises(error, match=message):
        flashmoe.MoE(8, 4, 4, 2, gated=gated, **options)


def test_module_options():
    layer = flashmoe.MoE(16, 8, 4, 2, activation="swiglu_oai", swiglu_limit=0.5, swiglu_alpha=2.0, expert_bias=True)
    assert "swiglu_limit=0.5" in repr(layer) and "swiglu_alpha=2.0" in repr(layer)
    x = torch.randn(9, 16)
    y = layer(x)
    ref = reference.moe(x.double(), layer.router_weight.double(), layer.w1.double(), layer.w2.double(), top_k=2,
                        activation="swiglu_oai", swiglu_limit=0.5, swiglu_alpha=2.0, b1=layer.b1.double(),
                        b2=layer.b2.double())
    assert rel_err(y, ref) <= TOLERANCE[torch.float32]
    y.square().sum().backward()
    assert layer.w1.grad is not None and layer.w1.grad.abs().sum() > 0


def test_from_hf_reads_relu2():
    """A block whose experts use HF's ReLUSquaredActivation ("relu2") converts to activation="relu2"."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    config = transformers.OlmoeConfig(hidden_size=24, intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                      hidden_act="relu2")
    block = OlmoeSparseMoeBlock(config)
    g = torch.Generator().manual_seed(47)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * (0.3 if name == "gate.weight" else 0.2))
    layer = flashmoe.MoE.from_hf(block, backend="native")
    assert layer.activation == "relu2"
    x = torch.randn(1, 17, 24, generator=g)
    with torch.no_grad():
        assert rel_err(layer(x), block(x)) <= 2e-5


@pytest.mark.parametrize("activation", reference.GATED_ACTIVATIONS)
def test_native_gradient_at_the_clamp_edges(activation):
    """Gate and up values exactly at -L, L and on either side (x = I, so z = x·W1ᵀ is exact): the
    native backward's clamp masks agree with torch.clamp's closed interval in the reference.
    An open interval would zero the gradient at the edges and fail here."""
    limit = 2.0
    gate = torch.tensor([g for g, _ in EDGE_PAIRS] + [2.0, -2.0, 2.0], dtype=torch.float64)
    up = torch.tensor([u for _, u in EDGE_PAIRS] + [-2.0, 2.0, 2.0], dtype=torch.float64)
    n = gate.numel()
    x = torch.eye(n, dtype=torch.float64)
    w1 = torch.stack([gate, up]).unsqueeze(0)  # [E=1, 2I=2, H=n]: z[t] = (gate[t], up[t])
    w2 = torch.randn(1, n, 1, generator=torch.Generator().manual_seed(48), dtype=torch.float64)
    ids = torch.zeros(n, 1, dtype=torch.int64)
    weights = torch.rand(n, 1, generator=torch.Generator().manual_seed(49), dtype=torch.float64) + 0.5
    options = dict(swiglu_limit=limit, swiglu_alpha=1.702 if activation == "swiglu_oai" else None)

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, weights)]
        y = flashmoe.moe(leaves[0], leaves[1], leaves[2], topk_ids=ids, topk_weights=leaves[3],
                         activation=activation, backend=backend, **options)
        return torch.autograd.grad(y.sum(), leaves)

    for name, got, want in zip(("x", "w1", "w2", "topk_weights"), grads("native"), grads("reference")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_nan_token_stays_in_its_row(case, dtype):
    """A NaN in one token's x: the clamps pass it through (its y is all NaN), and no other row
    sees it (the others match the reference on the clean tokens)."""
    activation, options, gated = case
    tokens, bad = 40, 7
    problem = make_problem(50, tokens=tokens, hidden=24, ffn=16, experts=5, gated=gated, dtype=dtype,
                           expert_bias=True)
    del problem["router_weight"]
    g = torch.Generator().manual_seed(51)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])  # 5 = E: the sentinel
    ids[bad] = torch.tensor([0, 1])
    weights = torch.rand(tokens, 2, generator=g)
    problem["x"] = problem["x"].clone()
    problem["x"][bad, 3] = float("nan")
    arguments = dict(gated=gated, activation=activation, **options)
    y = flashmoe.moe(**problem, topk_ids=ids, topk_weights=weights, backend="native", **arguments)
    assert y[bad].isnan().all()
    others = torch.arange(tokens) != bad
    clean = {name: t[others] if name == "x" else t for name, t in problem.items()}
    ref = reference.moe(**{name: t.double() for name, t in clean.items()}, topk_ids=ids[others],
                        topk_weights=weights[others].double(), **arguments)
    assert torch.isfinite(y[others]).all() and rel_err(y[others], ref) <= TOLERANCE[dtype]
