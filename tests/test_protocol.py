"""The csrc/core protocol arithmetic, on the host through flashmoe._C.

SignalWord, ExpertPlacement, HeapLayout, Task, TaskBound and assign_slots are the one definition
the CPU runtime and the GPU kernel share; each is checked here against an independent Python
statement of what it must be (docs/protocol.md).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flashmoe import _C, ops, reference

FIELD = (1 << 24) - 1
EPOCHS = 65535


# --------------------------------------------------------------------------- SignalWord

def test_signal_word_constants():
    assert _C.SignalWord.max_rows == FIELD
    assert _C.SignalWord.epochs == EPOCHS


@settings(max_examples=400, deadline=None)
@given(epoch=st.integers(0, EPOCHS), rows=st.integers(0, FIELD), first_row=st.integers(0, FIELD))
def test_signal_word_round_trip(epoch, rows, first_row):
    word = _C.SignalWord.make(epoch, rows, first_row)
    assert (word.epoch, word.rows, word.first_row) == (epoch, rows, first_row)
    assert word.bits == (epoch << 48) | (rows << 24) | first_row
    assert 0 <= word.bits < 1 << 64


@pytest.mark.parametrize("epoch,rows,first_row", [
    (0, 0, 0), (EPOCHS, FIELD, FIELD), (1, FIELD, 0), (1, 0, FIELD), (EPOCHS, 0, 0), (0x8000, 0x800000, 0x800001),
])
def test_signal_word_field_edges(epoch, rows, first_row):
    word = _C.SignalWord.make(epoch, rows, first_row)
    assert (word.epoch, word.rows, word.first_row) == (epoch, rows, first_row)
    # Fields never bleed into each other: each is recovered with the others at their extremes.
    for other in (_C.SignalWord.make(epoch, FIELD - rows, first_row), _C.SignalWord.make(epoch, rows, FIELD - first_row)):
        assert other.epoch == epoch


def test_next_epoch_cycles_1_to_65535_and_never_0():
    assert _C.SignalWord.next_epoch(0) == 1  # the first call after "never written"
    epoch, seen = 1, []
    for _ in range(EPOCHS):
        seen.append(epoch)
        following = _C.SignalWord.next_epoch(epoch)
        assert following != 0 and following != epoch
        assert following == (epoch + 1 if epoch < EPOCHS else 1)
        epoch = following
    assert epoch == 1, "after 65535 steps the cycle is back at 1"
    assert sorted(seen) == list(range(1, EPOCHS + 1)), "every epoch 1..65535 exactly once per cycle"


def test_previous_epoch_inverts_next_epoch():
    previous = getattr(_C.SignalWord, "previous_epoch", None)
    if previous is None:
        pytest.skip("SignalWord.previous_epoch is not bound in _C")
    for epoch in list(range(1, 200)) + list(range(EPOCHS - 200, EPOCHS + 1)):
        assert previous(_C.SignalWord.next_epoch(epoch)) == epoch
        assert _C.SignalWord.next_epoch(previous(epoch)) == epoch
        assert previous(epoch) != 0


def test_stale_word_never_matches_current_epoch_across_the_wrap():
    """A flag holds the previous epoch (or 0) while the reader waits for the current one."""
    epoch, stale = 0, 0
    for _ in range(EPOCHS + 3):
        epoch = _C.SignalWord.next_epoch(epoch)
        assert _C.SignalWord.make(stale, 5, 7).epoch != epoch
        stale = epoch


# --------------------------------------------------------------------------- ExpertPlacement

@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 16), local=st.integers(1, 16), top_k=st.integers(1, 32))
def test_expert_placement_is_a_bijection(world, local, top_k):
    experts = world * local
    placement = _C.ExpertPlacement(world, experts)
    assert placement.local_experts() == local
    for e in range(experts):
        owner, index = placement.owner(e), placement.local_index(e)
        assert owner == e // local and index == e % local  # contiguous blocks
        assert 0 <= owner < world and 0 <= index < local
        assert placement.global_expert(owner, index) == e
    pairs = {(placement.owner(placement.global_expert(r, l)), placement.local_index(placement.global_expert(r, l)))
             for r in range(world) for l in range(local)}
    assert pairs == {(r, l) for r in range(world) for l in range(local)}
    assert placement.max_picks_per_owner(top_k) == min(top_k, local)


@pytest.mark.parametrize("world,experts,match", [
    (0, 4, "world_size"), (-1, 4, "world_size"), (2, 3, "divisible"), (3, 8, "divisible"), (1, 0, "experts"),
    (2, -2, "experts"),
])
def test_expert_placement_validation(world, experts, match):
    with pytest.raises(ValueError, match=match):
        _C.ExpertPlacement(world, experts)


# --------------------------------------------------------------------------- HeapLayout

def _layout_cells(layout, world, local, region_rows):
    """(start, end, name) of every cell of one rank's heap."""
    cells = []
    for peer in range(world):
        for l in range(local):
            start = layout.dispatch_flag(peer, l)
            cells.append((start, start + 8, ("dispatch_flag", peer, l)))
            start = layout.return_flag(peer, l)
            cells.append((start, start + 8, ("return_flag", peer, l)))
    row_bytes = layout.row_bytes()
    for peer in range(world):
        for row in range(region_rows):
            start = layout.dispatch_row(peer, row)
            cells.append((start, start + row_bytes, ("dispatch_row", peer, row)))
            start = layout.return_row(peer, row)
            cells.append((start, start + row_bytes, ("return_row", peer, row)))
    return cells


