#pragma once
/// @file
/// The non-template scheduler (SchedulerCore): placement of tasks on the
/// pool's devices, starting and ending them, dry runs. The run loop
/// (SchedulerCore::run) is in run_loop.hpp, the summary and status line in
/// reporting.hpp, GPU memory in gpu_memory.hpp.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/config.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/scheduler/process.hpp"
#include "multigpu/device.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scheduler/dependencies.hpp"
#include "multigpu/scheduler/done_record.hpp"
#include "multigpu/scheduler/failure.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/options.hpp"
#include "multigpu/scheduler/reservations.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"
#include "multigpu/scheduler/validate.hpp"
#include "multigpu/scheduler/wake_up.hpp"

#if MULTIGPU_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace multigpu {
namespace detail {

// Note [Emptying the cache between tasks]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// An in-process task leaves the memory it used in LibTorch's caching
// allocator. The scheduler gives it back (emptyCache) when the task has
// ended, so that other processes, and command tasks, can use it. But
// emptyCache releases the cached blocks of every GPU of this process with
// cudaFree, which synchronises the device and can deadlock against the NCCL
// launches of an in-process task still running (see Note [NCCL and
// cudaFree] in detail/cuda.hpp). So the scheduler empties the cache, from
// its own thread, only when no other in-process task on a GPU is running;
// until then the GPUs of the tasks that ended keep our cache and are not
// judged busy by the memory in use there (a later in-process task reuses
// that cache). A task's own worker threads have ended with it.

/// The non-template scheduler: dispatches over a pool whose busy state a
/// callback reports (see BasicScheduler).
class SchedulerCore {
 public:
  /// `real_devices`: the pool's GPUs are CUDA's, so in-process tasks run
  /// with theirs current (false for a scripted machine).
  /// `release_cached_memory`: empties LibTorch's caching allocator, on every
  /// GPU (see Note [Emptying the cache between tasks]).
  SchedulerCore(SchedulerOptions options, std::vector<DeviceInfo> pool,
                std::function<std::vector<DeviceInfo>()> query, bool real_devices,
                std::function<void()> release_cached_memory = {});
  RunSummary run(const std::vector<Task>& tasks);
  std::vector<PlannedTask> plan(const std::vector<Task>& tasks) const;
  void request_stop(int signal = SIGINT);
  void request_drain();

 private:
  struct Job;
  struct Running;
  bool is_done(const Task& task, std::string* why_not = nullptr) const;
  void check_force_names(const std::vector<Task>& tasks) const;
  std::optional<std::vector<std::size_t>> place(const Job& job, const std::vector<DeviceInfo>& now) const;
  std::vector<DeviceInfo> query_devices();
  void start(Job& job, const std::vector<std::size_t>& devices);
  void finish(Running& running);
  void conclude(Job& job, const std::vector<std::size_t>& devices, bool success, bool out_of_memory);
  void release_cache_unless_in_use(const Running& ended);
  void set_queued(Job& job, bool queued);
  void ended_for_good(const Job& job);
  void end_dependents_not_run(std::vector<Job>& jobs);
  void write_summary(const std::vector<Job>& jobs, bool final_write);
  std::chrono::milliseconds until_summary_due() const;
  void print_status(const std::vector<Job>& jobs, bool force);
  void stop_for_failure(const Job& job);
  // GPU memory: see gpu_memory.hpp.
  std::int64_t size_of(const Job& job) const;
  bool gpu_command(const Running& running) const;
  void measure_tasks(const std::vector<DeviceInfo>& now);
  std::optional<std::int64_t> room_on(std::size_t d, const std::vector<DeviceInfo>& now) const;
  std::optional<std::int64_t> largest_gpu(const std::vector<DeviceInfo>& now, std::string* which) const;
  bool room_allows(const Job& job, std::size_t d, const std::vector<DeviceInfo>& now) const;
  std::string never_fits(const Job& job, const std::vector<DeviceInfo>& now) const;
  void after_out_of_memory(Job& job, const Running& running);
  std::string busy_reason(std::size_t d, const std::vector<DeviceInfo>& now) const;
  std::string room_wait_reason(const Job& job, const std::vector<DeviceInfo>& now) const;
  /// Tasks at once: devices x max_per_device, or, packing by memory, the
  /// most that have run at once so far (at least one per device).
  std::size_t slots() const {
    return options_.pack_by_memory ? std::max(pool_.size(), most_running_)
                                   : pool_.size() * static_cast<std::size_t>(options_.max_per_device);
  }

