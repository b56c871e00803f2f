"""Pure-PyTorch reference of the flashmoe operator: the executable specification.

Every backend (the CPU dataflow runtime, the CUDA kernel) computes exactly what this
module computes; the tests compare each of them with :func:`moe` run on float64 inputs.
The operator contract lives in ``DESIGN.md``; this file is its executable form:

* routing: fp32 router logits, softmax (or sigmoid) scores, top-k with ties to the
  lower expert index, weights optionally normalized over the k picks; the routing options
  (a selection bias that chooses but does not weigh, group-limited choice, a scale after
  normalisation, softmax over the top-k logits) are specified by :func:`route`;
* router precision: a float32 router with bfloat16 / float16 ``x`` computes its logits from upcast
  ``x``;
* capacity: ``C = ceil(capacity_factor * T * k / E)`` per expert, picks admitted in
  ascending token index, a pick not admitted contributes zero;
* routing from outside (the gate-less form): ``topk_ids`` / ``topk_weights`` given instead of a
  router; the id ``E`` is the sentinel of HF's expert-parallel mode (a pick of an expert that is
  not local) and contributes zero;
* expert FFN: plain or gated (HF ``gate_up_proj`` layout), GEMMs in the input dtype, with the
  activations of :data:`ACTIVATIONS` (the clamped SwiGLUs take ``swiglu_limit``/``swiglu_alpha``);
* combine: ``y[t] = sum_j weight[t, j] * f_{e_j}(x[t])`` in ascending j, accumulated in
  fp32 (fp64 for fp64 inputs), stored in the dtype of ``x``; with ``weight_on="input"`` the
  expert gets the row ``x[t] * weight[t, j]`` (product in fp32, rounded to x's dtype) and its
  output is combined with weight 1.

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
    "ELEMENTWISE_ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "SCORINGS",
    "WEIGHT_ON",
    "FLOAT_DTYPES",
    "Routing",
    "validate",
    "activation_options",
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

# act(v) elementwise: plain experts use act(z), gated ones act(gate) * up.
ELEMENTWISE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
# The clamped SwiGLUs combine the gate and up halves themselves: gated experts only.
GATED_ACTIVATIONS = ("swiglu_clamp", "swiglu_clamp_post", "swiglu_oai")
ACTIVATIONS = ELEMENTWISE_ACTIVATIONS + GATED_ACTIVATIONS
# gpt-oss's defaults for swiglu_oai; the two other clamped SwiGLUs have no default limit.
SWIGLU_OAI_LIMIT = 7.0
SWIGLU_OAI_ALPHA = 1.702
SCORINGS = ("softmax", "sigmoid", "softmax_topk")
# Where a pick's weight applies: to the expert's output (the default) or to its input row (Llama 4).
WEIGHT_ON = ("output", "input")
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

    With routing from outside (``topk_ids=`` given), ``topk_ids`` and ``topk_weights`` are the
    caller's own tensors, ``expert_counts`` and ``dropped`` leave the sentinel picks out, and
    ``router_logits`` is None: there is no router.
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
    # A comparison, not math.isfinite: torch.compile traces it, and an int beyond float's range
    # compares as finite instead of raising OverflowError (its size is checked by the caller).
    finite = -math.inf < value < math.inf and not (isinstance(value, int) and abs(value) >= 2**1024)
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


def _check_activation_options(activation, gated, swiglu_limit, swiglu_alpha) -> None:
    if activation in GATED_ACTIVATIONS and not gated:
        raise ValueError(f"activation={activation!r} combines the gate and up halves of w1, so it needs gated=True")
    for name, value in (("swiglu_limit", swiglu_limit), ("swiglu_alpha", swiglu_alpha)):
        if value is None:
            continue
        if not _is_real(value):
            raise TypeError(f"{name} must be None or a finite number > 0, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    if swiglu_limit is not None and activation not in GATED_ACTIVATIONS:
        raise ValueError(f"swiglu_limit applies only to activation in {GATED_ACTIVATIONS}, "
                         f"got activation={activation!r}")
    if swiglu_alpha is not None and activation != "swiglu_oai":
        raise ValueError(f"swiglu_alpha applies only to activation='swiglu_oai', got activation={activation!r}")
    if activation in ("swiglu_clamp", "swiglu_clamp_post") and swiglu_limit is None:
        raise ValueError(f"activation={activation!r} needs swiglu_limit (the clamp L, a finite number > 0); "
                         f"it has no default")


def activation_options(activation: str, swiglu_limit=None, swiglu_alpha=None) -> tuple[float, float]:
    """``(L, alpha)`` of ``activation``, defaults filled in: swiglu_oai takes L = 7.0 and
    alpha = 1.702 (gpt-oss) unless given; an option the activation does not use is 0.0."""
    _check_activation_options(activation, True, swiglu_limit, swiglu_alpha)
    if activation == "swiglu_oai":
        return (SWIGLU_OAI_LIMIT if swiglu_limit is None else float(swiglu_limit),
                SWIGLU_OAI_ALPHA if swiglu_alpha is None else float(swiglu_alpha))
    if activation in GATED_ACTIVATIONS:
        return float(swiglu_limit), 0.0
    return 0.0, 0.0


def _check_routing(topk_ids, topk_weights, x: Tensor, num_experts: int, check_values: bool) -> None:
    """Routing from outside: ``topk_ids [T, k]`` int32/int64 and ``topk_weights [T, k]``."""
    num_tokens = math.prod(x.shape[:-1])
    for name, value, other in (("topk_ids", topk_ids, "topk_weights"), ("topk_weights", topk_weights, "topk_ids")):
        if value is None:
            raise ValueError(f"{name} is missing: routing from outside takes topk_ids and topk_weights together, "
                             f"and {other} was given")
    if not isinstance(topk_ids, Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor of shape [T={num_tokens}, k], got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must have dtype torch.int32 or torch.int64, got {topk_ids.dtype}")
    if topk_ids.device != x.device:
        raise ValueError(f"topk_ids must be on device {x.device} (the device of x), got {topk_ids.device}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T={num_tokens}, k] with k >= 1 (T: the tokens of x), "
                         f"got {list(topk_ids.shape)}")
    if not isinstance(topk_weights, Tensor):
        raise TypeError(f"topk_weights must be a torch.Tensor of shape {list(topk_ids.shape)}, "
                        f"got {type(topk_weights).__name__}")
    if topk_weights.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"topk_weights must have dtype {x.dtype} (the dtype of x) or torch.float32, "
                        f"got {topk_weights.dtype}")
    if topk_weights.device != x.device:
        raise ValueError(f"topk_weights must be on device {x.device} (the device of x), got {topk_weights.device}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids, {list(topk_ids.shape)}, "
                         f"got {list(topk_weights.shape)}")
    if check_values:
        check_topk_ids_values(topk_ids, num_experts)


def check_topk_ids_values(topk_ids: Tensor, num_experts: int) -> None:
    """Every id lies in ``[0, E)`` or is the sentinel ``E``, and no row repeats an expert (the
    sentinel may repeat). Reads the values: a host sync on an accelerator."""
    ids = topk_ids.long()
    if ids.numel() == 0:
        return
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != num_experts)
    # One host read in the common, valid case; the error paths below may take their time.
    if not bool(((ordered[:, 0] < 0) | (ordered[:, -1] > num_experts)).any() | repeated.any()):
        return
    bad = (ids < 0) | (ids > num_experts)
    if bool(bad.any()):
        token, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"topk_ids must lie in [0, E={num_experts}), or be {num_experts}, the sentinel of an expert "
                         f"that is not local (it contributes zero); got topk_ids[{token}, {slot}] = "
                         f"{int(ids[token, slot])}")
    if bool(repeated.any()):
        token, slot = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(f"topk_ids repeats expert {int(ordered[token, slot])} in row {token}: a token picks each "
                         f"expert at most once (only the sentinel {num_experts} may repeat)")


def _check_no_router(router_weight, top_k, normalize, scoring, router_bias) -> None:
    """The gate-less form: every router argument stays unset."""
    if router_weight is not None:
        raise ValueError("router_weight must be None when topk_ids is given: the routing comes from outside, so "
                         "flashmoe.moe takes (x, w1, w2, *, topk_ids, topk_weights) and no router")
    for name, value in (("top_k", top_k), ("normalize", normalize), ("scoring", scoring),
                        ("router_bias", router_bias)):
        if value is not None:
            raise ValueError(f"{name} is an option of the router; with topk_ids the routing comes from outside "
                             f"(k = topk_ids.shape[1]), so leave {name} unset, got {name}={value!r}"
                             if not isinstance(value, Tensor) else
                             f"{name} is an option of the router; with topk_ids the routing comes from outside, "
                             f"so leave {name} unset, got a tensor")


def _check_capacity_factor(capacity_factor) -> None:
    if capacity_factor is not None:
        check_real("capacity_factor", capacity_factor, positive=True)


def _check_num_groups(num_groups, num_experts: int) -> None:
    check_count("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(f"num_groups must divide the number of experts E={num_experts} (each group holds "
                         f"E/num_groups experts), got num_groups={num_groups}")


def _check_groups(num_experts: int, top_k, num_groups, topk_groups) -> None:
    """The cross-checks of group-limited choice (each value already checked on its own): at most
    num_groups groups are kept, and they hold at least top_k experts."""
    if topk_groups > num_groups:
        raise ValueError(f"topk_groups must be in 1..num_groups={num_groups}, got {topk_groups}")
    selectable = topk_groups * (num_experts // num_groups)
    if _is_int(top_k) and top_k > selectable:
        raise ValueError(f"top_k={top_k} exceeds the experts selectable under the group limit: topk_groups="
                         f"{topk_groups} groups of E/num_groups={num_experts // num_groups} experts hold only "
                         f"{selectable}")


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
    "num_groups": _check_num_groups,
    "topk_groups": lambda value, _: check_count("topk_groups", value),
    "routed_scaling_factor": lambda value, _: check_real("routed_scaling_factor", value, positive=True),
    "weight_on": lambda value, _: check_choice("weight_on", value, WEIGHT_ON),
}
# The router options of the table that routing from outside leaves at their defaults.
ROUTER_OPTION_DEFAULTS = {"num_groups": 1, "topk_groups": 1, "routed_scaling_factor": 1.0}


def validate_options(num_experts: int, **options) -> None:
    """Checks the given options (a subset of :data:`OPTION_CHECKS`, any order) in table order."""
    unknown = set(options) - set(OPTION_CHECKS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; the options are {list(OPTION_CHECKS)}")
    for name, check in OPTION_CHECKS.items():
        if name in options:
            check(options[name], num_experts)
    if "num_groups" in options or "topk_groups" in options:
        _check_groups(num_experts, options.get("top_k"), options.get("num_groups", 1), options.get("topk_groups", 1))


def validate_layer(hidden_size, ffn_size, num_experts, *, dtype=None, swiglu_limit=None, swiglu_alpha=None,
                   **options) -> None:
    """The arguments of a layer built from sizes (:class:`flashmoe.MoE`, ``SimulatedCluster``):
    the sizes (ints >= 1), the dtype (None or a float dtype), the options of the table and the
    activation's own options (``swiglu_limit``, ``swiglu_alpha``)."""
    for name, value in (("hidden_size", hidden_size), ("ffn_size", ffn_size), ("num_experts", num_experts)):
        check_count(name, value)
    if dtype is not None:
        check_dtype("dtype", dtype)
    validate_options(num_experts, **options)
    _check_activation_options(options.get("activation", "silu"), options.get("gated", True), swiglu_limit,
                              swiglu_alpha)


