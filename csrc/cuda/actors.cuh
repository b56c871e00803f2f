// The actors of the persistent kernel (DESIGN.md): CTA 0 is the OS CTA — thread 0 is the scheduler,
// warps 1..3 are subscribers — and every other CTA is a processor driven by its doorbell.
//
//   processor p:  waits for doorbells[p] to change, runs task_slots[p], posts a completion.
//   scheduler:    in rounds: books at most kDrainPerRound messages of its inbox, tracks the task
//                 dependencies and the task-count bound (core/task_bound.h) in its private state
//                 (CTA 0's shared memory), hands ready tasks to idle processors, publishes the round
//                 with one fence, and stops the processors when the completed count meets the bound.
//                 At world size 1 it books its own cells' arrivals and returns directly.
//   subscribers:  the flag path for cells of peers: their dispatch signals become arrivals for the
//                 scheduler; they wait for every peer's return signal and release the combine.
//
// A shared expert is one more cell (index E) of the T tokens, read from x: the scheduler opens it
// itself once every gate task is handed out, runs its GEMM0/GEMM1 tiles like any cell's, and opens
// the combine only when it and every return signal are done.
//
// The inbox is a ring of Message with a sequence number per slot, filled through one atomic tail.
// At most processors + experts + 1 messages are ever in flight, so a producer never waits for room
// in practice; it still acquires the scheduler's released head before it overwrites a slot, which
// is what orders its write after the scheduler's read of the slot's previous message.
#pragma once

#include <cstdint>

#include "core/signal_word.h"
#include "core/task.h"
#include "cuda/kernel_error.h"
#include "cuda/kernel_params.h"
#include "cuda/memory_order.cuh"
#include "cuda/tasks.cuh"

namespace flashmoe::cuda {

static_assert(kSchedulerSmemBytes <= kTileSmemBytes, "the scheduler's state fits the shared memory every CTA has");

struct Control {
  uint32_t* inbox_ready;
  Message* inbox;
  uint32_t* counters;
  uint32_t* doorbells;
  Task* task_slots;
  int64_t inbox_capacity;
  uint64_t wait_limit_ns;

  FLASHMOE_DEVICE explicit Control(const KernelParams& params) {
    uint8_t* base = static_cast<uint8_t*>(params.pointers.workspace);
    const Workspace& w = params.workspace;
    inbox_ready = reinterpret_cast<uint32_t*>(base + w.inbox_ready);
    inbox = reinterpret_cast<Message*>(base + w.inbox);
    counters = reinterpret_cast<uint32_t*>(base + w.counters);
    doorbells = reinterpret_cast<uint32_t*>(base + w.doorbells);
    task_slots = reinterpret_cast<Task*>(base + w.task_slots);
    inbox_capacity = w.inbox_capacity();
    wait_limit_ns = params.local_wait_limit_ns();
  }

