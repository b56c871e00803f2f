"""The torch custom ops ``torch.ops.flashmoe.*``: native kernels, fake (meta) kernels and autograd.

``flashmoe::moe_forward`` is the operator of the contract in docs/operator.md;
``flashmoe::moe_experts_forward`` is its gate-less form, for routing given from outside. It has two kernels,
both in ``flashmoe._C``: the CPU dataflow runtime, and the persistent CUDA kernel (when the module
was compiled with it, ``_C.cuda_compiled``). Its backward is a second op, ``flashmoe::moe_backward``,
written in torch ops and so device-generic, so that both stay opaque to torch.compile and the
data-dependent expert loop never reaches a graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C, reference
from .reference import accumulate_dtype

_DTYPE_CODES = {
    torch.float32: _C.DType.f32,
    torch.bfloat16: _C.DType.bf16,
    torch.float16: _C.DType.f16,
    torch.float64: _C.DType.f64,
}
# float64 is a verification dtype: only the CPU kernel computes in it.
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TENSOR_ARGUMENTS = ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2")
_SHARED_ARGUMENTS = ("shared_w1", "shared_w2", "shared_gate")  # every op's last three inputs
_EXPERTS_TENSOR_ARGUMENTS = ("x", "w1", "w2", "b1", "b2", "topk_ids", "topk_weights")  # moe_experts_forward's


def cuda_compiled() -> bool:
    """Whether flashmoe._C was compiled with the CUDA backend."""
    return bool(getattr(_C, "cuda_compiled", False))


def _native_devices() -> tuple:
    return ("cpu", "cuda") if cuda_compiled() else ("cpu",)


def empty_cache() -> int:
    """Frees the buffers the native CPU backend keeps between calls (the single-rank clusters'
    heaps, up to FLASHMOE_CPU_CACHE_BYTES, default 1 GiB); returns the bytes freed."""
    return _C.empty_cache()


def arch_runs_on(arch: str, capability: tuple) -> bool:
    """Whether SASS compiled for ``arch`` ("sm_80", "sm_90a") runs on a GPU of compute
    ``capability`` (major, minor): same major and a minor at least as high, and an arch-specific
    target ("a") only on its own capability. The build embeds no PTX, so nothing else runs."""
    name = arch.removeprefix("sm_")
    specific = name.endswith(("a", "f"))
    digits = name.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        return False
    major, minor = int(digits[:-1]), int(digits[-1])
    if specific:
        return tuple(capability) == (major, minor)
    return capability[0] == major and capability[1] >= minor


def cuda_kernel_runs_on(device) -> bool:
    """Whether the compiled CUDA kernel has code for ``device``'s GPU (see build_info()["cuda_archs"])."""
    if not cuda_compiled():
        return False
    capability = torch.cuda.get_device_capability(torch.device(device))
    return any(arch_runs_on(arch, capability) for arch in _C.cuda_build_info()["archs"])


def has_native_kernel(device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether ``flashmoe::moe_forward`` has a compiled kernel for tensors on ``device`` (and of
    ``dtype``, when given: the CUDA kernel takes fp32, bf16 and fp16, not float64). For a CUDA
    device, the build must also hold code for its GPU's architecture."""
    device = torch.device(device)
    if device.type not in _native_devices():
        return False
    if device.type == "cuda" and not cuda_kernel_runs_on(device):
        return False
    return dtype is None or device.type != "cuda" or dtype in _CUDA_DTYPES


# The routing options of moe_forward / moe_backward, in schema order, with their defaults.
ROUTING_OPTIONS = {"selection_bias": None, "num_groups": 1, "topk_groups": 1, "routed_scaling_factor": 1.0,
                   "weight_on": "output"}


def _validate(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
              capacity_factor, swiglu_limit=None, swiglu_alpha=None, shared_w1=None, shared_w2=None, shared_gate=None,
              **routing):
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, H] tensor for flashmoe::moe_forward, got {getattr(x, 'shape', x)!r}")
    reference.validate(x, router_weight, w1, w2, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
                       capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2, normalize=normalize,
                       swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, shared_w1=shared_w1, shared_w2=shared_w2,
                       shared_gate=shared_gate, **routing)
    _validate_native(x, top_k, dict(x=x, router_weight=router_weight, w1=w1, w2=w2, router_bias=router_bias,
                                    b1=b1, b2=b2, shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate))


def _validate_experts(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor, swiglu_limit,
                      swiglu_alpha, check_values, shared_w1=None, shared_w2=None, shared_gate=None, weight_on="output"):
    """moe_experts_forward's arguments: the gate-less form of reference.validate, plus what the op
    itself takes: int32 topk_ids and topk_weights in the accumulation dtype (flashmoe.moe converts)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, H] tensor for flashmoe::moe_experts_forward, got {getattr(x, 'shape', x)!r}")
    reference.validate(x, None, w1, w2, top_k=None, gated=gated, activation=activation, scoring=None,
                       capacity_factor=capacity_factor, router_bias=None, b1=b1, b2=b2, normalize=None,
                       topk_ids=topk_ids, topk_weights=topk_weights, swiglu_limit=swiglu_limit,
                       swiglu_alpha=swiglu_alpha, shared_w1=shared_w1, shared_w2=shared_w2, shared_gate=shared_gate,
                       weight_on=weight_on, check_values=check_values)
    if topk_ids.dtype != torch.int32:
        raise TypeError(f"topk_ids must have dtype torch.int32 for flashmoe::moe_experts_forward, got {topk_ids.dtype} "
                        f"(flashmoe.moe converts)")
    if topk_weights.dtype != accumulate_dtype(x.dtype):
        raise TypeError(f"topk_weights must have dtype {accumulate_dtype(x.dtype)} for flashmoe::moe_experts_forward, "
                        f"got {topk_weights.dtype} (flashmoe.moe converts)")
    _validate_native(x, topk_ids.shape[1], dict(x=x, w1=w1, w2=w2, b1=b1, b2=b2, topk_ids=topk_ids,
                                                 topk_weights=topk_weights, shared_w1=shared_w1, shared_w2=shared_w2,
                                                 shared_gate=shared_gate))


def _validate_native(x, top_k, named):
    """What the native kernels add to reference.validate: a bounded row count and contiguity."""
    max_picks = _C.SignalWord.max_rows // min(top_k, named["w1"].shape[0])
    if x.shape[0] > max_picks:
        raise ValueError(f"x has {x.shape[0]} tokens; one native call takes at most {max_picks} "
                         f"(T·min(top_k, E) < 2^24 rows per signal word): split the batch")
    for name, tensor in named.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major, stride {_row_major_strides(tensor.shape)}), "
                             f"got stride {tuple(tensor.stride())}; call .contiguous() once, outside the hot loop")


_GRAD_INPUTS = ("x", "router_weight", "w1", "w2", "router_bias", "b1", "b2") + _SHARED_ARGUMENTS


def _check_needs_grad(needs_grad, inputs: tuple, shared_w1) -> None:
    """needs_grad holds one bool per input of ``inputs``; without a shared expert the list may
    stop before the shared expert's three entries (they are then False)."""
    lengths = (len(inputs), len(inputs) - len(_SHARED_ARGUMENTS)) if shared_w1 is None else (len(inputs),)
    if not isinstance(needs_grad, (list, tuple)) or len(needs_grad) not in lengths:
        raise ValueError(f"needs_grad must be a list of {len(inputs)} bools, one per input {inputs} (or "
                         f"{len(inputs) - len(_SHARED_ARGUMENTS)}, without the shared expert's, when there is none), "
                         f"got {needs_grad!r}")
    for name, need in zip(inputs, needs_grad):
        if not isinstance(need, bool):
            raise TypeError(f"needs_grad must hold bools; its entry for {name} is {type(need).__name__} {need!r}")


