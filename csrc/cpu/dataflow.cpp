#include "cpu/dataflow.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "core/capacity.h"
#include "core/heap_layout.h"
#include "core/routing.h"
#include "core/signal_word.h"
#include "core/task.h"
#include "core/task_bound.h"
#include "cpu/expert_tiles.h"
#include "cpu/source_steps.h"
#include "cpu/thread_pool.h"
#include "cpu/tile_gemm.h"

namespace flashmoe::cpu {
namespace {

// Flags live in raw heap bytes, as NVSHMEM signals do; these are the only accesses to them.
uint64_t load_acquire(const std::byte* address) {
  return __atomic_load_n(reinterpret_cast<const uint64_t*>(address), __ATOMIC_ACQUIRE);
}
void store_release(std::byte* address, uint64_t value) {
  __atomic_store_n(reinterpret_cast<uint64_t*>(address), value, __ATOMIC_RELEASE);
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Thrown by a member that stops because another member failed; never leaves the runtime.
struct Aborted {};

struct AlignedFree {
  void operator()(std::byte* bytes) const { std::free(bytes); }
};
using HeapBytes = std::unique_ptr<std::byte[], AlignedFree>;

// Where a rank's heap lies in this process: memory the cluster owns, or a transport's mapping.
struct HeapAddress {
  std::byte* base = nullptr;
  std::byte* get() const { return base; }
};

HeapBytes aligned_bytes(int64_t bytes) {
  const size_t size = size_t(HeapLayout::align(std::max<int64_t>(bytes, 1)));
  auto* memory = static_cast<std::byte*>(std::aligned_alloc(HeapLayout::kAlignment, size));
  if (memory == nullptr) throw std::bad_alloc();
  return HeapBytes(memory);
}

// One member's heartbeat: advanced as the member works (a token routed, a row copied, a task run,
// a signal seen), never while it waits. On a cache line of its own: members beat often.
struct alignas(64) Heartbeat {
  std::atomic<uint64_t> beats{0};
};

constexpr int64_t kMaxClusterThreads = 4096;

// The local_expert of the shared expert's row tiles and tasks: rows are the rank's own tokens.
constexpr int32_t kSharedExpert = -1;

// A row tile whose GEMM0 tasks wait for a free intermediate buffer.
struct PendingRowTile {
  int32_t source;
  int32_t local_expert;
  int32_t row_tile;
};

}  // namespace

// Everything a rank owns: its heap, the routing of its current call, its subscriber and
// scheduler state, its task queue and its intermediate buffers.
struct RankState {
  HeapAddress heap;
  HeapBytes heap_storage;  // without a transport
  uint32_t epoch = 0;
  // Routing of the current call (written by member 0 between team barriers).
  std::vector<int64_t> expert_offsets;
  std::vector<int32_t> pick_row, row_token;
  std::atomic<int64_t> next_gate_tile{0}, next_dispatch_expert{0};
  // Subscriber state: touched only by the member holding the OS token.
  std::atomic<bool> os_token{false};
  std::vector<uint8_t> dispatch_seen, return_seen;
  int64_t returns_seen = 0;
  bool combine_released = false;
  std::deque<PendingRowTile> backlog;
  std::vector<int64_t> cell_rows, cell_first_row;
  std::unique_ptr<std::atomic<int64_t>[]> cell_remaining;  // row tiles of a cell still in GEMM1
  // Scheduler: the task queue and the termination counters.
  std::mutex queue_mutex;
  std::deque<Task> queue;
  std::atomic<int64_t> completed{0}, bound{0};
  // Intermediate (h) buffers: one row tile each, recycled when the tile's last GEMM1 ends.
  HeapBytes h_storage;
  std::unique_ptr<std::atomic<int64_t>[]> gemm0_remaining, gemm1_remaining;
  std::mutex free_mutex;
  std::vector<int32_t> free_buffers;
  // The shared expert's outputs of the rank's own tokens [max_tokens, H], and its row tiles still in
  // GEMM1 (the combine waits for 0).
  HeapBytes shared_out;
  std::atomic<int64_t> shared_remaining{0};
  // The rank's team barrier.
  std::atomic<int64_t> barrier_arrived{0}, barrier_generation{0};
};

struct Cluster::State {
  ClusterConfig config;
  ExpertPlacement placement;
  HeapLayout layout;
  Tiling tiling;
  TaskBound task_bound;
  int64_t h_buffers = 0;
  int64_t h_row_elements = 0;  // one row of an intermediate buffer: max(I, S)
  std::vector<std::unique_ptr<RankState>> ranks;
  std::vector<int64_t> local_ranks;  // the ranks this process runs: all W, or the transport's one
  // Failure handling and the watchdog.
  std::mutex call_mutex;  // one forward at a time: the ranks' state belongs to the call
  std::atomic<bool> abort{false};
  std::mutex error_mutex;
  std::string error;
  bool broken = false;
  // The watchdog's evidence of progress: heartbeats[rank * threads_per_rank + member].
  std::unique_ptr<Heartbeat[]> heartbeats;

