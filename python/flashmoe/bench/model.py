"""An analytic performance model of the persistent CUDA kernel, from its design: PREDICTIONS ONLY.

    python -m flashmoe.bench.model                      # the predicted table, H100 SXM and H200
    python -m flashmoe.bench.model --write              # bench/perf_model.tsv (committed; a test keeps it current)
    python -m flashmoe.bench.model --compare F.json...  # predictions beside flashmoe-bench measurements

Nothing here was measured: every number is arithmetic on the device constants below (datasheet
peaks and stated assumptions) and on the kernel's code as it is (csrc/cuda/actors.cuh, tasks.cuh,
tile_mma.cuh) or as issue 10 plans it. docs/cuda_kernel.md ("Performance model") gives the formulas,
and which flashmoe-bench / bench/gpu_suite.sh row checks each line, and what would falsify it.

Times are in microseconds unless a name says otherwise. Layer shapes, FLOPs and weight bytes come
from configs.py; nothing here repeats a shape.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .configs import NAMED_CONFIGS, LayerShape, custom_shape, touched_weight_bytes, useful_flops

BF16 = torch.bfloat16
ELEMENT = 2  # bytes of a bf16 element
TSV_PATH = "bench/perf_model.tsv"
TSV_HEADER = ("device", "case", "prediction", "unit", "basis")


@dataclass(frozen=True)
class Device:
    """Peak numbers (datasheet) and the assumed latencies and efficiencies of one GPU."""

    name: str
    label: str
    sms: int                    # streaming multiprocessors
    bf16_tflops: float          # dense bf16 tensor peak, TFLOP/s (no sparsity)
    hbm_gbps: float             # HBM bandwidth, GB/s
    nvlink_gbps: float          # NVLink bandwidth per GPU per direction, GB/s
    # Assumptions shared by both devices (same SM, L2 and clocks), in the defaults:
    hbm_efficiency: float = 0.90        # streaming reads reach this share of hbm_gbps
    l2_sm_gbps: float = 7000.0          # L2 -> SM read bandwidth of the whole chip
    l2_latency_us: float = 0.16         # one dependent L2 round trip (about 280 cycles at 1.755 GHz)
    l2_latency_loaded_us: float = 0.40  # the same under a GEMM's load
    hbm_latency_us: float = 0.60        # one dependent HBM access, idle
    hbm_latency_loaded_us: float = 0.90 # the same while the grid streams weights
    fence_us: float = 0.30              # fence.acq_rel.gpu / the membar of st.release
    poll_sleep_us: float = 0.032        # mean extra wait of a __nanosleep(64) poll
    l1_latency_us: float = 0.02         # a dependent L1 hit (about 35 cycles)
    store_issue_us: float = 0.002       # one more independent store from one thread
    launch_us: float = 3.0              # a kernel launch on a busy stream, start to all CTAs running
    memset_us: float = 1.5              # the launcher's cudaMemsetAsync of the control block
    ctas_per_sm_today: int = 3          # resident CTAs of today's kernel (registers bound it)
    nvlink_efficiency: float = 0.80     # SM-driven stores through NVSwitch
    rdma_gbps: float = 50.0             # one 400 Gb/s NIC per GPU, per direction
    cublas_fraction: float = 0.75       # large dense bf16 GEMM (cuBLAS) share of bf16_tflops
    grouped_mm_fraction: float = 0.65   # torch._grouped_mm (CUTLASS grouped GEMM) share, 1K-row groups

    @property
    def hbm_effective_gbps(self) -> float:
        return self.hbm_gbps * self.hbm_efficiency

    def peak_flops_per_us(self) -> float:
        return self.bf16_tflops * 1e6


# Sources of the peaks:
# - H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity),
#   3.35 TB/s HBM3, NVLink 900 GB/s (both directions: 450 GB/s each way); 132 SMs (NVIDIA H100
#   whitepaper, "SXM5": 132 SMs, 50 MB L2).
# - H200 SXM: NVIDIA H200 datasheet: the same 989 TFLOP/s dense BF16 and NVLink 900 GB/s, 4.8 TB/s
#   HBM3e; the same GH100 die with 132 SMs.
# The assumptions (Device defaults), none measured here:
# - L2 latency: microbenchmarks of Hopper (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper
#   GPU Architecture", 2024; Chips and Cheese's H100 article, 2023) put an L2 hit at roughly 260-300
#   cycles, ~0.16 us at 1.755 GHz; the far L2 partition costs more.
# - Fence: no published figure; taken as about two L2 round trips (the membar waits for the SM's
#   outstanding writes to be acknowledged; the acquire also invalidates L1). With the counts below it
#   gives a hand-out of 2.3 us, inside issue 10's 1.5-3 us estimated from the SASS.
# - HBM latency 0.6 us idle is issue 10's figure (its gate estimates: 20 us for OLMoE, 270 us for
#   DeepSeek-V3 at one k-block in flight); 0.9 us under streaming load is 1.5x that.
# - L2 -> SM bandwidth: ~5.5 TB/s was measured on the 114-SM H100 PCIe; scaled to 132 SMs at SXM
#   clocks, ~7 TB/s. This is the least certain number and decides every tile's compute ceiling.
# - cuBLAS at 75% and torch._grouped_mm at 65% of peak: typical of large bf16 GEMMs on H100 SXM.
DEVICES: Dict[str, Device] = {
    "h100-sxm": Device("h100-sxm", "NVIDIA H100 SXM5 80GB", sms=132, bf16_tflops=989.0, hbm_gbps=3350.0,
                       nvlink_gbps=450.0),
    "h200": Device("h200", "NVIDIA H200 SXM 141GB", sms=132, bf16_tflops=989.0, hbm_gbps=4800.0,
                   nvlink_gbps=450.0),
}

# Today's tiling (csrc/cuda/workspace.h gpu_tiling, tile_mma.cuh): tasks of 128 rows x 128 columns,
# each computed as 64x64 tiles (kTileM, kTileN) over k-blocks of 64 bf16 elements (128 bytes).
ROW_TILE, COLUMN_TILE, TOKEN_TILE = 128, 128, 64
MMA_TILE, K_BLOCK = 64, 64
WARPS = 4  # kThreads = 128

# ---------------------------------------------------------------------------------------------
# The scheduler of today (one thread of CTA 0, csrc/cuda/actors.cuh at the commit this model was
# written against, main at 9670033): what one GEMM task costs it, counted from the code. Every fence.acq_rel.gpu
# invalidates L1, and the scheduler's state is in global memory, so each dependent access below is
# an L2 round trip.
RECEIVE_ROUND_TRIPS = (
    ("poll of inbox_ready[slot] that finds the completion", "run(): ld_poll(&control.inbox_ready[slot])"),
    ("the 16-byte Message, after the acquire fence", "run(): control.inbox[slot]"),
    ("read-back of task_slots[p].kind it wrote itself", "completed(): control.task_slots[processor]"),
    ("gemm0_left / gemm1_left read-modify-write", "completed(): --gemm0_left[cell] / --gemm1_left[e]"),
)
RECEIVE_FENCES = (
    ("acquire after the poll", "run(): acquire_fence()"),
    ("release of the inbox head", "run(): st_release(&control.counters[kInboxHead], ...)"),
)
HANDOUT_ROUND_TRIPS = (
    ("the poll that finds the inbox empty before handing out", "run(): ld_poll(...) != head + 1"),
    ("the queue entry", "next_task(): gemm1_queue[gemm1_head] / gemm0_queue[gemm0_head]"),
    ("cell_rows / cell_first_row of that entry", "cell_task(): cell_first_row[expert], cell_rows[expert]"),
    ("idle[--idle_count]", "run(): idle[--idle_count]"),
    ("read-back of doorbells[p] for the increment", "run(): control.doorbells[processor] + 1"),
)
HANDOUT_FENCES = (("release of the doorbell", "run(): st_release(&control.doorbells[processor], ...)"),)
# Token tasks (gate, route, dispatch, combine) skip the queue and cell loads.
TOKEN_HANDOUT_SKIPS = 2


def scheduler_costs(device: Device) -> Dict[str, float]:
    """Today's scheduler, in us: receive (a completion), hand-out (a GEMM task), their sum per task
    (the serial cost that bounds the task rate), and the latency parts a dependent task adds."""
    rt, fence = device.l2_latency_us, device.fence_us
    receive = len(RECEIVE_ROUND_TRIPS) * rt + len(RECEIVE_FENCES) * fence
    handout = len(HANDOUT_ROUND_TRIPS) * rt + len(HANDOUT_FENCES) * fence
    token_handout = handout - TOKEN_HANDOUT_SKIPS * rt
    # Processor side: wake (poll sleep, the doorbell's trip, acquire, the Task load) and finish
    # (__threadfence, atomicAdd on the tail, poll of the head + acquire, release of inbox_ready).
    wake = device.poll_sleep_us + 2 * rt + fence
    finish = 2 * rt + 3 * fence
    # An arrival or combine-ready message: poll + acquire + message + head release, no bookkeeping loads.
    receive_message = 2 * rt + 2 * fence
    post = 2 * rt + 2 * fence  # a subscriber's post: atomicAdd, head poll + acquire, release
    return dict(receive=receive, handout=handout, per_task=receive + handout, token_handout=token_handout,
                token_per_task=receive + token_handout, wake=wake, finish=finish,
                receive_message=receive_message, post=post,
                round_trips=len(RECEIVE_ROUND_TRIPS) + len(HANDOUT_ROUND_TRIPS),
                fences=len(RECEIVE_FENCES) + len(HANDOUT_FENCES))


def dependent_overhead(device: Device, token_task: bool = False) -> float:
    """What one task adds to a chain of dependent tasks beyond its body: hand-out, wake, finish, receive."""
    s = scheduler_costs(device)
    return (s["token_handout"] if token_task else s["handout"]) + s["wake"] + s["finish"] + s["receive"]


# ---------------------------------------------------------------------------------------------
# Tiles: each configuration's ceiling as a share of the bf16 peak, from three limits per SM:
#   issue:   what the MMA issue/wait structure allows (an assumption per configuration);
#   L2:      arithmetic intensity (FLOP per byte staged from L2) x the L2 -> SM bandwidth;
#   latency: bytes in flight / loaded L2 latency x intensity (Little's law).
@dataclass(frozen=True)
class TileConfig:
    name: str
    rows: int            # M of the output tile
    columns: int         # N of the output tile (for the GLU GEMM0: gate and up together)
    stages: int          # shared-memory stages
    in_flight: int       # stages loading while the MMAs run
    ctas_per_sm: int     # 0: the device's ctas_per_sm_today
    issue_ceiling: Optional[float]  # None: the device's cublas_fraction (cuBLAS's kernels are this design)
    weight_multicast: int = 1  # CTAs of a cluster sharing one TMA load of the weight tile
    description: str = ""

    def intensity(self) -> float:
        """FLOP per byte staged from L2: 2·M·N·K over (M + N/multicast)·K·2 bytes."""
        return 2 * self.rows * self.columns / ((self.rows + self.columns / self.weight_multicast) * ELEMENT)

    def stage_bytes(self) -> int:
        return (self.rows + self.columns) * K_BLOCK * ELEMENT

    def limits(self, device: Device) -> Dict[str, float]:
        ctas = self.ctas_per_sm or device.ctas_per_sm_today
        peak_per_sm = device.peak_flops_per_us() / device.sms  # FLOP/us
        l2_per_sm = device.l2_sm_gbps * 1e3 / device.sms       # bytes/us
        in_flight_rate = ctas * self.in_flight * self.stage_bytes() / device.l2_latency_loaded_us
        issue = device.cublas_fraction if self.issue_ceiling is None else self.issue_ceiling
        return dict(issue=issue, l2=self.intensity() * l2_per_sm / peak_per_sm,
                    latency=self.intensity() * in_flight_rate / peak_per_sm)

    def peak_fraction(self, device: Device) -> float:
        return min(self.limits(device).values())


TILES: Dict[str, TileConfig] = {tile.name: tile for tile in (
    # Today: 64x64 output, 2 cp.async stages, one warpgroup, warpgroup_wait<0> after every k-block:
    # one stage loads while the MMAs run, and they do not overlap the next issue.
    TileConfig("reference-64x64-glu", 64, 128, 2, 1, 0, 0.70,
               description="today's GEMM0: a 64x64 tile of gate and one of up sharing the A stage"),
    TileConfig("reference-64x64", 64, 64, 2, 1, 0, 0.70, description="today's GEMM1 and router tile"),
    # Issue 10's plan on sm_90a: warp-specialised, a TMA producer and two consumer warpgroups,
    # 4 stages in ~200 KB of shared memory (one CTA per SM), warpgroup_wait<1>: the structure of cuBLAS's
# Hopper kernels, so their issue ceiling is taken to be cuBLAS's.
    TileConfig("hopper-128x128-ws4", 128, 128, 4, 3, 1, None,
               description="issue 10: 128x128, TMA producer + 2 consumer warpgroups, 4 stages, wait<1>"),
    TileConfig("hopper-128x256-ws4", 128, 256, 4, 3, 1, None,
               description="issue 10: 128x256, TMA producer + 2 consumer warpgroups, 4 stages, wait<1>"),
    # Not in issue 10's list: the same tile with the weight tile multicast to a 2-CTA cluster.
    TileConfig("hopper-128x256-ws4-mc2", 128, 256, 4, 3, 1, None, weight_multicast=2,
               description="128x256 with TMA multicast of the weight tile over a 2-CTA cluster (not in the plan)"),
)}
# Issue 10's decode tile: weights on the MMA's M side (swap A and B), tokens on N <= 16, 6 stages of a
# 128-row weight slab: 5 slabs in flight per SM stream weights; compute is irrelevant at decode.
DECODE_TILE = dict(weight_rows=128, stages=6, in_flight=5)


def decode_tile_hbm_fraction(device: Device, tasks: Optional[int] = None) -> float:
    """Share of hbm_gbps the decode tile reaches with `tasks` CTAs streaming (default: every SM)."""
    ctas = min(tasks or device.sms, device.sms)
    in_flight = ctas * DECODE_TILE["in_flight"] * DECODE_TILE["weight_rows"] * K_BLOCK * ELEMENT
    rate = in_flight / device.hbm_latency_loaded_us / 1e3  # GB/s
    return min(device.hbm_efficiency, rate / device.hbm_gbps)


def reference_tile_hbm_fraction(device: Device, busy_ctas: float, glu: bool) -> float:
    """Today's tile at decode: one stage of weights (64 rows x 128 bytes, two with the GLU) in flight per busy CTA."""
    in_flight = busy_ctas * (2 if glu else 1) * MMA_TILE * K_BLOCK * ELEMENT
    return min(device.hbm_efficiency, in_flight / device.hbm_latency_loaded_us / 1e3 / device.hbm_gbps)


