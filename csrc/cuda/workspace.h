// The workspace of one CUDA call: byte offsets of every buffer the persistent kernel uses, in one
// allocation from the torch caching allocator. Host-testable arithmetic, like core/heap_layout.h.
//
//   control   [zeroed by a memset node each call]
//     inbox_ready      uint32 [inbox_capacity]   sequence number of a posted message
//     inbox            Message [inbox_capacity]  the scheduler's inbox (completions, arrivals)
//     counters         uint32 [kCounters]        inbox tail and head, return flags seen
//     doorbells        uint32 [processors]       sequence number of the processor's current task
//     gate_done        uint32 [token_tiles]      gate tasks finished per token tile (tasks.cuh gate_task)
//   heap      HeapLayout of world size 1; its flags (first 2·flags_bytes) are zeroed with the control.
//             Under expert parallelism (world > 1) the heap is not here: every rank's heap outlives
//             the call (peers write into it), and its flags are never zeroed again (device epochs)
//   task_slots          Task [processors]
//   tile_counts         int32 [token_tiles][E]    expert histogram of each gate tile
//   tile_base           int32 [token_tiles][E]    first slot of each gate tile, per expert
//   expert_offsets      int32 [E]                 first dispatch row of each expert
//   admitted            int32 [E]                 admitted rows of each expert
//   scores              float [T][scores_per_token] (route_token's scratch: E, plus 2 per group under a group limit)
//   pick_row            int32 [T·k]               dispatch row of each pick, -1 when dropped
//   gather_rows         int32 [region_rows]       the token of each row this rank sends itself: its
//                                                 own cells' GEMM0s read x, no copy (tasks.cuh)
//   scheduler_state     SchedulerState            only when it does not fit CTA 0's shared memory
//   h                   dtype [region_rows][I]    the intermediate activation, one row per dispatch row
//   shared_h            dtype [T][S]              the shared expert's intermediate activation  } with a shared
//   shared_out          dtype [T][H]              its output of every token                     } expert only
//   shared_weight       float [T]                 σ(x·shared_gateᵀ) of every token (with its gate)
//
// C = W·L = E cells, cell c = (source c / L, local expert c % L), plus one (index E) for the shared
// expert: an always-on cell of the T tokens, read straight from x, never dispatched or signalled.
#pragma once

#include <cstdint>

#include "core/checked.h"
#include "core/dtype.h"
#include "core/heap_layout.h"
#include "core/problem.h"
#include "core/task.h"
#include "core/tiling.h"

namespace flashmoe::cuda {

// The tiles of the GPU: one warpgroup owns a 64×64 accumulator; a task covers a few of them.
// Fixed numbers, so every output element's arithmetic is the same for any grid size.
FLASHMOE_HD Tiling gpu_tiling() {
  Tiling tiling;
  tiling.row_tile = 128;
  tiling.ffn_tile = 128;
  tiling.hidden_tile = 128;
  tiling.token_tile = 64;
  return tiling;
}

// One message of the scheduler's inbox.
struct Message {
  int32_t kind;  // MessageKind
  int32_t a;     // completion: processor; arrival: expert
  int32_t b;     // arrival: rows
  int32_t c;     // arrival: first row
};

enum MessageKind : int32_t { kCompletion = 1, kArrival = 2, kCombineReady = 3, kAbort = 4 };

// Shared memory of CTA 0 that the scheduler's state may take (CTA 0 runs no tiles; every CTA has
// kTileSmemBytes, actors.cuh checks that this fits).
constexpr int64_t kSchedulerSmemBytes = 48 * 1024;

// The scheduler's private state (actors.cuh Scheduler): int32 arrays back to back, sized by what
// one call can need. No other thread reads it, so it lives in CTA 0's shared memory when it fits.
struct SchedulerState {
  enum Array : int32_t {
    idle, running_kind, running_cell, running_tile, rung,          // [processors]
    cell_rows, cell_first_row, cell_tile_base, gemm1_left, gemm0_queue, returns_pending,  // [cells]
    gemm0_left, gemm1_queue, tile_cell,                             // [row tiles]
    kArrays
  };
  int64_t processors = 0, cells = 0, row_tiles = 0;