  // Any thread: the caller's earlier writes are visible to whoever reads the message. `system`:
  // they include stores to a peer's heap, released at system scope, so that the scheduler's
  // flag for that peer carries them (docs/protocol.md §8.2).
  FLASHMOE_DEVICE void post(Message message, bool system = false) const {
    const uint32_t index = atomicAdd(&counters[kInboxTail], 1u);
    spin_until([&] { return int64_t(index) < int64_t(ld_poll(&counters[kInboxHead])) + inbox_capacity; },
               "inbox room", 32, wait_limit_ns);
    const int64_t slot = int64_t(index) % inbox_capacity;
    inbox[slot] = message;
    if (system) st_release_sys(&inbox_ready[slot], index + 1);
    else st_release(&inbox_ready[slot], index + 1);
  }
};

// Processor `self` (CTA self + 1 of its rank).
template <Math M>
FLASHMOE_DEVICE void processor(const KernelParams& params, int32_t self, uint8_t* smem, Task& task,
                               uint32_t& shared_sequence) {
  const Buffers<M> buffers(params);
  const Control control(params);
  const int64_t token_tile = gpu_tiling().token_tile;
  uint32_t sequence = 0;
  bool remote = false;  // the task wrote to a peer's heap
  while (true) {
    if (threadIdx.x == 0) {
      uint32_t rung = 0;
      spin_until([&] { return (rung = ld_poll(&control.doorbells[self])) != sequence; }, "processor doorbell", 64,
                 params.local_wait_limit_ns());
      task = control.task_slots[self];
      shared_sequence = rung;
    }
    __syncthreads();
    sequence = shared_sequence;
    if (task.kind == TaskKind::stop) {
      // An aborted call's stop carries a slice of y's bytes to fill with NaN (all ones is a NaN in
      // every float format): no caller can mistake its output for a result.
      uint8_t* y = static_cast<uint8_t*>(params.pointers.y);
      for (int64_t i = task.column_begin + threadIdx.x; i < task.column_begin + task.columns; i += kThreads) {
        y[i] = 0xff;
      }
      return;
    }
    switch (task.kind) {
      case TaskKind::gate:
        // A call of one token tile (decode) routes and dispatches in the gate task that routes the
        // tile: two hand-offs fewer on the critical path (Scheduler::fused).
        if (gate_task<M>(buffers, smem, task, task.column_begin / token_tile) && params.workspace.token_tiles() == 1) {
          __syncthreads();
          route_task<M>(buffers, 1);
          __syncthreads();
          remote = dispatch_task<M>(buffers, task.column_begin, task.columns, 0);
        }
        break;
      case TaskKind::route:
        route_task<M>(buffers, params.workspace.token_tiles());
        break;
      case TaskKind::dispatch:
        remote = dispatch_task<M>(buffers, task.column_begin, task.columns, task.column_begin / token_tile);
        break;
      case TaskKind::gemm0:
        gemm0_task<M>(buffers, smem, task);
        break;
      case TaskKind::gemm1:
        remote = gemm1_task<M>(buffers, smem, task);
        break;
      case TaskKind::combine:
        combine_task<M>(buffers, task.column_begin, task.columns);
        break;
      default:
        break;
    }
    // No fence per thread: the barrier orders every thread's writes of the task before thread 0's
    // release of the completion, which is cumulative (docs/protocol.md §8.1); at system scope when
    // any thread wrote to a peer's heap (__syncthreads_or: thread 0 learns whether one did).
    remote = __syncthreads_or(remote);
    if (threadIdx.x == 0) {
      FLASHMOE_COUNT(tasks, 1);
      control.post(Message{kCompletion, self, 0, 0}, remote);
    }
    remote = false;
  }
}

// The scheduler's bookkeeping, all in its own thread, in SchedulerState's arrays (workspace.h): in
// CTA 0's shared memory when they fit, else in the workspace. No other thread touches them, and the
// scheduler never reads back from global memory what it wrote there itself.
struct Scheduler {
  // Messages booked per round at most before work is handed out: a burst of completions (one per
  // processor, hundreds at a time) does not keep the processors it frees idle until it is all read.
  static constexpr int kDrainPerRound = 32;

  const KernelParams& params;
  const Control& control;
  uint8_t* base;
  const int32_t *admitted, *expert_offsets;  // the route stage's, per expert (workspace.h)
  uint32_t epoch;  // this call's (kernel_body)
  int64_t rank, world, local;  // expert parallelism: this rank of `world`, L local experts each
  Tiling tiling = gpu_tiling();
  int64_t tiles, gate_tasks, ffn_tiles, hidden_tiles, shared_ffn_tiles, row_tile_capacity;
  // [processors]: the idle stack; what each one runs (its task's kind, cell, row tile in the cell);
  // how often its doorbell was rung.
  int32_t *idle, *running_kind, *running_cell, *running_tile, *rung;
  // [cells]: rows, first dispatch row, first row tile (in the row-tile arrays), GEMM1s left; the
  // queue of cells whose GEMM0s wait; the peers' cells done whose return flags wait for the round.
  int32_t *cell_rows, *cell_first_row, *cell_tile_base, *gemm1_left, *gemm0_queue, *returns_pending;
  // [row tiles], numbered in the order their cells open: GEMM0s left, the queue of row tiles whose
  // GEMM1s wait, and each one's cell.
  int32_t *gemm0_left, *gemm1_queue, *tile_cell;
  int64_t row_tiles_open = 0;
  int64_t idle_count = 0;
  int64_t gate_next = 0, gates_left = 0;
  bool route_ready = false, route_issued = false, dispatch_open = false;
  // One token tile: the gate task that routes it also runs the route and the dispatch (processor()),
  // so the last gate's completion means every row is in place; no route or dispatch task exists.
  bool fused = false;
  int64_t dispatch_next = 0, dispatches_left = 0;
  int64_t gemm0_head = 0, gemm0_tail = 0, gemm0_cursor = 0;
  int64_t gemm1_head = 0, gemm1_tail = 0, gemm1_cursor = 0;
  bool combine_open = false, returns_done = true, shared_pending = false;
  bool signal_dispatch = false;     // the dispatch flags to peers wait for the round's fence
  int64_t returns_pending_count = 0;
  int64_t combine_next = 0, combine_tasks = 1;
  int64_t cells_left = 0;  // cells of this rank's tokens (own source, the shared expert's) not yet complete
  bool aborted = false;    // a subscriber gave up on a peer (kernel_error.h): stop now
  int64_t bound = 0;       // the task-count bound, corrected as cells arrive
  int64_t done = 0;        // tasks completed

