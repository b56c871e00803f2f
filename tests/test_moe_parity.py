"""flashmoe.moe (backend "native") against the float64 reference, over the contract's grid.

Shapes avoid every tile multiple of the CPU backend (token tile 32, row tile 64, ffn chunk 256,
hidden chunk 512, depth steps 8/16/32, depth chunk 512..2048), so every remainder path runs.
The full cross product is taken on the small axes (T x (E, k) x dtype); options are crossed
with each other and sampled over the rest.
"""

import itertools
import random
import zlib

import pytest
import torch

from conftest import (DTYPES, TOLERANCE, assert_routing_matches, dtype_id, make_problem, rel_err, run_native,
                      run_reference)
from flashmoe import reference

TOKENS = (1, 3, 64, 257)
EXPERTS_TOP_K = sorted({(e, k) for e in (1, 4, 8, 64) for k in (1, 2, e) if k <= e})
ACTIVATIONS = reference.ELEMENTWISE_ACTIVATIONS


def check_parity(problem, **options):
    """Runs both sides; asserts y within DESIGN's tolerance and the routing; returns both results."""
    y, routing = run_native(problem, **options)
    ref_y, ref_routing = run_reference(problem, **options)
    dtype = problem["x"].dtype
    assert y.dtype == dtype and y.shape == problem["x"].shape
    assert torch.isfinite(y).all()
    assert_routing_matches(routing, ref_routing, problem, top_k=options["top_k"],
                           scoring=options.get("scoring", "softmax"), normalize=options.get("normalize", True),
                           capacity_factor=options.get("capacity_factor"))
    if y.numel():
        err = rel_err(y, ref_y)
        assert err <= TOLERANCE[dtype], f"rel err {err:.3g} > {TOLERANCE[dtype]:.3g}"
    return (y, routing), (ref_y, ref_routing)


