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
        scoring: ``"softmax"`` or ``"sigmoid"``.
        capacity_factor: None for dropless, else per-expert capacity ``ceil(cf·T·k/E)``.
        router_bias: add a learnable ``[E]`` router bias.
        expert_bias: add learnable b1 ``[E, 2I or I]`` and b2 ``[E, H]``.
        load_balancing_coef, z_loss_coef: weights of the auxiliary losses returned by
            ``forward(x, return_aux_loss=True)``.
        backend: ``"auto"``, ``"native"`` or ``"reference"`` (see :func:`flashmoe.moe`).

    Parameters: ``router_weight [E, H]``, ``w1``, ``w2 [E, H, I]``, and the optional biases.
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
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
        reference._check_activation_options(activation, gated, swiglu_limit, swiglu_alpha)
        if scoring not in reference.SCORINGS:
            raise ValueError(f"scoring must be one of {reference.SCORINGS}, got {scoring!r}")
        reference.expert_capacity(capacity_factor, 1, top_k, num_experts)  # validates capacity_factor
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        rows = 2 * ffn_size if gated else ffn_size
        self.hidden_size, self.ffn_size, self.num_experts, self.top_k = hidden_size, ffn_size, num_experts, top_k
        self.gated, self.activation, self.normalize, self.scoring = gated, activation, normalize, scoring
        self.capacity_factor = capacity_factor
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.load_balancing_coef, self.z_loss_coef = load_balancing_coef, z_loss_coef
        self.backend = backend
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.w1 = nn.Parameter(torch.empty(num_experts, rows, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **factory))
        self.router_bias = nn.Parameter(torch.empty(num_experts, **factory)) if router_bias else None
        self.b1 = nn.Parameter(torch.empty(num_experts, rows, **factory)) if expert_bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) if expert_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for weight, bias, fan_in in (
            (self.router_weight, self.router_bias, self.hidden_size),
            (self.w1, self.b1, self.hidden_size),
            (self.w2, self.b2, self.ffn_size),
        ):
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
            swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha, return_routing=True, backend=self.backend,
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
        """Builds an MoE from an HF transformers (v5) sparse-MoE block: Mixtral, Qwen3-MoE or OLMoE.

        Reads ``block.gate.weight [E, H]``, ``block.experts.gate_up_proj [E, 2I, H]`` and
        ``block.experts.down_proj [E, H, I]``, the top-k, ``norm_topk_prob`` (Mixtral always
        normalizes) and the experts' activation. With ``share_parameters`` (the default) the new
        module holds the block's own Parameter objects, so nothing is copied and training either
        one trains both; otherwise the weights are cloned. ``options`` pass on to the constructor
        (e.g. ``capacity_factor``, ``backend``, loss coefficients).
        """
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
                raise ValueError(f"block has {unsupported}, which flashmoe.MoE does not model")
        if getattr(gate, "bias", None) is not None or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise ValueError("block has router or expert biases in a layout from_hf does not read")
        act_name = type(getattr(experts, "act_fn", None)).__name__
        if act_name not in _HF_ACTIVATIONS:
            raise ValueError(f"block.experts.act_fn is {act_name}, which has no flashmoe activation; "
                             f"supported: {sorted(_HF_ACTIVATIONS)}")
        top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
        if top_k is None:
            raise TypeError(f"cannot find top_k on {type(block).__name__}.gate or the block")
        num_experts, rows, hidden = experts.gate_up_proj.shape
        weight = gate.weight
        layer = cls(hidden, rows // 2, num_experts, int(top_k), gated=True, activation=_HF_ACTIVATIONS[act_name],
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
                + (f", swiglu_alpha={self.swiglu_alpha}" if self.swiglu_alpha is not None else ""))
