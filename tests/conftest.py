"""Shared helpers of the flashmoe operator tests (imported as ``from conftest import ...``).

Random problems are built from a seeded ``torch.Generator``, never zeros, with weights scaled
so that router logits have std ~1 (routing is not tied) and expert activations stay O(1).
The reference side always runs :func:`flashmoe.reference.moe` on float64 copies.
"""

from __future__ import annotations

import faulthandler
import math
import os
import tempfile

import pytest

# Compiled graphs go to a fresh cache: torch's on-disk inductor cache does not key on a custom op's
# schema, so graphs compiled against an older flashmoe would otherwise be replayed.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="flashmoe-inductor-"))

import torch  # noqa: E402

# tests/test_cpp.py::test_python_subset_asan runs a pytest subset in a child process against an
# ASan + UBSan build of the extension: it stands in for flashmoe._C before flashmoe is imported.
if os.environ.get("FLASHMOE_SANITIZED_C"):
    import importlib.machinery
    import importlib.util
    import sys

    _path = os.environ["FLASHMOE_SANITIZED_C"]
    _spec = importlib.util.spec_from_file_location(
        "flashmoe._C", _path, loader=importlib.machinery.ExtensionFileLoader("flashmoe._C", _path))
    sys.modules["flashmoe._C"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["flashmoe._C"])

import flashmoe  # noqa: E402
from flashmoe import _C, reference  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# DESIGN.md "Checks": ||y - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-12}

# Relative score gap under which two picks count as tied "within rounding". The router logits
# are accumulated in fp32 for every compute dtype but float64 (bf16/fp16 products are exact),
# so rounding is fp32's: eps * a sqrt(H)-ish factor, with margin.
TIE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}

_DTYPE_CODES = {torch.float32: _C.DType.f32, torch.bfloat16: _C.DType.bf16,
                torch.float16: _C.DType.f16, torch.float64: _C.DType.f64}
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}

OPTION_NAMES = ("top_k", "gated", "activation", "normalize", "scoring", "capacity_factor")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm()).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in _BITS:
        return torch.equal(a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))
    return torch.equal(a, b)