@settings(max_examples=120, deadline=None)
@example(world=8, local=4, max_tokens=300, top_k=8, hidden=1031, element_size=2)
@example(world=3, local=1, max_tokens=257, top_k=2, hidden=7, element_size=8)
@example(world=1, local=1, max_tokens=1, top_k=1, hidden=1, element_size=2)
@given(world=st.integers(1, 8), local=st.integers(1, 6), max_tokens=st.integers(1, 70), top_k=st.integers(1, 48),
       hidden=st.integers(1, 1100), element_size=st.sampled_from([2, 4, 8]))
def test_heap_layout_cells_are_disjoint_aligned_and_inside(world, local, max_tokens, top_k, hidden, element_size):
    experts = world * local
    top_k = min(top_k, experts)
    placement = _C.ExpertPlacement(world, experts)
    layout = _C.HeapLayout(placement, max_tokens, top_k, hidden, element_size)
    region_rows = layout.region_rows()
    assert region_rows == max_tokens * min(top_k, local)
    assert layout.row_bytes() == hidden * element_size
    alignment = _C.HeapLayout.alignment
    assert alignment == 128
    assert layout.flags_bytes() % alignment == 0 and layout.flags_bytes() >= world * local * 8
    assert layout.total_bytes() % alignment == 0
    for peer in range(world):
        assert layout.dispatch_row(peer, 0) % alignment == 0, "a dispatch region starts 128-aligned"
        assert layout.return_row(peer, 0) % alignment == 0, "a return region starts 128-aligned"
        for l in range(local):
            assert layout.dispatch_flag(peer, l) % 8 == 0 and layout.return_flag(peer, l) % 8 == 0
    assert layout.return_flag(0, 0) % alignment == 0, "the return flags start 128-aligned"

    cells = sorted(_layout_cells(layout, world, local, region_rows))
    assert cells[0][0] >= 0
    assert cells[-1][1] <= layout.total_bytes()
    for (start, end, name), (next_start, _, next_name) in zip(cells, cells[1:]):
        assert end <= next_start, f"{name} [{start}, {end}) overlaps {next_name} at {next_start}"
    for start, end, name in cells:
        assert start % (8 if "flag" in name[0] else element_size) == 0, name


@settings(max_examples=150, deadline=None)
@given(world=st.integers(1, 4), local=st.integers(1, 4), tokens=st.integers(0, 40), top_k=st.integers(1, 16),
       data=st.data())
def test_region_rows_bounds_what_one_source_sends_one_owner(world, local, tokens, top_k, data):
    """Packed per-owner numbering of a real routing (distinct experts per token) never reaches
    past region_rows, and the cells of one owner tile [0, rows sent) without gaps."""
    experts = world * local
    top_k = min(top_k, experts)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    topk_ids = [e for _ in range(tokens) for e in rng.sample(range(experts), top_k)]
    counts, offsets, pick_row, row_token, dropped = _C.assign_slots(topk_ids, tokens, top_k, experts, -1)
    placement = _C.ExpertPlacement(world, experts)
    layout = _C.HeapLayout(placement, max(tokens, 1), top_k, 8, 4)
    for owner in range(world):
        first_expert = owner * local
        sent = offsets[first_expert + local] - offsets[first_expert]
        assert sent <= layout.region_rows()
        next_first_row = 0
        for e in range(first_expert, first_expert + local):
            first_row = offsets[e] - offsets[first_expert]
            assert first_row == next_first_row
            next_first_row = first_row + offsets[e + 1] - offsets[e]
            assert offsets[e + 1] - offsets[e] <= tokens, "a cell holds at most T_r rows (max_cell_rows)"
        assert next_first_row == sent


