"""``flashmoe.MoE``: the nn.Module form of the operator, with converters from HF transformers blocks."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .functional import BACKENDS, moe

# HF transformers activation modules, by class name, mapped to our activation names.
_HF_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}


class MoE(nn.Module):
    """A Mixture-of-Experts FFN layer.

    Args:
        hidden_size: H.
        ffn_size: I, the intermediate size of one expert.
        num_experts: E.
        top_k: experts per token.
        gated: GLU experts (w1 is ``[E, 2I, H]``: gate rows then up rows) or plain (``[E, I, H]``).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"relu2"``, or (gated only) a
            clamped SwiGLU: ``"swiglu_clamp"``, ``"swiglu_clamp_post"``, ``"swiglu_oai"`` (see :func:`flashmoe.moe`).
        swiglu_limit: L of the clamped SwiGLUs (required for the two clamp variants; swiglu_oai: 7.0).
        swiglu_alpha: α of swiglu_oai (default 1.702).
        normalize: divide each token's k weights by their sum.
        scoring: ``"softmax"``, ``"sigmoid"`` or ``"softmax_topk"``.
        capacity_factor: None for dropless, else per-expert capacity ``ceil(cf·T·k/E)``.
        router_bias: add a learnable ``[E]`` router bias.
        expert_bias: add learnable b1 ``[E, 2I or I]`` and b2 ``[E, H]``.
        load_balancing_coef, z_loss_coef: weights of the auxiliary losses returned by
            ``forward(x, return_aux_loss=True)``.
        selection_bias: hold a float32 buffer ``selection_bias [E]`` (zeros) that chooses experts
            without weighing them (DeepSeek-V3's ``e_score_correction_bias``, updated outside autograd).
        num_groups, topk_groups: group-limited choice (see :func:`flashmoe.moe`).
        routed_scaling_factor: multiplies the pick weights after normalisation.
        router_dtype: None (the layer's dtype) or torch.float32: an fp32 router (router_weight and
            router_bias) for a bfloat16 / float16 layer.
        weight_on: ``"output"`` or ``"input"`` (see :func:`flashmoe.moe`).
        shared_ffn_size: S, the intermediate size of a shared expert that runs on every token (the
            routed experts' gated/activation, no biases); 0 (the default) for none.
        shared_gate: scale the shared expert's output by ``σ(x·shared_gateᵀ)`` (Qwen2-MoE,
            Qwen3-Next); needs ``shared_ffn_size > 0``.
        backend: ``"auto"``, ``"native"`` or ``"reference"`` (see :func:`flashmoe.moe`).

    Parameters: ``router_weight [E, H]``, ``w1``, ``w2 [E, H, I]``, the optional biases, and with a
    shared expert ``shared_w1 [2S or S, H]``, ``shared_w2 [H, S]`` and optionally ``shared_gate [1, H]``.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int,
        *,
        gated: bool = True,
        activation: str = "silu",
        swiglu_limit: Optional[float] = None,
        swiglu_alpha: Optional[float] = None,
        normalize: bool = True,
        scoring: str = "softmax",
        capacity_factor: Optional[float] = None,
        router_bias: bool = False,
        expert_bias: bool = False,
        load_balancing_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        selection_bias: bool = False,
        num_groups: int = 1,
        topk_groups: int = 1,
        routed_scaling_factor: float = 1.0,
        router_dtype: Optional[torch.dtype] = None,
        weight_on: str = "output",
        shared_ffn_size: int = 0,
        shared_gate: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        reference.validate_layer(hidden_size, ffn_size, num_experts, dtype=dtype, top_k=top_k, gated=gated,
                                 activation=activation, normalize=normalize, scoring=scoring,
                                 capacity_factor=capacity_factor, swiglu_limit=swiglu_limit,
                                 swiglu_alpha=swiglu_alpha, num_groups=num_groups, topk_groups=topk_groups,
                                 routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
        reference.check_bool("selection_bias", selection_bias)
        if router_dtype is not None:
            reference.check_dtype("router_dtype", router_dtype)
            layer_dtype = torch.get_default_dtype() if dtype is None else dtype
            if router_dtype != layer_dtype and not reference.router_f32(layer_dtype, router_dtype):
                raise TypeError(f"router_dtype must be None, the layer's dtype {layer_dtype}, or torch.float32 for a "
                                f"bfloat16 / float16 layer, got {router_dtype}")
        reference.check_bool("router_bias", router_bias)
        reference.check_bool("expert_bias", expert_bias)
        reference.check_real("load_balancing_coef", load_balancing_coef)
        reference.check_real("z_loss_coef", z_loss_coef)
        reference.check_count("shared_ffn_size", shared_ffn_size, minimum=0)
        reference.check_bool("shared_gate", shared_gate)
        if shared_gate and not shared_ffn_size:
            raise ValueError("shared_gate=True scales the shared expert's output, so it needs shared_ffn_size > 0")
        reference.check_choice("backend", backend, BACKENDS)
        factory = dict(device=device, dtype=dtype)
        rows = 2 * ffn_size if gated else ffn_size
        self.hidden_size, self.ffn_size, self.num_experts, self.top_k = hidden_size, ffn_size, num_experts, top_k
        self.gated, self.activation, self.normalize, self.scoring = gated, activation, normalize, scoring
        self.capacity_factor = capacity_factor
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling_factor, self.weight_on = routed_scaling_factor, weight_on
        self.load_balancing_coef, self.z_loss_coef = load_balancing_coef, z_loss_coef
        self.backend = backend
        router_factory = dict(device=device, dtype=router_dtype or dtype)
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **router_factory))
        self.w1 = nn.Parameter(torch.empty(num_experts, rows, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **factory))
        self.router_bias = nn.Parameter(torch.empty(num_experts, **router_factory)) if router_bias else None
        # A buffer, not a Parameter: HF updates e_score_correction_bias outside autograd.
        self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32)
                             if selection_bias else None)
        self.b1 = nn.Parameter(torch.empty(num_experts, rows, **factory)) if expert_bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) if expert_bias else None
        self.shared_ffn_size = shared_ffn_size
        shared_rows = 2 * shared_ffn_size if gated else shared_ffn_size
        self.shared_w1 = nn.Parameter(torch.empty(shared_rows, hidden_size, **factory)) if shared_ffn_size else None
        self.shared_w2 = nn.Parameter(torch.empty(hidden_size, shared_ffn_size, **factory)) if shared_ffn_size else None
        self.shared_gate = nn.Parameter(torch.empty(1, hidden_size, **factory)) if shared_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for weight, bias, fan_in in (
            (self.router_weight, self.router_bias, self.hidden_size),
            (self.w1, self.b1, self.hidden_size),
            (self.w2, self.b2, self.ffn_size),
            (self.shared_w1, None, self.hidden_size),
            (self.shared_w2, None, self.shared_ffn_size),
            (self.shared_gate, None, self.hidden_size),
        ):
            if weight is None:
                continue
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: Tensor, *, return_aux_loss: bool = False, return_routing: bool = False):
        """x ``[..., H]`` -> y with x's shape; optionally also the auxiliary loss
        (``load_balancing_coef · load_balancing_loss + z_loss_coef · router_z_loss``, a 0-dim float32
        tensor) and the :class:`flashmoe.Routing`. Returns y alone when neither is requested,
        else a tuple ``(y, [aux_loss], [routing])`` in that order."""
        y, routing = moe(
            x, self.router_weight, self.w1, self.w2, top_k=self.top_k, gated=self.gated,
            activation=self.activation, normalize=self.normalize, scoring=self.scoring,
            capacity_factor=self.capacity_factor, router_bias=self.router_bias, b1=self.b1, b2=self.b2,
            swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha, selection_bias=self.selection_bias,
            num_groups=self.num_groups, topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor, weight_on=self.weight_on,
            shared_w1=self.shared_w1, shared_w2=self.shared_w2, shared_gate=self.shared_gate,
            return_routing=True, backend=self.backend,
        )
        if not (return_aux_loss or return_routing):
            return y
        result = [y]
        if return_aux_loss:
            result.append(self.aux_loss(routing))
        if return_routing:
            result.append(routing)
        return tuple(result)

    def aux_loss(self, routing: reference.Routing) -> Tensor:
        """The weighted sum of the Switch/GShard load-balancing loss and the router z-loss."""
        loss = routing.router_logits.new_zeros(())
        if self.load_balancing_coef:
            loss = loss + self.load_balancing_coef * reference.load_balancing_loss(
                routing.router_logits, routing.topk_ids, self.num_experts)
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * reference.router_z_loss(routing.router_logits)
        return loss

    @classmethod
    def from_hf(cls, block: nn.Module, *, share_parameters: bool = True, **options) -> "MoE":
        """Builds an MoE from an HF transformers (v5) sparse-MoE block: Mixtral, Qwen3-MoE or OLMoE here;
        DeepSeek-V3 / Kimi-K2, GLM-4.5, dots.llm1, GPT-OSS, Qwen3-Next, Qwen2-MoE and Llama 4 in
        :mod:`flashmoe.hf_families` (which copies, once and with a warning, the layouts the op cannot share).

        Reads ``block.gate.weight [E, H]``, ``block.experts.gate_up_proj [E, 2I, H]`` and
        ``block.experts.down_proj [E, H, I]``, the top-k, ``norm_topk_prob`` (Mixtral always
        normalizes) and the experts' activation. With ``share_parameters`` (the default) the new
        module holds the block's own Parameter objects, so nothing is copied and training either
        one trains both; otherwise the weights are cloned. ``options`` pass on to the constructor
        (e.g. ``capacity_factor``, ``backend``, loss coefficients).
        """
        from . import hf_families

        if hf_families.reads(block):
            return hf_families.from_hf(cls, block, share_parameters=share_parameters, **options)
        gate = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        missing = [name for name, owner, attr in (
            ("gate.weight", gate, "weight"), ("experts.gate_up_proj", experts, "gate_up_proj"),
            ("experts.down_proj", experts, "down_proj")) if owner is None or not hasattr(owner, attr)]
        if missing:
            raise TypeError(f"block must be an HF transformers v5 sparse-MoE block (Mixtral, Qwen3-MoE, OLMoE); "
                            f"{type(block).__name__} lacks {', '.join(missing)}")
        for unsupported in ("shared_expert", "shared_experts"):
            if getattr(block, unsupported, None) is not None:
                raise ValueError(f"{type(block).__name__} has {unsupported}; MoE.from_hf reads shared experts only "
                                 f"from the blocks of {sorted(hf_families.FAMILIES)}")
        if getattr(gate, "bias", None) is not None or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise ValueError("block has router or expert biases in a layout from_hf does not read")
        act_name = type(getattr(experts, "act_fn", None)).__name__
        if act_name not in _HF_ACTIVATIONS:
            raise ValueError(f"block.experts.act_fn is {act_name}, which has no flashmoe activation; "
                             f"supported: {sorted(_HF_ACTIVATIONS)}")
        top_k_owner = "block.gate" if getattr(gate, "top_k", None) is not None else "block"
        top_k = getattr(gate, "top_k", None)
        if top_k is None:
            top_k = getattr(block, "top_k", None)
        if top_k is None:
            raise TypeError(f"cannot find top_k on {type(block).__name__}.gate or the block")
        if not reference._is_int(top_k):
            raise TypeError(f"{top_k_owner}.top_k must be an int, got {type(top_k).__name__} {top_k!r}")
        weight, gate_up, down = gate.weight, experts.gate_up_proj, experts.down_proj
        for name, tensor, layout in (("block.gate.weight", weight, "[E, H]"),
                                     ("block.experts.gate_up_proj", gate_up, "[E, 2I, H]"),
                                     ("block.experts.down_proj", down, "[E, H, I]")):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
            if tensor.dim() != layout.count(",") + 1:
                raise ValueError(f"{name} must have shape {layout}, got {list(tensor.shape)}")
            if tensor.dtype not in reference.FLOAT_DTYPES:
                raise TypeError(f"{name} must have dtype in {reference.FLOAT_DTYPES}, got {tensor.dtype}")
        num_experts, rows, hidden = gate_up.shape
        if rows % 2 or rows < 2:
            raise ValueError(f"block.experts.gate_up_proj must have shape [E, 2I, H] with an even, non-zero row "
                             f"count (gate rows then up rows), got {list(gate_up.shape)}")
        for name, tensor, shape in (("block.gate.weight", weight, (num_experts, hidden)),
                                    ("block.experts.down_proj", down, (num_experts, hidden, rows // 2))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} (from block.experts.gate_up_proj "
                                 f"{list(gate_up.shape)}), got {list(tensor.shape)}")
            if tensor.dtype != gate_up.dtype:
                raise TypeError(f"{name} must have the dtype of block.experts.gate_up_proj ({gate_up.dtype}), "
                                f"got {tensor.dtype}")
        layer = cls(hidden, rows // 2, num_experts, top_k, gated=True, activation=_HF_ACTIVATIONS[act_name],
                    normalize=bool(getattr(gate, "norm_topk_prob", True)), device="meta", dtype=weight.dtype,
                    **options)
        for name, source in (("router_weight", gate.weight), ("w1", experts.gate_up_proj),
                             ("w2", experts.down_proj)):
            parameter = source if share_parameters else nn.Parameter(source.detach().clone())
            setattr(layer, name, parameter)
        return layer

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, gated={self.gated}, activation={self.activation!r}, "
                f"normalize={self.normalize}, scoring={self.scoring!r}, capacity_factor={self.capacity_factor}"
                + (f", swiglu_limit={self.swiglu_limit}" if self.swiglu_limit is not None else "")
                + (f", swiglu_alpha={self.swiglu_alpha}" if self.swiglu_alpha is not None else "")
                + (f", num_groups={self.num_groups}, topk_groups={self.topk_groups}" if self.num_groups != 1 else "")
                + (f", routed_scaling_factor={self.routed_scaling_factor}" if self.routed_scaling_factor != 1.0 else "")
                + (f", weight_on={self.weight_on!r}" if self.weight_on != "output" else "")
                + (f", shared_ffn_size={self.shared_ffn_size}, shared_gate={self.shared_gate is not None}"
                   if self.shared_ffn_size else ""))