  // Sum of the heartbeats of members [first, first + count): it moves iff one of them worked.
  uint64_t beats(int64_t first, int64_t count) const {
    uint64_t sum = 0;
    for (int64_t m = first; m < first + count; ++m) sum += heartbeats[size_t(m)].beats.load(std::memory_order_relaxed);
    return sum;
  }

  [[noreturn]] void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty()) error = message;
    }
    abort.store(true, std::memory_order_release);
    throw Aborted{};
  }
};

namespace {

// One member (thread) of one rank, running calls of the protocol for storage type T.
template <typename T>
class Member {
  using Acc = accum_t<T>;

 public:
  Member(Cluster::State& cluster, int64_t rank, int member, const ExpertWeights& weights)
      : c_(cluster), p_(cluster.config.shape), rank_(rank), member_(member), team_(cluster.config.threads_per_rank),
        s_(*cluster.ranks[size_t(rank)]), chaos_(cluster.config.chaos, rank, member),
        router_weight_(weights.router_weight), router_bias_(weights.router_bias),
        selection_bias_(static_cast<const Acc*>(weights.selection_bias)), w1_(static_cast<const T*>(weights.w1)),
        b1_(static_cast<const T*>(weights.b1)), w2_(static_cast<const T*>(weights.w2)),
        b2_(static_cast<const T*>(weights.b2)), first_expert_(weights.first_expert),
        shared_w1_(static_cast<const T*>(weights.shared_w1)), shared_w2_(static_cast<const T*>(weights.shared_w2)),
        shared_gate_(static_cast<const T*>(weights.shared_gate)), shared_p_(p_.shared_expert()) {
    const Tiling& tiling = c_.tiling;
    gate_.resize(size_t(tiling.row_tile * tiling.ffn_tile));
    up_.resize(gate_.size());
    out_.resize(size_t(tiling.row_tile * tiling.hidden_tile));
    scores_.resize(size_t(route_scratch(p_)));
    sum_.resize(size_t(p_.hidden));
    shared_weights_.resize(size_t(tiling.token_tile));
  }

  void call(const RankIO& io) {
    io_ = &io;
    beat();
    x_ = static_cast<const T*>(io.x);
    barrier("start of call");
    if (member_ == 0) {
      begin_call();
      beat();  // member 0's serial phases are work the team waits on
    }
    barrier("after reset");
    if (!p_.routing_given) gate();  // routing from outside: topk_ids and topk_weights are inputs
    barrier("after gate");
    if (member_ == 0) {
      assign();
      beat();
    }
    barrier("after slot assignment");
    dispatch_rows();
    barrier("after dispatch copies");
    if (member_ == 0) {
      publish_dispatch_signals();
      beat();
    }
    dataflow();
  }

 private:
  // ---- Phase 0: a new epoch and fresh local state (remote peers never touch it). ----
  void begin_call() {
    const int64_t cells = c_.placement.world_size * c_.placement.local_experts();
    s_.epoch = SignalWord::next_epoch(s_.epoch);
    s_.next_gate_tile.store(0, std::memory_order_relaxed);
    s_.next_dispatch_expert.store(0, std::memory_order_relaxed);
    s_.dispatch_seen.assign(size_t(cells), 0);
    s_.return_seen.assign(size_t(cells), 0);
    s_.returns_seen = 0;
    s_.combine_released = false;
    s_.backlog.clear();
    s_.queue.clear();
    s_.completed.store(0, std::memory_order_relaxed);
    s_.bound.store(c_.task_bound.initial(io_->tokens), std::memory_order_relaxed);
    s_.free_buffers.clear();
    for (int32_t b = int32_t(c_.h_buffers) - 1; b >= 0; --b) s_.free_buffers.push_back(b);
    // The shared expert's rows are this rank's own tokens: ready now, first in line for a buffer.
    const int64_t shared_tiles = p_.has_shared_expert() ? c_.tiling.row_tiles(io_->tokens) : 0;
    s_.shared_remaining.store(shared_tiles, std::memory_order_relaxed);
    for (int64_t tile = 0; tile < shared_tiles; ++tile) {
      s_.backlog.push_back(PendingRowTile{int32_t(rank_), kSharedExpert, int32_t(tile)});
    }
  }

  // ---- Phase 1: gate. Router GEMM with fp32 accumulation, scores, top-k. ----
  void gate() {
    const int64_t tile = c_.tiling.token_tile;
    for (int64_t task; (task = s_.next_gate_tile.fetch_add(1)) < c_.tiling.token_tiles(io_->tokens);) {
      const int64_t t0 = task * tile, m = std::min(tile, io_->tokens - t0);
      gate_tile<T>(p_, x_, t0, m, router_weight_, router_bias_, selection_bias_, static_cast<Acc*>(io_->router_logits),
                   io_->topk_ids, static_cast<Acc*>(io_->topk_weights), scores_.data());
      beat();
    }
    if (c_.config.chaos.fault == Fault::slow_gate) slow_gate();
    if (c_.config.chaos.fault == Fault::stuck_gate) stuck_gate();
  }

