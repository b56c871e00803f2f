"""Named MoE layer shapes and the arithmetic that depends only on a shape.

FLOPs and byte counts live here so the CLI, the memory check and the README
all use one definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
SCORINGS = ("softmax", "sigmoid", "softmax_topk")


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer: H = hidden_size, I = ffn_size (per expert), E, k, and the options of
    :func:`flashmoe.moe` it runs with (routing, shared expert, expert biases).

    ``selection_bias``: the router adds a float32 ``[E]`` bias to the scores only to choose experts
    (DeepSeek-V3's ``e_score_correction_bias``); ``router_fp32``: the router weight is float32 while
    x and the experts are bf16/fp16 (DeepSeek-V3 keeps its gate in fp32); ``shared_ffn_size`` S > 0:
    a shared expert ``shared_w1 [2S, H]``, ``shared_w2 [H, S]`` on every token, scaled by
    ``σ(x·shared_gateᵀ)`` when ``shared_gate``; ``expert_bias``: b1 ``[E, 2I]`` and b2 ``[E, H]``.
    ``source`` is the HF hub repo whose config.json the numbers come from.
    """

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
    selection_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False
    weight_on: str = "output"
    shared_ffn_size: int = 0
    shared_gate: bool = False
    expert_bias: bool = False
    note: str = ""
    source: str = ""

    @property
    def w1_rows(self) -> int:
        """N0: rows of one expert's w1 (gate and up stacked when gated)."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    def describe(self) -> str:
        kind = "gated" if self.gated else "plain"
        text = (f"H={self.hidden_size} I={self.ffn_size} E={self.num_experts} "
                f"k={self.top_k} {kind} {self.activation} {self.scoring}"
                f"{' normalize' if self.normalize and self.scoring != 'softmax_topk' else ''}")
        if self.selection_bias:
            text += " selection_bias"
        if self.num_groups > 1:
            text += f" groups={self.topk_groups}/{self.num_groups}"
        if self.routed_scaling_factor != 1.0:
            text += f" scale={self.routed_scaling_factor:g}"
        if self.router_fp32:
            text += " router=fp32"
        if self.weight_on != "output":
            text += f" weight_on={self.weight_on}"
        if self.expert_bias:
            text += " expert_bias"
        if self.shared_ffn_size:
            text += f" shared={self.shared_ffn_size}{'+gate' if self.shared_gate else ''}"
        if self.capacity_factor is not None:
            text += f" capacity_factor={self.capacity_factor:g}"
        return text

    def moe_options(self) -> dict:
        """This shape's options of :func:`flashmoe.moe` beyond the weights, biases and routing from
        outside. The options added with issue 12 appear only where they differ from the op's
        defaults."""
        options = dict(top_k=self.top_k, gated=self.gated, activation=self.activation,
                       normalize=self.normalize, scoring=self.scoring, capacity_factor=self.capacity_factor)
        for name, default in (("num_groups", 1), ("topk_groups", 1), ("routed_scaling_factor", 1.0),
                              ("weight_on", "output")):
            if getattr(self, name) != default:
                options[name] = getattr(self, name)
        return options

    def extra_features(self) -> list:
        """What this shape needs beyond a plain softmax/sigmoid top-k router and silu/gelu/relu experts:
        the bench's own peers (expert-loop, grouped-mm, HF's Mixtral/Qwen3/OLMoE blocks) run none of it,
        so their rows are skipped with this list as the reason."""
        features = []
        if self.scoring not in ("softmax", "sigmoid"):
            features.append(f"scoring={self.scoring!r}")
        if self.activation not in ("silu", "gelu", "gelu_tanh", "relu"):
            features.append(f"activation={self.activation!r}")
        if self.selection_bias:
            features.append("a selection bias")
        if self.num_groups > 1:
            features.append("group-limited routing")
        if self.routed_scaling_factor != 1.0:
            features.append("routed_scaling_factor")
        if self.router_fp32:
            features.append("an fp32 router")
        if self.weight_on != "output":
            features.append(f"weight_on={self.weight_on!r}")
        if self.shared_ffn_size:
            features.append("a shared expert")
        if self.expert_bias:
            features.append("expert biases")
        return features

    @property
    def shared_w1_rows(self) -> int:
        """Rows of the shared expert's w1 (gate and up stacked when gated); 0 without one."""
        return (2 if self.gated else 1) * self.shared_ffn_size

    def override(self, **changes) -> "LayerShape":
        """A copy with `changes` applied; the name records what changed."""
        changes = {key: value for key, value in changes.items() if value is not None}
        changed = {key: value for key, value in changes.items() if getattr(self, key) != value}
        if not changed:
            return self
        labels = {"hidden_size": "H", "ffn_size": "I", "num_experts": "E", "top_k": "k",
                  "capacity_factor": "cf", "activation": "act", "shared_ffn_size": "S"}
        suffix = ",".join(f"{labels.get(key, key)}={value}" for key, value in changed.items())
        return dataclasses.replace(self, name=f"{self.name}[{suffix}]", **changed)


