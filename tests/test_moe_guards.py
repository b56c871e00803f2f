"""Bad input: every wrong shape, dtype, device, stride or option raises ValueError or TypeError
naming the argument (DESIGN.md "Bad input"), on every entry point, and never crashes."""

import math

import pytest
import torch

import flashmoe
from conftest import call_native_raw, empty_outputs, make_problem, native_problem
from flashmoe import _C

TOKENS, HIDDEN, FFN, EXPERTS = 5, 8, 6, 4
BAD = (ValueError, TypeError)


def base_problem(gated=True):
    return make_problem(0, tokens=TOKENS, hidden=HIDDEN, ffn=FFN, experts=EXPERTS, gated=gated, router_bias=True,
                        expert_bias=True)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


# (case id, {tensor name: replacement} or {option: value}, the argument the message must name)
TENSOR_CASES = [
    ("x-1d", dict(x=lambda p: p["x"][0]), "x"),
    ("x-0d", dict(x=lambda p: p["x"][0, 0]), "x"),
    ("x-not-tensor", dict(x=lambda p: p["x"].tolist()), "x"),
    ("x-int", dict(x=lambda p: p["x"].to(torch.int32)), "x"),
    ("x-bool", dict(x=lambda p: p["x"] > 0), "x"),
    ("router_weight-wrong-H", dict(router_weight=lambda p: _randn(EXPERTS, HIDDEN + 1)), "router_weight"),
    ("router_weight-3d", dict(router_weight=lambda p: _randn(1, EXPERTS, HIDDEN)), "router_weight"),
    ("router_weight-empty-E", dict(router_weight=lambda p: _randn(0, HIDDEN)), "router_weight"),
    ("router_weight-None", dict(router_weight=lambda p: None), "router_weight"),
    ("w1-wrong-E", dict(w1=lambda p: _randn(EXPERTS - 1, 2 * FFN, HIDDEN)), "w1"),
    ("w1-wrong-H", dict(w1=lambda p: _randn(EXPERTS, 2 * FFN, HIDDEN - 1)), "w1"),
    ("w1-odd-rows-gated", dict(w1=lambda p: _randn(EXPERTS, 2 * FFN - 1, HIDDEN)), "w1"),
    ("w1-2d", dict(w1=lambda p: _randn(2 * FFN, HIDDEN)), "w1"),
    ("w1-list", dict(w1=lambda p: p["w1"].tolist()), "w1"),
    ("w2-wrong-I", dict(w2=lambda p: _randn(EXPERTS, HIDDEN, FFN + 1)), "w2"),
    ("w2-wrong-H", dict(w2=lambda p: _randn(EXPERTS, HIDDEN + 1, FFN)), "w2"),
    ("w2-wrong-E", dict(w2=lambda p: _randn(EXPERTS + 1, HIDDEN, FFN)), "w2"),
    ("w2-None", dict(w2=lambda p: None), "w2"),
    ("router_bias-wrong-E", dict(router_bias=lambda p: _randn(EXPERTS + 1)), "router_bias"),
    ("router_bias-2d", dict(router_bias=lambda p: _randn(1, EXPERTS)), "router_bias"),
    ("b1-ungated-width", dict(b1=lambda p: _randn(EXPERTS, FFN)), "b1"),
    ("b1-wrong-E", dict(b1=lambda p: _randn(EXPERTS + 1, 2 * FFN)), "b1"),
    ("b2-wrong-H", dict(b2=lambda p: _randn(EXPERTS, FFN)), "b2"),
    ("b2-1d", dict(b2=lambda p: _randn(HIDDEN)), "b2"),
]
for _name in ("router_weight", "w1", "w2", "router_bias", "b1", "b2"):
    TENSOR_CASES.append((f"{_name}-float64", {_name: (lambda n: lambda p: p[n].double())(_name)}, _name))
    TENSOR_CASES.append((f"{_name}-bfloat16", {_name: (lambda n: lambda p: p[n].bfloat16())(_name)}, _name))
    TENSOR_CASES.append((f"{_name}-int", {_name: (lambda n: lambda p: p[n].to(torch.int64))(_name)}, _name))
    TENSOR_CASES.append((f"{_name}-meta", {_name: (lambda n: lambda p: p[n].to("meta"))(_name)}, _name))