  // ---- Phase 2: token-order slot assignment under this source's capacity. ----
  void assign() {
    s_.expert_offsets.assign(size_t(p_.experts + 1), 0);
    s_.pick_row.resize(size_t(io_->tokens * p_.top_k));
    s_.row_token.resize(size_t(io_->tokens * p_.top_k));
    *io_->dropped = assign_slots(io_->topk_ids, io_->tokens, p_.top_k, p_.experts, io_->expert_capacity,
                                SlotAssignment{io_->expert_counts, s_.expert_offsets.data(), s_.pick_row.data(),
                                               s_.row_token.data()});
  }

  // Row of expert e's first pick in this source's region on e's owner: rows of the owner's
  // earlier experts come first.
  int64_t owner_first_row(int64_t expert) const {
    const int64_t owner_first_expert = c_.placement.owner(expert) * c_.placement.local_experts();
    return s_.expert_offsets[size_t(expert)] - s_.expert_offsets[size_t(owner_first_expert)];
  }

  // ---- Phase 3: dispatch. Copy admitted tokens into the owners' heaps. ----
  void dispatch_rows() {
    for (int64_t e; (e = s_.next_dispatch_expert.fetch_add(1)) < p_.experts;) {
      chaos_.point();
      std::byte* owner_heap = c_.ranks[size_t(c_.placement.owner(e))]->heap.get();
      const int64_t first = owner_first_row(e);
      for (int64_t row = s_.expert_offsets[size_t(e)]; row < s_.expert_offsets[size_t(e + 1)]; ++row) {
        const int64_t token = s_.row_token[size_t(row)];
        dispatch_row<T>(p_, x_ + token * p_.hidden, io_->topk_ids + token * p_.top_k,
                        static_cast<const Acc*>(io_->topk_weights) + token * p_.top_k, e,
                        reinterpret_cast<T*>(owner_heap + c_.layout.dispatch_row(rank_, first + row -
                                                                                     s_.expert_offsets[size_t(e)])));
        beat();
      }
      beat();
    }
  }

  // Then one release store per expert, rows=0 included: the owner learns the cell is empty.
  void publish_dispatch_signals() {
    for (int64_t e = 0; e < p_.experts; ++e) {
      chaos_.point();
      const int64_t rows = s_.expert_offsets[size_t(e + 1)] - s_.expert_offsets[size_t(e)];
      const Fault fault = c_.config.chaos.fault;
      if (fault == Fault::skip_empty_dispatch_signal && rows == 0) continue;
      const uint32_t epoch =
          fault == Fault::stale_epoch && e == p_.experts - 1 ? SignalWord::previous_epoch(s_.epoch) : s_.epoch;
      std::byte* owner_heap = c_.ranks[size_t(c_.placement.owner(e))]->heap.get();
      store_release(owner_heap + c_.layout.dispatch_flag(rank_, c_.placement.local_index(e)),
                    SignalWord::make(epoch, rows, owner_first_row(e)).bits);
    }
  }

  // ---- Phase 4: the dataflow loop. Every member is a processor and, in turn, the OS. ----
  void dataflow() {
    int64_t idle_polls = 0;
    bool waiting = false;
    for (;;) {
      if (c_.abort.load(std::memory_order_acquire)) throw Aborted{};
      bool subscribed = false;
      if (!s_.os_token.exchange(true, std::memory_order_acquire)) {
        subscribed = subscribe();
        s_.os_token.store(false, std::memory_order_release);
      }
      Task task;
      if (pop(task)) {
        waiting = false;
        chaos_.point();
        run(task);
        chaos_.point();
        s_.completed.fetch_add(1, std::memory_order_acq_rel);
        beat();
        idle_polls = 0;
        continue;
      }
      // completed <= bound always; equal means every signal arrived and every task ran.
      const int64_t completed = s_.completed.load(std::memory_order_acquire);
      if (completed == s_.bound.load(std::memory_order_acquire)) return;
      if (subscribed) {
        waiting = false;
        idle_polls = 0;
      } else {
        if (!waiting) begin_wait();
        waiting = true;
        // Across processes the peers' heartbeats are not visible here; their progress shows as
        // arrived signals, which subscribe() counts as this member's beats.
        check_watchdog("processor", 0, c_.placement.world_size * team_, [&] { return describe_dataflow_wait(); });
        if (c_.config.transport) {
          c_.config.transport->idle(++idle_polls);  // peers are processes: see HeapTransport::idle
        } else {
          std::this_thread::yield();
        }
      }
    }
  }

