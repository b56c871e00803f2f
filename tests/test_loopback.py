"""Loopback expert parallelism (flashmoe.loopback): W virtual ranks of the EP kernel on one GPU.

The ``gpu`` tests check every rank's outputs bit for bit against single-process ``flashmoe.moe``
(the CUDA kernel) on that rank's tokens with all E experts, and against the float64 reference;
they skip where torch sees no CUDA device or flashmoe was built without its CUDA backend. The
guards and the kernel's error text need no GPU and always run.
"""

import math
import random

import pytest
import torch

import flashmoe
from conftest import TOLERANCE, make_problem, rel_err, same_bits
from flashmoe import _C, reference
from flashmoe.loopback import MAX_LOOPBACK_WORLD, MAX_WORLD, LoopbackWorld, describe_kernel_error, loopback_moe

CUDA_READY = bool(getattr(_C, "cuda_compiled", False)) and torch.cuda.is_available()


def gpu_test(test):
    """Marked ``gpu``; skipped without a CUDA device or without flashmoe's CUDA backend."""
    test = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and flashmoe built with its CUDA backend")(test)
    return pytest.mark.gpu(test)


OUTPUT_NAMES = ("y", "topk_ids", "topk_weights", "expert_counts", "router_logits", "dropped")
H, I, E = 96, 64, 16


def layer(seed, dtype, *, experts=E, shared=False, device="cpu"):
    """Full weights of a layer (all E experts) and its options."""
    weights = make_problem(seed, tokens=1, hidden=H, ffn=I, experts=experts, dtype=dtype, router_bias=True,
                           expert_bias=True)
    del weights["x"]
    if shared:
        g = torch.Generator().manual_seed(seed + 1)
        weights["shared_w1"] = (torch.randn(2 * 48, H, generator=g) / math.sqrt(H)).to(dtype)
        weights["shared_w2"] = (torch.randn(H, 48, generator=g) / math.sqrt(48)).to(dtype)
        weights["shared_gate"] = (torch.randn(1, H, generator=g) / math.sqrt(H)).to(dtype)
    return {name: tensor.to(device) for name, tensor in weights.items()}


def tokens(seed, counts, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, H, generator=g).to(dtype).to(device) for t in counts]


# --------------------------------------------------------------------------- guards (no GPU needed)

def test_world_size_must_divide_experts():
    weights = layer(1, torch.float32)
    with pytest.raises(ValueError, match="world_size 3 must divide the number of experts E=16"):
        LoopbackWorld(3, top_k=2, max_tokens=8, **weights)


@pytest.mark.parametrize("world", (0, 1, MAX_WORLD + 1, 128))
def test_world_size_out_of_range(world):
    weights = layer(2, torch.float32)
    with pytest.raises(ValueError, match=rf"world_size must be in \[2, {MAX_WORLD}\]"):
        LoopbackWorld(world, top_k=2, max_tokens=8, **weights)


def test_world_size_beyond_one_launch():
    weights = layer(3, torch.float32, experts=32)
    with pytest.raises(ValueError, match=f"at most {MAX_LOOPBACK_WORLD} virtual ranks"):
        LoopbackWorld(32, top_k=2, max_tokens=8, **weights)


def test_world_size_must_be_an_int():
    with pytest.raises(TypeError, match="world_size must be an int"):
        LoopbackWorld(2.0, top_k=2, max_tokens=8, **layer(4, torch.float32))


def test_cpu_tensors_are_a_clear_error():
    with pytest.raises(ValueError, match="one CUDA device; the weights are on cpu"):
        LoopbackWorld(2, top_k=2, max_tokens=8, **layer(5, torch.float32))
    with pytest.raises(ValueError, match="one CUDA device"):
        loopback_moe(tokens(5, [3, 4], torch.float32), top_k=2, **layer(5, torch.float32))


def test_mismatched_devices_name_the_argument():
    weights = layer(6, torch.float32)
    weights["w2"] = weights["w2"].to("meta")
    with pytest.raises(ValueError, match="w2 must be on device cpu"):
        LoopbackWorld(2, top_k=2, max_tokens=8, **weights)


@pytest.mark.parametrize("max_tokens", (0, -3, 2.5, True))
def test_bad_max_tokens(max_tokens):
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        LoopbackWorld(2, top_k=2, max_tokens=max_tokens, **layer(7, torch.float32))