# ---------------------------------------------------------------------------------------------
# The shape of one call: expected experts hit and rows per expert under uniform routing.
def expected_experts_hit(shape: LayerShape, tokens: int) -> float:
    """E·(1 − (1 − k/E)^T): each token picks k distinct experts, uniformly."""
    e, k = shape.num_experts, min(shape.top_k, shape.num_experts)
    return e * (1.0 - (1.0 - k / e) ** tokens)


@dataclass(frozen=True)
class Call:
    shape: LayerShape
    tokens: int

    @property
    def picks(self) -> int:
        return self.tokens * min(self.shape.top_k, self.shape.num_experts)

    @property
    def experts_hit(self) -> float:
        return expected_experts_hit(self.shape, self.tokens)

    @property
    def rows_per_cell(self) -> float:
        return self.picks / self.experts_hit

    @property
    def row_tiles_per_cell(self) -> int:
        return math.ceil(self.rows_per_cell / ROW_TILE)

    def weight_floor_us(self, device: Device) -> float:
        """configs.touched_weight_bytes over the effective HBM bandwidth: the bench's x wfloor scale."""
        return touched_weight_bytes(self.shape, BF16, self.experts_hit) / device.hbm_effective_gbps / 1e3

    def expert_bytes(self) -> Tuple[float, float]:
        """Weight bytes GEMM0 and GEMM1 read (each hit expert's w1 and w2, once)."""
        h, i = self.shape.hidden_size, self.shape.ffn_size
        return (self.experts_hit * self.shape.w1_rows * h * ELEMENT, self.experts_hit * h * i * ELEMENT)

    def expert_flops(self) -> Tuple[float, float]:
        h, i = self.shape.hidden_size, self.shape.ffn_size
        return 2.0 * self.picks * self.shape.w1_rows * h, 2.0 * self.picks * h * i

    def tasks_today(self) -> Dict[str, int]:
        cells = self.experts_hit
        h, i = self.shape.hidden_size, self.shape.ffn_size
        token_tiles = math.ceil(self.tokens / TOKEN_TILE)
        gemm0 = round(cells * self.row_tiles_per_cell * math.ceil(i / COLUMN_TILE))
        gemm1 = round(cells * self.row_tiles_per_cell * math.ceil(h / COLUMN_TILE))
        return dict(gate=token_tiles, route=1, dispatch=token_tiles, gemm0=gemm0, gemm1=gemm1, combine=token_tiles)


