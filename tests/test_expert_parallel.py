"""Expert parallelism over W simulated ranks (flashmoe.testing), against the operator contract.

Under expert parallelism capacity is per (source rank, expert), computed from the rank's own T_r,
and routing is per token, so rank r's output is the single-rank operator applied to xs[r] alone:

  * bitwise equal to ``flashmoe.moe(xs[r], ..., backend="native")`` (batch-invariant tile GEMM,
    fixed combine order), whatever the chaos seed, thread count or world size;
  * within DESIGN.md's tolerance of ``flashmoe.reference.moe`` on float64 copies.

Every input is seeded random data (never zeros) with weights scaled so routing is not tied.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import flashmoe
from conftest import (TOLERANCE, assert_routing_matches, dtype_id, make_problem, rel_err, same_bits)
from flashmoe import reference
from flashmoe.testing import SimulatedCluster, simulate_expert_parallel

pytestmark = pytest.mark.usefixtures("watchdog")

H, I = 40, 56  # deliberately not multiples of any tile
CHAOS_SEEDS = (None, 1, 2)
THREADS = (1, 2, 3)
WEIGHT_NAMES = ("router_weight", "w1", "w2", "router_bias", "b1", "b2")


# --------------------------------------------------------------------------- helpers

def build(seed, token_counts, *, experts, top_k, hidden=H, ffn=I, dtype=torch.float32, gated=True,
          router_bias=False, expert_bias=False, scoring="softmax"):
    """(xs, weights): one random problem over sum(token_counts) tokens, split into the ranks' xs.

    The router is drawn untied over all tokens together, so every rank's routing is untied too.
    """
    total = sum(token_counts)
    problem = make_problem(seed, tokens=total, hidden=hidden, ffn=ffn, experts=experts, gated=gated, dtype=dtype,
                           router_bias=router_bias, expert_bias=expert_bias, top_k=top_k, scoring=scoring)
    xs = [x.contiguous() for x in problem.pop("x").split(list(token_counts))]
    return xs, problem


def options_of(weights, **options):
    return dict(weights, **options)


def native(x, weights, **options):
    return flashmoe.moe(x, **weights, return_routing=True, backend="native", **options)


def ref(x, weights, **options):
    return reference.moe(x.double(), **{n: t.double() for n, t in weights.items()}, return_routing=True, **options)


def check_against_contract(xs, weights, *, world_size, top_k, runs, gated=True, activation="silu", normalize=True,
                           scoring="softmax", capacity_factor=None, check_routing=True):
    """Every rank: native ≈ float64 reference; every run in ``runs`` ((chaos_seed, threads) pairs)
    bitwise equal to native; routing of one SimulatedCluster run equal to native's and reference's.

    Returns the native (y, routing) per rank.
    """
    options = dict(top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring,
                   capacity_factor=capacity_factor)
    dtype = xs[0].dtype
    natives = [native(x, weights, **options) for x in xs]
    for r, (x, (y, routing)) in enumerate(zip(xs, natives)):
        assert y.shape == x.shape and y.dtype == dtype
        y_ref, routing_ref = ref(x, weights, **options)
        if x.shape[0]:
            assert torch.isfinite(y).all()
            assert y_ref.norm() > 0, "test inputs must not produce an all-zero output"
            err = rel_err(y, y_ref)
            assert err <= TOLERANCE[dtype], f"rank {r}: rel err {err:.3g} > {TOLERANCE[dtype]:g}"
        if not x.shape[0]:
            assert int(routing.expert_counts.abs().sum()) == 0 and int(routing.dropped) == 0
        elif check_routing:
            assert_routing_matches(routing, routing_ref, dict(x=x, **weights), top_k=top_k, scoring=scoring,
                                   normalize=normalize, capacity_factor=capacity_factor)
    for chaos_seed, threads in runs:
        ys = simulate_expert_parallel(xs, **weights, world_size=world_size, chaos_seed=chaos_seed,
                                      threads_per_rank=threads, **options)
        assert len(ys) == world_size
        for r in range(world_size):
            assert same_bits(ys[r], natives[r][0]), (
                f"rank {r} differs from the single-rank native op (chaos_seed={chaos_seed}, threads={threads})")
    # Routing outputs of the cluster, per rank: identical to native's (hence to the reference's).
    cluster = SimulatedCluster(xs[0].shape[1], weights["w2"].shape[2], weights["router_weight"].shape[0], top_k,
                               world_size=world_size, max_tokens=max([1] + [x.shape[0] for x in xs]), dtype=dtype,
                               gated=gated, activation=activation, normalize=normalize, scoring=scoring,
                               with_router_bias="router_bias" in weights, with_b1="b1" in weights,
                               with_b2="b2" in weights, threads_per_rank=2, chaos_seed=11)
    ys, routings = cluster.forward(xs, **weights, capacity_factor=capacity_factor, return_routing=True)
    for r in range(world_size):
        y_native, routing_native = natives[r]
        assert same_bits(ys[r], y_native)
        for name in ("topk_ids", "topk_weights", "expert_counts", "dropped", "router_logits"):
            assert same_bits(getattr(routings[r], name), getattr(routing_native, name)), f"rank {r}: {name}"
    for r in range(world_size):
        assert cluster.epoch(r) == 1
    return natives


def token_counts_for(world_size, salt):
    """Varied per-rank token counts in [3, 39]; never all equal."""
    return [3 + (11 * r + 7 * salt) % 37 for r in range(world_size)]


# --------------------------------------------------------------------------- the "done" grid

def _grid():
    cases = []
    for world_size in (1, 2, 3, 4, 8):
        expert_counts = [world_size, 2 * world_size] + ([32] if 32 % world_size == 0 else [])
        for experts in dict.fromkeys(expert_counts):
            for top_k in (1, 2, 4):
                if top_k <= experts:
                    cases.append((world_size, experts, top_k))
    return cases


GRID = _grid()


@pytest.mark.parametrize("index", range(len(GRID)),
                         ids=[f"W{w}-E{e}-k{k}" for w, e, k in GRID])
def test_grid_matches_reference_and_native_bitwise(index):
    """The issue's grid; dtype, gating and biases rotate over it; every (chaos seed, threads) pair."""
    world_size, experts, top_k = GRID[index]
    dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[index % 4]
    gated = index % 3 != 1
    biases = index % 5 == 2
    xs, weights = build(100 + index, token_counts_for(world_size, index), experts=experts, top_k=top_k,
                        dtype=dtype, gated=gated, router_bias=biases, expert_bias=biases and not gated)
    check_against_contract(xs, weights, world_size=world_size, top_k=top_k, gated=gated,
                           runs=list(itertools.product(CHAOS_SEEDS, THREADS)))


