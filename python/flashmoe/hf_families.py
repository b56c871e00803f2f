"""``MoE.from_hf`` for today's HF transformers (v5) MoE families: routing options, shared experts and
expert layouts beyond Mixtral / Qwen3-MoE / OLMoE.

One reader per block class (dispatched on the class name, so importing this module imports no
transformers model):

==========================  =======================================================================
``DeepseekV3MoE``           DeepSeek-V3 and Kimi-K2: sigmoid scores, ``e_score_correction_bias`` as
``Glm4MoeMoE``              the selection bias, group-limited choice (``n_group``/``topk_group``),
``Dots1MoE``                ``routed_scaling_factor``, the fp32 gate, ``shared_experts``
``GptOssMLP``               softmax over the top-k logits (router bias included), ``swiglu_oai``,
                            expert biases, the ``[E, H, 2I]`` interleaved layout
``Qwen3NextSparseMoeBlock`` softmax routing, a ``shared_expert`` scaled by ``σ(shared_expert_gate)``
``Qwen2MoeSparseMoeBlock``
``Llama4TextMoe``           top-k sigmoid, the pick weight on the expert's input, a ``shared_expert``
==========================  =======================================================================

With ``share_parameters`` the new MoE holds the block's own Parameters wherever the op reads HF's
layout as it is (the router, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``shared_w2``,
``shared_gate``, the selection-bias buffer). Two layouts cannot be shared without a copy, and
``from_hf`` copies them once and warns: GPT-OSS's and Llama 4's transposed experts (``[E, H, 2I]``,
GPT-OSS's with gate and up interleaved, and ``[E, I, H]``; converted by :mod:`flashmoe.hf`'s layout
functions), and every shared expert's separate ``gate_proj``/``up_proj``, which the op takes stacked
as ``shared_w1 [2S, H]``. A copy is the MoE's own Parameter: training it does not train the block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import reference

__all__ = ["FAMILIES", "reads", "read", "from_hf", "BlockReading"]


@dataclass
class BlockReading:
    """What one HF block means to :class:`flashmoe.MoE`: its constructor arguments and its tensors."""

    family: str
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    dtype: torch.dtype
    options: Dict[str, object]              # MoE constructor keywords the block defines
    shared: Dict[str, Tensor] = field(default_factory=dict)  # MoE name -> the block's own tensor, op layout
    copied: Dict[str, Tensor] = field(default_factory=dict)  # MoE name -> a converted copy
    copy_notes: List[str] = field(default_factory=list)      # what was copied, from which layout


def _owner_name(block: nn.Module) -> str:
    return type(block).__name__


def _get(block: nn.Module, path: str):
    """``block.<path>``, or a TypeError naming the family and the missing attribute."""
    owner = block
    for part in path.split("."):
        if not hasattr(owner, part) or getattr(owner, part) is None:
            raise TypeError(f"{_owner_name(block)} must have {path} to be read by MoE.from_hf "
                            f"(an HF transformers v5 block of that class); it lacks block.{path}")
        owner = getattr(owner, part)
    return owner


def _tensor(block: nn.Module, path: str, shape: tuple, layout: str, dtype: Optional[torch.dtype]) -> Tensor:
    tensor = _get(block, path)
    if not isinstance(tensor, Tensor):
        raise TypeError(f"block.{path} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"block.{path} must have dtype in {reference.FLOAT_DTYPES}, got {tensor.dtype}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"block.{path} must have the experts' dtype {dtype}, got {tensor.dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"block.{path} must have shape {layout} = {list(shape)}, got {list(tensor.shape)}")
    return tensor


def _int(block: nn.Module, path: str) -> int:
    value = _get(block, path)
    if not reference._is_int(value):
        raise TypeError(f"block.{path} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _real(block: nn.Module, path: str) -> float:
    value = _get(block, path)
    if not reference._is_real(value):
        raise TypeError(f"block.{path} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _flag(block: nn.Module, path: str) -> bool:
    """A bool option; None (an unset config field) is False, as HF's ``if`` reads it."""
    value = getattr(_get(block, path.rpartition(".")[0]), path.rpartition(".")[2], None)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"block.{path} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _no_bias(block: nn.Module, path: str) -> None:
    if getattr(_get(block, path), "bias", None) is not None:
        raise ValueError(f"block.{path} has a bias, which MoE.from_hf does not model for "
                         f"{_owner_name(block)} (the op's {path.split('.')[-1]} has none)")