def _check_tensor(name: str, tensor, shape: tuple, x: Tensor, dtype=None, dtype_rule: str = "the dtype of x") -> None:
    """``tensor`` is a Tensor of exactly ``shape`` with ``x``'s device and ``dtype`` (default: x's)."""
    dtype = x.dtype if dtype is None else dtype
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} ({dtype_rule}), got {tensor.dtype}")
    if tensor.device != x.device:
        raise ValueError(f"{name} must be on device {x.device} (the device of x), got {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def router_f32(x_dtype: torch.dtype, router_dtype: torch.dtype) -> bool:
    """Whether a router of ``router_dtype`` is the float32 router of a bfloat16 / float16 ``x``
    (logits from upcast x), rather than a router in x's own dtype."""
    return router_dtype == torch.float32 and x_dtype in (torch.bfloat16, torch.float16)


def _check_router_dtype(router_weight: Tensor, x: Tensor) -> None:
    if router_weight.dtype != x.dtype and not router_f32(x.dtype, router_weight.dtype):
        allowed = f"{x.dtype} (the dtype of x)" + (" or torch.float32 (an fp32 router)"
                                                   if x.dtype in (torch.bfloat16, torch.float16) else "")
        raise TypeError(f"router_weight must have dtype {allowed}, got {router_weight.dtype}")


def _check_selection_bias(selection_bias, x: Tensor, num_experts: int) -> None:
    if not isinstance(selection_bias, Tensor):
        raise TypeError(f"selection_bias must be None or a torch.Tensor of shape [E={num_experts}], "
                        f"got {type(selection_bias).__name__}")
    if selection_bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"selection_bias must have a float dtype, one of {FLOAT_DTYPES}, got {selection_bias.dtype}")
    if selection_bias.device != x.device:
        raise ValueError(f"selection_bias must be on device {x.device} (the device of x), got {selection_bias.device}")
    if tuple(selection_bias.shape) != (num_experts,):
        raise ValueError(f"selection_bias must have shape [E={num_experts}], got {list(selection_bias.shape)}")


