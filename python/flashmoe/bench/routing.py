"""Routing regimes for the benchmark: uniform, and skewed by a Zipf router bias.

"skewed" adds a router bias b[e] = -s·log(rank(e)), where rank is a seeded random
permutation of 1..E, so softmax(b) alone would be a Zipf distribution with
exponent s. The exponent is calibrated on sample tokens so that about
HOT_PICK_TARGET of all top-k picks land on the hot set: the
max(ceil(E/10), k) highest-ranked experts (k is the floor because a token picks
k distinct experts; with E=8, k=2 the hot set is 2 experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .configs import LayerShape

ROUTINGS = ("uniform", "skewed")
HOT_PICK_TARGET = 0.5
CALIBRATION_TOKENS = 2048


def hot_expert_count(shape: LayerShape) -> int:
    return max(math.ceil(shape.num_experts / 10), shape.top_k)


def pick_ids(shape: LayerShape, logits: torch.Tensor,
             selection_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The experts ``[T, k]`` each token picks (for the statistics; the layer itself routes in the
    op): the top-k of the scores plus the selection bias, within the ``topk_groups`` groups whose
    two best biased scores sum highest. softmax_topk picks the top-k logits."""
    scores = logits if shape.scoring == "softmax_topk" else (
        logits.softmax(dim=-1) if shape.scoring == "softmax" else logits.sigmoid())
    if selection_bias is not None:
        scores = scores + selection_bias.float()
    if shape.num_groups > 1:
        tokens, per_group = scores.shape[0], shape.num_experts // shape.num_groups
        grouped = scores.view(tokens, shape.num_groups, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        chosen = group_scores.topk(shape.topk_groups, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        scores = scores.masked_fill(~allowed.repeat_interleave(per_group, dim=1), float("-inf"))
    return scores.topk(shape.top_k, dim=-1).indices


def _hot_pick_fraction(logits: torch.Tensor, hot: torch.Tensor, shape: LayerShape) -> float:
    return hot[pick_ids(shape, logits)].float().mean().item()


@dataclass(frozen=True)
class SkewedBias:
    router_bias: torch.Tensor  # [E], fp32, on the caller's device
    hot_experts: torch.Tensor  # [E] bool
    exponent: float


def skewed_router_bias(shape: LayerShape, router_weight: torch.Tensor,
                       generator: torch.Generator) -> SkewedBias:
    """Calibrate the Zipf exponent by bisection on CALIBRATION_TOKENS random tokens."""
    device = router_weight.device
    experts = shape.num_experts
    rank = torch.empty(experts, dtype=torch.float32)
    rank[torch.randperm(experts, generator=generator)] = torch.arange(1, experts + 1, dtype=torch.float32)
    rank = rank.to(device)
    hot = rank <= hot_expert_count(shape)
    sample = torch.randn(CALIBRATION_TOKENS, shape.hidden_size, generator=generator).to(device)
    logits = sample @ router_weight.float().t()
    log_rank = rank.log()

    low, high = 0.0, 64.0
    for _ in range(40):
        exponent = 0.5 * (low + high)
        if _hot_pick_fraction(logits - exponent * log_rank, hot, shape) < HOT_PICK_TARGET:
            low = exponent
        else:
            high = exponent
    exponent = high
    return SkewedBias(router_bias=-exponent * log_rank, hot_experts=hot, exponent=exponent)


def routing_stats(shape: LayerShape, x: torch.Tensor, router_weight: torch.Tensor,
                  router_bias: Optional[torch.Tensor],
                  hot_experts: Optional[torch.Tensor], selection_bias: Optional[torch.Tensor] = None) -> dict:
    """How the picks of the timed inputs spread over experts (fp32 router)."""
    logits = x.float() @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias
    topk_ids = pick_ids(shape, logits, selection_bias)
    tokens_per_expert = torch.bincount(topk_ids.flatten(), minlength=shape.num_experts)
    mean_load = topk_ids.numel() / shape.num_experts
    stats = {
        "experts_hit": int((tokens_per_expert > 0).sum()),
        "max_expert_load_over_mean": round(tokens_per_expert.max().item() / mean_load, 3),
    }
    if hot_experts is not None:
        stats["hot_pick_fraction"] = round(hot_experts[topk_ids].float().mean().item(), 3)
    return stats


def mean_experts_hit(shape: LayerShape, inputs, router_weight: torch.Tensor,
                     router_bias: Optional[torch.Tensor], selection_bias: Optional[torch.Tensor] = None) -> float:
    """Experts that receive at least one pick, averaged over the rotating inputs (fp32 router)."""
    hits = []
    for x in inputs:
        logits = x.float() @ router_weight.float().t()
        if router_bias is not None:
            logits = logits + router_bias.float()
        topk_ids = pick_ids(shape, logits, selection_bias)
        hits.append(int((torch.bincount(topk_ids.flatten(), minlength=shape.num_experts) > 0).sum()))
    return sum(hits) / len(hits)