def _activation(block: nn.Module, path: str) -> str:
    """The op's name for the activation at ``block.<path>`` (an HF activation module or function)."""
    from .hf import ACTIVATIONS, UnsupportedExpertsError, _act_fn_activation

    function = _get(block, path)
    try:
        return _act_fn_activation(_ActivationOwner(function), f"block.{path}")
    except UnsupportedExpertsError:
        raise ValueError(f"block.{path} of {_owner_name(block)} is {type(function).__name__}, which has no "
                         f"flashmoe activation; supported: {sorted(ACTIVATIONS)}") from None


class _ActivationOwner:
    """Holds an activation as ``act_fn``, the attribute :func:`flashmoe.hf._act_fn_activation` reads."""

    def __init__(self, act_fn):
        self.act_fn = act_fn


def _experts_plan(block: nn.Module):
    """flashmoe.hf's plan of ``block.experts`` (activation, swiglu options, layout), as ValueError when the
    op cannot compute it."""
    from .hf import UnsupportedExpertsError, plan

    try:
        return plan(_get(block, "experts"))
    except UnsupportedExpertsError as error:
        raise ValueError(f"block.experts: {error}") from None


def _router_dtype(block: nn.Module, path: str, dtype: torch.dtype) -> dict:
    """The router may stay float32 while the experts are bf16/fp16 (DeepSeek's fp32 gate); any other
    mismatch is refused by name."""
    router_dtype = _get(block, path).dtype
    if router_dtype == dtype:
        return {}
    if router_dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
        return {"router_dtype": torch.float32}
    raise TypeError(f"block.{path} must have the experts' dtype {dtype}, or float32 with bf16/fp16 experts; "
                    f"got {router_dtype}")


def _shared_mlp(block: nn.Module, reading: BlockReading, path: str, activation_name: str, gated_experts: bool,
                experts_activation: str) -> None:
    """A dense gate/up/down MLP as the op's shared expert: ``shared_w1 = [gate_proj; up_proj]`` (a copy),
    ``shared_w2 = down_proj`` (shared)."""
    hidden, dtype = reading.hidden_size, reading.dtype
    gate = _get(block, f"{path}.gate_proj.weight")
    if not isinstance(gate, Tensor) or gate.dim() != 2:
        raise ValueError(f"block.{path}.gate_proj.weight must be a [S, H] tensor, got "
                         f"{getattr(gate, 'shape', type(gate).__name__)}")
    size = gate.shape[0]
    gate = _tensor(block, f"{path}.gate_proj.weight", (size, hidden), "[S, H]", dtype)
    up = _tensor(block, f"{path}.up_proj.weight", (size, hidden), "[S, H]", dtype)
    down = _tensor(block, f"{path}.down_proj.weight", (hidden, size), "[H, S]", dtype)
    for part in ("gate_proj", "up_proj", "down_proj"):
        _no_bias(block, f"{path}.{part}")
    activation = _activation(block, f"{path}.{activation_name}")
    if not gated_experts or activation != experts_activation:
        raise ValueError(f"block.{path} uses {activation}, the routed experts {experts_activation}: the op's shared "
                         "expert runs the routed experts' activation")
    reading.options["shared_ffn_size"] = size
    with torch.no_grad():
        reading.copied["shared_w1"] = torch.cat([gate.detach(), up.detach()], dim=0)
    reading.shared["shared_w2"] = down
    reading.copy_notes.append(f"block.{path}.gate_proj/up_proj ([S, H] each) -> shared_w1 [2S, H]")


