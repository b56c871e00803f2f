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
_INT32 = torch.iinfo(torch.int32)


def moe(
    x: Tensor,
    router_weight: Optional[Tensor] = None,
    w1: Optional[Tensor] = None,
    w2: Optional[Tensor] = None,
    *,
    top_k: Optional[int] = None,
    gated: bool = True,
    activation: str = "silu",
    normalize: bool = reference.DEFAULT_NORMALIZE,
    scoring: str = reference.DEFAULT_SCORING,
    capacity_factor: Optional[float] = None,
    router_bias: Optional[Tensor] = None,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    topk_ids: Optional[Tensor] = None,
    topk_weights: Optional[Tensor] = None,
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: Optional[float] = None,
    selection_bias: Optional[Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    weight_on: str = "output",
    shared_w1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
    shared_gate: Optional[Tensor] = None,
    return_routing: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Routing]]:
    """Mixture-of-Experts forward: route every token to its experts and combine their outputs.

    Two forms:

    * ``moe(x, router_weight, w1, w2, *, top_k, ...)``: flashmoe's own router picks ``top_k``
      experts per token (gate, dispatch, experts and combine in one op);
    * ``moe(x, w1, w2, *, topk_ids, topk_weights, ...)``: the routing comes from outside (an HF
      model's router, say) and the gate stage is skipped. There is no router: passing one, or
      ``top_k``, ``normalize``, ``scoring`` or ``router_bias``, is a ``ValueError``.

    Args:
        x: ``[..., H]`` float32, bfloat16, float16 (or float64); leading dims are flattened to T tokens.
        router_weight: ``[E, H]``, x's dtype (``nn.Linear`` layout), or float32 for bfloat16 / float16
            x (DeepSeek's fp32 gate: the logits are computed in fp32 from upcast x). Router form only.
        w1: ``[E, 2I, H]`` when ``gated`` (rows ``0..I-1`` gate, ``I..2I-1`` up), else ``[E, I, H]``.
        w2: ``[E, H, I]`` down projection.
        top_k: experts per token, ``1 <= top_k <= E``. Router form only.
        gated: GLU experts ``(act(x·gateᵀ) ⊙ x·upᵀ)·w2ᵀ``; otherwise ``act(x·w1ᵀ + b1)·w2ᵀ + b2``.
        activation: ``"silu"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"``, ``"relu2"`` (relu
            squared), or a clamped SwiGLU (gated only): ``"swiglu_clamp"`` (``silu(min(g, L)) ·
            clamp(u, -L, L)``), ``"swiglu_clamp_post"`` (``min(silu(g), L) · clamp(u, -L, L)``),
            ``"swiglu_oai"`` (gpt-oss: ``(clamp(u, -L, L) + 1) · g' · σ(α·g')``, ``g' = min(g, L)``).
        normalize: divide the k pick weights by their sum (default True). Router form only.
        scoring: ``"softmax"`` (default) or ``"sigmoid"`` over the router logits, or ``"softmax_topk"``
            (gpt-oss: the top-k of the raw logits, router bias included, then a softmax over those k;
            normalize has no effect). Router form only.
        capacity_factor: ``None`` for dropless, else each expert admits the first
            ``ceil(capacity_factor·T·k/E)`` of its picks in ascending token order.
        router_bias: ``[E]``, router_weight's dtype (router form only); b1: ``[E, 2I]`` or ``[E, I]``;
            b2: ``[E, H]``. Optional.
        topk_ids: ``[T, k]`` int32 or int64, routing from outside: the expert of each pick, in
            ``[0, E)``, no expert twice in a row, or ``E``: the sentinel HF's expert-parallel mode
            writes for an expert that is not local, which contributes zero and takes no capacity.
            Out-of-range and repeated ids are a ``ValueError`` (checked on the host; on CUDA that
            reads the ids back, except under torch.compile or CUDA graph capture, where the kernel
            lets any id outside ``[0, E)`` contribute zero).
        topk_weights: ``[T, k]``, x's dtype or float32: the weight of each pick. Gets a gradient.
        swiglu_limit: L of the clamped SwiGLUs: required for ``swiglu_clamp`` and
            ``swiglu_clamp_post``, default 7.0 for ``swiglu_oai``.
        swiglu_alpha: α of ``swiglu_oai``, default 1.702.
        selection_bias: ``[E]``, any float dtype, or None: added to the scores only to choose the
            experts; the weights come from the unbiased scores (DeepSeek-V3's
            ``e_score_correction_bias``). No gradient. Router form only.
        num_groups, topk_groups: group-limited choice (DeepSeek-V3): the experts form ``num_groups``
            groups of consecutive ids, a group's score is the sum of its two best biased scores, and
            only the experts of the ``topk_groups`` best groups can be picked. 1 / 1: no limit.
            Router form only.
        routed_scaling_factor: multiplies the pick weights after normalisation (> 0). Router form only.
        weight_on: ``"output"`` (default: the pick weight scales the expert's output) or ``"input"``
            (Llama 4: the expert gets the row ``x·w``, the product in fp32 rounded to x's dtype, and its
            output is combined with weight 1).
        shared_w1: the shared expert's ``[2S, H]`` when ``gated`` (gate rows, then up rows), else
            ``[S, H]``, x's dtype; S may differ from I. A dense FFN that runs on every token, with the
            routed experts' ``gated``/``activation`` (and swiglu options) and no biases, added to the
            routed output inside the op: ``y = round(Σ_j w_j·f_j(x) + g·s(x))``, one rounding, the
            picks first (capacity drops only them). Both forms take it.
        shared_w2: ``[H, S]``, with shared_w1.
        shared_gate: optional ``[1, H]`` (Qwen2-MoE, Qwen3-Next): ``g = σ(x·shared_gateᵀ)`` (fp32
            logits) scales the shared output; without it g = 1.
        return_routing: also return a :class:`Routing` (topk_ids ``[T, k]`` int32, topk_weights
            ``[T, k]`` float32, expert_counts ``[E]`` int32, dropped 0-dim int64, router_logits
            ``[T, E]`` float32; float64 variants for float64 inputs). With routing from outside,
            topk_ids and topk_weights are the ones given, expert_counts and dropped leave the
            sentinel out, and router_logits is None.
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
    gate_less = topk_ids is not None or topk_weights is not None
    router_weight, w1, w2 = reference.split_weights(router_weight, w1, w2, gate_less=gate_less)
    normalize, scoring = reference.router_options(normalize, scoring, gate_less=gate_less)
    if backend == "auto":
        # Meta tensors hold no values: the op's fake kernel infers the output shapes.
        native = x.device.type == "meta" or ops.has_native_kernel(x.device, x.dtype)
        backend = "native" if native else "reference"
        if backend == "reference":
            _warn_reference_fallback(x)
    options = dict(top_k=top_k, gated=gated, activation=activation, normalize=normalize, scoring=scoring,
                   capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2,
                   swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, selection_bias=selection_bias,
                   num_groups=num_groups, topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
                   weight_on=weight_on, shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate)
    routing = dict(topk_ids=topk_ids, topk_weights=topk_weights) if gate_less else {}
    if backend == "reference":
        return reference.moe(x, router_weight, w1, w2, return_routing=return_routing, **options, **routing)
    # Validated here, before the op's schema coerces Python values (True -> 1, "1.0" -> 1.0).
    reference.validate(x, router_weight, w1, w2, **options, **routing, check_values=_can_read_values(x))
    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    if gate_less:
        # The op takes int32 ids. Saturate int64 ones first: a plain cast wraps, so 2^32 + 1 would
        # become expert 1 instead of an out-of-range id that the op rejects (or, unread, drops).
        ids = topk_ids if topk_ids.dtype == torch.int32 else \
            topk_ids.clamp(_INT32.min, _INT32.max).to(torch.int32)
        weights = topk_weights.to(reference.accumulate_dtype(x.dtype))
        y, expert_counts, dropped = ops.moe_experts_forward(
            tokens, w1, w2, b1, b2, ids.contiguous(), weights.contiguous(), gated, activation,
            *_optional_floats(capacity_factor, swiglu_limit, swiglu_alpha), weight_on, shared_w1, shared_w2,
            shared_gate,
        )
        y = y.reshape(x.shape)
        if return_routing:
            return y, Routing(topk_ids, topk_weights, expert_counts, dropped, None)
        return y
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = ops.moe_forward(
        tokens, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
        *_optional_floats(capacity_factor, swiglu_limit, swiglu_alpha), selection_bias, num_groups, topk_groups,
        float(routed_scaling_factor), weight_on, shared_w1, shared_w2, shared_gate,
    )
    y = y.reshape(x.shape)
    if return_routing:
        return y, Routing(topk_ids, topk_weights, expert_counts, dropped, router_logits)
    return y


def _optional_floats(*values) -> tuple:
    """The op schema's ``float?`` options: None stays None, a validated int becomes a float."""
    return tuple(None if value is None else float(value) for value in values)


def _can_read_values(x: Tensor) -> bool:
    """Whether to read topk_ids' values on the host here: only for the CUDA kernel, which does not
    read them itself (the CPU kernel does; meta tensors have no values and get the op's fake), and
    not while torch.compile traces (fake tensors) or a CUDA graph captures (a read would break the
    capture)."""
    return x.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


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
