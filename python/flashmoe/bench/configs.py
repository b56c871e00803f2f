"""Named MoE layer shapes and the arithmetic that depends only on a shape.

FLOPs and byte counts live here so the CLI, the memory check and the README
all use one definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer: H = hidden_size, I = ffn_size (per expert), E, k."""

    name: str
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    gated: bool = True
    activation: str = "silu"
    scoring: str = "softmax"
    normalize: bool = True
    capacity_factor: Optional[float] = None
    note: str = ""

    @property
    def w1_rows(self) -> int:
        """N0: rows of one expert's w1 (gate and up stacked when gated)."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    def describe(self) -> str:
        kind = "gated" if self.gated else "plain"
        text = (f"H={self.hidden_size} I={self.ffn_size} E={self.num_experts} "
                f"k={self.top_k} {kind} {self.activation} {self.scoring}"
                f"{' normalize' if self.normalize else ''}")
        if self.capacity_factor is not None:
            text += f" capacity_factor={self.capacity_factor:g}"
        return text

    def override(self, **changes) -> "LayerShape":
        """A copy with `changes` applied; the name records what changed."""
        changes = {key: value for key, value in changes.items() if value is not None}
        changed = {key: value for key, value in changes.items() if getattr(self, key) != value}
        if not changed:
            return self
        labels = {"hidden_size": "H", "ffn_size": "I", "num_experts": "E", "top_k": "k",
                  "capacity_factor": "cf", "activation": "act"}
        suffix = ",".join(f"{labels.get(key, key)}={value}" for key, value in changed.items())
        return dataclasses.replace(self, name=f"{self.name}[{suffix}]", **changed)


NAMED_CONFIGS = {
    shape.name: shape
    for shape in (
        LayerShape("mixtral", 4096, 14336, 8, 2, note="Mixtral-8x7B"),
        LayerShape("qwen3-30b-a3b", 2048, 768, 128, 8, note="Qwen3-30B-A3B"),
        LayerShape("olmoe", 2048, 1024, 64, 8, normalize=False,
                   note="OLMoE-1B-7B (norm_topk_prob=False)"),
        LayerShape("deepseek-v3", 7168, 2048, 256, 8, scoring="sigmoid",
                   note="DeepSeek-V3 routed experts; group-limited routing and the "
                        "shared expert are not part of the op yet"),
        LayerShape("paper", 2048, 2048, 32, 2, gated=False, activation="gelu",
                   note="FlashMoE paper layer (E=32)"),
    )
}


def custom_shape(hidden_size: int, ffn_size: int, num_experts: int, top_k: int, **options) -> LayerShape:
    name = f"H{hidden_size}-I{ffn_size}-E{num_experts}-k{top_k}"
    options = {key: value for key, value in options.items() if value is not None}
    return LayerShape(name, hidden_size, ffn_size, num_experts, top_k, **options)


def useful_flops(shape: LayerShape, tokens: int) -> int:
    """Router GEMM 2·T·H·E plus expert GEMMs 2·T·k·(N0·H + H·I).

    Dropped picks (capacity_factor) still count: this is the work the layer is
    asked to do, so backends are compared on one scale.
    """
    router = 2 * tokens * shape.hidden_size * shape.num_experts
    experts = 2 * tokens * shape.top_k * (shape.w1_rows * shape.hidden_size
                                          + shape.hidden_size * shape.ffn_size)
    return router + experts


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of router_weight, w1 and w2."""
    elements = shape.num_experts * (shape.hidden_size
                                    + shape.w1_rows * shape.hidden_size
                                    + shape.hidden_size * shape.ffn_size)
    return elements * dtype_bytes(dtype)


def expert_weight_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of one expert's w1 and w2."""
    return (shape.w1_rows * shape.hidden_size + shape.hidden_size * shape.ffn_size) * dtype_bytes(dtype)


def touched_weight_bytes(shape: LayerShape, dtype: torch.dtype, experts_hit: float) -> int:
    """Weight bytes one call must read at least: the router weight and every expert that received
    at least one pick (``experts_hit``, a mean over the rotating inputs, may be fractional)."""
    router = shape.num_experts * shape.hidden_size * dtype_bytes(dtype)
    return router + round(experts_hit * expert_weight_bytes(shape, dtype))