# --------------------------------------------------------------------------- Task

def test_task_is_128_bytes_and_128_aligned():
    assert _C.task_bytes == 128
    assert _C.task_alignment == 128


# --------------------------------------------------------------------------- TaskBound

def _cell_tasks(rows, ffn, hidden):
    """Independent statement of Tiling::cell_tasks (64-row tiles; 256 ffn and 512 hidden columns)."""
    return math.ceil(rows / 64) * (math.ceil(ffn / 256) + math.ceil(hidden / 512))


def test_tiling_constants():
    tiling = _C.Tiling()
    assert (tiling.row_tile, tiling.ffn_tile, tiling.hidden_tile, tiling.token_tile) == (64, 256, 512, 32)
    for rows in (0, 1, 63, 64, 65, 128, 129, 1000):
        assert tiling.row_tiles(rows) == math.ceil(rows / 64)
        for ffn, hidden in ((1, 1), (256, 512), (257, 513), (768, 2048), (14336, 4096)):
            assert tiling.cell_tasks(rows, ffn, hidden) == _cell_tasks(rows, ffn, hidden)


def test_combine_tasks():
    bound = _C.TaskBound(_C.ExpertPlacement(2, 4), 10, 8, 8)
    assert bound.combine_tasks(0) == 1, "a rank with no tokens still counts (and waits for) one combine"
    for tokens in (1, 31, 32, 33, 64, 65, 1000):
        assert bound.combine_tasks(tokens) == math.ceil(tokens / 32)


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 8), local=st.integers(1, 6), max_cell_rows=st.integers(1, 300),
       ffn=st.integers(1, 1500), hidden=st.integers(1, 3000), own_tokens=st.integers(0, 300), data=st.data())
def test_task_bound_terminates_exactly(world, local, max_cell_rows, ffn, hidden, own_tokens, data):
    placement = _C.ExpertPlacement(world, world * local)
    bound = _C.TaskBound(placement, max_cell_rows, ffn, hidden)
    cells = world * local
    rows = data.draw(st.lists(st.integers(0, max_cell_rows), min_size=cells, max_size=cells))
    order = data.draw(st.permutations(range(cells)))
    combine = bound.combine_tasks(own_tokens)
    assert combine == max(1, math.ceil(own_tokens / 32))
    for r in set(rows) | {0, max_cell_rows}:
        assert bound.cell_tasks(r) == _cell_tasks(r, ffn, hidden)
        assert bound.correction(r) == _cell_tasks(max_cell_rows, ffn, hidden) - _cell_tasks(r, ffn, hidden)
        assert bound.correction(r) >= 0
    assert bound.cell_tasks(0) == 0
    assert bound.correction(max_cell_rows) == 0

    exact = sum(bound.cell_tasks(r) for r in rows) + combine
    initial = bound.initial(own_tokens)
    assert initial == cells * _cell_tasks(max_cell_rows, ffn, hidden) + combine
    assert initial >= exact

    current, arrived_tasks = initial, 0
    for count, cell in enumerate(order):
        # While a cell is missing the bound stays above all that can have completed: the tasks of
        # arrived cells plus the combine (which in fact cannot run yet).
        assert current > arrived_tasks + combine, (count, cell)
        current -= bound.correction(rows[cell])
        arrived_tasks += bound.cell_tasks(rows[cell])
        assert current >= arrived_tasks + combine
    assert current == exact == arrived_tasks + combine


def test_task_bound_worst_case_is_every_cell_full():
    placement = _C.ExpertPlacement(4, 8)
    bound = _C.TaskBound(placement, 130, 300, 600)
    full = 8 * _cell_tasks(130, 300, 600)
    assert bound.initial(0) == full + 1
    assert bound.initial(65) == full + 3


# --------------------------------------------------------------------------- assign_slots