def _experts_tensors(block: nn.Module, reading: BlockReading, *, transposed: bool, interleaved: bool,
                     biases: bool) -> None:
    """The routed experts' w1/w2 (and b1/b2): shared where HF's layout is the op's, else converted once
    with flashmoe.hf's layout functions."""
    from .hf import _to_op_layout

    experts, hidden, ffn, dtype = reading.num_experts, reading.hidden_size, reading.ffn_size, reading.dtype
    if transposed:
        gate_up = _tensor(block, "experts.gate_up_proj", (experts, hidden, 2 * ffn), "[E, H, 2I]", dtype)
        down = _tensor(block, "experts.down_proj", (experts, ffn, hidden), "[E, I, H]", dtype)
        order = "gate/up interleaved" if interleaved else "gate then up"
        with torch.no_grad():
            reading.copied["w1"] = _to_op_layout(gate_up.detach(), True, interleaved)
            reading.copied["w2"] = _to_op_layout(down.detach(), True, False)
        reading.copy_notes.append(f"block.experts.gate_up_proj [E, H, 2I] ({order}) -> w1 [E, 2I, H]")
        reading.copy_notes.append("block.experts.down_proj [E, I, H] -> w2 [E, H, I]")
    else:
        reading.shared["w1"] = _tensor(block, "experts.gate_up_proj", (experts, 2 * ffn, hidden), "[E, 2I, H]", dtype)
        reading.shared["w2"] = _tensor(block, "experts.down_proj", (experts, hidden, ffn), "[E, H, I]", dtype)
    if biases:
        b1 = _tensor(block, "experts.gate_up_proj_bias", (experts, 2 * ffn), "[E, 2I]", dtype)
        reading.shared["b2"] = _tensor(block, "experts.down_proj_bias", (experts, hidden), "[E, H]", dtype)
        if interleaved:
            with torch.no_grad():
                reading.copied["b1"] = _to_op_layout(b1.detach(), False, True)
            reading.copy_notes.append("block.experts.gate_up_proj_bias [E, 2I] (interleaved) -> b1 [E, 2I]")
        else:
            reading.shared["b1"] = b1
        reading.options["expert_bias"] = True


def _dims(block: nn.Module, router_path: str, transposed: bool) -> tuple:
    """(H, I, E, dtype) from the router weight ``[E, H]`` and ``experts.gate_up_proj``."""
    router = _get(block, f"{router_path}.weight")
    gate_up = _get(block, "experts.gate_up_proj")
    for path, tensor, dims, layout in ((f"{router_path}.weight", router, 2, "[E, H]"),
                                       ("experts.gate_up_proj", gate_up, 3, "[E, H, 2I]" if transposed else "[E, 2I, H]")):
        if not isinstance(tensor, Tensor) or tensor.dim() != dims:
            raise ValueError(f"block.{path} must be a tensor {layout}, got "
                             f"{list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__}")
    experts, hidden = router.shape
    rows = gate_up.shape[2] if transposed else gate_up.shape[1]
    if rows % 2 or rows == 0:
        raise ValueError(f"block.experts.gate_up_proj must hold 2I gate and up rows, an even non-zero count; "
                         f"got {list(gate_up.shape)}")
    return hidden, rows // 2, experts, gate_up.dtype


