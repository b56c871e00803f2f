"""Checked size arithmetic (csrc/core/checked.h): an impossible size is a ValueError naming the
argument, raised before anything is allocated or written. Issue 16, defect 1: a heap for
max_tokens = 2^62 + 1 once overflowed int64 to 2304 bytes and the first call wrote past it."""

from __future__ import annotations

import pytest
import torch

from flashmoe import _C
from flashmoe.testing import SimulatedCluster


def test_defect_1_heap_of_2_pow_62_tokens_is_refused_by_name():
    with pytest.raises(ValueError, match="max_tokens"):
        SimulatedCluster(64, 8, 4, 4, world_size=1, max_tokens=2**62 + 1)


@pytest.mark.parametrize("overrides,name", [
    (dict(max_tokens=2**40), "max_tokens"),            # rows past what a SignalWord addresses
    (dict(max_tokens=2**62 + 1), "max_tokens"),        # rows overflow int64
    (dict(hidden_size=2**61), "hidden"),               # one row's bytes overflow
    (dict(hidden_size=2**40, max_tokens=2**20), "hidden"),  # a region's bytes overflow
    (dict(ffn_size=2**61), "ffn"),                     # w1 and the intermediate buffers overflow
    (dict(ffn_size=2**58, hidden_size=1), "ffn"),
])
def test_cluster_sizes_that_overflow_name_their_argument(overrides, name):
    args = dict(hidden_size=64, ffn_size=8, num_experts=4, top_k=2, world_size=2, max_tokens=100)
    args.update(overrides)
    sizes = [args.pop(key) for key in ("hidden_size", "ffn_size", "num_experts", "top_k")]
    with pytest.raises(ValueError, match=name):
        SimulatedCluster(*sizes, **args)


def test_a_cluster_at_the_largest_addressable_heap_still_builds_and_runs():
    rows = _C.SignalWord.max_rows  # 2^24 - 1 rows per region: the largest heap a SignalWord addresses
    cluster = SimulatedCluster(1, 1, 1, 1, world_size=1, max_tokens=rows, dtype=torch.float32)
    assert cluster.heap_bytes >= rows * 4
    generator = torch.Generator().manual_seed(16)
    x = torch.randn(3, 1, generator=generator)
    weights = [torch.randn(1, 1, generator=generator), torch.randn(1, 2, 1, generator=generator),
               torch.randn(1, 1, 1, generator=generator)]
    (y,) = cluster.forward([x], *weights)
    assert torch.isfinite(y).all()


def test_protocol_structs_refuse_impossible_sizes():
    placement = _C.ExpertPlacement(2, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        _C.HeapLayout(placement, 2**62, 2, 8, 4)
    with pytest.raises(ValueError, match="hidden"):
        _C.HeapLayout(placement, 10, 2, 2**62, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        _C.TaskBound(placement, 2**62, 2**20, 8)
    with pytest.raises(ValueError, match="max_tokens"):
        _C.TaskBound(placement, 2**40, 2**40, 8)


@pytest.mark.parametrize("field,value,words", [
    ("tokens", 2**62, "tokens * top_k"),
    ("tokens", 2**31, "tokens * top_k"),
    ("ffn", 2**62, "ffn"),
    ("hidden", 2**61, "hidden"),
])
def test_problem_validate_checks_products_without_overflow(field, value, words):
    problem = _C.Problem()
    problem.tokens, problem.hidden, problem.ffn, problem.experts, problem.top_k = 4, 8, 8, 4, 2
    setattr(problem, field, value)
    message = problem.validate()
    assert message is not None and words in message, message


def test_a_cluster_of_millions_of_threads_is_refused_by_name():
    with pytest.raises(ValueError, match="threads_per_rank"):
        SimulatedCluster(8, 4, 4, 2, world_size=4, max_tokens=4, threads_per_rank=2**20)
