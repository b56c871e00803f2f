"""``Context``: the one owner of a process group's expert-parallel resources for one layer configuration.

A Context is created collectively (every rank of the group at the same call) on first use per
(group, configuration), or explicitly. At creation the ranks exchange their configurations and
raise ``ValueError`` on every rank, naming the first argument they disagree on, instead of
hanging in a mismatched exchange. It then picks the transport and, for ``"symmetric"``, maps the
shared-memory heaps (:mod:`.symmetric`), for ``"nvshmem"`` allocates the NVSHMEM heaps
(:mod:`.nvshmem_heaps`). It owns the heap sizing (``max_tokens``, grown when a larger call
arrives), the epoch (inside the native cluster, or a device word) and ``destroy()``.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import socket
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import reference
from ..ops import shared_ffn

TRANSPORTS = ("auto", "symmetric", "all_to_all", "nvshmem")
DEFAULT_WATCHDOG_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What every rank must agree on (the order is the order of the mismatch check)."""

    num_experts: int
    hidden_size: int
    ffn_size: int
    top_k: int
    dtype: torch.dtype
    gated: bool
    activation: str
    scoring: str
    normalize: bool
    capacity_factor: Optional[float]
    router_bias: bool
    expert_bias_b1: bool
    expert_bias_b2: bool
    # The routing options (see flashmoe.moe); they travel in the native Problem.
    selection_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    weight_on: str = "output"
    router_f32: bool = False
    shared_ffn_size: int = 0   # S of the replicated shared expert, 0 for none
    shared_gate: bool = False
    # L and alpha of the clamped SwiGLUs (reference.activation_options: defaults filled in, 0.0 unused).
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 0.0

    def routing_options(self) -> dict:
        """The keyword arguments of ops.problem_shape for the routing options."""
        return dict(has_selection_bias=self.selection_bias, num_groups=self.num_groups, topk_groups=self.topk_groups,
                    routed_scaling_factor=self.routed_scaling_factor, weight_on=self.weight_on,
                    router_f32=self.router_f32)

    def activation_options(self) -> dict:
        """swiglu_limit / swiglu_alpha as flashmoe.moe and ops.problem_shape take them (None: unused)."""
        return dict(swiglu_limit=self.swiglu_limit or None, swiglu_alpha=self.swiglu_alpha or None)

    def comparable(self) -> dict:
        return {field.name: (str(value) if isinstance(value, torch.dtype) else value)
                for field, value in ((f, getattr(self, f.name)) for f in dataclasses.fields(self))}


def host_id() -> str:
    """Names this host: ranks with equal ids can map each other's POSIX shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def _group_rank_and_size(group) -> tuple:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("flashmoe.distributed needs torch.distributed to be initialized "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _warn_cpu_fallback(reason: str) -> None:
    warnings.warn(f"flashmoe.distributed: transport='auto' took 'all_to_all' for CUDA tensors, which computes on "
                  f"the CPU (slow), because the nvshmem transport cannot run: {reason}", RuntimeWarning, stacklevel=4)


def _bucket(tokens: int) -> int:
    """Heap sizing: the next power of two, at least 16 tokens per rank."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(tokens, 1)))))


