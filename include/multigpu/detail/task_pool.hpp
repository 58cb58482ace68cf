#pragma once
// A few threads that run submitted jobs in order of submission, for
// collectives launched while backward goes on. Errors are kept for the
// waiter; nothing is ever detached.

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace multigpu {
namespace detail {

class TaskPool {
 public:
  explicit TaskPool(std::size_t threads) {
    if (threads == 0) threads = 1;
    for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { loop(); });
  }

  ~TaskPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& thread : threads_) thread.join();  // queued jobs still run: nothing half-done is left behind
  }

  TaskPool(const TaskPool&) = delete;
  TaskPool& operator=(const TaskPool&) = delete;

  /// Queues a job. Thread-safe; callable from any thread.
  void submit(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(job));
      ++unfinished_;
    }
    wake_.notify_one();
  }

  /// Waits until every job submitted so far has finished. Returns false if
  /// `timeout` passed first (the jobs go on; wait again later).
  bool wait_idle(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    return idle_.wait_for(lock, timeout, [this] { return unfinished_ == 0; });
  }

  /// Waits without a time-out.
  void wait_idle() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [this] { return unfinished_ == 0; });
  }

  /// The first error a job threw since the last call (null if none); clears it.
  std::exception_ptr take_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::exception_ptr error = error_;
    error_ = nullptr;
    return error;
  }

  std::size_t threads() const { return threads_.size(); }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left
      std::function<void()> job = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      std::exception_ptr error;
      try {
        job();
      } catch (...) {
        error = std::current_exception();
      }
      job = nullptr;
      lock.lock();
      if (error && !error_) error_ = error;
      if (--unfinished_ == 0) idle_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::deque<std::function<void()>> queue_;
  std::size_t unfinished_ = 0;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace detail
}  // namespace multigpu
