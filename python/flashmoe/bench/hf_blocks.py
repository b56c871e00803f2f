"""The real HF transformers MoE blocks as benchmark backends, sharing flashmoe's weights.

Each ``hf-*`` backend builds the named shape's own sparse-MoE block from transformers
(``OlmoeSparseMoeBlock`` for olmoe, ``Qwen3MoeSparseMoeBlock`` for qwen3-30b-a3b and custom shapes,
``MixtralSparseMoeBlock`` for mixtral), points its router and expert Parameters at the problem's
tensors (no copy: HF's ``gate_up_proj [E, 2I, H]`` is flashmoe's ``w1``), and runs it under one of
transformers' experts implementations (``eager``, ``grouped_mm``; ``sonicmoe``, ``deepgemm`` on CUDA;
``flashmoe``, registered by :mod:`flashmoe.hf`).
transformers is imported only when such a backend is built.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

from .configs import LayerShape
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
# flashmoe activation -> the config's hidden_act
_HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class HFBlockUnavailable(RuntimeError):
    """This HF block cannot run the problem (shape, routing or installation); the message says why."""


def block_names(shape: LayerShape) -> Tuple[str, str, str]:
    """(model type, config class, block class) of the HF block for ``shape``."""
    base_name = shape.name.split("[", 1)[0]
    return _NAMED_BLOCKS.get(base_name, _CUSTOM_BLOCK)


def _check_supported(shape: LayerShape, problem: MoEProblem) -> None:
    _, _, block_class = block_names(shape)
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
    """The HF block of ``problem.shape`` over the problem's own weight tensors (shared, not copied)."""
    shape = problem.shape
    _check_supported(shape, problem)
    device = problem.inputs[0].device
    _check_implementation(implementation, device)
    try:
        import transformers
    except ImportError as error:
        raise HFBlockUnavailable(f"the hf-* backends need transformers (pip install flashmoe[hf]): {error}") from None
    model_type, config_name, block_name = block_names(shape)
    module = getattr(transformers.models, model_type)
    config = getattr(transformers, config_name)(
        hidden_size=shape.hidden_size, num_experts=shape.num_experts, num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, moe_intermediate_size=shape.ffn_size, intermediate_size=shape.ffn_size,
        norm_topk_prob=shape.normalize, hidden_act=_HIDDEN_ACT[shape.activation], router_jitter_noise=0.0)
    with torch.device("meta"):  # shapes only: the real tensors are the problem's
        block = getattr(getattr(module, f"modeling_{model_type}"), block_name)(config)
    weights = problem.weights
    block.gate.weight = nn.Parameter(weights.router_weight, requires_grad=False)
    block.experts.gate_up_proj = nn.Parameter(weights.w1, requires_grad=False)
    block.experts.down_proj = nn.Parameter(weights.w2, requires_grad=False)
    left_on_meta = [name for name, tensor in [*block.named_parameters(), *block.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise HFBlockUnavailable(f"{block_name} has tensors the benchmark does not fill: {left_on_meta}")
    block.experts.config._experts_implementation = implementation
    return block.eval()


def runner(backend: str) -> Callable[[MoEProblem], Callable[[int], torch.Tensor]]:
    """A backends.BACKENDS builder for the ``hf-*`` backend ``backend``."""
    implementation = HF_BACKENDS[backend]

    def build(problem: MoEProblem) -> Callable[[int], torch.Tensor]:
        block = build_block(problem, implementation)

        return lambda index: block(problem.inputs[index].unsqueeze(0)).squeeze(0)
    return build