class Context:
    """Expert-parallel resources of one process group and one layer configuration.

    Args:
        config: the layer configuration every rank must share.
        group: a ``torch.distributed`` process group; None means the default group.
        transport: ``"symmetric"``, ``"all_to_all"``, ``"nvshmem"`` or ``"auto"``. ``"auto"``: for CPU
            tensors symmetric when every rank of the group is on this host, else all_to_all; for CUDA
            tensors nvshmem when every rank can run it (flashmoe._nvshmem built, the CUDA kernel for the
            device) and every peer's heap is reachable by load/store (nvshmem_ptr), else all_to_all.
        max_tokens: the most tokens one rank brings to one call before the symmetric heaps grow;
            None sizes them from the largest rank's tokens at creation (``tokens``).
        watchdog_seconds: a symmetric call that sees no progress for this long raises RuntimeError
            naming the rank and the flags it waits for; under nvshmem the kernel gives up on a peer's
            flag after this long and :meth:`check` raises (all_to_all relies on the group's timeout).
        threads: CPU threads per rank (default ``torch.get_num_threads()``).
        tokens: this rank's tokens in the call that creates the context (sizes the heaps).
        device: the device of the layer's tensors.

    Creation is collective. A configuration mismatch raises ValueError on every rank.
    """

    def __init__(self, config: LayerConfig, *, group=None, transport: str = "auto", max_tokens: Optional[int] = None,
                 watchdog_seconds: float = DEFAULT_WATCHDOG_SECONDS, threads: Optional[int] = None, tokens: int = 0,
                 device=torch.device("cpu")) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
        if not (isinstance(watchdog_seconds, (int, float)) and not isinstance(watchdog_seconds, bool)
                and math.isfinite(watchdog_seconds) and watchdog_seconds > 0):
            raise ValueError(f"watchdog_seconds must be a finite number > 0, got {watchdog_seconds!r}")
        self.group = group
        self.rank, self.world_size = _group_rank_and_size(group)
        self.config = config
        self.device = torch.device(device)
        self.watchdog_seconds = float(watchdog_seconds)
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        nvshmem_unavailable = None
        if transport in ("nvshmem", "auto") and self.device.type == "cuda":
            from .nvshmem_heaps import unavailable_reason
            nvshmem_unavailable = unavailable_reason(self.device, self.world_size)
        mine = dict(config=config.comparable(), transport=transport, max_tokens=max_tokens,
                    watchdog_seconds=self.watchdog_seconds, device=self.device.type, host=host_id(), tokens=int(tokens),
                    nvshmem_unavailable=nvshmem_unavailable)
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=group)
        self._check_agreement(everyone)
        if config.num_experts % self.world_size:
            raise ValueError(f"num_experts={config.num_experts} must be divisible by the world size {self.world_size}")
        self.local_experts = config.num_experts // self.world_size
        one_host = all(entry["host"] == everyone[0]["host"] for entry in everyone)
        nvshmem_ready = self.device.type == "cuda" and not any(entry["nvshmem_unavailable"] for entry in everyone)
        if transport == "nvshmem":
            if self.device.type != "cuda":
                raise ValueError(f"transport='nvshmem' takes CUDA tensors, got {self.device.type!r} tensors: use "
                                 f"'symmetric', 'all_to_all' or 'auto'")
            reasons = [f"rank {rank}: {entry['nvshmem_unavailable']}" for rank, entry in enumerate(everyone)
                       if entry["nvshmem_unavailable"]]
            if reasons:
                from .nvshmem import NvshmemUnavailableError
                raise NvshmemUnavailableError("flashmoe.distributed: transport='nvshmem' cannot run: "
                                              + "; ".join(reasons))
        if transport == "symmetric":
            if not one_host:
                hosts = sorted({entry["host"].split("/")[0] for entry in everyone})
                raise ValueError(f"transport='symmetric' needs every rank of the group on one host (its shared "
                                 f"memory is the symmetric heap); this group spans {hosts}: use 'all_to_all' or 'auto'")
            if self.device.type != "cpu":
                raise ValueError(f"transport='symmetric' runs on CPU tensors in this build, got {self.device.type!r} "
                                 f"(CUDA tensors: use 'nvshmem'), or use 'all_to_all' or 'auto'")
        elif transport == "auto":
            if self.device.type == "cpu":
                transport = "symmetric" if one_host else "all_to_all"
            else:
                transport = "nvshmem" if nvshmem_ready else "all_to_all"
                if not nvshmem_ready:
                    reason = next(entry["nvshmem_unavailable"] for entry in everyone if entry["nvshmem_unavailable"])
                    _warn_cpu_fallback(reason)
        largest = max(entry["tokens"] for entry in everyone)
        self.max_tokens = max_tokens if max_tokens is not None else _bucket(largest)
        self._symmetric = None
        self._nvshmem = None
        self._destroyed = False
        if transport == "symmetric":
            from .symmetric import SymmetricHeaps
            self._symmetric = SymmetricHeaps(self)
        elif transport == "nvshmem":
            from .nvshmem_heaps import NvshmemHeaps, PeerUnreachableError
            try:
                self._nvshmem = NvshmemHeaps(self)
            except PeerUnreachableError as error:
                if mine["transport"] != "auto":
                    raise
                transport = "all_to_all"  # every rank saw the same table (the error is raised everywhere)
                _warn_cpu_fallback(str(error))
        self.transport = transport
        _live_contexts.append(self)

    def _check_agreement(self, everyone: list) -> None:
        ordered = [("config", name) for name in everyone[0]["config"]] + [
            (None, "transport"), (None, "max_tokens"), (None, "watchdog_seconds"), (None, "device")]
        for section, name in ordered:
            values = [entry[section][name] if section else entry[name] for entry in everyone]
            for rank, value in enumerate(values):
                if value != values[0]:
                    raise ValueError(f"flashmoe.distributed: the ranks disagree on {name}: rank 0 has {values[0]!r}, "
                                     f"rank {rank} has {value!r} (every rank must pass the same {name})")

    @property
    def epoch(self) -> int:
        """The epoch of this rank's last symmetric or nvshmem call (0 before the first or under all_to_all;
        nvshmem: reads the device word, so it waits for the stream)."""
        if self._nvshmem is not None:
            return int(self._nvshmem.epoch.cpu().item()) & 0xFFFFFFFF
        return 0 if self._symmetric is None else self._symmetric.epoch()

    @property
    def heap_bytes(self) -> int:
        """Bytes of this rank's symmetric or NVSHMEM heap (0 under all_to_all)."""
        if self._nvshmem is not None:
            return self._nvshmem.heap_bytes
        return 0 if self._symmetric is None else self._symmetric.heap_bytes

    def check(self) -> None:
        """Raises the error of a call that went wrong on the device (nvshmem: waits for this device's
        work and reads the kernel's status words; a kernel that gave up on a peer raises RuntimeError
        naming this rank and the flag, and the Context becomes unusable). The other transports raise
        from the call itself, so this returns at once for them."""
        if self._destroyed:
            raise RuntimeError("flashmoe.distributed: this Context was destroyed")
        if self._nvshmem is not None:
            self._nvshmem.check()

    def forward(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity, selection_bias=None,
                shared=(None, None, None), check: bool = True):
        """One call on this rank's tokens; see :func:`flashmoe.distributed.moe`. ``shared``: the
        (shared_w1, shared_w2, shared_gate) of a shared expert, or Nones. ``check`` (nvshmem): agree on
        the heap size and :meth:`check` after the launch (both skipped while capturing a CUDA graph).
        Returns (y, topk_ids, topk_weights, expert_counts, router_logits, dropped)."""
        if self._destroyed:
            raise RuntimeError("flashmoe.distributed: this Context was destroyed")
        if x.device.type != self.device.type:
            raise ValueError(f"x is on {x.device}, but this Context was created for {self.device.type} tensors")
        if self._nvshmem is not None:
            return self._nvshmem.forward(x, router_weight, w1, w2, router_bias, b1, b2, capacity, selection_bias,
                                         shared, check=check)
        if self._symmetric is not None:
            return self._symmetric.forward(x, router_weight, w1, w2, router_bias, b1, b2, capacity, selection_bias,
                                           shared)
        from .all_to_all import forward
        return forward(self, x, router_weight, w1, w2, router_bias, b1, b2, capacity, selection_bias, shared)

    def destroy(self, collective: bool = True) -> None:
        """Releases the shared-memory mappings (the segments were unlinked at creation) or the NVSHMEM
        heap. Idempotent. Under nvshmem it is collective (``nvshmem_free``) unless ``collective=False``
        or a kernel error broke the Context (a peer may be gone): then the heap is only forgotten, and
        NVSHMEM reclaims it at finalisation or process exit."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._symmetric is not None:
            self._symmetric.close()
            self._symmetric = None
        if self._nvshmem is not None:
            heaps, self._nvshmem = self._nvshmem, None
            heaps.close(collective=collective)
        for key, context in list(_contexts.items()):
            if context is self:
                del _contexts[key]
        if self in _live_contexts:
            _live_contexts.remove(self)

    def __repr__(self) -> str:
        return (f"Context(rank={self.rank}, world_size={self.world_size}, transport={self.transport!r}, "
                f"max_tokens={self.max_tokens}, local_experts={self.local_experts})")


_contexts: dict = {}
_live_contexts: list = []


def context_for(config: LayerConfig, *, group, transport: str, tokens: int, device, watchdog_seconds: float) -> Context:
    """The cached Context of (group, config, transport, device), created collectively on first use."""
    device = torch.device(device)
    key = (id(group) if group is not None else None, config, transport, float(watchdog_seconds), device.type,
           device.index)
    context = _contexts.get(key)
    if context is None or context._destroyed:
        context = Context(config, group=group, transport=transport, tokens=tokens, device=device,
                          watchdog_seconds=watchdog_seconds)
        _contexts[key] = context
    return context


def destroy_all(collective: bool = True) -> None:
    """Destroys every Context of this process (collective: every rank calls it, before destroying
    the process groups). At interpreter exit it runs with ``collective=False``: a peer may be gone."""
    for context in list(_live_contexts):
        context.destroy(collective=collective)


atexit.register(destroy_all, collective=False)


def layer_config(x, router_weight, w1, w2, *, top_k, gated, activation, normalize, scoring, capacity_factor,
                 router_bias, b1, b2, selection_bias=None, num_groups=1, topk_groups=1, routed_scaling_factor=1.0,
                 weight_on="output", shared_w1=None, shared_w2=None, shared_gate=None, swiglu_limit=None,
                 swiglu_alpha=None) -> LayerConfig:
    """The LayerConfig of one call, after validating its arguments (local experts in w1, w2, b1, b2)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [T, H], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H] (this rank's tokens), got shape {list(x.shape)}")
    if x.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"x must have a dtype in {reference.FLOAT_DTYPES}, got {x.dtype}")
    if not isinstance(router_weight, torch.Tensor) or router_weight.dim() != 2:
        raise ValueError(f"router_weight must be an [E, H] tensor, got {getattr(router_weight, 'shape', router_weight)!r}")
    experts, hidden = router_weight.shape
    if hidden != x.shape[1]:
        raise ValueError(f"router_weight must be [E, H={x.shape[1]}], got {list(router_weight.shape)}")
    if not isinstance(w2, torch.Tensor) or w2.dim() != 3:
        raise ValueError(f"w2 must be an [L, H, I] tensor of this rank's experts, got {getattr(w2, 'shape', w2)!r}")
    local, ffn = w2.shape[0], w2.shape[2]
    rows = 2 * ffn if gated else ffn
    if local < 1:
        raise ValueError("w2 must hold at least one local expert")
    shapes = [("router_weight", router_weight, (experts, hidden)), ("w1", w1, (local, rows, hidden)),
              ("w2", w2, (local, hidden, ffn))]
    shapes += [(name, tensor, shape) for name, tensor, shape in (
        ("router_bias", router_bias, (experts,)), ("b1", b1, (local, rows)), ("b2", b2, (local, hidden)))
        if tensor is not None]
    for name, tensor, shape in shapes:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (L={local} local experts of E={experts}), "
                             f"got {list(tensor.shape)}")
        router_f32 = name.startswith("router") and reference.router_f32(x.dtype, router_weight.dtype)
        if name == "router_bias" and tensor.dtype != router_weight.dtype:
            raise TypeError(f"router_bias must have dtype {router_weight.dtype} (the dtype of router_weight), "
                            f"got {tensor.dtype}")
        if tensor.dtype != x.dtype and not router_f32:
            raise TypeError(f"{name} must have dtype {x.dtype} (the dtype of x)"
                            f"{' or torch.float32 (an fp32 router)' if name == 'router_weight' and x.dtype in (torch.bfloat16, torch.float16) else ''}"
                            f", got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on {x.device} (the device of x), got {tensor.device}")
    reference.validate_options(experts, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
                               normalize=normalize, capacity_factor=capacity_factor, num_groups=num_groups,
                               topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
                               weight_on=weight_on)
    if selection_bias is not None:
        reference._check_selection_bias(selection_bias, x, experts)
    reference._check_activation_options(activation, gated, swiglu_limit, swiglu_alpha)
    limit, alpha = reference.activation_options(activation, swiglu_limit, swiglu_alpha)
    reference.check_shared_expert(x, shared_w1, shared_w2, shared_gate, gated=gated)
    return LayerConfig(experts, hidden, ffn, top_k, x.dtype, gated, activation, scoring, normalize,
                       None if capacity_factor is None else float(capacity_factor), router_bias is not None,
                       b1 is not None, b2 is not None, selection_bias is not None, num_groups, topk_groups,
                       float(routed_scaling_factor), weight_on, reference.router_f32(x.dtype, router_weight.dtype),
                       shared_ffn(shared_w1, gated), shared_gate is not None, limit, alpha)
