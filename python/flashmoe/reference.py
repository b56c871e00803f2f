"""Pure-PyTorch reference of the flashmoe operator: the executable specification.

Every backend (the CPU dataflow runtime, the CUDA kernel) computes exactly what this
module computes; the tests compare each of them with :func:`moe` run on float64 inputs.
The operator contract lives in ``DESIGN.md``; this file is its executable form:

* routing: fp32 router logits, softmax (or sigmoid) scores, top-k with ties to the
  lower expert index, weights optionally normalized over the k picks;
* capacity: ``C = ceil(capacity_factor * T * k / E)`` per expert, picks admitted in
  ascending token index, a pick not admitted contributes zero;
* expert FFN: plain or gated (HF ``gate_up_proj`` layout), GEMMs in the input dtype;
* combine: ``y[t] = sum_j weight[t, j] * f_{e_j}(x[t])`` in ascending j, accumulated in
  fp32 (fp64 for fp64 inputs), stored in the dtype of ``x``.

The code runs in float64 end to end and is differentiable (autograd flows into ``x``,
every weight and every bias; routing decisions themselves are discrete).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "SCORINGS",
    "FLOAT_DTYPES",
    "Routing",
    "validate",
    "validate_options",
    "validate_layer",
    "OPTION_CHECKS",
    "router_logits",
    "route",
    "expert_capacity",
    "admit",
    "expert_ffn",
    "picks_by_expert",
    "combine",
    "moe",
    "load_balancing_loss",
    "router_z_loss",
]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
SCORINGS = ("softmax", "sigmoid")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Routing(NamedTuple):
    """Routing decisions of one :func:`moe` call (T tokens, E experts, top-k).

    Attributes:
        topk_ids: ``[T, k]`` int32, the expert of each pick, picks ordered by descending
            score (ties: lower expert index first).
        topk_weights: ``[T, k]`` float32 (float64 when ``x`` is float64), the score of each
            pick, divided by the sum over the k picks when ``normalize``. Dropped picks keep
            their weight here; they contribute zero to the output.
        expert_counts: ``[E]`` int32, picks per expert, counted before dropping.
        dropped: 0-dim int64, the number of picks not admitted by capacity.
        router_logits: ``[T, E]`` float32 (float64 when ``x`` is float64).
    """

    topk_ids: Tensor
    topk_weights: Tensor
    expert_counts: Tensor
    dropped: Tensor
    router_logits: Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every compute dtype but float64, which accumulates in float64."""
    """fp32 accumulation for every compute dtype, except float64 which stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value) -> str:
    return type(value).__name__


def check_choice(name: str, value, choices: tuple) -> None:
    """``value`` is one of the strings ``choices``: TypeError for a non-str (a numpy array, say,
    whose ``in`` test would be ambiguous), ValueError for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {_type_name(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")


def check_count(name: str, value, minimum: int = 1) -> None:
    """``value`` is an int (not a bool) >= ``minimum``: a size such as hidden_size or world_size."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_type_name(value)} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value >= 2**63:  # the native side holds sizes in int64
        raise ValueError(f"{name} must be below 2**63, got {value!r}")


def check_real(name: str, value, *, positive: bool = False) -> None:
    """``value`` is a finite real number (> 0 with ``positive``); huge ints are out of range, not an
    OverflowError."""
    expected = "a finite number" + (" > 0" if positive else "")
    if not _is_real(value):
        raise TypeError(f"{name} must be {expected}, got {_type_name(value)} {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite or (positive and not value > 0):
        shown = value if not isinstance(value, int) or abs(value) < 10**20 else f"an int of {len(str(abs(value)))} digits"
        raise ValueError(f"{name} must be {expected}, got {shown}")


def check_dtype(name: str, dtype, allowed: tuple = FLOAT_DTYPES) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, one of {allowed}, got {_type_name(dtype)} {dtype!r}")
    if dtype not in allowed:
        raise TypeError(f"{name} must be one of {allowed}, got {dtype}")


def _check_top_k(top_k, num_experts: int) -> None:
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int in 1..{num_experts}, got {_type_name(top_k)} {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts={num_experts}, got {top_k}")


def _check_capacity_factor(capacity_factor) -> None:
    if capacity_factor is not None:
        check_real("capacity_factor", capacity_factor, positive=True)


# The operator's options, one row each: name -> check(value, num_experts). Every entry point
# (flashmoe.moe, MoE, from_hf, SimulatedCluster, simulate_expert_parallel, the raw ops) validates
# its options through this table, in this order; a new option is a new row.
OPTION_CHECKS = {
    "top_k": _check_top_k,
    "gated": lambda value, _: check_bool("gated", value),
    "activation": lambda value, _: check_choice("activation", value, ACTIVATIONS),
    "scoring": lambda value, _: check_choice("scoring", value, SCORINGS),
    "normalize": lambda value, _: check_bool("normalize", value),
    "capacity_factor": lambda value, _: _check_capacity_factor(value),
}


def validate_options(num_experts: int, **options) -> None:
    """Checks the given options (a subset of :data:`OPTION_CHECKS`, any order) in table order."""
    unknown = set(options) - set(OPTION_CHECKS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; the options are {list(OPTION_CHECKS)}")
    for name, check in OPTION_CHECKS.items():
        if name in options:
            check(options[name], num_experts)


def validate_layer(hidden_size, ffn_size, num_experts, *, dtype=None, **options) -> None:
    """The arguments of a layer built from sizes (:class:`flashmoe.MoE`, ``SimulatedCluster``):
    the sizes (ints >= 1), the dtype (None or a float dtype) and the options of the table."""
    for name, value in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
        check_count(name, value)
    if dtype is not None:
        check_dtype("dtype", dtype)
    validate_options(num_experts, **options)


def _check_tensor(name: str, tensor, shape: tuple, x: Tensor) -> None:
    """``tensor`` is a Tensor of exactly ``shape`` with ``x``'s dtype and device."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(tensor).__name__}")
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} must have dtype {x.dtype} (the dtype of x), got {tensor.dtype}")
    if tensor.device != x.device:
        raise ValueError(f"{name} must be on device {x.device} (the device of x), got {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def validate(
    x,
    router_weight,
    w1,
    w2,
    *,
    top_k,
    gated,
    activation,
    scoring,
    capacity_factor,
    router_bias,
    b1,
    b2,
    normalize=True,
    x_name: str = "x",
) -> None:
    """Check the arguments of :func:`moe`; raise naming the argument and what was expected.

    ``TypeError`` for a wrong Python type or dtype, ``ValueError`` for a wrong shape,
    device or value. Only ``T`` (the flattened leading dims of ``x``) may be 0; H, I, E
    must be at least 1. Strides are not checked: the reference accepts any layout.

    Args:
        x: ``[..., H]``, float32 / bfloat16 / float16 / float64; at least 2 dims.
        router_weight: ``[E, H]``, dtype and device of ``x``.
        w1: ``[E, 2I, H]`` when ``gated`` else ``[E, I, H]``, dtype and device of ``x``.
        w2: ``[E, H, I]``, dtype and device of ``x``.
        top_k, gated, activation, scoring, normalize, capacity_factor: see :data:`OPTION_CHECKS`.
        router_bias: None or ``[E]``; b1: None or ``[E, 2I or I]``; b2: None or ``[E, H]``.
        x_name: how messages name ``x`` (``"xs[2]"`` for one rank's tokens).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name} must be a torch.Tensor of shape [..., H], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{x_name} must have dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape [..., H] with at least 2 dims, got {list(x.shape)}")
    hidden = x.shape[-1]
    if hidden < 1:
        raise ValueError(f"{x_name} must have shape [..., H] with H >= 1, got {list(x.shape)}")

    if not isinstance(router_weight, Tensor):
        raise TypeError(f"router_weight must be a torch.Tensor of shape [E, H], got {type(router_weight).__name__}")
    if router_weight.dim() != 2 or router_weight.shape[0] < 1:
        raise ValueError(f"router_weight must have shape [E, H={hidden}] with E >= 1, got {list(router_weight.shape)}")
    num_experts = router_weight.shape[0]
    _check_tensor("router_weight", router_weight, (num_experts, hidden), x)

    check_bool("gated", gated)
    w1_rows_name = "2I" if gated else "I"
    if not isinstance(w1, Tensor):
        raise TypeError(f"w1 must be a torch.Tensor of shape [E, {w1_rows_name}, H], got {type(w1).__name__}")
    if w1.dim() != 3 or w1.shape[1] < 1 or (gated and w1.shape[1] % 2 != 0):
        raise ValueError(
            f"w1 must have shape [E={num_experts}, {w1_rows_name}, H={hidden}] with I >= 1"
            f"{' (gated: an even row count, gate rows then up rows)' if gated else ''}, got {list(w1.shape)}"
        )
    w1_rows = w1.shape[1]
    intermediate = w1_rows // 2 if gated else w1_rows
    _check_tensor("w1", w1, (num_experts, w1_rows, hidden), x)
    _check_tensor("w2", w2, (num_experts, hidden, intermediate), x)
    if router_bias is not None:
        _check_tensor("router_bias", router_bias, (num_experts,), x)
    if b1 is not None:
        _check_tensor("b1", b1, (num_experts, w1_rows), x)
    if b2 is not None:
        _check_tensor("b2", b2, (num_experts, hidden), x)

    validate_options(num_experts, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
                     normalize=normalize, capacity_factor=capacity_factor)


def router_logits(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor] = None) -> Tensor:
    """Router logits ``x @ router_weight.T (+ router_bias)`` with fp32 accumulation.

    Args:
        x: ``[T, H]`` (any leading dims), float32 / bfloat16 / float16 / float64.
        router_weight: ``[E, H]``, any float dtype.
        router_bias: optional ``[E]``, any float dtype.

    Returns:
        ``[T, E]`` float32, or float64 when ``x`` is float64. Inputs are upcast first, so
        bf16/fp16 products are exact and summed in fp32.
    """
    dtype = accumulate_dtype(x.dtype)
    bias = None if router_bias is None else router_bias.to(dtype)
    return F.linear(x.to(dtype), router_weight.to(dtype), bias)


def route(
    logits: Tensor, top_k: int, *, scoring: str = "softmax", normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Top-k routing from router logits.

    Args:
        logits: ``[T, E]`` float32 or float64; scores are computed in this dtype.
        top_k: int in ``1..E``.
        scoring: ``"softmax"`` over E, or ``"sigmoid"`` per expert.
        normalize: divide each token's k weights by their sum.

    Returns:
        ``(topk_ids, topk_weights)``: ``[T, k]`` int32 experts ordered by descending score,
        ties to the lower expert index; ``[T, k]`` weights in ``logits``' dtype.
    """
    check_choice("scoring", scoring, SCORINGS)
    _check_top_k(top_k, logits.shape[-1])
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    # A stable descending sort keeps equal scores in ascending expert order; torch.topk
    # promises no tie order.
    sorted_scores, sorted_ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    topk_weights = sorted_scores[..., :top_k]
    topk_ids = sorted_ids[..., :top_k].to(torch.int32)
    if normalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights


def expert_capacity(capacity_factor, num_tokens: int, top_k: int, num_experts: int) -> Optional[int]:
    """Picks each expert admits: ``ceil(capacity_factor * T * k / E)``, or None (dropless).

    The expression is evaluated left to right in Python (IEEE double) floats; the C++
    side evaluates the same expression in the same order, so both agree bit for bit.
    The result is clamped to T: an expert never receives more picks than there are tokens,
    so a larger capacity admits the same picks, and a huge factor cannot overflow.
    """
    _check_capacity_factor(capacity_factor)
    if capacity_factor is None:
        return None
    capacity = capacity_factor * num_tokens * top_k / num_experts
    return min(math.ceil(capacity), num_tokens) if math.isfinite(capacity) else num_tokens


def admit(topk_ids: Tensor, num_experts: int, capacity: Optional[int]) -> Tensor:
    """Which picks their expert admits.

    Each expert takes its picks in ascending token index (then ascending pick slot j)
    and admits the first ``capacity`` of them.

    Args:
        topk_ids: ``[T, k]`` integer dtype, values in ``0..E-1``.
        num_experts: E.
        capacity: picks admitted per expert, or None to admit every pick.

    Returns:
        ``[T, k]`` bool, True where the pick is admitted.
    """
    if capacity is None:
        return torch.ones(topk_ids.shape, dtype=torch.bool, device=topk_ids.device)
    flat_ids = topk_ids.reshape(-1).long()
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in 0..{num_experts - 1}")
    # Row-major flattening is (token, slot) order; a stable sort by expert keeps it
    # inside each expert, so a pick's offset in its expert's run is its arrival rank.
    order = torch.sort(flat_ids, stable=True).indices
    counts = torch.bincount(flat_ids, minlength=num_experts)
    run_starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_ids)
    rank[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - run_starts[flat_ids[order]]
    return (rank < capacity).reshape(topk_ids.shape)


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def expert_ffn(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    gated: bool,
    activation: str,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
) -> Tensor:
    """One expert's FFN, GEMMs in ``x``'s dtype (torch accumulates bf16/fp16 in fp32).

    Plain: ``act(x @ w1.T + b1) @ w2.T + b2``.
    Gated: ``(act(x @ gate.T + b1[:I]) * (x @ up.T + b1[I:])) @ w2.T + b2`` with
    ``gate = w1[:I]`` and ``up = w1[I:]`` (HF ``gate_up_proj`` layout). The hidden
    activation is rounded to ``x``'s dtype before the second GEMM.

    Args:
        x: ``[n, H]``, float dtype.
        w1: ``[2I, H]`` when gated else ``[I, H]``, dtype of ``x``.
        w2: ``[H, I]``, dtype of ``x``.
        b1: optional ``[2I]`` / ``[I]``; b2: optional ``[H]``; dtype of ``x``.

    Returns:
        ``[n, H]`` in ``x``'s dtype.
    """
    h = F.linear(x, w1, b1)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = _activate(gate, activation) * up
    else:
        h = _activate(h, activation)
    return F.linear(h, w2, b2)


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
):
    """The MoE layer, as every backend must compute it.

    Args:
        x: ``[..., H]`` float32 / bfloat16 / float16 / float64; leading dims are T tokens.
        router_weight: ``[E, H]``, dtype of ``x`` (``nn.Linear`` layout).
        w1: ``[E, 2I, H]`` (gated: gate rows then up rows) or ``[E, I, H]``, dtype of ``x``.
        w2: ``[E, H, I]``, dtype of ``x``.
        top_k: experts per token, ``1..E``.
        gated: GLU expert (``act(gate) * up``) or plain two-layer FFN.
        activation: one of :data:`ACTIVATIONS`.
        normalize: divide each token's k weights by their sum.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        capacity_factor: None (dropless) or a finite number > 0.
        router_bias: optional ``[E]``; b1: optional ``[E, 2I or I]``; b2: optional
            ``[E, H]``; dtype of ``x``.
        return_routing: also return a :class:`Routing`.

    Returns:
        ``y`` with the shape and dtype of ``x``, or ``(y, Routing)``.
    """
    validate(
        x, router_weight, w1, w2, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
        capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2, normalize=normalize,
    )
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, which holds no values for the reference to route; "
                         "flashmoe.moe(..., backend='native') infers the output shapes of meta tensors")
    hidden = x.shape[-1]
    num_experts = router_weight.shape[0]
    tokens = x.reshape(-1, hidden)
    num_tokens = tokens.shape[0]

    logits = router_logits(tokens, router_weight, router_bias)
    topk_ids, topk_weights = route(logits, top_k, scoring=scoring, normalize=normalize)
    flat_ids = topk_ids.reshape(-1).long()
    expert_counts = torch.bincount(flat_ids, minlength=num_experts).to(torch.int32)
    capacity = expert_capacity(capacity_factor, num_tokens, top_k, num_experts)
    admitted = admit(topk_ids, num_experts, capacity)
    dropped = (~admitted).sum(dtype=torch.int64)

    y = combine(tokens, w1, w2, topk_ids, topk_weights, admitted, gated=gated, activation=activation,
                b1=b1, b2=b2)
    y = y.reshape(x.shape)

    if not return_routing:
        return y
    return y, Routing(topk_ids, topk_weights, expert_counts, dropped, logits)


