"""The backward of expert parallelism, in the all_to_all formulation (under either transport).

Each source sends every admitted row's (x, grad_y, pick weight) to the row's expert owner with
``all_to_all_single``; the owner computes the expert's chain rule for all rows of every source
(so a local expert's weight gradient sums every rank's tokens), and sends back each row's
contribution to grad_x and to its pick weight. The router's chain rule stays on the source.
Computed in fp32 (fp64 for fp64), as ``flashmoe::moe_backward`` computes the single-process one.
"""

from __future__ import annotations

import torch

from .. import reference
from ..ops import RouterWeights, _ffn_hidden_with_grad, _shared_backward
from ..reference import accumulate_dtype
from .all_to_all import exchange_counts, exchange_rows


def expert_backward(x_rows, grad_y_rows, pick_weights, w1_e, b1_e, w2_e, b2_e, *, gated, activation,
                    weight_on="output", row_dtype=None, swiglu_limit=0.0, swiglu_alpha=0.0):
    """One expert's rows: (grad_x_rows, grad_pick_weights, grad_w1, grad_b1, grad_w2, grad_b2), fp32/fp64.
    With weight_on="input" the expert's input is round(x · w) (in row_dtype) and its output weighs 1."""
    weight_on_input = weight_on == "input"
    token_rows = x_rows
    if weight_on_input:
        x_rows = (x_rows * pick_weights.unsqueeze(1)).to(row_dtype).to(x_rows.dtype)
    h, grad_z_of = _ffn_hidden_with_grad(x_rows, w1_e, b1_e, gated, activation, swiglu_limit, swiglu_alpha)
    out = h @ w2_e.T + (0 if b2_e is None else b2_e)
    grad_out = grad_y_rows if weight_on_input else pick_weights.unsqueeze(1) * grad_y_rows
    grad_z = grad_z_of(grad_out @ w2_e)
    grad_rows = grad_z @ w1_e
    if weight_on_input:
        grad_pick = (grad_rows * token_rows).sum(dim=-1)
        grad_rows = pick_weights.unsqueeze(1) * grad_rows
    else:
        grad_pick = (grad_y_rows * out).sum(dim=-1)
    return (grad_rows, grad_pick, grad_z.T @ x_rows, grad_z.sum(dim=0), grad_out.T @ h, grad_out.sum(dim=0))


def backward(context, grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2, router_bias, b1, b2,
             topk_ids, capacity_factor, needs_grad, shared=(None, None, None)):
    """Gradients for (x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2, shared_gate); None
    where not needed. Collective. The replicated shared expert's part stays on this rank (its tokens)."""
    config, group = context.config, context.group
    world, local, top_k, experts = context.world_size, context.local_experts, config.top_k, config.num_experts
    accumulate = accumulate_dtype(x.dtype)
    tokens, hidden = x.shape
    xa, router_weight_a = x.to(accumulate), router_weight.to(accumulate)
    ids = topk_ids.long()
    router = RouterWeights(xa, router_weight_a, router_bias, ids, config.scoring, config.normalize,
                           config.routed_scaling_factor)
    weights = router.weights

    # The admitted picks in expert-sorted, token-ascending order: the forward's rows.
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    admitted = reference.admit(topk_ids, experts, capacity).flatten()
    picks = torch.nonzero(admitted).flatten()
    pick_experts = ids.flatten()[picks]
    picks = picks[torch.sort(pick_experts, stable=True).indices]
    pick_experts = ids.flatten()[picks]
    token, slot = picks // top_k, picks % top_k
    cell_rows = torch.bincount(pick_experts, minlength=experts).view(world, local)
    received_cells = exchange_counts(cell_rows, group, world)
    send_rows, receive_rows = cell_rows.sum(dim=1).tolist(), received_cells.sum(dim=1).tolist()
    grad_y = grad_y.to(accumulate)
    send = torch.cat([xa[token], grad_y[token], weights[token, slot].unsqueeze(1)], dim=1)
    received = send.new_empty((sum(receive_rows), 2 * hidden + 1))
    exchange_rows(received, send, receive_rows, send_rows, group)

    # Owner: each local expert over the rows of every source.
    reply = received.new_zeros((received.shape[0], hidden + 1))
    grad_w1 = torch.zeros_like(w1) if needs_grad[2] else None
    grad_w2 = torch.zeros_like(w2) if needs_grad[3] else None
    grad_b1 = torch.zeros_like(b1) if needs_grad[5] and b1 is not None else None
    grad_b2 = torch.zeros_like(b2) if needs_grad[6] and b2 is not None else None
    starts = torch.cat([received_cells.new_zeros(1), received_cells.flatten().cumsum(0)])
    for expert in range(local):
        index = torch.cat([torch.arange(int(starts[s * local + expert]), int(starts[s * local + expert + 1]))
                           for s in range(world)])
        if index.numel() == 0:
            continue
        rows = received[index]
        upcast = [None if t is None else t[expert].to(accumulate) for t in (w1, b1, w2, b2)]
        grad_x_rows, grad_pick, g_w1, g_b1, g_w2, g_b2 = expert_backward(
            rows[:, :hidden], rows[:, hidden:2 * hidden], rows[:, 2 * hidden], *upcast,
            gated=config.gated, activation=config.activation, weight_on=config.weight_on, row_dtype=x.dtype,
            swiglu_limit=config.swiglu_limit, swiglu_alpha=config.swiglu_alpha)
        reply[index, :hidden] = grad_x_rows
        reply[index, hidden] = grad_pick
        for grad, value in ((grad_w1, g_w1), (grad_b1, g_b1), (grad_w2, g_w2), (grad_b2, g_b2)):
            if grad is not None:
                grad[expert] = value.to(grad.dtype)
    home = reply.new_empty((send.shape[0], hidden + 1))
    exchange_rows(home, reply, send_rows, receive_rows, group)

    # Source: the rows' contributions, then the router's chain rule.
    grad_x = torch.zeros_like(xa)
    grad_x.index_add_(0, token, home[:, :hidden])
    grad_weights = torch.zeros_like(weights)
    grad_weights[token, slot] = home[:, hidden]
    if grad_topk_weights is not None:
        grad_weights = grad_weights + grad_topk_weights.to(accumulate)
    grad_logits = router.grad_logits(grad_weights)
    if grad_router_logits is not None:
        grad_logits = grad_logits + grad_router_logits.to(accumulate)
    grad_x += grad_logits @ router_weight_a
    shared_grads = _shared_backward(grad_y, xa, grad_x, *shared, config.gated, config.activation,
                                    **config.activation_options(), needs_grad=needs_grad[7:10])
    shared_grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(shared_grads, shared))
    grads = (grad_x.to(x.dtype) if needs_grad[0] else None,
             (grad_logits.T @ xa).to(router_weight.dtype) if needs_grad[1] else None,
             grad_w1, grad_w2,
             grad_logits.sum(dim=0).to(router_bias.dtype) if needs_grad[4] and router_bias is not None else None,
             grad_b1, grad_b2) + shared_grads
    return grads
