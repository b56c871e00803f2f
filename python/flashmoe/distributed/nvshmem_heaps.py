"""The ``nvshmem`` transport: the persistent CUDA kernel's expert parallelism over NVSHMEM heaps.

Not yet run on a GPU: written against docs/distributed.md and the EP kernel's host interface
(``_C.cuda_ep_heap_bytes``, ``_C.cuda_ep_workspace_bytes``, ``_C.moe_forward_cuda_ep``,
``_C.describe_kernel_error``), checked on the CPU with fakes of both.

Each rank's heap is one ``nvshmem_malloc`` of ``_C.cuda_ep_heap_bytes(problem, W, max_tokens)``
bytes, zeroed once at allocation (its flags are never cleared again: the kernel keeps an epoch
word in device memory and advances it itself, so CUDA-graph replays advance it too). The kernel
reaches rank r's heap by load and store at ``nvshmem_ptr(heap, r)``; a peer that only puts could
reach (0) makes the Context refuse the transport (the RDMA put path is not built yet), and
``"auto"`` then falls back to ``all_to_all``. Per call: enqueue the
kernel on the current stream; nothing synchronises unless the call checks (``Context.check``).
The four status words are sticky (csrc/cuda/kernel_error.h): zeroed with the heap, never per call.

Sizing: NVSHMEM's symmetric heap (``NVSHMEM_SYMMETRIC_SIZE``) is fixed at initialisation. When
unset, flashmoe sets it to :func:`symmetric_size_for` the first heap; when set too small for what
a Context needs, the Context raises ValueError naming the variable and the bytes.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from .. import _C
from ..ops import (_address, _empty_outputs, _problem, _shared_addresses, _validate_cuda, cuda_kernel_runs_on,
                   problem_shape, selection_bias_values)
from . import nvshmem

SYMMETRIC_SIZE_VARIABLE = "NVSHMEM_SYMMETRIC_SIZE"
DEFAULT_SYMMETRIC_SIZE = 1 << 30      # NVSHMEM's own default
SYMMETRIC_HEADROOM = 4                # the first heap times this: two doublings of max_tokens fit
SYMMETRIC_RESERVE = 64 << 20          # what NVSHMEM keeps for itself in the symmetric heap (an estimate)
SYMMETRIC_GRANULE = 256 << 20         # the size flashmoe sets is a multiple of this
STATUS_WORDS = 4                      # kernel_error.h kStatusWords
EP_FUNCTIONS = ("cuda_ep_heap_bytes", "cuda_ep_workspace_bytes", "moe_forward_cuda_ep")

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# The NVSHMEM state flashmoe initialised in this process: the symmetric size in effect and the bytes
# its Contexts hold (NVSHMEM is initialised once per process; every nvshmem Context shares its heap).
_state = {"symmetric_size": None, "allocated": 0, "group_ranks": None}


class PeerUnreachableError(RuntimeError):
    """Some peer's heap has no load/store address (nvshmem_ptr returned 0): only puts would reach it."""


# --------------------------------------------------------------------------- NVSHMEM_SYMMETRIC_SIZE

