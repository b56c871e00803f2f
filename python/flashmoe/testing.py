"""Expert parallelism on one machine: W simulated ranks running the dataflow protocol.

The CPU runtime behind this module is the same one the native operator runs at W=1: each rank has
its own simulated symmetric heap, dispatches its tokens into the heaps of the experts' owners,
publishes SignalWords, and computes, returns and combines exactly as the GPU kernel does.
It is how the protocol is proven on machines without GPUs; see docs/protocol.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C, reference
from .ops import _address, _empty_outputs, problem_shape, shared_ffn

FAULTS = ("none", "skip_empty_dispatch_signal", "stale_epoch", "slow_gate", "stuck_gate")


class SimulatedCluster:
    """W ranks with persistent simulated symmetric heaps, for repeated expert-parallel calls.

    Args:
        hidden_size, ffn_size, num_experts, top_k: the layer shape (E divisible by world_size).
        world_size: W, the number of simulated ranks; expert e lives on rank ``e // (E // W)``.
        max_tokens: the most tokens any rank may bring to one call (sizes the heaps).
        dtype: float32, bfloat16, float16 or float64.
        gated, activation, normalize, scoring: as in :func:`flashmoe.moe`.
        with_router_bias, with_b1, with_b2: whether calls pass router_bias, b1, b2.
        threads_per_rank: processor threads per rank.
        chaos_seed: None, or a seed for chaos mode (random delays and yields at every send,
            poll and task boundary, and a shuffled task order). Results must not change.
        fault: a deliberate fault, for tests that prove faults are caught:
            ``"skip_empty_dispatch_signal"`` or ``"stale_epoch"`` (protocol), ``"stuck_gate"``
            (rank 0's first member stops in its gate), or ``"slow_gate"`` (it works there, beating,
            for 3 watchdog timeouts: honest, so the watchdog must not fire).
        watchdog_seconds: a wait during which no member it waits on advanced its heartbeat for
            this long raises RuntimeError naming the rank, the role and what it waits for.
        shared_ffn_size: S of a shared expert (0: none); calls then pass shared_w1 and shared_w2,
            replicated: every rank runs it on its own tokens. with_shared_gate: calls pass shared_gate.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, *, world_size: int,
                 max_tokens: int, dtype: torch.dtype = torch.float32, gated: bool = True, activation: str = "silu",
                 normalize: bool = True, scoring: str = "softmax", with_router_bias: bool = False,
                 with_b1: bool = False, with_b2: bool = False, threads_per_rank: int = 1, chaos_seed: Optional[int] = None,
                 fault: str = "none", watchdog_seconds: float = 60.0, shared_ffn_size: int = 0,
                 with_shared_gate: bool = False) -> None:
        reference.validate_layer(hidden_size, ffn_size, num_experts, dtype=dtype, top_k=top_k, gated=gated,
                                 activation=activation, normalize=normalize, scoring=scoring)
        for name, value in (("world_size", world_size), ("max_tokens", max_tokens),
                            ("threads_per_rank", threads_per_rank)):
            reference.check_count(name, value)
        if num_experts % world_size:
            raise ValueError(f"num_experts must be a positive multiple of world_size={world_size}, got {num_experts!r}")
        for name, value in (("with_router_bias", with_router_bias), ("with_b1", with_b1), ("with_b2", with_b2)):
            reference.check_bool(name, value)
        reference.check_choice("fault", fault, FAULTS)
        if chaos_seed is not None:
            reference.check_count("chaos_seed", chaos_seed, minimum=0)
            if chaos_seed >= 2**64:
                raise ValueError(f"chaos_seed must be below 2**64, got {chaos_seed}")
        reference.check_real("watchdog_seconds", watchdog_seconds, positive=True)
        reference.check_count("shared_ffn_size", shared_ffn_size, minimum=0)
        reference.check_bool("with_shared_gate", with_shared_gate)
        if with_shared_gate and not shared_ffn_size:
            raise ValueError("with_shared_gate=True needs a shared expert (shared_ffn_size > 0)")
        shape = problem_shape(hidden_size, ffn_size, num_experts, top_k, gated=gated, activation=activation,
                              normalize=normalize, scoring=scoring, dtype=dtype, has_router_bias=with_router_bias,
                              has_b1=with_b1, has_b2=with_b2, shared_ffn=shared_ffn_size,
                              has_shared_gate=with_shared_gate)
        problem_error = shape.validate()
        if problem_error:
            raise ValueError(f"flashmoe: {problem_error}")
        self.world_size, self.max_tokens, self.dtype, self.top_k = world_size, max_tokens, dtype, top_k
        self.hidden_size, self.ffn_size, self.num_experts = hidden_size, ffn_size, num_experts
        self.with_router_bias, self.with_b1, self.with_b2 = with_router_bias, with_b1, with_b2
        self.shared_ffn_size, self.with_shared_gate = shared_ffn_size, with_shared_gate
        self.gated, self.activation, self.normalize, self.scoring = gated, activation, normalize, scoring
        self._cluster = _C.Cluster(shape=shape, world_size=world_size, max_tokens=max_tokens,
                                   threads_per_rank=threads_per_rank, chaos=chaos_seed is not None,
                                   chaos_seed=chaos_seed or 0, fault=getattr(_C.Fault, fault),
                                   watchdog_seconds=float(watchdog_seconds))

    @property
    def heap_bytes(self) -> int:
        """Bytes of one rank's simulated symmetric heap."""
        return self._cluster.heap_bytes

    def epoch(self, rank: int) -> int:
        """The epoch of rank's last call (1..65535, wrapping to 1)."""
        return self._cluster.epoch(rank)

    def forward(self, xs: Sequence[Tensor], router_weight: Tensor, w1: Tensor, w2: Tensor, *,
                capacity_factor: Optional[float] = None, router_bias: Optional[Tensor] = None,
                b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, repeats: int = 1,
                return_routing: bool = False, shared_w1: Optional[Tensor] = None,
                shared_w2: Optional[Tensor] = None, shared_gate: Optional[Tensor] = None):
        """One expert-parallel forward: rank r brings ``xs[r]`` ``[T_r, H]`` (T_r may be 0).

        Capacity is per (source rank, expert): ``ceil(capacity_factor · T_r · k / E)``.
        With ``repeats > 1`` each rank runs that many calls back to back, never waiting for the
        other ranks between calls. Returns ``[y_r]``, or ``([y_r], [Routing_r])``.
        """
        reference.check_count("repeats", repeats)
        # Every repeat reads the same inputs and writes the same outputs.
        return self._run([xs], router_weight, w1, w2, capacity_factor, router_bias, b1, b2, return_routing,
                         repeats=repeats, shared=(shared_w1, shared_w2, shared_gate))[0]

    def forward_calls(self, calls: Sequence[Sequence[Tensor]], router_weight: Tensor, w1: Tensor, w2: Tensor, *,
                      capacity_factor: Optional[float] = None, router_bias: Optional[Tensor] = None,
                      b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, return_routing: bool = False,
                      shared_w1: Optional[Tensor] = None, shared_w2: Optional[Tensor] = None,
                      shared_gate: Optional[Tensor] = None):
        """Several forwards in one go: ``calls[c][r]`` is rank r's ``[T, H]`` input of call c.

        Every rank runs its calls back to back and never waits for the other ranks between them,
        so ranks drift up to one epoch apart while each call brings new inputs. Returns, per call,
        what :meth:`forward` returns.
        """
        return self._run(calls, router_weight, w1, w2, capacity_factor, router_bias, b1, b2, return_routing,
                         shared=(shared_w1, shared_w2, shared_gate))

    def _run(self, calls, router_weight, w1, w2, capacity_factor, router_bias, b1, b2, return_routing, repeats=1,
             shared=(None, None, None)):
        if not isinstance(calls, (list, tuple)) or not calls:
            raise ValueError("calls must be a non-empty list of per-rank input lists")
        reference.check_bool("return_routing", return_routing)
        # The runtime indexes every buffer with the cluster's shape: weights must have exactly it.
        for name, tensor, expected in (
                ("router_weight", router_weight, (self.num_experts, self.hidden_size)),
                ("w2", w2, (self.num_experts, self.hidden_size, self.ffn_size))):
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
                got = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must have shape {list(expected)} (this cluster's shape), got {got}")
        for name, tensor, declared, flag in (("router_bias", router_bias, self.with_router_bias, "with_router_bias"),
                                             ("b1", b1, self.with_b1, "with_b1"), ("b2", b2, self.with_b2, "with_b2")):
            if (tensor is not None) != declared:
                raise ValueError(f"{name} {'is missing' if declared else 'was given'}, but the cluster was built "
                                 f"with {flag}={declared}")
        shared_w1, shared_w2, shared_gate = shared
        for name, tensor, declared, flag in (
                ("shared_w1", shared_w1, self.shared_ffn_size > 0, "shared_ffn_size"),
                ("shared_w2", shared_w2, self.shared_ffn_size > 0, "shared_ffn_size"),
                ("shared_gate", shared_gate, self.with_shared_gate, "with_shared_gate")):
            if (tensor is not None) != declared:
                raise ValueError(f"{name} {'is missing' if declared else 'was given'}, but the cluster was built "
                                 f"with {flag}={getattr(self, flag)}")
        if shared_w1 is not None and isinstance(shared_w1, Tensor) and shared_w1.dim() == 2 and \
                shared_w1.shape[0] != (2 if self.gated else 1) * self.shared_ffn_size:
            raise ValueError(f"shared_w1 must have {(2 if self.gated else 1) * self.shared_ffn_size} rows (this "
                             f"cluster's shared_ffn_size={self.shared_ffn_size}), got {list(shared_w1.shape)}")
        outputs = []
        for call, xs in enumerate(calls):
            if not isinstance(xs, (list, tuple)):
                raise TypeError(f"xs must be a list of {self.world_size} [T_r, H] tensors, one per rank, got "
                                f"{type(xs).__name__}" + (f" in calls[{call}]" if len(calls) > 1 else ""))
            if len(xs) != self.world_size:
                raise ValueError(f"xs must hold one tensor per rank ({self.world_size}), got {len(xs)}"
                                 + (f" in calls[{call}]" if len(calls) > 1 else ""))
            outputs.append([self._rank_outputs(rank, x, router_weight, w1, w2, capacity_factor, router_bias, b1, b2,
                                               shared)
                            for rank, x in enumerate(xs)])
        weights = [t if t is None else t.contiguous()
                   for t in (router_weight, router_bias, w1, b1, w2, b2, shared_w1, shared_w2, shared_gate)]
        tuples = [[self._rank_tuple(out) for out in call] for call in outputs]
        self._cluster.forward(router_weight=_address(weights[0]), router_bias=_address(weights[1]),
                              w1=_address(weights[2]), b1=_address(weights[3]), w2=_address(weights[4]),
                              b2=_address(weights[5]), calls=tuples * repeats, shared_w1=_address(weights[6]),
                              shared_w2=_address(weights[7]), shared_gate=_address(weights[8]))
        results = []
        for call in outputs:
            ys = [out["y"] for out in call]
            routings = [reference.Routing(o["topk_ids"], o["topk_weights"], o["expert_counts"], o["dropped"],
                                          o["router_logits"]) for o in call]
            results.append((ys, routings) if return_routing else ys)
        return results

    def _rank_outputs(self, rank, x, router_weight, w1, w2, capacity_factor, router_bias, b1, b2, shared) -> dict:
        """Validates rank's input and allocates its outputs (the x it will read included)."""
        # This rank's tokens against the cluster's shape first, so a stray rank is the one named.
        name = f"xs[{rank}]"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [T, H={self.hidden_size}], got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype} (the cluster's dtype), got {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"{name} must have shape [T, H={self.hidden_size}], got {list(x.shape)}")
        reference.validate(x, router_weight, w1, w2, top_k=self.top_k, gated=self.gated, activation=self.activation,
                           scoring=self.scoring, capacity_factor=capacity_factor, router_bias=router_bias, b1=b1,
                           b2=b2, normalize=self.normalize, shared_w1=shared[0], shared_w2=shared[1],
                           shared_gate=shared[2], x_name=name)
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"xs[{rank}] has {x.shape[0]} tokens, more than max_tokens={self.max_tokens}")
        x = x.contiguous()
        names = ("y", "topk_ids", "topk_weights", "expert_counts", "router_logits", "dropped")
        outputs = dict(zip(names, _empty_outputs(x, router_weight, self.top_k)))
        capacity = reference.expert_capacity(capacity_factor, x.shape[0], self.top_k, router_weight.shape[0])
        return dict(x=x, capacity=capacity, **outputs)

    @staticmethod
    def _rank_tuple(out: dict) -> tuple:
        capacity = -1 if out["capacity"] is None else out["capacity"]
        return (_address(out["x"]), out["x"].shape[0], capacity, _address(out["y"]), _address(out["topk_ids"]),
                _address(out["topk_weights"]), _address(out["expert_counts"]), _address(out["router_logits"]),
                _address(out["dropped"]))


