"""Expert parallelism on several GPUs: transport="nvshmem" (the persistent kernel dispatching over
NVSHMEM heaps) against single-process flashmoe.moe, and against transport="all_to_all" over NCCL.

Run on a node with N >= 2 GPUs (every rank draws the same seeded problem and keeps its own tokens
and experts; every test is collective, so all ranks run the same tests in the same order):

    torchrun --nproc-per-node N -m pytest -m multigpu tests/test_multigpu.py

Plain ``pytest`` collects these and skips them (no torchrun, or fewer than two GPUs); the
killed-rank test needs only two GPUs and starts its own processes, so under torchrun only rank 0
runs it. Not yet run on a GPU.

What is checked, on every rank:
  * nvshmem: y and the routing bitwise equal to single-process ``flashmoe.moe`` on the rank's
    tokens with all E experts (the same CUDA kernel), fp32 and bf16, k = 1, 2, 4, uneven T_r, a
    0-token rank, skew, capacity drops; and within DESIGN.md's tolerance of the float64 reference.
  * all_to_all on the same CUDA tensors: its bits are single-process flashmoe.moe's on the CPU (its
    native steps are the CPU's, docs/distributed.md), so it is compared bitwise with that, and with
    nvshmem within the tolerance (the CPU and CUDA kernels do not promise the same bits).
  * 1,000 back-to-back calls with changing token counts (heap growth, T = 0 calls), every output
    bitwise against single-process.
  * the EP layer (ExpertParallelMoE) captured in a CUDA graph and replayed with new inputs; the
    device epoch advances on replays.
  * a killed rank: one process exits before a call; every survivor raises RuntimeError naming it,
    within the watchdog.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

import flashmoe
import flashmoe.distributed as fd
from conftest import TOLERANCE, make_problem, rel_err, same_bits
from flashmoe import reference
from flashmoe.distributed.context import _live_contexts

pytestmark = pytest.mark.multigpu

H, I = 64, 96
ROUTING_FIELDS = ("topk_ids", "topk_weights", "expert_counts", "dropped", "router_logits")
UNDER_TORCHRUN = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) >= 2


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _skip_reason():
    if not UNDER_TORCHRUN:
        return "run under torchrun --nproc-per-node N (N >= 2)"
    if _gpus() < 2:
        return f"needs >= 2 CUDA GPUs, found {_gpus()}"
    from flashmoe.distributed.nvshmem_heaps import unavailable_reason

    reason = unavailable_reason(torch.device("cuda", int(os.environ["LOCAL_RANK"]) % _gpus()))
    return None if reason is None else f"the nvshmem transport cannot run here: {reason}"


needs_torchrun = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def group():
    """The NCCL group of the torchrun job (one rank per GPU), torn down after the module."""
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300),
                            device_id=torch.device("cuda", local_rank))
    yield dist.group.WORLD
    fd.destroy_all()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def hang_guard():
    """A hang (a rank that fell out of step) dumps every stack and exits instead of stalling the job."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _everyone_passed(failures: list) -> None:
    """Collective: fails on every rank with every rank's failures, so no rank walks on alone."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failures)
    messages = [f"rank {rank}: {message}" for rank, failed in enumerate(everyone) for message in failed]
    assert not messages, "\n".join(messages[:20])


def _problem(seed, counts, *, experts, top_k, dtype, skew=False, capacity=False):
    """Every rank's tokens (CPU) and the full weights (CPU), drawn alike on every rank."""
    problem = make_problem(seed, tokens=sum(counts), hidden=H, ffn=I, experts=experts, dtype=dtype, top_k=top_k,
                           router_bias=skew)
    if skew:  # most tokens pick expert 1 (rank 0's) first
        problem["router_bias"] = problem["router_bias"] + torch.eye(experts, dtype=dtype)[1] * 6
    xs = [x.contiguous() for x in problem.pop("x").split(list(counts))]
    return xs, problem


def _local(weights, rank, world, device):
    local = weights["router_weight"].shape[0] // world
    mine = slice(rank * local, (rank + 1) * local)
    return {name: (t if name.startswith("router") else t[mine]).contiguous().to(device)
            for name, t in weights.items()}


def _compare(failures, where, y, routing, y_expected, routing_expected):
    if not same_bits(y.cpu(), y_expected.cpu()):
        failures.append(f"{where}: y differs from single-process flashmoe.moe")
    for field in ROUTING_FIELDS:
        if not same_bits(getattr(routing, field).cpu(), getattr(routing_expected, field).cpu()):
            failures.append(f"{where}: {field} differs from single-process flashmoe.moe")


