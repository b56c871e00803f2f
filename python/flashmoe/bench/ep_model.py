"""A cost model of the expert-parallel (EP) layer, from its design: PREDICTIONS ONLY.

    python -m flashmoe.bench.ep_model               # the EP8 table and the RDMA and imbalance tables
    python -m flashmoe.bench.ep_model --markdown    # the tables of docs/performance.md (a test keeps them equal)

Nothing here was measured, and no GPU has ever run flashmoe. The per-GPU inputs (peaks, latencies,
tile ceilings, the scheduler's cost per task, the gate and combine) come from the single-GPU model
`flashmoe.bench.model`; this module adds what W ranks add: the bytes each rank moves (counted from
docs/protocol.md §2 and §3), the links they cross, and how the persistent kernel overlaps them with
the expert GEMMs. docs/performance.md gives the formulas, every input's source, and which benchmark
row would falsify each line.

Times are in microseconds inside the model; the tables print milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import model
from .configs import NAMED_CONFIGS, LayerShape

SIGNAL_WORD_BYTES = 8  # one SignalWord (csrc/core/signal_word.h): a uint64 NVSHMEM signal


@dataclass(frozen=True)
class LinkAssumptions:
    """What the EP model assumes beyond flashmoe.bench.model.Device (none of it measured here)."""

    # One put + its SignalWord seen by the peer's poll: st.release.sys after vector stores over NVLink.
    nvlink_latency_us: float = 1.0
    # The same over InfiniBand with nvshmemx_putmem_signal_nbi (IBGDA: the GPU thread builds the WQE
    # and rings the doorbell; NIC, one switch hop, the remote NIC's write, the signal's write).
    rdma_latency_us: float = 3.0
    # Share of the NIC's 50 GB/s an all-to-all reaches: DeepEP's README measures 43-47 GB/s
    # ("bottleneck bandwidth") on CX7 400 Gb/s, H800, EP16 and EP32; 43/50.
    rdma_efficiency: float = 0.86
    # A GPU thread posting one put_signal_nbi (WQE build + doorbell): the NVSHMEM best-practice guide
    # says a GPU thread fills a WQE more slowly than a CPU; no figure is published; assumed.
    rdma_post_us: float = 1.0
    # What one SM's vector stores to a peer over NVLink sustain: ~32 KiB in flight per SM over a
    # ~1.5 us store round trip through NVSwitch (Little's law). The SMs that copy rows out are not
    # computing: the overlapped layer charges these SM-seconds to the experts. Assumed.
    sm_store_gbps: float = 20.0
    # Bulk-synchronous layer (Megatron-like): kernels launched per layer (gate, top-k, permute,
    # all-to-all, GEMM0, activation, GEMM1, all-to-all, unpermute/combine) and the host sync that
    # reads the split sizes before the first all-to-all.
    bsp_launches: int = 9
    bsp_host_sync_us: float = 15.0


ASSUMPTIONS = LinkAssumptions()

# TF32 dense peak of the H100 SXM (datasheet: 989 TFLOP/s with sparsity, half dense): the FlashMoE
# paper ran FP32 (TF32 tensor cores, per its public README), so "paper precision" rows use it.
TF32_TFLOPS = 494.5


@dataclass(frozen=True)
class Topology:
    """W ranks in nodes of gpus_per_node GPUs: NVLink inside a node, one NIC per GPU across nodes."""

    name: str
    world: int
    gpus_per_node: int
    description: str


TOPOLOGIES: Dict[str, Topology] = {t.name: t for t in (
    Topology("1x8-nvlink", 8, 8, "one node, 8 GPUs on NVSwitch"),
    Topology("2x8-rdma", 16, 8, "2 nodes x 8 GPUs: NVLink inside a node, a 400 Gb/s NIC per GPU across"),
    Topology("8x1-rdma", 8, 1, "8 nodes x 1 GPU: every peer over the NIC"),
)}

# Kernel designs: which tile computes the experts and how tasks are handed out.
#   today:   main's kernel: 64x64 reference tiles (3 CTAs per SM) and main's scheduler (one thread,
#            rounds of kDrainPerRound messages: model's "sched-v2", now on main);
#   planned: issue 10's Hopper tile (hopper-128x256-ws4, one CTA per SM) and ticket claims.
DESIGNS = ("today", "planned")


def _check(shape: LayerShape, tokens: int, world: int, gpus_per_node: Optional[int], hot_factor: float) -> None:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world_size must be a positive int, got {world!r}")
    if shape.num_experts % world:
        raise ValueError(f"world_size={world} must divide num_experts={shape.num_experts} "
                         f"(each rank owns E / W experts)")
    if tokens < 0:
        raise ValueError(f"tokens (per rank) must be >= 0, got {tokens}")
    if gpus_per_node is not None and (gpus_per_node < 1 or (world > gpus_per_node and world % gpus_per_node)):
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1 and divide world_size={world} "
                         f"when the world spans nodes")
    k = min(shape.top_k, shape.num_experts)
    if not 1.0 <= hot_factor <= shape.num_experts / k:
        raise ValueError(f"hot_factor must lie in [1, E/k = {shape.num_experts / k:g}] (an expert gets at "
                         f"most every token once), got {hot_factor}")


def hot_rank_share(shape: LayerShape, world: int, hot_factor: float) -> float:
    """The hottest rank's rows over the mean rank's, when one expert gets hot_factor x the mean
    rows and the other E - 1 share the rest evenly: (f + (L - 1)(E - f)/(E - 1)) / L."""
    e, local = shape.num_experts, shape.num_experts // world
    if e == 1:
        return 1.0
    return (hot_factor + (local - 1) * (e - hot_factor) / (e - 1)) / local


def ep_bytes(shape: LayerShape, tokens: int, world: int, gpus_per_node: Optional[int] = None,
             element: int = model.ELEMENT) -> Dict[str, float]:
    """Bytes one rank sends each way per call under uniform routing (protocol.md §2-§3), split by
    link. Dispatch: a row of H elements for every pick whose owner is another rank, (W-1)/W of
    T·k, plus one SignalWord per (peer owner, local expert), rows = 0 included. Combine: the same
    rows come back (the owner's GEMM1 output) and one return SignalWord per cell. A rank's links
    carry its own dispatch out and, as an owner, the returns of what it received: under uniform
    routing both directions carry dispatch + combine."""
    _check(shape, tokens, world, gpus_per_node, 1.0)
    node = world if gpus_per_node is None else min(gpus_per_node, world)
    picks = tokens * min(shape.top_k, shape.num_experts)
    local_experts = shape.num_experts // world
    row = shape.hidden_size * element
    out: Dict[str, float] = {}
    for link, peers in (("nvlink", node - 1), ("rdma", world - node)):
        rows = picks * peers / world
        flags = local_experts * peers
        out[f"{link}_rows"] = rows
        out[f"{link}_dispatch"] = rows * row + flags * SIGNAL_WORD_BYTES
        out[f"{link}_combine"] = rows * row + flags * SIGNAL_WORD_BYTES
        out[f"{link}_flags"] = 2.0 * flags
    out["dispatch"] = out["nvlink_dispatch"] + out["rdma_dispatch"]
    out["combine"] = out["nvlink_combine"] + out["rdma_combine"]
    out["per_direction"] = out["dispatch"] + out["combine"]
    out["cross_node_fraction"] = (world - node) / world
    return out


def _rates(device: model.Device, assumptions: LinkAssumptions) -> Tuple[float, float]:
    """Bytes per us each way: NVLink (SM-driven stores through NVSwitch) and the NIC."""
    return (device.nvlink_gbps * device.nvlink_efficiency * 1e3,
            device.rdma_gbps * assumptions.rdma_efficiency * 1e3)


def ep_layer(device: model.Device, shape: LayerShape, tokens: int, world: int, design: str = "planned",
             gpus_per_node: Optional[int] = None, hot_factor: float = 1.0, element: int = model.ELEMENT,
             peak_tflops: Optional[float] = None,
             assumptions: LinkAssumptions = ASSUMPTIONS) -> Dict[str, float]:
    """One EP layer call on the hottest rank, T tokens per rank, in us: its parts, the layer
    overlapped (the persistent kernel's dataflow) and serialized (bulk-synchronous, the same tile)."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    _check(shape, tokens, world, gpus_per_node, hot_factor)
    if peak_tflops is not None:
        device = dataclasses.replace(device, bf16_tflops=peak_tflops)
    h, i, e = shape.hidden_size, shape.ffn_size, shape.num_experts
    k = min(shape.top_k, e)
    local_experts = e // world
    share = hot_rank_share(shape, world, hot_factor)
    nvlink_rate, rdma_rate = _rates(device, assumptions)
    moved = ep_bytes(shape, tokens, world, gpus_per_node, element)
    parts: Dict[str, float] = {}

    # Links. The hottest rank sends its own dispatch (1x) and returns share x the mean; it receives
    # share x the dispatch and 1x the returns: each direction carries (1 + share)/2 x dispatch+combine.
    scale = (1.0 + share) / 2.0
    nvlink_us = scale * (moved["nvlink_dispatch"] + moved["nvlink_combine"]) / nvlink_rate
    rdma_us = scale * (moved["rdma_dispatch"] + moved["rdma_combine"]) / rdma_rate if moved["rdma_rows"] else 0.0
    # An owner computes W cells (one per source) of each local expert: the hot expert's of
    # hot_factor x the mean T·k/E rows, the others' of the rest shared evenly.
    mean_cell = tokens * k / e
    rows_per_cell = mean_cell * hot_factor
    other_cell = mean_cell * (e - hot_factor) / (e - 1) if e > 1 else mean_cell
    cell_rows = ((world, rows_per_cell), (world * (local_experts - 1), other_cell))
    # RDMA messages: one put_signal per remote cell out, one put per returned row tile + its signal.
    node = world if gpus_per_node is None else min(gpus_per_node, world)
    remote_cells = local_experts * (world - node)
    row_tile = model.ROW_TILE
    messages = remote_cells * (1 + math.ceil(mean_cell / row_tile) + 1) if tokens else 0
    processors = (device.ctas_per_sm_today * device.sms - 1) if design == "today" else device.sms - 1
    post_us = messages * assumptions.rdma_post_us / processors
    parts["link"] = max(nvlink_us, rdma_us + post_us)
    parts["dispatch_link"] = parts["link"] * moved["dispatch"] / moved["per_direction"] if moved["per_direction"] \
        else 0.0
    parts["combine_link"] = parts["link"] - parts["dispatch_link"]
    latency = assumptions.rdma_latency_us if moved["rdma_rows"] else (
        assumptions.nvlink_latency_us if moved["nvlink_rows"] else 0.0)
    slowest_rate = rdma_rate if moved["rdma_rows"] else nvlink_rate

    # Experts: share x T·k rows through the local experts' GEMMs.
    rows = tokens * k * share
    flops0, flops1 = 2.0 * rows * shape.w1_rows * h, 2.0 * rows * h * i
    peak = device.peak_flops_per_us()
    weight_bytes = local_experts * (shape.w1_rows * h + h * i) * element
    weights_us = weight_bytes / (device.hbm_effective_gbps * 1e3)
    if design == "today":
        tile0 = model.TILES["reference-64x64-glu" if shape.gated else "reference-64x64"]
        tile1 = model.TILES["reference-64x64"]
        compute = flops0 / (tile0.peak_fraction(device) * peak) + flops1 / (tile1.peak_fraction(device) * peak)
        row_tiles = sum(count * math.ceil(cell / row_tile) for count, cell in cell_rows)
        tasks = row_tiles * (math.ceil(i / model.COLUMN_TILE) + math.ceil(h / model.COLUMN_TILE))
        per_task = model.scheduler_costs(device, "sched-v2", model.SCHED_V2_DRAIN)["per_task"]
        per_cta = peak / (device.sms * device.ctas_per_sm_today)
        task_rows = min(rows_per_cell, row_tile)
        # A GEMM0 task computes COLUMN_TILE columns of I (gate and up together when gated).
        drain = (2.0 * task_rows * model.COLUMN_TILE * shape.w1_rows / i * h / (tile0.peak_fraction(device) * per_cta)
                 + 2.0 * task_rows * model.COLUMN_TILE * i / (tile1.peak_fraction(device) * per_cta)) if tokens else 0.0
    else:
        tile = model.TILES[model.PLANNED_TILE]
        fraction = tile.peak_fraction(device) * processors / device.sms
        compute = (flops0 + flops1) / (fraction * peak)
        row_tiles = sum(count * math.ceil(cell / tile.rows) for count, cell in cell_rows)
        tasks = row_tiles * (math.ceil(shape.w1_rows / tile.columns) + math.ceil(h / tile.columns))
        per_task = (3 * device.l2_latency_us + device.fence_us) / processors  # ticket claims, all CTAs at once
        per_sm = peak / device.sms
        task_rows = min(rows_per_cell, tile.rows)
        drain = (2.0 * task_rows * tile.columns * h + 2.0 * task_rows * tile.columns * i) / (
            tile.peak_fraction(device) * per_sm) if tokens else 0.0
    parts["compute"] = max(compute, weights_us) if tokens else 0.0
    parts["scheduler"] = tasks * per_task
    # SM time spent storing this rank's outgoing NVLink rows (dispatch and returns), spread over
    # the processors; RDMA payloads are read by the NIC and cost only the posts above.
    outgoing_nvlink = scale * (moved["nvlink_dispatch"] + moved["nvlink_combine"])
    parts["copy"] = outgoing_nvlink / (assumptions.sm_store_gbps * 1e3 * (device.sms - 1))
    parts["experts"] = max(parts["compute"], parts["scheduler"])
    parts["drain"] = drain

    # The rank's own T tokens: gate (+ route), combine, launch and stop, from the single-GPU model.
    call = model.Call(shape, max(tokens, 1))
    detail: Dict[str, float] = {}
    if design == "today":
        model.call_us(device, call, "sched-v2", detail)
        parts["fixed"] = detail["launch"] + detail["init"] + detail["stop"]
    else:
        model.planned_call_us(device, call, model.TILES[model.PLANNED_TILE], detail)
        parts["fixed"] = detail["launch"] + detail["stop"]
    parts["gate"] = detail["gate"] + detail["route"]
    parts["combine"] = detail["combine"]

    # Overlapped: compute starts when the first remote cell has landed and ends with the last
    # tile's chain; the last returned row tile must land before the combine.
    first_cell = rows_per_cell * h * element + SIGNAL_WORD_BYTES
    last_tile = min(rows_per_cell, row_tile) * h * element + SIGNAL_WORD_BYTES
    remote = world > 1 and tokens > 0
    parts["head"] = latency + first_cell / slowest_rate if remote else 0.0
    parts["tail"] = latency + last_tile / slowest_rate if remote else 0.0
    parts["overlapped"] = (parts["fixed"] + parts["gate"] + parts["head"]
                           + max(parts["link"], parts["experts"] + parts["copy"])
                           + parts["drain"] + parts["tail"] + parts["combine"])
    # Serialized: gate -> all-to-all -> GEMMs -> all-to-all -> combine, each a launch, one host sync.
    sync = assumptions.bsp_host_sync_us if world > 1 else 0.0
    a2a_latency = 2 * latency if remote else 0.0
    parts["serialized"] = (assumptions.bsp_launches * device.launch_us + sync + parts["gate"]
                           + parts["dispatch_link"] + parts["experts"] + parts["drain"] + parts["combine_link"]
                           + a2a_latency + parts["combine"])
    parts["bytes_per_direction"] = scale * moved["per_direction"]
    parts["rdma_messages"] = float(messages)
    parts["cross_node_fraction"] = moved["cross_node_fraction"]
    return parts


def bsp_grouped_mm_us(device: model.Device, shape: LayerShape, tokens: int, world: int,
                      gpus_per_node: Optional[int] = None, assumptions: LinkAssumptions = ASSUMPTIONS) -> float:
    """A Megatron-like layer: the single-GPU model's torch._grouped_mm layer on T tokens (uniform
    routing gives each rank T·k rows, as one GPU with T tokens), plus the two all-to-alls, the
    launches and the host sync."""
    _check(shape, tokens, world, gpus_per_node, 1.0)
    moved = ep_bytes(shape, tokens, world, gpus_per_node)
    nvlink_rate, rdma_rate = _rates(device, assumptions)
    link = max((moved["nvlink_dispatch"] + moved["nvlink_combine"]) / nvlink_rate,
               (moved["rdma_dispatch"] + moved["rdma_combine"]) / rdma_rate)
    latency = assumptions.rdma_latency_us if moved["rdma_rows"] else assumptions.nvlink_latency_us
    remote = world > 1 and tokens > 0
    return (model.grouped_mm_us(device, model.Call(shape, max(tokens, 1))) + link
            + assumptions.bsp_launches * device.launch_us
            + ((assumptions.bsp_host_sync_us + 2 * latency) if remote else 0.0))


# ---------------------------------------------------------------------------------------------
# The tables of docs/performance.md.
PAPER_SHAPE = "paper"
PAPER_TOKENS = tuple(sorted(model.PAPER_EP8_MS))  # tokens per GPU
TOTAL_READING_TOKENS = tuple(t // 8 for t in PAPER_TOKENS)  # if the paper's T were the total over 8 GPUs
HOT_FACTORS = (1.0, 1.5, 2.0)

MARKDOWN_BEGIN = "<!-- ep-model-tables: python -m flashmoe.bench.ep_model --markdown -->"
MARKDOWN_END = "<!-- end ep-model-tables -->"


def _ms(us: float) -> str:
    return f"{us / 1e3:.3g}"


def render_markdown(device_name: str = "h100-sxm") -> str:
    device = model.DEVICES[device_name]
    shape = NAMED_CONFIGS[PAPER_SHAPE]
    lines: List[str] = [MARKDOWN_BEGIN,
                        f"All PREDICTED ({device.label}; the paper's layer H = I = {shape.hidden_size}, "
                        f"E = {shape.num_experts}, k = {shape.top_k}, bf16; T per GPU; ms unless marked). "
                        f"The paper's two columns are its measurements, quoted.", ""]

    lines += ["**EP8 over NVLink (one node, 8 GPUs), uniform routing.**", "",
              "| T per GPU | MB per rank each way | link | experts, today | experts, planned "
              "| overlapped, today | overlapped, planned | serialized, planned | BSP + grouped_mm "
              "| paper FlashMoE (FP32) | paper Megatron-CUTLASS |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tokens in TOTAL_READING_TOKENS + PAPER_TOKENS:
        today = ep_layer(device, shape, tokens, 8, "today")
        planned = ep_layer(device, shape, tokens, 8, "planned")
        bsp = bsp_grouped_mm_us(device, shape, tokens, 8)
        paper, megatron = model.PAPER_EP8_MS.get(tokens, (None, None))
        lines.append(f"| {tokens} | {planned['bytes_per_direction'] / 1e6:.3g} | {_ms(planned['link'])} "
                     f"| {_ms(today['experts'])} | {_ms(planned['experts'])} | {_ms(today['overlapped'])} "
                     f"| {_ms(planned['overlapped'])} | {_ms(planned['serialized'])} | {_ms(bsp)} "
                     f"| {paper if paper else '-'} | {megatron if megatron else '-'} |")
    lines += ["", "**The paper's precision (FP32 rows, TF32 tensor cores at "
              f"{TF32_TFLOPS:g} TFLOP/s dense), EP8 over NVLink.**", "",
              "| T per GPU | MB per rank each way | link | overlapped, today | overlapped, planned "
              "| paper FlashMoE (FP32) |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens in PAPER_TOKENS:
        today = ep_layer(device, shape, tokens, 8, "today", element=4, peak_tflops=TF32_TFLOPS)
        planned = ep_layer(device, shape, tokens, 8, "planned", element=4, peak_tflops=TF32_TFLOPS)
        lines.append(f"| {tokens} | {planned['bytes_per_direction'] / 1e6:.3g} | {_ms(planned['link'])} "
                     f"| {_ms(today['overlapped'])} | {_ms(planned['overlapped'])} "
                     f"| {model.PAPER_EP8_MS[tokens][0]} |")

    lines += ["", "**Load imbalance, EP8 over NVLink: the hottest expert at f x the mean (planned design; "
              "the hottest rank sets the layer's time).**", "",
              "| T per GPU | f | hottest rank's rows / mean | overlapped, planned | serialized, planned "
              "| overlapped, today |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens in PAPER_TOKENS:
        for factor in HOT_FACTORS:
            planned = ep_layer(device, shape, tokens, 8, "planned", hot_factor=factor)
            today = ep_layer(device, shape, tokens, 8, "today", hot_factor=factor)
            lines.append(f"| {tokens} | {factor:g} | {hot_rank_share(shape, 8, factor):.3f} "
                         f"| {_ms(planned['overlapped'])} | {_ms(planned['serialized'])} "
                         f"| {_ms(today['overlapped'])} |")

    lines += ["", "**Across nodes (RDMA, one 400 Gb/s NIC per GPU), planned design.**", "",
              "| topology | W | T per GPU | share of rows crossing nodes | MB per rank each way over the NIC "
              "| NIC time | RDMA messages per rank | link | overlapped | serialized | BSP + grouped_mm |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for topology in TOPOLOGIES.values():
        for tokens in PAPER_TOKENS:
            node = topology.gpus_per_node
            planned = ep_layer(device, shape, tokens, topology.world, "planned", gpus_per_node=node)
            moved = ep_bytes(shape, tokens, topology.world, node)
            nic = (moved["rdma_dispatch"] + moved["rdma_combine"]) / _rates(device, ASSUMPTIONS)[1]
            bsp = bsp_grouped_mm_us(device, shape, tokens, topology.world, node)
            lines.append(f"| {topology.name} | {topology.world} | {tokens} | {moved['cross_node_fraction']:.3g} "
                         f"| {(moved['rdma_dispatch'] + moved['rdma_combine']) / 1e6:.3g} | {_ms(nic)} "
                         f"| {planned['rdma_messages']:.0f} | {_ms(planned['link'])} | {_ms(planned['overlapped'])} "
                         f"| {_ms(planned['serialized'])} | {_ms(bsp)} |")
    lines.append(MARKDOWN_END)
    return "\n".join(lines) + "\n"


def render_table(device_name: str) -> str:
    device = model.DEVICES[device_name]
    shape = NAMED_CONFIGS[PAPER_SHAPE]
    lines = [f"# EP cost model, PREDICTIONS (nothing measured): {device.label}, paper layer, T per GPU, ms",
             f"{'topology':12s} {'design':8s} {'T':>6s} {'f':>4s} {'MB/dir':>8s} {'link':>7s} {'experts':>8s} "
             f"{'head':>6s} {'tail':>6s} {'overlap':>8s} {'serial':>8s}  paper"]
    for topology in TOPOLOGIES.values():
        for design in DESIGNS:
            for tokens in PAPER_TOKENS:
                for factor in HOT_FACTORS:
                    parts = ep_layer(device, shape, tokens, topology.world, design, topology.gpus_per_node,
                                     hot_factor=factor)
                    paper = model.PAPER_EP8_MS[tokens] if topology.name == "1x8-nvlink" and factor == 1.0 else ""
                    lines.append(f"{topology.name:12s} {design:8s} {tokens:6d} {factor:4g} "
                                 f"{parts['bytes_per_direction'] / 1e6:8.3g} {_ms(parts['link']):>7s} "
                                 f"{_ms(parts['experts']):>8s} {_ms(parts['head']):>6s} {_ms(parts['tail']):>6s} "
                                 f"{_ms(parts['overlapped']):>8s} {_ms(parts['serialized']):>8s}  "
                                 f"{'FlashMoE %s / Megatron %s ms' % paper if paper else ''}".rstrip())
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashmoe.bench.ep_model",
        description="The expert-parallel layer's cost model (PREDICTIONS from the design, not measurements): "
                    "bytes per rank, link time, expert compute at today's and the planned tile, the layer "
                    "overlapped and serialized, load imbalance, and RDMA across nodes (docs/performance.md).")
    parser.add_argument("--device", choices=list(model.DEVICES), default="h100-sxm",
                        help="model this device (default h100-sxm, the paper's)")
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/performance.md")
    args = parser.parse_args(argv)
    sys.stdout.write(render_markdown(args.device) if args.markdown else render_table(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
