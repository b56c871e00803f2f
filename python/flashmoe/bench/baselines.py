"""What flashmoe is compared against, written here so the comparison is visible.

- expert_loop_moe: a top-k router and a Python loop over the experts that were hit, written
  here (the shape of an eager loop, not transformers' code; the real HF blocks are the
  hf-* backends in hf_blocks.py).
- grouped_mm_moe: sort picks by expert, two torch._grouped_mm calls, weighted
  index_add_. Only where torch has _grouped_mm.
- DenseMatmulFloor: torch's own dense matmuls doing the same FLOPs as the layer.
- CopyFloor: a device-to-device copy of the weight bytes the layer must read, which measures
  the device's memory bandwidth in the same run.

All take the flashmoe.moe weight layouts (router_weight [E,H], w1 [E,N0,H],
w2 [E,H,I]) and support only capacity_factor=None (dropless).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _require_dropless(capacity_factor: Optional[float], who: str) -> None:
    if capacity_factor is not None:
        raise NotImplementedError(
            f"{who} supports only capacity_factor=None (dropless), got {capacity_factor}")


def topk_router(x: torch.Tensor, router_weight: torch.Tensor, *, top_k: int, normalize: bool,
                scoring: str = "softmax",
                router_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router linear in the compute dtype, scores in float, topk, optional normalize.

    Returns (topk_weights [T,k] fp32, topk_ids [T,k] int64).
    """
    router_logits = F.linear(x, router_weight, router_bias)
    if scoring == "softmax":
        router_probs = F.softmax(router_logits.float(), dim=-1)
    elif scoring == "sigmoid":
        router_probs = torch.sigmoid(router_logits.float())
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    topk_weights, topk_ids = torch.topk(router_probs, top_k, dim=-1)
    if normalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def _expert_ffn(tokens: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool, act) -> torch.Tensor:
    if gated:
        gate, up = F.linear(tokens, w1).chunk(2, dim=-1)
        hidden = act(gate) * up
    else:
        hidden = act(F.linear(tokens, w1))
    return F.linear(hidden, w2)


def expert_loop_moe(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
                    top_k: int, gated: bool = True, activation: str = "silu", normalize: bool = True,
                    scoring: str = "softmax", capacity_factor: Optional[float] = None,
                    router_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A Python loop over the hit experts with an index_add_ combine; x [T,H] -> y [T,H] in x.dtype."""
    _require_dropless(capacity_factor, "the expert-loop baseline")
    act = activation_fn(activation)
    num_experts = w1.shape[0]
    topk_weights, topk_ids = topk_router(x, router_weight, top_k=top_k, normalize=normalize,
                                       scoring=scoring, router_bias=router_bias)

    final_hidden_states = torch.zeros_like(x)
    expert_mask = F.one_hot(topk_ids, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = _expert_ffn(x[token_idx], w1[expert_idx], w2[expert_idx], gated, act)
        current = current * topk_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_moe(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
                   top_k: int, gated: bool = True, activation: str = "silu", normalize: bool = True,
                   scoring: str = "softmax", capacity_factor: Optional[float] = None,
                   router_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Picks sorted by expert, one torch._grouped_mm per projection, fp32 combine."""
    if not grouped_mm_available():
        raise NotImplementedError(f"torch {torch.__version__} has no torch._grouped_mm")
    _require_dropless(capacity_factor, "the grouped-mm baseline")
    act = activation_fn(activation)
    num_experts = w1.shape[0]
    topk_weights, topk_ids = topk_router(x, router_weight, top_k=top_k, normalize=normalize,
                                       scoring=scoring, router_bias=router_bias)

    flat_ids = topk_ids.flatten()
    pick_order = flat_ids.argsort(stable=True)
    token_of_pick = pick_order // top_k
    group_ends = torch.bincount(flat_ids, minlength=num_experts).cumsum(0).to(torch.int32)
    hidden = torch._grouped_mm(x[token_of_pick], w1.transpose(-2, -1), offs=group_ends)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = act(gate) * up
    else:
        hidden = act(hidden)
    expert_out = torch._grouped_mm(hidden, w2.transpose(-2, -1), offs=group_ends)
    weighted = expert_out.float() * topk_weights.flatten()[pick_order, None]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of_pick, weighted).to(x.dtype)


class DenseMatmulFloor:
    """Dense matmuls with exactly the layer's useful FLOPs (configs.useful_flops).

    router: x[T,H] @ router_weightᵀ; experts: x repeated k times [T·k,H] through
    expert 0's w1, the activation, and w2; the shared expert (and its gate) on x. It reads one
    expert's weights where the MoE reads up to min(E, T·k), so at small T it is a compute floor,
    not a bandwidth floor. The matmuls run in x's dtype (an fp32 router is cast once, untimed),
    and a clamped SwiGLU stands in as silu: the floor times the GEMMs.
    """

    def __init__(self, inputs, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
                 top_k: int, gated: bool, activation: str, shared_w1: Optional[torch.Tensor] = None,
                 shared_w2: Optional[torch.Tensor] = None, shared_gate: Optional[torch.Tensor] = None):
        self.router_weight = router_weight.to(w1.dtype)
        self.w1, self.w2 = w1[0], w2[0]
        self.shared_w1, self.shared_w2, self.shared_gate = shared_w1, shared_w2, shared_gate
        self.gated = gated
        self.act = activation_fn("silu" if activation.startswith("swiglu") else activation)
        self.inputs = list(inputs)
        # Repeated outside the timed region: the floor times matmuls, not copies.
        self.repeated = [x.repeat_interleave(top_k, dim=0) for x in self.inputs]

    def __call__(self, index: int) -> torch.Tensor:
        x = self.inputs[index]
        F.linear(x, self.router_weight)
        if self.shared_w1 is not None:
            _expert_ffn(x, self.shared_w1, self.shared_w2, self.gated, self.act)
            if self.shared_gate is not None:
                F.linear(x, self.shared_gate)
        return _expert_ffn(self.repeated[index], self.w1, self.w2, self.gated, self.act)


# Larger copies add nothing to the bandwidth reading and would crowd out DeepSeek-V3's weights.
COPY_FLOOR_MAX_BYTES = 2 * 2**30


class CopyFloor:
    """``dst.copy_(src)`` of ``min(nbytes, COPY_FLOOR_MAX_BYTES)`` random bytes on ``device``.

    ``nbytes`` is the router plus the hit experts' weight bytes of the row. The copy reads and
    writes each byte once, so ``bandwidth = 2 · copied_bytes / time``; the layer has to read its
    ``nbytes`` at least once, so ``nbytes / bandwidth`` is its weight-bytes time floor.
    """

    def __init__(self, nbytes: int, device: torch.device, seed: int = 0):
        self.nbytes = int(nbytes)
        self.copied_bytes = max(1, min(self.nbytes, COPY_FLOOR_MAX_BYTES))
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.src = torch.randint(0, 256, (self.copied_bytes,), dtype=torch.uint8, device=device,
                                 generator=generator)
        self.dst = torch.empty_like(self.src)

    @property
    def bytes_moved(self) -> int:
        """Bytes read plus bytes written by one call."""
        return 2 * self.copied_bytes

    def __call__(self, index: int) -> torch.Tensor:
        return self.dst.copy_(self.src)
