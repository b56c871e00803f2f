"""``ExpertParallelMoE``: the nn.Module form of expert parallelism, holding only this rank's experts."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from .. import reference
from ..layer import MoE
from .context import DEFAULT_WATCHDOG_SECONDS, TRANSPORTS, _group_rank_and_size
from .functional import moe


class ExpertParallelMoE(nn.Module):
    """A Mixture-of-Experts layer whose experts are spread over the ranks of ``group``.

    Rank r holds experts ``r·L … r·L+L−1`` (L = E / W) as Parameters, and the replicated router.
    The arguments are those of :class:`flashmoe.MoE`, plus ``group``, ``transport``,
    ``watchdog_seconds`` and ``check`` (see :func:`flashmoe.distributed.moe`).

    Parameters: ``router_weight [E, H]`` (replicated: all-reduce its gradient as for any
    data-parallel Parameter), ``w1 [L, 2I or I, H]``, ``w2 [L, H, I]``, and the optional
    ``router_bias [E]``, ``b1 [L, 2I or I]``, ``b2 [L, H]``; a shared expert's ``shared_w1``,
    ``shared_w2`` and ``shared_gate`` are replicated like the router (computed locally, never
    dispatched), and so is the ``selection_bias [E]`` buffer.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, *, group=None,
                 transport: str = "auto", gated: bool = True, activation: str = "silu", normalize: bool = True,
                 scoring: str = "softmax", capacity_factor: Optional[float] = None, router_bias: bool = False,
                 expert_bias: bool = False, load_balancing_coef: float = 0.01, z_loss_coef: float = 0.0,
                 selection_bias: bool = False, num_groups: int = 1, topk_groups: int = 1,
                 routed_scaling_factor: float = 1.0, router_dtype: Optional[torch.dtype] = None,
                 weight_on: str = "output", shared_ffn_size: int = 0, shared_gate: bool = False,
                 swiglu_limit: Optional[float] = None, swiglu_alpha: Optional[float] = None,
                 watchdog_seconds: float = DEFAULT_WATCHDOG_SECONDS, check: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        # Validated as flashmoe.MoE validates them (a meta layer allocates nothing).
        MoE(hidden_size, ffn_size, num_experts, top_k, gated=gated, activation=activation, normalize=normalize,
            scoring=scoring, capacity_factor=capacity_factor, router_bias=router_bias, expert_bias=expert_bias,
            load_balancing_coef=load_balancing_coef, z_loss_coef=z_loss_coef, selection_bias=selection_bias,
            num_groups=num_groups, topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
            router_dtype=router_dtype, weight_on=weight_on, shared_ffn_size=shared_ffn_size, shared_gate=shared_gate,
            swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, device="meta", dtype=dtype)
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        reference.check_choice("transport", transport, TRANSPORTS)
        self.rank, self.world_size = _group_rank_and_size(group)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the world size {self.world_size}")
        self.group, self.transport, self.watchdog_seconds = group, transport, watchdog_seconds
        self.check = check
        self.hidden_size, self.ffn_size, self.num_experts, self.top_k = hidden_size, ffn_size, num_experts, top_k
        self.local_experts = num_experts // self.world_size
        self.gated, self.activation, self.normalize, self.scoring = gated, activation, normalize, scoring
        self.capacity_factor = capacity_factor
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling_factor, self.weight_on = routed_scaling_factor, weight_on
        self.load_balancing_coef, self.z_loss_coef = load_balancing_coef, z_loss_coef
        self.shared_ffn_size = shared_ffn_size
        factory = dict(device=device, dtype=dtype)
        router_factory = dict(device=device, dtype=router_dtype or dtype)
        rows = 2 * ffn_size if gated else ffn_size
        shared_rows = 2 * shared_ffn_size if gated else shared_ffn_size
        local = self.local_experts
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **router_factory))
        self.w1 = nn.Parameter(torch.empty(local, rows, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, ffn_size, **factory))
        self.router_bias = nn.Parameter(torch.empty(num_experts, **router_factory)) if router_bias else None
        self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32)
                             if selection_bias else None)
        self.b1 = nn.Parameter(torch.empty(local, rows, **factory)) if expert_bias else None
        self.b2 = nn.Parameter(torch.empty(local, hidden_size, **factory)) if expert_bias else None
        self.shared_w1 = nn.Parameter(torch.empty(shared_rows, hidden_size, **factory)) if shared_ffn_size else None
        self.shared_w2 = nn.Parameter(torch.empty(hidden_size, shared_ffn_size, **factory)) if shared_ffn_size else None
        self.shared_gate = nn.Parameter(torch.empty(1, hidden_size, **factory)) if shared_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert, as :meth:`flashmoe.MoE.reset_parameters` (the router and
        the shared expert must then be made equal on every rank, e.g. by seeding alike or broadcasting;
        :meth:`from_moe` copies one)."""
        MoE.reset_parameters(self)

    # The options of issue 12 (routing and shared experts), by the default that leaves a call as before.
    _OPTION_DEFAULTS = dict(selection_bias=None, num_groups=1, topk_groups=1, routed_scaling_factor=1.0,
                            weight_on="output", shared_w1=None, shared_w2=None, shared_gate=None,
                            swiglu_limit=None, swiglu_alpha=None)

    def _options(self) -> dict:
        """This layer's routing and shared-expert options that differ from the defaults, for
        :func:`flashmoe.distributed.moe`; a named ValueError for those it does not take yet."""
        used = {}
        for name, default in self._OPTION_DEFAULTS.items():
            value = getattr(self, name)
            if value is not default and not (default is not None and value == default):
                used[name] = value
        missing = [name for name in used if name not in inspect.signature(moe).parameters]
        if missing:
            raise ValueError(f"flashmoe.distributed.moe does not carry {', '.join(missing)} across ranks yet; run "
                             f"this layer as flashmoe.MoE in one process")
        return used

    def forward(self, x: Tensor, *, return_aux_loss: bool = False, return_routing: bool = False):
        """x ``[..., H]`` (this rank's tokens) -> y with x's shape; optionally the auxiliary loss of
        this rank's tokens and its Routing, as :meth:`flashmoe.MoE.forward`. Collective."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [..., H], got {type(x).__name__}")
        tokens = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x
        y, routing = moe(tokens, self.router_weight, self.w1, self.w2, top_k=self.top_k, group=self.group,
                         transport=self.transport, gated=self.gated, activation=self.activation,
                         normalize=self.normalize, scoring=self.scoring, capacity_factor=self.capacity_factor,
                         router_bias=self.router_bias, b1=self.b1, b2=self.b2, return_routing=True,
                         watchdog_seconds=self.watchdog_seconds, check=self.check, **self._options())
        y = y.reshape(x.shape)
        if not (return_aux_loss or return_routing):
            return y
        result = [y]
        if return_aux_loss:
            result.append(self.aux_loss(routing))
        if return_routing:
            result.append(routing)
        return tuple(result)

    aux_loss = MoE.aux_loss

    @classmethod
    def from_moe(cls, layer: MoE, group=None, *, transport: str = "auto",
                 watchdog_seconds: float = DEFAULT_WATCHDOG_SECONDS, check: bool = True) -> "ExpertParallelMoE":
        """Shards a full :class:`flashmoe.MoE` (e.g. from ``MoE.from_hf``): this rank keeps a copy of the
        router (with its selection bias), of the shared expert, and of its own experts' weights; the
        routing options carry over. Every rank must pass an equal layer."""
        if not isinstance(layer, MoE):
            raise TypeError(f"layer must be a flashmoe.MoE, got {type(layer).__name__}")
        rank, world_size = _group_rank_and_size(group)
        if layer.num_experts % world_size:
            raise ValueError(f"layer.num_experts={layer.num_experts} must be divisible by the world size {world_size}")
        dtype, router_dtype = layer.w1.dtype, layer.router_weight.dtype
        sharded = cls(layer.hidden_size, layer.ffn_size, layer.num_experts, layer.top_k, group=group,
                      transport=transport, gated=layer.gated, activation=layer.activation, normalize=layer.normalize,
                      scoring=layer.scoring, capacity_factor=layer.capacity_factor,
                      router_bias=layer.router_bias is not None, expert_bias=layer.b1 is not None,
                      load_balancing_coef=layer.load_balancing_coef, z_loss_coef=layer.z_loss_coef,
                      selection_bias=layer.selection_bias is not None, num_groups=layer.num_groups,
                      topk_groups=layer.topk_groups, routed_scaling_factor=layer.routed_scaling_factor,
                      router_dtype=None if router_dtype == dtype else router_dtype, weight_on=layer.weight_on,
                      shared_ffn_size=layer.shared_ffn_size, shared_gate=layer.shared_gate is not None,
                      swiglu_limit=layer.swiglu_limit, swiglu_alpha=layer.swiglu_alpha,
                      watchdog_seconds=watchdog_seconds, check=check, device="meta", dtype=dtype)
        mine = slice(rank * sharded.local_experts, (rank + 1) * sharded.local_experts)
        with torch.no_grad():
            for name, part in (("router_weight", None), ("router_bias", None), ("w1", mine), ("w2", mine),
                               ("b1", mine), ("b2", mine), ("shared_w1", None), ("shared_w2", None),
                               ("shared_gate", None)):
                source = getattr(layer, name)
                if source is not None:
                    value = source.detach() if part is None else source.detach()[part]
                    setattr(sharded, name, nn.Parameter(value.clone()))
            if layer.selection_bias is not None:
                sharded.selection_bias = layer.selection_bias.detach().clone()
        return sharded

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, num_experts={self.num_experts}, "
                f"local_experts={self.local_experts}, top_k={self.top_k}, transport={self.transport!r}, "
                f"gated={self.gated}, activation={self.activation!r}, capacity_factor={self.capacity_factor}"
                + (f", shared_ffn_size={self.shared_ffn_size}, shared_gate={self.shared_gate is not None}"
                   if self.shared_ffn_size else ""))
