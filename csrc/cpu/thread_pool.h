// A persistent pool of worker threads for the CPU backend.
//
// parallel_for hands out task indices from one atomic counter. Determinism never depends on
// which worker runs a task: every task writes a disjoint part of the output and its arithmetic
// is fixed by the task index alone.
#pragma once

#include <cstdint>
#include <functional>

namespace flashmoe::cpu {

// Runs fn(task, worker) for task in [0, num_tasks) on up to num_threads threads (the caller is
// worker 0). worker < num_threads indexes per-worker scratch. An exception thrown by a task is
// rethrown here after all workers stop. Concurrent calls from several threads are serialized.
void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t task, int worker)>& fn);

// Runs fn(member) for member in [0, team_size), each on its own thread, all at the same time
// (the caller is member 0), so members may wait on each other. Exceptions as in parallel_for.
void run_team(int team_size, const std::function<void(int member)>& fn);

}  // namespace flashmoe::cpu