def _phase(count: int, body: float, processors: int, issue: float) -> float:
    """Independent tasks handed out every `issue` us to `processors` CTAs, each taking `body` us."""
    return max((count - 1) * issue + body, math.ceil(count / processors) * body)


def today_call_us(device: Device, call: Call, detail: Optional[Dict[str, float]] = None) -> float:
    """Today's kernel, one call, in us: launch and memset, then the stages in order, each limited by the
    scheduler's serial hand-outs, the processors, HBM bandwidth or the tile's compute ceiling."""
    shape, s = call.shape, scheduler_costs(device)
    rt, fence, hbm = device.l2_latency_us, device.fence_us, device.hbm_latency_us
    h, i, e = shape.hidden_size, shape.ffn_size, shape.num_experts
    processors = device.ctas_per_sm_today * device.sms - 1
    tasks = call.tasks_today()
    tokens_per_tile = min(call.tokens, TOKEN_TILE)
    k_blocks_h, k_blocks_i = math.ceil(h / K_BLOCK), math.ceil(i / K_BLOCK)
    token_overhead = dependent_overhead(device, token_task=True)
    parts: Dict[str, float] = {}
    parts["launch"] = device.launch_us + device.memset_us
    parts["init"] = processors * device.store_issue_us  # idle[] filled by the scheduler thread
    # Gate: the router GEMM of a token tile, one k-block (one HBM latency) at a time per 64 experts.
    gate_body = math.ceil(e / MMA_TILE) * k_blocks_h * hbm + 2 * rt
    parts["gate"] = _phase(tasks["gate"], gate_body, processors, s["token_per_task"]) + token_overhead
    # Route: one CTA; per expert a dependent scan over tiles, then thread 0's scan over E (L1 chain).
    parts["route"] = tasks["gate"] * rt + e * device.l1_latency_us + 2 * rt + token_overhead
    # Dispatch: each warp copies its picks' rows, 512 bytes per dependent load.
    rows_per_warp = math.ceil(tokens_per_tile * shape.top_k / WARPS)
    dispatch_body = 2 * rt + rows_per_warp * math.ceil(h * ELEMENT / 512) * rt
    parts["dispatch"] = _phase(tasks["dispatch"], dispatch_body, processors, s["token_per_task"]) + token_overhead
    # The scheduler publishes E dispatch flags, one release (a fence) each; a subscriber sees one and
    # posts an arrival; the scheduler receives it.
    parts["publish"] = e * fence + device.poll_sleep_us + rt + fence + s["post"] + s["receive_message"]
    # Experts: GEMM0 and GEMM1 tasks. At decode a task is latency-bound (one stage of 64 weight rows
    # per HBM latency); at prefill compute-bound at the tile's ceiling on its share of the SM.
    row_blocks = math.ceil(min(call.rows_per_cell, ROW_TILE) / MMA_TILE)
    halves = COLUMN_TILE // MMA_TILE
    glu, plain = TILES["reference-64x64-glu"], TILES["reference-64x64"]
    per_cta = device.peak_flops_per_us() / (device.sms * device.ctas_per_sm_today)
    rows_in_task = min(call.rows_per_cell, ROW_TILE)
    flops0 = 2.0 * rows_in_task * COLUMN_TILE * shape.w1_rows / i * h
    flops1 = 2.0 * rows_in_task * COLUMN_TILE * i
    body0 = max(row_blocks * halves * k_blocks_h * hbm, flops0 / (glu.peak_fraction(device) * per_cta))
    body1 = max(row_blocks * halves * k_blocks_i * hbm, flops1 / (plain.peak_fraction(device) * per_cta))
    n0, n1 = tasks["gemm0"], tasks["gemm1"]
    bytes0, bytes1 = call.expert_bytes()
    fl0, fl1 = call.expert_flops()
    scheduler_bound = (n0 + n1) * s["per_task"]
    processor_bound = (n0 * body0 + n1 * body1) / processors
    bandwidth_bound = (bytes0 + bytes1) / device.hbm_effective_gbps / 1e3
    compute_bound = fl0 / (glu.peak_fraction(device) * device.peak_flops_per_us()) + \
        fl1 / (plain.peak_fraction(device) * device.peak_flops_per_us())
    parts["experts"] = max(scheduler_bound, processor_bound, bandwidth_bound, compute_bound) + body0 + body1 + \
        2 * dependent_overhead(device)
    # The last GEMM1 of a cell releases its return flag; the subscribers see all, post combine-ready.
    parts["returns"] = fence + device.poll_sleep_us + rt + fence + rt + s["post"] + s["receive_message"]
    # Combine: per element, the pick rows (L1 after the first) then the expert outputs (L2).
    combine_body = math.ceil(tokens_per_tile * h / (WARPS * 32)) * (device.l1_latency_us + rt)
    parts["combine"] = _phase(tasks["combine"], combine_body, processors, s["token_per_task"]) + token_overhead
    # Stop: one release store (a fence) per processor, serially.
    parts["stop"] = processors * fence
    if detail is not None:
        detail.update(parts, tasks=float(sum(tasks.values())), scheduler_bound=scheduler_bound,
                      busy_processors=min(processors, body0 / s["per_task"]), body0=body0, body1=body1)
    return sum(parts.values())