def picks_by_expert(topk_ids: Tensor, admitted: Tensor, num_experts: int) -> list[tuple[int, Tensor]]:
    """The admitted picks of each expert that has any, as flat pick indices ``t * k + j``.

    Args:
        topk_ids: ``[T, k]`` integer experts of the picks.
        admitted: ``[T, k]`` bool, from :func:`admit`.
        num_experts: E.

    Returns:
        ``[(expert, picks)]`` in ascending expert order; ``picks`` is int64, ascending, so in
        (token, slot) order.
    """
    flat_ids = topk_ids.reshape(-1).long()
    picks = admitted.reshape(-1).nonzero().squeeze(1)
    picks = picks[torch.sort(flat_ids[picks], stable=True).indices]
    per_expert = torch.bincount(flat_ids[picks], minlength=num_experts).tolist()
    return [(expert, group) for expert, group in enumerate(torch.split(picks, per_expert)) if group.numel()]


def combine(
    tokens: Tensor,
    w1: Tensor,
    w2: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    admitted: Tensor,
    *,
    gated: bool,
    activation: str,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
) -> Tensor:
    """Expert FFNs of the admitted picks and their weighted sum, for a fixed routing.

    ``y[t] = sum_j admitted[t, j] * topk_weights[t, j] * f_{topk_ids[t, j]}(tokens[t])`` in
    ascending j, accumulated in float32 (float64 for float64 tokens). Differentiable in every
    float argument, which is what the native op's backward recomputes through.

    Args:
        tokens: ``[T, H]`` float dtype.
        w1, w2, b1, b2: as in :func:`moe`, dtype of ``tokens``.
        topk_ids: ``[T, k]`` integer, experts of the picks.
        topk_weights: ``[T, k]`` float, weights of the picks.
        admitted: ``[T, k]`` bool, from :func:`admit`.

    Returns:
        ``[T, H]`` in ``tokens``' dtype.
    """
    num_tokens, hidden = tokens.shape
    num_experts, top_k = w1.shape[0], topk_ids.shape[1]
    accumulate = accumulate_dtype(tokens.dtype)
    expert_outputs, admitted_picks = [], []
    for expert, expert_picks in picks_by_expert(topk_ids, admitted, num_experts):
        expert_tokens = tokens.index_select(0, torch.div(expert_picks, top_k, rounding_mode="floor"))
        out = expert_ffn(
            expert_tokens, w1[expert], w2[expert], gated=gated, activation=activation,
            b1=None if b1 is None else b1[expert], b2=None if b2 is None else b2[expert],
        )
        expert_outputs.append(out.to(accumulate))
        admitted_picks.append(expert_picks)

    # pick_outputs[t, j] = f_{e_j}(x[t]) for admitted picks, 0 for dropped ones.
    pick_outputs = torch.zeros(num_tokens * top_k, hidden, dtype=accumulate, device=tokens.device)
    if expert_outputs:
        pick_outputs = pick_outputs.index_copy(0, torch.cat(admitted_picks), torch.cat(expert_outputs))
    pick_outputs = pick_outputs.reshape(num_tokens, top_k, hidden)
    combine_weights = torch.where(admitted, topk_weights, torch.zeros_like(topk_weights))

    y = combine_weights[:, 0, None] * pick_outputs[:, 0]
    for slot in range(1, top_k):
        y = y + combine_weights[:, slot, None] * pick_outputs[:, slot]
    return y.to(tokens.dtype)


