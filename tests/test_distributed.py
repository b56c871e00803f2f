"""Expert parallelism across real processes (flashmoe.distributed over torch.distributed, gloo).

Each test spawns W processes once (torch.multiprocessing, a file store) and runs many cases in
them. Every rank draws the same seeded problem, keeps its own tokens and its own experts, and
checks, for both transports:

  * y and the routing bitwise equal to single-process ``flashmoe.moe(x_r, all weights)``, and y
    within DESIGN.md's tolerance of the float64 reference;
  * gradients against the single-process gradients (a local expert's summed over every rank);
  * 100 back-to-back calls whose token counts change every call (the symmetric heaps grow);
  * a configuration mismatch raising ValueError on every rank; ExpertParallelMoE.from_moe.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashmoe
import flashmoe.distributed as fd
from conftest import TOLERANCE, make_problem, rel_err, same_bits
from flashmoe import reference

pytestmark = pytest.mark.usefixtures("watchdog")

H, I = 40, 56  # not multiples of any tile
TRANSPORTS = ("all_to_all", "symmetric")
ROUTING_FIELDS = ("topk_ids", "topk_weights", "expert_counts", "dropped", "router_logits")


# --------------------------------------------------------------------------- process plumbing

def _entry(rank, world_size, init_file, scenario, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        scenario(rank, world_size, *args)
        # Leave together: a rank that tears its gloo group down while a peer is still in an exchange
        # with it aborts that peer at exit ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}") from None
    finally:
        fd.destroy_all()
        dist.destroy_process_group()


def spawn(world_size, scenario, *args):
    """Runs scenario(rank, world_size, *args) on world_size fresh processes; any failure fails the test."""
    with tempfile.TemporaryDirectory() as work:
        mp.spawn(_entry, args=(world_size, os.path.join(work, "store"), scenario, args), nprocs=world_size,
                 join=True)


def shm_segments() -> set:
    return {name for name in os.listdir("/dev/shm") if name.startswith("flashmoe-")}


# --------------------------------------------------------------------------- one case on one rank

def problem_for(seed, token_counts, *, experts, top_k, dtype, skew=False, expert_bias=False):
    problem = make_problem(seed, tokens=sum(token_counts), hidden=H, ffn=I, experts=experts, dtype=dtype,
                           top_k=top_k, router_bias=skew, expert_bias=expert_bias)
    if skew:  # most tokens pick expert 1 (rank 0's) first
        problem["router_bias"] = problem["router_bias"] + torch.eye(experts, dtype=dtype)[1] * 6
    xs = list(problem.pop("x").split(list(token_counts)))
    return [x.contiguous() for x in xs], problem


def local_weights(weights, rank, world_size):
    experts = weights["router_weight"].shape[0]
    local = experts // world_size
    mine = slice(rank * local, (rank + 1) * local)
    return {name: (t if name in ("router_weight", "router_bias") else t[mine]).contiguous()
            for name, t in weights.items()}


def check_case(rank, world_size, xs, weights, *, transport, top_k, capacity_factor=None, label="", **options):
    x = xs[rank]
    y, routing = fd.moe(x, **local_weights(weights, rank, world_size), top_k=top_k, transport=transport,
                        capacity_factor=capacity_factor, return_routing=True, **options)
    y_native, routing_native = flashmoe.moe(x, **weights, top_k=top_k, capacity_factor=capacity_factor,
                                            return_routing=True, backend="native", **options)
    where = f"{label} transport={transport} rank={rank} T_r={x.shape[0]}"
    assert same_bits(y, y_native), f"y differs from single-process flashmoe.moe: {where}"
    for field in ROUTING_FIELDS:
        assert same_bits(getattr(routing, field), getattr(routing_native, field)), f"{field} differs: {where}"
    if x.shape[0]:
        assert torch.isfinite(y).all(), where
        y_ref = reference.moe(x.double(), **{n: t.double() for n, t in weights.items()}, top_k=top_k,
                              capacity_factor=capacity_factor,
                              **{n: v.double() if isinstance(v, torch.Tensor) else v for n, v in options.items()})
        assert rel_err(y, y_ref) <= TOLERANCE[x.dtype], f"{where}: error {rel_err(y, y_ref)}"
    return routing


def forward_cases(rank, world_size):
    experts = 4 * world_size
    seed = 100
    for dtype in (torch.float32, torch.bfloat16):
        for top_k in (1, 2, 4):
            for counts, skew, capacity_factor in (
                    ((5, 11, 3, 8)[:world_size], False, None),      # uneven T_r
                    ((0, 9, 4, 0)[:world_size], False, None),       # a rank with 0 tokens
                    ((12, 7, 9, 5)[:world_size], True, None),       # skew onto one expert
                    ((12, 7, 9, 5)[:world_size], True, 1.0)):       # capacity drops under skew
                seed += 1
                xs, weights = problem_for(seed, counts, experts=experts, top_k=top_k, dtype=dtype, skew=skew)
                for transport in TRANSPORTS:
                    routing = check_case(rank, world_size, xs, weights, transport=transport, top_k=top_k,
                                         capacity_factor=capacity_factor, label=f"{dtype} k={top_k} counts={counts}")
                    if capacity_factor is not None and rank == 0 and top_k == 1:
                        assert int(routing.dropped) > 0, "the capacity case must drop picks"


def gradient_cases(rank, world_size):
    experts, top_k = 2 * world_size, 2
    for capacity_factor, expert_bias in ((None, True), (1.0, False)):
        counts = (6, 0, 9, 4)[:world_size] if world_size > 2 else (6, 9)
        xs, weights = problem_for(7 + int(expert_bias), counts, experts=experts, top_k=top_k, dtype=torch.float32,
                                  skew=capacity_factor is not None, expert_bias=expert_bias)
        g = torch.Generator().manual_seed(3)
        grads_y = [torch.randn(x.shape, generator=g) for x in xs]
        grads_w = [torch.randn(x.shape[0], top_k, generator=g) for x in xs]

        def loss_of(y, routing, r):  # y, the pick weights and the logits all carry gradient
            return ((y * grads_y[r]).sum() + (routing.topk_weights * grads_w[r]).sum()
                    + 0.1 * (routing.router_logits ** 2).mean() * routing.router_logits.shape[0])

        # Single process: each rank's tokens through all experts; expert grads summed over ranks.
        expected = {name: torch.zeros_like(t) for name, t in weights.items()}
        expected_x = None
        for r, x in enumerate(xs):
            leaves = {name: t.clone().requires_grad_() for name, t in weights.items()}
            x_leaf = x.clone().requires_grad_()
            y, routing = flashmoe.moe(x_leaf, **leaves, top_k=top_k, capacity_factor=capacity_factor,
                                      return_routing=True, backend="native")
            loss_of(y, routing, r).backward()
            for name, leaf in leaves.items():
                if name in ("router_weight", "router_bias"):
                    if r == rank:
                        expected[name] = leaf.grad
                else:
                    expected[name] += leaf.grad
            if r == rank:
                expected_x = x_leaf.grad
        for transport in TRANSPORTS:
            leaves = {name: t.clone().requires_grad_() for name, t in local_weights(weights, rank, world_size).items()}
            x_leaf = xs[rank].clone().requires_grad_()
            y, routing = fd.moe(x_leaf, **leaves, top_k=top_k, transport=transport, capacity_factor=capacity_factor,
                                return_routing=True)
            loss_of(y, routing, rank).backward()
            mine = local_weights(expected, rank, world_size)
            where = f"transport={transport} rank={rank} capacity_factor={capacity_factor}"
            if xs[rank].shape[0]:
                assert rel_err(x_leaf.grad, expected_x) <= 1e-5, f"grad x: {where}"
            else:
                assert x_leaf.grad.shape == xs[rank].shape
            for name, leaf in leaves.items():
                assert leaf.grad is not None, f"{name} got no gradient: {where}"
                if mine[name].abs().sum() > 0:
                    assert rel_err(leaf.grad, mine[name]) <= 1e-5, f"grad {name}: {where} {rel_err(leaf.grad, mine[name])}"
                else:
                    assert torch.equal(leaf.grad, mine[name]), f"grad {name}: {where}"


# The routing options (issue 12), with E = 4 per rank: (options, router in fp32 for bf16 x).
ROUTING_OPTION_CASES = [
    (dict(scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2, routed_scaling_factor=2.5), False),
    (dict(scoring="softmax_topk"), False),
    (dict(scoring="sigmoid", weight_on="input"), False),
    (dict(weight_on="input", routed_scaling_factor=0.5), True),
    # The clamped SwiGLUs' options cross ranks in the layer configuration (GPT-OSS: swiglu_oai).
    (dict(scoring="softmax_topk", activation="swiglu_oai", swiglu_limit=0.6, swiglu_alpha=1.5), False),
    (dict(activation="swiglu_clamp", swiglu_limit=0.4), False),
]


def routing_option_cases(rank, world_size):
    """Every routing option under both transports: bitwise equal to the single-process op per rank,
    and gradients (fp32) equal to the single-process ones, as in gradient_cases."""
    experts, top_k = 4 * world_size, 2
    for index, (options, router_f32) in enumerate(ROUTING_OPTION_CASES):
        options = dict(options)
        if options.pop("selection_bias", False):
            options["selection_bias"] = torch.linspace(-0.5, 0.5, experts).flip(0)
        for dtype in (torch.float32, torch.bfloat16):
            counts = (9, 5, 7, 3)[:world_size]
            xs, weights = problem_for(300 + index, counts, experts=experts, top_k=top_k, dtype=dtype)
            if router_f32 and dtype == torch.bfloat16:
                weights["router_weight"] = weights["router_weight"].float()
            for transport in TRANSPORTS:
                for capacity_factor in (None, 0.75):
                    check_case(rank, world_size, xs, weights, transport=transport, top_k=top_k,
                               capacity_factor=capacity_factor, label=f"{options} {dtype}", **options)
        # Gradients (fp32): each rank's tokens through all experts in one process, expert grads summed.
        xs, weights = problem_for(400 + index, (6, 9, 4, 5)[:world_size], experts=experts, top_k=top_k,
                                  dtype=torch.float32)
        expected = {name: torch.zeros_like(t) for name, t in weights.items()}
        for r, x in enumerate(xs):
            leaves = {name: t.clone().requires_grad_() for name, t in weights.items()}
            x_leaf = x.clone().requires_grad_()
            y, routing = flashmoe.moe(x_leaf, **leaves, top_k=top_k, return_routing=True, backend="native", **options)
            ((y * y).sum() + routing.topk_weights.sum()).backward()
            for name, leaf in leaves.items():
                if name not in ("router_weight", "router_bias"):
                    expected[name] += leaf.grad
                elif r == rank:
                    expected[name] = leaf.grad
            if r == rank:
                expected["x"] = x_leaf.grad
        for transport in TRANSPORTS:
            leaves = {name: t.clone().requires_grad_() for name, t in local_weights(weights, rank, world_size).items()}
            x_leaf = xs[rank].clone().requires_grad_()
            y, routing = fd.moe(x_leaf, **leaves, top_k=top_k, transport=transport, return_routing=True, **options)
            ((y * y).sum() + routing.topk_weights.sum()).backward()
            mine = local_weights(expected, rank, world_size)
            assert rel_err(x_leaf.grad, expected["x"]) <= 1e-5, f"grad x: {options} {transport}"
            for name, leaf in leaves.items():
                assert rel_err(leaf.grad, mine[name]) <= 1e-5, f"grad {name}: {options} {transport}"


def back_to_back(rank, world_size):
    experts, top_k = 2 * world_size, 2
    for transport in TRANSPORTS:
        _, weights = problem_for(50, (1,), experts=experts, top_k=top_k, dtype=torch.float32)
        mine = local_weights(weights, rank, world_size)
        context = fd.Context(fd.LayerConfig(experts, H, I, top_k, torch.float32, True, "silu", "softmax", True, None,
                                            False, False, False), transport=transport, tokens=4)
        g = torch.Generator().manual_seed(1000 + rank)
        for call in range(100):
            tokens = int(torch.randint(0, 9, (), generator=g))
            if call % 37 == 36:
                tokens = 20 + 30 * (call // 37)  # past the heaps' max_tokens (16, then 32): they grow
            x = torch.randn(tokens, H, generator=g)
            y = fd.moe(x, **mine, top_k=top_k, context=context)
            assert same_bits(y, flashmoe.moe(x, **weights, top_k=top_k, backend="native")), \
                f"call {call} transport={transport} rank={rank} T={tokens}"
        if transport == "symmetric":
            assert context.max_tokens >= 64 and context.epoch > 0 and context.heap_bytes > 0, \
                (context.max_tokens, context.epoch, context.heap_bytes)
        context.destroy()


def mismatch(rank, world_size):
    _, weights = problem_for(60, (1,), experts=2 * world_size, top_k=2, dtype=torch.float32)
    mine = local_weights(weights, rank, world_size)
    x = torch.randn(3, H)
    for transport in TRANSPORTS:
        with pytest.raises(ValueError, match="disagree on top_k"):
            fd.moe(x, **mine, top_k=2 if rank == 0 else 1, transport=transport)
        with pytest.raises(ValueError, match="disagree on activation"):
            fd.moe(x, **mine, top_k=2, transport=transport, activation="silu" if rank else "gelu")
    # The group is still usable: a good call afterwards agrees.
    y = fd.moe(x, **mine, top_k=2)
    assert same_bits(y, flashmoe.moe(x, **weights, top_k=2, backend="native"))


def from_moe(rank, world_size):
    torch.manual_seed(5)
    layer = flashmoe.MoE(H, I, 2 * world_size, 2, capacity_factor=1.5, expert_bias=True, z_loss_coef=0.01)
    x = torch.randn(3 + rank, 2, H)
    for transport in TRANSPORTS:
        sharded = fd.ExpertParallelMoE.from_moe(layer, transport=transport)
        assert sharded.w1.shape[0] == 2 and sharded.router_weight.shape == layer.router_weight.shape
        y, aux = sharded(x, return_aux_loss=True)
        y_full, aux_full = layer(x, return_aux_loss=True)
        assert same_bits(y, y_full) and same_bits(aux, aux_full)
        y.sum().backward()
        assert sharded.w1.grad is not None and sharded.router_weight.grad is not None
    # The routing options travel with the layer: DeepSeek's routing with an fp32 router for bf16 experts.
    torch.manual_seed(6)  # the same layer on every rank
    layer = flashmoe.MoE(H, I, 4 * world_size, 2, scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2,
                         routed_scaling_factor=2.5, router_dtype=torch.float32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.selection_bias.copy_(torch.linspace(-1, 1, 4 * world_size))
    x = torch.randn(5 + rank, H).to(torch.bfloat16)
    for transport in TRANSPORTS:
        sharded = fd.ExpertParallelMoE.from_moe(layer, transport=transport)
        assert sharded.router_weight.dtype == torch.float32 and sharded.w1.dtype == torch.bfloat16
        assert same_bits(sharded(x), layer(x))


def from_moe_families(rank, world_size):
    """Issue 12's layers (DeepSeek-style routing with an fp32 router and a shared expert; Llama 4's
    weight_on; GPT-OSS's swiglu_oai) shard: the experts split, the router, selection bias and shared
    expert replicated, the options carried, and each rank's output bitwise the single-process layer's."""
    torch.manual_seed(6)
    experts = 4 * world_size
    layers = [
        flashmoe.MoE(H, I, experts, 4, scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2,
                     routed_scaling_factor=2.5, router_dtype=torch.float32, shared_ffn_size=24, dtype=torch.bfloat16),
        flashmoe.MoE(H, I, experts, 1, scoring="sigmoid", normalize=False, weight_on="input", shared_ffn_size=I,
                     shared_gate=True),
        # GPT-OSS: softmax over the top-k logits, swiglu_oai with its options, expert biases.
        flashmoe.MoE(H, I, experts, 2, scoring="softmax_topk", activation="swiglu_oai", swiglu_limit=0.7,
                     swiglu_alpha=1.6, router_bias=True, expert_bias=True),
    ]
    layers[0].selection_bias.normal_(0.0, 0.1)
    x = torch.randn(3 + rank, H)
    for layer in layers:
        sharded = fd.ExpertParallelMoE.from_moe(layer)
        mine = slice(rank * 4, rank * 4 + 4)
        assert same_bits(sharded.w1, layer.w1[mine]) and same_bits(sharded.w2, layer.w2[mine])
        for name in ("router_weight", "selection_bias", "shared_w1", "shared_w2", "shared_gate"):
            full = getattr(layer, name)
            assert (getattr(sharded, name) is None) == (full is None), name
            if full is not None:
                assert same_bits(getattr(sharded, name), full), name
        for name in ("num_groups", "topk_groups", "routed_scaling_factor", "weight_on", "scoring", "normalize",
                     "shared_ffn_size", "activation", "swiglu_limit", "swiglu_alpha"):
            assert getattr(sharded, name) == getattr(layer, name), name
        assert same_bits(sharded(x.to(layer.w1.dtype)), layer(x.to(layer.w1.dtype)))


def guards(rank, world_size):
    _, weights = problem_for(70, (1,), experts=2 * world_size, top_k=2, dtype=torch.float32)
    mine = local_weights(weights, rank, world_size)
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match="transport"):
        fd.moe(x, **mine, top_k=2, transport="nvlink")
    with pytest.raises(ValueError, match="w1"):
        fd.moe(x, **dict(mine, w1=weights["w1"]), top_k=2)
    with pytest.raises(ValueError, match="x must be"):
        fd.moe(x[None], **mine, top_k=2)
    with pytest.raises(TypeError, match="w2 must have dtype"):
        fd.moe(x, **dict(mine, w2=mine["w2"].double()), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        fd.moe(x, **mine, top_k=2 * world_size + 1)
    # The clamped SwiGLUs' options are checked as in one process.
    with pytest.raises(ValueError, match="swiglu_limit"):
        fd.moe(x, **mine, top_k=2, activation="swiglu_clamp")
    with pytest.raises(ValueError, match="swiglu_limit"):
        fd.moe(x, **mine, top_k=2, activation="silu", swiglu_limit=5.0)
    # A group that spans hosts: symmetric refuses it on every rank, auto picks all_to_all.
    import flashmoe.distributed.context as context_module
    real_host_id = context_module.host_id
    context_module.host_id = lambda: f"host-{rank}/boot"
    try:
        with pytest.raises(ValueError, match="one host"):
            fd.moe(x, **mine, top_k=2, transport="symmetric", watchdog_seconds=59.0)
        config = fd.LayerConfig(2 * world_size, H, I, 2, torch.float32, True, "silu", "softmax", True, None, False,
                                False, False)
        context = fd.Context(config, transport="auto", tokens=3)
        assert context.transport == "all_to_all"
        assert same_bits(fd.moe(x, **mine, top_k=2, context=context),
                         flashmoe.moe(x, **weights, top_k=2, backend="native"))
        context.destroy()
    finally:
        context_module.host_id = real_host_id
    context = fd.Context(config, transport="auto", tokens=3)
    assert context.transport == "symmetric"
    context.destroy()


def nvshmem_rules(rank, world_size):
    """transport="nvshmem"'s collective rules over real processes, on fakes of NVSHMEM and the EP kernel
    (tests/test_nvshmem.py): every rank takes the same decision from what any rank saw."""
    from flashmoe.distributed import nvshmem, nvshmem_heaps
    from test_nvshmem import _retarget_to_cpu, install_fake_nvshmem

    _, weights = problem_for(90, (1,), experts=2 * world_size, top_k=2, dtype=torch.float32)
    mine = local_weights(weights, rank, world_size)
    with pytest.raises(ValueError, match="disagree on transport"):
        fd.moe(torch.randn(3, H), **mine, top_k=2, transport="nvshmem" if rank == 0 else "all_to_all")
    config = fd.LayerConfig(2 * world_size, H, I, 2, torch.float32, True, "silu", "softmax", True, None, False,
                            False, False)
    # Only the last rank cannot load/store rank 0's heap: every rank refuses nvshmem, auto falls back.
    fake, undo = install_fake_nvshmem(rank, unreachable={0} if rank == world_size - 1 else ())
    try:
        with pytest.raises(nvshmem_heaps.PeerUnreachableError, match=f"rank {world_size - 1} cannot load/store"):
            fd.Context(config, transport="nvshmem", device="cuda:0", tokens=3)
        context = fd.Context(config, transport="auto", device="cuda:0", tokens=3)
        assert context.transport == "all_to_all"
        assert sorted(fake.freed) == sorted(fake.allocations) and len(fake.allocations) == 2
        context.destroy()
    finally:
        undo()
    # Only rank 0 has the NVSHMEM module: explicit nvshmem names the other ranks everywhere; auto falls back.
    fake, undo = install_fake_nvshmem(rank)
    try:
        if rank:
            nvshmem.is_built = lambda: False
        with pytest.raises(nvshmem.NvshmemUnavailableError, match="rank 1: flashmoe was built without"):
            fd.Context(config, transport="nvshmem", device="cuda:0", tokens=3)
        context = fd.Context(config, transport="auto", device="cuda:0", tokens=3)
        assert context.transport == "all_to_all" and not fake.initialized
        context.destroy()
    finally:
        undo()
    # One rank brings more tokens than max_tokens: every rank grows its heap in the same call.
    fake, undo = install_fake_nvshmem(rank)
    try:
        context = fd.Context(config, transport="nvshmem", device="cuda:0", max_tokens=16)
        _retarget_to_cpu(context)
        x = torch.randn(40 if rank == world_size - 1 else 2, H)
        fd.moe(x, **mine, top_k=2, context=context)
        assert context.max_tokens == 64 and len(fake.freed) == 1
        # The asker runs the first epoch without tokens and its call again on the grown heaps; the others
        # run their call, then an epoch without tokens.
        expected = [(0, 16), (40, 64)] if rank == world_size - 1 else [(2, 16), (0, 64)]
        assert [(launch["problem"].tokens, launch["max_tokens"]) for launch in fake.launches] == expected
        assert fake.launches[0]["rank"] == rank and fake.launches[0]["world"] == world_size
        assert len(fake.launches[0]["heaps"]) == world_size and all(fake.launches[0]["heaps"])
        context.destroy()
        assert len(fake.freed) == 2
    finally:
        undo()


def world_of_two(rank, world_size):
    before = shm_segments()
    for scenario in (guards, nvshmem_rules, forward_cases, gradient_cases, routing_option_cases, back_to_back,
                     mismatch, from_moe, from_moe_families):
        scenario(rank, world_size)
    fd.destroy_all()
    dist.barrier()
    assert shm_segments() <= before, "a shared-memory segment outlived its setup"


def larger_world(rank, world_size):
    experts = 2 * world_size
    for counts in ((5, 0, 9, 2)[:world_size], (1, 1, 1, 1)[:world_size]):
        xs, weights = problem_for(80 + sum(counts), counts, experts=experts, top_k=2, dtype=torch.float32)
        for transport in TRANSPORTS:
            check_case(rank, world_size, xs, weights, transport=transport, top_k=2, label=f"W={world_size}")
    if world_size == 3:
        gradient_cases(rank, world_size)


# --------------------------------------------------------------------------- the tests

def test_world_of_two():
    spawn(2, world_of_two)


@pytest.mark.parametrize("world_size", [3, 4])
def test_larger_worlds(world_size):
    spawn(world_size, larger_world)


# --------------------------------------------------------------------------- failures never hang

WATCHDOG_SECONDS = 2.0
GROUP_TIMEOUT_SECONDS = 8


def _failure_entry(rank, world_size, init_file, result_file, transport, mode):
    """Every rank calls back to back; the last rank dies (kill) or raises (raise) mid-run."""
    import threading
    import time
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_SECONDS))
    _, weights = problem_for(90, (1,), experts=2 * world_size, top_k=2, dtype=torch.float32)
    mine = local_weights(weights, rank, world_size)
    options = dict(top_k=2, transport=transport, watchdog_seconds=WATCHDOG_SECONDS)
    fd.moe(torch.randn(4, H), **mine, **options)  # every rank is up and the heaps are mapped
    victim = rank == world_size - 1
    if victim and mode == "kill":
        threading.Timer(0.2, os._exit, (17,)).start()
    outcome = "returned"
    for call in range(1_000_000):
        x = torch.randn(1 + call % 7, H)
        if victim and mode == "raise" and call == 3:
            with pytest.raises(ValueError):
                fd.moe(x[:, :-1], **mine, **options)  # a bad input on this rank only
            outcome = "raised ValueError"
            break
        started = time.monotonic()
        try:
            fd.moe(x, **mine, **options)
        except RuntimeError as error:
            outcome = f"RuntimeError after {time.monotonic() - started:.2f} s: {error}"
            break
    with open(result_file, "w") as out:
        out.write(outcome)
    os._exit(0)  # the group is broken: no orderly teardown


def run_failure(world_size, transport, mode):
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as work:
        results = [os.path.join(work, f"result-{rank}") for rank in range(world_size)]
        processes = [context.Process(target=_failure_entry, args=(rank, world_size, os.path.join(work, "store"),
                                                                   results[rank], transport, mode))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=90)
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        assert not hung, f"ranks {hung} hung instead of raising"
        outcomes = []
        for path in results[:-1]:
            assert os.path.exists(path), f"{path}: a survivor died instead of raising"
            outcomes.append(open(path).read())
        pids = {str(process.pid) for process in processes}
        left = [name for name in shm_segments() if name.split("-")[1] in pids]
        assert not left, f"segments left in /dev/shm: {left}"
        return outcomes


@pytest.mark.parametrize("world_size, transport, mode", [
    (3, "symmetric", "kill"), (2, "symmetric", "raise"), (2, "all_to_all", "kill")])
def test_failed_peer_never_hangs(world_size, transport, mode):
    for rank, outcome in enumerate(run_failure(world_size, transport, mode)):
        assert outcome.startswith("RuntimeError after"), f"rank {rank}: {outcome}"
        seconds = float(outcome.split()[2])
        limit = WATCHDOG_SECONDS if transport == "symmetric" else GROUP_TIMEOUT_SECONDS
        assert seconds < limit + 10, f"rank {rank} took {seconds} s to give up"
        assert f"rank {rank}" in outcome and transport in outcome, outcome
        if transport == "symmetric":
            # The watchdog names what it waited for, and the rank that owes it.
            assert "watchdog" in outcome and f"(source {world_size - 1}" in outcome or \
                f"(owner {world_size - 1}" in outcome, outcome


def test_bench_world_size(capsys):
    from flashmoe.bench.cli import main
    assert main(["--world-size", "2", "--hidden", "64", "--ffn", "32", "--experts", "4", "--top-k", "2",
                 "--tokens", "3", "--iters", "3", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    for transport in ("symmetric", "all_to_all", "single-process"):
        assert f" {transport}" in out, out
    assert "all_to_all / symmetric" in out
    assert main(["--world-size", "3", "--experts", "4", "--hidden", "8", "--ffn", "8", "--top-k", "1"]) == 2