  FLASHMOE_DEVICE Scheduler(const KernelParams& p, const Control& c, int32_t* state, uint32_t call_epoch)
      : params(p), control(c), epoch(call_epoch) {
    base = static_cast<uint8_t*>(p.pointers.workspace);
    const Workspace& w = p.workspace;
    admitted = reinterpret_cast<const int32_t*>(base + w.admitted);
    expert_offsets = reinterpret_cast<const int32_t*>(base + w.expert_offsets);
    rank = p.ranks.rank, world = p.ranks.world, local = w.local_experts();
    tiles = w.token_tiles();
    ffn_tiles = tiling.ffn_tiles(p.problem.ffn);
    hidden_tiles = tiling.hidden_tiles(p.problem.hidden);
    shared_ffn_tiles = tiling.ffn_tiles(p.problem.shared_ffn);
    shared_pending = p.problem.has_shared_expert() && p.problem.tokens > 0;
    cells_left = local + (shared_pending ? 1 : 0);
    returns_done = world == 1;  // else the subscribers' combine-ready, once every peer's return flag is in
    const SchedulerState layout = w.scheduler_layout();
    row_tile_capacity = layout.row_tiles;
    int32_t** arrays[SchedulerState::kArrays] = {&idle, &running_kind, &running_cell, &running_tile, &rung,
                                                 &cell_rows, &cell_first_row, &cell_tile_base, &gemm1_left,
                                                 &gemm0_queue, &returns_pending, &gemm0_left, &gemm1_queue,
                                                 &tile_cell};
    for (int32_t a = 0; a < SchedulerState::kArrays; ++a) *arrays[a] = state + layout.offset(a);
    for (int32_t p_index = 0; p_index < p.processors; ++p_index) {
      idle[p_index] = p.processors - 1 - p_index;
      rung[p_index] = 0;  // the doorbells start zeroed with the control block
    }
    idle_count = p.processors;
    dispatches_left = tiles;
    gates_left = gate_tasks = tiles * GateColumns(p.problem).tiles();  // token tiles × gate column tiles
    route_ready = gates_left == 0;  // a rank with no tokens still routes (nothing) and signals every owner
    combine_tasks = tiles > 0 ? tiles : 1;  // TaskBound::combine_tasks: one even with no tokens
    fused = tiles == 1;
    // Gate, route and dispatch tasks, then the protocol's cells at their largest and the combine.
    bound = gate_tasks + (fused ? 0 : tiles + 1) + p.bound.initial(p.problem.tokens);
  }

  FLASHMOE_DEVICE Task token_task(TaskKind kind, int64_t tile) const {
    Task task;
    task.kind = kind;
    task.epoch = epoch;
    task.column_begin = tile * tiling.token_tile;
    const int64_t left = params.problem.tokens - task.column_begin;
    task.columns = left < tiling.token_tile ? left : tiling.token_tile;
    return task;
  }