  // The OS role: poll flags (acquire), turn arrivals into tasks, lower the bound.
  bool subscribe() {
    chaos_.point();
    const int64_t W = c_.placement.world_size, L = c_.placement.local_experts();
    bool arrived = false;
    for (int64_t cell = 0; cell < W * L; ++cell) {
      if (s_.dispatch_seen[size_t(cell)]) continue;
      const SignalWord word{load_acquire(s_.heap.get() + c_.layout.dispatch_flag(cell / L, cell % L))};
      if (!word.is_epoch(s_.epoch)) continue;
      s_.dispatch_seen[size_t(cell)] = 1;
      on_dispatch(cell / L, cell % L, word);
      arrived = true;
    }
    release_backlog();
    for (int64_t cell = 0; cell < W * L; ++cell) {
      if (s_.return_seen[size_t(cell)]) continue;
      const SignalWord word{load_acquire(s_.heap.get() + c_.layout.return_flag(cell / L, cell % L))};
      if (!word.is_epoch(s_.epoch)) continue;
      s_.return_seen[size_t(cell)] = 1;
      ++s_.returns_seen;
      arrived = true;
    }
    if (s_.returns_seen == W * L && !s_.combine_released &&
        s_.shared_remaining.load(std::memory_order_acquire) == 0) {
      s_.combine_released = true;
      std::vector<Task> combines;
      for (int64_t tile = 0; tile < c_.task_bound.combine_tasks(io_->tokens); ++tile) {
        Task task;
        task.kind = TaskKind::combine;
        task.epoch = s_.epoch;
        task.column_begin = std::min(io_->tokens, tile * c_.tiling.token_tile);
        task.columns = std::min(c_.tiling.token_tile, io_->tokens - task.column_begin);
        combines.push_back(task);
      }
      push(combines);
    }
    if (arrived) beat();
    return arrived;
  }

  void on_dispatch(int64_t source, int64_t local_expert, SignalWord word) {
    const int64_t cell = source * c_.placement.local_experts() + local_expert;
    s_.cell_rows[size_t(cell)] = word.rows();
    s_.cell_first_row[size_t(cell)] = word.first_row();
    if (word.rows() == 0) {
      // Nothing to compute, but the source still waits for this cell's return flag.
      publish_return(source, local_expert, word.rows(), word.first_row());
    } else {
      s_.cell_remaining[size_t(cell)].store(c_.tiling.row_tiles(word.rows()), std::memory_order_relaxed);
      for (int64_t tile = 0; tile < c_.tiling.row_tiles(word.rows()); ++tile) {
        s_.backlog.push_back(PendingRowTile{int32_t(source), int32_t(local_expert), int32_t(tile)});
      }
    }
    s_.bound.fetch_sub(c_.task_bound.correction(word.rows()), std::memory_order_acq_rel);
  }

  void publish_return(int64_t source, int64_t local_expert, int64_t rows, int64_t first_row) {
    chaos_.point();
    store_release(c_.ranks[size_t(source)]->heap.get() + c_.layout.return_flag(rank_, local_expert),
                  SignalWord::make(s_.epoch, rows, first_row).bits);
  }

  // Row tiles become GEMM0 tasks as intermediate buffers free up.
  void release_backlog() {
    const Tiling& tiling = c_.tiling;
    while (!s_.backlog.empty()) {
      int32_t buffer;
      {
        std::lock_guard<std::mutex> lock(s_.free_mutex);
        if (s_.free_buffers.empty()) return;
        buffer = s_.free_buffers.back();
        s_.free_buffers.pop_back();
      }
      const PendingRowTile pending = s_.backlog.front();
      s_.backlog.pop_front();
      const bool shared = pending.local_expert == kSharedExpert;
      const int64_t cell = shared ? 0 : pending.source * c_.placement.local_experts() + pending.local_expert;
      const int64_t row_begin = pending.row_tile * tiling.row_tile;
      const int64_t ffn = shared ? p_.shared_ffn : p_.ffn;
      const int64_t first_row = shared ? row_begin : s_.cell_first_row[size_t(cell)] + row_begin;
      const int64_t rows = std::min(tiling.row_tile, (shared ? io_->tokens : s_.cell_rows[size_t(cell)]) - row_begin);
      s_.gemm0_remaining[size_t(buffer)].store(tiling.ffn_tiles(ffn), std::memory_order_relaxed);
      s_.gemm1_remaining[size_t(buffer)].store(tiling.hidden_tiles(p_.hidden), std::memory_order_relaxed);
      std::vector<Task> tasks;
      for (int64_t column = 0; column < ffn; column += tiling.ffn_tile) {
        Task task;
        task.kind = TaskKind::gemm0;
        task.epoch = s_.epoch;
        task.source = pending.source;
        task.local_expert = pending.local_expert;
        task.row_tile = pending.row_tile;
        task.buffer = buffer;
        task.first_row = first_row;  // the shared expert's: a token index
        task.rows = rows;
        task.column_begin = column;
        task.columns = std::min(tiling.ffn_tile, ffn - column);
        tasks.push_back(task);
      }
      push(tasks);
    }
  }

