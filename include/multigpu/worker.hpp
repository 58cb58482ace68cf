#pragma once
/// @file
/// One persistent worker thread per replica, and running a job on every
/// replica at once.
///
/// A job for replica r runs with r's device current and, on GPUs, with r's
/// own stream current (so replicas on one GPU still overlap), under the
/// thread-local state of the thread that asked for it: grad mode, inference
/// mode, autocast and the rest that LibTorch carries across threads
/// (at::ThreadLocalState). Replica 0 runs on the calling thread itself:
/// that costs no thread switch and keeps one replica exactly as fast as a
/// plain loop. Exceptions travel back as std::exception_ptr and are thrown
/// to the caller only after every replica has finished its part.
///
///   multigpu::ReplicaWorkers workers({torch::kCPU, torch::kCPU});
///   workers.run([&](std::size_t r) { outputs[r] = models[r]->forward(inputs[r]); }, "forward");

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/ThreadLocalState.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <fmt/core.h>

#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {

/// One thread that runs jobs for one replica, one at a time, until destroyed.
class ReplicaWorker {
 public:
  ReplicaWorker();
  ~ReplicaWorker();
  ReplicaWorker(const ReplicaWorker&) = delete;
  ReplicaWorker& operator=(const ReplicaWorker&) = delete;

  /// Starts `job` on the worker thread under `state`; does not wait. At most
  /// one job at a time: call wait() before the next start().
  void start(std::function<void()> job, at::ThreadLocalState state);
  /// Waits for the job started last; returns what it threw (or null).
  std::exception_ptr wait();

 private:
  void loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::function<void()> job_;
  std::optional<at::ThreadLocalState> state_;
  std::exception_ptr error_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread thread_;
};

/// Every replica's context and worker: runs a job on all replicas in parallel.
class ReplicaWorkers {
 public:
  /// One replica per device, in replica order (the same device may repeat).
  explicit ReplicaWorkers(const std::vector<c10::Device>& devices);

  /// Number of replicas.
  std::size_t size() const { return contexts_.size(); }
  /// Replica `replica`'s device and stream.
  const ReplicaContext& context(std::size_t replica) const { return contexts_.at(replica); }
  /// Every replica's context, in order.
  const std::vector<ReplicaContext>& contexts() const { return contexts_; }
  /// Replica `replica`'s device.
  const c10::Device& device(std::size_t replica) const { return contexts_.at(replica).device(); }

  /// Runs `job(r)` for every replica r with `active[r]` (all when empty), each
  /// under its device, stream and the caller's thread-local state; replica
  /// 0 on the calling thread. Waits for all, then, if any failed, throws
  /// ReplicaError for the lowest failing replica, naming its device and
  /// `what` (the stage: "the loss function", "optimizer step", ...) and
  /// listing the other failures. A job may name its current stage in
  /// `(*stages)[r]`; the message then uses that instead of `what`.
  void run(const std::function<void(std::size_t)>& job, std::string_view what,
           const std::vector<bool>& active = {}, const std::vector<const char*>* stages = nullptr);

  /// Waits for every replica's stream (no-op on the CPU).
  void synchronize() const;

 private:
  std::vector<ReplicaContext> contexts_;
  std::vector<std::unique_ptr<ReplicaWorker>> workers_;  // [0] is empty: replica 0 runs on the caller
};

// ---------------------------------------------------------------------------
// Definitions

inline ReplicaWorker::ReplicaWorker() : thread_([this] { loop(); }) {}

inline ReplicaWorker::~ReplicaWorker() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    wake_.wait(lock, [this] { return !busy_; });  // never abandon a running job
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

inline void ReplicaWorker::start(std::function<void()> job, at::ThreadLocalState state) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_INTERNAL_ASSERT(!busy_, "ReplicaWorker::start while a job is running");
    job_ = std::move(job);
    state_.emplace(std::move(state));
    error_ = nullptr;
    busy_ = true;
  }
  wake_.notify_all();
}

inline std::exception_ptr ReplicaWorker::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  wake_.wait(lock, [this] { return !busy_; });
  return error_;
}

inline void ReplicaWorker::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    wake_.wait(lock, [this] { return busy_ || stopping_; });
    if (stopping_ && !busy_) return;
    std::function<void()> job = std::move(job_);
    at::ThreadLocalState state = std::move(*state_);
    state_.reset();
    lock.unlock();
    std::exception_ptr error;
    try {
      const at::ThreadLocalStateGuard tls(state);
      job();
    } catch (...) {
      error = std::current_exception();
    }
    job = nullptr;  // release captures on the worker, before reporting done
    lock.lock();
    error_ = error;
    busy_ = false;
    wake_.notify_all();
  }
}

inline ReplicaWorkers::ReplicaWorkers(const std::vector<c10::Device>& devices) {
  if (devices.empty()) throw Error("ReplicaWorkers: no device given");
  contexts_.reserve(devices.size());
  for (std::size_t r = 0; r < devices.size(); ++r) {
    contexts_.emplace_back(devices[r]);
    workers_.push_back(r == 0 ? nullptr : std::make_unique<ReplicaWorker>());
  }
}

inline void ReplicaWorkers::run(const std::function<void(std::size_t)>& job, std::string_view what,
                                const std::vector<bool>& active, const std::vector<const char*>* stages) {
  const std::size_t n = size();
  auto is_active = [&](std::size_t r) { return active.empty() || active.at(r); };
  std::vector<std::exception_ptr> errors(n);
  if (n > 1) {
    const at::ThreadLocalState state;
    for (std::size_t r = 1; r < n; ++r) {
      if (!is_active(r)) continue;
      const ReplicaContext* context = &contexts_[r];
      workers_[r]->start(
          [context, &job, r] {
            const ReplicaContext::Scope scope(*context);
            job(r);
          },
          state);
    }
  }
  if (is_active(0)) {
    try {
      const ReplicaContext::Scope scope(contexts_[0]);
      job(0);
    } catch (...) {
      errors[0] = std::current_exception();
    }
  }
  for (std::size_t r = 1; r < n; ++r) {
    if (is_active(r)) errors[r] = workers_[r]->wait();
  }

  std::size_t first = n;
  for (std::size_t r = 0; r < n && first == n; ++r) {
    if (errors[r]) first = r;
  }
  if (first == n) return;
  auto stage = [&](std::size_t r) -> std::string_view {
    return stages != nullptr && (*stages)[r] != nullptr ? std::string_view((*stages)[r]) : what;
  };
  std::string message = fmt::format("replica {} of {} ({}) failed in {}: {}", first, n, device(first).str(),
                                    stage(first), describe_exception(errors[first]));
  for (std::size_t r = first + 1; r < n; ++r) {
    if (errors[r]) {
      message += fmt::format("; replica {} ({}) failed too, in {}: {}", r, device(r).str(), stage(r),
                             describe_exception(errors[r]));
    }
  }
  throw ReplicaError(message, static_cast<int>(first), device(first).str(), errors[first]);
}

inline void ReplicaWorkers::synchronize() const {
  for (const auto& context : contexts_) context.synchronize();
}

}  // namespace multigpu