def planned_call_us(device: Device, call: Call, tile: TileConfig, detail: Optional[Dict[str, float]] = None) -> float:
    """Issue 10's design, one call, in us: processors claim tasks themselves (an atomic ticket, no serial
    scheduler), broadcasts with one fence, epochs on the device (no memset), GEMM0 gathering from x,
    the decode tile for T·k/E < 64 rows per expert, `tile` otherwise. Each dependent phase costs one
    hand-off (release, poll, acquire) and its first memory latency; a phase moves its bytes at HBM
    speed or its FLOPs at the tile's ceiling, whichever is slower."""
    shape = call.shape
    rt, fence, hbm = device.l2_latency_us, device.fence_us, device.hbm_latency_us
    h, e = shape.hidden_size, shape.num_experts
    processors = device.sms - 1  # one CTA per SM; the OS CTA keeps one SM
    hand_off = fence + rt + device.poll_sleep_us + fence
    claim = 3 * rt + fence  # ticket, descriptor, completion counter; the completion's release
    bandwidth = device.hbm_effective_gbps * 1e3  # bytes/us
    parts: Dict[str, float] = {}
    parts["launch"] = device.launch_us
    router_bytes = e * h * ELEMENT + call.tokens * h * ELEMENT
    parts["gate"] = hbm + router_bytes / bandwidth + 2 * rt + claim
    parts["route"] = 2 * hand_off  # a scan over tiles across CTAs: publish tile counts, read prefixes
    decode = call.rows_per_cell < 64
    bytes0, bytes1 = call.expert_bytes()
    fl0, fl1 = call.expert_flops()
    peak = device.peak_flops_per_us()
    fraction = tile.peak_fraction(device) * processors / device.sms
    if decode:
        # Tasks of 128 weight rows; fewer tasks than SMs stream at the decode tile's per-CTA rate.
        tasks0 = max(1, round(call.experts_hit * shape.w1_rows / DECODE_TILE["weight_rows"]))
        tasks1 = max(1, round(call.experts_hit * h / DECODE_TILE["weight_rows"]))
        rate0 = decode_tile_hbm_fraction(device, tasks0) * device.hbm_gbps * 1e3
        rate1 = decode_tile_hbm_fraction(device, tasks1) * device.hbm_gbps * 1e3
        gemm0 = max(bytes0 / rate0, fl0 / (fraction * peak))
        gemm1 = max(bytes1 / rate1, fl1 / (fraction * peak))
    else:
        tiles_per_cell = call.experts_hit * call.row_tiles_per_cell
        tasks0 = tiles_per_cell * math.ceil(shape.w1_rows / tile.columns)
        tasks1 = tiles_per_cell * math.ceil(h / tile.columns)
        gemm0 = max(bytes0 / bandwidth, fl0 / (fraction * peak)) + 2 * ROW_TILE * tile.columns * h / (
            tile.peak_fraction(device) * peak / device.sms)  # the last wave's tile
        gemm1 = max(bytes1 / bandwidth, fl1 / (fraction * peak))
    parts["gemm0"] = hbm + gemm0 + hand_off + claim
    parts["gemm1"] = hbm + gemm1 + hand_off + claim
    # Combine: T·k expert rows (L2) and y, over the grid with 16-byte loads.
    combine_bytes = (call.picks + call.tokens) * h * ELEMENT
    parts["combine"] = rt + combine_bytes / bandwidth + hand_off
    parts["stop"] = fence + processors * device.store_issue_us
    if detail is not None:
        detail.update(parts, tasks=float(tasks0 + tasks1))
    return sum(parts.values())


