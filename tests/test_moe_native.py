"""The native CPU backend's own promises: bit-reproducible results (runs, thread counts,
processor counts, batch composition), every output element written, NaN/inf inputs that propagate
without hanging or crashing, and a large token count."""

import resource

import pytest
import torch

from conftest import (DTYPES, TOLERANCE, assert_routing_matches, call_native_raw, check_nan_token_stays_in_its_row,
                      dtype_id, empty_outputs, make_problem, rel_err, run_native, run_reference, same_bits)
from flashmoe import _C, reference

OUTPUT_NAMES = ("y", "topk_ids", "topk_weights", "expert_counts", "router_logits", "dropped")


def assert_same_outputs(a: dict, b: dict, what: str):
    for name in OUTPUT_NAMES:
        assert same_bits(a[name], b[name]), f"{name} differs between {what}"


def routing_dict(y, routing) -> dict:
    return dict(y=y, topk_ids=routing.topk_ids, topk_weights=routing.topk_weights,
                expert_counts=routing.expert_counts, router_logits=routing.router_logits, dropped=routing.dropped)


CONFIGS = [
    # (tokens, hidden, ffn, experts, top_k, options)
    (257, 130, 300, 8, 2, dict()),
    (200, 67, 45, 64, 4, dict(capacity_factor=0.8)),
    (3, 530, 600, 4, 2, dict(gated=False, activation="gelu")),
    (100, 67, 45, 8, 8, dict(scoring="sigmoid", normalize=False)),
]


def _config_id(config):
    tokens, hidden, ffn, experts, top_k, options = config
    return f"T{tokens}-H{hidden}-I{ffn}-E{experts}-k{top_k}" + "".join(f"-{v}" for v in options.values())


def _problem(config, dtype, seed=0):
    tokens, hidden, ffn, experts, top_k, options = config
    return make_problem(seed, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, dtype=dtype,
                        gated=options.get("gated", True), router_bias=True, expert_bias=True)


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_repeated_runs_identical(config, dtype):
    problem = _problem(config, dtype)
    top_k, options = config[4], config[5]
    first = routing_dict(*run_native(problem, top_k=top_k, **options))
    for _ in range(2):
        assert_same_outputs(first, routing_dict(*run_native(problem, top_k=top_k, **options)), "runs")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_thread_count_invariant(config, dtype, num_threads):
    problem = _problem(config, dtype, seed=1)
    top_k, options = config[4], config[5]
    torch.set_num_threads(1)
    one = routing_dict(*run_native(problem, top_k=top_k, **options))
    torch.set_num_threads(2)
    two = routing_dict(*run_native(problem, top_k=top_k, **options))
    assert_same_outputs(one, two, "torch.set_num_threads(1) and (2)")
    for threads in (3, 7):
        raw = call_native_raw(problem, top_k=top_k, num_threads=threads, **options)
        assert_same_outputs(one, raw, f"1 thread and {threads} threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_processor_counts_identical(config, dtype):
    """Processors pick tasks in whatever order they race to; the bits must not care."""
    problem = _problem(config, dtype, seed=2)
    top_k, options = config[4], config[5]
    runs = {threads: call_native_raw(problem, top_k=top_k, num_threads=threads, **options) for threads in (1, 2, 5)}
    for threads, outputs in runs.items():
        assert_same_outputs(runs[1], outputs, f"1 and {threads} processors")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_batch_invariance(gated, dtype):
    """A token's output bits do not depend on which other tokens share the batch (dropless)."""
    tokens = 300
    problem = make_problem(3, tokens=tokens, hidden=130, ffn=300, experts=8, dtype=dtype, gated=gated,
                           router_bias=True, expert_bias=True)
    full_y, full_routing = run_native(problem, top_k=2, gated=gated)
    generator = torch.Generator().manual_seed(4)
    subsets = [torch.arange(37, 90), torch.tensor([5]), torch.randperm(tokens, generator=generator)[:77],
               torch.arange(tokens).flip(0)]
    for subset in subsets:
        sub_problem = dict(problem, x=problem["x"][subset].contiguous())
        y, routing = run_native(sub_problem, top_k=2, gated=gated)
        assert same_bits(y, full_y[subset]), f"y of tokens {subset[:5].tolist()}... depends on the batch"
        assert same_bits(routing.topk_ids, full_routing.topk_ids[subset])
        assert same_bits(routing.topk_weights, full_routing.topk_weights[subset])
        assert same_bits(routing.router_logits, full_routing.router_logits[subset])


# --------------------------------------------------------------------------- every output written

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 0.5))
@pytest.mark.parametrize("threads", (1, 2))
def test_poisoned_outputs_fully_written(threads, capacity_factor, dtype):
    tokens, experts, top_k = 77, 8, 2
    problem = make_problem(5, tokens=tokens, hidden=67, ffn=300, experts=experts, dtype=dtype, router_bias=True,
                           expert_bias=True, top_k=top_k)
    outputs = empty_outputs(problem, top_k, poison=True)
    call_native_raw(problem, top_k=top_k, capacity_factor=capacity_factor, num_threads=threads,
                    outputs=outputs)
    for name in ("y", "topk_weights", "router_logits"):
        assert not outputs[name].isnan().any(), f"{name} has unwritten (NaN) elements"
    for name in ("topk_ids", "expert_counts", "dropped"):
        assert not (outputs[name] == -7).any(), f"{name} has unwritten (sentinel) elements"

    ref_y, ref_routing = run_reference(problem, top_k=top_k, capacity_factor=capacity_factor)
    routing = reference.Routing(outputs["topk_ids"], outputs["topk_weights"], outputs["expert_counts"],
                                outputs["dropped"], outputs["router_logits"])
    assert_routing_matches(routing, ref_routing, problem, top_k=top_k, capacity_factor=capacity_factor)
    assert rel_err(outputs["y"], ref_y) <= TOLERANCE[dtype]
    if capacity_factor is not None:
        assert int(outputs["dropped"]) > 0