def simulate_expert_parallel(xs: Sequence[Tensor], router_weight: Tensor, w1: Tensor, w2: Tensor, *, top_k: int,
                             world_size: int, gated: bool = True, activation: str = "silu", normalize: bool = True,
                             scoring: str = "softmax", capacity_factor: Optional[float] = None,
                             router_bias: Optional[Tensor] = None, b1: Optional[Tensor] = None,
                             b2: Optional[Tensor] = None, chaos_seed: Optional[int] = None,
                             threads_per_rank: int = 1, shared_w1: Optional[Tensor] = None,
                             shared_w2: Optional[Tensor] = None, shared_gate: Optional[Tensor] = None) -> list[Tensor]:
    """Runs one expert-parallel MoE forward over ``world_size`` simulated ranks.

    Args:
        xs: ``world_size`` tensors ``[T_r, H]``; rank r's tokens (T_r may be 0).
        router_weight, w1, w2, router_bias, b1, b2: all E experts, as in :func:`flashmoe.moe`;
            expert e belongs to rank ``e // (E // world_size)``.
        top_k, gated, activation, normalize, scoring: as in :func:`flashmoe.moe`.
        capacity_factor: None (dropless), or per (source rank, expert) capacity
            ``ceil(capacity_factor · T_r · k / E)``.
        chaos_seed: None, or a seed for chaos mode.
        threads_per_rank: processor threads per simulated rank.
        shared_w1, shared_w2, shared_gate: a shared expert, as in :func:`flashmoe.moe`: replicated,
            every rank runs it on its own tokens.

    Returns:
        Each rank's output ``[T_r, H]``. By the contract it equals ``flashmoe.moe(xs[r], ...)``.
    """
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError("xs must be a non-empty list of [T_r, H] tensors, one per rank")
    reference.check_count("world_size", world_size)
    if len(xs) != world_size:
        raise ValueError(f"xs must hold one tensor per rank (world_size={world_size}), got {len(xs)}")
    # The shared validator on rank 0's tokens names a bad weight or option before the cluster's
    # shape is read from the weights; the cluster then checks every rank's tokens against it.
    reference.validate(xs[0], router_weight, w1, w2, top_k=top_k, gated=gated, activation=activation,
                       scoring=scoring, capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2,
                       normalize=normalize, shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate,
                       x_name="xs[0]")
    experts, hidden = router_weight.shape
    ffn = w2.shape[-1]
    max_tokens = max([1] + [x.shape[0] for x in xs if isinstance(x, Tensor) and x.dim() == 2])
    cluster = SimulatedCluster(hidden, ffn, experts, top_k, world_size=world_size, max_tokens=max_tokens,
                               dtype=router_weight.dtype, gated=gated, activation=activation, normalize=normalize,
                               scoring=scoring, with_router_bias=router_bias is not None,
                               with_b1=b1 is not None, with_b2=b2 is not None, threads_per_rank=threads_per_rank,
                               chaos_seed=chaos_seed, shared_ffn_size=shared_ffn(shared_w1, gated),
                               with_shared_gate=shared_gate is not None)
    return cluster.forward(xs, router_weight, w1, w2, capacity_factor=capacity_factor, router_bias=router_bias,
                           b1=b1, b2=b2, shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate)