@pytest.mark.parametrize("world_size,experts", [(1, 8), (2, 8), (2, 32), (4, 32), (8, 32), (4, 16)])
def test_top1_with_several_local_experts(world_size, experts):
    """k=1 with L = E/W > 1 local experts: every cell's first_row and the return row must be right
    (FlashMoE's public code got this wrong). Rows of different local experts share one region."""
    local = experts // world_size
    assert local > 1
    counts = [24 + 5 * r for r in range(world_size)]
    xs, weights = build(7 + experts + world_size, counts, experts=experts, top_k=1)
    natives = check_against_contract(xs, weights, world_size=world_size, top_k=1,
                                     runs=[(None, 1), (1, 2), (2, 3), (3, 1)])
    # The case is only meaningful if some source sends rows to several experts of one owner.
    assert any(int((routing.expert_counts.view(world_size, local) > 0).sum(dim=1).max()) > 1
               for _, routing in natives)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_dtypes_gating_biases_scoring(dtype, gated, biases, scoring):
    index = [torch.float32, torch.bfloat16, torch.float16, torch.float64].index(dtype)
    activation = ("silu", "gelu", "gelu_tanh", "relu")[(index + 2 * gated + biases) % 4]
    normalize = not (scoring == "sigmoid" and biases)
    xs, weights = build(31 + index + 4 * gated + 8 * biases, [17, 0, 26, 9], experts=8, top_k=2, dtype=dtype,
                        gated=gated, router_bias=biases, expert_bias=biases, scoring=scoring)
    check_against_contract(xs, weights, world_size=4, top_k=2, gated=gated, activation=activation,
                           normalize=normalize, scoring=scoring, runs=[(None, 1), (1, 3), (2, 2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_large_tiles_cross_gemm_column_tiles_and_row_tiles(dtype):
    """I > 256 and H > 512 cross the GEMM0 and GEMM1 column tiles; > 64 rows per (source, expert)
    cell give several row tiles per cell."""
    hidden, ffn = 520, 264
    xs, weights = build(5, [200, 150], experts=4, top_k=2, hidden=hidden, ffn=ffn, dtype=dtype,
                        expert_bias=dtype == torch.float32, gated=dtype != torch.float32)
    gated = dtype != torch.float32
    natives = check_against_contract(xs, weights, world_size=2, top_k=2, gated=gated,
                                     runs=[(None, 1), (1, 2), (2, 3)])
    assert max(int(routing.expert_counts.max()) for _, routing in natives) > 64


# --------------------------------------------------------------------------- skewed routing

def _skew(weights, expert, amount):
    weights = dict(weights)
    bias = weights["router_bias"].clone()
    bias[expert] += amount
    weights["router_bias"] = bias
    return weights


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_all_tokens_to_one_expert(top_k, capacity_factor):
    counts = [21, 0, 13, 30]
    xs, weights = build(41 + top_k, counts, experts=8, top_k=top_k, router_bias=True)
    weights = _skew(weights, 5, 30.0)
    natives = check_against_contract(xs, weights, world_size=4, top_k=top_k, capacity_factor=capacity_factor,
                                     runs=[(None, 1), (1, 2), (2, 3)])
    for r, (_, routing) in enumerate(natives):
        assert int(routing.expert_counts[5]) == counts[r]
        capacity = reference.expert_capacity(capacity_factor, counts[r], top_k, 8)
        expected_drops = 0 if capacity is None else max(0, counts[r] - capacity)
        if top_k == 1:
            assert int(routing.dropped) == expected_drops
        else:
            assert int(routing.dropped) >= expected_drops


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_an_expert_with_zero_tokens(capacity_factor):
    """Experts 2 (rank 1) and 7 (rank 3) get no rows from any source: empty cells still signal."""
    counts = [19, 23, 7, 31]
    xs, weights = build(43, counts, experts=8, top_k=2, router_bias=True)
    weights = _skew(_skew(weights, 2, -30.0), 7, -30.0)
    natives = check_against_contract(xs, weights, world_size=4, top_k=2, capacity_factor=capacity_factor,
                                     runs=[(None, 1), (1, 2), (2, 3), (3, 3)])
    for _, routing in natives:
        assert int(routing.expert_counts[2]) == 0 and int(routing.expert_counts[7]) == 0


@pytest.mark.parametrize("counts", [[0, 17, 5, 30], [0, 0, 23, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 64]],
                         ids=["one-empty", "all-but-one-empty", "all-empty", "one-token", "one-rank-64"])
@pytest.mark.parametrize("world_size,experts,top_k", [(4, 8, 2), (4, 4, 1), (4, 32, 4)])
def test_empty_ranks(counts, world_size, experts, top_k):
    xs, weights = build(47 + sum(counts), counts, experts=experts, top_k=top_k, router_bias=True, expert_bias=True,
                        gated=False)
    natives = check_against_contract(xs, weights, world_size=world_size, top_k=top_k, gated=False,
                                     runs=[(None, 1), (1, 2), (2, 3)])
    for r, (y, routing) in enumerate(natives):
        assert y.shape == (counts[r], H)
        assert int(routing.expert_counts.sum()) == counts[r] * top_k


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
@pytest.mark.parametrize("world_size,experts,top_k", [(2, 4, 2), (4, 8, 1), (4, 32, 4), (8, 16, 2)])
def test_capacity_drops_per_rank(capacity_factor, world_size, experts, top_k):
    """Capacity is per (source rank, expert) from T_r: dropped counts per rank match the reference
    run on that rank's tokens alone."""
    counts = [5 + (13 * r) % 41 for r in range(world_size)]
    xs, weights = build(53 + world_size + experts, counts, experts=experts, top_k=top_k, router_bias=True)
    weights = _skew(weights, 0, 1.5)  # mild skew: expert 0 overflows
    cluster = SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=max(counts),
                               with_router_bias=True, threads_per_rank=2, chaos_seed=5)
    ys, routings = cluster.forward(xs, **weights, capacity_factor=capacity_factor, return_routing=True)
    total_dropped = 0
    for r, x in enumerate(xs):
        y_ref, routing_ref = ref(x, weights, top_k=top_k, capacity_factor=capacity_factor)
        assert int(routings[r].dropped) == int(routing_ref.dropped), f"rank {r}"
        assert torch.equal(routings[r].expert_counts, routing_ref.expert_counts), f"rank {r}"
        assert rel_err(ys[r], y_ref) <= TOLERANCE[torch.float32]
        total_dropped += int(routings[r].dropped)
    assert total_dropped > 0, "the case must actually drop picks"
    check_against_contract(xs, weights, world_size=world_size, top_k=top_k, capacity_factor=capacity_factor,
                           runs=[(None, 1), (1, 2), (2, 3)])


def test_nan_token_propagates_without_hanging():
    """A NaN token on one rank: its output row is NaN, nothing hangs, and no other row or rank
    is contaminated (the tile GEMM is row-wise); still bitwise equal to the native op."""
    counts = [12, 9, 0, 15]
    xs, weights = build(57, counts, experts=8, top_k=2)
    xs[1] = xs[1].clone()
    xs[1][3] = float("nan")
    expected = _natives(xs, weights, top_k=2)
    for chaos_seed, threads in [(None, 1), (1, 2), (2, 3)]:
        ys = simulate_expert_parallel(xs, **weights, top_k=2, world_size=4, chaos_seed=chaos_seed,
                                      threads_per_rank=threads)
        for r in range(4):
            assert same_bits(ys[r], expected[r]), f"rank {r}"
    assert torch.isnan(ys[1][3]).all()
    finite = [torch.isfinite(ys[r]).all() for r in (0, 3)] + [torch.isfinite(torch.cat([ys[1][:3], ys[1][4:]])).all()]
    assert all(finite)


def test_non_contiguous_inputs():
    counts = [10, 7]
    xs, weights = build(59, counts, experts=4, top_k=2)
    expected = _natives(xs, weights, top_k=2)
    strided = []
    for x in xs:  # the same values in a [T, H] view with row stride 2H
        wide = torch.full((x.shape[0], 2 * H), float("nan"))
        wide[:, ::2] = x
        strided.append(wide[:, ::2])
    transposed_w2 = weights["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided[0].is_contiguous() and not transposed_w2.is_contiguous()
    ys = simulate_expert_parallel(strided, **dict(weights, w2=transposed_w2), top_k=2, world_size=2, chaos_seed=4,
                                  threads_per_rank=2)
    assert all(same_bits(ys[r], expected[r]) for r in range(2))


# --------------------------------------------------------------------------- repeated calls

def _natives(xs, weights, **options):
    return [native(x, weights, **options)[0] for x in xs]


def test_repeats_1000_equal_single_run():
    """forward(repeats=1000), ranks progressing independently between calls, under chaos; a rank
    with no tokens included (its combine still waits for every return flag)."""
    counts = [20, 0, 13, 31]
    xs, weights = build(61, counts, experts=8, top_k=2)
    expected = _natives(xs, weights, top_k=2)
    cluster = SimulatedCluster(H, I, 8, 2, world_size=4, max_tokens=31, threads_per_rank=2, chaos_seed=3)
    single = cluster.forward(xs, **weights)
    assert [cluster.epoch(r) for r in range(4)] == [1] * 4
    many = cluster.forward(xs, **weights, repeats=1000)
    assert [cluster.epoch(r) for r in range(4)] == [1001] * 4
    for r in range(4):
        assert same_bits(single[r], expected[r]), f"rank {r}"
        assert same_bits(many[r], expected[r]), f"rank {r}"
    after = cluster.forward(xs, **weights)
    assert all(same_bits(after[r], expected[r]) for r in range(4))
    assert [cluster.epoch(r) for r in range(4)] == [1002] * 4


@pytest.mark.parametrize("threads_per_rank", (1, 2))
def test_drifting_ranks_with_new_inputs_every_call(threads_per_rank):
    """forward_calls: every rank runs 200 calls back to back with new inputs (and token counts,
    zero included) in every call, never waiting for the other ranks between calls, under chaos.
    A rank reading rows or flags of the wrong epoch would mix two calls' data and break the bits."""
    world_size, experts, top_k, max_tokens, calls = 4, 8, 2, 24, 200
    cluster = SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=max_tokens,
                               threads_per_rank=threads_per_rank, chaos_seed=11)
    _, weights = build(71, [8], experts=experts, top_k=top_k)
    generator = torch.Generator().manual_seed(72)
    inputs = [[torch.randn(int(torch.randint(0, max_tokens + 1, (), generator=generator)), H, generator=generator)
               for _ in range(world_size)] for _ in range(calls)]
    results = cluster.forward_calls(inputs, **weights)
    assert [cluster.epoch(r) for r in range(world_size)] == [calls] * world_size
    for call, (xs, ys) in enumerate(zip(inputs, results)):
        for rank, (x, y) in enumerate(zip(xs, ys)):
            expected = flashmoe.moe(x, weights["router_weight"], weights["w1"], weights["w2"], top_k=top_k,
                                    backend="native")
            assert same_bits(y, expected), f"call {call}, rank {rank}"


def test_1000_separate_calls_with_changing_inputs():
    """1,000 forward() calls on one cluster; the inputs (and per-rank token counts) change every
    100 calls, and each call is checked bitwise against native single-rank ops."""
    world_size, experts, top_k, max_tokens = 4, 8, 2, 24
    cluster = SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=max_tokens,
                               with_router_bias=True, threads_per_rank=2, chaos_seed=9)
    _, weights = build(70, [8], experts=experts, top_k=top_k, router_bias=True)
    calls = 0
    for block in range(10):
        counts = [(5 * block + 7 * r) % (max_tokens + 1) for r in range(world_size)]
        xs = [make_problem(1000 * block + r, tokens=counts[r], hidden=H, ffn=I, experts=experts)["x"]
              for r in range(world_size)]
        capacity_factor = (None, 1.0)[block % 2]
        expected = _natives(xs, weights, top_k=top_k, capacity_factor=capacity_factor)
        for _ in range(100):
            ys = cluster.forward(xs, **weights, capacity_factor=capacity_factor)
            calls += 1
            for r in range(world_size):
                assert same_bits(ys[r], expected[r]), f"call {calls}, rank {r}"
        assert [cluster.epoch(r) for r in range(world_size)] == [calls] * world_size


def _wrap_budget_ok(cluster, xs, weights, calls_needed):
    """Times a short burst and skips if reaching the wrap would take more than 20 s."""
    start = time.perf_counter()
    cluster.forward(xs, **weights, repeats=2000)
    per_call = (time.perf_counter() - start) / 2000
    if per_call * calls_needed > 20:
        pytest.skip(f"epoch wrap needs {calls_needed} calls, ~{per_call * calls_needed:.0f} s here (> 20 s)")
    return 2000


def test_epoch_wraps_past_65535():
    """Epochs run 1..65535 and wrap to 1, never 0. A repeats= run crosses the wrap with ranks at
    different epochs; then single calls with new inputs each cross it again, each checked bitwise
    (a stale flag or row from 65,535 calls ago would show as old data)."""
    world_size, experts, top_k = 3, 6, 2
    epochs = 65535
    counts = [5, 0, 4]
    xs, weights = build(80, counts, experts=experts, top_k=top_k, hidden=8, ffn=8)
    expected = _natives(xs, weights, top_k=top_k)
    cluster = SimulatedCluster(8, 8, experts, top_k, world_size=world_size, max_tokens=5, threads_per_rank=2)
    done = _wrap_budget_ok(cluster, xs, weights, 2 * epochs)
    # Across the wrap inside one run: ends at epoch 5 of the second cycle.
    ys = cluster.forward(xs, **weights, repeats=epochs + 5 - done)
    done = epochs + 5
    assert [cluster.epoch(r) for r in range(world_size)] == [5] * world_size
    assert all(same_bits(ys[r], expected[r]) for r in range(world_size))
    # Up to 3 calls before the next wrap, then single calls with fresh inputs across it.
    cluster.forward(xs, **weights, repeats=epochs - 3 - 5)
    assert [cluster.epoch(r) for r in range(world_size)] == [epochs - 3] * world_size
    for step, expected_epoch in enumerate([epochs - 2, epochs - 1, epochs, 1, 2, 3]):
        step_counts = [(step + 2 * r) % 6 for r in range(world_size)]
        step_xs = [make_problem(900 + 10 * step + r, tokens=step_counts[r], hidden=8, ffn=8, experts=experts)["x"]
                   for r in range(world_size)]
        step_expected = _natives(step_xs, weights, top_k=top_k)
        ys = cluster.forward(step_xs, **weights)
        assert [cluster.epoch(r) for r in range(world_size)] == [expected_epoch] * world_size
        for r in range(world_size):
            assert same_bits(ys[r], step_expected[r]), f"epoch {expected_epoch}, rank {r}"


def test_epoch_of_fresh_cluster_and_after_calls():
    cluster = SimulatedCluster(H, I, 4, 1, world_size=2, max_tokens=4)
    assert [cluster.epoch(r) for r in range(2)] == [0, 0]  # 0: never run
    xs, weights = build(90, [4, 3], experts=4, top_k=1)
    cluster.forward(xs, **weights, repeats=7)
    assert [cluster.epoch(r) for r in range(2)] == [7, 7]


# --------------------------------------------------------------------------- faults never hang

FLAG = re.compile(r"(dispatch|return) flag \((source|owner) (\d+), local expert (\d+)\)")


def _fault_cluster(fault, world_size, experts, top_k, max_tokens, threads=1):
    return SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=max_tokens,
                            with_router_bias=True, fault=fault, watchdog_seconds=1, threads_per_rank=threads)