def test_poisoned_outputs_zero_tokens():
    problem = make_problem(6, tokens=0, hidden=67, ffn=45, experts=4)
    outputs = empty_outputs(problem, 2, poison=True)
    call_native_raw(problem, top_k=2, capacity_factor=1.0, outputs=outputs)
    assert outputs["expert_counts"].tolist() == [0, 0, 0, 0]
    assert int(outputs["dropped"]) == 0


# --------------------------------------------------------------------------- NaN and inf inputs

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", reference.ELEMENTWISE_ACTIVATIONS)
@pytest.mark.parametrize("gated", (True, False), ids=("gated", "plain"))
def test_nan_token_stays_in_its_row(gated, activation, dtype, watchdog):
    check_nan_token_stays_in_its_row(run_native, gated=gated, activation=activation, dtype=dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
def test_nan_in_expert_weight(capacity_factor, dtype, watchdog):
    problem = make_problem(8, tokens=100, hidden=67, ffn=45, experts=8, dtype=dtype, top_k=2)
    w1 = problem["w1"].clone()
    w1[3, 7, 2] = float("nan")
    problem["w1"] = w1
    y, routing = run_native(problem, top_k=2, capacity_factor=capacity_factor)
    capacity = reference.expert_capacity(capacity_factor, 100, 2, 8)
    admitted = reference.admit(routing.topk_ids, 8, capacity)
    uses_expert_3 = ((routing.topk_ids == 3) & admitted).any(dim=1)
    assert uses_expert_3.any()
    assert y[uses_expert_3].isnan().any(dim=1).all()
    assert torch.isfinite(y[~uses_expert_3]).all(), "NaN in expert 3 leaked into tokens that did not use it"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=dtype_id)
