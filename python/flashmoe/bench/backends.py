"""Backend names accepted by --backend, and how each one is built for a problem.

A builder takes a MoEProblem and returns a runner: runner(i) computes the layer
on the problem's i-th rotating input. Building may do setup work that is not
timed (the floor repeats its inputs there).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from . import baselines, hf_blocks
from .problem import MoEProblem

Runner = Callable[[int], torch.Tensor]
FLOOR_BACKEND = "dense-matmul-floor"
COPY_FLOOR_BACKEND = "d2d-copy-floor"
FLOOR_BACKENDS = (FLOOR_BACKEND, COPY_FLOOR_BACKEND)
REFERENCE_BACKEND = "reference"
GROUPED_MM_BACKEND = "grouped-mm"
# Pure-PyTorch loops that --baseline-max-tokens may skip at large T.
SLOW_BASELINES = (REFERENCE_BACKEND, "expert-loop")


class BackendUnavailable(RuntimeError):
    """The backend cannot run in this installation (not built, too old a torch)."""


class Unsupported(RuntimeError):
    """The backend cannot run this shape's options (its row says 'skipped' and why)."""


def require_plain_layer(problem: MoEProblem, who: str) -> None:
    """Peers written for a plain top-k router and elementwise activations refuse the rest by name."""
    features = problem.shape.extra_features()
    if features:
        raise Unsupported(f"{who} cannot run {problem.shape.name}: {', '.join(features)}")


def _flashmoe_native(problem: MoEProblem) -> Runner:
    from flashmoe import moe

    weights, options = problem.weights, problem.moe_options()
    return lambda index: moe(problem.inputs[index], weights.router_weight, weights.w1, weights.w2,
                             backend="native", **options)


def _flashmoe_reference(problem: MoEProblem) -> Runner:
    try:
        from flashmoe import reference
    except ImportError as error:
        raise BackendUnavailable(f"reference backend unavailable: {error}") from None
    weights, options = problem.weights, problem.moe_options()
    return lambda index: reference.moe(problem.inputs[index], weights.router_weight, weights.w1,
                                       weights.w2, **options)


def _baseline(function, who: str) -> Callable[[MoEProblem], Runner]:
    def build(problem: MoEProblem) -> Runner:
        require_plain_layer(problem, who)
        weights, options = problem.weights, problem.moe_options()
        return lambda index: function(problem.inputs[index], weights.router_weight, weights.w1,
                                      weights.w2, **options)
    return build


def _grouped_mm(problem: MoEProblem) -> Runner:
    if not baselines.grouped_mm_available():
        raise BackendUnavailable(f"grouped-mm unavailable: torch {torch.__version__} has no torch._grouped_mm")
    return _baseline(baselines.grouped_mm_moe, GROUPED_MM_BACKEND)(problem)


def _copy_floor(problem: MoEProblem) -> Runner:
    if problem.weight_bytes_touched is None:
        raise BackendUnavailable("the copy floor needs the problem's weight_bytes_touched")
    return baselines.CopyFloor(problem.weight_bytes_touched, problem.inputs[0].device)


def _dense_matmul_floor(problem: MoEProblem) -> Runner:
    shape, weights = problem.shape, problem.weights
    return baselines.DenseMatmulFloor(problem.inputs, weights.router_weight, weights.w1, weights.w2,
                                      top_k=shape.top_k, gated=shape.gated, activation=shape.activation,
                                      shared_w1=weights.shared_w1, shared_w2=weights.shared_w2,
                                      shared_gate=weights.shared_gate)


BACKENDS: Dict[str, Callable[[MoEProblem], Runner]] = {
    "native": _flashmoe_native,
    REFERENCE_BACKEND: _flashmoe_reference,
    "expert-loop": _baseline(baselines.expert_loop_moe, "expert-loop"),
    GROUPED_MM_BACKEND: _grouped_mm,
    **{name: hf_blocks.runner(name) for name in hf_blocks.HF_BACKENDS},
}

BACKEND_HELP = {
    "native": "flashmoe.moe(backend='native'): the fused op (CPU dataflow runtime, or the CUDA kernel "
              "on a GPU)",
    REFERENCE_BACKEND: "flashmoe.reference.moe: the pure-PyTorch specification",
    "expert-loop": "a Python loop over the hit experts, written in bench/baselines.py (not HF's code)",
    GROUPED_MM_BACKEND: "sort by expert + torch._grouped_mm (where torch has it)",
    "hf-eager": "transformers' own block of the shape (OlmoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, "
                "MixtralSparseMoeBlock, DeepseekV3MoE, GptOssMLP, Qwen3NextSparseMoeBlock, Llama4TextMoe) on "
                "flashmoe's weights, experts_implementation='eager'",
    "hf-grouped-mm": "the same HF block, experts_implementation='grouped_mm'",
    "hf-sonicmoe": "the same HF block, experts_implementation='sonicmoe' (CUDA, where installed)",
    "hf-deepgemm": "the same HF block, experts_implementation='deepgemm' (CUDA, where installed)",
    "hf-flashmoe": "the same HF block, experts_implementation='flashmoe' (flashmoe.hf: HF routes, the op "
                   "runs the experts)",
}


def build_runner(backend: str, problem: MoEProblem) -> Runner:
    if backend == FLOOR_BACKEND:
        return _dense_matmul_floor(problem)
    if backend == COPY_FLOOR_BACKEND:
        return _copy_floor(problem)
    return BACKENDS[backend](problem)