@pytest.mark.parametrize("timeout", (0.0, -1.0, math.inf, math.nan, 2e6))
def test_bad_peer_timeout(timeout):
    with pytest.raises(ValueError, match="peer_timeout_s must be a number of seconds"):
        LoopbackWorld(2, top_k=2, max_tokens=8, peer_timeout_s=timeout, **layer(8, torch.float32))


def test_bad_weights_are_named_before_the_device():
    weights = layer(9, torch.float32)
    weights["w1"] = weights["w1"][:, :, :-1]
    with pytest.raises(ValueError, match="w1"):
        LoopbackWorld(2, top_k=2, max_tokens=8, **weights)


CUDA_COMPILED = bool(getattr(_C, "cuda_compiled", False))


@pytest.mark.skipif(not CUDA_COMPILED, reason="flashmoe built without its CUDA backend")
def test_host_sizes_agree_and_check_their_arguments():
    """Host-only entries of the CUDA build (no device touched): the heap is HeapLayout's, the
    loopback limit is Python's, and bad worlds are named."""
    from flashmoe import ops
    problem = ops.problem_shape(H, I, E, 2, gated=True, activation="silu", normalize=True, scoring="softmax",
                                dtype=torch.bfloat16, has_router_bias=False, has_b1=False, has_b2=False)
    problem.tokens = 10
    layout = _C.HeapLayout(_C.ExpertPlacement(4, E), 10, 2, H, 2)
    assert _C.cuda_ep_heap_bytes(problem, 4, 10) == layout.total_bytes()
    assert _C.cuda_max_loopback_world == MAX_LOOPBACK_WORLD
    with pytest.raises(ValueError, match="world_size 3 must divide experts"):
        _C.cuda_ep_heap_bytes(problem, 3, 10)
    with pytest.raises(ValueError, match="world_size must be 1..64"):
        _C.cuda_ep_heap_bytes(problem, 65, 10)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        _C.cuda_ep_heap_bytes(problem, 4, 0)


def entry_problem(hidden=H):
    from flashmoe import ops
    problem = ops.problem_shape(hidden, I, E, 2, gated=True, activation="silu", normalize=True, scoring="softmax",
                                dtype=torch.bfloat16, has_router_bias=False, has_b1=False, has_b2=False)
    problem.tokens = 4
    return problem


# Stand-in addresses: every check below fails before any of them is dereferenced or the device touched.
ENTRY_POINTERS = dict(x=4096, router_weight=4096, w1=4096, w2=4096, y=4096, topk_ids=4096, topk_weights=4096,
                      expert_counts=4096, router_logits=4096, dropped=4096, workspace=4096)