def _read_deepseek(block: nn.Module) -> BlockReading:
    """DeepseekV3MoE (DeepSeek-V3, Kimi-K2), Glm4MoeMoE, Dots1MoE: the same router and shared experts."""
    hidden, ffn, experts, dtype = _dims(block, "gate", transposed=False)
    plan = _experts_plan(block)
    if not plan.gated or plan.is_transposed or not plan.is_concatenated or plan.has_bias or plan.has_post_expert_norm:
        raise ValueError(f"block.experts of {_owner_name(block)} has a layout or option MoE.from_hf does not read: {plan}")
    top_k = _int(block, "gate.top_k")
    groups, top_groups = _int(block, "gate.num_group"), _int(block, "gate.topk_group")
    if groups < 1 or experts % groups:
        raise ValueError(f"block.gate.num_group={groups} must divide the {experts} experts")
    reading = BlockReading(_owner_name(block), hidden, ffn, experts, top_k, dtype, options=dict(
        gated=True, activation=plan.activation, swiglu_limit=plan.swiglu_limit, swiglu_alpha=plan.swiglu_alpha,
        scoring="sigmoid", normalize=_flag(block, "gate.norm_topk_prob"), selection_bias=True,
        num_groups=groups, topk_groups=top_groups,
        routed_scaling_factor=_real(block, "gate.routed_scaling_factor"),
        **_router_dtype(block, "gate.weight", dtype)))
    router_dtype = reading.options.get("router_dtype", dtype)
    reading.shared["router_weight"] = _tensor(block, "gate.weight", (experts, hidden), "[E, H]", router_dtype)
    _no_bias(block, "gate")
    reading.shared["selection_bias"] = _tensor(block, "gate.e_score_correction_bias", (experts,), "[E]", None)
    _experts_tensors(block, reading, transposed=False, interleaved=False, biases=False)
    _shared_mlp(block, reading, "shared_experts", "act_fn", True, plan.activation)
    return reading


def _read_qwen_shared(block: nn.Module) -> BlockReading:
    """Qwen3NextSparseMoeBlock, Qwen2MoeSparseMoeBlock: softmax routing and a gated shared expert."""
    hidden, ffn, experts, dtype = _dims(block, "gate", transposed=False)
    plan = _experts_plan(block)
    if not plan.gated or plan.is_transposed or not plan.is_concatenated or plan.has_bias or plan.has_post_expert_norm:
        raise ValueError(f"block.experts of {_owner_name(block)} has a layout or option MoE.from_hf does not read: {plan}")
    reading = BlockReading(_owner_name(block), hidden, ffn, experts, _int(block, "gate.top_k"), dtype, options=dict(
        gated=True, activation=plan.activation, swiglu_limit=plan.swiglu_limit, swiglu_alpha=plan.swiglu_alpha,
        scoring="softmax", normalize=_flag(block, "gate.norm_topk_prob"),
        **_router_dtype(block, "gate.weight", dtype)))
    router_dtype = reading.options.get("router_dtype", dtype)
    reading.shared["router_weight"] = _tensor(block, "gate.weight", (experts, hidden), "[E, H]", router_dtype)
    _no_bias(block, "gate")
    _experts_tensors(block, reading, transposed=False, interleaved=False, biases=False)
    _shared_mlp(block, reading, "shared_expert", "act_fn", True, plan.activation)
    reading.shared["shared_gate"] = _tensor(block, "shared_expert_gate.weight", (1, hidden), "[1, H]", dtype)
    _no_bias(block, "shared_expert_gate")
    reading.options["shared_gate"] = True
    return reading


def _read_gpt_oss(block: nn.Module) -> BlockReading:
    """GptOssMLP: top-k of the router logits (bias included), softmax over those k, swiglu_oai experts with
    biases, gate_up_proj ``[E, H, 2I]`` with gate and up interleaved (copied once)."""
    hidden, ffn, experts, dtype = _dims(block, "router", transposed=True)
    plan = _experts_plan(block)
    if plan.activation != "swiglu_oai" or not plan.is_transposed or plan.is_concatenated or not plan.has_bias:
        raise ValueError(f"block.experts of {_owner_name(block)} has a layout or option MoE.from_hf does not read: {plan}")
    reading = BlockReading(_owner_name(block), hidden, ffn, experts, _int(block, "router.top_k"), dtype, options=dict(
        gated=True, activation="swiglu_oai", swiglu_limit=plan.swiglu_limit, swiglu_alpha=plan.swiglu_alpha,
        scoring="softmax_topk", router_bias=True, **_router_dtype(block, "router.weight", dtype)))
    router_dtype = reading.options.get("router_dtype", dtype)
    reading.shared["router_weight"] = _tensor(block, "router.weight", (experts, hidden), "[E, H]", router_dtype)
    reading.shared["router_bias"] = _tensor(block, "router.bias", (experts,), "[E]", router_dtype)
    _experts_tensors(block, reading, transposed=True, interleaved=True, biases=True)
    return reading