def _failing_call(cluster, xs, weights):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        cluster.forward(xs, **weights)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"the failing call took {elapsed:.1f} s with a 1 s watchdog"
    return str(info.value)


def _assert_refuses_then_fresh_works(cluster, xs, weights, world_size, experts, top_k):
    with pytest.raises(RuntimeError, match="failed earlier"):
        cluster.forward(xs, **weights)
    fresh = SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=max(x.shape[0] for x in xs),
                             with_router_bias=True)
    ys = fresh.forward(xs, **weights)
    expected = _natives(xs, weights, top_k=top_k)
    assert all(same_bits(ys[r], expected[r]) for r in range(world_size))


@pytest.mark.parametrize("world_size,threads", [(1, 1), (2, 1), (2, 2)])
def test_skip_empty_dispatch_signal_is_caught(world_size, threads):
    experts, top_k = 4, 2
    local = experts // world_size
    counts = [24] * world_size
    xs, weights = build(101, counts, experts=experts, top_k=top_k, router_bias=True)
    cluster = _fault_cluster("skip_empty_dispatch_signal", world_size, experts, top_k, 24, threads)
    # Every cell gets rows: the fault has nothing to skip and the call succeeds.
    ys, routings = cluster.forward(xs, **weights, return_routing=True)
    assert all(bool((routing.expert_counts > 0).all()) for routing in routings)
    expected = _natives(xs, weights, top_k=top_k)
    assert all(same_bits(ys[r], expected[r]) for r in range(world_size))
    # Experts 1 and 3 get no rows: their empty cells are not signalled, on every rank.
    empty = {1, 3}
    starved = _skew(_skew(weights, 1, -30.0), 3, -30.0)
    message = _failing_call(cluster, xs, starved)
    assert "watchdog" in message and "dispatch flag" in message, message
    rank = int(re.search(r"rank (\d+)", message).group(1))
    flags = [m for m in FLAG.finditer(message) if m.group(1) == "dispatch"]
    assert flags, message
    for flag in flags:  # every flag it names as missing is one of the starved experts' cells
        assert rank * local + int(flag.group(4)) in empty, message
        assert int(flag.group(3)) < world_size
    _assert_refuses_then_fresh_works(cluster, xs, weights, world_size, experts, top_k)