  SchedulerOptions options_;
  std::vector<DeviceInfo> pool_;
  std::function<std::vector<DeviceInfo>()> query_;
  bool real_devices_ = true;
  std::function<void()> release_cached_memory_;
  std::vector<int> load_;  // our running tasks per pool device
  std::vector<bool> holds_our_cache_;  // per pool device: see Note [Emptying the cache between tasks]
  std::vector<std::unique_ptr<Running>> running_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> drain_{false};
  std::atomic<int> stop_signal_{0};
  bool draining_ = false;  // see Note [Two-stage Ctrl-C]
  std::mutex mutex_;             // in-process completions
  WakeUp wake_;                  // see Note [Waking the scheduler] in wake_up.hpp
  std::chrono::steady_clock::time_point run_start_{};
  std::chrono::steady_clock::time_point last_status_{};
  RunSummary summary_;
  std::vector<Job>* jobs_ = nullptr;
  bool summary_dirty_ = false;        // a task changed since the summary was last written
  std::string last_summary_error_;    // warned about once
  bool warned_query_ = false;
  int lock_fd_ = -1;  // the log folder's lock, kept by command tasks' supervisors too
  std::vector<std::vector<std::size_t>> after_;  // per task: the tasks it runs after (see Note [Dependencies])
  // See Note [Dependencies at scale] in dependencies.hpp:
  std::vector<std::vector<std::size_t>> dependents_;  // per task: the tasks that run after it
  std::vector<std::size_t> not_done_before_;  // per task: how many of its after_ are not done or skipped yet
  std::set<std::size_t> ready_;               // queued tasks with not_done_before_ 0, in the order given
  std::size_t queued_count_ = 0;              // queued tasks, ready or not
  std::vector<std::size_t> failed_since_;     // tasks ended failed or interrupted, whose dependents are not ended yet
  std::vector<const TaskResult*> results_;    // per task: its result, for tasks_not_run
  // See Note [How often the summary is written] in reporting.hpp:
  std::chrono::steady_clock::time_point next_summary_{};
  std::string run_error_;  // the scheduler's own error that ended run(), for the summary
  std::string fail_fast_task_;  // the task whose failure stops the run (SchedulerOptions::fail_fast)
  GpuReservations reservations_;  // see Note [A GPU promised to a task] in reservations.hpp
  std::vector<OtherReservations> promised_;  // per pool device, as last queried
  std::vector<DeviceInfo> last_devices_;      // the pool as last queried
  std::chrono::steady_clock::time_point last_measure_{};
  std::map<std::string, std::int64_t> measured_before_;  // peaks from the last run's summary
  bool warned_unseen_ = false;
  std::size_t most_running_ = 0;  // the most tasks that have run at once
  std::string last_reservation_error_;
};

// ---------------------------------------------------------------------------
// Definitions

struct SchedulerCore::Job {
  Task task;
  TaskResult result;
  std::set<std::size_t> avoid;  // devices not to retry on
  bool queued = true;
  std::optional<std::chrono::steady_clock::time_point> waiting_since;
  // The done marker as the current attempt found it (see Note [A done
  // marker's command]): whether it existed, and its time if it did.
  std::optional<std::filesystem::file_time_type> marker_before;
  // The room its last attempt had when it ran out of GPU memory (-1: it did
  // not); see Note [Retrying after out of memory] in gpu_memory.hpp.
  std::optional<std::int64_t> oom_room;
  bool warned_room = false;  // said once what room it waits for
};

struct SchedulerCore::Running {
  std::size_t job = 0;
  std::vector<std::size_t> devices;
  std::chrono::steady_clock::time_point started;
  std::unique_ptr<ChildProcess> child;
  std::uint64_t output_start = 0;  // where this attempt's output begins in the log
  std::thread thread;  // in-process tasks
  std::atomic<bool> finished{false};
  std::exception_ptr error;
  // Per device of the attempt (see Note [What a task uses on its GPUs]):
  std::vector<std::int64_t> current;        // what its processes use now
  std::vector<bool> appeared;               // a process of it was seen there
  std::vector<std::optional<std::int64_t>> room_at_start;  // the room when it started
  std::vector<std::optional<std::int64_t>> room;           // the smallest room it had
  std::vector<bool> promised;                              // our promise of that GPU stands
};

inline SchedulerCore::SchedulerCore(SchedulerOptions options, std::vector<DeviceInfo> pool,
                                    std::function<std::vector<DeviceInfo>()> query, bool real_devices,
                                    std::function<void()> release_cached_memory)
    : options_(std::move(options)),
      pool_(std::move(pool)),
      query_(std::move(query)),
      real_devices_(real_devices),
      release_cached_memory_(std::move(release_cached_memory)),
      load_(pool_.size(), 0),
      holds_our_cache_(pool_.size(), false),
      reservations_(options_.reservation_dir) {
  if (pool_.empty()) throw SchedulerError("the device pool is empty");
  if (options_.max_per_device < 1) {
    throw SchedulerError(fmt::format("max_per_device must be 1 or more, got {}", options_.max_per_device));
  }
  if (options_.retries < 0) throw SchedulerError(fmt::format("retries must be 0 or more, got {}", options_.retries));
  if (options_.poll_interval.count() <= 0) throw SchedulerError("poll_interval must be positive");
  if (options_.pack_by_memory && !pool_.front().is_cuda()) {
    throw SchedulerError("packing tasks by GPU memory (--max-per-gpu auto) needs GPUs, but the pool is the CPU; give "
                         "a number of tasks per device instead");
  }
  if (options_.memory_threshold_mib < 0 || options_.memory_threshold_mib > (std::int64_t{1} << 30)) {
    throw SchedulerError(fmt::format("the busy threshold must be 0 to 2^30 MiB, got {}", options_.memory_threshold_mib));
  }
  if (options_.memory_margin_mib < 0 || options_.memory_margin_mib > (std::int64_t{1} << 30)) {
    throw SchedulerError(fmt::format("the memory margin must be 0 to 2^30 MiB, got {}", options_.memory_margin_mib));
  }
  if (options_.log_dir.empty()) {
    throw SchedulerError("the log folder is \"\"; name a folder for the task logs and the summary (default "
                         "multigpu-logs; \".\" for the current folder)");
  }
}

inline bool SchedulerCore::is_done(const Task& task, std::string* why_not) const {
  if (options_.force || task.done_marker.empty()) return false;
  if (std::find(options_.force_tasks.begin(), options_.force_tasks.end(), task.name) != options_.force_tasks.end()) {
    return false;
  }
  // See Note [A done marker's command] in done_record.hpp.
  return path_exists(task.done_marker) && marker_is_current(options_.log_dir, task, why_not);
}

inline void SchedulerCore::check_force_names(const std::vector<Task>& tasks) const {
  for (const auto& name : options_.force_tasks) {
    if (std::none_of(tasks.begin(), tasks.end(), [&](const Task& task) { return task.name == name; })) {
      std::string names;
      for (std::size_t i = 0; i < tasks.size() && i < 8; ++i) names += (i == 0 ? "" : ", ") + tasks[i].name;
      if (tasks.size() > 8) names += fmt::format(", ... ({} in all)", tasks.size());
      throw SchedulerError(fmt::format("--force names no task: \"{}\"; the tasks are {}", name, names));
    }
  }
}

inline std::optional<std::vector<std::size_t>> SchedulerCore::place(const Job& job,
                                                                     const std::vector<DeviceInfo>& now) const {
  // Free and not busy; devices the task failed on come last, and are used
  // only when every device of the pool is among them.
  std::vector<std::size_t> preferred;
  std::vector<std::size_t> avoided;
  for (std::size_t d = 0; d < pool_.size(); ++d) {
    if (load_[d] >= options_.max_per_device) continue;
    // A device with a task of ours, or our cache, uses memory because of
    // it: only devices without either are judged busy.
    if (load_[d] == 0 && !holds_our_cache_[d] && d < now.size() && now[d].busy) continue;
    if (!room_allows(job, d, now)) continue;  // see gpu_memory.hpp
    (job.avoid.count(d) != 0 ? avoided : preferred).push_back(d);
  }
  const auto needed = static_cast<std::size_t>(job.task.devices);
  if (job.avoid.size() >= pool_.size()) preferred.insert(preferred.end(), avoided.begin(), avoided.end());
  if (preferred.size() < needed) return std::nullopt;
  preferred.resize(needed);
  return preferred;
}

inline std::vector<DeviceInfo> SchedulerCore::query_devices() {
  try {
    auto now = query_();
    // Other runs' promises (Note [A GPU promised to a task]): a GPU promised
    // whole, or any promised GPU when not packing by memory, is busy.
    promised_.assign(pool_.size(), OtherReservations{});
    const auto others = pool_.front().is_cuda() ? reservations_.others() : decltype(reservations_.others()){};
    for (std::size_t d = 0; d < pool_.size() && d < now.size(); ++d) {
      if (!pool_[d].is_cuda()) continue;
      promised_[d] = GpuReservations::of_gpu(others, pool_[d].uuid);
      if (promised_[d].unsized || (promised_[d].count > 0 && !options_.pack_by_memory)) now[d].busy = true;
    }
    last_devices_ = now;
    return now;
  } catch (const std::exception& e) {
    // The tasks already running are not the query's business: go on with
    // the pool as it was (no device judged busy), and say so once.
    if (!warned_query_) {
      warn(fmt::format("cannot look at the devices' memory ({}); tasks are placed without busy detection",
                       e.what()));
      warned_query_ = true;
    }
    std::vector<DeviceInfo> now = pool_;
    for (auto& device : now) {
      device.busy = false;
      device.used_bytes = -1;  // unknown now: packing by memory takes one task per GPU
      device.processes.reset();
    }
    return now;
  }
}

inline void SchedulerCore::start(Job& job, const std::vector<std::size_t>& devices) {
  auto running = std::make_unique<Running>();
  running->job = static_cast<std::size_t>(&job - jobs_->data());
  running->devices = devices;
  running->started = std::chrono::steady_clock::now();
  running->current.assign(devices.size(), 0);
  running->appeared.assign(devices.size(), false);
  for (std::size_t d : devices) running->room_at_start.push_back(room_on(d, last_devices_));
  running->room = running->room_at_start;
  running->promised.assign(devices.size(), false);
  TaskResult& result = job.result;
  ++result.attempts;
  result.start = std::chrono::system_clock::now();
  job.marker_before = marker_time(job.task.done_marker);
  result.devices.clear();
  std::vector<DeviceInfo> infos;
  std::string visible;
  for (std::size_t d : devices) {
    ++load_[d];
    infos.push_back(pool_[d]);
    result.devices.push_back(pool_[d].is_cpu() ? std::string("cpu") : pool_[d].label());
    if (!pool_[d].is_cpu()) visible += (visible.empty() ? "" : ",") + pool_[d].visible_devices_token;
  }
  result.visible_devices = visible;
  if (job.oom_room) {  // see Note [Retrying after out of memory] in gpu_memory.hpp
    std::string rooms;
    for (const auto& room : running->room_at_start) rooms += (rooms.empty() ? "" : ", ") + memory_text(room.value_or(-1));
    result.memory_note += fmt::format("; attempt {} on {} with {} free", result.attempts, on_text(result.devices), rooms);
  }
  result.exit_code.reset();
  result.error.clear();
  const std::string on = on_text(result.devices);
  append_to_file(result.log_path, fmt::format("### multigpu: task {}, attempt {}, on {}, CUDA_VISIBLE_DEVICES={}, {}\n",
                                              job.task.name, result.attempts, on, visible, iso8601(result.start)));
  if (!job.task.command.empty()) {
    const std::string command = command_for(job.task.command, visible, job.task.name);
    append_to_file(result.log_path, fmt::format("### command: {}\n", command));
    const auto env = environment_with({{"CUDA_VISIBLE_DEVICES", visible},
                                       {"MULTIGPU_TASK", job.task.name},
                                       {"MULTIGPU_TASK_ATTEMPT", std::to_string(result.attempts)}});
    running->output_start = file_size(result.log_path);
    for (std::size_t i = 0; i < devices.size(); ++i) {  // see Note [A GPU promised to a task]
      const std::size_t d = devices[i];
      if (!pool_[d].is_cuda() || pool_[d].uuid.empty()) continue;
      const std::string problem = reservations_.reserve(pool_[d].uuid, job.task.name,
                                                        options_.pack_by_memory ? size_of(job) : -1,
                                                        options_.reservation_timeout);
      running->promised[i] = problem.empty();
      if (!problem.empty() && problem != last_reservation_error_) {
        last_reservation_error_ = problem;
        warn(fmt::format("other runs on this machine are not told that a GPU is promised to task {} ({})",
                         job.task.name, problem));
      }
    }
    try {
      running->child = std::make_unique<ChildProcess>(
          command, env, result.log_path,
          std::chrono::duration_cast<std::chrono::seconds>(options_.grace_period + std::chrono::milliseconds(999)),
          lock_fd_);
    } catch (const std::exception& e) {
      // This task's failure (a command over the argument limit, a log that
      // cannot be opened), not the run's.
      result.error = e.what();
      append_to_file(result.log_path, fmt::format("### cannot start: {}\n", result.error));
      result.seconds = 0;
      summary_dirty_ = true;
      for (std::size_t d : devices) reservations_.release(pool_[d].uuid, job.task.name);
      conclude(job, devices, false, false);
      return;
    }
  } else {
    Running* raw = running.get();
    const std::function<void(TaskContext&)>* function = &job.task.function;
    const bool on_cuda = real_devices_ && infos.front().is_cuda();
    running->thread = std::thread([this, raw, function, infos, on_cuda, name = job.task.name, log = result.log_path,
                                   attempt = result.attempts] {
      try {
#if MULTIGPU_WITH_CUDA
        std::optional<c10::cuda::CUDAGuard> guard;
        if (on_cuda) guard.emplace(infos.front().device());
#endif
        TaskContext context(name, infos, log, attempt, &stop_);
        (*function)(context);
      } catch (...) {
        raw->error = std::current_exception();
      }
#if !MULTIGPU_WITH_CUDA
      (void)on_cuda;
#endif
      {
        std::lock_guard<std::mutex> lock(mutex_);
        raw->finished = true;
      }
      wake_.notify();
    });
  }
  running_.push_back(std::move(running));
  most_running_ = std::max(most_running_, running_.size());
  summary_dirty_ = true;
}


inline void SchedulerCore::finish(Running& running) {
  Job& job = (*jobs_)[running.job];
  TaskResult& result = job.result;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - running.started).count();
  bool success = false;
  bool out_of_memory = false;
  for (std::size_t d : running.devices) {
    if (pool_[d].is_cuda()) result.gpu_seconds += result.seconds;
    if (running.child && pool_[d].is_cuda()) reservations_.release(pool_[d].uuid, job.task.name);
  }
  if (running.child) {
    const ProcessExit& exit = running.child->wait_blocking();
    result.exit_code = exit.exit_code;
    success = exit.success();
    if (!success) {
      result.error = describe_command_exit(exit, file_tail(result.log_path, 4096));
      out_of_memory = output_mentions_out_of_memory(result.log_path, running.output_start);
    }
  } else {
    if (running.thread.joinable()) running.thread.join();
    if (pool_[running.devices.front()].is_cuda()) {
      for (std::size_t d : running.devices) holds_our_cache_[d] = true;
      release_cache_unless_in_use(running);
    }
    if (running.error) {
      result.error = describe_exception(running.error);
      out_of_memory = looks_like_out_of_memory(result.error);
      append_to_file(result.log_path, fmt::format("### exception: {}\n", result.error));
    } else {
      success = true;
    }
  }
  if (out_of_memory) {
    result.out_of_memory = true;  // for size_of: the retry counts at least the peak it reached
    after_out_of_memory(job, running);
  }
  summary_dirty_ = true;
  conclude(job, running.devices, success, out_of_memory);
}