def make_problem(seed: int, *, tokens: int, hidden: int, ffn: int, experts: int, gated: bool = True,
                 dtype: torch.dtype = torch.float32, router_bias: bool = False, expert_bias: bool = False,
                 router_std: float = 1.0, top_k: int | None = None, scoring: str = "softmax",
                 tie_rtol: float | None = None) -> dict:
    """Random inputs of flashmoe.moe as a dict (x, router_weight, w1, w2 and any biases).

    Logits have std ~router_std; w1/w2 have std 1/sqrt(fan_in). When ``top_k`` is given, the
    router weight is redrawn (up to 50 times) until no token has its k-th and (k+1)-th scores
    tied within ``tie_rtol`` (default :data:`TIE_RTOL`), so routing is comparable exactly between
    precisions (and, with a large ``tie_rtol``, stable under gradcheck's perturbations).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    rows = 2 * ffn if gated else ffn
    problem = dict(x=randn(tokens, hidden, std=1.0))
    problem.update(
        router_weight=randn(experts, hidden, std=router_std / math.sqrt(hidden)),
        w1=randn(experts, rows, hidden, std=1.0 / math.sqrt(hidden)),
        w2=randn(experts, hidden, ffn, std=1.0 / math.sqrt(ffn)),
    )
    if router_bias:
        problem["router_bias"] = randn(experts, std=0.5)
    if expert_bias:
        problem["b1"] = randn(experts, rows, std=0.3)
        problem["b2"] = randn(experts, hidden, std=0.3)
    if top_k is not None and top_k < experts:
        for _ in range(50):
            rtol = TIE_RTOL[dtype] if tie_rtol is None else tie_rtol
            if not boundary_ties(reference_logits(problem), top_k, scoring, rtol).any():
                break
            problem["router_weight"] = randn(experts, hidden, std=router_std / math.sqrt(hidden))
        else:
            raise AssertionError("could not draw an untied router; use fewer tokens or experts")
    return problem


def double(problem: dict) -> dict:
    return {name: tensor.double() for name, tensor in problem.items()}


def reference_logits(problem: dict) -> torch.Tensor:
    return reference.router_logits(problem["x"].double(), problem["router_weight"].double(),
                                   None if problem.get("router_bias") is None else problem["router_bias"].double())


def scores_of(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = logits.double()
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def _gaps(logits, scoring):
    ordered = scores_of(logits, scoring).sort(dim=-1, descending=True).values
    return (ordered[:, :-1] - ordered[:, 1:]) / ordered[:, :-1].abs().clamp_min(1e-300)


def boundary_ties(logits: torch.Tensor, top_k: int, scoring: str, rtol: float) -> torch.Tensor:
    """[T] bool: the k-th and (k+1)-th best scores differ by less than rtol (relative)."""
    if top_k >= logits.shape[-1]:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    return _gaps(logits, scoring)[:, top_k - 1] < rtol


def inner_ties(logits: torch.Tensor, top_k: int, scoring: str, rtol: float) -> torch.Tensor:
    """[T] bool: two of the k best scores are adjacent within rtol (the pick order may swap)."""
    if top_k < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    return (_gaps(logits, scoring)[:, : top_k - 1] < rtol).any(dim=-1)


def run_reference(problem: dict, **options):
    """reference.moe on float64 copies, with the routing."""
    return reference.moe(**double(problem), return_routing=True, **options)


def run_native(problem: dict, **options):
    return flashmoe.moe(**problem, return_routing=True, backend="native", **options)


def check_nan_token_stays_in_its_row(run, *, gated: bool, activation: str, dtype: torch.dtype) -> None:
    """One token with a NaN: its y is all NaN, no other row sees it, its picks stay distinct and in
    range, and the other rows match the float64 reference. ``run(problem, **options)`` returns
    (y, Routing) on the CPU: the native CPU kernel, or the CUDA one."""
    tokens, bad = 100, 41
    problem = make_problem(7, tokens=tokens, hidden=67, ffn=45, experts=8, gated=gated, dtype=dtype, top_k=2)
    x = problem["x"].clone()
    x[bad, 10] = float("nan")
    problem["x"] = x
    y, routing = run(problem, top_k=2, gated=gated, activation=activation)
    assert y[bad].isnan().all(), "a NaN token must give NaN, not a finite number"
    others = torch.arange(tokens) != bad
    assert torch.isfinite(y[others]).all(), "a NaN in one token leaked into other tokens"
    ids = routing.topk_ids.long()
    assert ((ids >= 0) & (ids < 8)).all()
    assert routing.topk_ids[bad, 0] != routing.topk_ids[bad, 1]
    clean = dict(problem, x=x[others].contiguous())
    ref_y = run_reference(clean, top_k=2, gated=gated, activation=activation)[0]
    assert rel_err(y[others], ref_y) <= TOLERANCE[dtype]


def assert_routing_matches(routing, ref_routing, problem, *, top_k, scoring="softmax", normalize=True,
                           capacity_factor=None):
    """topk_ids exactly (tied rows excepted), weights, logits, counts, dropped and admitted set."""
    dtype = problem["x"].dtype
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    tokens, experts = problem["x"].shape[0], problem["router_weight"].shape[0]
    assert routing.topk_ids.dtype == torch.int32 and routing.topk_ids.shape == (tokens, top_k)
    assert routing.topk_weights.dtype == accumulate and routing.topk_weights.shape == (tokens, top_k)
    assert routing.router_logits.dtype == accumulate and routing.router_logits.shape == (tokens, experts)
    assert routing.expert_counts.dtype == torch.int32 and routing.expert_counts.shape == (experts,)
    assert routing.dropped.dtype == torch.int64 and routing.dropped.dim() == 0

    logit_scale = ref_routing.router_logits.abs().max().clamp_min(1.0).item()
    logit_tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(routing.router_logits.double(), ref_routing.router_logits, rtol=0,
                               atol=logit_tol * logit_scale)

    rtol = TIE_RTOL[dtype]
    boundary = boundary_ties(ref_routing.router_logits, top_k, scoring, rtol)
    inner = inner_ties(ref_routing.router_logits, top_k, scoring, rtol)
    exact = ~(boundary | inner)
    assert torch.equal(routing.topk_ids[exact], ref_routing.topk_ids[exact]), "topk_ids differ on untied rows"
    same_set = ~boundary
    assert torch.equal(routing.topk_ids[same_set].sort(dim=-1).values,
                       ref_routing.topk_ids[same_set].sort(dim=-1).values)
    ids = routing.topk_ids.long()
    assert ids.numel() == 0 or (ids.min() >= 0 and ids.max() < experts)
    assert ids.numel() == 0 or (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "a token picked an expert twice"
    weight_tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(routing.topk_weights[~boundary].double(), ref_routing.topk_weights[~boundary],
                               rtol=weight_tol, atol=weight_tol)

    if boundary.any():
        return  # counts and admission legitimately follow the (different) tied picks
    assert torch.equal(routing.expert_counts, ref_routing.expert_counts)
    assert int(routing.dropped) == int(ref_routing.dropped)
    capacity = reference.expert_capacity(capacity_factor, tokens, top_k, experts)
    native_admitted = reference.admit(routing.topk_ids, experts, capacity)
    ref_admitted = reference.admit(ref_routing.topk_ids, experts, capacity)
    if inner.any():  # a swapped order inside a token does not change which picks are admitted
        order_native = routing.topk_ids.long().argsort(dim=-1)
        order_ref = ref_routing.topk_ids.long().argsort(dim=-1)
        native_admitted = native_admitted.gather(1, order_native)
        ref_admitted = ref_admitted.gather(1, order_ref)
    assert torch.equal(native_admitted, ref_admitted), "the set of admitted picks differs"
    assert int((~native_admitted).sum()) == int(routing.dropped)


# --------------------------------------------------------------------------- raw native entry

def native_problem(tokens, hidden, ffn, experts, dtype, *, top_k, gated=True, activation="silu", normalize=True,
                   scoring="softmax", capacity_factor=None, router_bias=False, b1=False, b2=False):
    """A filled ``_C.Problem`` (written here, independently of flashmoe.ops)."""
    problem = _C.Problem()
    problem.tokens, problem.hidden, problem.ffn, problem.experts = tokens, hidden, ffn, experts
    problem.top_k, problem.gated, problem.normalize = top_k, gated, normalize
    problem.activation = getattr(_C.Activation, activation)
    problem.scoring = getattr(_C.Scoring, scoring)
    problem.dtype = _DTYPE_CODES[dtype]
    problem.expert_capacity = -1 if capacity_factor is None else _C.expert_capacity(capacity_factor, tokens, top_k,
                                                                                     experts)
    problem.has_router_bias, problem.has_b1, problem.has_b2 = router_bias, b1, b2
    return problem


def empty_outputs(problem: dict, top_k: int, *, poison: bool = False) -> dict:
    """Output buffers for _C.moe_forward_cpu; poisoned with NaN / -7 when asked."""
    x = problem["x"]
    tokens, experts = x.shape[0], problem["router_weight"].shape[0]
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    outputs = dict(
        y=torch.empty_like(x), topk_ids=torch.empty(tokens, top_k, dtype=torch.int32),
        topk_weights=torch.empty(tokens, top_k, dtype=accumulate), expert_counts=torch.empty(experts, dtype=torch.int32),
        router_logits=torch.empty(tokens, experts, dtype=accumulate), dropped=torch.empty((), dtype=torch.int64),
    )
    if poison:
        for name in ("y", "topk_weights", "router_logits"):
            outputs[name].fill_(float("nan"))
        for name in ("topk_ids", "expert_counts", "dropped"):
            outputs[name].fill_(-7)
    return outputs


def call_native_raw(problem: dict, *, top_k, gated=True, activation="silu", normalize=True, scoring="softmax",
                    capacity_factor=None, num_threads=1, outputs=None) -> dict:
    """Runs flashmoe._C.moe_forward_cpu directly; returns the dict of output tensors."""
    x = problem["x"]
    hidden = x.shape[1]
    experts = problem["router_weight"].shape[0]
    ffn = problem["w2"].shape[2]
    descriptor = native_problem(x.shape[0], hidden, ffn, experts, x.dtype, top_k=top_k, gated=gated,
                                activation=activation, normalize=normalize, scoring=scoring,
                                capacity_factor=capacity_factor, router_bias="router_bias" in problem,
                                b1="b1" in problem, b2="b2" in problem)
    outputs = empty_outputs(problem, top_k) if outputs is None else outputs
    for tensor in list(problem.values()) + list(outputs.values()):
        assert tensor.is_contiguous()

    _C.moe_forward_cpu(problem=descriptor, **raw_addresses(problem, outputs), num_threads=num_threads)
    return outputs


def raw_addresses(problem: dict, outputs: dict) -> dict:
    """The tensor arguments of the raw _C entries (moe_forward_cpu / moe_forward_cuda) as addresses,
    0 for an input or output the dicts do not hold."""
    named = {**problem, **outputs}
    names = ("x", "router_weight", "router_bias", "w1", "b1", "w2", "b2", "y", "topk_ids", "topk_weights",
             "expert_counts", "router_logits", "dropped")
    return {name: named[name].data_ptr() if name in named else 0 for name in names}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def watchdog():
    """Turns a hang into a loud failure: dumps every thread's stack and exits after 120 s."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def exact_fp32():
    """fp32 runs with exact fp32 math (the CUDA tests' default; a test may ask for TF32 after it);
    torch's global flag is restored."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def num_threads():
    """Restores torch's intra-op thread count after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)