@pytest.mark.parametrize("capacity_factor", (None, 1.0))
@pytest.mark.parametrize("scoring", ("softmax", "sigmoid"))
def test_nan_in_router_weight(scoring, capacity_factor, dtype, watchdog):
    """A NaN router weight makes expert 2's logit NaN for every token. The reference (torch.sort)
    ranks a NaN score first, so every token picks expert 2 with a NaN weight and its y is NaN
    (unless capacity drops all of its picks, which makes y exactly 0)."""
    tokens, experts, top_k = 70, 8, 3
    problem = make_problem(9, tokens=tokens, hidden=67, ffn=45, experts=experts, dtype=dtype)
    router_weight = problem["router_weight"].clone()
    router_weight[2, 5] = float("nan")
    problem["router_weight"] = router_weight
    options = dict(top_k=top_k, scoring=scoring, capacity_factor=capacity_factor)
    y, routing = run_native(problem, **options)
    ids = routing.topk_ids.long()
    assert ((ids >= 0) & (ids < experts)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "NaN scores produced a duplicate pick"
    assert int(routing.expert_counts.sum()) == tokens * top_k
    ref_y, ref_routing = run_reference(problem, **options)
    assert int(routing.dropped) == int(ref_routing.dropped)
    assert torch.equal(y.isnan().any(dim=1), ref_y.isnan().any(dim=1)), (
        f"NaN propagates to {int(y.isnan().any(dim=1).sum())} tokens, the reference to "
        f"{int(ref_y.isnan().any(dim=1).sum())}")
    finite = ~ref_y.isnan().any(dim=1)
    assert torch.equal(y[finite], torch.zeros_like(y[finite]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=dtype_id)
@pytest.mark.parametrize("value", (float("inf"), float("-inf")), ids=("inf", "-inf"))
def test_inf_token(value, dtype, watchdog):
    tokens, bad = 64, 9
    problem = make_problem(10, tokens=tokens, hidden=67, ffn=45, experts=8, dtype=dtype, top_k=2)
    x = problem["x"].clone()
    x[bad, 0] = value
    problem["x"] = x
    y, routing = run_native(problem, top_k=2)
    assert not torch.isfinite(y[bad]).all()
    others = torch.arange(tokens) != bad
    ref_y = run_reference(dict(problem, x=x[others].contiguous()), top_k=2)[0]
    assert rel_err(y[others], ref_y) <= TOLERANCE[dtype]
    ids = routing.topk_ids.long()
    assert ((ids >= 0) & (ids < 8)).all()


def test_all_nan_input_with_capacity(watchdog):
    problem = make_problem(11, tokens=257, hidden=67, ffn=45, experts=8, router_bias=True, expert_bias=True)
    problem["x"] = torch.full_like(problem["x"], float("nan"))
    y, routing = run_native(problem, top_k=2, capacity_factor=0.5)
    assert int(routing.expert_counts.sum()) == 257 * 2
    capacity = reference.expert_capacity(0.5, 257, 2, 8)
    assert int(routing.dropped) == int((routing.expert_counts.long() - capacity).clamp_min(0).sum())
    assert y.isnan().any()


# --------------------------------------------------------------------------- large

@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_large_token_count(dtype, watchdog):
    tokens, hidden, ffn, experts, top_k = 16384, 64, 96, 16, 2
    problem = make_problem(12, tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, dtype=dtype, top_k=top_k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    y, routing = run_native(problem, top_k=top_k, capacity_factor=1.25)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # Inputs+outputs are ~10 MiB; the expert-sorted buffers add a few times x. 256 MiB is a leak.
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
    ref_y, ref_routing = run_reference(problem, top_k=top_k, capacity_factor=1.25)
    assert_routing_matches(routing, ref_routing, problem, top_k=top_k, capacity_factor=1.25)
    assert rel_err(y, ref_y) <= TOLERANCE[dtype]
    assert torch.isfinite(y).all()