def _read_llama4(block: nn.Module) -> BlockReading:
    """Llama4TextMoe: top-k sigmoid scores, no normalisation, the score scales the expert's input
    (``weight_on="input"``), a shared expert; ``gate_up_proj [E, H, 2I]`` (gate then up) copied once."""
    hidden, ffn, experts, dtype = _dims(block, "router", transposed=True)
    activation = _activation(block, "experts.act_fn")
    reading = BlockReading(_owner_name(block), hidden, ffn, experts, _int(block, "router.top_k"), dtype, options=dict(
        gated=True, activation=activation, scoring="sigmoid", normalize=False, weight_on="input",
        **_router_dtype(block, "router.weight", dtype)))
    router_dtype = reading.options.get("router_dtype", dtype)
    reading.shared["router_weight"] = _tensor(block, "router.weight", (experts, hidden), "[E, H]", router_dtype)
    _no_bias(block, "router")
    _experts_tensors(block, reading, transposed=True, interleaved=False, biases=False)
    _shared_mlp(block, reading, "shared_expert", "activation_fn", True, activation)
    return reading


# Block class name -> reader. Kimi-K2 loads as DeepseekV3MoE.
FAMILIES: Dict[str, Callable[[nn.Module], BlockReading]] = {
    "DeepseekV3MoE": _read_deepseek,
    "Glm4MoeMoE": _read_deepseek,
    "Dots1MoE": _read_deepseek,
    "GptOssMLP": _read_gpt_oss,
    "Qwen3NextSparseMoeBlock": _read_qwen_shared,
    "Qwen2MoeSparseMoeBlock": _read_qwen_shared,
    "Llama4TextMoe": _read_llama4,
}


def reads(block) -> bool:
    """Whether ``block`` is one of :data:`FAMILIES` (by class name)."""
    return type(block).__name__ in FAMILIES


def read(block: nn.Module) -> BlockReading:
    """The :class:`BlockReading` of ``block``; TypeError for a block of no known family."""
    reader = FAMILIES.get(type(block).__name__)
    if reader is None:
        raise TypeError(f"MoE.from_hf has no reader for {type(block).__name__}; known: {sorted(FAMILIES)} "
                        "and the Mixtral / Qwen3-MoE / OLMoE sparse-MoE blocks")
    return reader(block)


def from_hf(cls, block: nn.Module, *, share_parameters: bool = True, **options):
    """``cls`` (:class:`flashmoe.MoE`) from ``block``; see :meth:`flashmoe.MoE.from_hf`."""
    reading = read(block)
    clash = sorted(set(options) & (set(reading.options) | {"top_k", "device", "dtype"}))
    if clash:
        raise ValueError(f"MoE.from_hf reads {', '.join(clash)} from the {reading.family} block; "
                         "pass only options the block does not define (capacity_factor, backend, loss coefficients)")
    layer = cls(reading.hidden_size, reading.ffn_size, reading.num_experts, reading.top_k, device="meta",
                dtype=reading.dtype, **reading.options, **options)
    for name, tensor in reading.shared.items():
        if name == "selection_bias":  # a buffer: HF updates e_score_correction_bias outside autograd
            setattr(layer, name, tensor if share_parameters else tensor.detach().clone())
        elif share_parameters and isinstance(tensor, nn.Parameter):
            setattr(layer, name, tensor)
        else:
            setattr(layer, name, nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad))
    for name, tensor in reading.copied.items():
        setattr(layer, name, nn.Parameter(tensor))
    left = [name for name, tensor in (*layer.named_parameters(), *layer.named_buffers()) if tensor.is_meta]
    if left:
        raise TypeError(f"MoE.from_hf could not fill {left} from the {reading.family} block")
    if share_parameters and reading.copy_notes:
        warnings.warn(f"MoE.from_hf({reading.family}): the op cannot share these layouts, so they were copied "
                      f"once (training the MoE does not train the block's copies): {'; '.join(reading.copy_notes)}",
                      stacklevel=3)
    return layer