  void push(const std::vector<Task>& tasks) {
    std::lock_guard<std::mutex> lock(s_.queue_mutex);
    s_.queue.insert(s_.queue.end(), tasks.begin(), tasks.end());
  }

  bool pop(Task& task) {
    std::lock_guard<std::mutex> lock(s_.queue_mutex);
    if (s_.queue.empty()) return false;
    std::swap(s_.queue[chaos_.pick(s_.queue.size())], s_.queue.front());
    task = s_.queue.front();
    s_.queue.pop_front();
    return true;
  }

  void run(const Task& task) {
    if (task.epoch != s_.epoch) {
      c_.fail("flashmoe: rank " + std::to_string(rank_) + " popped a task of epoch " + std::to_string(task.epoch) +
              " during epoch " + std::to_string(s_.epoch));
    }
    switch (task.kind) {
      case TaskKind::gemm0: return run_gemm0(task);
      case TaskKind::gemm1: return run_gemm1(task);
      case TaskKind::combine: return run_combine(task);
      default: c_.fail("flashmoe: rank " + std::to_string(rank_) + " popped a task kind the CPU ranks never queue");
    }
  }

  T* h_row(int32_t buffer, int64_t row) const {
    return reinterpret_cast<T*>(s_.h_storage.get()) + (int64_t(buffer) * c_.tiling.row_tile + row) * c_.h_row_elements;
  }

  T* shared_out_row(int64_t token) const { return reinterpret_cast<T*>(s_.shared_out.get()) + token * p_.hidden; }