def _check_no_router_options(selection_bias, num_groups, topk_groups, routed_scaling_factor) -> None:
    """The gate-less form: the routing options keep their defaults (weight_on stays an option)."""
    given = {"selection_bias": selection_bias, "num_groups": num_groups, "topk_groups": topk_groups,
             "routed_scaling_factor": routed_scaling_factor}
    for name, value in given.items():
        default = ROUTER_OPTION_DEFAULTS.get(name)
        if (value is not None) if default is None else (isinstance(value, Tensor) or value != default):
            raise ValueError(f"{name} is an option of the router; with topk_ids the routing comes from outside, "
                             f"so leave {name} at its default ({default!r})")


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
    topk_ids=None,
    topk_weights=None,
    swiglu_limit=None,
    swiglu_alpha=None,
    selection_bias=None,
    num_groups=1,
    topk_groups=1,
    routed_scaling_factor=1.0,
    weight_on="output",
    check_values=True,
    x_name: str = "x",
) -> None:
    """Check the arguments of :func:`moe`; raise naming the argument and what was expected.

    ``TypeError`` for a wrong Python type or dtype, ``ValueError`` for a wrong shape,
    device or value. Only ``T`` (the flattened leading dims of ``x``) may be 0; H, I, E
    must be at least 1. Strides are not checked: the reference accepts any layout.

    Args:
        x: ``[..., H]``, float32 / bfloat16 / float16 / float64; at least 2 dims.
        router_weight: ``[E, H]``, device of ``x``, dtype of ``x`` or float32 when ``x`` is
            bfloat16 / float16 (an fp32 router); None with ``topk_ids``.
        w1: ``[E, 2I, H]`` when ``gated`` else ``[E, I, H]``, dtype and device of ``x``.
        w2: ``[E, H, I]``, dtype and device of ``x``.
        top_k: int in ``1..E``; None with ``topk_ids``.
        gated: bool.
        activation: one of :data:`ACTIVATIONS`; those of :data:`GATED_ACTIVATIONS` need ``gated``.
        scoring: one of :data:`SCORINGS`; None with ``topk_ids``.
        capacity_factor: None, or a finite number > 0.
        router_bias: None or ``[E]`` of router_weight's dtype; b1: None or ``[E, 2I or I]``; b2: None
            or ``[E, H]``.
        normalize: bool; None with ``topk_ids``.
        selection_bias: None or ``[E]``, any float dtype, device of ``x``.
        num_groups: int >= 1 dividing E; topk_groups: int in ``1..num_groups``, the kept groups
            holding at least top_k experts (``topk_groups * E / num_groups >= top_k``).
        routed_scaling_factor: a finite number > 0.
        weight_on: one of :data:`WEIGHT_ON`.
        topk_ids: routing from outside, ``[T, k]`` int32 / int64, ids in ``[0, E)`` or the
            sentinel ``E``, no expert twice in a row; with ``topk_weights`` ``[T, k]`` of x's
            dtype or float32.
        swiglu_limit: the clamp L of the clamped SwiGLUs, a finite number > 0 (required for
            swiglu_clamp / swiglu_clamp_post); swiglu_alpha: swiglu_oai's alpha.
        check_values: read ``topk_ids``' values (range, repeats); False where reading them is not
            possible (fake tensors, CUDA graph capture).
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

    check_bool("gated", gated)
    w1_rows_name = "2I" if gated else "I"
    gate_less = topk_ids is not None or topk_weights is not None
    if gate_less:
        _check_no_router(router_weight, top_k, normalize, scoring, router_bias)
        if not isinstance(w1, Tensor):
            raise TypeError(f"w1 must be a torch.Tensor of shape [E, {w1_rows_name}, H], got {type(w1).__name__}")
        if w1.dim() != 3 or w1.shape[0] < 1:
            raise ValueError(f"w1 must have shape [E, {w1_rows_name}, H={hidden}] with E >= 1, got {list(w1.shape)}")
        num_experts = w1.shape[0]
    else:
        if not isinstance(router_weight, Tensor):
            raise TypeError(f"router_weight must be a torch.Tensor of shape [E, H], got {type(router_weight).__name__}")
        if router_weight.dim() != 2 or router_weight.shape[0] < 1:
            raise ValueError(f"router_weight must have shape [E, H={hidden}] with E >= 1, got {list(router_weight.shape)}")
        num_experts = router_weight.shape[0]
        _check_router_dtype(router_weight, x)
        _check_tensor("router_weight", router_weight, (num_experts, hidden), x, router_weight.dtype)

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
        _check_tensor("router_bias", router_bias, (num_experts,), x, router_weight.dtype,
                      "the dtype of router_weight")
    if selection_bias is not None and not gate_less:
        _check_selection_bias(selection_bias, x, num_experts)
    if b1 is not None:
        _check_tensor("b1", b1, (num_experts, w1_rows), x)
    if b2 is not None:
        _check_tensor("b2", b2, (num_experts, hidden), x)

    if gate_less:
        _check_no_router_options(selection_bias, num_groups, topk_groups, routed_scaling_factor)
        validate_options(num_experts, gated=gated, activation=activation, capacity_factor=capacity_factor,
                         weight_on=weight_on)
    else:
        validate_options(num_experts, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
                         normalize=normalize, capacity_factor=capacity_factor, num_groups=num_groups,
                         topk_groups=topk_groups, routed_scaling_factor=routed_scaling_factor, weight_on=weight_on)
    _check_activation_options(activation, gated, swiglu_limit, swiglu_alpha)
    if gate_less:
        _check_routing(topk_ids, topk_weights, x, num_experts, check_values)


class _Default:
    """The default of a router option (normalize, scoring) that was not passed: True / "softmax" in the
    router form, and unset in the gate-less form, where passing the option at all is an error."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


