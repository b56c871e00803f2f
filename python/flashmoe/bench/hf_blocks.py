"""The real HF transformers MoE blocks as benchmark backends, sharing flashmoe's weights.

Each ``hf-*`` backend builds the named shape's own sparse-MoE block from transformers
(``OlmoeSparseMoeBlock`` for olmoe, ``Qwen3MoeSparseMoeBlock`` for qwen3-30b-a3b and custom shapes,
``MixtralSparseMoeBlock`` for mixtral; issue 12's families: ``DeepseekV3MoE`` for deepseek-v3 and
kimi-k2, ``GptOssMLP`` for the gpt-oss shapes, ``Qwen3NextSparseMoeBlock``, ``Llama4TextMoe``),
points its router and expert Parameters at the problem's tensors (no copy where HF's layout is the
op's: ``gate_up_proj [E, 2I, H]`` is flashmoe's ``w1``; GPT-OSS's and Llama 4's transposed experts
are converted once, untimed; a shared expert's ``gate_proj``/``up_proj`` are views of ``shared_w1``),
and runs it under one of
transformers' experts implementations (``eager``, ``grouped_mm``; ``sonicmoe``, ``deepgemm`` on CUDA;
``flashmoe``, registered by :mod:`flashmoe.hf`).
transformers is imported only when such a backend is built.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

from .configs import NAMED_CONFIGS, LayerShape
from .problem import MoEProblem

# backend name -> transformers experts_implementation
HF_BACKENDS = {
    "hf-eager": "eager",
    "hf-grouped-mm": "grouped_mm",
    "hf-sonicmoe": "sonicmoe",
    "hf-deepgemm": "deepgemm",
    "hf-flashmoe": "flashmoe",  # HF's block and router, flashmoe's op for the experts (flashmoe.hf)
}
CUDA_ONLY = ("sonicmoe", "deepgemm")

# named config -> (transformers model type, config class, block class)
_NAMED_BLOCKS = {
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock"),
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock"),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralSparseMoeBlock"),
}
_CUSTOM_BLOCK = _NAMED_BLOCKS["qwen3-30b-a3b"]
# Issue 12's families: named config -> (model type, config class, block class). These blocks run their
# own routing and shared experts, so they run exactly their named config's options (dimensions may change).
_FAMILY_BLOCKS = {
    "deepseek-v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE"),
    "kimi-k2": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE"),
    "gpt-oss-120b": ("gpt_oss", "GptOssConfig", "GptOssMLP"),
    "gpt-oss-20b": ("gpt_oss", "GptOssConfig", "GptOssMLP"),
    "qwen3-next-80b": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextSparseMoeBlock"),
    "llama4-scout": ("llama4", "Llama4TextConfig", "Llama4TextMoe"),
}
# Llama4TextExperts runs every token through every expert with bmm; it has no experts_implementation seam.
_EAGER_ONLY = ("Llama4TextMoe",)
# flashmoe activation -> the config's hidden_act
_HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class HFBlockUnavailable(RuntimeError):
    """This HF block cannot run the problem (shape, routing or installation); the message says why."""


def _base_name(shape: LayerShape) -> str:
    return shape.name.split("[", 1)[0]


def block_names(shape: LayerShape) -> Tuple[str, str, str]:
    """(model type, config class, block class) of the HF block for ``shape``."""
    base_name = _base_name(shape)
    return _NAMED_BLOCKS.get(base_name) or _FAMILY_BLOCKS.get(base_name) or _CUSTOM_BLOCK


_FAMILY_FIELDS = ("gated", "activation", "scoring", "normalize", "selection_bias", "num_groups", "topk_groups",
                  "routed_scaling_factor", "router_fp32", "weight_on", "shared_gate", "expert_bias")


def _check_family_supported(shape: LayerShape, problem: MoEProblem, block_class: str) -> None:
    named = NAMED_CONFIGS[_base_name(shape)]
    unsupported = [f"{name}={getattr(shape, name)!r}" for name in _FAMILY_FIELDS
                   if getattr(shape, name) != getattr(named, name)]
    if bool(shape.shared_ffn_size) != bool(named.shared_ffn_size):
        unsupported.append("no shared expert" if named.shared_ffn_size else "a shared expert")
    if shape.capacity_factor is not None:
        unsupported.append("a capacity factor (HF blocks are dropless)")
    if problem.router_bias is not None:
        unsupported.append("a router bias (skewed routing)")
    if unsupported:
        raise HFBlockUnavailable(f"{block_class} cannot run {shape.name}: {', '.join(unsupported)}")


def _check_supported(shape: LayerShape, problem: MoEProblem) -> None:
    _, _, block_class = block_names(shape)
    if _base_name(shape) in _FAMILY_BLOCKS:
        return _check_family_supported(shape, problem, block_class)
    unsupported = list(shape.extra_features())
    if not shape.gated:
        unsupported.append("non-gated experts")
    if shape.scoring == "sigmoid":
        unsupported.append(f"scoring={shape.scoring!r}")
    if shape.capacity_factor is not None:
        unsupported.append("a capacity factor (HF blocks are dropless)")
    if problem.router_bias is not None:
        unsupported.append("a router bias (skewed routing)")
    if block_class == "MixtralSparseMoeBlock" and not shape.normalize:
        unsupported.append("normalize=False (Mixtral always normalizes)")
    if unsupported:
        raise HFBlockUnavailable(f"{block_class} cannot run {shape.name}: {', '.join(unsupported)}")


def _check_implementation(implementation: str, device: torch.device) -> None:
    if implementation == "flashmoe":
        from flashmoe import hf

        hf.register()
        return
    if implementation not in CUDA_ONLY:
        return
    if device.type != "cuda":
        raise HFBlockUnavailable(f"experts_implementation={implementation!r} runs only on CUDA, not {device.type}")
    if implementation == "sonicmoe":
        from transformers.integrations.sonicmoe import is_sonicmoe_loadable as loadable
    else:
        from transformers.integrations.deepgemm import is_deepgemm_loadable as loadable
    try:
        loadable(raise_error=True)
    except ImportError as error:
        raise HFBlockUnavailable(f"{implementation} is not installed here: {error}") from None


def build_block(problem: MoEProblem, implementation: str) -> nn.Module:
    """The HF block of ``problem.shape`` over the problem's own weight tensors (shared, not copied,
    where HF's layout is the op's)."""
    shape = problem.shape
    _check_supported(shape, problem)
    device = problem.inputs[0].device
    model_type, config_name, block_name = block_names(shape)
    if block_name in _EAGER_ONLY and implementation != "eager":
        raise HFBlockUnavailable(f"{block_name} has no experts_implementation seam (its experts run every token "
                                 f"through every expert with bmm); only hf-eager runs it")
    _check_implementation(implementation, device)
    try:
        import transformers
    except ImportError as error:
        raise HFBlockUnavailable(f"the hf-* backends need transformers (pip install flashmoe[hf]): {error}") from None
    module = getattr(getattr(transformers.models, model_type), f"modeling_{model_type}")
    config = getattr(transformers, config_name)(**_config_values(shape))
    with torch.device("meta"):  # shapes only: the real tensors are the problem's
        block = getattr(module, block_name)(config)
        shared = _shared_mlp_path(block_name)
        if shared is not None:  # the shared expert's own size, whatever the config derives it from
            setattr(block, shared, type(getattr(block, shared))(config, intermediate_size=shape.shared_ffn_size))
    with torch.no_grad():
        _fill(block, block_name, problem)
    left_on_meta = [name for name, tensor in [*block.named_parameters(), *block.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise HFBlockUnavailable(f"{block_name} has tensors the benchmark does not fill: {left_on_meta}")
    if block_name not in _EAGER_ONLY:
        block.experts.config._experts_implementation = implementation
    return block.eval()


def _config_values(shape: LayerShape) -> dict:
    common = dict(hidden_size=shape.hidden_size, num_experts=shape.num_experts, num_local_experts=shape.num_experts,
                  num_experts_per_tok=shape.top_k, moe_intermediate_size=shape.ffn_size,
                  intermediate_size=shape.ffn_size, norm_topk_prob=shape.normalize,
                  hidden_act=_HIDDEN_ACT.get(shape.activation, "silu"))
    if _base_name(shape) in ("deepseek-v3", "kimi-k2"):
        common.update(n_routed_experts=shape.num_experts, n_group=shape.num_groups, topk_group=shape.topk_groups,
                      routed_scaling_factor=shape.routed_scaling_factor, n_shared_experts=1)
    elif _base_name(shape) == "qwen3-next-80b":
        common.update(shared_expert_intermediate_size=shape.shared_ffn_size)
    elif _base_name(shape) not in _FAMILY_BLOCKS:
        common.update(router_jitter_noise=0.0)
    return common


def _shared_mlp_path(block_name: str):
    return {"DeepseekV3MoE": "shared_experts", "Qwen3NextSparseMoeBlock": "shared_expert",
            "Llama4TextMoe": "shared_expert"}.get(block_name)


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _fill(block: nn.Module, block_name: str, problem: MoEProblem) -> None:
    """Point the block's tensors at the problem's (a view or, for a transposed layout, a converted copy)."""
    from flashmoe.hf import _to_hf_layout

    weights = problem.weights
    router = block.router if block_name in ("GptOssMLP", "Llama4TextMoe") else block.gate
    router.weight = _parameter(weights.router_weight)
    if block_name == "GptOssMLP":  # HF keeps a router bias; the problem's is none (uniform): zeros
        router.bias = _parameter(torch.zeros_like(weights.router_weight[:, 0]))
        block.experts.gate_up_proj = _parameter(_to_hf_layout(weights.w1, True, True))
        block.experts.gate_up_proj_bias = _parameter(_to_hf_layout(weights.b1, False, True))
        block.experts.down_proj = _parameter(_to_hf_layout(weights.w2, True, False))
        block.experts.down_proj_bias = _parameter(weights.b2)
    elif block_name == "Llama4TextMoe":
        block.experts.gate_up_proj = _parameter(_to_hf_layout(weights.w1, True, False))
        block.experts.down_proj = _parameter(_to_hf_layout(weights.w2, True, False))
    else:
        block.experts.gate_up_proj = _parameter(weights.w1)
        block.experts.down_proj = _parameter(weights.w2)
    if block_name == "DeepseekV3MoE":
        router.e_score_correction_bias = weights.selection_bias
    shared = _shared_mlp_path(block_name)
    if shared is not None:
        mlp, size = getattr(block, shared), weights.shared_w2.shape[1]
        mlp.gate_proj.weight = _parameter(weights.shared_w1[:size])
        mlp.up_proj.weight = _parameter(weights.shared_w1[size:])
        mlp.down_proj.weight = _parameter(weights.shared_w2)
    if block_name == "Qwen3NextSparseMoeBlock":
        block.shared_expert_gate.weight = _parameter(weights.shared_gate)


def runner(backend: str) -> Callable[[MoEProblem], Callable[[int], torch.Tensor]]:
    """A backends.BACKENDS builder for the ``hf-*`` backend ``backend``."""
    implementation = HF_BACKENDS[backend]

    def build(problem: MoEProblem) -> Callable[[int], torch.Tensor]:
        block = build_block(problem, implementation)

        def run(index: int) -> torch.Tensor:
            x = problem.inputs[index]
            output = block(x.unsqueeze(0))
            # GptOssMLP and Llama4TextMoe return (y, router output); Llama 4's y is [T, H].
            return (output[0] if isinstance(output, tuple) else output).reshape(x.shape)
        return run
    return build
