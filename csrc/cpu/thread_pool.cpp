#include "cpu/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace flashmoe::cpu {
namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int num_workers) {
    for (int w = 1; w <= num_workers; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& thread : threads_) thread.join();
  }

  int size() const { return int(threads_.size()); }

  // team: worker w runs exactly task w, so all num_threads tasks run at the same time.
  void run(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn, bool team) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      team_ = team;
      job_ = &fn;
      num_tasks_ = num_tasks;
      next_task_.store(0, std::memory_order_relaxed);
      active_workers_ = num_threads - 1;
      pending_ = num_threads - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain(int worker) {
    if (team_) {
      run_task(worker, worker);
      return;
    }
    for (;;) {
      const int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (task >= num_tasks_) return;
      run_task(task, worker);
    }
  }

  void run_task(int64_t task, int worker) {
    try {
      (*job_)(task, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_.store(num_tasks_, std::memory_order_relaxed);  // stop handing out work
    }
  }

  void worker_loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (worker > active_workers_) continue;  // not part of this call
      }
      drain(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  int active_workers_ = 0;
  bool team_ = false;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

std::mutex pool_mutex;
ThreadPool* pool = nullptr;

// A forked child inherits the pool object but none of its threads: forget it (leaking it on
// purpose, its threads are gone) and build a new one on first use.
void forget_pool_in_child() {
  new (&pool_mutex) std::mutex();
  pool = nullptr;
}

void run_on_pool(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn, bool team) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  if (pool == nullptr || pool->size() < num_threads - 1) {
    delete pool;
    pool = new ThreadPool(num_threads - 1);
  }
  pool->run(num_tasks, num_threads, fn, team);
}

}  // namespace

void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn) {
  if (num_tasks <= 0) return;
  num_threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks)));
  if (num_threads == 1) {
    for (int64_t task = 0; task < num_tasks; ++task) fn(task, 0);
    return;
  }
  run_on_pool(num_tasks, num_threads, fn, false);
}

void run_team(int team_size, const std::function<void(int member)>& fn) {
  if (team_size <= 1) {
    fn(0);
    return;
  }
  run_on_pool(team_size, team_size, [&](int64_t task, int) { fn(int(task)); }, true);
}

}  // namespace flashmoe::cpu
