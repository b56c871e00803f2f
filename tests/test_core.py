"""csrc/core arithmetic, exercised through flashmoe._C against the Python specification."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe import _C, reference


@settings(max_examples=500, deadline=None)
@given(
    capacity_factor=st.floats(min_value=1e-6, max_value=1e308, allow_nan=False, allow_infinity=False),
    tokens=st.integers(0, 1 << 20),
    top_k=st.integers(1, 16),
    experts=st.integers(1, 512),
)
def test_expert_capacity_matches_reference(capacity_factor, tokens, top_k, experts):
    native = _C.expert_capacity(capacity_factor, tokens, top_k, experts)
    assert native == reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    assert 0 <= native <= tokens


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 2.2]), st.integers(1, 4096), st.sampled_from([1, 2, 3, 8]),
       st.sampled_from([3, 7, 8, 64]))
def test_expert_capacity_is_left_to_right_ceil(capacity_factor, tokens, top_k, experts):
    expected = min(math.ceil(capacity_factor * tokens * top_k / experts), tokens)
    assert _C.expert_capacity(capacity_factor, tokens, top_k, experts) == expected