# ---------------------------------------------------------------------------------------------
# Baselines at prefill: dense cuBLAS (the bench's dense-matmul-floor) and a torch._grouped_mm MoE
# (the bench's grouped-mm), each GEMM time plus the element-wise passes they run through HBM.
def dense_floor_us(device: Device, call: Call) -> float:
    """flashmoe-bench's dense-matmul-floor: the layer's FLOPs through cuBLAS, plus the GLU's passes
    (act(gate) reads and writes T·k·I, the product reads two and writes one: 5 passes)."""
    flops = useful_flops(call.shape, call.tokens)
    glu = (5 if call.shape.gated else 2) * call.picks * call.shape.ffn_size * ELEMENT
    return flops / (device.cublas_fraction * device.peak_flops_per_us()) + glu / (device.hbm_effective_gbps * 1e3)


def grouped_mm_us(device: Device, call: Call) -> float:
    """flashmoe-bench's grouped-mm: two torch._grouped_mm plus its passes: gather x (read + write
    T·k·H bf16), the GLU (as above), .float() (2 + 4 bytes), × weight (4 + 4), index_add_ (reads 4,
    read-modify-writes 8), zeros and .to() of y (T·H: 4 + 6 bytes)."""
    h, i, picks = call.shape.hidden_size, call.shape.ffn_size, call.picks
    router = 2.0 * call.tokens * h * call.shape.num_experts
    experts = useful_flops(call.shape, call.tokens) - router
    passes = picks * h * (4 + 6 + 8 + 12) + (5 if call.shape.gated else 2) * picks * i * ELEMENT + call.tokens * h * 10
    return (experts / (device.grouped_mm_fraction * device.peak_flops_per_us())
            + router / (device.cublas_fraction * device.peak_flops_per_us())
            + passes / (device.hbm_effective_gbps * 1e3))