@pytest.mark.skipif(not CUDA_COMPILED, reason="flashmoe built without its CUDA backend")
@pytest.mark.parametrize("change,message", [
    (dict(problems=[entry_problem()]), "one entry per virtual rank"),
    (dict(problems=[entry_problem()], pointers=[ENTRY_POINTERS], workspace_bytes=[1], heaps=[4096], epochs=[4096],
          statuses=[8192]), "holds 2..16 virtual ranks, got 1"),
    (dict(problems=[entry_problem(), entry_problem(hidden=2 * H)]), "rank 1's problem differs from rank 0's"),
    (dict(pointers=[ENTRY_POINTERS, dict(ENTRY_POINTERS, bogus=1)]), "pointers\\[1\\] has an unknown key 'bogus'"),
    (dict(pointers=[ENTRY_POINTERS, dict(ENTRY_POINTERS, w1=0)]), "a required weight or output pointer is null"),
    (dict(pointers=[dict(ENTRY_POINTERS, y=0), ENTRY_POINTERS]), "a required token tensor pointer is null"),
    (dict(heaps=[4096, 0]), "heaps\\[1\\] is null"),
    (dict(heaps=[4096, 4100]), "heaps\\[1\\] must be 128-byte aligned"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(peer_timeout_s=0.0), "peer_timeout_s must be a number of seconds"),
    (dict(epochs=[0, 4100]), "epoch is null"),
    (dict(statuses=[8192, 0]), "status is null"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_loopback_entry_checks_before_touching_the_device(change, message):
    """moe_forward_cuda_loopback names every bad argument before it touches the device (so this runs
    without a GPU in a CUDA build)."""
    args = dict(problems=[entry_problem()] * 2, pointers=[ENTRY_POINTERS] * 2, workspace_bytes=[1 << 20] * 2,
                heaps=[4096, 8192], epochs=[4096, 4100], statuses=[8192, 8208], max_tokens=8, peer_timeout_s=1.0,
                allow_tf32=False, device=0, stream=0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        _C.moe_forward_cuda_loopback(**args)


@pytest.mark.skipif(not CUDA_COMPILED, reason="flashmoe built without its CUDA backend")
@pytest.mark.parametrize("change,message", [
    (dict(heaps=[4096]), "heaps must hold world_size=2 addresses, got 1"),
    (dict(rank=2), "rank must be in \\[0, world_size=2\\), got 2"),
    (dict(world=65, heaps=[4096] * 65), "world_size must be 1..64, got 65"),
    (dict(heaps=[4096, 0]), "heaps\\[1\\] is null"),
    (dict(epoch=0), "epoch is null"),
    (dict(status=0), "status is null"),
    (dict(peer_timeout_s=math.nan), "peer_timeout_s must be a number of seconds"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(w2=0), "a required weight or output pointer is null"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_ep_entry_checks_before_touching_the_device(change, message):
    args = dict(ENTRY_POINTERS, problem=entry_problem(), router_bias=0, b1=0, b2=0, workspace_bytes=1 << 20,
                allow_tf32=False, device=0, stream=0, heaps=[4096, 8192], rank=0, world=2, max_tokens=8,
                epoch=4096, status=8192, peer_timeout_s=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        _C.moe_forward_cuda_ep(**args)


# --------------------------------------------------------------------------- the kernel's error words

def test_describe_dispatch_flag_timeout():
    message = describe_kernel_error([1, 3, 1, 7], 2, 2.5)
    assert message.startswith("flashmoe: the persistent kernel of rank 2 gave up after 2.5 s waiting for the "
                              "dispatch flag of source rank 3, local expert 1 (epoch 7)")
    assert "destroy the context" in message


def test_describe_return_flag_timeout():
    message = describe_kernel_error([2, 0, 5, 9], 1, 60)
    assert "of rank 1 gave up after 60 s waiting for the return flag of owner rank 0, local expert 5 (epoch 9)" \
        in message


def test_describe_epoch_mismatch_and_bad_signal():
    """status[3] holds the epoch waited for in bits 0..15, and what the flag held in bits 16..31."""
    message = describe_kernel_error([3, 1, 2, (5 << 16) | 7], 0, 1.0)
    assert "of rank 0 found the flag of rank 1, local expert 2 at epoch 5 while at epoch 7" in message
    message = describe_kernel_error([4, 2, 0, (300 << 16) | 3], 3, 1.0)
    assert "of rank 3 got a dispatch flag from rank 2, local expert 0 announcing 300 rows past its region " \
           "(epoch 3)" in message


def test_describe_healthy_and_unknown_words():
    assert describe_kernel_error([0, 9, 9, 9], 0, 1.0) == ""
    assert "left an unknown error word 9" in describe_kernel_error([9, 0, 0, 0], 4, 1.0)
    with pytest.raises(ValueError, match="status must hold 4 words"):
        _C.describe_kernel_error([1, 2, 3], 0, 1.0)


# --------------------------------------------------------------------------- the benchmark (no GPU needed)

def test_bench_loopback_without_cuda_is_a_one_line_error(capsys):
    from flashmoe.bench import cli
    flags = ["--hidden", "32", "--ffn", "16", "--experts", "8", "--top-k", "2", "--tokens", "4", "--device", "cpu"]
    assert cli.main([*flags, "--loopback", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashmoe-bench: error: --loopback 4: needs a CUDA device")


def test_bench_bytes_per_rank():
    from flashmoe.bench.loopback import bytes_per_rank
    counts = [[3, 1, 2, 5], [0, 4, 1, 1]]  # W = 2, E = 4: rank 0 owns experts 0-1, rank 1 experts 2-3
    payload, control = bytes_per_rank(counts, [-1, -1], 2, hidden=8, element_size=2)
    assert payload == [(7 + 4) * 16, (4 + 7) * 16] and control == 2 * 2 * 8
    payload, _ = bytes_per_rank(counts, [2, -1], 2, hidden=8, element_size=2)  # rank 0 admits 2 per expert
    assert payload == [(4 + 4) * 16, (4 + 4) * 16]


# --------------------------------------------------------------------------- on a GPU

@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    """Every test here runs with exact fp32 math (conftest's exact_fp32) unless it asks for TF32."""


def single_process(x, weights, **options):
    """flashmoe.moe (the CUDA kernel) on one rank's tokens with all E experts: its six outputs."""
    y, routing = flashmoe.moe(x, **weights, return_routing=True, backend="native", **options)
    return (y, routing.topk_ids, routing.topk_weights, routing.expert_counts, routing.router_logits, routing.dropped)


def poisoned_outputs(xs, top_k):
    """Every output NaN (floats) or -7 (ints): a value the kernel failed to write shows."""
    out = []
    for x in xs:
        t = x.shape[0]
        out.append((torch.full_like(x, math.nan),
                    torch.full((t, top_k), -7, dtype=torch.int32, device=x.device),
                    torch.full((t, top_k), math.nan, dtype=torch.float32, device=x.device),
                    torch.full((E,), -7, dtype=torch.int32, device=x.device),
                    torch.full((t, E), math.nan, dtype=torch.float32, device=x.device),
                    torch.full((), -7, dtype=torch.int64, device=x.device)))
    return out


def poison_heaps(world):
    """Garbage rows in every heap (its flags stay as allocation left them: zeroed once)."""
    layout = _C.HeapLayout(_C.ExpertPlacement(world.world_size, world.experts), world.max_tokens,
                           world.options["top_k"], H,
                           torch.empty((), dtype=world.dtype).element_size())
    for heap in world._heaps:
        heap[2 * layout.flags_bytes():].fill_(0xFF)


def check_world_call(world, xs, weights, options, what):
    got = world.forward(xs, out=poisoned_outputs(xs, options["top_k"]))
    for r, (x, outputs) in enumerate(zip(xs, got)):
        want = single_process(x, weights, **options)
        for name, a, b in zip(OUTPUT_NAMES, outputs, want):
            assert same_bits(a, b), f"{what}: rank {r} ({x.shape[0]} tokens): {name} differs from single-process"
        if x.shape[0]:
            ref = reference.moe(x.double(), **{n: t.double() for n, t in weights.items()}, **options)
            assert rel_err(outputs[0], ref) <= TOLERANCE[x.dtype], f"{what}: rank {r} far from the reference"
    return got


CASES = {
    "skew": dict(counts=lambda w: [5 + 40 * r for r in range(w)], capacity_factor=None, top_k=2),
    "drops": dict(counts=lambda w: [64 + 7 * r for r in range(w)], capacity_factor=0.6, top_k=4),
    "empty-rank": dict(counts=lambda w: [0] + [33 + r for r in range(1, w)], capacity_factor=None, top_k=2),
}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=("bf16", "fp32"))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world_size", (2, 4, 8))
@gpu_test
def test_every_rank_matches_single_process(world_size, case, dtype):
    spec = CASES[case]
    weights = layer(100 + world_size, dtype, device="cuda")
    options = dict(top_k=spec["top_k"], capacity_factor=spec["capacity_factor"])
    counts = spec["counts"](world_size)
    xs = tokens(200 + world_size, counts, dtype, "cuda")
    with LoopbackWorld(world_size, **weights, max_tokens=max(counts), **options) as world:
        poison_heaps(world)
        check_world_call(world, xs, weights, options, f"W={world_size} {case}")
        assert world.epochs == [1] * world_size


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=("bf16", "fp32"))
@gpu_test
def test_shared_expert(dtype):
    weights = layer(300, dtype, shared=True, device="cuda")
    options = dict(top_k=2, capacity_factor=0.8)
    xs = tokens(301, [70, 0, 3, 129], dtype, "cuda")
    with LoopbackWorld(4, **weights, max_tokens=129, **options) as world:
        check_world_call(world, xs, weights, options, "shared expert")


@gpu_test
def test_twenty_calls_with_changing_tokens():
    """The heaps' flags are zeroed once; 20 back-to-back calls with new token counts each (a rank
    with none among them) advance every rank's device epoch and stay bitwise right."""
    dtype, world_size, max_tokens = torch.bfloat16, 4, 90
    weights = layer(400, dtype, device="cuda")
    options = dict(top_k=2, capacity_factor=1.0)
    rng = random.Random(401)
    with LoopbackWorld(world_size, **weights, max_tokens=max_tokens, **options) as world:
        poison_heaps(world)
        for call in range(20):
            counts = [rng.choice([0, 1, rng.randrange(max_tokens + 1), max_tokens]) for _ in range(world_size)]
            check_world_call(world, tokens(402 + call, counts, dtype, "cuda"), weights, options, f"call {call}")
        assert world.epochs == [20] * world_size


@gpu_test
def test_bits_do_not_depend_on_the_grid(monkeypatch):
    """Two CTAs per rank (FLASHMOE_CUDA_MAX_CTAS = 2W) give the bits of the full grid; fewer than
    2W CTAs is a clear error, not a hang."""
    dtype, world_size = torch.bfloat16, 4
    weights = layer(500, dtype, device="cuda")
    options = dict(top_k=2)
    xs = tokens(501, [40, 17, 0, 88], dtype, "cuda")
    with LoopbackWorld(world_size, **weights, max_tokens=88, **options) as world:
        full = [tuple(t.clone() for t in out) for out in world.forward(xs)]
        monkeypatch.setenv("FLASHMOE_CUDA_MAX_CTAS", str(2 * world_size))
        small = world.forward(xs)
        for r in range(world_size):
            for name, a, b in zip(OUTPUT_NAMES, full[r], small[r]):
                assert same_bits(a, b), f"rank {r}: {name} differs between the full grid and 2 CTAs per rank"
        monkeypatch.setenv("FLASHMOE_CUDA_MAX_CTAS", str(2 * world_size - 1))
        with pytest.raises(ValueError, match="needs 8 co-resident CTAs"):
            world.forward(xs)


@gpu_test
def test_cuda_graph_replays_advance_epochs():
    """A captured loopback call replays as new calls: every replay is a new epoch, and its outputs
    equal an eager call's on the same inputs."""
    dtype, world_size = torch.bfloat16, 2
    weights = layer(600, dtype, device="cuda")
    options = dict(top_k=2)
    xs = tokens(601, [50, 20], dtype, "cuda")
    with LoopbackWorld(world_size, **weights, max_tokens=50, **options) as world:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            world.forward(xs, check=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = world.forward(xs, check=False)
        for replay in range(3):
            graph.replay()
        torch.cuda.synchronize()
        world.check_status()
        assert world.epochs == [4] * world_size  # one warm-up call and three replays (capture runs nothing)
        eager = world.forward(xs)
        for r in range(world_size):
            for name, a, b in zip(OUTPUT_NAMES, captured[r], eager[r]):
                assert same_bits(a, b), f"rank {r}: {name} differs between a replay and an eager call"


@gpu_test
def test_call_guards_on_gpu():
    weights = layer(700, torch.bfloat16, device="cuda")
    with LoopbackWorld(2, **weights, max_tokens=8, top_k=2) as world:
        xs = tokens(701, [8, 9], torch.bfloat16, "cuda")
        with pytest.raises(ValueError, match="xs\\[1\\] has 9 tokens, more than the world's max_tokens=8"):
            world.forward(xs)
        with pytest.raises(ValueError, match="list of world_size=2"):
            world.forward(xs[:1])
        with pytest.raises(ValueError, match="xs\\[0\\] must be on the world's device"):
            world.forward([xs[0].cpu(), xs[0]])
    with pytest.raises(RuntimeError, match="destroyed"):
        world.forward(xs)


@gpu_test
def test_error_words_are_sticky_and_raise():
    """A rank whose status words are already set (as an earlier failed call leaves them) aborts at
    once; its peer gives up on it within the timeout instead of hanging, forward raises the kernel's
    text naming the rank, and the world refuses further calls."""
    weights = layer(800, torch.bfloat16, device="cuda")
    xs = tokens(801, [12, 30], torch.bfloat16, "cuda")
    with LoopbackWorld(2, **weights, max_tokens=30, top_k=2, peer_timeout_s=0.5) as world:
        world._status[1] = torch.tensor([4, 0, 0, 1], dtype=torch.int32, device="cuda")
        with pytest.raises(RuntimeError, match="persistent kernel of rank 1"):
            world.forward(xs)
        with pytest.raises(RuntimeError, match="unusable"):
            world.forward(xs)