  FLASHMOE_DEVICE Task cell_task(TaskKind kind, int32_t cell, int64_t row_tile, int64_t column_tile, int64_t width) const {
    Task task;
    task.kind = kind;
    task.epoch = epoch;
    task.local_expert = cell;
    task.row_tile = int32_t(row_tile);
    task.first_row = cell_first_row[cell] + row_tile * tiling.row_tile;
    const int64_t rows_left = cell_rows[cell] - row_tile * tiling.row_tile;
    task.rows = rows_left < tiling.row_tile ? rows_left : tiling.row_tile;
    const int64_t tile_width = kind == TaskKind::gemm0 ? tiling.ffn_tile : tiling.hidden_tile;
    task.column_begin = column_tile * tile_width;
    const int64_t columns_left = width - task.column_begin;
    task.columns = columns_left < tile_width ? columns_left : tile_width;
    return task;
  }

  FLASHMOE_DEVICE bool is_shared(int64_t cell) const { return cell == params.problem.experts; }
  // GEMM0 width of a cell: I, or S for the shared expert's.
  FLASHMOE_DEVICE int64_t cell_ffn(int64_t cell) const { return is_shared(cell) ? params.problem.shared_ffn : params.problem.ffn; }
  FLASHMOE_DEVICE int64_t cell_ffn_tiles(int64_t cell) const { return is_shared(cell) ? shared_ffn_tiles : ffn_tiles; }

  // A cell of `rows` > 0 rows from `first_row` is ready: its row tiles take the next numbers, and
  // its GEMM0s join the queue.
  FLASHMOE_DEVICE void open_cell(int32_t cell, int64_t rows, int64_t first_row) {
    const int64_t row_tiles = tiling.row_tiles(rows);
    if (row_tiles_open + row_tiles > row_tile_capacity) {  // Workspace::row_tile_capacity is a bound, not a guess
#if FLASHMOE_BOUNDED_WAITS
      printf("flashmoe: scheduler row tiles exceed their capacity %lld\n", static_cast<long long>(row_tile_capacity));
#endif
      __trap();
    }
    cell_rows[cell] = int32_t(rows);
    cell_first_row[cell] = int32_t(first_row);
    cell_tile_base[cell] = int32_t(row_tiles_open);
    for (int64_t tile = 0; tile < row_tiles; ++tile) {
      gemm0_left[row_tiles_open + tile] = int32_t(cell_ffn_tiles(cell));
      tile_cell[row_tiles_open + tile] = cell;
    }
    row_tiles_open += row_tiles;
    gemm1_left[cell] = int32_t(row_tiles * hidden_tiles);
    gemm0_queue[gemm0_tail++] = cell;
  }

  // The shared expert's cell: rows 0..T-1 (token order), ready as soon as it is opened.
  FLASHMOE_DEVICE void open_shared_cell() {
    shared_pending = false;
    open_cell(int32_t(params.problem.experts), params.problem.tokens, 0);
  }

  // The next ready task, most advanced stage first so that buffers drain; false if none is ready.
  FLASHMOE_DEVICE bool next_task(Task& task) {
    if (combine_open && combine_next < combine_tasks) {
      task = token_task(TaskKind::combine, combine_next++);
      return true;
    }
    if (gemm1_head < gemm1_tail) {
      const int32_t row_tile = gemm1_queue[gemm1_head], cell = tile_cell[row_tile];
      task = cell_task(TaskKind::gemm1, cell, row_tile - cell_tile_base[cell], gemm1_cursor, params.problem.hidden);
      if (++gemm1_cursor == hidden_tiles) gemm1_cursor = 0, ++gemm1_head;
      return true;
    }
    if (gemm0_head < gemm0_tail) {
      const int32_t expert = gemm0_queue[gemm0_head];
      const int64_t column_tiles = cell_ffn_tiles(expert);
      task = cell_task(TaskKind::gemm0, expert, gemm0_cursor / column_tiles, gemm0_cursor % column_tiles,
                       cell_ffn(expert));
      if (++gemm0_cursor == tiling.row_tiles(cell_rows[expert]) * column_tiles) gemm0_cursor = 0, ++gemm0_head;
      return true;
    }
    if (dispatch_open && dispatch_next < tiles) {
      task = token_task(TaskKind::dispatch, dispatch_next++);
      return true;
    }
    if (route_ready && !route_issued) {
      route_issued = true;
      task = Task{};
      task.kind = TaskKind::route;
      task.epoch = epoch;
      return true;
    }
    if (gate_next < gate_tasks) {
      const int64_t column_tiles = GateColumns(params.problem).tiles();
      task = token_task(TaskKind::gate, gate_next / column_tiles);
      task.row_tile = int32_t(gate_next++ % column_tiles);  // the gate column tile
      // The gates come first (they lead to routing); the shared expert's tiles fill the wait.
      if (gate_next == gate_tasks && shared_pending) open_shared_cell();
      return true;
    }
    return false;
  }

