"""flashmoe as an HF transformers experts implementation: ``experts_implementation="flashmoe"``.

transformers 5 runs the experts of its MoE families through one seam: an experts module
decorated with ``@use_experts_implementation`` calls the function registered in
``ExpertsInterface`` under the model's chosen name,
``fn(module, hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]``.
:func:`register` puts :func:`experts_forward` there. HF routes; flashmoe's op runs the expert
FFNs and the combine from that routing (``flashmoe.moe(x, w1, w2, topk_ids=, topk_weights=)``).

The weights are the module's own Parameters. The layouts the op reads in place (``gate_up_proj
[E, 2I, H]`` gate rows then up rows, ``down_proj [E, H, I]``) go to the op as they are; a
transposed or interleaved layout is converted once, cached keyed on the Parameter
and its version counter (so an optimizer's in-place step invalidates it), and its gradient is
converted back, so gradients land on HF's Parameters in HF's layout.

``import flashmoe`` never imports this module, and this module imports transformers only
inside :func:`register`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .functional import moe
from .layer import _HF_ACTIVATIONS

__all__ = ["NAME", "register", "experts_forward", "plan", "check_model", "call_count", "reset_call_count",
           "cached_conversion", "UnsupportedExpertsError"]

NAME = "flashmoe"

# HF activation modules (by class name) -> the op's activation, for act_fn and the default _apply_gate.
ACTIVATIONS = {**_HF_ACTIVATIONS, "ReLUSquaredActivation": "relu2"}


class UnsupportedExpertsError(NotImplementedError):
    """An experts module uses a feature flashmoe's op does not compute; the message names the family
    (the experts class) and the feature. flashmoe never falls back to eager silently."""


@dataclass(frozen=True)
class ExpertsPlan:
    """How one experts module maps onto the op: the op's activation options and the weight layout."""

    gated: bool
    activation: str
    swiglu_limit: Optional[float]
    swiglu_alpha: Optional[float]
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    has_post_expert_norm: bool


def _family(module) -> str:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    name = type(module).__name__
    return f"{name} ({model_type})" if model_type else name


# Plain functions some families use as act_fn (LFM2-MoE: F.silu).
FUNCTION_ACTIVATIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.relu: "relu",
                        torch.nn.functional.gelu: "gelu"}