inline void SchedulerCore::conclude(Job& job, const std::vector<std::size_t>& devices, bool success,
                                    bool out_of_memory) {
  TaskResult& result = job.result;
  for (std::size_t d : devices) --load_[d];
  if (!success && !out_of_memory) job.oom_room.reset();  // not for memory (or it never started): the usual retry
  result.out_of_memory = result.out_of_memory || out_of_memory;  // any attempt
  const bool stopping = stop_.load();
  if (success) {
    result.status = TaskStatus::kDone;
    const auto index = static_cast<std::size_t>(&job - jobs_->data());
    for (std::size_t after_it : dependents_[index]) {  // see Note [Dependencies at scale] in dependencies.hpp
      if (--not_done_before_[after_it] == 0 && (*jobs_)[after_it].queued) ready_.insert(after_it);
    }
    append_to_file(result.log_path, fmt::format("### done in {:.1f} s\n", result.seconds));
    if (!job.task.done_marker.empty() && !path_exists(job.task.done_marker)) {
      warn(fmt::format("task {} succeeded but did not create its done marker {}; a rerun will run it again",
                       job.task.name, job.task.done_marker));
    } else if (!job.task.done_marker.empty() && !job.task.command.empty() && job.marker_before &&
               marker_time(job.task.done_marker) == job.marker_before) {
      // An old marker the task did not make again (it may have found its old
      // output and exited at once): not the new command's result.
      warn(fmt::format("task {} succeeded but did not make its done marker {} again (it is from an earlier run); "
                       "its command is not recorded, and a rerun will run it again",
                       job.task.name, job.task.done_marker));
    } else if (!job.task.done_marker.empty() && !job.task.command.empty()) {
      try {  // see Note [A done marker's command] in done_record.hpp
        record_done_command(options_.log_dir, job.task);
      } catch (const std::exception& e) {
        warn(fmt::format("task {}: its command was not recorded beside its done marker ({}); a rerun trusts the "
                         "marker",
                         job.task.name, e.what()));
      }
    }
  } else if (stopping) {
    result.status = TaskStatus::kInterrupted;
    ended_for_good(job);
    append_to_file(result.log_path, fmt::format("### interrupted after {:.1f} s ({})\n", result.seconds, result.error));
  } else if (result.attempts <= options_.retries && !draining_) {
    // Another device next time: it may be this one that is crowded or broken.
    // Out of memory with the room known: any GPU with more room, its own
    // included (see Note [Retrying after out of memory] in gpu_memory.hpp).
    if (!(out_of_memory && job.oom_room)) {
      for (std::size_t d : devices) job.avoid.insert(d);
    }
    result.status = TaskStatus::kPending;
    set_queued(job, true);
    append_to_file(result.log_path, fmt::format("### failed ({}){}; retrying ({} of {})\n", result.error,
                                                out_of_memory ? ", out of GPU memory" : "", result.attempts,
                                                options_.retries));
  } else {
    result.status = TaskStatus::kFailed;
    ended_for_good(job);
    if (draining_ && result.attempts <= options_.retries) result.error += " (not retried: the run was draining after Ctrl-C)";
    append_to_file(result.log_path, fmt::format("### failed after {:.1f} s: {}\n", result.seconds, result.error));
    stop_for_failure(job);
  }
}