DEFAULT_NORMALIZE = _Default(True)
DEFAULT_SCORING = _Default("softmax")


def router_options(normalize, scoring, *, gate_less: bool) -> tuple:
    """``(normalize, scoring)`` with unpassed defaults resolved: their values in the router form,
    None (unset) in the gate-less form."""
    return tuple((None if gate_less else value.value) if isinstance(value, _Default) else value
                 for value in (normalize, scoring))


def split_weights(router_weight, w1, w2, *, gate_less: bool) -> tuple:
    """``(router_weight, w1, w2)`` of a :func:`moe` call. In the gate-less form the positional
    arguments after x are ``(w1, w2)``, so they arrive in the router_weight and w1 slots; a third
    one stays in router_weight, where :func:`validate` names it."""
    if not gate_less:
        return router_weight, w1, w2
    if w2 is None:
        return None, router_weight, w1
    if w1 is None:
        return None, router_weight, w2
    return router_weight, w1, w2


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
    logits: Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    normalize: bool = True,
    selection_bias: Optional[Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Top-k routing from router logits.

    * scores: ``softmax(logits)``, ``sigmoid(logits)``, or (``"softmax_topk"``) the logits themselves;
    * selection key: ``scores + selection_bias`` (the bias only chooses; HF's
      ``e_score_correction_bias``);
    * group limit (``topk_groups < num_groups``): the E experts form ``num_groups`` groups of
      consecutive ids; a group's score is the sum of its two best keys (its one key for groups of
      one); only the experts of the ``topk_groups`` best groups can be picked (the others' key is
      -inf);
    * picks: the ``top_k`` best keys. Ties go to the lower index, for groups and experts alike, and
      NaN outranks every number (torch.sort's descending order);
    * weights: the unbiased scores of the picks, divided by their sum when ``normalize``; with
      ``"softmax_topk"`` the softmax over the k picked logits (normalize has no effect). Then
      multiplied by ``routed_scaling_factor``.

    Args:
        logits: ``[T, E]`` float32 or float64; scores are computed in this dtype.
        top_k: int in ``1..E``.
        scoring: one of :data:`SCORINGS`.
        normalize: divide each token's k weights by their sum.
        selection_bias: optional ``[E]``, any float dtype (computed in logits' dtype).
        num_groups, topk_groups, routed_scaling_factor: see above.

    Returns:
        ``(topk_ids, topk_weights)``: ``[T, k]`` int32 experts ordered by descending key,
        ties to the lower expert index; ``[T, k]`` weights in ``logits``' dtype.
    """
    check_choice("scoring", scoring, SCORINGS)
    num_experts = logits.shape[-1]
    _check_top_k(top_k, num_experts)
    validate_options(num_experts, top_k=top_k, num_groups=num_groups, topk_groups=topk_groups,
                     routed_scaling_factor=routed_scaling_factor)
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = logits
    keys = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    if topk_groups < num_groups:
        keys = _limit_groups(keys, num_groups, topk_groups)
    # A stable descending sort keeps equal keys in ascending expert order; torch.topk
    # promises no tie order.
    topk_ids = _descending_order(keys)[..., :top_k]
    picked = scores.gather(-1, topk_ids)
    if scoring == "softmax_topk":
        topk_weights = torch.softmax(picked, dim=-1)
    elif normalize:
        topk_weights = picked / picked.sum(dim=-1, keepdim=True)
    else:
        topk_weights = picked
    return topk_ids.to(torch.int32), topk_weights * routed_scaling_factor


def _descending_order(values: Tensor) -> Tensor:
    """Indices of ``values`` along the last dim in descending order, NaN first, ties ascending."""
    return torch.sort(values.detach(), dim=-1, descending=True, stable=True).indices


def _limit_groups(keys: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """``keys [T, E]`` with every expert outside its token's ``topk_groups`` best groups set to -inf."""
    num_tokens, num_experts = keys.shape
    group_size = num_experts // num_groups
    grouped = keys.detach().reshape(num_tokens, num_groups, group_size)
    best = grouped.gather(-1, _descending_order(grouped)[..., :min(2, group_size)])
    group_scores = best[..., 0] if group_size == 1 else best[..., 0] + best[..., 1]
    kept_groups = _descending_order(group_scores)[..., :topk_groups]
    kept = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=keys.device).scatter_(1, kept_groups, True)
    return keys.masked_fill(~kept.repeat_interleave(group_size, dim=1), float("-inf"))


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
    and admits the first ``capacity`` of them. A pick of the sentinel ``E`` (an expert that is
    not local, routing from outside) is never admitted and takes no capacity.

    Args:
        topk_ids: ``[T, k]`` integer dtype, values in ``0..E`` (``E``: the sentinel).
        num_experts: E.
        capacity: picks admitted per expert, or None to admit every pick.

    Returns:
        ``[T, k]`` bool, True where the pick is admitted.
    """
    flat_ids = topk_ids.reshape(-1).long()
    if bool(((flat_ids < 0) | (flat_ids > num_experts)).any()):  # one host read, not two (min and max)
        raise ValueError(f"topk_ids must lie in 0..{num_experts - 1}, or be the sentinel {num_experts}")
    local = flat_ids < num_experts
    if capacity is None:
        return local.reshape(topk_ids.shape)
    # Row-major flattening is (token, slot) order; a stable sort by expert keeps it
    # inside each expert, so a pick's offset in its expert's run is its arrival rank.
    order = torch.sort(flat_ids, stable=True).indices
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)
    run_starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_ids)
    rank[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - run_starts[flat_ids[order]]
    return ((rank < capacity) & local).reshape(topk_ids.shape)


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "relu2":
        return F.relu(h).square()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def gated_activation(gate: Tensor, up: Tensor, activation: str, swiglu_limit=None, swiglu_alpha=None) -> Tensor:
    """The gated expert's hidden activation ``h`` from its gate and up halves (L: swiglu_limit,
    alpha: swiglu_alpha, defaults as in :func:`activation_options`):

    * swiglu_clamp:      ``g = min(g, L)``, ``u = clamp(u, -L, L)``, ``h = silu(g) * u``
    * swiglu_clamp_post: ``h = min(silu(g), L) * clamp(u, -L, L)``
    * swiglu_oai:        ``g = min(g, L)``, ``h = (clamp(u, -L, L) + 1) * g * sigmoid(alpha * g)``
    * any other:         ``h = act(g) * u``
    """
    if activation not in GATED_ACTIVATIONS:
        return _activate(gate, activation) * up
    limit, alpha = activation_options(activation, swiglu_limit, swiglu_alpha)
    up = up.clamp(-limit, limit)
    if activation == "swiglu_clamp":
        return F.silu(gate.clamp(max=limit)) * up
    if activation == "swiglu_clamp_post":
        return F.silu(gate).clamp(max=limit) * up
    gate = gate.clamp(max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def expert_ffn(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    gated: bool,
    activation: str,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: Optional[float] = None,
) -> Tensor:
    """One expert's FFN, GEMMs in ``x``'s dtype (torch accumulates bf16/fp16 in fp32).

    Plain: ``act(x @ w1.T + b1) @ w2.T + b2``.
    Gated: ``glu(x @ gate.T + b1[:I], x @ up.T + b1[I:]) @ w2.T + b2`` with
    ``gate = w1[:I]`` and ``up = w1[I:]`` (HF ``gate_up_proj`` layout) and ``glu`` the
    :func:`gated_activation` (``act(g) * u`` unless a clamped SwiGLU). The hidden
    activation is rounded to ``x``'s dtype before the second GEMM.

    Args:
        x: ``[n, H]``, float dtype.
        w1: ``[2I, H]`` when gated else ``[I, H]``, dtype of ``x``.
        w2: ``[H, I]``, dtype of ``x``.
        b1: optional ``[2I]`` / ``[I]``; b2: optional ``[H]``; dtype of ``x``.
        swiglu_limit, swiglu_alpha: the clamped SwiGLUs' options.

    Returns:
        ``[n, H]`` in ``x``'s dtype.
    """
    h = F.linear(x, w1, b1)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = gated_activation(gate, up, activation, swiglu_limit, swiglu_alpha)
    else:
        h = _activate(h, activation)
    return F.linear(h, w2, b2)


def moe(
    x: Tensor,
    router_weight: Optional[Tensor] = None,
    w1: Optional[Tensor] = None,
    w2: Optional[Tensor] = None,
    *,
    top_k: Optional[int] = None,
    gated: bool = True,
    activation: str = "silu",
    normalize: bool = DEFAULT_NORMALIZE,
    scoring: str = DEFAULT_SCORING,
    capacity_factor: Optional[float] = None,
    router_bias: Optional[Tensor] = None,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    return_routing: bool = False,
    topk_ids: Optional[Tensor] = None,
    topk_weights: Optional[Tensor] = None,
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: Optional[float] = None,
    selection_bias: Optional[Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    weight_on: str = "output",
):
    """The MoE layer, as every backend must compute it.

    Two forms: ``moe(x, router_weight, w1, w2, *, top_k, ...)`` routes with its own router;
    ``moe(x, w1, w2, *, topk_ids, topk_weights, ...)`` takes the routing from outside (the
    gate-less form: no router, and none of top_k, normalize, scoring, router_bias).

    Args:
        x: ``[..., H]`` float32 / bfloat16 / float16 / float64; leading dims are T tokens.
        router_weight: ``[E, H]``, dtype of ``x`` (``nn.Linear`` layout), or float32 for bfloat16 /
            float16 ``x``: the logits are then computed in float32 from upcast ``x``.
        w1: ``[E, 2I, H]`` (gated: gate rows then up rows) or ``[E, I, H]``, dtype of ``x``.
        w2: ``[E, H, I]``, dtype of ``x``.
        top_k: experts per token, ``1..E``.
        gated: GLU expert (``act(gate) * up``) or plain two-layer FFN.
        activation: one of :data:`ACTIVATIONS` (see :func:`gated_activation`).
        normalize: divide each token's k weights by their sum (default True).
        scoring: ``"softmax"`` (default), ``"sigmoid"`` or ``"softmax_topk"`` (see :func:`route`).
        capacity_factor: None (dropless) or a finite number > 0; with routing from outside,
            ``C = ceil(capacity_factor * T * k / E)`` with ``k = topk_ids.shape[1]``.
        router_bias: optional ``[E]``, router_weight's dtype; b1: optional ``[E, 2I or I]``; b2:
            optional ``[E, H]``; dtype of ``x``.
        return_routing: also return a :class:`Routing`.
        topk_ids: ``[T, k]`` int32 / int64, the expert of each pick, in ``[0, E)``, or ``E``:
            HF's expert-parallel sentinel for an expert that is not local, which contributes
            zero (and takes no capacity). No expert twice in a row.
        topk_weights: ``[T, k]``, x's dtype or float32, the weight of each pick (differentiable).
        swiglu_limit, swiglu_alpha: the clamped SwiGLUs' L and alpha.
        selection_bias, num_groups, topk_groups, routed_scaling_factor: the routing options of
            :func:`route` (router form only).
        weight_on: ``"output"`` (the default: the pick weight scales the expert's output) or
            ``"input"`` (it scales the expert's input row; see :func:`combine`).

    Returns:
        ``y`` with the shape and dtype of ``x``, or ``(y, Routing)``.
    """
    gate_less = topk_ids is not None or topk_weights is not None
    router_weight, w1, w2 = split_weights(router_weight, w1, w2, gate_less=gate_less)
    normalize, scoring = router_options(normalize, scoring, gate_less=gate_less)
    validate(
        x, router_weight, w1, w2, top_k=top_k, gated=gated, activation=activation, scoring=scoring,
        capacity_factor=capacity_factor, router_bias=router_bias, b1=b1, b2=b2, normalize=normalize,
        topk_ids=topk_ids, topk_weights=topk_weights, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha,
        selection_bias=selection_bias, num_groups=num_groups, topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor, weight_on=weight_on,
    )
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, which holds no values for the reference to route; "
                         "flashmoe.moe(..., backend='native') infers the output shapes of meta tensors")
    hidden = x.shape[-1]
    num_experts = w1.shape[0]
    tokens = x.reshape(-1, hidden)
    num_tokens = tokens.shape[0]

    if gate_less:
        logits = None
        top_k = topk_ids.shape[1]
        weights = topk_weights.to(accumulate_dtype(x.dtype))
    else:
        logits = router_logits(tokens, router_weight, router_bias)
        topk_ids, weights = route(logits, top_k, scoring=scoring, normalize=normalize, selection_bias=selection_bias,
                                  num_groups=num_groups, topk_groups=topk_groups,
                                  routed_scaling_factor=routed_scaling_factor)
        topk_weights = weights
    flat_ids = topk_ids.reshape(-1).long()
    local = flat_ids < num_experts
    expert_counts = torch.bincount(flat_ids[local], minlength=num_experts).to(torch.int32)
    capacity = expert_capacity(capacity_factor, num_tokens, top_k, num_experts)
    admitted = admit(topk_ids, num_experts, capacity)
    dropped = (local & ~admitted.reshape(-1)).sum(dtype=torch.int64)

    y = combine(tokens, w1, w2, topk_ids, weights, admitted, gated=gated, activation=activation,
                b1=b1, b2=b2, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, weight_on=weight_on)
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
    swiglu_limit: Optional[float] = None,
    swiglu_alpha: Optional[float] = None,
    weight_on: str = "output",
) -> Tensor:
    """Expert FFNs of the admitted picks and their weighted sum, for a fixed routing.

    ``y[t] = sum_j admitted[t, j] * topk_weights[t, j] * f_{topk_ids[t, j]}(tokens[t])`` in
    ascending j, accumulated in float32 (float64 for float64 tokens). With ``weight_on="input"``
    the weight scales the expert's input instead: ``y[t] = sum_j admitted[t, j] *
    f_{topk_ids[t, j]}(round(tokens[t] * topk_weights[t, j]))``, the product in float32 (float64)
    rounded once to ``tokens``' dtype. Differentiable in every float argument, which is what the
    native op's backward recomputes through.

    Args:
        tokens: ``[T, H]`` float dtype.
        w1, w2, b1, b2, swiglu_limit, swiglu_alpha: as in :func:`moe`, dtype of ``tokens``.
        topk_ids: ``[T, k]`` integer, experts of the picks (``E``: the sentinel, never admitted).
        topk_weights: ``[T, k]`` float, weights of the picks.
        admitted: ``[T, k]`` bool, from :func:`admit`.
        weight_on: one of :data:`WEIGHT_ON`.

    Returns:
        ``[T, H]`` in ``tokens``' dtype.
    """
    check_choice("weight_on", weight_on, WEIGHT_ON)
    num_tokens, hidden = tokens.shape
    num_experts, top_k = w1.shape[0], topk_ids.shape[1]
    accumulate = accumulate_dtype(tokens.dtype)
    expert_outputs, admitted_picks = [], []
    for expert, expert_picks in picks_by_expert(topk_ids, admitted, num_experts):
        expert_tokens = tokens.index_select(0, torch.div(expert_picks, top_k, rounding_mode="floor"))
        if weight_on == "input":
            pick_weights = topk_weights.reshape(-1).index_select(0, expert_picks).to(accumulate)
            expert_tokens = (expert_tokens.to(accumulate) * pick_weights[:, None]).to(tokens.dtype)
        out = expert_ffn(
            expert_tokens, w1[expert], w2[expert], gated=gated, activation=activation,
            b1=None if b1 is None else b1[expert], b2=None if b2 is None else b2[expert],
            swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha,
        )
        expert_outputs.append(out.to(accumulate))
        admitted_picks.append(expert_picks)

    # pick_outputs[t, j] = f_{e_j}(x[t]) for admitted picks, 0 for dropped ones.
    pick_outputs = torch.zeros(num_tokens * top_k, hidden, dtype=accumulate, device=tokens.device)
    if expert_outputs:
        pick_outputs = pick_outputs.index_copy(0, torch.cat(admitted_picks), torch.cat(expert_outputs))
    pick_outputs = pick_outputs.reshape(num_tokens, top_k, hidden)
    if weight_on == "input":  # the weight went into the expert's input: combine with 1
        combine_weights = admitted.to(accumulate)
    else:
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
