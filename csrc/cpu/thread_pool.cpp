#include "cpu/thread_pool.h"

#include <pthread.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

namespace flashmoe::cpu {
namespace {

// Worker w runs member w of each team; worker threads outlive the calls.
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

  void run(int team_size, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      active_workers_ = team_size - 1;
      pending_ = team_size - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    run_member(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_member(int member) {
    try {
      (*job_)(member);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
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
        if (worker > active_workers_) continue;  // not part of this team
      }
      run_member(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int active_workers_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

std::mutex pool_mutex;
ThreadPool* pool = nullptr;
thread_local bool inside_team = false;

// A forked child inherits the pool object but none of its threads: forget it (leaking it on
// purpose, its threads are gone) and build a new one on first use.
void forget_pool_in_child() {
  new (&pool_mutex) std::mutex();
  pool = nullptr;
}

}  // namespace

void run_team(int team_size, const std::function<void(int)>& fn) {
  if (inside_team) throw std::logic_error("flashmoe: run_team called from inside a team member");
  const auto member = [&](int index) {
    inside_team = true;
    try {
      fn(index);
    } catch (...) {
      inside_team = false;
      throw;
    }
    inside_team = false;
  };
  if (team_size <= 1) {
    member(0);
    return;
  }
  std::lock_guard<std::mutex> lock(pool_mutex);
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  if (pool == nullptr || pool->size() < team_size - 1) {
    delete pool;
    pool = new ThreadPool(team_size - 1);
  }
  pool->run(team_size, member);
}

}  // namespace flashmoe::cpu
