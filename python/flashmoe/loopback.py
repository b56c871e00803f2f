"""Loopback expert parallelism: W virtual ranks of the EP kernel on ONE CUDA device.

A test and benchmark vehicle, not a layer to train with. One cooperative launch runs W ranks'
persistent kernels side by side (the grid's CTAs split evenly, each rank with its own OS CTA,
workspace and heap); a rank reaches a peer's heap by load and store, the other rank's allocation
on the same GPU, through the same device code that reaches a peer over NVLink by ``nvshmem_ptr``.
So every rank's dispatch, remote GEMMs, returns, signals and device epochs run for real, on one GPU.

:class:`LoopbackWorld` owns what outlives a call, as an EP layer would: the W heaps (flags zeroed
once, at allocation), the W epoch words (the kernel advances them itself) and the W status words
(zeroed once too: they are sticky, a launch that finds them set aborts at once).
Each :meth:`LoopbackWorld.forward` takes every rank's tokens and returns every rank's outputs,
which equal, bit for bit, single-process ``flashmoe.moe`` on that rank's tokens with all E experts
(docs/cuda_kernel.md "Loopback"). :func:`loopback_moe` is the one-call form.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C, ops

# Ranks one rank table holds (csrc/cuda/kernel_params.h kMaxWorld) and virtual ranks one loopback
# launch holds (csrc/cuda/moe_cuda.h kMaxLoopbackWorld: its parameter block carries every rank's).
MAX_WORLD = 64
MAX_LOOPBACK_WORLD = 16
STATUS_WORDS = 4  # csrc/cuda/kernel_error.h kStatusWords

# One rank's outputs: (y [T, H], topk_ids [T, k] int32, topk_weights [T, k] fp32, expert_counts [E] int32,
# router_logits [T, E] fp32, dropped [] int64), as flashmoe::moe_forward returns them.
RankOutputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

_WORKSPACE_ALIGNMENT = 256  # csrc/cuda/workspace.h Workspace::kAlignment


def describe_kernel_error(status: Sequence[int], rank: int, timeout_s: float) -> str:
    """The RuntimeError text of one rank's kernel status words; '' when the call was healthy."""
    return _C.describe_kernel_error([int(word) & 0xFFFFFFFF for word in status], int(rank), float(timeout_s))


def _check_world(world_size) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if not 2 <= world_size <= MAX_WORLD:
        raise ValueError(f"world_size must be in [2, {MAX_WORLD}] for a loopback world, got {world_size}")
    if world_size > MAX_LOOPBACK_WORLD:
        raise ValueError(f"world_size {world_size}: one loopback launch holds at most {MAX_LOOPBACK_WORLD} virtual "
                         f"ranks (its parameter block carries every rank's); a real EP world holds up to {MAX_WORLD}")
    return world_size


