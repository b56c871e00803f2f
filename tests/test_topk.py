"""The gate's top-k (csrc/core/routing.h): O(E·log k), and bit-identical to the O(E·k²) selection it
replaced (issue 16), kept here as the oracle: ties to the lower expert index, NaN above every number."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashmoe
from flashmoe import _C


def _outranks(a: float, b: float) -> bool:
    return b == b if a != a else a > b


def _old_select_top_k(scores: list[float], top_k: int) -> list[int]:
    """The replaced selection, verbatim: k scans, each keeping the first best not yet taken."""
    ids: list[int] = []
    for _ in range(top_k):
        best = -1
        for expert, score in enumerate(scores):
            if expert in ids:
                continue
            if best < 0 or _outranks(score, scores[best]):
                best = expert
        ids.append(best)
    return ids


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


# Few distinct values, so most scores tie; NaN, ±inf, ±0 and a denormal among them.
TIE_VALUES = [0.25, 0.5, 0.125, 0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.0]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data(), experts=st.integers(1, 40), fp64=st.booleans(), normalize=st.booleans())
def test_picks_are_bit_identical_to_the_replaced_selection(data, experts, fp64, normalize):
    scores = data.draw(st.lists(st.sampled_from(TIE_VALUES), min_size=experts, max_size=experts))
    if not fp64:
        scores = [_fp32(s) for s in scores]
    top_k = data.draw(st.integers(1, experts))
    ids, weights = _C.select_top_k(scores, top_k, normalize, fp64)
    assert ids == _old_select_top_k(scores, top_k)
    if not normalize:
        for weight, expert in zip(weights, ids):
            assert weight == scores[expert] or (math.isnan(weight) and math.isnan(scores[expert]))


@pytest.mark.parametrize("experts,top_k", [(64, 64), (300, 7), (257, 256), (33, 1)])
def test_random_ties_at_larger_sizes(experts, top_k):
    rng = random.Random(experts * 1000 + top_k)
    for _ in range(5):
        scores = [_fp32(rng.choice(TIE_VALUES[:6]) * rng.choice([1, 1, 2])) for _ in range(experts)]
        ids, _ = _C.select_top_k(scores, top_k, True, False)
        assert ids == _old_select_top_k(scores, top_k)


def test_k_equal_e_4096_on_4_tokens_is_fast_and_correct():
    """Issue 16, defect 2: the native op took 76 s here (and a false watchdog error on 2 threads)."""
    generator = torch.Generator().manual_seed(16)
    x, router_weight = torch.randn(4, 1, generator=generator), torch.randn(4096, 1, generator=generator)
    w1, w2 = torch.randn(4096, 2, 1, generator=generator), torch.randn(4096, 1, 1, generator=generator)
    _, routing = flashmoe.moe(x, router_weight, w1, w2, top_k=4096, normalize=False, backend="native",
                              return_routing=True)
    # Every expert once, in pick order: weights (here the scores themselves) never rise, ties ascend.
    for ids, weights in zip(routing.topk_ids.tolist(), routing.topk_weights.tolist()):
        assert sorted(ids) == list(range(4096))
        for (id_a, w_a), (id_b, w_b) in zip(zip(ids, weights), zip(ids[1:], weights[1:])):
            assert w_a > w_b or (w_a == w_b and id_a < id_b)
    y = flashmoe.moe(x, router_weight, w1, w2, top_k=4096, backend="native")
    y_ref = flashmoe.reference.moe(x.double(), router_weight.double(), w1.double(), w2.double(), top_k=4096)
    assert (y.double() - y_ref).norm() <= 1e-5 * y_ref.norm()