def _routed(topk_ids, top_k, experts, p):
    """Pick p goes to an expert: its id is in range and not a repeat of an earlier pick of its row."""
    row_start = p - p % top_k
    return 0 <= topk_ids[p] < experts and topk_ids[p] not in topk_ids[row_start:p]


def _brute_force_slots(topk_ids, tokens, top_k, experts, capacity):
    counts = [0] * experts
    for p, e in enumerate(topk_ids):
        if _routed(topk_ids, top_k, experts, p):
            counts[e] += 1
    admitted = [c if capacity == -1 else min(c, capacity) for c in counts]
    offsets = [0]
    for e in range(experts):
        offsets.append(offsets[-1] + admitted[e])
    seen = [0] * experts
    pick_row = [-1] * (tokens * top_k)
    row_token = [None] * offsets[-1]
    for t in range(tokens):
        for j in range(top_k):
            e = topk_ids[t * top_k + j]
            if not _routed(topk_ids, top_k, experts, t * top_k + j):
                continue
            slot = seen[e]
            seen[e] += 1
            if slot < admitted[e]:
                pick_row[t * top_k + j] = offsets[e] + slot
                row_token[offsets[e] + slot] = t
    dropped = sum(counts) - offsets[-1]
    return counts, offsets, pick_row, row_token, dropped


@st.composite
def _routings(draw):
    experts = draw(st.integers(1, 12))
    top_k = draw(st.integers(1, experts))
    tokens = draw(st.integers(0, 60))
    distinct = draw(st.booleans())
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    skew = draw(st.sampled_from([None, 0.5, 0.9]))  # bias toward expert 0 to force overflow
    ids = []
    for _ in range(tokens):
        if distinct:
            row = rng.sample(range(experts), top_k)
            if skew and rng.random() < skew and 0 not in row:
                row[0] = 0
        else:
            row = [0 if skew and rng.random() < skew else rng.randrange(experts) for _ in range(top_k)]
        ids.extend(row)
    capacity = draw(st.one_of(st.just(-1), st.just(0), st.integers(1, 4), st.integers(5, 100)))
    return ids, tokens, top_k, experts, capacity


@settings(max_examples=400, deadline=None)
@given(_routings())
def test_assign_slots_matches_brute_force(routing):
    ids, tokens, top_k, experts, capacity = routing
    got = _C.assign_slots(ids, tokens, top_k, experts, capacity)
    expected = _brute_force_slots(ids, tokens, top_k, experts, capacity)
    names = ("expert_counts", "expert_offsets", "pick_row", "row_token", "dropped")
    for name, value, want in zip(names, got, expected):
        assert (list(value) if isinstance(value, (list, tuple)) else value) == want, name
    # And against the Python specification's admission rule.
    if tokens:
        routed_ids = ops._routed_ids(torch.tensor(ids).view(tokens, top_k), experts)
        admitted = reference.admit(routed_ids, experts, None if capacity == -1 else capacity)
        assert admitted.reshape(-1).tolist() == [row >= 0 for row in got[2]]


@pytest.mark.parametrize("capacity", [-1, 0, 1, 3, 1000])
def test_assign_slots_every_admitted_row_once(capacity):
    rng = random.Random(capacity + 7)
    tokens, top_k, experts = 97, 3, 7
    ids = [e for _ in range(tokens) for e in rng.sample(range(experts), top_k)]
    counts, offsets, pick_row, row_token, dropped = _C.assign_slots(ids, tokens, top_k, experts, capacity)
    admitted_rows = sorted(row for row in pick_row if row >= 0)
    assert admitted_rows == list(range(offsets[-1])), "admitted picks fill rows 0..n-1 exactly once"
    assert len(row_token) == offsets[-1]
    assert dropped == tokens * top_k - offsets[-1]
    assert sum(counts) == tokens * top_k
    for e in range(experts):
        tokens_of_e = row_token[offsets[e]:offsets[e + 1]]
        assert tokens_of_e == sorted(tokens_of_e), "an expert admits its picks in ascending token order"
    if capacity == 0:
        assert offsets[-1] == 0 and dropped == tokens * top_k


@pytest.mark.parametrize("args,match", [
    (([0, 1], 1, 1, 2, -1), "tokens \\* top_k"),
    (([0, 1], 2, 1, 2, -2), "capacity"),
])
def test_assign_slots_binding_validation(args, match):
    with pytest.raises(ValueError, match=match):
        _C.assign_slots(*args)