@pytest.mark.parametrize("world_size,threads", [(1, 2), (2, 1), (2, 2)])
def test_long_honest_phase_does_not_fire_the_watchdog(world_size, threads, watchdog):
    """Issue 16: the watchdog measured time, not progress, so 76 s of honest top-k on one member
    read as a hang. Rank 0's first member now works in its gate for 3 watchdog timeouts (3 s),
    beating as it goes, while its team and the other ranks wait on it: no error, same bits."""
    experts, top_k, counts = 4, 2, [9, 14][:world_size]
    xs, weights = build(111, counts, experts=experts, top_k=top_k, router_bias=True)
    cluster = SimulatedCluster(H, I, experts, top_k, world_size=world_size, max_tokens=14, with_router_bias=True,
                               fault="slow_gate", watchdog_seconds=1.0, threads_per_rank=threads)
    start = time.perf_counter()
    ys = cluster.forward(xs, **weights)
    assert time.perf_counter() - start >= 3.0  # the phase really outlasted the timeout
    expected = _natives(xs, weights, top_k=top_k)
    assert all(same_bits(ys[r], expected[r]) for r in range(world_size))


@pytest.mark.parametrize("world_size,threads,role,wait", [
    (1, 2, "role team", "its team at the barrier after gate"),  # the team waits for it
    (2, 1, "role processor", "dispatch flag (source 0"),        # the other rank waits for its flags
    (1, 1, "role gate", "stuck_gate"),                          # alone: it watches itself
])
def test_planted_hang_fires_naming_rank_role_and_wait(world_size, threads, role, wait, watchdog):
    experts, top_k, counts = 4, 2, [9, 14][:world_size]
    xs, weights = build(112, counts, experts=experts, top_k=top_k, router_bias=True)
    cluster = _fault_cluster("stuck_gate", world_size, experts, top_k, 14, threads)
    message = _failing_call(cluster, xs, weights)
    assert "watchdog" in message and "no progress for 1 s" in message, message
    assert role in message and wait in message, message
    assert re.search(r"rank \d+ \(member \d+", message), message