@needs_torchrun
def test_nvshmem_matches_single_process_and_all_to_all(group):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    experts = 2 * world
    failures, seed = [], 500
    uneven = [(5, 11, 3, 8, 1, 13, 7, 2)[r % 8] for r in range(world)]
    empty = [0 if r == world - 1 else 9 + r for r in range(world)]
    skewed = [12 + (r % 3) for r in range(world)]
    for dtype in (torch.float32, torch.bfloat16):
        for top_k in (1, 2, 4):
            for counts, skew, capacity_factor in ((uneven, False, None), (empty, False, None), (skewed, True, None),
                                                  (skewed, True, 1.0)):
                seed += 1
                xs, weights = _problem(seed, counts, experts=experts, top_k=top_k, dtype=dtype, skew=skew)
                x = xs[rank].to(device)
                where = f"{dtype} k={top_k} counts={counts} capacity={capacity_factor}"
                options = dict(top_k=top_k, capacity_factor=capacity_factor, return_routing=True)
                y, routing = fd.moe(x, **_local(weights, rank, world, device), transport="nvshmem", **options)
                full = {name: t.to(device) for name, t in weights.items()}
                y_single, routing_single = flashmoe.moe(x, **full, backend="native", **options)
                _compare(failures, f"nvshmem {where}", y, routing, y_single, routing_single)
                y_a2a, routing_a2a = fd.moe(x, **_local(weights, rank, world, device), transport="all_to_all",
                                            **options)
                y_cpu, routing_cpu = flashmoe.moe(xs[rank], **weights, backend="native", **options)
                _compare(failures, f"all_to_all {where}", y_a2a, routing_a2a, y_cpu, routing_cpu)
                if x.shape[0]:
                    y_ref = reference.moe(xs[rank].double(), **{n: t.double() for n, t in weights.items()},
                                          top_k=top_k, capacity_factor=capacity_factor)
                    for name, value in (("nvshmem", y), ("all_to_all", y_a2a)):
                        error = rel_err(value.cpu(), y_ref)
                        if not error <= TOLERANCE[dtype]:
                            failures.append(f"{name} {where}: error {error} against float64")
    _everyone_passed(failures)


@needs_torchrun
def test_thousand_back_to_back_calls_with_changing_token_counts(group):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    experts, top_k = 2 * world, 2
    _, weights = _problem(900, (1,), experts=experts, top_k=top_k, dtype=torch.bfloat16)
    full = {name: t.to(device) for name, t in weights.items()}
    mine = _local(weights, rank, world, device)
    config = fd.LayerConfig(experts, H, I, top_k, torch.bfloat16, True, "silu", "softmax", True, None, False,
                            False, False)
    context = fd.Context(config, transport="nvshmem", device=device, max_tokens=16)
    generator = torch.Generator().manual_seed(1000 + rank)
    failures, grown = [], []
    for call in range(1000):
        tokens = int(torch.randint(0, 80 if call < 500 else 20, (1,), generator=generator))
        x = torch.randn(tokens, H, generator=generator).to(torch.bfloat16).to(device)
        # Every tenth call is checked (heap growth happens there); the others never touch the host.
        checked = call % 10 == 0
        if tokens > context.max_tokens and not checked:
            x = x[:context.max_tokens]
        y = fd.moe(x, **mine, top_k=top_k, context=context, check=checked)
        expected = flashmoe.moe(x, **full, top_k=top_k, backend="native")
        if not same_bits(y, expected):
            failures.append(f"call {call} (T={x.shape[0]}): y differs from single-process flashmoe.moe")
        grown.append(context.max_tokens)
        if len(failures) > 5:
            break
    context.check()
    if grown[-1] <= 16:
        failures.append(f"the heaps never grew (max_tokens stayed {grown[-1]})")
    context.destroy()
    _everyone_passed(failures)


@needs_torchrun
def test_ep_layer_captured_in_a_cuda_graph_and_replayed(group):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(7)  # the same full layer on every rank (drawn on the CPU, then moved)
    full = flashmoe.MoE(H, I, 2 * world, 2, dtype=torch.bfloat16).to(device)
    layer = fd.ExpertParallelMoE.from_moe(full, transport="nvshmem")
    tokens = 24 + rank
    static_x = torch.randn(tokens, H, dtype=torch.bfloat16, device=device)
    failures = []
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: creates the Context and its heaps outside the capture
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        context = next(c for c in _live_contexts if c.transport == "nvshmem" and c.config.hidden_size == H
                       and c.config.dtype == torch.bfloat16 and c.config.num_experts == 2 * world)
        epochs = []
        for replay in range(5):
            static_x.copy_(torch.randn(tokens, H, dtype=torch.bfloat16, device=device))
            graph.replay()
            context.check()
            epochs.append(context.epoch)
            expected = full(static_x)
            if not same_bits(static_y, expected):
                failures.append(f"replay {replay}: y differs from the single-process layer")
    if len(set(epochs)) != len(epochs):
        failures.append(f"the device epoch did not advance on every replay: {epochs}")
    del graph
    _everyone_passed(failures)