def _act_fn_activation(module, where: str) -> str:
    act_fn = getattr(module, "act_fn", None)
    if act_fn in FUNCTION_ACTIVATIONS:
        return FUNCTION_ACTIVATIONS[act_fn]
    name = type(act_fn).__name__
    if name == "GELU" and getattr(act_fn, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name not in ACTIVATIONS:
        raise UnsupportedExpertsError(
            f"flashmoe cannot run {_family(module)}: its {where} is {name}, and the op computes only "
            f"{sorted(set(ACTIVATIONS.values()))} (HF classes {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _require_silu(module, what: str) -> None:
    activation = _act_fn_activation(module, "act_fn")
    if activation != "silu":
        raise UnsupportedExpertsError(
            f"flashmoe cannot run {_family(module)}: its _apply_gate is {what} around act_fn={activation}, "
            "and the op's clamped SwiGLUs use silu")


def _limit(module, attribute: str) -> float:
    return float(getattr(module, attribute))


def _swiglu_oai(limit_attribute: str, alpha_attribute: str):
    def gate(module) -> Tuple[str, Optional[float], Optional[float]]:
        return "swiglu_oai", _limit(module, limit_attribute), float(getattr(module, alpha_attribute))
    return gate


def _swiglu_clamp(limit_attribute: str, act_fn_is_silu: bool = False):
    def gate(module):
        if act_fn_is_silu:
            _require_silu(module, "a clamp")
        return "swiglu_clamp", _limit(module, limit_attribute), None
    return gate


def _swiglu_clamp_post(module):
    """Step-3.7 / Bailing: ``min(act(g), L) · clamp(u, -L, L)``, no clamp where the limit is None."""
    if getattr(module, "limit", None) is None:
        return _act_fn_activation(module, "act_fn"), None, None
    _require_silu(module, "a post-activation clamp")
    return "swiglu_clamp_post", _limit(module, "limit"), None


def _act_fn_in_fp32(module):
    """Beam: ``act(g.float()) · u.float()`` rounded back; the op keeps the activation in fp32 too."""
    return _act_fn_activation(module, "act_fn"), None, None


# Each family's own _apply_gate, by the qualified name of the function, -> (activation, L, alpha).
# A family that overrides _apply_gate and is not here gets UnsupportedExpertsError.
GATE_OVERRIDES: Dict[str, Callable] = {
    "GptOssExperts._apply_gate": _swiglu_oai("limit", "alpha"),                # interleaved layout
    "OpenAIPrivacyFilterExperts._apply_gate": _swiglu_oai("limit", "alpha"),  # concatenated layout
    "MiniMaxM3VLExperts._apply_gate": _swiglu_oai("swiglu_limit", "swiglu_alpha"),
    "DeepseekV4Experts._apply_gate": _swiglu_clamp("limit", act_fn_is_silu=True),
    "HYV4Experts._apply_gate": _swiglu_clamp("swiglu_limit"),
    "HYV4VLExperts._apply_gate": _swiglu_clamp("swiglu_limit"),
    "Glm5NextTextExperts._apply_gate": _swiglu_clamp("swiglu_limit"),
    "Step3p7Experts._apply_gate": _swiglu_clamp_post,
    "BailingHybridExperts._apply_gate": _swiglu_clamp_post,
    "BeamExperts._apply_gate": _act_fn_in_fp32,
}


def _gate_activation(module) -> Tuple[str, Optional[float], Optional[float]]:
    from transformers.integrations.moe import _default_apply_gate

    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if apply_gate is _default_apply_gate:
        return _act_fn_activation(module, "act_fn"), None, None
    key = getattr(apply_gate, "__qualname__", repr(apply_gate))
    if key not in GATE_OVERRIDES:
        raise UnsupportedExpertsError(
            f"flashmoe cannot run {_family(module)}: its own _apply_gate ({key}) is not one the op computes "
            f"(known: {sorted(GATE_OVERRIDES)})")
    return GATE_OVERRIDES[key](module)


def plan(module) -> ExpertsPlan:
    """The op options for ``module`` (an HF experts module); :class:`UnsupportedExpertsError` when the
    op cannot compute it. Cached on the module."""
    cached = module.__dict__.get("_flashmoe_plan")
    if cached is not None:
        return cached
    gated = bool(getattr(module, "has_gate", True))
    if gated:
        activation, swiglu_limit, swiglu_alpha = _gate_activation(module)
    else:
        activation, swiglu_limit, swiglu_alpha = _act_fn_activation(module, "act_fn"), None, None
    has_post_expert_norm = bool(getattr(module, "has_post_expert_norm", False))
    if has_post_expert_norm and not callable(getattr(module, "post_expert_norm", None)):
        raise UnsupportedExpertsError(f"flashmoe cannot run {_family(module)}: has_post_expert_norm is set but "
                                      "the module has no post_expert_norm")
    result = ExpertsPlan(gated=gated, activation=activation, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha,
                         is_transposed=bool(getattr(module, "is_transposed", False)),
                         is_concatenated=bool(getattr(module, "is_concatenated", True)),
                         has_bias=bool(getattr(module, "has_bias", False)),
                         has_post_expert_norm=has_post_expert_norm)
    module.__dict__["_flashmoe_plan"] = result
    return result


def check_model(model) -> int:
    """Plan every experts module of ``model`` now, so an unsupported family fails before the first
    forward; returns how many experts modules there are."""
    count = 0
    for module in model.modules():
        if hasattr(module, "has_gate") and hasattr(module, "is_concatenated"):
            plan(module)
            count += 1
    return count


# --- weight layouts --------------------------------------------------------------------------------

def _to_op_layout(tensor: Tensor, transposed: bool, interleaved: bool) -> Tensor:
    """HF layout -> the op's: ``[E, in, out]`` -> ``[E, out, in]``; interleaved gate/up rows
    (g0, u0, g1, u1, ..) -> gate rows then up rows. Biases (2-D) only de-interleave."""
    if transposed and tensor.dim() == 3:
        tensor = tensor.transpose(1, 2)
    if interleaved:
        experts, rows = tensor.shape[:2]
        tensor = tensor.reshape(experts, rows // 2, 2, *tensor.shape[2:]).transpose(1, 2)
        tensor = tensor.reshape(experts, rows, *tensor.shape[3:])
    return tensor.contiguous()


def _to_hf_layout(tensor: Tensor, transposed: bool, interleaved: bool) -> Tensor:
    """The inverse of :func:`_to_op_layout` (for gradients)."""
    if interleaved:
        experts, rows = tensor.shape[:2]
        tensor = tensor.reshape(experts, 2, rows // 2, *tensor.shape[2:]).transpose(1, 2)
        tensor = tensor.reshape(experts, rows, *tensor.shape[3:])
    if transposed and tensor.dim() == 3:
        tensor = tensor.transpose(1, 2)
    return tensor.contiguous()


class _Relayout(torch.autograd.Function):
    """Hands the op the cached converted weight; sends its gradient back to the HF Parameter in HF layout."""

    @staticmethod
    def forward(ctx, parameter: Tensor, converted: Tensor, transposed: bool, interleaved: bool) -> Tensor:
        ctx.layout = (transposed, interleaved)
        return converted.view_as(converted)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _to_hf_layout(grad, *ctx.layout), None, None, None


# id(Parameter) -> (weak reference to it, its version counter, layout, the converted copy). An entry
# goes when its Parameter does, and nothing is stored on the module (it pickles and deep-copies as HF's
# own). Keyed on id, not on the tensor: a tensor's == is elementwise.
_converted_weights: Dict[int, tuple] = {}


def _entry(parameter: Tensor) -> Optional[tuple]:
    entry = _converted_weights.get(id(parameter))
    return entry if entry is not None and entry[0]() is parameter else None


def cached_conversion(parameter: Tensor) -> Optional[Tensor]:
    """The op-layout copy of ``parameter`` held in the cache, if any (for tests and debugging)."""
    entry = _entry(parameter)
    return None if entry is None else entry[3]


def _converted(parameter: Tensor, transposed: bool, interleaved: bool) -> Tensor:
    """``parameter`` in the op's layout, converted once and cached, keyed on the Parameter object and
    its version counter (an optimizer's in-place step bumps it)."""
    version, layout = parameter._version, (transposed, interleaved)
    entry = _entry(parameter)
    # A copy made under inference_mode is an inference tensor, which autograd may not save: remake it.
    if (entry is not None and entry[1] == version and entry[2] == layout
            and (torch.is_inference_mode_enabled() or not entry[3].is_inference())):
        converted = entry[3]
    else:
        with torch.no_grad():
            converted = _to_op_layout(parameter.detach(), transposed, interleaved)
        key = id(parameter)
        reference = weakref.ref(parameter, lambda _, key=key: _converted_weights.pop(key, None))
        _converted_weights[key] = (reference, version, layout, converted)
    if torch.is_grad_enabled() and parameter.requires_grad:
        return _Relayout.apply(parameter, converted, transposed, interleaved)
    return converted


def _weight(module, name: str, transposed: bool, interleaved: bool) -> Optional[Tensor]:
    parameter = getattr(module, name, None)
    if parameter is None or not (transposed or interleaved):
        return parameter  # read in place: no copy
    return _converted(parameter, transposed, interleaved)


# --- the experts function --------------------------------------------------------------------------

_calls = [0]


def call_count() -> int:
    """How many times :func:`experts_forward` has handed work to flashmoe's op in this process."""
    return _calls[0]


def reset_call_count() -> None:
    _calls[0] = 0


def _require_native(module, x: Tensor) -> None:
    if not ops.has_native_kernel(x.device, x.dtype):
        raise UnsupportedExpertsError(
            f"flashmoe has no native kernel for {_family(module)}'s tensors on {x.device} in {x.dtype} "
            "(the CPU always; CUDA when flashmoe was built with it, for fp32/bf16/fp16); it does not "
            "fall back to another device or to eager")


def merge_repeated_picks(topk_ids: Tensor, topk_weights: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """HF's eager loop sums a token's picks of the same expert (DeepSeek-V4's hash-routed layers can
    repeat one); the op takes each expert once per row. Each pick's weight moves to the first pick
    of its expert in the row, and the later picks become the sentinel ``E`` with weight 0: the same
    sum, without reading the ids on the host."""
    same = topk_ids.unsqueeze(2) == topk_ids.unsqueeze(1)                            # [N, k, k]
    earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril(-1)  # j < i
    repeat = (same & earlier).any(dim=2)                                             # [N, k]
    merged = torch.einsum("nij,nj->ni", same.to(topk_weights.dtype), topk_weights)
    merged = merged.masked_fill(repeat, 0.0)
    return topk_ids.masked_fill(repeat, num_experts), merged


def experts_forward(module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``ExpertsInterface`` function: ``hidden_states [N, H]``, ``top_k_index [N, k]`` (HF's expert
    ids; ids ``>= E`` are the expert-parallel sentinel of an expert that is not local and contribute
    zero), ``top_k_weights [N, k]`` -> ``[N, H]`` in hidden_states' dtype."""
    options = plan(module)
    up_name = "gate_up_proj" if options.gated else "up_proj"
    interleaved = options.gated and not options.is_concatenated
    w1 = _weight(module, up_name, options.is_transposed, interleaved)
    w2 = _weight(module, "down_proj", options.is_transposed, False)
    b1 = _weight(module, f"{up_name}_bias", False, interleaved) if options.has_bias else None
    b2 = getattr(module, "down_proj_bias", None) if options.has_bias else None
    x = hidden_states.to(w1.dtype)  # as HF's grouped_mm: autocast may hand fp32 activations to bf16 weights
    _require_native(module, x)
    num_experts = w1.shape[0]
    topk_ids = top_k_index
    if getattr(module, "_is_expert_parallel", False):
        topk_ids = top_k_index.clamp(max=num_experts)  # every sentinel id becomes the op's sentinel E
    topk_weights = top_k_weights if top_k_weights.dtype in (x.dtype, torch.float32) else top_k_weights.float()
    if not options.has_post_expert_norm:
        topk_ids, topk_weights = merge_repeated_picks(topk_ids, topk_weights, num_experts)
    op_options = dict(gated=options.gated, activation=options.activation, b1=b1, b2=b2,
                      swiglu_limit=options.swiglu_limit, swiglu_alpha=options.swiglu_alpha, backend="native")
    _calls[0] += 1
    if not options.has_post_expert_norm:
        y = moe(x, w1, w2, topk_ids=topk_ids, topk_weights=topk_weights, **op_options)
        return y.to(hidden_states.dtype)
    # A norm on each expert's output before the weighting: run every pick as its own token with weight 1,
    # norm the per-pick outputs, then weight and sum over the k picks in fp32.
    tokens, top_k = topk_ids.shape
    per_pick = moe(x.repeat_interleave(top_k, dim=0), w1, w2, topk_ids=topk_ids.reshape(-1, 1),
                   topk_weights=torch.ones(tokens * top_k, 1, dtype=topk_weights.dtype, device=x.device),
                   **op_options)
    per_pick = module.post_expert_norm(per_pick)
    if getattr(module, "_is_expert_parallel", False):
        per_pick = per_pick.masked_fill((topk_ids >= num_experts).reshape(-1, 1), 0.0)
    weighted = per_pick.float() * topk_weights.reshape(-1, 1).float()
    return weighted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def register() -> None:
    """Register :func:`experts_forward` under ``"flashmoe"`` in transformers' ``ExpertsInterface``
    (any number of times). After it, ``from_pretrained(..., experts_implementation="flashmoe")`` and
    ``model.set_experts_implementation("flashmoe")`` work."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        raise ImportError(f"flashmoe.hf.register() needs transformers >= 5 with ExpertsInterface "
                          f"(pip install 'flashmoe[hf]'): {error}") from None
    ExpertsInterface.register(NAME, experts_forward)