class LoopbackWorld:
    """W virtual ranks of the EP kernel on one CUDA device, with heaps kept across calls.

    Args:
        world_size: W, 2..16 virtual ranks; it must divide E.
        router_weight: ``[E, H]``, the full router (replicated on every rank).
        w1: ``[E, 2I, H]`` (gated) or ``[E, I, H]``, all E experts; rank r runs ``w1[r*L:(r+1)*L]``, L = E / W.
        w2: ``[E, H, I]``, all E experts.
        top_k: k.
        max_tokens: the most tokens any rank brings to one call; sizes every heap.
        peer_timeout_s: how long a rank waits for a peer's flag before the call gives up (RuntimeError).
        The rest: flashmoe.moe's options (router_bias ``[E]``, b1 ``[E, 2I or I]``, b2 ``[E, H]``, the
        shared expert shared_w1 ``[2S or S, H]`` / shared_w2 ``[H, S]`` / shared_gate ``[1, H]``,
        selection_bias ``[E]``, ...). Under capacity, each rank's capacity counts its own tokens.

    Every tensor lives on one CUDA device in one dtype (bf16, fp16 or fp32), contiguous.
    """

    def __init__(self, world_size: int, router_weight: Tensor, w1: Tensor, w2: Tensor, *, top_k: int,
                 max_tokens: int, gated: bool = True, activation: str = "silu",
                 normalize: bool = True, scoring: str = "softmax",
                 capacity_factor: Optional[float] = None, router_bias: Optional[Tensor] = None,
                 b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, swiglu_limit: Optional[float] = None,
                 swiglu_alpha: Optional[float] = None, selection_bias: Optional[Tensor] = None, num_groups: int = 1,
                 topk_groups: int = 1, routed_scaling_factor: float = 1.0, weight_on: str = "output",
                 shared_w1: Optional[Tensor] = None, shared_w2: Optional[Tensor] = None,
                 shared_gate: Optional[Tensor] = None, peer_timeout_s: float = 60.0):
        world = _check_world(world_size)
        for name, tensor in (("router_weight", router_weight), ("w1", w1), ("w2", w2)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        experts = router_weight.shape[0]
        if experts % world:
            raise ValueError(f"world_size {world} must divide the number of experts E={experts}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if not (isinstance(peer_timeout_s, (int, float)) and math.isfinite(peer_timeout_s)
                and 0 < peer_timeout_s <= 1e6):
            raise ValueError(f"peer_timeout_s must be a number of seconds in (0, 1e6], got {peer_timeout_s!r}")
        self.options = dict(top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring,
                            capacity_factor=capacity_factor)
        self.routing = dict(selection_bias=selection_bias, num_groups=num_groups, topk_groups=topk_groups,
                            routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
        self.weights = dict(router_weight=router_weight, w1=w1, w2=w2, router_bias=router_bias, b1=b1, b2=b2)
        self.activation_options = dict(swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
        self.shared = (shared_w1, shared_w2, shared_gate)
        # The weights, checked once on a token-less x of the layer's dtype and device.
        probe = torch.empty((0, router_weight.shape[1]), dtype=w1.dtype, device=w1.device)
        self._validate(probe)
        self.device = w1.device
        if self.device.type != "cuda":
            raise ValueError(f"a LoopbackWorld runs W virtual ranks on one CUDA device; the weights are on "
                             f"{self.device} (move them with .cuda())")
        ops._validate_cuda(probe, router_weight, w1, w2, router_bias, b1, b2, shared=self.shared)
        if not ops.cuda_compiled():
            raise NotImplementedError("a LoopbackWorld needs flashmoe built with its CUDA backend "
                                      "(flashmoe._C.cuda_compiled is False)")
        if not ops.cuda_kernel_runs_on(self.device):
            raise NotImplementedError(f"this build's CUDA kernel has no code for {self.device} "
                                      f"(built for {_C.cuda_build_info()['archs']})")
        self.world_size, self.max_tokens, self.peer_timeout_s = world, max_tokens, float(peer_timeout_s)
        self.experts, self.local_experts = experts, experts // world
        self.hidden = router_weight.shape[1]
        self.dtype = w1.dtype
        self.device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        local = self.local_experts
        # Rank r's experts: views of the full weights (contiguous slices of dim 0).
        self._rank_weights = [
            {name: (None if tensor is None else tensor[r * local:(r + 1) * local])
             for name, tensor in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2))}
            for r in range(world)]
        layout = _C.HeapLayout(_C.ExpertPlacement(world, experts), max_tokens, top_k, self.hidden, probe.element_size())
        self.heap_bytes = layout.total_bytes()
        shape = self._problem(probe, 0)
        if self.heap_bytes != _C.cuda_ep_heap_bytes(shape, world, max_tokens):
            raise AssertionError("flashmoe: HeapLayout and cuda_ep_heap_bytes disagree (a build mismatch)")
        # Kept across calls: every heap's flags are zeroed here, once, never again (device epochs).
        self._heaps = [torch.empty(self.heap_bytes, dtype=torch.uint8, device=self.device) for _ in range(world)]
        for heap in self._heaps:
            heap[:2 * layout.flags_bytes()].zero_()
        self._epochs = torch.zeros(world, dtype=torch.int32, device=self.device)
        # Sticky (csrc/cuda/kernel_error.h): zeroed once, never per call, so that a graph replay after
        # an error aborts at once instead of yielding plausible y.
        self._status = torch.zeros((world, STATUS_WORDS), dtype=torch.int32, device=self.device)
        self._broken: Optional[str] = None
        self.calls = 0

    def _validate(self, x: Tensor) -> None:
        ops._validate(x, self.weights["router_weight"], self.weights["w1"], self.weights["w2"],
                      self.weights["router_bias"], self.weights["b1"], self.weights["b2"], self.options["top_k"],
                      self.options["gated"], self.options["activation"], self.options["normalize"],
                      self.options["scoring"], self.options["capacity_factor"], self.activation_options["swiglu_limit"],
                      self.activation_options["swiglu_alpha"], *self.shared, **self.routing)

    def _problem(self, x: Tensor, rank: int):
        w = self._rank_weights[rank]
        return ops._problem(x, w["w1"], self.weights["router_weight"], self.weights["router_bias"], w["b1"], w["b2"],
                            self.options["top_k"], self.options["gated"], self.options["activation"],
                            self.options["normalize"], self.options["scoring"], self.options["capacity_factor"],
                            self.activation_options["swiglu_limit"], self.activation_options["swiglu_alpha"],
                            self.shared[0], self.shared[2], **self.routing)

    @property
    def epochs(self) -> List[int]:
        """Every rank's epoch word (a host sync): the number of calls so far, modulo the epoch period."""
        return [int(e) & 0xFFFFFFFF for e in self._epochs.tolist()]

    def forward(self, xs: Sequence[Tensor], *, check: bool = True,
                out: Optional[Sequence[RankOutputs]] = None) -> List[RankOutputs]:
        """Runs one call of every rank: ``xs[r]`` is rank r's ``[T_r, H]`` tokens (T_r <= max_tokens,
        0 allowed), on the world's device and dtype. Returns each rank's outputs (see RankOutputs),
        written into ``out[r]`` when given (tensors of exactly those shapes and dtypes, contiguous).

        With ``check`` (default), waits for the launch and raises RuntimeError naming the rank and
        the flag when a rank's kernel gave up on a peer; after that the world is unusable. Without
        it nothing syncs (a benchmark checks :meth:`check_status` once at the end)."""
        if self._broken is not None:
            raise RuntimeError(f"this LoopbackWorld is unusable: {self._broken}")
        if self._heaps is None:
            raise RuntimeError("this LoopbackWorld was destroyed")
        if not isinstance(xs, (list, tuple)) or len(xs) != self.world_size:
            raise ValueError(f"xs must be a list of world_size={self.world_size} token tensors, got "
                             f"{len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__}")
        for r, x in enumerate(xs):
            if not isinstance(x, Tensor):
                raise TypeError(f"xs[{r}] must be a tensor, got {type(x).__name__}")
            if x.device != self.device:
                raise ValueError(f"xs[{r}] must be on the world's device {self.device}, got {x.device}")
            self._validate(x)
            if x.shape[0] > self.max_tokens:
                raise ValueError(f"xs[{r}] has {x.shape[0]} tokens, more than the world's max_tokens="
                                 f"{self.max_tokens}")
        allow_tf32 = self.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)
        problems = [self._problem(x, r) for r, x in enumerate(xs)]
        outputs = [ops._empty_outputs(x, self.weights["router_weight"], self.options["top_k"]) for x in xs]
        if out is not None:
            outputs = self._check_out(out, outputs)
        bias_values = [ops.selection_bias_values(self.routing["selection_bias"], x) for x in xs]
        sizes = [_C.cuda_ep_workspace_bytes(p, self.world_size, self.max_tokens, self.device_index, allow_tf32)
                 for p in problems]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-max(size, 1) // _WORKSPACE_ALIGNMENT) * _WORKSPACE_ALIGNMENT
        # Any contents will do: the launcher zeroes each rank's control block on the stream.
        workspace = torch.empty(total, dtype=torch.uint8, device=self.device)
        base = workspace.data_ptr()
        pointers = []
        for r, (x, out) in enumerate(zip(xs, outputs)):
            y, topk_ids, topk_weights, expert_counts, router_logits, dropped = out
            w = self._rank_weights[r]
            named = dict(x=x, router_weight=self.weights["router_weight"], router_bias=self.weights["router_bias"],
                         w1=w["w1"], b1=w["b1"], w2=w["w2"], b2=w["b2"], y=y, topk_ids=topk_ids,
                         topk_weights=topk_weights, expert_counts=expert_counts, router_logits=router_logits,
                         dropped=dropped, selection_bias=bias_values[r], shared_w1=self.shared[0],
                         shared_w2=self.shared[1], shared_gate=self.shared[2])
            addresses = {name: ops._address(tensor) for name, tensor in named.items()}
            addresses["workspace"] = base + offsets[r]
            pointers.append(addresses)
        epoch0, status0 = self._epochs.data_ptr(), self._status.data_ptr()
        with torch.cuda.device(self.device_index):
            _C.moe_forward_cuda_loopback(
                problems=problems, pointers=pointers, workspace_bytes=sizes,
                heaps=[heap.data_ptr() for heap in self._heaps],
                epochs=[epoch0 + 4 * r for r in range(self.world_size)],
                statuses=[status0 + 4 * STATUS_WORDS * r for r in range(self.world_size)],
                max_tokens=self.max_tokens, peer_timeout_s=self.peer_timeout_s, allow_tf32=allow_tf32,
                device=self.device_index, stream=torch.cuda.current_stream(self.device).cuda_stream)
        self.calls += 1
        if check:
            self.check_status()
        return [tuple(out) for out in outputs]

    __call__ = forward

    def _check_out(self, out, expected) -> list:
        if not isinstance(out, (list, tuple)) or len(out) != self.world_size:
            raise ValueError(f"out must hold world_size={self.world_size} tuples of outputs")
        names = ("y", "topk_ids", "topk_weights", "expert_counts", "router_logits", "dropped")
        for r, (given, want) in enumerate(zip(out, expected)):
            if not isinstance(given, (list, tuple)) or len(given) != len(names):
                raise ValueError(f"out[{r}] must be a tuple of {len(names)} tensors: {', '.join(names)}")
            for name, tensor, like in zip(names, given, want):
                if (not isinstance(tensor, Tensor) or tensor.shape != like.shape or tensor.dtype != like.dtype
                        or tensor.device != like.device or not tensor.is_contiguous()):
                    raise ValueError(f"out[{r}] {name} must be a contiguous {like.dtype} tensor of shape "
                                     f"{tuple(like.shape)} on {like.device}, got {getattr(tensor, 'shape', tensor)!r}")
        return [tuple(given) for given in out]

    def check_status(self) -> None:
        """Raises RuntimeError (describe_kernel_error's text, every failed rank) when the last call's
        kernel gave up on a peer. Synchronizes with the device."""
        failed = []
        for r, words in enumerate(self._status.tolist()):
            message = describe_kernel_error(words, r, self.peer_timeout_s)
            if message:
                failed.append(message)
        if failed:
            self._broken = failed[0]
            raise RuntimeError("\n".join(failed))

    def destroy(self) -> None:
        """Frees the heaps; the world cannot run again. Idempotent."""
        self._heaps = None
        self._epochs = self._status = None

    def __enter__(self) -> "LoopbackWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def loopback_moe(xs: Sequence[Tensor], router_weight: Tensor, w1: Tensor, w2: Tensor, *, top_k: int,
                 **options) -> List[RankOutputs]:
    """One call of a fresh :class:`LoopbackWorld` of ``len(xs)`` virtual ranks (max_tokens: the most
    any rank brings): every rank's outputs. A test vehicle; keep a LoopbackWorld to run many calls."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list of per-rank token tensors, got {type(xs).__name__}")
    max_tokens = max([1] + [int(x.shape[0]) for x in xs if isinstance(x, Tensor)])
    world = LoopbackWorld(len(xs), router_weight, w1, w2, top_k=top_k, max_tokens=max_tokens, **options)
    try:
        return world.forward(xs)
    finally:
        world.destroy()