def _validate_backward(grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2, router_bias, b1, b2,
                       topk_ids, top_k, gated, activation, normalize, scoring, capacity_factor, needs_grad,
                       swiglu_limit=None, swiglu_alpha=None, shared_w1=None, shared_w2=None, shared_gate=None,
                       **routing):
    """flashmoe::moe_backward's arguments: the forward's (the shared validator), then the
    gradients, the routing and needs_grad against them. Values of topk_ids are checked where
    that costs no device sync (CPU tensors, or CUDA outside graph capture)."""
    _validate(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
              capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate, **routing)
    tokens, experts = x.shape[0], router_weight.shape[0]
    _check_needs_grad(needs_grad, _GRAD_INPUTS, shared_w1)
    for name, tensor, shape, float_only in (
            ("grad_y", grad_y, (tokens, x.shape[1]), True),
            ("grad_topk_weights", grad_topk_weights, (tokens, top_k), True),
            ("grad_router_logits", grad_router_logits, (tokens, experts), True),
            ("topk_ids", topk_ids, (tokens, top_k), False)):
        if tensor is None and name in ("grad_topk_weights", "grad_router_logits"):
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(tensor).__name__}")
        if float_only and tensor.dtype not in reference.FLOAT_DTYPES:
            raise TypeError(f"{name} must have a float dtype in {reference.FLOAT_DTYPES}, got {tensor.dtype}")
        if not float_only and tensor.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on device {x.device} (the device of x), got {tensor.device}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    checkable = topk_ids.device.type == "cpu" or (
        topk_ids.device.type == "cuda" and not torch.cuda.is_current_stream_capturing())
    if checkable and topk_ids.numel() and not torch._guards.detect_fake_mode(topk_ids):
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= experts:
            raise ValueError(f"topk_ids must lie in [0, E={experts}), got values in [{low}, {high}]")


def _validate_cuda(x, *tensors, names=_TENSOR_ARGUMENTS, shared=(None, None, None)):
    """What the CUDA kernel adds to _validate (which already checked shapes, one dtype, one device
    and contiguity): a dtype it computes in, and every tensor (the shared expert's too) on x's device."""
    tensors = tensors + tuple(shared)
    names = tuple(names) + _SHARED_ARGUMENTS
    if x.dtype not in _CUDA_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; the CUDA kernel of flashmoe::moe_forward takes "
            f"{', '.join(str(d).replace('torch.', '') for d in _CUDA_DTYPES)} (float64 is for verification: "
            f"run it on the CPU, or use flashmoe.moe(..., backend='reference'))"
        )
    for name, tensor in zip(names, (x,) + tensors):
        if tensor is not None and tensor.device != x.device:  # _validate checked this; never launch otherwise
            raise ValueError(f"{name} must be on device {x.device} (the device of x), got {tensor.device}")


def _row_major_strides(shape) -> tuple:
    strides, running = [], 1
    for size in reversed(tuple(shape)):
        strides.append(running)
        running *= max(int(size), 1)
    return tuple(reversed(strides))


def _empty_outputs(x, router_weight, top_k):
    """(y, topk_ids, topk_weights, expert_counts, router_logits, dropped), uninitialized."""
    tokens, experts = x.shape[0], router_weight.shape[0]
    accumulate = accumulate_dtype(x.dtype)
    return (
        torch.empty_like(x),
        x.new_empty((tokens, top_k), dtype=torch.int32),
        x.new_empty((tokens, top_k), dtype=accumulate),
        x.new_empty((experts,), dtype=torch.int32),
        x.new_empty((tokens, experts), dtype=accumulate),
        x.new_empty((), dtype=torch.int64),
    )


def problem_shape(hidden, ffn, experts, top_k, *, gated, activation, normalize, scoring, dtype, has_router_bias,
                  has_b1, has_b2, swiglu_limit=None, swiglu_alpha=None, routing_given=False, has_selection_bias=False,
                  num_groups=1, topk_groups=1, routed_scaling_factor=1.0, weight_on="output", router_f32=False,
                  shared_ffn=0, has_shared_gate=False):
    """The C++ problem descriptor of a layer shape (tokens and capacity left at 0 / dropless).
    With ``routing_given`` (topk_ids and topk_weights come from outside) normalize and scoring
    are unused. ``shared_ffn``: S of the shared expert, 0 for none."""
    problem = _C.Problem()
    problem.hidden, problem.ffn, problem.experts, problem.top_k = hidden, ffn, experts, top_k
    problem.gated, problem.normalize = gated, bool(normalize)
    problem.activation = getattr(_C.Activation, activation)
    problem.scoring = getattr(_C.Scoring, scoring or "softmax")
    problem.dtype = _DTYPE_CODES[dtype]
    problem.has_router_bias, problem.has_b1, problem.has_b2 = has_router_bias, has_b1, has_b2
    problem.swiglu_limit, problem.swiglu_alpha = reference.activation_options(activation, swiglu_limit, swiglu_alpha)
    problem.routing_given = routing_given
    problem.shared_ffn, problem.has_shared_gate = shared_ffn, has_shared_gate
    problem.has_selection_bias, problem.router_f32 = has_selection_bias, router_f32
    problem.num_groups, problem.topk_groups = num_groups, topk_groups
    problem.routed_scaling_factor = float(routed_scaling_factor)
    problem.weight_on_input = weight_on == "input"
    return problem