# ---------------------------------------------------------------------------------------------
# Expert parallelism (issue 11): W ranks over NVLink, uniform routing, T tokens per rank.
def ep_costs(device: Device, shape: LayerShape, tokens: int, world: int, tile: TileConfig,
             link_gbps: Optional[float] = None) -> Dict[str, float]:
    """Dispatch + combine bytes and time per rank, its expert compute at the tile's ceiling, and the
    layer overlapped (the persistent kernel computes cells as they arrive) and serialized, in ms."""
    picks = tokens * min(shape.top_k, shape.num_experts)
    off_rank = picks * shape.hidden_size * ELEMENT * (world - 1) / world  # bytes each way, each phase
    link = (link_gbps if link_gbps is not None else device.nvlink_gbps * device.nvlink_efficiency) * 1e6  # bytes/ms
    # Each direction of a rank's links carries its dispatch out (or in) and its combine back.
    communication = 2 * off_rank / link
    compute = useful_flops(shape, tokens) / (tile.peak_fraction(device) * device.peak_flops_per_us() * 1e3)
    return dict(bytes_per_rank=2 * off_rank, communication_ms=communication, compute_ms=compute,
                overlapped_ms=max(communication, compute), serialized_ms=communication + compute)


# The FlashMoE paper's 8xH100 results for its layer (H = I = 2048, E = 32, k = 2), measured by its
# authors: T per GPU -> (FlashMoE ms, Megatron-CUTLASS ms). Quoted for comparison, not predicted.
PAPER_EP8_MS = {4096: (2.1, 9.9), 8192: (3.7, 18.9), 16384: (7.0, 36.9)}

# ---------------------------------------------------------------------------------------------
# The predicted rows.
FIXED_COST_SHAPE = custom_shape(64, 64, 8, 2)  # flashmoe-bench --hidden 64 --ffn 64 --experts 8 --top-k 2
DECODE_CONFIGS = ("olmoe", "qwen3-30b-a3b")
DECODE_TOKENS = (1, 16)
PREFILL = ("mixtral", 4096)
EP_SHAPE, EP_WORLD, EP_TOKENS = "paper", 8, (4096, 8192, 16384)
PLANNED_TILE = "hopper-128x256-ws4"


@dataclass(frozen=True)
class Prediction:
    device: str
    case: str
    value: float
    unit: str
    basis: str

    def tsv(self) -> str:
        return "\t".join((self.device, self.case, f"{self.value:.4g}", self.unit, self.basis))