  FLASHMOE_DEVICE void completed(int32_t processor) {
    idle[idle_count++] = processor;
    const int32_t cell = running_cell[processor];
    switch (TaskKind(running_kind[processor])) {
      case TaskKind::gate:
        route_ready = --gates_left == 0 && !fused;
        if (gates_left == 0 && fused) dispatch_done();
        break;
      case TaskKind::route:
        dispatch_open = true;
        if (tiles == 0) dispatch_done();  // no tokens: nothing to copy, every cell is empty
        break;
      case TaskKind::dispatch:
        if (--dispatches_left == 0) dispatch_done();
        break;
      case TaskKind::gemm0: {
        const int32_t row_tile = cell_tile_base[cell] + running_tile[processor];
        if (--gemm0_left[row_tile] == 0) gemm1_queue[gemm1_tail++] = row_tile;
        break;
      }
      case TaskKind::gemm1:
        if (--gemm1_left[cell] == 0) cell_done(cell);
        break;
      default:
        break;
    }
  }

  // Every row of this rank's tokens is in its owner's heap. The cells this rank sends itself go
  // straight into the bookkeeping, no flag, subscriber or inbox between; each peer's dispatch flags
  // go out with the round's fence (publish_flags).
  FLASHMOE_DEVICE void dispatch_done() {
    const int32_t first_expert = int32_t(rank * local);
    const int32_t first_offset = rank == 0 ? 0 : expert_offsets[first_expert];
    // Loaded before any bookkeeping store (which could alias them for the compiler), so the
    // loads of a chunk overlap instead of serialising behind arrived()'s stores.
    constexpr int32_t kChunk = 16;
    for (int32_t l0 = 0; l0 < int32_t(local); l0 += kChunk) {
      int32_t rows[kChunk], first_rows[kChunk];
      const int32_t left = int32_t(local) - l0, n = left < kChunk ? left : kChunk;
      FLASHMOE_UNROLL
      for (int32_t i = 0; i < kChunk; ++i) {
        if (i < n) {
          rows[i] = admitted[first_expert + l0 + i];
          first_rows[i] = expert_offsets[first_expert + l0 + i] - first_offset;
        }
      }
      for (int32_t i = 0; i < n; ++i) arrived(first_expert + l0 + i, rows[i], first_rows[i]);
    }
    FLASHMOE_COUNT(scheduler_global, 2 * local + (rank == 0 ? 0 : 1));
    signal_dispatch = world > 1;
  }

  // A cell is complete (its last GEMM1 ran, or it was empty). A cell of this rank's tokens (or the
  // shared expert's) counts toward the combine, which opens after the last once every peer's return
  // flag is in too; a peer's cell owes its source a return flag, published with the round's fence.
  FLASHMOE_DEVICE void cell_done(int32_t cell) {
    if (is_shared(cell) || cell / local == rank) cell_returned();
    else returns_pending[returns_pending_count++] = cell;
  }

  FLASHMOE_DEVICE void cell_returned() {
    --cells_left;
    combine_open = cells_left == 0 && returns_done;
  }

  // Cell `cell` (source cell / L, local expert cell % L) has `rows` rows from `first_row` of that
  // source's region: the bound drops to its real size (TaskBound::correction), and its tiles open.
  FLASHMOE_DEVICE void arrived(int32_t cell, int32_t rows, int32_t first_row) {
    bound -= params.bound.correction(rows);
    cell_rows[cell] = rows;
    cell_first_row[cell] = first_row;
    if (rows == 0) cell_done(cell);
    else open_cell(cell, rows, first_row);
  }