inline void SchedulerCore::set_queued(Job& job, bool queued) {
  // See Note [Dependencies at scale] in dependencies.hpp.
  if (job.queued == queued) return;
  job.queued = queued;
  const auto index = static_cast<std::size_t>(&job - jobs_->data());
  if (queued) {
    ++queued_count_;
    if (not_done_before_[index] == 0) ready_.insert(index);
  } else {
    --queued_count_;
    ready_.erase(index);
  }
}

inline void SchedulerCore::ended_for_good(const Job& job) {
  const auto index = static_cast<std::size_t>(&job - jobs_->data());
  if (!dependents_[index].empty()) failed_since_.push_back(index);
}

inline void SchedulerCore::end_dependents_not_run(std::vector<Job>& jobs) {
  // See Note [Dependencies] and Note [Dependencies at scale] in dependencies.hpp.
  if (failed_since_.empty()) return;
  const auto ended = end_tasks_not_run(after_, dependents_, jobs, results_, failed_since_);
  failed_since_.clear();
  for (std::size_t i : ended) set_queued(jobs[i], false);
  if (!ended.empty()) summary_dirty_ = true;
}

inline void SchedulerCore::release_cache_unless_in_use(const Running& ended) {
  // See Note [Emptying the cache between tasks].
  const bool in_use = std::any_of(running_.begin(), running_.end(), [&](const std::unique_ptr<Running>& other) {
    return other.get() != &ended && !other->child && pool_[other->devices.front()].is_cuda();
  });
  if (in_use || !release_cached_memory_) return;
  try {
#if MULTIGPU_WITH_CUDA
    // On a GPU that has a context already, so that none is made on cuda:0.
    std::optional<c10::cuda::CUDAGuard> guard;
    if (real_devices_) guard.emplace(pool_[ended.devices.front()].device());
#endif
    release_cached_memory_();
    std::fill(holds_our_cache_.begin(), holds_our_cache_.end(), false);
  } catch (const std::exception& e) {
    warn(fmt::format("could not give the cached GPU memory of task {} back: {}", (*jobs_)[ended.job].task.name,
                     e.what()));
  }
}