# Every number of the issue-12 families is the model's HF config.json (hub repo in ``source``), checked
# against the defaults and docstrings of transformers 5's config classes (DeepseekV3Config, GptOssConfig,
# Qwen3NextConfig, Llama4TextConfig): hidden_size, moe_intermediate_size (GPT-OSS, Llama 4:
# intermediate_size), n_routed_experts / num_experts / num_local_experts, num_experts_per_tok, n_group,
# topk_group, routed_scaling_factor, n_shared_experts · moe_intermediate_size or
# shared_expert_intermediate_size, norm_topk_prob.
_DEEPSEEK_ROUTING = dict(scoring="sigmoid", selection_bias=True, router_fp32=True, normalize=True)
NAMED_CONFIGS = {
    shape.name: shape
    for shape in (
        LayerShape("mixtral", 4096, 14336, 8, 2, note="Mixtral-8x7B"),
        LayerShape("qwen3-30b-a3b", 2048, 768, 128, 8, note="Qwen3-30B-A3B"),
        LayerShape("olmoe", 2048, 1024, 64, 8, normalize=False,
                   note="OLMoE-1B-7B (norm_topk_prob=False)"),
        LayerShape("deepseek-v3", 7168, 2048, 256, 8, **_DEEPSEEK_ROUTING, num_groups=8, topk_groups=4,
                   routed_scaling_factor=2.5, shared_ffn_size=2048,
                   note="DeepSeek-V3: sigmoid + e_score_correction_bias, 8 groups (top 4), scale 2.5, "
                        "fp32 router, 1 shared expert", source="deepseek-ai/DeepSeek-V3"),
        LayerShape("kimi-k2", 7168, 2048, 384, 8, **_DEEPSEEK_ROUTING, routed_scaling_factor=2.827,
                   shared_ffn_size=2048,
                   note="Kimi-K2 (DeepseekV3 blocks): sigmoid + e_score_correction_bias, 1 group, scale 2.827, "
                        "fp32 router, 1 shared expert", source="moonshotai/Kimi-K2-Instruct"),
        LayerShape("gpt-oss-120b", 2880, 2880, 128, 4, activation="swiglu_oai", scoring="softmax_topk",
                   expert_bias=True,
                   note="GPT-OSS-120B: softmax over the top-4 logits, swiglu_oai (alpha 1.702, limit 7), "
                        "expert biases; its router bias is left out (the skewed routing uses that slot)",
                   source="openai/gpt-oss-120b"),
        LayerShape("gpt-oss-20b", 2880, 2880, 32, 4, activation="swiglu_oai", scoring="softmax_topk",
                   expert_bias=True,
                   note="GPT-OSS-20B: as gpt-oss-120b with 32 experts", source="openai/gpt-oss-20b"),
        LayerShape("qwen3-next-80b", 2048, 512, 512, 10, shared_ffn_size=512, shared_gate=True,
                   note="Qwen3-Next-80B-A3B: softmax, normalize, a shared expert of 512 scaled by "
                        "sigmoid(shared_expert_gate)", source="Qwen/Qwen3-Next-80B-A3B-Instruct"),
        LayerShape("llama4-scout", 5120, 8192, 16, 1, scoring="sigmoid", normalize=False, weight_on="input",
                   shared_ffn_size=8192,
                   note="Llama-4-Scout: top-1 sigmoid, the pick weight scales the expert's input, "
                        "1 shared expert", source="meta-llama/Llama-4-Scout-17B-16E"),
        LayerShape("paper", 2048, 2048, 32, 2, gated=False, activation="gelu",
                   note="FlashMoE paper layer (E=32)"),
    )
}


def custom_shape(hidden_size: int, ffn_size: int, num_experts: int, top_k: int, **options) -> LayerShape:
    name = f"H{hidden_size}-I{ffn_size}-E{num_experts}-k{top_k}"
    options = {key: value for key, value in options.items() if value is not None}
    return LayerShape(name, hidden_size, ffn_size, num_experts, top_k, **options)


def useful_flops(shape: LayerShape, tokens: int) -> int:
    """Router GEMM 2·T·H·E plus expert GEMMs 2·T·k·(N0·H + H·I), plus the shared expert's
    2·T·(2S·H + H·S) and its gate's 2·T·H.

    Dropped picks (capacity_factor) still count: this is the work the layer is
    asked to do, so backends are compared on one scale.
    """
    router = 2 * tokens * shape.hidden_size * shape.num_experts
    experts = 2 * tokens * shape.top_k * (shape.w1_rows * shape.hidden_size
                                          + shape.hidden_size * shape.ffn_size)
    return router + experts + 2 * tokens * shared_weight_elements(shape)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shared_weight_elements(shape: LayerShape) -> int:
    """Elements of the shared expert's w1, w2 and gate (0 without a shared expert)."""
    if not shape.shared_ffn_size:
        return 0
    return (shape.shared_w1_rows * shape.hidden_size + shape.hidden_size * shape.shared_ffn_size
            + (shape.hidden_size if shape.shared_gate else 0))


def router_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of router_weight (float32 when ``router_fp32``) and the float32 selection bias."""
    router_dtype = torch.float32 if shape.router_fp32 else dtype
    return (shape.num_experts * shape.hidden_size * dtype_bytes(router_dtype)
            + (shape.num_experts * 4 if shape.selection_bias else 0))


def always_read_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Weight bytes every call reads whatever the routing: the router and the shared expert."""
    return router_bytes(shape, dtype) + shared_weight_elements(shape) * dtype_bytes(dtype)


def weight_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of the router, every expert (with its biases) and the shared expert."""
    return always_read_bytes(shape, dtype) + shape.num_experts * expert_weight_bytes(shape, dtype)


def expert_weight_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of one expert's w1 and w2 (and b1, b2 with ``expert_bias``)."""
    elements = shape.w1_rows * shape.hidden_size + shape.hidden_size * shape.ffn_size
    if shape.expert_bias:
        elements += shape.w1_rows + shape.hidden_size
    return elements * dtype_bytes(dtype)


def touched_weight_bytes(shape: LayerShape, dtype: torch.dtype, experts_hit: float) -> int:
    """Weight bytes one call must read at least: the router, the shared expert, and every expert that
    received at least one pick (``experts_hit``, a mean over the rotating inputs, may be fractional)."""
    return always_read_bytes(shape, dtype) + round(experts_hit * expert_weight_bytes(shape, dtype))