@needs_torchrun
def test_nvshmem_gradients_match_single_process(group):
    """The backward (the all_to_all formulation, on the GPU over NCCL) after an nvshmem forward: x's and
    the local experts' gradients against single-process flashmoe.moe's, each expert's summed over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    experts, top_k = 2 * world, 2
    counts = [6 + 3 * r if r != 1 else 0 for r in range(world)]
    xs, weights = _problem(950, counts, experts=experts, top_k=top_k, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    grads_y = [torch.randn(x.shape, generator=g).to(device) for x in xs]
    expected = {name: torch.zeros_like(t, device=device) for name, t in weights.items()}
    expected_x = None
    for r, x in enumerate(xs):  # single process: every rank's tokens through all experts
        leaves = {name: t.to(device).requires_grad_() for name, t in weights.items()}
        x_leaf = x.to(device).requires_grad_()
        y = flashmoe.moe(x_leaf, **leaves, top_k=top_k, backend="native")
        (y * grads_y[r]).sum().backward()
        for name, leaf in leaves.items():
            if not name.startswith("router"):
                expected[name] += leaf.grad
            elif r == rank:
                expected[name] = leaf.grad
        if r == rank:
            expected_x = x_leaf.grad
    leaves = {name: t.requires_grad_() for name, t in _local(weights, rank, world, device).items()}
    x_leaf = xs[rank].to(device).requires_grad_()
    y = fd.moe(x_leaf, **leaves, top_k=top_k, transport="nvshmem")
    (y * grads_y[rank]).sum().backward()
    failures = []
    if xs[rank].shape[0] and not rel_err(x_leaf.grad.cpu(), expected_x.cpu()) <= 1e-5:
        failures.append(f"grad x: error {rel_err(x_leaf.grad.cpu(), expected_x.cpu())}")
    mine = _local({name: t.cpu() for name, t in expected.items()}, rank, world, "cpu")
    for name, leaf in leaves.items():
        if leaf.grad is None:
            failures.append(f"{name} got no gradient")
        elif mine[name].abs().sum() > 0 and not rel_err(leaf.grad.cpu(), mine[name]) <= 1e-5:
            failures.append(f"grad {name}: error {rel_err(leaf.grad.cpu(), mine[name])}")
    _everyone_passed(failures)


KILLED_RANK_SCRIPT = textwrap.dedent("""\
    import datetime, json, os, sys, time
    import torch, torch.distributed as dist
    import flashmoe.distributed as fd
    rank, world, store, victim, watchdog = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \\
        float(sys.argv[5])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="file://" + store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(3)  # the same weights on every rank (drawn on the CPU)
    E, H, I = 2 * world, 64, 96
    router = (torch.randn(E, H) / 8).cuda()
    w1, w2 = (torch.randn(E, 2 * I, H) / 8).cuda(), (torch.randn(E, H, I) / 8).cuda()
    mine = slice(rank * 2, rank * 2 + 2)
    x = torch.randn(16, H).cuda()
    out = {"rank": rank}
    y = fd.moe(x, router, w1[mine].contiguous(), w2[mine].contiguous(), top_k=2, transport="nvshmem",
               watchdog_seconds=watchdog)
    out["first_call"] = bool(torch.isfinite(y).all())
    if rank == victim:
        print(json.dumps(out), flush=True)
        os._exit(0)  # gone before the second call
    started = time.monotonic()
    try:
        fd.moe(x, router, w1[mine].contiguous(), w2[mine].contiguous(), top_k=2, transport="nvshmem",
               watchdog_seconds=watchdog)
        out["error"] = None
    except RuntimeError as error:
        out["error"] = str(error)
    out["seconds"] = time.monotonic() - started
    print(json.dumps(out), flush=True)
    os._exit(0)  # no collective teardown with a peer gone
    """)


@pytest.mark.skipif(_gpus() < 2, reason="needs >= 2 CUDA GPUs")
def test_killed_rank_is_named_by_every_survivor_within_the_watchdog():
    if UNDER_TORCHRUN and int(os.environ.get("RANK", "0")) != 0:
        pytest.skip("rank 0 of the torchrun job runs this one (it starts its own processes)")
    from flashmoe.distributed.nvshmem_heaps import unavailable_reason

    reason = unavailable_reason(torch.device("cuda", 0))
    if reason is not None:
        pytest.skip(f"the nvshmem transport cannot run here: {reason}")
    world, victim, watchdog = min(_gpus(), 4), 1, 5.0
    with tempfile.TemporaryDirectory() as work:
        started = time.monotonic()
        processes = [subprocess.Popen([sys.executable, "-c", KILLED_RANK_SCRIPT, str(r), str(world),
                                       os.path.join(work, "store"), str(victim), str(watchdog)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for r in range(world)]
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        assert time.monotonic() - started < 240
    for out in results:
        assert out["first_call"], out
        if out["rank"] == victim:
            continue
        assert out["error"] is not None, f"rank {out['rank']} did not notice the killed rank"
        assert f"rank {out['rank']}" in out["error"] and f"rank {victim}" in out["error"], out["error"]
        assert out["seconds"] < watchdog + 30, out