  FLASHMOE_HD int64_t length(int32_t array) const {
    return array < cell_rows ? processors : array < gemm0_left ? cells : row_tiles;
  }
  FLASHMOE_HD int64_t offset(int32_t array) const {  // in int32 elements
    int64_t at = 0;
    for (int32_t a = 0; a < array; ++a) at += length(a);
    return at;
  }
  template <typename N>
  FLASHMOE_HD static N bytes(N processors, N cells, N row_tiles) {
    return N(4) * (N(5) * processors + N(6) * cells + N(3) * row_tiles);
  }
  FLASHMOE_HD int64_t bytes() const { return bytes<int64_t>(processors, cells, row_tiles); }
};

enum Counter : int32_t { kInboxTail = 0, kInboxHead = 1, kReturnsSeen = 2, kAborted = 3, kCounters = 8 };

struct Workspace {
  static constexpr int64_t kAlignment = 256;

  int64_t processors = 0;
  int64_t world = 1;       // ranks of expert parallelism; this rank holds L = E / world experts
  int64_t max_tokens = 0;  // the most tokens any rank brings (the heap's rows per source); 0: tokens
  int64_t tokens = 0;
  int64_t experts = 0;
  int64_t top_k = 0;
  int64_t hidden = 0;
  int64_t ffn = 0;
  int64_t shared_ffn = 0;  // S, 0 without a shared expert
  int64_t element_size = 0;
  int64_t scores_per_token = 0;  // route_scratch(problem); 0 means E

  // Offsets, filled by plan().
  int64_t inbox_ready = 0, inbox = 0, counters = 0, doorbells = 0, gate_done = 0, control_end = 0;
  int64_t heap = 0, heap_flags_end = 0;
  int64_t task_slots = 0, tile_counts = 0, tile_base = 0, expert_offsets = 0, admitted = 0, scores = 0;
  int64_t pick_row = 0, gather_rows = 0, scheduler_state = 0, h = 0, shared_h = 0, shared_out = 0, shared_weight = 0, total = 0;
  // Shared memory the scheduler's state may take in CTA 0; the tests set 0 to run it from the workspace.
  int64_t scheduler_smem_bytes = kSchedulerSmemBytes;