# --------------------------------------------------------------------------- the shape grid

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("experts,top_k", EXPERTS_TOP_K, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", TOKENS)
def test_shape_grid(tokens, experts, top_k, dtype):
    seed = zlib.crc32(repr((tokens, experts, top_k, dtype_id(dtype))).encode())
    problem = make_problem(seed, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype, top_k=top_k)
    check_parity(problem, top_k=top_k)


# --------------------------------------------------------------------------- options, crossed

OPTION_GRID = list(itertools.product(ACTIVATIONS, (True, False), (True, False), ("softmax", "sigmoid"),
                                     (False, True)))


def _sampled_case(index):
    """Deterministic draw of the non-crossed axes for option combination ``index``."""
    rng = random.Random(index)
    dtype = DTYPES[index % len(DTYPES)]
    tokens = rng.choice(TOKENS)
    experts, top_k = rng.choice([(4, 2), (8, 2), (8, 1), (8, 8), (64, 2), (4, 4)])
    hidden, ffn = rng.choice([(67, 45), (130, 300), (130, 45), (67, 300)])
    return dtype, tokens, experts, top_k, hidden, ffn


@pytest.mark.parametrize("index", range(len(OPTION_GRID)),
                         ids=lambda i: "-".join(str(v) for v in OPTION_GRID[i]).replace("True", "T").replace("False", "F"))
def test_option_grid(index):
    activation, gated, normalize, scoring, biases = OPTION_GRID[index]
    dtype, tokens, experts, top_k, hidden, ffn = _sampled_case(index)
    problem = make_problem(1000 + index, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, gated=gated,
                           dtype=dtype, router_bias=biases, expert_bias=biases, top_k=top_k, scoring=scoring)
    check_parity(problem, top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_activation_every_dtype(activation, gated, dtype):
    problem = make_problem(7, tokens=64, hidden=130, ffn=300, experts=8, gated=gated, dtype=dtype,
                           expert_bias=True, top_k=2)
    check_parity(problem, top_k=2, gated=gated, activation=activation)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=dtype_id)
@pytest.mark.parametrize("hidden,ffn", [(1100, 45), (530, 70), (5, 3), (1, 1)])
def test_depth_and_hidden_chunks(hidden, ffn, dtype):
    """H past the fp32 depth chunk (1024) and the hidden chunk (512); degenerate 1-wide dims."""
    problem = make_problem(11, tokens=70, hidden=hidden, ffn=ffn, experts=4, dtype=dtype, top_k=2,
                           router_bias=hidden == 1)
    check_parity(problem, top_k=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ffn_chunks(dtype):
    """I = 600 spans three 256-wide ffn chunks, the last partial; gated and plain."""
    for gated in (True, False):
        problem = make_problem(12, tokens=40, hidden=67, ffn=600, experts=4, gated=gated, dtype=dtype, top_k=2)
        check_parity(problem, top_k=2, gated=gated, activation="gelu_tanh")


# --------------------------------------------------------------------------- capacity

CAPACITY_CASES = [(0.5, 8, 2), (1.0, 8, 2), (1.25, 4, 1), (0.3, 64, 2), (1.0, 4, 4), (0.01, 8, 2), (2.0, 8, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor,experts,top_k", CAPACITY_CASES, ids=lambda v: str(v))
def test_capacity_drops(capacity_factor, experts, top_k, dtype):
    tokens = 257
    problem = make_problem(21, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype, top_k=top_k,
                           router_std=2.0)
    (y, routing), (ref_y, ref_routing) = check_parity(problem, top_k=top_k, capacity_factor=capacity_factor)
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    expected_drops = int((routing.expert_counts.long() - capacity).clamp_min(0).sum())
    assert int(routing.dropped) == expected_drops
    if capacity_factor < 1.0:
        assert int(routing.dropped) > 0, "the case must actually drop picks"
    # A token whose every pick was dropped gets exactly zero.
    admitted = reference.admit(routing.topk_ids, experts, capacity)
    none_admitted = ~admitted.any(dim=1)
    if none_admitted.any():
        assert (y[none_admitted] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_capacity_with_biases_sigmoid(dtype):
    problem = make_problem(22, tokens=100, hidden=67, ffn=45, experts=8, gated=False, dtype=dtype,
                           router_bias=True, expert_bias=True, top_k=3, scoring="sigmoid")
    (_, routing), _ = check_parity(problem, top_k=3, gated=False, activation="relu", scoring="sigmoid",
                                   normalize=False, capacity_factor=0.7)
    assert int(routing.dropped) > 0


# --------------------------------------------------------------------------- skewed routing and edges

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_expert_with_no_tokens(dtype):
    experts = 8
    problem = make_problem(31, tokens=64, hidden=67, ffn=45, experts=experts, dtype=dtype, router_bias=True)
    bias = problem["router_bias"].clone()
    bias[3] = -30.0
    bias[6] = -30.0
    problem["router_bias"] = bias
    (_, routing), _ = check_parity(problem, top_k=2, capacity_factor=1.0)
    assert routing.expert_counts[3] == 0 and routing.expert_counts[6] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
@pytest.mark.parametrize("top_k", (1, 2))
def test_all_tokens_on_one_expert(top_k, capacity_factor, dtype):
    experts, tokens = 8, 257
    problem = make_problem(32, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype, router_bias=True)
    bias = problem["router_bias"].clone()
    bias[5] = 30.0
    problem["router_bias"] = bias
    (_, routing), _ = check_parity(problem, top_k=top_k, capacity_factor=capacity_factor)
    assert (routing.topk_ids[:, 0] == 5).all()
    assert routing.expert_counts[5] == tokens
    if capacity_factor is not None:
        capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
        assert int(routing.dropped) >= tokens - capacity > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
def test_zero_tokens(capacity_factor, dtype):
    problem = make_problem(41, tokens=0, hidden=67, ffn=45, experts=4, dtype=dtype, router_bias=True,
                           expert_bias=True)
    y, routing = run_native(problem, top_k=2, capacity_factor=capacity_factor)
    assert y.shape == (0, 67) and y.dtype == dtype
    assert routing.topk_ids.shape == (0, 2) and routing.router_logits.shape == (0, 4)
    assert routing.expert_counts.tolist() == [0, 0, 0, 0]
    assert int(routing.dropped) == 0


def test_leading_dims_flattened():
    problem = make_problem(42, tokens=60, hidden=67, ffn=45, experts=8, top_k=2)
    x3 = problem["x"].reshape(3, 4, 5, 67)
    y3 = run_native({**problem, "x": x3}, top_k=2)[0]
    y2 = run_native(problem, top_k=2)[0]
    assert y3.shape == x3.shape
    assert torch.equal(y3.reshape(60, 67), y2)