@pytest.mark.parametrize("world_size,threads", [(1, 1), (2, 1), (4, 2)])
def test_stale_epoch_is_caught(world_size, threads):
    """The last expert's dispatch flag carries the previous epoch: its owner (the last rank)
    waits for it; every other rank waits for that owner's return flag."""
    experts, top_k = 2 * world_size, 2
    local = experts // world_size
    xs, weights = build(103, [9] * world_size, experts=experts, top_k=top_k, router_bias=True)
    cluster = _fault_cluster("stale_epoch", world_size, experts, top_k, 9, threads)
    message = _failing_call(cluster, xs, weights)
    assert "watchdog" in message, message
    rank = int(re.search(r"rank (\d+)", message).group(1))
    flags = list(FLAG.finditer(message))
    assert flags, message
    first = flags[0]
    if rank == world_size - 1:  # the owner of the stale cell names it first
        assert first.group(1) == "dispatch" and int(first.group(4)) == local - 1, message
        held = int(re.search(r"local expert \d+\) holding epoch (\d+)", message[first.start():]).group(1))
        assert held != 1 and held in (0, 65535), message  # the call's epoch is 1; the word is stale
    else:
        assert first.group(1) == "return", message
        assert (int(first.group(3)), int(first.group(4))) == (world_size - 1, local - 1), message
    if world_size == 1:
        assert "rank 0" in message and "dispatch flag (source 0, local expert 1)" in message, message
    _assert_refuses_then_fresh_works(cluster, xs, weights, world_size, experts, top_k)