  FLASHMOE_DEVICE bool flags_pending() const { return signal_dispatch || returns_pending_count > 0; }

  // The rounds end when every task of the bound has completed, or, in an aborted call (tasks left:
  // its y is poisoned, the host raises), once every busy processor has completed: a task slot is
  // rewritten only after its processor read it (tasks never wait on peers, so the busy ones finish).
  FLASHMOE_DEVICE bool finished() const { return done == bound || (aborted && idle_count == params.processors); }

  // After the round's system-scope fence, relaxed stores: this rank's dispatch flag of every peer's
  // expert (rows and first row in that peer's region, empty cells included: protocol.md §3), and the
  // return flag of every peer's cell done this round.
  FLASHMOE_DEVICE void publish_flags() {
    const HeapLayout layout = params.workspace.heap_layout();
    if (signal_dispatch) {
      signal_dispatch = false;
      if (params.ranks.fault == Ranks::kVanishAfterDispatch) aborted = true;  // tests: gone once this is out
      for (int64_t owner = 0; owner < world; ++owner) {
        if (owner == rank) continue;
        const int32_t first_offset = expert_offsets[owner * local];
        for (int64_t l = 0; l < local; ++l) {
          const int64_t e = owner * local + l;
          const SignalWord word = SignalWord::make(epoch, admitted[e], expert_offsets[e] - first_offset);
          st_relaxed_sys(reinterpret_cast<uint64_t*>(params.ranks.heaps[owner] + layout.dispatch_flag(rank, l)),
                         word.bits);
        }
      }
    }
    if (params.ranks.fault == Ranks::kVanishAfterDispatch) returns_pending_count = 0;  // tests: it returns nothing
    for (int64_t i = 0; i < returns_pending_count; ++i) {
      const int32_t cell = returns_pending[i];
      const SignalWord word = SignalWord::make(epoch, cell_rows[cell], cell_first_row[cell]);
      st_relaxed_sys(reinterpret_cast<uint64_t*>(params.ranks.heaps[cell / local] +
                                                 layout.return_flag(rank, cell % local)),
                     word.bits);
    }
    returns_pending_count = 0;
  }