OPTION_CASES = [
    ("top_k-0", dict(top_k=0), "top_k"),
    ("top_k-negative", dict(top_k=-1), "top_k"),
    ("top_k-over-E", dict(top_k=EXPERTS + 1), "top_k"),
    ("top_k-bool", dict(top_k=True), "top_k"),
    ("top_k-float", dict(top_k=2.0), "top_k"),
    ("top_k-str", dict(top_k="2"), "top_k"),
    ("top_k-None", dict(top_k=None), "top_k"),
    ("activation-unknown", dict(activation="swish"), "activation"),
    ("activation-case", dict(activation="SiLU"), "activation"),
    ("activation-None", dict(activation=None), "activation"),
    ("scoring-unknown", dict(scoring="softplus"), "scoring"),
    ("scoring-None", dict(scoring=None), "scoring"),
    ("capacity_factor-nan", dict(capacity_factor=math.nan), "capacity_factor"),
    ("capacity_factor-inf", dict(capacity_factor=math.inf), "capacity_factor"),
    ("capacity_factor-minus-inf", dict(capacity_factor=-math.inf), "capacity_factor"),
    ("capacity_factor-0", dict(capacity_factor=0), "capacity_factor"),
    ("capacity_factor-minus-1", dict(capacity_factor=-1.0), "capacity_factor"),
    ("capacity_factor-str", dict(capacity_factor="1.0"), "capacity_factor"),
    ("capacity_factor-bad-str", dict(capacity_factor="abc"), "capacity_factor"),
    ("capacity_factor-bool", dict(capacity_factor=True), "capacity_factor"),
    ("capacity_factor-tensor", dict(capacity_factor=torch.tensor(1.0)), "capacity_factor"),
    ("gated-str", dict(gated="yes"), "gated"),
    ("normalize-str", dict(normalize="no"), "normalize"),
    ("backend-unknown", dict(backend="cuda"), "backend"),
    ("backend-case", dict(backend="Native"), "backend"),
    ("backend-None", dict(backend=None), "backend"),
]


def _apply(case_changes, problem):
    problem = dict(problem)
    options = dict(top_k=2)
    for name, change in case_changes.items():
        if callable(change):
            problem[name] = change(problem)
        else:
            options[name] = change
    return problem, options


@pytest.mark.parametrize("backend", ("native", "reference"))
@pytest.mark.parametrize("case", TENSOR_CASES + OPTION_CASES, ids=lambda c: c[0])
def test_functional_rejects(case, backend):
    _, changes, argument = case
    problem, options = _apply(changes, base_problem())
    options.setdefault("backend", backend)
    with pytest.raises(BAD, match=rf"\b{argument}\b"):
        flashmoe.moe(**problem, **options)


def test_plain_w1_rows_must_match_w2():
    problem = base_problem(gated=True)  # w1 has 2I rows; ungated it means I' = 2I, which w2 contradicts
    del problem["b1"]
    for backend in ("native", "reference"):
        with pytest.raises(BAD, match=r"\bw2\b"):
            flashmoe.moe(**problem, top_k=2, gated=False, backend=backend)


# --------------------------------------------------------------------------- the op directly

def _op_args(problem, **options):
    values = dict(top_k=2, gated=True, activation="silu", normalize=True, scoring="softmax", capacity_factor=None)
    values.update(options)
    return [problem.get(name) for name in ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2")] + list(
        values.values())


