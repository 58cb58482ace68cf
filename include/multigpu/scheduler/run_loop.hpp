#pragma once
/// @file
/// SchedulerCore's run loop: dispatching, waiting, stopping and draining
/// (see Note [Waking the scheduler] in wake_up.hpp, Note [The scheduler's own
/// errors] and Note [Two-stage Ctrl-C] below).

#include <algorithm>
#include <chrono>
#include <csignal>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/error.hpp"
#include "multigpu/scheduler/core.hpp"
#include "multigpu/scheduler/gpu_memory.hpp"
#include "multigpu/scheduler/reporting.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/validate.hpp"
#include "multigpu/scheduler/wake_up.hpp"

namespace multigpu {
namespace detail {

inline void SchedulerCore::request_stop(int signal) {
  stop_signal_ = signal;
  stop_ = true;
  wake_.notify();
}

inline void SchedulerCore::request_drain() {
  drain_ = true;
  wake_.notify();
}

inline RunSummary SchedulerCore::run(const std::vector<Task>& tasks) {
  validate_tasks(tasks, pool_);
  check_force_names(tasks);
  make_directories(options_.log_dir);
  const std::string base = options_.summary_path.empty() ? options_.log_dir + "/summary" : options_.summary_path;
  const auto slash = base.rfind('/');
  if (slash != std::string::npos && slash > 0) make_directories(base.substr(0, slash));
  // See Note [The log folder's lock] in log_dir.hpp. Released when run() returns.
  lock_fd_ = lock_log_dir(options_.log_dir);
  struct Unlock {
    int& fd;
    ~Unlock() {
      ::close(fd);
      fd = -1;
    }
  } unlock{lock_fd_};
  summary_ = RunSummary{};
  summary_.json_path = base + ".json";
  summary_.csv_path = base + ".csv";
  std::vector<Job> jobs;
  jobs.reserve(tasks.size());
  for (const auto& task : tasks) {
    Job job;
    job.task = task;
    job.result.name = task.name;
    job.result.log_path = options_.log_dir + "/" + file_safe(task.name) + ".log";
    std::string why_not;
    if (is_done(task, &why_not)) {
      job.result.status = TaskStatus::kSkipped;
      job.queued = false;
    } else if (!why_not.empty()) {
      warn(fmt::format("task {} runs again: {}", task.name, why_not));
      append_to_file(job.result.log_path, fmt::format("### running again: {}\n", why_not));
    }
    jobs.push_back(std::move(job));
  }
  jobs_ = &jobs;
  after_ = dependency_indexes(tasks);
  // See Note [Dependencies at scale] in dependencies.hpp.
  dependents_ = dependents_of(after_);
  not_done_before_.assign(jobs.size(), 0);
  ready_.clear();
  queued_count_ = 0;
  failed_since_.clear();
  results_.clear();
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    results_.push_back(&jobs[i].result);
    for (std::size_t d : after_[i]) {
      const TaskStatus status = jobs[d].result.status;
      if (status != TaskStatus::kDone && status != TaskStatus::kSkipped) ++not_done_before_[i];
    }
    if (jobs[i].queued) {
      jobs[i].queued = false;
      set_queued(jobs[i], true);
    }
  }
  stop_ = false;
  drain_ = false;
  draining_ = false;
  stop_signal_ = 0;
  fail_fast_task_.clear();
  run_error_.clear();
  std::fill(load_.begin(), load_.end(), 0);
  std::fill(holds_our_cache_.begin(), holds_our_cache_.end(), false);
  measured_before_ = pool_.front().is_cuda() ? peaks_in_summary(summary_.json_path) : decltype(measured_before_){};
  last_devices_.clear();
  promised_.clear();
  warned_unseen_ = false;
  most_running_ = 0;
  const SignalWatch signals(options_.handle_signals);
  run_start_ = std::chrono::steady_clock::now();
  last_status_ = {};
  next_summary_ = {};
  write_summary(jobs, false);