  // One round: take at most kDrainPerRound messages from the inbox (polls, then one acquire fence
  // for all of them), book them, hand ready tasks to idle processors, then publish the round with
  // one release fence: the inbox head (producers' room) and every doorbell rung, relaxed.
  FLASHMOE_DEVICE void run() {
    uint32_t head = 0;
    while (true) {
      int drained = 0;
      while (drained < kDrainPerRound &&
             ld_poll(&control.inbox_ready[int64_t(head + drained) % control.inbox_capacity]) == head + drained + 1) {
        ++drained;
      }
      if (drained > 0) acquire_fence();
      for (int i = 0; i < drained; ++i, ++head) {
        const Message message = control.inbox[int64_t(head) % control.inbox_capacity];
        FLASHMOE_COUNT(scheduler_global, 2);  // the poll that found it, the message
        if (message.kind == kCompletion) {
          completed(message.a);
          ++done;
        } else if (message.kind == kArrival) {  // a peer's cell: a = source · L + local expert
          arrived(message.a, message.b, message.c);
        } else if (message.kind == kAbort) {
          aborted = true;
        } else {  // kCombineReady: every peer's return flag is in
          returns_done = true;
          combine_open = cells_left == 0;
        }
      }
      int handed = 0;
      Task task;
      while (!aborted && idle_count > 0 && next_task(task)) {
        const int32_t processor = idle[--idle_count];
        control.task_slots[processor] = task;
        running_kind[processor] = int32_t(task.kind);
        running_cell[processor] = task.local_expert;
        running_tile[processor] = task.row_tile;
        ++handed;
        FLASHMOE_COUNT(scheduler_global, 1);  // the task
        FLASHMOE_COUNT(handouts, 1);
      }
      if (drained > 0 || handed > 0 || flags_pending()) {
        // Flags to peers (other GPUs) need the fence at system scope; it also serves the doorbells.
        if (flags_pending()) release_fence_sys(), publish_flags();
        else release_fence();
        if (drained > 0) st_relaxed(&control.counters[kInboxHead], head), FLASHMOE_COUNT(scheduler_global, 1);
        // This round's processors are still above the idle stack's top.
        for (int64_t i = idle_count; i < idle_count + handed; ++i) {
          st_relaxed(&control.doorbells[idle[i]], uint32_t(++rung[idle[i]]));
          FLASHMOE_COUNT(scheduler_global, 1);
        }
      }
      // Last: the round that completes the bound may still owe peers their flags (published above).
      if (finished()) break;
#if FLASHMOE_BOUNDED_WAITS  // only to name a stuck scheduler: the next round's drain acquires
      wait_until([&] { return ld_poll(&control.inbox_ready[int64_t(head) % control.inbox_capacity]) == head + 1 ||
                              finished(); }, "scheduler inbox", 0, params.local_wait_limit_ns());
#endif
    }
    // The stop broadcast: every slot, one fence, then the doorbells. An aborted call's stops each
    // carry a slice of y's bytes to poison.
    const int64_t y_bytes = aborted ? params.problem.tokens * params.problem.hidden * params.workspace.element_size : 0;
    for (int32_t processor = 0; processor < params.processors; ++processor) {
      Task& stop = control.task_slots[processor];
      stop.kind = TaskKind::stop;
      stop.column_begin = y_bytes * processor / params.processors;
      stop.columns = y_bytes * (processor + 1) / params.processors - stop.column_begin;
    }
    release_fence();
    for (int32_t processor = 0; processor < params.processors; ++processor) {
      st_relaxed(&control.doorbells[processor], uint32_t(++rung[processor]));
    }
    FLASHMOE_COUNT(scheduler_global, 2 * params.processors);
    // The next call (stream-ordered after this launch) runs the next epoch.
    if (params.ranks.epoch) *params.ranks.epoch = epoch;
  }
};

// Subscriber `index` of `count`: the flag path, for the cells that peers signal. A peer's dispatch
// signal (this call's epoch) becomes an arrival in the scheduler's inbox, cell source · L + local
// expert, and the combine waits for every peer's return flag. The flags are polled at system scope
// (a peer may be another GPU). At world size 1 there are none: the scheduler books its own cells'
// arrivals and returns directly, and the subscribers leave at once.
FLASHMOE_DEVICE void subscriber(const KernelParams& params, uint32_t epoch, int index, int count) {
  const Control control(params);
  const int64_t self = params.ranks.rank, local = params.workspace.local_experts();
  if (params.ranks.world == 1) return;
  const uint8_t* heap = params.ranks.heaps[self];
  const HeapLayout layout = params.workspace.heap_layout();
  const int64_t peer_cells = (params.ranks.world - 1) * local;
  auto peer = [&](int64_t cell) { return cell / local < self ? cell / local : cell / local + 1; };
  // A wait for a peer is bounded in every build: past peer_timeout_ns it records what it waited for
  // and aborts the call (the first subscriber to give up tells the scheduler), and every other
  // subscriber leaves its wait once the call is aborted.
  auto give_up = [&](uint32_t kind, int64_t peer_rank, int64_t expert, uint32_t detail) {
    uint32_t* status = params.ranks.status;
    if (atomicAdd(&control.counters[kAborted], 1u) != 0) return;
    status[1] = uint32_t(peer_rank), status[2] = uint32_t(expert), status[3] = (epoch & 0xffffu) | (detail << 16);
    status[0] = kind;  // the host reads the words once the launch is over
    control.post(Message{kAbort, 0, 0, 0});
  };
  // A flag holds this call's epoch (done), the previous call's or 0 (not yet written: keep
  // waiting), or anything else: the ranks are out of step (protocol.md §6b: a healthy peer cannot
  // be an epoch ahead while this rank waits), which no wait can mend.
  const uint32_t previous = SignalWord::previous_epoch(epoch);
  auto wait_for_peer = [&](const uint64_t* flag, uint64_t& bits, uint32_t kind, int64_t peer_rank, int64_t expert,
                           unsigned sleep_ns) {
    const uint64_t start = global_timer_ns();
    for (uint32_t spins = 1; !SignalWord{bits = ld_poll_sys(flag)}.is_epoch(epoch); ++spins) {
      const uint32_t seen = SignalWord{bits}.epoch();
      if (seen != previous && seen != 0) return give_up(kEpochMismatch, peer_rank, expert, seen), false;
      __nanosleep(sleep_ns);
      if (spins % 64 != 0) continue;
      if (ld_poll(&control.counters[kAborted]) != 0) return false;
      if (global_timer_ns() - start > params.ranks.peer_timeout_ns) return give_up(kind, peer_rank, expert, 0), false;
    }
    acquire_fence_sys();
    return true;
  };
  const int64_t region_rows = layout.region_rows(), max_cell_rows = params.workspace.heap_tokens();
  int64_t mine = 0;
  for (int64_t cell = index; cell < peer_cells; cell += count) {
    const int64_t source = peer(cell), expert = cell % local;
    uint64_t bits = 0;
    if (!wait_for_peer(reinterpret_cast<const uint64_t*>(heap + layout.dispatch_flag(source, expert)), bits,
                       kDispatchFlagTimeout, source, expert, 32)) {
      return;
    }
    const SignalWord word{bits};
    // What a peer announces is checked before it sizes anything here (the bound, the cell's tiles).
    if (word.rows() > max_cell_rows || word.first_row() + word.rows() > region_rows) {
      give_up(kBadSignal, source, expert, uint32_t(word.rows()));
      return;
    }
    control.post(Message{kArrival, int32_t(source * local + expert), int32_t(word.rows()), int32_t(word.first_row())});
    ++mine;
  }
  for (int64_t cell = index; cell < peer_cells; cell += count) {
    uint64_t bits = 0;
    if (!wait_for_peer(reinterpret_cast<const uint64_t*>(heap + layout.return_flag(peer(cell), cell % local)), bits,
                       kReturnFlagTimeout, peer(cell), cell % local, 64)) {
      return;
    }
  }
  // acq_rel: the last subscriber's combine-ready release must carry what every other subscriber
  // acquired from its return flags.
  if (mine > 0 &&
      atomic_add_acq_rel(&control.counters[kReturnsSeen], uint32_t(mine)) + uint32_t(mine) == uint32_t(peer_cells)) {
    control.post(Message{kCombineReady, 0, 0, 0});
  }
}

// The whole kernel, one CTA's part: `smem` is this CTA's kTileSmemBytes, 1024-byte aligned;
// `task` and `sequence` live in its shared memory.
// `block` is the CTA's index among its rank's (blockIdx.x, or its place in a loopback launch's
// share). The OS CTA keeps the call's epoch in its `task`: at world size 1 params.epoch; else the
// next of the rank's epoch word, which the scheduler stores back when the call is done.
template <Math M>
FLASHMOE_DEVICE void kernel_body(const KernelParams& params, int32_t block, uint8_t* smem, Task& task,
                                 uint32_t& sequence) {
  if (block == 0) {
    const Control control(params);
    // Thread 0 (the scheduler): whether an earlier call left an error (kernel_error.h: sticky), so
    // that this one aborts before it starts; the subscribers learn it from the aborted counter.
    const bool refused = threadIdx.x == 0 && params.ranks.status && params.ranks.status[0] != kNoError;
    if (threadIdx.x == 0) {
      task.epoch = params.ranks.epoch ? SignalWord::next_epoch(*params.ranks.epoch) : params.epoch;
      if (refused) control.counters[kAborted] = 1;
    }
    __syncthreads();
    const uint32_t epoch = task.epoch;
    if (threadIdx.x == 0) {
      const Workspace& w = params.workspace;
      int32_t* state = reinterpret_cast<int32_t*>(
          w.scheduler_in_smem() ? smem : static_cast<uint8_t*>(params.pointers.workspace) + w.scheduler_state);
      Scheduler scheduler(params, control, state, epoch);
      scheduler.aborted = refused;
      scheduler.run();
    } else if (threadIdx.x >= 32) {
      subscriber(params, epoch, int(threadIdx.x) - 32, kThreads - 32);
    }
    return;
  }
  processor<M>(params, block - 1, smem, task, sequence);
}

}  // namespace flashmoe::cuda
