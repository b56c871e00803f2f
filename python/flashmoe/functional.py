"""The functional API: ``flashmoe.moe``."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from . import ops, reference
from .reference import Routing

BACKENDS = ("auto", "native", "reference")
_warned_devices: set = set()


def moe(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    top_k: int,
    gated: bool = True,
    activation: str = "silu",
    normalize: bool = True,
    scoring: str = "softmax",
    capacity_factor: Optional[float] = None,
    router_bias: Optional[Tensor] = None,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    return_routing: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Routing]]:
    """Mixture-of-Experts forward: route every token to ``top_k`` experts and combine their outputs.

    Args:
        x: ``[..., H]`` float32, bfloat16, float16 (or float64); leading dims are flattened to T tokens.
        router_weight: ``[E, H]``, x's dtype (``nn.Linear`` layout).
        w1: ``[E, 2I, H]`` when ``gated`` (rows ``0..I-1`` gate, ``I..2I-1`` up), else ``[E, I, H]``.
        w2: ``[E, H, I]`` down projection.
        top_k: experts per token, ``1 <= top_k <= E``.
        gated: GLU experts ``(act(x·gateᵀ) ⊙ x·upᵀ)·w2ᵀ``; otherwise ``act(x·w1ᵀ + b1)·w2ᵀ + b2``.
        activation: ``"silu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"relu"``.
        normalize: divide the k pick weights by their sum.
        scoring: ``"softmax"`` or ``"sigmoid"`` over the router logits.
        capacity_factor: ``None`` for dropless, else each expert admits the first
            ``ceil(capacity_factor·T·k/E)`` of its picks in ascending token order.
        router_bias: ``[E]``; b1: ``[E, 2I]`` or ``[E, I]``; b2: ``[E, H]``. Optional.
        return_routing: also return a :class:`Routing` (topk_ids ``[T, k]`` int32, topk_weights
            ``[T, k]`` float32, expert_counts ``[E]`` int32, dropped 0-dim int64, router_logits
            ``[T, E]`` float32; float64 variants for float64 inputs).
        backend: ``"native"`` (the compiled kernels via ``torch.ops.flashmoe``), ``"reference"``
            (pure PyTorch) or ``"auto"``: native where a native kernel exists for x's device and
            dtype (the CPU always; CUDA when flashmoe was built with it, for fp32/bf16/fp16),
            else the reference with a warning (once per device and dtype).

    Returns:
        y with x's shape and dtype, or ``(y, routing)``.
    """
    reference.check_choice("backend", backend, BACKENDS)
    reference.check_bool("return_routing", return_routing)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., H], got {type(x).__name__}")
    if backend == "auto":
        # Meta tensors hold no values: the op's fake kernel infers the output shapes.
        native = x.device.type == "meta" or ops.has_native_kernel(x.device, x.dtype)
        backend = "native" if native else "reference"
        if backend == "reference":
            _warn_reference_fallback(x)
    options = dict(top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring,
                   capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2)
    if backend == "reference":
        return reference.moe(x, router_weight, w1, w2, return_routing=return_routing, **options)
    # Validated here, before the op's schema coerces Python values (True -> 1, "1.0" -> 1.0).
    reference.validate(x, router_weight, w1, w2, **options)
    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = ops.moe_forward(
        tokens, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
        None if capacity_factor is None else float(capacity_factor),
    )
    y = y.reshape(x.shape)
    if return_routing:
        return y, Routing(topk_ids, topk_weights, expert_counts, dropped, router_logits)
    return y


def _warn_reference_fallback(x: Tensor) -> None:
    device_type = x.device.type
    if device_type == "cuda" and ops.has_native_kernel(x.device):
        key, what = (device_type, x.dtype), f"no native CUDA kernel for {x.dtype}"
    elif device_type == "cuda" and not ops.cuda_compiled():
        key, what = device_type, "this build has no CUDA backend (flashmoe._C.cuda_compiled is False)"
    elif device_type == "cuda":
        capability = ".".join(map(str, torch.cuda.get_device_capability(x.device)))
        key, what = (device_type, capability), (f"the CUDA kernel has no code for compute capability {capability} "
                                                f"(built for {ops._C.cuda_build_info()['archs']})")
    else:
        key, what = device_type, f"no native kernel for device {device_type!r}"
    if key not in _warned_devices:
        _warned_devices.add(key)
        warnings.warn(f"flashmoe: {what}; using the reference backend")
