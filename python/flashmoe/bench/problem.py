"""The tensors one benchmark row runs on: random weights and rotating inputs.

Weights are drawn once per (shape, dtype) and shared by every backend, token
count and routing regime. Nothing is zero: a kernel that skips zeros or hits a
degenerate routing would time something the layer never does in practice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .configs import LayerShape, dtype_bytes

# Rotate through enough inputs that together they overflow a 64 MiB cache twice.
ROTATION_BYTES = 128 * 2**20
MAX_ROTATING_INPUTS = 16


@dataclass
class ExpertWeights:
    router_weight: torch.Tensor  # [E, H], std 1/sqrt(H) so router logits are O(1); fp32 with router_fp32
    w1: torch.Tensor             # [E, N0, H], N0 = 2I gated (gate rows first) or I
    w2: torch.Tensor             # [E, H, I]
    b1: Optional[torch.Tensor] = None              # [E, N0] with expert_bias
    b2: Optional[torch.Tensor] = None              # [E, H] with expert_bias
    selection_bias: Optional[torch.Tensor] = None  # [E] fp32, std 0.01 (DeepSeek's e_score_correction_bias)
    shared_w1: Optional[torch.Tensor] = None       # [2S or S, H] with a shared expert
    shared_w2: Optional[torch.Tensor] = None       # [H, S]
    shared_gate: Optional[torch.Tensor] = None     # [1, H]
    _float64: Optional["ExpertWeights"] = None

    OPTIONAL = ("b1", "b2", "selection_bias", "shared_w1", "shared_w2", "shared_gate")

    def options(self) -> dict:
        """The optional tensors this layer has, as :func:`flashmoe.moe` keyword arguments."""
        return {name: getattr(self, name) for name in self.OPTIONAL if getattr(self, name) is not None}

    def float64(self) -> "ExpertWeights":
        """The same values in float64, made once (for the accuracy column's reference)."""
        if self._float64 is None:
            self._float64 = ExpertWeights(self.router_weight.double(), self.w1.double(), self.w2.double(),
                                          **{name: tensor.double() for name, tensor in self.options().items()})
        return self._float64


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def make_weights(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int) -> ExpertWeights:
    """Normal weights with std 1/sqrt(fan_in), drawn directly in `dtype` (no fp32 copy); biases
    with std 0.1 and the selection bias with std 0.01, so none is zero."""
    generator = make_generator(device, seed)
    hidden, ffn, experts = shape.hidden_size, shape.ffn_size, shape.num_experts

    def normal(*size: int, fan_in: int, std: Optional[float] = None, dtype=dtype) -> torch.Tensor:
        tensor = torch.empty(size, dtype=dtype, device=device)
        return tensor.normal_(0.0, std or 1.0 / math.sqrt(fan_in), generator=generator)

    weights = ExpertWeights(
        router_weight=normal(experts, hidden, fan_in=hidden,
                             dtype=torch.float32 if shape.router_fp32 else dtype),
        w1=normal(experts, shape.w1_rows, hidden, fan_in=hidden),
        w2=normal(experts, hidden, ffn, fan_in=ffn),
    )
    if shape.expert_bias:
        weights.b1 = normal(experts, shape.w1_rows, fan_in=0, std=0.1)
        weights.b2 = normal(experts, hidden, fan_in=0, std=0.1)
    if shape.selection_bias:
        weights.selection_bias = normal(experts, fan_in=0, std=0.01, dtype=torch.float32)
    if shape.shared_ffn_size:
        weights.shared_w1 = normal(shape.shared_w1_rows, hidden, fan_in=hidden)
        weights.shared_w2 = normal(hidden, shape.shared_ffn_size, fan_in=shape.shared_ffn_size)
        if shape.shared_gate:
            weights.shared_gate = normal(1, hidden, fan_in=hidden)
    return weights


def rotating_input_count(tokens: int, hidden_size: int, dtype: torch.dtype, iters: int) -> int:
    """Enough inputs to overflow the cache, but no more than the timed iterations use."""
    input_bytes = tokens * hidden_size * dtype_bytes(dtype)
    wanted = min(MAX_ROTATING_INPUTS, math.ceil(ROTATION_BYTES / input_bytes), iters)
    return max(2, wanted)


@dataclass
class MoEProblem:
    """Everything a backend needs for one (shape, dtype, routing, T) row."""

    shape: LayerShape
    weights: ExpertWeights
    router_bias: Optional[torch.Tensor]  # [E] fp32, or None for uniform routing
    inputs: List[torch.Tensor]           # rotating x tensors, each [T, H], N(0, 1)
    # Router + hit experts' weight bytes (mean over the inputs): what the copy floor copies.
    weight_bytes_touched: Optional[int] = None
    _float64_output: Optional[torch.Tensor] = None

    def float64_output(self) -> torch.Tensor:
        """flashmoe.reference.moe in float64 on inputs[0] and the same weights: what every backend's
        output on inputs[0] is compared with (made once per problem)."""
        if self._float64_output is None:
            from flashmoe import reference

            weights = self.weights.float64()
            options = self.moe_options(weights)
            if options["router_bias"] is not None:
                options["router_bias"] = options["router_bias"].double()
            self._float64_output = reference.moe(self.inputs[0].double(), weights.router_weight, weights.w1,
                                                 weights.w2, **options)
        return self._float64_output

    def relative_error(self, output: torch.Tensor) -> float:
        """‖output − float64 reference‖ / ‖reference‖, for an output on inputs[0]."""
        expected = self.float64_output()
        return ((output.double() - expected).norm() / expected.norm()).item()

    @property
    def tokens(self) -> int:
        return self.inputs[0].shape[0]

    def moe_options(self, weights: Optional[ExpertWeights] = None) -> dict:
        """Keyword arguments of flashmoe.moe / flashmoe.reference.moe, minus router_weight, w1 and w2:
        the shape's options, the router bias, and ``weights``' (default: the problem's) optional
        tensors (expert biases, selection bias, shared expert)."""
        weights = self.weights if weights is None else weights
        return dict(self.shape.moe_options(), router_bias=self.router_bias, **weights.options())


def make_inputs(shape: LayerShape, tokens: int, dtype: torch.dtype, device: torch.device,
                seed: int, count: int) -> List[torch.Tensor]:
    generator = make_generator(device, seed)
    return [torch.randn(tokens, shape.hidden_size, generator=generator, device=device).to(dtype)
            for _ in range(count)]