# --------------------------------------------------------------------------- bad input

def _cluster_kwargs(**overrides):
    kwargs = dict(hidden_size=H, ffn_size=I, num_experts=8, top_k=2, world_size=4, max_tokens=8)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("overrides,error,name", [
    (dict(num_experts=6), ValueError, "num_experts"),
    (dict(world_size=0), ValueError, "world_size"),
    (dict(world_size=-2), ValueError, "world_size"),
    (dict(world_size=2.0), TypeError, "world_size"),
    (dict(world_size=True), TypeError, "world_size"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(threads_per_rank=0), ValueError, "threads_per_rank"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(hidden_size=0), ValueError, "hidden"),
    (dict(ffn_size=0), ValueError, "ffn"),
    (dict(fault="bogus"), ValueError, "fault"),
    (dict(chaos_seed=-1), ValueError, "chaos_seed"),
    (dict(watchdog_seconds=0), ValueError, "watchdog_seconds"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(scoring="argmax"), ValueError, "scoring"),
])
def test_cluster_rejects_bad_construction(overrides, error, name):
    with pytest.raises(error, match=name):
        SimulatedCluster(**_cluster_kwargs(**overrides))


def test_forward_rejects_bad_input_and_stays_usable():
    xs, weights = build(111, [8, 3, 0, 5], experts=8, top_k=2)
    cluster = SimulatedCluster(**_cluster_kwargs())
    with pytest.raises(ValueError, match="xs"):
        cluster.forward(xs[:3], **weights)
    with pytest.raises(ValueError, match="xs"):
        cluster.forward(xs + [xs[0]], **weights)
    too_many = make_problem(112, tokens=9, hidden=H, ffn=I, experts=8)["x"]
    with pytest.raises(ValueError, match="max_tokens"):
        cluster.forward([xs[0], too_many, xs[2], xs[3]], **weights)
    with pytest.raises(TypeError, match="x"):  # a rank's x in another dtype than the weights
        cluster.forward([xs[0], xs[1].double(), xs[2], xs[3]], **weights)
    with pytest.raises(TypeError, match=r"xs\[0\]"):  # all float64, but the cluster is float32
        cluster.forward([x.double() for x in xs], **{n: t.double() for n, t in weights.items()})
    with pytest.raises(ValueError, match="repeats"):
        cluster.forward(xs, **weights, repeats=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        cluster.forward(xs, **weights, capacity_factor=float("inf"))
    with pytest.raises((ValueError, TypeError), match="router_bias"):  # the cluster was built without one
        cluster.forward(xs, **weights, router_bias=torch.randn(8))
    with pytest.raises(ValueError, match="x"):
        cluster.forward([xs[0][0], xs[1], xs[2], xs[3]], **weights)  # 1-D
    # Nothing ran: the cluster is still at epoch 0 and works.
    assert [cluster.epoch(r) for r in range(4)] == [0] * 4
    ys = cluster.forward(xs, **weights)
    expected = _natives(xs, weights, top_k=2)
    assert all(same_bits(ys[r], expected[r]) for r in range(4))


@pytest.mark.parametrize("mismatch", ["hidden", "ffn", "experts"])
def test_forward_rejects_weights_of_another_shape_than_the_cluster(mismatch):
    """The cluster's heaps and the C++ loops are sized from the constructor's shape; weights of a
    larger shape must be refused, not silently computed on the cluster's (smaller) shape."""
    shape = dict(hidden=H, ffn=I, experts=8)
    shape[mismatch] = {"hidden": 64, "ffn": 72, "experts": 16}[mismatch]
    xs, weights = build(113, [6, 4], experts=shape["experts"], top_k=2, hidden=shape["hidden"], ffn=shape["ffn"])
    cluster = SimulatedCluster(H, I, 8, 2, world_size=2, max_tokens=8)
    with pytest.raises(ValueError):
        cluster.forward(xs, **weights)


def test_forward_rejects_weights_smaller_than_the_cluster_in_a_subprocess():
    """Weights and x of a smaller H than the cluster's: without a check the runtime reads x and
    writes y past their ends (heap overflow). Run in a subprocess so a crash cannot take pytest down."""
    script = textwrap.dedent(f"""
        import torch
        from flashmoe.testing import SimulatedCluster
        g = torch.Generator().manual_seed(0)
        H, I, E = 16, 24, 4
        x = torch.randn(4, H, generator=g)
        rw, w1, w2 = torch.randn(E, H, generator=g), torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
        cluster = SimulatedCluster(4096, I, E, 2, world_size=2, max_tokens=4)
        try:
            cluster.forward([x, x], rw, w1, w2)
        except ValueError as error:
            print("ValueError:", error)
        else:
            print("no error")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ValueError" in result.stdout, (result.returncode, result.stdout,
                                                                       result.stderr[-2000:])


@pytest.mark.parametrize("call,error,name", [
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=2, world_size=3), ValueError, "world_size"),
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=2, world_size=0), ValueError, "world_size"),
    (lambda xs, w: simulate_expert_parallel(xs[:1], **w, top_k=2, world_size=2), ValueError, "xs"),
    (lambda xs, w: simulate_expert_parallel([], **w, top_k=2, world_size=2), TypeError, "xs"),
    (lambda xs, w: simulate_expert_parallel(xs[0], **w, top_k=2, world_size=2), TypeError, "xs"),
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=9, world_size=2), ValueError, "top_k"),
    (lambda xs, w: simulate_expert_parallel([x.half() for x in xs], **w, top_k=2, world_size=2), TypeError, "dtype"),
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=2, world_size=2, threads_per_rank=0), ValueError,
     "threads_per_rank"),
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=2, world_size=2, chaos_seed=-3), ValueError,
     "chaos_seed"),
    (lambda xs, w: simulate_expert_parallel(xs, **w, top_k=2, world_size=2, capacity_factor=0.0), ValueError,
     "capacity_factor"),
], ids=["E-not-divisible", "world-0", "xs-short", "xs-empty", "xs-tensor", "k-gt-E", "x-dtype", "threads-0",
        "chaos-negative", "capacity-0"])
def test_simulate_rejects_bad_input(call, error, name):
    xs, weights = build(117, [5, 3], experts=8, top_k=2)
    with pytest.raises(error, match=name):
        call(xs, weights)
