"""The ``all_to_all`` transport: the bulk-synchronous formulation every EP framework uses.

Per call: route locally, exchange the per-cell row counts, exchange the rows with
``all_to_all_single``, run the local experts on what arrived, send the outputs back, and combine
in the contract's order. The three native steps (``_C.route_tokens``, ``_C.run_expert_rows``,
``_C.combine_tokens``) share their arithmetic with the dataflow runtime, so the output is the
same bits as the symmetric transport's and the single-process operator's. It needs only
collectives, so it works on any backend (gloo, NCCL) and across hosts.

CUDA tensors (the fallback of ``"auto"`` where the nvshmem transport cannot run): the native steps
are the CPU's, so the call computes on CPU copies and returns to the device; its bits are those of
single-process ``flashmoe.moe`` on the CPU, not of the CUDA kernel. The exchanges go through the
group's backend on its device (CUDA for NCCL).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import _C
from ..ops import _address, _empty_outputs, _problem, selection_bias_values
from ..reference import accumulate_dtype


def _weighted_rows(rows, pick_row, topk_weights, admitted):
    """weight_on="input": each admitted row x[t] becomes round(x[t] · w[t, j]), the product in the
    accumulation dtype, as cpu/source_steps.h dispatch_row computes it for the dataflow runtime."""
    picks = torch.empty(admitted, dtype=torch.int64)
    routed = (pick_row >= 0).nonzero().flatten()
    picks[pick_row[routed].long()] = routed
    weights = topk_weights.flatten()[picks].unsqueeze(1)
    return (rows.to(accumulate_dtype(rows.dtype)) * weights).to(rows.dtype)


def exchange_device(group, tensor: torch.Tensor) -> torch.device:
    """Where the group's backend exchanges: the current CUDA device for NCCL, else the CPU (gloo, or
    a mixed "cpu:gloo,cuda:nccl" group for CPU tensors), or the tensor's own device when it is a CUDA
    tensor on a backend that takes them."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if tensor.device.type == "cuda" and "nccl" in backend:
        return tensor.device
    return torch.device("cpu")


def exchange_rows(output: torch.Tensor, send: torch.Tensor, output_rows: list, send_rows: list, group) -> None:
    """all_to_all_single of [rows, ...] tensors as bytes, so every dtype travels on every backend."""
    device = exchange_device(group, send)
    staged = output if output.device == device else torch.empty(output.shape, dtype=output.dtype, device=device)
    with _named_failure("rows"):
        dist.all_to_all_single(_as_bytes(staged), _as_bytes(send.to(device)), output_split_sizes=output_rows,
                               input_split_sizes=send_rows, group=group)
    if staged is not output:
        output.copy_(staged)


@contextlib.contextmanager
def _named_failure(what: str):
    """A failed exchange (a peer died or raised, or the group's timeout passed) names this rank and the wait."""
    try:
        yield
    except RuntimeError as error:
        raise RuntimeError(f"flashmoe.distributed: rank {dist.get_rank()} failed exchanging {what} with its peers "
                           f"(all_to_all transport; a peer died, raised or stopped calling): {error}") from error


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    row_bytes = rows.stride(0) * rows.element_size() if rows.dim() > 1 else rows.element_size()
    return rows.view(torch.uint8).view(rows.shape[0], row_bytes) if rows.numel() else \
        torch.empty((rows.shape[0], row_bytes), dtype=torch.uint8, device=rows.device)