  bool stopping = false;
  bool killed = false;
  bool warned_busy = false;
  bool queue_empty = true;
  // Note [The scheduler's own errors]
  // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
  // An error of the scheduler's own (not a task's) never kills the running
  // tasks: no new task starts, the running ones are left to end (a stop
  // request still stops them), the summary is written, and then run()
  // rethrows the error.
  std::exception_ptr own_error;
  std::chrono::steady_clock::time_point kill_deadline{};
  // Note [Two-stage Ctrl-C]
  // ~~~~~~~~~~~~~~~~~~~~~~~
  // Hours of training should not end because a key was pressed once. The
  // first Ctrl-C drains the run: no new task starts, the running ones go on
  // to their end (done or failed, not retried), then the summary and exit
  // status 130. A second Ctrl-C, SIGTERM, SIGHUP or request_stop() stops
  // the running tasks (SIGTERM to each task's group, the grace period,
  // SIGKILL). interrupt_drains = false, or request_stop(), skips the first
  // stage; request_drain() is the first stage from C++.
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    try {
      // SIGTERM or SIGHUP is kept apart from Ctrl-C: a SIGINT after it must not hide it.
      const int hard_signal = signals.hard_signal();
      const int interrupts = signals.interrupts();
      const bool stop_signal = hard_signal != 0 || interrupts >= (options_.interrupt_drains ? 2 : 1);
      if (!stopping && !draining_ && !stop_.load() && !stop_signal && (drain_.load() || interrupts >= 1)) {
        draining_ = true;
        stop_signal_ = SIGINT;
        log(LogLevel::kWarning,
            fmt::format("draining: no new task starts; the {} running task(s) go on to their end (Ctrl-C again "
                        "stops them: SIGTERM, then SIGKILL after {} s)",
                        running_.size(), options_.grace_period.count() / 1000.0));
      }
      if (!stopping && (stop_.load() || stop_signal)) {
        stopping = true;
        if (stop_signal) stop_signal_ = hard_signal != 0 ? hard_signal : SIGINT;
        stop_ = true;  // in-process tasks see it
        for (auto& r : running_) {
          if (r->child) r->child->kill_group(SIGTERM);
        }
        kill_deadline = now + options_.grace_period;
        const std::string why = fail_fast_task_.empty() ? "" : "task " + fail_fast_task_ + " failed (fail-fast): ";
        log(LogLevel::kWarning, fmt::format("{}stopping: no new task starts; {} running task(s) get {} s to end", why,
                                            running_.size(), options_.grace_period.count() / 1000.0));
      }
      if (stopping && !killed && now >= kill_deadline) {
        for (auto& r : running_) {
          if (r->child) r->child->kill_group(SIGKILL);
        }
        killed = true;
      }

      for (std::size_t i = 0; i < running_.size();) {
        Running& r = *running_[i];
        const bool ended = r.child ? r.child->poll().has_value() : r.finished.load();
        if (!ended) {
          ++i;
          continue;
        }
        if (r.thread.joinable()) r.thread.join();
        const std::unique_ptr<Running> done = std::move(running_[i]);
        running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
        finish(*done);
      }

      queue_empty = true;
      std::optional<std::vector<DeviceInfo>> devices_now;
      // See Note [What a task uses on its GPUs] in gpu_memory.hpp.
      if (now - last_measure_ >= options_.poll_interval &&
          std::any_of(running_.begin(), running_.end(), [&](const auto& r) { return gpu_command(*r); })) {
        last_measure_ = now;
        devices_now = query_devices();
        measure_tasks(*devices_now);
      }
      if (!stopping && !draining_ && !own_error) {
        // See Note [Dependencies] in dependencies.hpp. Not once stopping: waiting tasks stay pending.
        if (!stop_.load()) end_dependents_not_run(jobs);
        queue_empty = queued_count_ == 0;
        // Only the tasks whose dependencies are met, in the order given (Note
        // [Dependencies at scale]); the others hold no device. start() or a
        // failure takes a task out of ready_, a retry may put it back.
        std::size_t index = 0;
        for (auto next = ready_.begin(); next != ready_.end(); next = ready_.upper_bound(index)) {
          index = *next;
          Job& job = jobs[index];
          if (stop_.load() || drain_.load() || signals.any()) break;  // asked to stop since the top of the loop
          if (std::none_of(load_.begin(), load_.end(), [&](int l) { return l < options_.max_per_device; })) break;
          if (!devices_now) {
            devices_now = query_devices();
            measure_tasks(*devices_now);  // what ours use now, so that the room is right
          }
          if (const std::string why = never_fits(job, *devices_now); !why.empty()) {
            set_queued(job, false);  // see Note [Packing tasks by memory] in gpu_memory.hpp
            job.result.status = TaskStatus::kFailed;
            job.result.error = "not run: " + why;
            ended_for_good(job);
            summary_dirty_ = true;
            stop_for_failure(job);
            continue;
          }
          if (auto placement = place(job, *devices_now)) {
            set_queued(job, false);
            job.waiting_since.reset();
            start(job, *placement);
            continue;
          }
          // Waiting. Only waiting on someone else's busy device counts towards the limit.
          std::string busy;
          for (std::size_t d = 0; d < pool_.size(); ++d) {
            if (load_[d] == 0 && !holds_our_cache_[d] && d < devices_now->size() && (*devices_now)[d].busy) {
              busy += (busy.empty() ? "" : ", ") + busy_reason(d, *devices_now);
            }
          }
          // Or, with GPU memory judged (gpu_memory.hpp), waiting for room that only others can free.
          const std::string room = busy.empty() ? room_wait_reason(job, *devices_now) : std::string();
          if (busy.empty() && room.empty()) {
            job.waiting_since.reset();
            continue;
          }
          if (!busy.empty() && !warned_busy) {  // once a run: many tasks wait on the same devices
            warn(fmt::format("tasks wait for busy devices: {}; busy means more than {} MiB in use by others, or "
                             "promised to another run's task",
                             busy, options_.memory_threshold_mib));
            warned_busy = true;
          }
          if (!room.empty() && !job.warned_room) {  // once a task: each waits for its own room
            warn(fmt::format("task {} waits for {}", job.task.name, room));
            job.warned_room = true;
          }
          if (busy.empty()) busy = room;
          if (!job.waiting_since) job.waiting_since = now;
          if (options_.busy_wait_limit.count() > 0 && now - *job.waiting_since >= options_.busy_wait_limit) {
            set_queued(job, false);
            job.result.status = TaskStatus::kFailed;
            ended_for_good(job);
            job.result.error = fmt::format("no device became free within {} s: {}",
                                           options_.busy_wait_limit.count() / 1000.0, busy);
            summary_dirty_ = true;
            stop_for_failure(job);
          }
        }
      }
      if (summary_dirty_ && until_summary_due().count() == 0) write_summary(jobs, false);
      print_status(jobs, false);
    } catch (const std::exception& e) {
      // See Note [The scheduler's own errors].
      if (!own_error) {
        own_error = std::current_exception();
        warn(fmt::format("the scheduler failed ({}); no new task starts, and the {} running task(s) are left to "
                         "end",
                         e.what(), running_.size()));
      }
    }
    if (running_.empty() && (stopping || draining_ || own_error || queue_empty)) break;
    // Sleep unless a request came in that the top of the loop has not acted on.
    const bool unhandled = (stop_.load() && !stopping) || (drain_.load() && !draining_ && !stopping);
    if (!unhandled &&
        std::none_of(running_.begin(), running_.end(), [](const auto& r) { return r->finished.load(); })) {
      std::vector<int> children;
      for (const auto& r : running_) {
        if (r->child) children.push_back(r->child->exit_fd());
      }
      // A summary held back (Note [How often the summary is written]) is written when due.
      wake_.wait(children, summary_dirty_ ? std::min(options_.poll_interval, until_summary_due())
                                          : options_.poll_interval);
    }
  }

  // A drain that left nothing unstarted (the queue was empty) cut nothing short.
  const bool left_queued = queued_count_ > 0;
  summary_.interrupted = stopping || (draining_ && left_queued);
  if (own_error) {
    try {
      std::rethrow_exception(own_error);
    } catch (const std::exception& e) {
      run_error_ = e.what();  // in the summary: `status` says the scheduler failed
    }
    write_summary(jobs, true);
    jobs_ = nullptr;
    std::rethrow_exception(own_error);
  }
  summary_.stop_signal = summary_.interrupted ? stop_signal_.load() : 0;
  summary_.fail_fast_task = fail_fast_task_;
  summary_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  write_summary(jobs, true);
  print_status(jobs, true);
  for (const auto& job : jobs) summary_.tasks.push_back(job.result);
  jobs_ = nullptr;
  return summary_;
}

}  // namespace detail
}  // namespace multigpu