inline void SchedulerCore::stop_for_failure(const Job& job) {
  // SchedulerOptions::fail_fast: stopped as by a stop request, without a signal.
  if (!options_.fail_fast || !fail_fast_task_.empty() || stop_.load()) return;
  fail_fast_task_ = job.task.name;
  stop_ = true;
  wake_.notify();
}

inline std::vector<PlannedTask> SchedulerCore::plan(const std::vector<Task>& tasks) const {
  validate_tasks(tasks, pool_);
  check_force_names(tasks);
  std::vector<PlannedTask> planned;
  // Packing by memory depends on what the tasks will use: the plan shows one per device.
  const int per_device = options_.pack_by_memory ? 1 : options_.max_per_device;
  std::vector<int> load(pool_.size(), 0);
  std::size_t next = 0;  // round-robin start, so equal-length waves spread evenly
  for (const auto& task : tasks) {
    PlannedTask p;
    p.name = task.name;
    p.skipped = is_done(task, &p.note);
    p.after = task.after;
    p.memory_mib = task.memory_mib;
    if (!p.skipped) {
      if (std::count_if(load.begin(), load.end(), [&](int l) { return l < per_device; }) < task.devices) {
        std::fill(load.begin(), load.end(), 0);  // the next wave
      }
      for (int taken = 0; taken < task.devices;) {
        const std::size_t d = next++ % pool_.size();
        if (load[d] >= per_device) continue;
        ++load[d];
        ++taken;
        p.devices.push_back(pool_[d].is_cpu() ? std::string("cpu") : pool_[d].label());
        if (!pool_[d].is_cpu()) p.visible_devices += (p.visible_devices.empty() ? "" : ",") + pool_[d].visible_devices_token;
      }
      if (!task.command.empty()) {
        p.command = command_for(task.command, p.visible_devices, task.name);
      }
    }
    planned.push_back(std::move(p));
  }
  return planned;
}

}  // namespace detail
}  // namespace multigpu