def _problem(x, w1, router_weight, router_bias, b1, b2, top_k, gated, activation, normalize, scoring, capacity_factor,
             swiglu_limit=None, swiglu_alpha=None, shared_w1=None, shared_gate=None, selection_bias=None, num_groups=1,
             topk_groups=1, routed_scaling_factor=1.0, weight_on="output"):
    # E comes from the router when there is one: under expert parallelism w1 holds only the local experts.
    routing_given = router_weight is None
    experts = w1.shape[0] if routing_given else router_weight.shape[0]
    problem = problem_shape(x.shape[1], w1.shape[1] // 2 if gated else w1.shape[1], experts, top_k,
                            gated=gated, activation=activation, normalize=normalize, scoring=scoring, dtype=x.dtype,
                            has_router_bias=router_bias is not None, has_b1=b1 is not None, has_b2=b2 is not None,
                            swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, routing_given=routing_given,
                            has_selection_bias=selection_bias is not None, num_groups=num_groups,
                            topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor, weight_on=weight_on,
                            router_f32=router_weight is not None and reference.router_f32(x.dtype, router_weight.dtype),
                            shared_ffn=shared_ffn(shared_w1, gated), has_shared_gate=shared_gate is not None)
    problem.tokens = x.shape[0]
    problem.expert_capacity = (
        -1 if capacity_factor is None
        else _C.expert_capacity(capacity_factor, problem.tokens, top_k, problem.experts)
    )
    return problem


def shared_ffn(shared_w1: Optional[Tensor], gated: bool) -> int:
    """S of the shared expert whose ``shared_w1`` is ``[2S, H]`` (gated) or ``[S, H]``; 0 for none."""
    if shared_w1 is None:
        return 0
    return shared_w1.shape[0] // 2 if gated else shared_w1.shape[0]


def _shared_addresses(shared_w1, shared_w2, shared_gate) -> dict:
    """The shared expert's keyword arguments of the raw _C entries: addresses, 0 where absent."""
    return dict(shared_w1=_address(shared_w1), shared_w2=_address(shared_w2), shared_gate=_address(shared_gate))