def _non_contiguous(tensor):
    """Same values and shape, transposed storage (or a strided slice for 1-d)."""
    if tensor.dim() == 1:
        return torch.stack([tensor, tensor], dim=1)[:, 0]
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("name", ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2"))
def test_op_rejects_non_contiguous(name):
    problem = base_problem()
    problem[name] = _non_contiguous(problem[name])
    assert not problem[name].is_contiguous()
    with pytest.raises(ValueError, match=rf"\b{name}\b.*contiguous"):
        torch.ops.flashmoe.moe_forward(*_op_args(problem))


@pytest.mark.parametrize("case", [c for c in TENSOR_CASES if not c[0].startswith("x-")
                                  and "None" not in c[0] and "list" not in c[0]], ids=lambda c: c[0])
def test_op_rejects_tensor(case):
    _, changes, argument = case
    problem, _ = _apply(changes, base_problem())
    with pytest.raises(BAD, match=rf"\b{argument}\b"):
        torch.ops.flashmoe.moe_forward(*_op_args(problem))


def test_op_rejects_3d_x():
    problem = base_problem()
    problem["x"] = problem["x"].reshape(1, TOKENS, HIDDEN)
    with pytest.raises(BAD, match=r"\bx\b"):
        torch.ops.flashmoe.moe_forward(*_op_args(problem))


@pytest.mark.parametrize("options,argument", [
    (dict(top_k=0), "top_k"), (dict(top_k=EXPERTS + 1), "top_k"), (dict(activation="tanh"), "activation"),
    (dict(scoring="max"), "scoring"), (dict(capacity_factor=math.nan), "capacity_factor"),
    (dict(capacity_factor=-2.0), "capacity_factor"), (dict(capacity_factor=math.inf), "capacity_factor"),
], ids=lambda v: str(v))
def test_op_rejects_options(options, argument):
    with pytest.raises(BAD, match=rf"\b{argument}\b"):
        torch.ops.flashmoe.moe_forward(*_op_args(base_problem(), **options))


# --------------------------------------------------------------------------- the C++ second line of defence

@pytest.mark.parametrize("field,value", [
    ("top_k", 0), ("top_k", EXPERTS + 1), ("tokens", -1), ("hidden", 0), ("ffn", 0), ("experts", 0),
    ("expert_capacity", -2),
])
def test_native_problem_validation(field, value):
    problem = base_problem()
    descriptor = native_problem(TOKENS, HIDDEN, FFN, EXPERTS, torch.float32, top_k=2, router_bias=True, b1=True,
                                b2=True)
    setattr(descriptor, field, value)
    assert descriptor.validate() is not None
    outputs = empty_outputs(problem, 2)
    with pytest.raises(ValueError, match=field.split("_")[0]):
        _C.moe_forward_cpu(problem=descriptor, **_addresses(problem, outputs), num_threads=1)


def _addresses(problem, outputs):
    named = {**problem, **outputs}
    names = ("x", "router_weight", "router_bias", "w1", "b1", "w2", "b2", "y", "topk_ids", "topk_weights",
             "expert_counts", "router_logits", "dropped")
    return {name: named[name].data_ptr() if name in named else 0 for name in names}


@pytest.mark.parametrize("pointer", ("router_weight", "w1", "w2", "x", "y", "topk_ids", "expert_counts", "dropped",
                                     "router_bias", "b1", "b2"))
def test_native_null_and_inconsistent_pointers(pointer):
    problem = base_problem()
    descriptor = native_problem(TOKENS, HIDDEN, FFN, EXPERTS, torch.float32, top_k=2, router_bias=True, b1=True,
                                b2=True)
    addresses = _addresses(problem, empty_outputs(problem, 2))
    addresses[pointer] = 0
    with pytest.raises(ValueError):
        _C.moe_forward_cpu(problem=descriptor, **addresses, num_threads=1)


@pytest.mark.parametrize("capacity_factor", (math.nan, math.inf, 0.0, -1.0))
def test_native_expert_capacity_rejects(capacity_factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        _C.expert_capacity(capacity_factor, 10, 2, 4)


# --------------------------------------------------------------------------- extreme but valid

@pytest.mark.parametrize("capacity_factor", (1e300, 1e-300, 10**30))
def test_extreme_capacity_factors(capacity_factor):
    problem = base_problem()
    y, routing = flashmoe.moe(**problem, top_k=2, capacity_factor=capacity_factor, return_routing=True,
                              backend="native")
    ref_y, ref_routing = flashmoe.moe(**{n: t.double() for n, t in problem.items()}, top_k=2,
                                      capacity_factor=capacity_factor, return_routing=True, backend="reference")
    assert int(routing.dropped) == int(ref_routing.dropped)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the module constructor

MODULE_CASES = [
    (dict(hidden_size=0), "hidden_size"), (dict(hidden_size=-3), "hidden_size"), (dict(hidden_size=2.5), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"), (dict(ffn_size=0), "ffn_size"), (dict(ffn_size="8"), "ffn_size"),
    (dict(num_experts=0), "num_experts"), (dict(top_k=0), "top_k"), (dict(top_k=9), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"), (dict(activation="swish"), "activation"),
    (dict(scoring="softplus"), "scoring"), (dict(capacity_factor=math.nan), "capacity_factor"),
    (dict(capacity_factor=math.inf), "capacity_factor"), (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=-1), "capacity_factor"), (dict(capacity_factor="1.0"), "capacity_factor"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("changes,argument", MODULE_CASES, ids=lambda v: str(v))
def test_module_constructor_rejects(changes, argument):
    arguments = dict(hidden_size=16, ffn_size=8, num_experts=8, top_k=2)
    arguments.update(changes)
    with pytest.raises(BAD, match=rf"\b{argument}\b"):
        flashmoe.MoE(**arguments)
