"""``flashmoe.distributed.moe``: the functional form of expert parallelism, with autograd."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..reference import Routing
from .backward import backward as _backward
from .context import DEFAULT_WATCHDOG_SECONDS, TRANSPORTS, Context, _group_rank_and_size, context_for, layer_config


def moe(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    top_k: int,
    group=None,
    transport: str = "auto",
    gated: bool = True,
    activation: str = "silu",
    normalize: bool = True,
    scoring: str = "softmax",
    capacity_factor: Optional[float] = None,
    router_bias: Optional[Tensor] = None,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    selection_bias: Optional[Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    weight_on: str = "output",
    shared_w1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
    shared_gate: Optional[Tensor] = None,
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: Optional[float] = None,
    return_routing: bool = False,
    context: Optional[Context] = None,
    watchdog_seconds: float = DEFAULT_WATCHDOG_SECONDS,
    check: bool = True,
) -> Union[Tensor, tuple[Tensor, Routing]]:
    """Expert-parallel MoE forward over the ranks of ``group``. Collective: every rank calls it.

    With W ranks and E experts, rank r holds the L = E / W experts ``r·L … r·L+L−1``.

    Args:
        x: ``[T_r, H]`` this rank's tokens: float32, bfloat16, float16 or float64 on the CPU; float32,
            bfloat16 or float16 on a CUDA device. T_r may differ between ranks and may be 0.
        router_weight: ``[E, H]``, x's dtype, the same on every rank.
        w1: ``[L, 2I, H]`` when ``gated`` (rows ``0..I-1`` gate, ``I..2I-1`` up), else ``[L, I, H]``:
            this rank's experts only.
        w2: ``[L, H, I]``, this rank's experts.
        top_k, gated, activation, normalize, scoring: as in :func:`flashmoe.moe`; the same on every rank.
        group: a ``torch.distributed`` process group; None is the default group.
        transport: ``"symmetric"`` (CPU tensors: shared-memory symmetric heaps and the dataflow protocol;
            every rank on one host), ``"nvshmem"`` (CUDA tensors: the persistent kernel dispatches and
            combines across GPUs itself, over NVSHMEM heaps; every peer reachable by load/store),
            ``"all_to_all"`` (``all_to_all_single``; any backend, any hosts; CUDA tensors compute on the
            CPU) or ``"auto"`` (symmetric, or nvshmem, where it can serve, else all_to_all).
        capacity_factor: None (dropless), or capacity per (source rank, expert)
            ``ceil(capacity_factor · T_r · k / E)``.
        router_bias: ``[E]``; b1: ``[L, 2I]`` or ``[L, I]``; b2: ``[L, H]``. Optional.
        selection_bias, num_groups, topk_groups, routed_scaling_factor, weight_on: the routing options of
            :func:`flashmoe.moe`, the same on every rank; router_weight (and router_bias) may be float32 for
            bf16/fp16 x. The routing is computed on each token's source rank.
        shared_w1, shared_w2, shared_gate: a shared expert (``[2S or S, H]``, ``[H, S]``, optional
            ``[1, H]``), as in :func:`flashmoe.moe`: replicated (the same on every rank), and each rank
            runs it on its own tokens, with no dispatch.
        return_routing: also return this rank's :class:`flashmoe.Routing` (as :func:`flashmoe.moe`).
        context: an explicit :class:`Context`; by default one is created (collectively) on first use
            per group and configuration, and reused.
        watchdog_seconds: for the symmetric transport, a call without progress for this long raises
            RuntimeError naming the rank and the wait (default 60 s); under nvshmem the kernel gives up on
            a peer after this long.
        check: nvshmem only. True (the default): the call agrees on the heap size with its peers and,
            after the launch, waits for it and raises RuntimeError when the kernel gave up on a peer, as
            the other transports raise from the call. False: no host synchronisation at all (the heaps
            must already fit the call: create the Context with ``max_tokens``); call
            ``context.check()`` yourself, e.g. once per step. Skipped while a CUDA graph is captured.

    Returns:
        y ``[T_r, H]`` with x's dtype, bitwise equal to ``flashmoe.moe(x, router_weight, w1_all, w2_all, ...)``
        on this rank's tokens; or ``(y, routing)``.

    Autograd: x, router_weight, w1, w2, the biases and the shared expert get gradients. A local
    expert's gradient sums every rank's tokens; router_weight's and the shared expert's are this
    rank's own contribution (all-reduce them yourself, as for any replicated Parameter). The backward
    is collective too.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    config = layer_config(x, router_weight, w1, w2, top_k=top_k, gated=gated, activation=activation,
                          normalize=normalize, scoring=scoring, capacity_factor=capacity_factor,
                          router_bias=router_bias, b1=b1, b2=b2, selection_bias=selection_bias,
                          num_groups=num_groups, topk_groups=topk_groups,
                          routed_scaling_factor=routed_scaling_factor, weight_on=weight_on, shared_w1=shared_w1,
                          shared_w2=shared_w2, shared_gate=shared_gate, swiglu_limit=swiglu_limit,
                          swiglu_alpha=swiglu_alpha)
    _, world_size = _group_rank_and_size(group)
    if config.num_experts % world_size:
        raise ValueError(f"router_weight has E={config.num_experts} experts, which the world size {world_size} "
                         f"does not divide")
    local = config.num_experts // world_size
    if w1.shape[0] != local:
        raise ValueError(f"w1 must hold this rank's L = E / W = {local} experts, got {w1.shape[0]}")
    if x.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"flashmoe.distributed runs on CPU and CUDA tensors, got {x.device.type!r}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    if context is None:
        context = context_for(config, group=group, transport=transport, tokens=x.shape[0], device=x.device,
                              watchdog_seconds=watchdog_seconds)
    elif context.config != config:
        raise ValueError("context was created for another layer configuration")
    tensors = [None if t is None else t.contiguous()
               for t in (x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2, shared_gate)]
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = _ExpertParallel.apply(
        context, None if capacity_factor is None else float(capacity_factor), selection_bias, check, *tensors)
    if return_routing:
        return y, Routing(topk_ids, topk_weights, expert_counts, dropped, router_logits)
    return y


class _ExpertParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context, capacity_factor, selection_bias, check, x, router_weight, w1, w2, router_bias, b1, b2,
                shared_w1, shared_w2, shared_gate):
        shared = (shared_w1, shared_w2, shared_gate)
        # selection_bias only chooses the picks: it gets no gradient.
        outputs = context.forward(x, router_weight, w1, w2, router_bias, b1, b2, capacity_factor,
                                  None if selection_bias is None else selection_bias.detach(), shared=shared,
                                  check=check)
        ctx.context, ctx.capacity_factor = context, capacity_factor
        ctx.save_for_backward(x, router_weight, w1, w2, router_bias, b1, b2, *shared, outputs[1])
        ctx.mark_non_differentiable(outputs[1], outputs[3], outputs[5])
        return outputs

    @staticmethod
    def backward(ctx, grad_y, _grad_ids, grad_topk_weights, _grad_counts, grad_router_logits, _grad_dropped):
        x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2, shared_gate, topk_ids = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[4:])
        grads = _backward(ctx.context, grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2,
                          router_bias, b1, b2, topk_ids, ctx.capacity_factor, needs,
                          shared=(shared_w1, shared_w2, shared_gate))
        return (None, None, None, None) + tuple(grads)