  void run_gemm0(const Task& task) {
    const bool shared = task.local_expert == kSharedExpert;
    std::vector<const T*> x_rows(static_cast<size_t>(task.rows));
    std::vector<T*> h_rows(static_cast<size_t>(task.rows));
    for (int64_t i = 0; i < task.rows; ++i) {
      x_rows[size_t(i)] = shared ? x_ + (task.first_row + i) * p_.hidden
                                 : reinterpret_cast<const T*>(s_.heap.get() +
                                                              c_.layout.dispatch_row(task.source, task.first_row + i));
      h_rows[size_t(i)] = h_row(task.buffer, i);
    }
    if (shared) {
      gemm0_tile<T>(shared_p_, x_rows.data(), task.rows, shared_w1_, nullptr, task.column_begin,
                    task.column_begin + task.columns, h_rows.data(), gate_.data(), up_.data());
    } else {
      const int64_t expert = c_.placement.global_expert(rank_, task.local_expert) - first_expert_;
      const int64_t N0 = p_.gemm0_cols();
      gemm0_tile<T>(p_, x_rows.data(), task.rows, w1_ + expert * N0 * p_.hidden, b1_ ? b1_ + expert * N0 : nullptr,
                    task.column_begin, task.column_begin + task.columns, h_rows.data(), gate_.data(), up_.data());
    }
    // The last GEMM0 tile of a row tile releases its GEMM1 tiles.
    if (s_.gemm0_remaining[size_t(task.buffer)].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    std::vector<Task> tasks;
    for (int64_t column = 0; column < p_.hidden; column += c_.tiling.hidden_tile) {
      Task next = task;
      next.kind = TaskKind::gemm1;
      next.column_begin = column;
      next.columns = std::min(c_.tiling.hidden_tile, p_.hidden - column);
      tasks.push_back(next);
    }
    push(tasks);
  }

  void run_gemm1(const Task& task) {
    const bool shared = task.local_expert == kSharedExpert;
    std::vector<const T*> h_rows(static_cast<size_t>(task.rows));
    std::vector<T*> out_rows(static_cast<size_t>(task.rows));
    for (int64_t i = 0; i < task.rows; ++i) h_rows[size_t(i)] = h_row(task.buffer, i);
    if (shared) {
      for (int64_t i = 0; i < task.rows; ++i) out_rows[size_t(i)] = shared_out_row(task.first_row + i);
      gemm1_tile<T>(shared_p_, h_rows.data(), task.rows, shared_w2_, nullptr, task.column_begin,
                    task.column_begin + task.columns, out_rows.data(), out_.data());
    } else {
      const int64_t expert = c_.placement.global_expert(rank_, task.local_expert) - first_expert_;
      std::byte* source_heap = c_.ranks[size_t(task.source)]->heap.get();
      for (int64_t i = 0; i < task.rows; ++i) {
        out_rows[size_t(i)] = reinterpret_cast<T*>(source_heap + c_.layout.return_row(rank_, task.first_row + i));
      }
      gemm1_tile<T>(p_, h_rows.data(), task.rows, w2_ + expert * p_.hidden * p_.ffn,
                    b2_ ? b2_ + expert * p_.hidden : nullptr, task.column_begin, task.column_begin + task.columns,
                    out_rows.data(), out_.data());
    }
    if (s_.gemm1_remaining[size_t(task.buffer)].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    {
      std::lock_guard<std::mutex> lock(s_.free_mutex);
      s_.free_buffers.push_back(task.buffer);
    }
    if (shared) {  // the combine is released once every shared row tile is done (release: its rows)
      s_.shared_remaining.fetch_sub(1, std::memory_order_acq_rel);
      return;
    }
    // The last row tile of a cell tells the source its rows are home.
    const int64_t cell = task.source * c_.placement.local_experts() + task.local_expert;
    if (s_.cell_remaining[size_t(cell)].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    publish_return(task.source, task.local_expert, s_.cell_rows[size_t(cell)], s_.cell_first_row[size_t(cell)]);
  }

  // y[t] = sum over admitted picks j, in ascending j, of weight[t, j] * (row that came home), then
  // + g[t] * (the shared expert's row).
  void run_combine(const Task& task) {
    const int64_t H = p_.hidden, k = p_.top_k;
    const Acc* weights = static_cast<const Acc*>(io_->topk_weights);
    const bool shared = p_.has_shared_expert();
    if (shared && task.columns > 0) {
      shared_weights<T>(p_, x_, task.column_begin, task.columns, shared_gate_, shared_weights_.data());
    }
    for (int64_t t = task.column_begin; t < task.column_begin + task.columns; ++t) {
      const int32_t* pick_row = s_.pick_row.data() + t * k;
      const auto output_row = [&](int64_t j) {
        const int64_t owner = c_.placement.owner(io_->topk_ids[t * k + j]);
        const int64_t owner_row = pick_row[j] - s_.expert_offsets[size_t(owner * c_.placement.local_experts())];
        return reinterpret_cast<const T*>(s_.heap.get() + c_.layout.return_row(owner, owner_row));
      };
      combine_token<T>(H, k, pick_row, weights + t * k, p_.weight_on_input, output_row, sum_.data(),
                       static_cast<T*>(io_->y) + t * H, shared ? shared_out_row(t) : nullptr,
                       shared ? shared_weights_[size_t(t - task.column_begin)] : Acc(1));
      beat();
    }
  }

  // ---- Waiting, bounded. ----
  void beat() { c_.heartbeats[size_t(rank_ * team_ + member_)].beats.fetch_add(1, std::memory_order_relaxed); }

  // A wait is a hang only when no member it waits on has advanced its heartbeat for the whole
  // timeout: honest work, however long, keeps beating. `first, count` are those members (the
  // rank's team at a barrier; every member of every rank for flags, which any rank may owe).
  // Call begin_wait() when a wait starts and check_watchdog() while it lasts.
  void begin_wait() {
    wait_beats_ = ~uint64_t(0);
    wait_since_ns_ = now_ns();
  }

  template <typename Describe>
  void check_watchdog(const char* role, int64_t first, int64_t count, Describe describe) {
    if (c_.abort.load(std::memory_order_acquire)) throw Aborted{};
    const uint64_t beats = c_.beats(first, count);
    const int64_t now = now_ns();
    if (beats != wait_beats_) {
      wait_beats_ = beats;
      wait_since_ns_ = now;
      return;
    }
    if (now - wait_since_ns_ < int64_t(c_.config.watchdog_seconds * 1e9)) return;
    std::ostringstream message;
    message << "flashmoe watchdog: no progress for " << c_.config.watchdog_seconds << " s (no heartbeat of "
            << (count == team_ ? "its team" : "any member of any rank") << " advanced); rank " << rank_ << " (member "
            << member_ << ", role " << role << ", epoch " << s_.epoch << ") is waiting for " << describe();
    c_.fail(message.str());
  }

  // Test faults (chaos.h): rank 0's member 0 works honestly but long in its gate, beating as it
  // goes, or stops there without beating until the watchdog of a waiting member fires.
  void slow_gate() {
    if (rank_ != 0 || member_ != 0) return;
    const int64_t end = now_ns() + int64_t(c_.config.watchdog_seconds * 3e9);
    while (now_ns() < end) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      beat();
    }
  }
  // The others' watchdogs catch the stuck member; a lone one (W = 1, one thread) watches itself.
  void stuck_gate() {
    if (rank_ != 0 || member_ != 0) return;
    const bool alone = c_.placement.world_size * team_ == 1;
    begin_wait();
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      if (!alone && c_.abort.load(std::memory_order_acquire)) throw Aborted{};
      if (alone) check_watchdog("gate", 0, 1, [] { return std::string("itself: the stuck_gate fault"); });
    }
  }

  std::string describe_dataflow_wait() const {
    const int64_t W = c_.placement.world_size, L = c_.placement.local_experts();
    std::ostringstream what;
    int listed = 0;
    for (int64_t cell = 0; cell < W * L && listed < 8; ++cell) {
      const SignalWord word{load_acquire(s_.heap.get() + c_.layout.dispatch_flag(cell / L, cell % L))};
      if (word.is_epoch(s_.epoch)) continue;
      what << (listed++ ? "; " : "") << "dispatch flag (source " << cell / L << ", local expert " << cell % L
           << ") holding epoch " << word.epoch() << " rows " << word.rows();
    }
    for (int64_t cell = 0; cell < W * L && listed < 8; ++cell) {
      const SignalWord word{load_acquire(s_.heap.get() + c_.layout.return_flag(cell / L, cell % L))};
      if (word.is_epoch(s_.epoch)) continue;
      what << (listed++ ? "; " : "") << "return flag (owner " << cell / L << ", local expert " << cell % L
           << ") holding epoch " << word.epoch();
    }
    what << " [tasks completed " << s_.completed.load() << " of bound " << s_.bound.load() << "]";
    return what.str();
  }

  void barrier(const char* name) {
    if (team_ == 1) return;
    const int64_t generation = s_.barrier_generation.load(std::memory_order_acquire);
    if (s_.barrier_arrived.fetch_add(1, std::memory_order_acq_rel) == team_ - 1) {
      s_.barrier_arrived.store(0, std::memory_order_relaxed);
      s_.barrier_generation.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    begin_wait();
    while (s_.barrier_generation.load(std::memory_order_acquire) == generation) {
      check_watchdog("team", rank_ * team_, team_, [&] { return std::string("its team at the barrier ") + name; });
      std::this_thread::yield();
    }
  }

  Cluster::State& c_;
  const Problem& p_;
  const int64_t rank_;
  const int member_;
  const int team_;
  RankState& s_;
  const RankIO* io_ = nullptr;  // this call's tokens and outputs
  Chaos chaos_;
  const void *router_weight_, *router_bias_;  // T, or float with p_.router_f32
  const Acc* selection_bias_;
  const T *w1_, *b1_, *w2_, *b2_;
  const int64_t first_expert_;  // the expert w1_[0] (and w2_, b1_, b2_) holds
  const T *shared_w1_, *shared_w2_, *shared_gate_;
  const Problem shared_p_;      // the shared expert's problem: ffn = S, no biases
  const T* x_ = nullptr;
  std::vector<Acc> gate_, up_, out_, scores_, sum_, shared_weights_;
  uint64_t wait_beats_ = 0;     // the waited-on members' heartbeats when last seen to move
  int64_t wait_since_ns_ = 0;   // when they last moved, or the wait began
};

template <typename T>
void run_all(Cluster::State& state, const ExpertWeights& weights, const std::vector<std::vector<RankIO>>& calls) {
  const int team = state.config.threads_per_rank;
  run_team(int(state.local_ranks.size()) * team, [&](int thread) {
    const size_t local = size_t(thread / team);
    try {
      Member<T> member(state, state.local_ranks[local], thread % team, weights);
      for (const std::vector<RankIO>& call : calls) member.call(call[local]);
    } catch (const Aborted&) {
      // Another member reported the failure; this one just stops.
    } catch (...) {
      state.abort.store(true, std::memory_order_release);
      throw;
    }
  });
}

}  // namespace

Cluster::Cluster(const ClusterConfig& config) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.config = config;
  s.placement = ExpertPlacement{config.world_size, config.shape.experts};
  if (const char* error = validate(s.placement)) throw std::invalid_argument(error);
  if (const char* error = validate(config.shape)) throw std::invalid_argument(error);
  if (config.max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
  if (config.threads_per_rank < 1) throw std::invalid_argument("threads_per_rank must be >= 1");
  // One OS thread per member: a bound, so a typo cannot ask the system for millions of threads.
  require_size(CheckedInt(config.world_size) * CheckedInt(config.threads_per_rank), "threads_per_rank",
               config.threads_per_rank, "the cluster's threads (world_size * threads_per_rank)", kMaxClusterThreads);
  s.layout = HeapLayout{s.placement, config.max_tokens, config.shape.top_k, config.shape.hidden,
                        dtype_size(config.shape.dtype)};
  s.layout.check();  // SizeError naming max_tokens, hidden, ... before a byte is allocated
  s.task_bound = TaskBound{s.tiling, s.placement, config.max_tokens, config.shape.ffn, config.shape.hidden,
                           config.shape.shared_ffn};
  s.task_bound.check();
  s.h_buffers = std::max<int64_t>(4, 2 * int64_t(config.threads_per_rank));
  s.h_row_elements = std::max(config.shape.ffn, config.shape.shared_ffn);
  const CheckedInt h_bytes = CheckedInt(s.h_buffers) * CheckedInt(s.tiling.row_tile) * CheckedInt(s.h_row_elements) *
                             CheckedInt(dtype_size(config.shape.dtype));
  require_size(h_bytes, "ffn", config.shape.ffn, "the intermediate buffers' bytes");
  const CheckedInt shared_bytes = config.shape.has_shared_expert()
      ? CheckedInt(config.max_tokens) * CheckedInt(config.shape.hidden) * CheckedInt(dtype_size(config.shape.dtype))
      : CheckedInt(0);
  require_size(shared_bytes, "max_tokens", config.max_tokens, "the shared expert's output rows");
  require_size(CheckedInt(config.world_size) * (CheckedInt(s.layout.total_bytes()) + h_bytes + shared_bytes),
               "world_size", config.world_size, "the cluster's footprint");
  const int64_t cells = config.world_size * s.placement.local_experts();
  const HeapTransport* transport = config.transport.get();
  if (transport != nullptr) {
    if (transport->world_size() != config.world_size) throw std::invalid_argument("the transport's world size differs");
    if (transport->heap_bytes() < s.layout.total_bytes()) throw std::invalid_argument("the transport's heaps are too small");
    for (int64_t r = 0; r < config.world_size; ++r) {
      if (transport->heap(r) == nullptr) throw std::invalid_argument("the transport has not mapped every rank's heap");
    }
    s.local_ranks = {transport->local_rank()};
  } else {
    for (int64_t r = 0; r < config.world_size; ++r) s.local_ranks.push_back(r);
  }
  for (int64_t r = 0; r < config.world_size; ++r) {
    auto rank = std::make_unique<RankState>();
    if (transport != nullptr) {
      rank->heap.base = transport->heap(r);  // zero-filled by the transport: epoch 0, never written
    } else {
      rank->heap_storage = aligned_bytes(s.layout.total_bytes());
      rank->heap.base = rank->heap_storage.get();
      std::memset(rank->heap.get(), 0, size_t(2 * s.layout.flags_bytes()));  // epoch 0: never written
    }
    rank->cell_rows.assign(size_t(cells), 0);
    rank->cell_first_row.assign(size_t(cells), 0);
    rank->cell_remaining = std::make_unique<std::atomic<int64_t>[]>(size_t(cells));
    rank->h_storage = aligned_bytes(s.h_buffers * s.tiling.row_tile * s.h_row_elements * dtype_size(config.shape.dtype));
    if (config.shape.has_shared_expert()) rank->shared_out = aligned_bytes(shared_bytes.value);
    rank->gemm0_remaining = std::make_unique<std::atomic<int64_t>[]>(size_t(s.h_buffers));
    rank->gemm1_remaining = std::make_unique<std::atomic<int64_t>[]>(size_t(s.h_buffers));
    s.ranks.push_back(std::move(rank));
  }
  s.heartbeats = std::make_unique<Heartbeat[]>(size_t(config.world_size * config.threads_per_rank));
}

Cluster::~Cluster() = default;

const ClusterConfig& Cluster::config() const { return state_->config; }
int64_t Cluster::heap_bytes() const { return state_->layout.total_bytes(); }
int64_t Cluster::footprint_bytes() const {
  const State& s = *state_;
  const int64_t element = dtype_size(s.config.shape.dtype);
  const int64_t shared = s.config.shape.has_shared_expert() ? s.config.max_tokens * s.config.shape.hidden * element : 0;
  return s.config.world_size * (s.layout.total_bytes() + s.h_buffers * s.tiling.row_tile * s.h_row_elements * element +
                                shared);
}
uint32_t Cluster::epoch(int64_t rank) const { return state_->ranks.at(size_t(rank))->epoch; }

void Cluster::forward(const ExpertWeights& weights, const std::vector<RankIO>& ranks, int64_t repeats) {
  if (repeats < 1) throw std::invalid_argument("repeats must be >= 1");
  forward_calls(weights, std::vector<std::vector<RankIO>>(size_t(repeats), ranks));
}

void Cluster::forward_calls(const ExpertWeights& weights, const std::vector<std::vector<RankIO>>& calls) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.call_mutex);
  if (s.broken) throw std::runtime_error("flashmoe: this cluster failed earlier and cannot run again: " + s.error);
  for (const std::vector<RankIO>& call : calls) {
    if (call.size() != s.local_ranks.size()) throw std::invalid_argument("one RankIO per rank running here is required");
    for (const RankIO& io : call) {
      if (io.tokens < 0 || io.tokens > s.config.max_tokens) throw std::invalid_argument("a rank's tokens exceed max_tokens");
    }
  }
  try {
    switch (s.config.shape.dtype) {
      case DType::f32: run_all<float>(s, weights, calls); break;
      case DType::bf16: run_all<bfloat16>(s, weights, calls); break;
      case DType::f16: run_all<float16>(s, weights, calls); break;
      case DType::f64: run_all<double>(s, weights, calls); break;
    }
  } catch (...) {
    s.broken = true;
    if (!s.error.empty()) throw std::runtime_error(s.error);
    throw;
  }
  if (!s.error.empty()) {
    s.broken = true;
    throw std::runtime_error(s.error);
  }
}

}  // namespace flashmoe::cpu