def load_balancing_loss(router_logits: Tensor, topk_ids: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard auxiliary loss: ``E * sum_e (picks_e / T) * mean_t softmax(logits)[t, e]``.

    Equals HF transformers' ``load_balancing_loss_func`` for one layer without an
    attention mask (picks counted over all k slots, so a perfectly uniform router gives k).

    Args:
        router_logits: ``[T, E]`` float32 or float64.
        topk_ids: ``[T, k]`` integer dtype, values in ``0..E-1``.
        num_experts: E.

    Returns:
        0-dim tensor in ``router_logits``' dtype (float32 for lower precisions).
    """
    dtype = accumulate_dtype(router_logits.dtype)
    probs = torch.softmax(router_logits.reshape(-1, num_experts).to(dtype), dim=-1)
    num_tokens = probs.shape[0]
    picks = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts).to(dtype)
    return num_experts * torch.sum(picks / num_tokens * probs.mean(dim=0))


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits[t])^2``.

    Args:
        router_logits: ``[T, E]`` float32 or float64 (any leading dims).

    Returns:
        0-dim tensor in ``router_logits``' dtype (float32 for lower precisions).
    """
    logits = router_logits.to(accumulate_dtype(router_logits.dtype))
    return torch.logsumexp(logits, dim=-1).square().mean()