def exchange_counts(send_counts: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """send_counts [W, n] int64 (n per peer) -> what every peer sent this rank, [W, n] (on send_counts' device)."""
    device = exchange_device(group, send_counts)
    send = send_counts.contiguous().to(device)
    received = torch.empty_like(send)
    with _named_failure("row counts"):
        dist.all_to_all_single(received, send, group=group)
    return received.to(send_counts.device).view(world_size, -1)


def _on_cpu(tensor):
    return None if tensor is None else tensor.cpu()


def forward(context, x, router_weight, w1, w2, router_bias, b1, b2, capacity_factor, selection_bias=None,
            shared=(None, None, None)):
    if x.device.type != "cpu":  # the native steps are the CPU's: compute on copies, return to the device
        outputs = forward(context, *map(_on_cpu, (x, router_weight, w1, w2, router_bias, b1, b2)), capacity_factor,
                          _on_cpu(selection_bias), tuple(map(_on_cpu, shared)))
        return tuple(output.to(x.device) for output in outputs)
    config, group = context.config, context.group
    world, local, top_k = context.world_size, context.local_experts, config.top_k
    tokens, experts = x.shape[0], config.num_experts
    shared_w1, shared_w2, shared_gate = shared
    outputs = _empty_outputs(x, router_weight, top_k)
    y, topk_ids, topk_weights, expert_counts, router_logits, dropped = outputs
    bias_values = selection_bias_values(selection_bias, x)  # held until route_tokens returns
    problem = _problem(x, w1, router_weight, router_bias, b1, b2, top_k, config.gated, config.activation,
                       config.normalize, config.scoring, capacity_factor, shared_w1=shared_w1, shared_gate=shared_gate,
                       selection_bias=bias_values, num_groups=config.num_groups, topk_groups=config.topk_groups,
                       routed_scaling_factor=config.routed_scaling_factor, weight_on=config.weight_on,
                       **config.activation_options())
    expert_offsets = torch.empty(experts + 1, dtype=torch.int64)
    pick_row = torch.empty(tokens * top_k, dtype=torch.int32)
    row_token = torch.empty(tokens * top_k, dtype=torch.int32)
    _C.route_tokens(problem=problem, x=_address(x), router_weight=_address(router_weight),
                    router_bias=_address(router_bias), topk_ids=_address(topk_ids), topk_weights=_address(topk_weights),
                    expert_counts=_address(expert_counts), router_logits=_address(router_logits),
                    dropped=_address(dropped), expert_offsets=_address(expert_offsets), pick_row=_address(pick_row),
                    row_token=_address(row_token), threads=context.threads, selection_bias=_address(bias_values))
    # Rows of this source per cell (owner o, local expert l), in expert order = owner-major order.
    cell_rows = expert_offsets.diff().view(world, local)
    received_cells = exchange_counts(cell_rows, group, world)  # [source, local expert]
    send_rows = cell_rows.sum(dim=1).tolist()
    receive_rows = received_cells.sum(dim=1).tolist()
    admitted = int(expert_offsets[-1])
    send = x[row_token[:admitted].long()]
    if config.weight_on == "input":
        send = _weighted_rows(send, pick_row, topk_weights, admitted)
    received = x.new_empty((sum(receive_rows), x.shape[1]))
    exchange_rows(received, send, receive_rows, send_rows, group)
    expert_out = torch.empty_like(received)
    _C.run_expert_rows(problem=problem, w1=_address(w1), b1=_address(b1), w2=_address(w2), b2=_address(b2),
                       rows=_address(received), cell_rows=received_cells.flatten().tolist(), local_experts=local,
                       out=_address(expert_out), threads=context.threads)
    home = torch.empty_like(send)
    exchange_rows(home, expert_out, send_rows, receive_rows, group)
    shared_rows = _shared_rows(context, problem, x, shared_w1, shared_w2)
    _C.combine_tokens(problem=problem, tokens=tokens, pick_row=_address(pick_row), topk_weights=_address(topk_weights),
                      rows_home=_address(home), y=_address(y), threads=context.threads, x=_address(x),
                      shared_rows=_address(shared_rows), shared_gate=_address(shared_gate))
    return outputs


def _shared_rows(context, problem, x, shared_w1, shared_w2):
    """The replicated shared expert's output of every local token [T, H], computed here with no
    exchange: run_expert_rows with the shared weights as the one local expert of one cell holding
    x, so its tiles are the dataflow's (and the single-process op's) to the bit. None without one."""
    if shared_w1 is None:
        return None
    shared = _C.Problem()
    for name in ("tokens", "hidden", "gated", "activation", "dtype", "swiglu_limit", "swiglu_alpha"):
        setattr(shared, name, getattr(problem, name))
    shared.ffn, shared.experts, shared.top_k = problem.shared_ffn, 1, 1
    out = torch.empty_like(x)
    _C.run_expert_rows(problem=shared, w1=_address(shared_w1), b1=0, w2=_address(shared_w2), b2=0, rows=_address(x),
                       cell_rows=[x.shape[0]], local_experts=1, out=_address(out), threads=context.threads)
    return out