def predictions(device: Device) -> List[Prediction]:
    rows: List[Prediction] = []

    def add(case: str, value: float, unit: str, basis: str) -> None:
        rows.append(Prediction(device.name, case, value, unit, basis))

    s = scheduler_costs(device)
    fixed = Call(FIXED_COST_SHAPE, 1)
    detail: Dict[str, float] = {}
    add("fixed_cost/today", today_call_us(device, fixed, detail), "us",
        f"T=1 {FIXED_COST_SHAPE.name}: launch+memset, 6 dependent tasks through the scheduler, "
        f"{FIXED_COST_SHAPE.num_experts} flag releases, stop loop {detail['stop']:.0f} us "
        f"({device.ctas_per_sm_today * device.sms - 1} releases)")
    add("fixed_cost/planned", planned_call_us(device, fixed, TILES[PLANNED_TILE]), "us",
        "T=1: launch (no memset), gate, route scan, GEMM0, GEMM1, combine: each a hand-off plus a memory latency")
    add("scheduler/handout_today", s["per_task"], "us/task",
        f"{s['round_trips']} dependent L2 round trips x {device.l2_latency_us} us + {s['fences']} fences x "
        f"{device.fence_us} us per GEMM task (actors.cuh)")
    add("scheduler/task_rate_today", 1.0 / s["per_task"], "tasks/us", "1 / handout_today: one scheduler thread")
    add("scheduler/drain_per_message_today", s["receive_message"], "us",
        "poll + acquire + message + head release, per inbox message")
    add("scheduler/task_rate_planned", 1.0 / (2 * device.l2_latency_us + device.fence_us + device.l2_latency_us)
        * (device.sms - 1), "tasks/us",
        "processors claim by atomic ticket: per task 3 round trips + 1 fence on its own CTA, all CTAs in parallel")
    for tile in TILES.values():
        limits = tile.limits(device)
        add(f"tile/{tile.name}/peak_fraction", tile.peak_fraction(device), "fraction",
            f"min(issue {limits['issue']:.2f}, L2 {limits['l2']:.2f} at {tile.intensity():.1f} FLOP/B, "
            f"latency {limits['latency']:.2f}): {tile.description}")
    add("tile/decode/hbm_fraction", decode_tile_hbm_fraction(device), "fraction",
        f"{DECODE_TILE['in_flight']} slabs of {DECODE_TILE['weight_rows']}x{K_BLOCK} in flight per SM over the "
        f"loaded HBM latency {device.hbm_latency_loaded_us} us, capped at {device.hbm_efficiency}")
    add("tile/reference/hbm_fraction_all_busy", reference_tile_hbm_fraction(
        device, device.ctas_per_sm_today * device.sms - 1, glu=False), "fraction",
        "today's tile at decode if every CTA were busy: one 8 KiB stage in flight each")
    add("tile/cublas/peak_fraction", device.cublas_fraction, "fraction", "assumed (large dense bf16 GEMM)")

    for config in DECODE_CONFIGS:
        shape = NAMED_CONFIGS[config]
        for tokens in DECODE_TOKENS:
            call = Call(shape, tokens)
            prefix = f"decode/{config}/T={tokens}"
            floor = call.weight_floor_us(device)
            detail = {}
            today = today_call_us(device, call, detail)
            planned = planned_call_us(device, call, TILES[PLANNED_TILE])
            add(f"{prefix}/experts_hit", call.experts_hit, "experts", "E(1-(1-k/E)^T), uniform routing")
            add(f"{prefix}/weight_floor", floor, "us",
                f"configs.touched_weight_bytes / ({device.hbm_gbps:.0f} GB/s x {device.hbm_efficiency})")
            add(f"{prefix}/today", today, "us",
                f"{detail['tasks']:.0f} tasks; scheduler-bound experts {detail['scheduler_bound']:.0f} us, "
                f"~{detail['busy_processors']:.0f} CTAs busy; gate {detail['gate']:.0f}, combine "
                f"{detail['combine']:.0f}, stop {detail['stop']:.0f} us")
            add(f"{prefix}/today_over_floor", today / floor, "x", "today / weight_floor")
            add(f"{prefix}/planned", planned, "us", "issue 10 design, decode tile, weights at HBM speed")
            add(f"{prefix}/planned_over_floor", planned / floor, "x", "planned / weight_floor (goal <= 1.25)")

    config, tokens = PREFILL
    call = Call(NAMED_CONFIGS[config], tokens)
    prefix = f"prefill/{config}/T={tokens}"
    dense, grouped = dense_floor_us(device, call), grouped_mm_us(device, call)
    flops = useful_flops(call.shape, tokens)
    add(f"{prefix}/dense_cublas", dense / 1e3, "ms",
        f"{flops / 1e12:.3f} TFLOP at {device.cublas_fraction} of peak + GLU passes (dense-matmul-floor)")
    add(f"{prefix}/grouped_mm", grouped / 1e3, "ms",
        f"experts at {device.grouped_mm_fraction} of peak + gather/GLU/float/index_add passes (grouped-mm)")
    detail = {}
    today = today_call_us(device, call, detail)
    add(f"{prefix}/today", today / 1e3, "ms",
        f"{detail['tasks']:.0f} tasks x {s['per_task']:.2f} us = {detail['scheduler_bound'] / 1e3:.1f} ms "
        f"scheduler-bound (compute at the 64x64 ceilings is less)")
    add(f"{prefix}/today_dense_fraction", dense / today, "fraction", "dense_cublas / today (bench %dense)")
    for name in ("hopper-128x128-ws4", "hopper-128x256-ws4", "hopper-128x256-ws4-mc2"):
        planned = planned_call_us(device, call, TILES[name])
        add(f"{prefix}/planned_{name}", planned / 1e3, "ms", f"issue 10 design with {name}")
        add(f"{prefix}/planned_{name}_dense_fraction", dense / planned, "fraction", "goal >= 0.8 (bench %dense)")
        add(f"{prefix}/planned_{name}_vs_grouped_mm", grouped / planned, "x", "goal >= 1.3 (bench vs gmm)")

    shape = NAMED_CONFIGS[EP_SHAPE]
    for tokens in EP_TOKENS:
        prefix = f"ep{EP_WORLD}/{EP_SHAPE}/T={tokens}"
        costs = ep_costs(device, shape, tokens, EP_WORLD, TILES[PLANNED_TILE])
        rdma = ep_costs(device, shape, tokens, EP_WORLD, TILES[PLANNED_TILE], link_gbps=device.rdma_gbps * 0.8)
        paper, megatron = PAPER_EP8_MS[tokens]
        add(f"{prefix}/dispatch_combine_nvlink", costs["communication_ms"], "ms",
            f"{costs['bytes_per_rank'] / 1e6:.1f} MB per rank at {device.nvlink_gbps:.0f} GB/s x "
            f"{device.nvlink_efficiency} per direction")
        add(f"{prefix}/compute", costs["compute_ms"], "ms", f"useful FLOPs per rank at {PLANNED_TILE}'s ceiling")
        add(f"{prefix}/layer_overlapped", costs["overlapped_ms"], "ms",
            f"max(communication, compute); the paper measured {paper} ms (FlashMoE), {megatron} ms (Megatron)")
        add(f"{prefix}/layer_serialized", costs["serialized_ms"], "ms", "communication + compute, no overlap")
        add(f"{prefix}/dispatch_combine_rdma", rdma["communication_ms"], "ms",
            f"across nodes: one {device.rdma_gbps:.0f} GB/s NIC per GPU x 0.8")
    return rows


def render_tsv(devices: Sequence[str] = tuple(DEVICES)) -> str:
    lines = ["# flashmoe performance model: PREDICTIONS, not measurements (python -m flashmoe.bench.model --write)",
             "\t".join(TSV_HEADER)]
    for name in devices:
        lines.extend(row.tsv() for row in predictions(DEVICES[name]))
    return "\n".join(lines) + "\n"


def render_table(devices: Sequence[str]) -> str:
    lines = ["# PREDICTIONS from the design (flashmoe.bench.model); nothing here was measured"]
    for name in devices:
        device = DEVICES[name]
        lines.append(f"# {device.label}: {device.sms} SMs, {device.bf16_tflops:g} TFLOP/s bf16, "
                     f"{device.hbm_gbps:g} GB/s HBM, NVLink {device.nvlink_gbps:g} GB/s per direction")
        for row in predictions(device):
            lines.append(f"{row.case:66s} {row.value:>10.4g} {row.unit:9s} {row.basis}")
    return "\n".join(lines) + "\n"


MARKDOWN_BEGIN = "<!-- perf-model-table: python -m flashmoe.bench.model --markdown -->"
MARKDOWN_END = "<!-- end perf-model-table -->"