def _address(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def selection_bias_values(selection_bias: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """The selection bias as the native kernels read it: contiguous, in x's accumulation dtype."""
    return None if selection_bias is None else selection_bias.to(accumulate_dtype(x.dtype)).contiguous()


@torch.library.custom_op("flashmoe::moe_forward", mutates_args=())
def moe_forward(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    router_bias: Optional[Tensor],
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    top_k: int,
    gated: bool,
    activation: str,
    normalize: bool,
    scoring: str,
    capacity_factor: Optional[float],
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """MoE forward on ``x [T, H]``. Returns ``(y [T, H], topk_ids [T, k] int32, topk_weights [T, k],
    expert_counts [E] int32, router_logits [T, E], dropped [] int64)``; see flashmoe.moe for the rest
    (the shared expert included).

    This body is the CPU kernel; CUDA tensors go to :func:`_moe_forward_cuda`."""
    routing = dict(selection_bias=selection_bias, num_groups=num_groups, topk_groups=topk_groups,
                   routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
    _validate(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
              capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate, **routing)
    if x.device.type != "cpu":
        raise NotImplementedError(
            f"flashmoe::moe_forward has no native kernel for device {x.device.type!r} in this build "
            f"(compiled: {', '.join(_native_devices())}); use flashmoe.moe(..., backend='reference')"
        )
    outputs = _empty_outputs(x, router_weight, top_k)
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = outputs
    bias_values = selection_bias_values(selection_bias, x)  # held until the kernel returns
    _C.moe_forward_cpu(
        problem=_problem(x, w1, router_weight, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
                         capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_gate, **routing),
        x=_address(x), router_weight=_address(router_weight), router_bias=_address(router_bias),
        w1=_address(w1), b1=_address(b1), w2=_address(w2), b2=_address(b2), y=_address(y),
        topk_ids=_address(topk_ids), topk_weights=_address(topk_weights), expert_counts=_address(expert_counts),
        router_logits=_address(router_logits), dropped=_address(dropped), num_threads=torch.get_num_threads(),
        selection_bias=_address(bias_values), **_shared_addresses(shared_w1, shared_w2, shared_gate),
    )
    return outputs


@moe_forward.register_kernel("cuda")
def _moe_forward_cuda(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
                      capacity_factor, swiglu_limit=None, swiglu_alpha=None, selection_bias=None, num_groups=1,
                      topk_groups=1, routed_scaling_factor=1.0, weight_on="output", shared_w1=None, shared_w2=None,
                      shared_gate=None):
    """The persistent CUDA kernel. Enqueued on the current stream of x's device with no host sync and
    no allocation inside _C (outputs and workspace come from torch's caching allocator here), so a
    CUDA graph can capture it."""
    routing = dict(selection_bias=selection_bias, num_groups=num_groups, topk_groups=topk_groups,
                   routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
    _validate(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
              capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate, **routing)
    _validate_cuda(x, router_weight, w1, w2, router_bias, b1, b2, shared=(shared_w1, shared_w2, shared_gate))
    problem = _problem(x, w1, router_weight, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
                       capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_gate, **routing)
    outputs = _empty_outputs(x, router_weight, top_k)
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = outputs
    _launch_cuda(problem, x, router_weight, router_bias, w1, b1, w2, b2, y, topk_ids, topk_weights, expert_counts,
                 router_logits, dropped, (shared_w1, shared_w2, shared_gate), selection_bias_values(selection_bias, x))
    return outputs


def _launch_cuda(problem, x, router_weight, router_bias, w1, b1, w2, b2, y, topk_ids, topk_weights, expert_counts,
                 router_logits, dropped, shared=(None, None, None), selection_bias=None):
    """Enqueues the persistent kernel for ``problem`` (router form, or routing_given: then the router
    tensors are None and topk_ids / topk_weights are inputs; ``shared``: the shared expert's tensors)."""
    if not cuda_compiled():
        raise NotImplementedError(
            "flashmoe::moe_forward got CUDA tensors, but this flashmoe was built without its CUDA backend "
            "(flashmoe._C.cuda_compiled is False: rebuild where nvcc is found); "
            "use flashmoe.moe(..., backend='reference')"
        )
    if not cuda_kernel_runs_on(x.device):
        capability = ".".join(map(str, torch.cuda.get_device_capability(x.device)))
        raise NotImplementedError(
            f"flashmoe::moe_forward: this build's CUDA kernel has code for {_C.cuda_build_info()['archs']}, none of "
            f"which runs on {x.device} (compute capability {capability}); rebuild with FLASHMOE_CUDA_ARCHS naming "
            f"it, or use flashmoe.moe(..., backend='reference')"
        )
    if x.shape[0] == 0:  # nothing to route: the kernel is not launched
        expert_counts.zero_()
        dropped.zero_()
        return
    allow_tf32 = x.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    workspace_bytes = _C.cuda_workspace_bytes(problem, device, allow_tf32)
    # Any contents will do: the kernel resets its own control block on the stream.
    workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=x.device)
    with torch.cuda.device(device):
        _C.moe_forward_cuda(
            problem=problem,
            x=_address(x), router_weight=_address(router_weight), router_bias=_address(router_bias),
            w1=_address(w1), b1=_address(b1), w2=_address(w2), b2=_address(b2), y=_address(y),
            topk_ids=_address(topk_ids), topk_weights=_address(topk_weights), expert_counts=_address(expert_counts),
            router_logits=_address(router_logits), dropped=_address(dropped),
            workspace=_address(workspace), workspace_bytes=workspace_bytes, allow_tf32=allow_tf32,
            device=device, stream=torch.cuda.current_stream(device).cuda_stream, **_shared_addresses(*shared),
            selection_bias=_address(selection_bias),
        )


@moe_forward.register_fake
def _moe_forward_fake(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
                      capacity_factor, swiglu_limit=None, swiglu_alpha=None, selection_bias=None, num_groups=1,
                      topk_groups=1, routed_scaling_factor=1.0, weight_on="output", shared_w1=None, shared_w2=None,
                      shared_gate=None):
    _validate(x, router_weight, w1, w2, router_bias, b1, b2, top_k, gated, activation, normalize, scoring,
              capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate,
              selection_bias=selection_bias, num_groups=num_groups, topk_groups=topk_groups,
              routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
    if x.device.type == "cuda":
        _validate_cuda(x, router_weight, w1, w2, router_bias, b1, b2, shared=(shared_w1, shared_w2, shared_gate))
    return _empty_outputs(x, router_weight, top_k)


@torch.library.custom_op("flashmoe::moe_backward", mutates_args=())
def moe_backward(
    grad_y: Tensor,
    grad_topk_weights: Optional[Tensor],
    grad_router_logits: Optional[Tensor],
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    router_bias: Optional[Tensor],
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    topk_ids: Tensor,
    top_k: int,
    gated: bool,
    activation: str,
    normalize: bool,
    scoring: str,
    capacity_factor: Optional[float],
    needs_grad: list[bool],
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
) -> list[Tensor]:
    """Gradients of moe_forward for ``[x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2,
    shared_gate]``.

    ``needs_grad`` has one flag per input (without a shared expert it may stop after b2); an input
    that needs none (or is absent) gets an empty tensor, and the result has one entry per flag. The routing (topk_ids) and admission are the forward's own: the selection is piecewise
    constant, so only the weights and the expert math carry gradient. Computed in fp32 (fp64 for
    fp64), one expert's weights upcast at a time, with explicit formulas: an op body runs below
    autograd. The selection bias and the group limit only choose the picks, so they add no term;
    the scale multiplies the weights' gradient; with softmax_topk the gradient goes through the
    softmax over the k picked logits; with weight_on="input" a pick weight's gradient is
    ``<dL/d(row), x>`` (the rounding of the row passes gradients straight through)."""
    _validate_backward(grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2, router_bias, b1, b2,
                       topk_ids, top_k, gated, activation, normalize, scoring, capacity_factor, needs_grad,
                       swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate, selection_bias=selection_bias,
                       num_groups=num_groups, topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
                       weight_on=weight_on)
    accumulate = accumulate_dtype(x.dtype)
    need_x, need_router_weight, need_w1, need_w2, need_router_bias, need_b1, need_b2 = needs_grad[:7]
    xa = x.to(accumulate)
    router_weight_a = router_weight.to(accumulate)
    num_experts = router_weight.shape[0]
    ids = topk_ids.long()

    # Forward quantities of the router.
    router = RouterWeights(xa, router_weight_a, router_bias, ids, scoring, normalize, routed_scaling_factor)
    weights = router.weights
    capacity = reference.expert_capacity(capacity_factor, x.shape[0], top_k, num_experts)
    admitted = reference.admit(topk_ids, num_experts, capacity)
    grad_x, grad_w1, grad_w2, grad_b1, grad_b2, grad_weights = _experts_backward(
        grad_y, xa, w1, w2, b1, b2, topk_ids, weights, admitted, gated, activation, swiglu_limit, swiglu_alpha,
        (need_x, need_w1, need_w2, need_b1, need_b2), weight_on=weight_on, row_dtype=x.dtype)
    shared_grads = _shared_backward(grad_y, xa, grad_x, shared_w1, shared_w2, shared_gate, gated, activation,
                                    swiglu_limit, swiglu_alpha, needs_grad[7:])

    if grad_topk_weights is not None:
        grad_weights = grad_weights + grad_topk_weights.to(accumulate)
    grad_logits = router.grad_logits(grad_weights)
    if grad_router_logits is not None:
        grad_logits = grad_logits + grad_router_logits.to(accumulate)
    if need_x:
        grad_x += grad_logits @ router_weight_a
    grad_router_weight = grad_logits.T @ xa if need_router_weight else None
    grad_router_bias = grad_logits.sum(dim=0) if need_router_bias and router_bias is not None else None

    grads = (grad_x if need_x else None, grad_router_weight, grad_w1, grad_w2, grad_router_bias, grad_b1, grad_b2,
             *shared_grads)
    inputs = (x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2, shared_gate)
    return [x.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads[:len(needs_grad)], inputs)]


class RouterWeights:
    """The pick weights of a fixed routing ``ids [T, k]`` as functions of the router logits, and
    their chain rule back to the logits: shared by every backward (single process and expert
    parallel). The selection bias and the group limit only choose the picks, so they add no term.

    ``weights``: ``[T, k]`` in the accumulation dtype of ``xa``; ``logits``: ``[T, E]``."""

    def __init__(self, xa, router_weight_a, router_bias, ids, scoring, normalize, routed_scaling_factor):
        self.ids, self.scoring, self.normalize, self.scale = ids, scoring, normalize, routed_scaling_factor
        self.logits = reference.router_logits(xa, router_weight_a, router_bias)
        if scoring == "softmax_topk":
            self.scores = self.logits
            self.unscaled = torch.softmax(self.logits.gather(1, ids), dim=-1)
        else:
            self.scores = torch.softmax(self.logits, dim=-1) if scoring == "softmax" else torch.sigmoid(self.logits)
            picked = self.scores.gather(1, ids)
            self.picked_sum = picked.sum(dim=-1, keepdim=True)
            self.unscaled = picked / self.picked_sum if normalize else picked
        self.weights = self.unscaled * routed_scaling_factor

    def grad_logits(self, grad_weights):
        """weights -> unscaled weights -> picked scores (or picked logits) -> all scores -> logits."""
        grad_unscaled = grad_weights * self.scale
        if self.scoring == "softmax_topk":
            grad_picked = self.unscaled * (grad_unscaled - (grad_unscaled * self.unscaled).sum(dim=-1, keepdim=True))
            return torch.zeros_like(self.logits).scatter_add_(1, self.ids, grad_picked)
        if self.normalize:
            grad_picked = (grad_unscaled - (grad_unscaled * self.unscaled).sum(dim=-1, keepdim=True)) / self.picked_sum
        else:
            grad_picked = grad_unscaled
        scores = self.scores
        grad_scores = torch.zeros_like(scores).scatter_add_(1, self.ids, grad_picked)
        if self.scoring == "softmax":
            return scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
        return grad_scores * scores * (1 - scores)


@moe_backward.register_fake
def _moe_backward_fake(grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2, router_bias, b1, b2,
                       topk_ids, top_k, gated, activation, normalize, scoring, capacity_factor, needs_grad,
                       swiglu_limit=None, swiglu_alpha=None, selection_bias=None, num_groups=1, topk_groups=1,
                       routed_scaling_factor=1.0, weight_on="output", shared_w1=None, shared_w2=None, shared_gate=None):
    _validate_backward(grad_y, grad_topk_weights, grad_router_logits, x, router_weight, w1, w2, router_bias, b1, b2,
                       topk_ids, top_k, gated, activation, normalize, scoring, capacity_factor, needs_grad,
                       swiglu_limit, swiglu_alpha, shared_w1, shared_w2, shared_gate, selection_bias=selection_bias,
                       num_groups=num_groups, topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor,
                       weight_on=weight_on)
    inputs = [x, router_weight, w1, w2, router_bias, b1, b2, shared_w1, shared_w2, shared_gate][:len(needs_grad)]
    return [torch.empty_like(t) if t is not None and need else x.new_empty((0,)) for t, need in zip(inputs, needs_grad)]


def _experts_backward(grad_y, xa, w1, w2, b1, b2, topk_ids, weights, admitted, gated, activation, swiglu_limit,
                      swiglu_alpha, needs_grad, *, weight_on="output", row_dtype=None):
    """The expert part of the backward, shared by both ops, for a fixed routing.

    ``xa`` is x in the accumulation dtype, ``weights [T, k]`` the pick weights in it, ``admitted``
    from reference.admit. Returns ``(grad_x, grad_w1, grad_w2, grad_b1, grad_b2, grad_weights)``:
    grad_x and grad_weights in the accumulation dtype (grad_weights is zero at picks not admitted),
    the parameter gradients in the parameters' dtype or None where ``needs_grad`` (x, w1, w2, b1, b2)
    says so. With ``weight_on="input"`` the expert's input is the row ``round(x · w)`` (rounded to
    ``row_dtype``, x's dtype) and its output is combined with 1."""
    accumulate = xa.dtype
    need_x, need_w1, need_w2, need_b1, need_b2 = needs_grad
    num_experts, top_k = w1.shape[0], topk_ids.shape[1]
    limit, alpha = reference.activation_options(activation, swiglu_limit, swiglu_alpha)
    # Experts: y[t] += w[t, j] * (h · W2ᵀ + b2),  h = glu(gate, up) or act(z),  z = x · W1ᵀ + b1.
    # Each expert's gradients are complete after its own step, so they are stored in the
    # parameter's dtype right away and no fp32 copy of a whole weight tensor ever exists.
    grad_y = grad_y.to(accumulate)
    grad_weights = torch.zeros_like(weights)
    grad_x = torch.zeros_like(xa)
    grad_w1 = torch.zeros_like(w1) if need_w1 else None
    grad_w2 = torch.zeros_like(w2) if need_w2 else None
    grad_b1 = torch.zeros_like(b1) if need_b1 and b1 is not None else None
    grad_b2 = torch.zeros_like(b2) if need_b2 and b2 is not None else None
    weight_on_input = weight_on == "input"
    for expert, picks in reference.picks_by_expert(topk_ids, admitted, num_experts):
        token, slot = picks // top_k, picks % top_k
        expert_x, w1_e, w2_e = xa[token], w1[expert].to(accumulate), w2[expert].to(accumulate)
        pick_weights = weights[token, slot].unsqueeze(1)
        if weight_on_input:
            token_x, expert_x = expert_x, (expert_x * pick_weights).to(row_dtype or accumulate).to(accumulate)
        h, grad_z_of = _ffn_hidden_with_grad(expert_x, w1_e, None if b1 is None else b1[expert].to(accumulate),
                                             gated, activation, limit, alpha)
        out = h @ w2_e.T + (0 if b2 is None else b2[expert].to(accumulate))
        grad_token = grad_y[token]
        if weight_on_input:
            grad_out = grad_token
        else:
            grad_weights[token, slot] = (grad_token * out).sum(dim=-1)
            grad_out = pick_weights * grad_token
        if grad_w2 is not None:
            grad_w2[expert] = grad_out.T @ h
        if grad_b2 is not None:
            grad_b2[expert] = grad_out.sum(dim=0)
        grad_z = grad_z_of(grad_out @ w2_e)
        if grad_w1 is not None:
            grad_w1[expert] = grad_z.T @ expert_x
        if grad_b1 is not None:
            grad_b1[expert] = grad_z.sum(dim=0)
        if weight_on_input:
            grad_row = grad_z @ w1_e
            grad_weights[token, slot] = (grad_row * token_x).sum(dim=-1)
            if need_x:
                grad_x.index_add_(0, token, pick_weights * grad_row)
        elif need_x:
            grad_x.index_add_(0, token, grad_z @ w1_e)
    return grad_x, grad_w1, grad_w2, grad_b1, grad_b2, grad_weights


def _shared_backward(grad_y, xa, grad_x, shared_w1, shared_w2, shared_gate, gated, activation, swiglu_limit,
                     swiglu_alpha, needs_grad):
    """The shared expert's part of the backward: ``y += g · s(x)``, ``s(x) = glu(x·W1ᵀ)·W2ᵀ`` (or
    act), ``g = σ(x·gateᵀ)`` or 1. Adds its share into ``grad_x`` (accumulation dtype, in place)
    and returns the gradients of ``(shared_w1, shared_w2, shared_gate)`` (None where not needed or
    absent; needs_grad may be empty: then none is)."""
    if shared_w1 is None:
        return None, None, None
    need_w1, need_w2, need_gate = (tuple(needs_grad) + (False,) * 3)[:3]
    accumulate = xa.dtype
    grad_y = grad_y.to(accumulate)
    w1_a, w2_a = shared_w1.to(accumulate), shared_w2.to(accumulate)
    limit, alpha = reference.activation_options(activation, swiglu_limit, swiglu_alpha)
    h, grad_z_of = _ffn_hidden_with_grad(xa, w1_a, None, gated, activation, limit, alpha)
    grad_out = grad_y
    grad_shared_gate = None
    if shared_gate is not None:
        gate_a = shared_gate.to(accumulate)
        weight = torch.sigmoid(xa @ gate_a.T)  # [T, 1]
        grad_out = weight * grad_y
        grad_logit = (grad_y * (h @ w2_a.T)).sum(dim=-1, keepdim=True) * weight * (1 - weight)
        grad_x += grad_logit @ gate_a
        grad_shared_gate = grad_logit.T @ xa if need_gate else None
    grad_z = grad_z_of(grad_out @ w2_a)
    grad_x += grad_z @ w1_a
    return (grad_z.T @ xa if need_w1 else None, grad_out.T @ h if need_w2 else None, grad_shared_gate)


def _ffn_hidden_with_grad(rows: Tensor, w1: Tensor, b1: Tensor | None, gated: bool, activation: str, limit: float,
                          alpha: float):
    """An FFN's hidden layer ``h = act(rows · W1ᵀ + b1)`` (or the GLU of its two halves) and the
    map from ∂h to ∂z, ``z = rows · W1ᵀ + b1``: the one step every backward (experts, shared
    expert, expert-parallel owner) takes through the first GEMM's activation."""
    z = rows @ w1.T + (0 if b1 is None else b1)
    if gated:
        gate, up = z.chunk(2, dim=-1)
        h, grad_gate_factor, grad_up_factor = _glu_with_grad(gate, up, activation, limit, alpha)
        return h, lambda grad_h: torch.cat([grad_h * grad_gate_factor, grad_h * grad_up_factor], dim=-1)
    h, grad_z_factor = _activation_with_grad(z, activation)
    return h, lambda grad_h: grad_h * grad_z_factor


def _activation_with_grad(v: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """act(v) and act'(v), elementwise."""
    if activation == "silu":
        sigmoid = torch.sigmoid(v)
        return v * sigmoid, sigmoid * (1 + v * (1 - sigmoid))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(v * 0.7071067811865476))
        pdf = torch.exp(-0.5 * v * v) * 0.3989422804014327
        return v * cdf, cdf + v * pdf
    if activation == "gelu_tanh":
        inner_grad = 0.7978845608028654 * (1 + 3 * 0.044715 * v * v)
        t = torch.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        return 0.5 * v * (1 + t), 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * inner_grad
    if activation == "relu":
        return torch.relu(v), (v > 0).to(v.dtype)
    if activation == "relu2":
        r = torch.relu(v)
        return r * r, 2 * r
    raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


def _glu_with_grad(gate: Tensor, up: Tensor, activation: str, limit: float, alpha: float):
    """h = reference.gated_activation(gate, up), with ∂h/∂gate and ∂h/∂up, elementwise. A clamp
    passes gradient where its input lies inside the closed interval, as torch.clamp does."""
    if activation not in reference.GATED_ACTIVATIONS:
        activated, activated_grad = _activation_with_grad(gate, activation)
        return activated * up, up * activated_grad, activated
    up_clamped = up.clamp(-limit, limit)
    up_passes = ((up >= -limit) & (up <= limit)).to(up.dtype)
    gate_passes = (gate <= limit).to(gate.dtype)
    if activation == "swiglu_clamp":
        silu, silu_grad = _activation_with_grad(gate.clamp(max=limit), "silu")
        return silu * up_clamped, silu_grad * gate_passes * up_clamped, silu * up_passes
    if activation == "swiglu_clamp_post":
        silu, silu_grad = _activation_with_grad(gate, "silu")
        silu_passes = (silu <= limit).to(gate.dtype)
        silu_clamped = silu.clamp(max=limit)
        return silu_clamped * up_clamped, silu_grad * silu_passes * up_clamped, silu_clamped * up_passes
    gate_clamped = gate.clamp(max=limit)  # swiglu_oai
    sigmoid = torch.sigmoid(alpha * gate_clamped)
    glu = gate_clamped * sigmoid
    glu_grad = sigmoid + gate_clamped * alpha * sigmoid * (1 - sigmoid)
    return (up_clamped + 1) * glu, (up_clamped + 1) * glu_grad * gate_passes, glu * up_passes


_OPTIONS = ("top_k", "gated", "activation", "normalize", "scoring", "capacity_factor")
_ACTIVATION_OPTIONS = ("swiglu_limit", "swiglu_alpha")
# moe_forward's inputs by name, in schema order: the backward finds each by its name.
_FORWARD_INPUTS = _TENSOR_ARGUMENTS + _OPTIONS + _ACTIVATION_OPTIONS + tuple(ROUTING_OPTIONS) + _SHARED_ARGUMENTS
_FORWARD_DEFAULTS = {**dict.fromkeys(_ACTIVATION_OPTIONS), **ROUTING_OPTIONS, **dict.fromkeys(_SHARED_ARGUMENTS)}


def _setup_context(ctx, inputs, output):
    named = {**_FORWARD_DEFAULTS, **dict(zip(_FORWARD_INPUTS, inputs))}
    ctx.options = {name: named[name] for name in _OPTIONS + _ACTIVATION_OPTIONS + tuple(ROUTING_OPTIONS)}
    ctx.save_for_backward(*(named[name] for name in _TENSOR_ARGUMENTS + _SHARED_ARGUMENTS), output[1])


def _backward(ctx, grad_y, _grad_ids, grad_topk_weights, _grad_counts, grad_router_logits, _grad_dropped):
    *tensors, topk_ids = ctx.saved_tensors
    named = dict(zip(_TENSOR_ARGUMENTS + _SHARED_ARGUMENTS, tensors))
    needs_by_name = dict(zip(_FORWARD_INPUTS, ctx.needs_input_grad))
    needs_grad = [bool(needs_by_name.get(name, False)) for name in _GRAD_INPUTS]
    if grad_y is None:
        grad_y = torch.zeros_like(named["x"])
    options = [ctx.options[name] for name in _OPTIONS]
    grads = torch.ops.flashmoe.moe_backward(grad_y, grad_topk_weights, grad_router_logits,
                                            *(named[name] for name in _TENSOR_ARGUMENTS), topk_ids, *options,
                                            needs_grad, ctx.options["swiglu_limit"], ctx.options["swiglu_alpha"],
                                            *(ctx.options[name] for name in ROUTING_OPTIONS),
                                            *(named[name] for name in _SHARED_ARGUMENTS))
    by_name = {name: grad if need else None for name, grad, need in zip(_GRAD_INPUTS, grads, needs_grad)}
    return tuple(by_name.get(name) for name in _FORWARD_INPUTS[:len(ctx.needs_input_grad)])


moe_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- routing from outside

@torch.library.custom_op("flashmoe::moe_experts_forward", mutates_args=())
def moe_experts_forward(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    topk_ids: Tensor,
    topk_weights: Tensor,
    gated: bool,
    activation: str,
    capacity_factor: Optional[float],
    swiglu_limit: Optional[float],
    swiglu_alpha: Optional[float],
    weight_on: str = "output",
    shared_w1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
    shared_gate: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gate-less MoE forward: dispatch, experts and combine of ``x [T, H]`` for the routing
    ``topk_ids [T, k]`` int32 / ``topk_weights [T, k]`` (float32; float64 for float64 x) given from
    outside. Returns ``(y [T, H], expert_counts [E] int32, dropped [] int64)``. An id ``E`` (HF's
    expert-parallel sentinel) contributes zero. See flashmoe.moe for the rest (the shared expert included).

    This body is the CPU kernel; CUDA tensors go to :func:`_moe_experts_forward_cuda`."""
    _validate_experts(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor, swiglu_limit,
                      swiglu_alpha, True, shared_w1, shared_w2, shared_gate, weight_on=weight_on)
    if x.device.type != "cpu":
        raise NotImplementedError(
            f"flashmoe::moe_experts_forward has no native kernel for device {x.device.type!r} in this build "
            f"(compiled: {', '.join(_native_devices())}); use flashmoe.moe(..., backend='reference')"
        )
    y, expert_counts, dropped = _empty_experts_outputs(x, w1)
    _C.moe_forward_cpu(
        problem=_problem(x, w1, None, None, b1, b2, topk_ids.shape[1], gated, activation, None, None,
                         capacity_factor, swiglu_limit, swiglu_alpha, shared_w1, shared_gate, weight_on=weight_on),
        x=_address(x), router_weight=0, router_bias=0, w1=_address(w1), b1=_address(b1), w2=_address(w2),
        b2=_address(b2), y=_address(y), topk_ids=_address(topk_ids), topk_weights=_address(topk_weights),
        expert_counts=_address(expert_counts), router_logits=0, dropped=_address(dropped),
        num_threads=torch.get_num_threads(), **_shared_addresses(shared_w1, shared_w2, shared_gate),
    )
    return y, expert_counts, dropped


def _empty_experts_outputs(x, w1):
    """(y, expert_counts, dropped), uninitialized."""
    return torch.empty_like(x), x.new_empty((w1.shape[0],), dtype=torch.int32), x.new_empty((), dtype=torch.int64)


@moe_experts_forward.register_kernel("cuda")
def _moe_experts_forward_cuda(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor,
                              swiglu_limit, swiglu_alpha, weight_on="output", shared_w1=None, shared_w2=None,
                              shared_gate=None):
    """The persistent CUDA kernel with its gate stage skipped. No host sync: topk_ids' values are not
    read here (flashmoe.moe checks them before, outside graph capture and torch.compile); the kernel
    lets an id outside [0, E), or a repeat within a row, contribute zero."""
    _validate_experts(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor, swiglu_limit,
                      swiglu_alpha, False, shared_w1, shared_w2, shared_gate, weight_on=weight_on)
    _validate_cuda(x, w1, w2, b1, b2, topk_ids, topk_weights, names=_EXPERTS_TENSOR_ARGUMENTS,
                   shared=(shared_w1, shared_w2, shared_gate))
    problem = _problem(x, w1, None, None, b1, b2, topk_ids.shape[1], gated, activation, None, None, capacity_factor,
                       swiglu_limit, swiglu_alpha, shared_w1, shared_gate, weight_on=weight_on)
    y, expert_counts, dropped = _empty_experts_outputs(x, w1)
    _launch_cuda(problem, x, None, None, w1, b1, w2, b2, y, topk_ids, topk_weights, expert_counts, None, dropped,
                 (shared_w1, shared_w2, shared_gate))
    return y, expert_counts, dropped


@moe_experts_forward.register_fake
def _moe_experts_forward_fake(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor,
                              swiglu_limit, swiglu_alpha, weight_on="output", shared_w1=None, shared_w2=None,
                              shared_gate=None):
    _validate_experts(x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor, swiglu_limit,
                      swiglu_alpha, False, shared_w1, shared_w2, shared_gate, weight_on=weight_on)
    if x.device.type == "cuda":
        _validate_cuda(x, w1, w2, b1, b2, topk_ids, topk_weights, names=_EXPERTS_TENSOR_ARGUMENTS,
                       shared=(shared_w1, shared_w2, shared_gate))
    return _empty_experts_outputs(x, w1)


@torch.library.custom_op("flashmoe::moe_experts_backward", mutates_args=())
def moe_experts_backward(
    grad_y: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    topk_ids: Tensor,
    topk_weights: Tensor,
    gated: bool,
    activation: str,
    capacity_factor: Optional[float],
    swiglu_limit: Optional[float],
    swiglu_alpha: Optional[float],
    needs_grad: list[bool],
    weight_on: str = "output",
    shared_w1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
    shared_gate: Optional[Tensor] = None,
) -> list[Tensor]:
    """Gradients of moe_experts_forward for ``[x, w1, w2, b1, b2, topk_weights, shared_w1, shared_w2,
    shared_gate]`` (one flag per input in ``needs_grad``, which may stop after topk_weights without a
    shared expert; an input that needs none, or is absent, gets an empty tensor). The routing is
    the caller's; a pick that contributes nothing (dropped, the sentinel) gets zero gradient."""
    _check_needs_grad(needs_grad, _EXPERTS_GRAD_INPUTS, shared_w1)
    accumulate = accumulate_dtype(x.dtype)
    num_experts = w1.shape[0]
    ids = _routed_ids(topk_ids, num_experts)
    capacity = reference.expert_capacity(capacity_factor, x.shape[0], topk_ids.shape[1], num_experts)
    admitted = reference.admit(ids, num_experts, capacity)
    grad_x, grad_w1, grad_w2, grad_b1, grad_b2, grad_weights = _experts_backward(
        grad_y, x.to(accumulate), w1, w2, b1, b2, ids, topk_weights.to(accumulate), admitted, gated, activation,
        swiglu_limit, swiglu_alpha, tuple(needs_grad[:5]), weight_on=weight_on, row_dtype=x.dtype)
    shared_grads = _shared_backward(grad_y, x.to(accumulate), grad_x, shared_w1, shared_w2, shared_gate, gated,
                                    activation, swiglu_limit, swiglu_alpha, needs_grad[6:])
    grads = (grad_x if needs_grad[0] else None, grad_w1, grad_w2, grad_b1, grad_b2,
             grad_weights if needs_grad[5] else None, *shared_grads)
    inputs = (x, w1, w2, b1, b2, topk_weights, shared_w1, shared_w2, shared_gate)
    return [x.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads[:len(needs_grad)], inputs)]


@moe_experts_backward.register_fake
def _moe_experts_backward_fake(grad_y, x, w1, w2, b1, b2, topk_ids, topk_weights, gated, activation, capacity_factor,
                               swiglu_limit, swiglu_alpha, needs_grad, weight_on="output", shared_w1=None,
                               shared_w2=None, shared_gate=None):
    _check_needs_grad(needs_grad, _EXPERTS_GRAD_INPUTS, shared_w1)
    inputs = [x, w1, w2, b1, b2, topk_weights, shared_w1, shared_w2, shared_gate][:len(needs_grad)]
    return [torch.empty_like(t) if t is not None and need else x.new_empty((0,)) for t, need in zip(inputs, needs_grad)]


def _routed_ids(topk_ids: Tensor, num_experts: int) -> Tensor:
    """topk_ids with every pick that goes to no expert set to the sentinel E, as the kernels'
    routed_pick (csrc/core/capacity.h) reads them: an id outside [0, E), or a repeat of an earlier
    pick of its row. Valid routing passes unchanged."""
    ids = topk_ids.long()
    routed = (ids >= 0) & (ids < num_experts)
    for slot in range(1, ids.shape[1]):
        routed[:, slot] &= ~(ids[:, slot:slot + 1] == ids[:, :slot]).any(dim=1)
    return torch.where(routed, ids, torch.full_like(ids, num_experts))


_EXPERTS_OPTIONS = ("gated", "activation", "capacity_factor", "swiglu_limit", "swiglu_alpha", "weight_on")
# moe_experts_forward's inputs by name, in schema order, and the ones moe_experts_backward differentiates.
_EXPERTS_INPUTS = _EXPERTS_TENSOR_ARGUMENTS + _EXPERTS_OPTIONS + _SHARED_ARGUMENTS
_EXPERTS_GRAD_INPUTS = ("x", "w1", "w2", "b1", "b2", "topk_weights") + _SHARED_ARGUMENTS
_EXPERTS_DEFAULTS = {"weight_on": "output", **dict.fromkeys(_SHARED_ARGUMENTS)}


def _experts_setup_context(ctx, inputs, output):
    named = {**_EXPERTS_DEFAULTS, **dict(zip(_EXPERTS_INPUTS, inputs))}
    ctx.options = [named[name] for name in _EXPERTS_OPTIONS]
    ctx.save_for_backward(*(named[name] for name in _EXPERTS_TENSOR_ARGUMENTS + _SHARED_ARGUMENTS))


def _experts_backward_autograd(ctx, grad_y, _grad_counts, _grad_dropped):
    named = dict(zip(_EXPERTS_TENSOR_ARGUMENTS + _SHARED_ARGUMENTS, ctx.saved_tensors))
    needs_by_name = dict(zip(_EXPERTS_INPUTS, ctx.needs_input_grad))
    needs_grad = [bool(needs_by_name.get(name, False)) for name in _EXPERTS_GRAD_INPUTS]
    if grad_y is None:
        grad_y = torch.zeros_like(named["x"])
    grads = torch.ops.flashmoe.moe_experts_backward(grad_y, *(named[name] for name in _EXPERTS_TENSOR_ARGUMENTS),
                                                    *ctx.options[:-1], needs_grad, ctx.options[-1],
                                                    *(named[name] for name in _SHARED_ARGUMENTS))
    by_name = {name: grad if need else None for name, grad, need in zip(_EXPERTS_GRAD_INPUTS, grads, needs_grad)}
    return tuple(by_name.get(name) for name in _EXPERTS_INPUTS[:len(ctx.needs_input_grad)])


moe_experts_forward.register_autograd(_experts_backward_autograd, setup_context=_experts_setup_context)