def parse_symmetric_size(text: str) -> int:
    """Bytes of an ``NVSHMEM_SYMMETRIC_SIZE`` value as NVSHMEM reads it: a non-negative integer or
    decimal with an optional k/m/g/t suffix (powers of 2^10, either case), rounded up; characters
    after the suffix are ignored. Raises ValueError naming the variable for anything else."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([kKmMgGtT].*)?\s*", str(text))
    if match is None:
        raise ValueError(f"{SYMMETRIC_SIZE_VARIABLE}={text!r} is not a size (a number of bytes with an optional "
                         f"k, m, g or t suffix, e.g. 4G)")
    scale = _SUFFIXES[match.group(2)[0].lower()] if match.group(2) else 1
    return math.ceil(float(match.group(1)) * scale)


def symmetric_size_for(heap_bytes: int) -> int:
    """What flashmoe sets ``NVSHMEM_SYMMETRIC_SIZE`` to when it is unset: room for the first heap
    times ``SYMMETRIC_HEADROOM`` (so max_tokens may double twice without re-initialising NVSHMEM)
    plus ``SYMMETRIC_RESERVE``, rounded up to ``SYMMETRIC_GRANULE``, and at least NVSHMEM's default."""
    wanted = SYMMETRIC_HEADROOM * int(heap_bytes) + SYMMETRIC_RESERVE
    return max(DEFAULT_SYMMETRIC_SIZE, -(-wanted // SYMMETRIC_GRANULE) * SYMMETRIC_GRANULE)


def symmetric_bytes_needed(heap_bytes: int, allocated: int = 0) -> int:
    """The symmetric size a heap of ``heap_bytes`` needs beside ``allocated`` bytes already held."""
    return int(allocated) + int(heap_bytes) + SYMMETRIC_RESERVE


def prepare_symmetric_size(heap_bytes: int, environ=None) -> int:
    """Before NVSHMEM is initialised: sets ``NVSHMEM_SYMMETRIC_SIZE`` from the heap when it is unset
    (:func:`symmetric_size_for`), else checks the value is large enough. Returns the size in effect."""
    environ = os.environ if environ is None else environ
    text = environ.get(SYMMETRIC_SIZE_VARIABLE)
    if text is None or not text.strip():
        size = symmetric_size_for(heap_bytes)
        environ[SYMMETRIC_SIZE_VARIABLE] = str(size)
        return size
    size = parse_symmetric_size(text)
    check_fits(heap_bytes, 0, size)
    return size


def check_fits(heap_bytes: int, allocated: int, size: int) -> None:
    """ValueError naming ``NVSHMEM_SYMMETRIC_SIZE`` when a heap of ``heap_bytes`` does not fit beside
    ``allocated`` bytes in a symmetric heap of ``size`` bytes."""
    needed = symmetric_bytes_needed(heap_bytes, allocated)
    if needed > size:
        held = f" beside the {allocated} bytes flashmoe's other contexts hold" if allocated else ""
        raise ValueError(f"{SYMMETRIC_SIZE_VARIABLE}={size} bytes is too small: the expert-parallel heap needs "
                         f"{heap_bytes} bytes{held} plus {SYMMETRIC_RESERVE} for NVSHMEM, {needed} bytes in all. "
                         f"Set {SYMMETRIC_SIZE_VARIABLE}={-(-needed // (1 << 20))}M or more before the first "
                         f"nvshmem Context (or leave it unset: flashmoe then sizes it), or lower max_tokens")


# --------------------------------------------------------------------------- readiness

MAX_WORLD = 64  # csrc/cuda/kernel_params.h kMaxWorld: the ranks one rank table holds


def unavailable_reason(device: torch.device, world_size: int = 1) -> Optional[str]:
    """Why the nvshmem transport cannot run on ``device`` in a group of ``world_size`` ranks in this
    process (None when it can)."""
    device = torch.device(device)
    if world_size > MAX_WORLD:
        return f"the EP kernel's rank table holds at most {MAX_WORLD} ranks, this group has {world_size}"
    if device.type != "cuda":
        return (f"transport='nvshmem' takes CUDA tensors, got {device.type!r} tensors: use 'symmetric', "
                f"'all_to_all' or 'auto'")
    if not nvshmem.is_built():
        return nvshmem._not_built_message()
    missing = [name for name in EP_FUNCTIONS if not hasattr(_C, name)]
    if missing:
        return (f"flashmoe._C has no {', '.join(missing)}: this flashmoe was built without the CUDA backend's "
                f"expert-parallel kernel (FLASHMOE_CUDA=ON with nvcc; see docs/distributed.md)")
    if not cuda_kernel_runs_on(device):
        return f"this build's CUDA kernel has no code for {device} (see flashmoe.build_info()['cuda_archs'])"
    return None


def _gather(group, value) -> list:
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def _raise_everywhere(group, error: Optional[BaseException], kind=RuntimeError) -> None:
    """Every rank raises ``kind`` when any rank has an error (so no rank goes on alone into a collective)."""
    errors = [text for text in _gather(group, None if error is None else str(error)) if text]
    if errors:
        raise kind("; ".join(sorted(set(errors)))) from error


# The only places that touch the device (tests on machines without a GPU replace them).

def _device_bytes(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of device memory at ``address`` (not owned)."""

    class _Memory:
        __cuda_array_interface__ = {"shape": (int(nbytes),), "typestr": "|u1", "data": (int(address), False),
                                    "version": 3, "strides": None}

    return torch.as_tensor(_Memory(), device=device)


def _device_words(count: int, device: torch.device) -> torch.Tensor:
    """``count`` zeroed 32-bit words of device memory (the epoch and status words)."""
    return torch.zeros(count, dtype=torch.int32, device=device)


def _zero_heap(address: int, nbytes: int, words: tuple, device: torch.device) -> None:
    """Zeroes a fresh heap and the words that go with it (epoch, status), and waits until done."""
    with torch.cuda.device(device):
        _device_bytes(address, nbytes, device).zero_()
        for tensor in words:
            tensor.zero_()
        torch.cuda.current_stream(device).synchronize()


def _synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _launch_scope(device: torch.device):
    """(context manager, stream handle) of a launch on ``device``'s current stream."""
    return torch.cuda.device(device), torch.cuda.current_stream(device).cuda_stream


def ensure_initialized(group, device: torch.device, heap_bytes: int) -> None:
    """Collective: NVSHMEM initialised once per process over ``group`` (its ranks are the PEs), with
    ``NVSHMEM_SYMMETRIC_SIZE`` sized for ``heap_bytes`` first. A later Context must use a group of the
    same ranks."""
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    error = None
    if nvshmem.initialized():
        if _state["group_ranks"] is None:  # initialised through flashmoe.distributed.nvshmem.init itself
            if nvshmem.n_pes() == len(ranks) and nvshmem.my_pe() == dist.get_rank(group):
                text = os.environ.get(SYMMETRIC_SIZE_VARIABLE, "").strip()
                _state.update(group_ranks=ranks, allocated=0,
                              symmetric_size=parse_symmetric_size(text) if text else DEFAULT_SYMMETRIC_SIZE)
        if _state["group_ranks"] != ranks:
            error = RuntimeError(f"flashmoe.distributed: NVSHMEM was initialised over the ranks {_state['group_ranks']}; "
                                 f"a Context over the ranks {ranks} cannot use it (one NVSHMEM job per process)")
        _raise_everywhere(group, error)
        return
    try:
        size = prepare_symmetric_size(heap_bytes)
    except ValueError as failure:
        error = failure
    _raise_everywhere(group, error, ValueError)
    # What nvshmem.init refuses on its own, refused here on every rank before its collective broadcast.
    foreign = nvshmem.foreign_host_libraries()
    if foreign:
        error = RuntimeError(f"rank {dist.get_rank(group)}: another copy of libnvshmem_host is loaded in this "
                             f"process ({foreign[0]}), e.g. by torch's NVSHMEM symmetric memory; flashmoe's nvshmem "
                             f"transport must own NVSHMEM's initialisation: use transport='all_to_all' "
                             f"(docs/distributed.md)")
    _raise_everywhere(group, error)
    nvshmem.init(group, device=device)
    _state.update(symmetric_size=size, allocated=0, group_ranks=ranks)


# --------------------------------------------------------------------------- the heaps of one Context

class NvshmemHeaps:
    """The NVSHMEM resources of one Context: this rank's heap, the peer table, the epoch and status words."""

    def __init__(self, context) -> None:
        self.context = context
        config = context.config
        self.problem = problem_shape(config.hidden_size, config.ffn_size, config.num_experts, config.top_k,
                                     gated=config.gated, activation=config.activation, normalize=config.normalize,
                                     scoring=config.scoring, dtype=config.dtype, has_router_bias=config.router_bias,
                                     has_b1=config.expert_bias_b1, has_b2=config.expert_bias_b2,
                                     shared_ffn=config.shared_ffn_size, has_shared_gate=config.shared_gate,
                                     **config.routing_options(), **config.activation_options())
        device = context.device
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.heap = 0
        self.heap_bytes = 0
        self.peers: list = []
        self.max_tokens = 0
        self.broken: Optional[str] = None
        ensure_initialized(context.group, self.device, self._heap_bytes(context.max_tokens))
        # Persistent device words: the epoch (zero before the first call; the kernel advances it) and
        # the status words (kernel_error.h: sticky, zeroed with the heap and never per call; non-zero:
        # the kernel gave up, and every later launch aborts at once and fills y with NaN).
        self.epoch = _device_words(1, self.device)
        self.status = _device_words(STATUS_WORDS, self.device)
        self._build(context.max_tokens)

    def _heap_bytes(self, max_tokens: int) -> int:
        return int(_C.cuda_ep_heap_bytes(self.problem, self.context.world_size, max_tokens))

    def _build(self, max_tokens: int) -> None:
        """Collective: (re)allocates this rank's heap for ``max_tokens``, zeroes it, maps every peer's."""
        context = self.context
        self._free()
        heap_bytes = self._heap_bytes(max_tokens)
        error = None
        try:
            check_fits(heap_bytes, _state["allocated"], _state["symmetric_size"])
        except ValueError as failure:
            error = failure
        _raise_everywhere(context.group, error, ValueError)
        address = nvshmem.malloc(heap_bytes)
        _state["allocated"] += heap_bytes
        self.heap, self.heap_bytes = address, heap_bytes
        # Zero once (the flags and everything else), finished before any peer can store into it: the
        # exchange below is the barrier. The epoch and status words restart with the flags.
        _zero_heap(address, heap_bytes, (self.epoch, self.status), self.device)
        peers = [nvshmem.ptr(address, pe) for pe in range(context.world_size)]
        unreachable = _gather(context.group, [pe for pe, peer in enumerate(peers) if peer == 0])
        if any(unreachable):
            self._free()
            pairs = ", ".join(f"rank {rank} cannot load/store the heap of rank(s) {pes}"
                              for rank, pes in enumerate(unreachable) if pes)
            raise PeerUnreachableError(f"flashmoe.distributed: transport='nvshmem' needs every peer's heap reachable "
                                       f"by load/store (nvshmem_ptr; NVLink or the same GPU), but {pairs}; the RDMA "
                                       f"put path is not built yet: use transport='all_to_all' (or 'auto')")
        self.peers = peers
        self.max_tokens = max_tokens
        context.max_tokens = max_tokens

    def _free(self) -> None:
        """Collective ``nvshmem_free`` of the heap, after this device's work on it finished."""
        if not self.heap:
            return
        _synchronize(self.device)
        address, self.heap, self.peers = self.heap, 0, []
        _state["allocated"] -= self.heap_bytes
        self.heap_bytes = 0
        nvshmem.free(address)

    def close(self, collective: bool = True) -> None:
        """Releases the heap: collectively (nvshmem_free), or, when a peer may be gone (a kernel error,
        interpreter exit), only forgets it: NVSHMEM reclaims it at finalisation or process exit."""
        if collective and self.broken is None:
            self._free()
        else:
            _state["allocated"] -= self.heap_bytes
            self.heap, self.heap_bytes, self.peers = 0, 0, []

    # ----------------------------------------------------------------------- calls

    def _largest_request(self, tokens: int) -> int:
        """Collective: the most tokens any rank asked for beyond the heaps this call (0: none asked).
        Runs after the launch was checked, so every peer was alive through this epoch."""
        from .all_to_all import exchange_device

        largest = torch.tensor([tokens], dtype=torch.int64)
        largest = largest.to(exchange_device(self.context.group, largest))
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.context.group)
        return int(largest.item())

    def forward(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity_factor, selection_bias, shared,
                check: bool = True):
        """One call. Checked (``check`` and not capturing a CUDA graph), it mirrors the symmetric
        transport's growth rule: a rank whose tokens pass max_tokens runs this epoch without tokens;
        after the launch is checked, the ranks agree on the largest request (one small all_reduce),
        and if there is one, all grow their heaps together and the askers run their call again (the
        others run an epoch without tokens). Unchecked, nothing touches the host and the tokens must fit."""
        context = self.context
        if self.broken is not None:
            raise RuntimeError(f"flashmoe.distributed: this Context is unusable after a kernel error "
                               f"({self.broken}); destroy() it and create another")
        if not self.heap:
            raise RuntimeError("flashmoe.distributed: the NVSHMEM heaps of this Context are gone (destroyed)")
        if x.device != self.device:
            raise ValueError(f"x must be on {self.device} (the device of this Context), got {x.device}")
        _validate_cuda(x, router_weight, w1, w2, router_bias, b1, b2, shared=shared)
        tokens = x.shape[0]
        checked = check and not _capturing()
        oversized = tokens > self.max_tokens
        if oversized and not checked:
            raise ValueError(f"flashmoe.distributed: rank {context.rank} brings {tokens} tokens, more than the "
                             f"heaps' max_tokens={self.max_tokens}; heaps grow only on checked calls outside CUDA-"
                             f"graph capture: create the Context with max_tokens >= {tokens} (its peers' kernels "
                             f"now time out waiting for this rank)")
        weights = (router_weight, w1, w2, router_bias, b1, b2, capacity_factor, selection_bias, shared)
        outputs = self._launch(x[:0] if oversized else x, *weights)
        if not checked:
            return outputs
        self.check()
        largest = self._largest_request(tokens if oversized else 0)
        if largest <= self.max_tokens:
            return outputs
        from .context import _bucket

        self._build(_bucket(largest))
        rerun = self._launch(x if oversized else x[:0], *weights)
        self.check()
        return rerun if oversized else outputs

    def _launch(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity_factor, selection_bias, shared):
        """Enqueues this rank's kernel on the current stream (T = 0 launches too: the rank owns experts
        and must signal every source). Returns the outputs. The status words are not zeroed: an error
        of an unchecked call stays for check() to find, and aborts every launch after it."""
        context, config = self.context, self.context.config
        bias_values = selection_bias_values(selection_bias, x)  # held until the launch is enqueued
        problem = _problem(x, w1, router_weight, router_bias, b1, b2, config.top_k, config.gated, config.activation,
                           config.normalize, config.scoring, capacity_factor, shared_w1=shared[0],
                           shared_gate=shared[2], selection_bias=bias_values, num_groups=config.num_groups,
                           topk_groups=config.topk_groups, routed_scaling_factor=config.routed_scaling_factor,
                           weight_on=config.weight_on, **config.activation_options())
        outputs = _empty_outputs(x, router_weight, config.top_k)
        y, topk_ids, topk_weights, expert_counts, router_logits, dropped = outputs
        allow_tf32 = x.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)
        device = self.device.index
        world = context.world_size
        workspace_bytes = int(_C.cuda_ep_workspace_bytes(problem, world, self.max_tokens, device, allow_tf32))
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=self.device)
        scope, stream = _launch_scope(self.device)
        with scope:
            _C.moe_forward_cuda_ep(
                problem=problem, x=_address(x), router_weight=_address(router_weight),
                router_bias=_address(router_bias), w1=_address(w1), b1=_address(b1), w2=_address(w2),
                b2=_address(b2), y=_address(y), topk_ids=_address(topk_ids), topk_weights=_address(topk_weights),
                expert_counts=_address(expert_counts), router_logits=_address(router_logits),
                dropped=_address(dropped), workspace=_address(workspace), workspace_bytes=workspace_bytes,
                allow_tf32=allow_tf32, device=device, stream=stream,
                **_shared_addresses(*shared), selection_bias=_address(bias_values),
                heaps=list(self.peers), rank=context.rank, world=world, max_tokens=self.max_tokens,
                epoch=_address(self.epoch), status=_address(self.status), peer_timeout_s=context.watchdog_seconds)
        return outputs

    def check(self) -> None:
        """Waits for the current stream, reads the status words; a kernel that gave up on a peer makes
        the Context unusable and raises RuntimeError naming this rank and the flag it waited for."""
        if self.broken is not None:
            raise RuntimeError(self.broken)
        words = [word & 0xFFFFFFFF for word in self.status.cpu().tolist()]  # the copy waits for the stream
        if words[0] == 0:
            return
        self.broken = _C.describe_kernel_error(words, self.context.rank, float(self.context.watchdog_seconds))
        raise RuntimeError(f"flashmoe.distributed: rank {self.context.rank} (nvshmem transport): {self.broken}")