def render_markdown() -> str:
    """The predicted table of docs/cuda_kernel.md, both devices side by side (a test keeps the doc current)."""
    names = list(DEVICES)
    by_device = {name: predictions(DEVICES[name]) for name in names}
    lines = [MARKDOWN_BEGIN, "| case (all PREDICTED) | " + " | ".join(DEVICES[n].label.replace("NVIDIA ", "")
                                                                     for n in names) + " | unit |",
             "|---|" + "---:|" * len(names) + "---|"]
    for index, row in enumerate(by_device[names[0]]):
        values = " | ".join(f"{by_device[name][index].value:.4g}" for name in names)
        lines.append(f"| `{row.case}` | {values} | {row.unit} |")
    lines.append(MARKDOWN_END)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Predicted beside measured: which flashmoe-bench row (config, T, backend) and key checks a case.
# The kernel that runs today is the one "today" predicts; the planned rows are shown for reference.
CHECKS: Tuple[Tuple[str, str, int, str, str, float], ...] = (
    ("fixed_cost/today", FIXED_COST_SHAPE.name, 1, "native", "median_ms", 1e3),
    *[(f"decode/{c}/T={t}/today", c, t, "native", "median_ms", 1e3) for c in DECODE_CONFIGS for t in DECODE_TOKENS],
    *[(f"decode/{c}/T={t}/weight_floor", c, t, "native", "weight_floor_ms", 1e3)
      for c in DECODE_CONFIGS for t in DECODE_TOKENS],
    *[(f"decode/{c}/T={t}/today_over_floor", c, t, "native", "over_weight_floor", 1.0)
      for c in DECODE_CONFIGS for t in DECODE_TOKENS],
    (f"prefill/{PREFILL[0]}/T={PREFILL[1]}/today", PREFILL[0], PREFILL[1], "native", "median_ms", 1.0),
    (f"prefill/{PREFILL[0]}/T={PREFILL[1]}/dense_cublas", PREFILL[0], PREFILL[1], "dense-matmul-floor", "median_ms", 1.0),
    (f"prefill/{PREFILL[0]}/T={PREFILL[1]}/grouped_mm", PREFILL[0], PREFILL[1], "grouped-mm", "median_ms", 1.0),
    (f"prefill/{PREFILL[0]}/T={PREFILL[1]}/today_dense_fraction", PREFILL[0], PREFILL[1], "native",
     "dense_fraction", 1.0),
)


def device_for(name: Optional[str]) -> Tuple[str, str]:
    """The model's device for a torch device name, and a note when it is only the nearest one."""
    text = (name or "").upper()
    if "H200" in text:
        return "h200", ""
    if "H100" in text:
        note = "" if ("SXM" in text or "HBM3" in text or text.strip() == "NVIDIA H100") else \
            f"note: the model is for the H100 SXM; {name} has other clocks and bandwidth"
        return "h100-sxm", note
    return "h100-sxm", f"note: no model for {name or 'an unknown device'}; showing the H100 SXM's"


def compare(paths: Sequence[str], device_name: Optional[str] = None) -> str:
    from .targets import load_rows

    rows = load_rows(list(paths))
    measured_device = next((row["device_name"] for row in rows if row.get("device_name")), None)
    name, note = (device_name, "") if device_name else device_for(measured_device)
    predicted = {row.case: row for row in predictions(DEVICES[name])}
    lines = [f"# predicted (flashmoe.bench.model, {DEVICES[name].label}) beside measured "
             f"(flashmoe-bench, {measured_device or '?'}); measured/predicted > 1: slower than predicted"]
    if note:
        lines.append(f"# {note}")
    lines.append(f"{'case':50s} {'predicted':>11s} {'measured':>11s} {'meas/pred':>9s}  unit")
    for case, config, tokens, backend, key, scale in CHECKS:
        prediction = predicted[case]
        match = [row for row in rows if row.get("config") == config and row.get("tokens") == tokens
                 and row.get("backend") == backend and row.get("dtype") == "bf16"
                 and row.get("routing", "uniform") == "uniform" and row.get("status") == "ok"
                 and row.get(key) is not None]
        if match:
            value = match[0][key] * scale
            lines.append(f"{case:50s} {prediction.value:11.4g} {value:11.4g} {value / prediction.value:9.2f}  "
                         f"{prediction.unit}")
        else:
            lines.append(f"{case:50s} {prediction.value:11.4g} {'no data':>11s} {'-':>9s}  {prediction.unit}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashmoe.bench.model",
        description="The persistent kernel's performance model (PREDICTIONS from its design, not measurements): "
                    "fixed cost per call, scheduler task rate, tile ceilings, decode and prefill times against "
                    "the weight floor, cuBLAS and torch._grouped_mm, and the EP dispatch+combine cost "
                    "(docs/cuda_kernel.md, 'Performance model').")
    parser.add_argument("--device", choices=list(DEVICES), action="append",
                        help="model this device (repeatable; default: all)")
    parser.add_argument("--write", nargs="?", const=TSV_PATH, metavar="PATH",
                        help=f"write the predictions as TSV (device, case, prediction, unit, basis) to PATH "
                             f"(default {TSV_PATH}, relative to the current directory)")
    parser.add_argument("--compare", nargs="+", metavar="JSON",
                        help="flashmoe-bench --json files: print each checked prediction beside its measurement "
                             "(the device is read from the files unless --device names one)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the predicted table of docs/cuda_kernel.md (every device)")
    args = parser.parse_args(argv)
    devices = args.device or list(DEVICES)
    if args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    if args.compare:
        for name in (args.device or [None]):
            sys.stdout.write(compare(args.compare, name))
        return 0
    if args.write:
        text = render_tsv(devices)
        with open(args.write, "w", newline="\n") as handle:
            handle.write(text)
        print(f"wrote {args.write}: {text.count(chr(10)) - 2} predictions")
        return 0
    sys.stdout.write(render_table(devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