  FLASHMOE_HD static int64_t align(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

  FLASHMOE_HD int64_t token_tiles() const { return gpu_tiling().token_tiles(tokens); }
  FLASHMOE_HD int64_t heap_tokens() const { return max_tokens > 0 ? max_tokens : tokens; }
  FLASHMOE_HD int64_t local_experts() const { return experts / world; }
  FLASHMOE_HD bool heap_in_workspace() const { return world == 1; }
  // Row tiles of all cells of one call together: the W·L = E cells share at most W·max_tokens·min(k, L)
  // admitted rows (each source sends at most its tokens·min(k, L) rows here; at W = 1, T·min(k, E)),
  // and Σ ceil(rows/row_tile) over E cells ≤ (rows + (row_tile − 1)·E) / row_tile; plus the shared
  // expert's ceil(T/row_tile).
  template <typename N = int64_t>
  FLASHMOE_HD N row_tile_capacity() const {
    const int64_t local = local_experts();
    const N row_tile = N(gpu_tiling().row_tile), picks = N(top_k < local ? top_k : local);
    const N experts_tiles = (N(world) * N(heap_tokens()) * picks + (row_tile - N(1)) * N(experts)) / row_tile;
    return experts_tiles + (shared_ffn > 0 ? gpu_tiling().row_tiles<N>(tokens) : N(0));
  }
  FLASHMOE_HD SchedulerState scheduler_layout() const {
    return SchedulerState{processors, cells(), row_tile_capacity()};
  }
  // The scheduler's state lives in CTA 0's shared memory when it fits, else in the workspace.
  FLASHMOE_HD bool scheduler_in_smem() const { return scheduler_layout().bytes() <= scheduler_smem_bytes; }
  // Every processor has at most one completion in flight, every cell one arrival, plus the combine.
  FLASHMOE_HD int64_t inbox_capacity() const { return processors + experts + 1; }
  // The scheduler's cells: one per expert, and the shared expert's (index E) when there is one.
  FLASHMOE_HD int64_t cells() const { return experts + (shared_ffn > 0 ? 1 : 0); }

  FLASHMOE_HD HeapLayout heap_layout() const {
    return HeapLayout{ExpertPlacement{world, experts}, heap_tokens(), top_k, hidden, element_size};
  }
  FLASHMOE_HD int64_t region_rows() const { return heap_layout().region_rows(); }
  // Rows of h: one per row this rank can receive, region by region (source s's row r is s·region_rows + r).
  template <typename N = int64_t>
  FLASHMOE_HD N h_rows() const { return N(world) * heap_layout().region_rows<N>(); }

  // Lays the buffers out back to back in number type N and returns the total; with N = int64_t
  // and `record`, also stores each offset there. One list of buffers serves plan() and check().
  template <typename N>
  FLASHMOE_HD N lay_out(Workspace* record) const {
    N at = N(0);
    auto take = [&](int64_t Workspace::*field, N bytes) {
      if (record) record->*field = plain_value(at);
      at = at + HeapLayout::align<N>(bytes);
    };
    const N four = N(4);
    const N token_tiles_n = gpu_tiling().token_tiles<N>(tokens);
    const N inbox_capacity_n = N(processors) + N(experts) + N(1);
    const N cells_n = N(cells());
    const N shared_tokens = shared_ffn > 0 ? N(tokens) : N(0);
    const HeapLayout layout = heap_layout();
    take(&Workspace::inbox_ready, inbox_capacity_n * four);
    take(&Workspace::inbox, inbox_capacity_n * N(int64_t(sizeof(Message))));
    take(&Workspace::counters, N(kCounters) * four);
    take(&Workspace::doorbells, N(processors) * four);
    take(&Workspace::gate_done, token_tiles_n * four);
    if (record) record->control_end = plain_value(at);
    take(&Workspace::heap, heap_in_workspace() ? layout.total_bytes<N>() : N(0));
    if (record) record->heap_flags_end = heap_in_workspace() ? record->heap + 2 * layout.flags_bytes() : record->heap;
    take(&Workspace::task_slots, N(processors) * N(int64_t(sizeof(Task))));
    take(&Workspace::tile_counts, token_tiles_n * N(experts) * four);
    take(&Workspace::tile_base, token_tiles_n * N(experts) * four);
    take(&Workspace::expert_offsets, N(experts) * four);
    take(&Workspace::admitted, N(experts) * four);
    take(&Workspace::scores, N(tokens) * N(scores_per_token > 0 ? scores_per_token : experts) * four);
    take(&Workspace::pick_row, N(tokens) * N(top_k) * four);
    take(&Workspace::gather_rows, layout.region_rows<N>() * four);
    const N scheduler_bytes = SchedulerState::bytes<N>(N(processors), cells_n, row_tile_capacity<N>());
    take(&Workspace::scheduler_state, scheduler_bytes > N(scheduler_smem_bytes) ? scheduler_bytes : N(0));
    take(&Workspace::h, h_rows<N>() * N(ffn) * N(element_size));
    take(&Workspace::shared_h, shared_tokens * N(shared_ffn) * N(element_size));
    take(&Workspace::shared_out, shared_tokens * N(hidden) * N(element_size));
    take(&Workspace::shared_weight, shared_tokens * four);
    if (record) record->total = plain_value(at);
    return at;
  }

  FLASHMOE_HD Workspace& plan() {
    lay_out<int64_t>(this);
    return *this;
  }

  // Host: throws SizeError naming the argument when a buffer's size, or the total, overflows.
  void check() const {
    heap_layout().check();
    require_size(lay_out<CheckedInt>(nullptr), "tokens", tokens, "the CUDA workspace's bytes");
  }

  // Bytes the memset node clears before the launch: the control block, and at world size 1 the heap's flags.
  FLASHMOE_HD int64_t zeroed_bytes() const { return heap_flags_end; }
};

}  // namespace flashmoe::cuda
