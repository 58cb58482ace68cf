#pragma once
/// @file
/// What a running scheduler reports: its summary files, rewritten as tasks
/// start and end (see Note [How often the summary is written]), and the
/// status line (SchedulerCore's members for these).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <fmt/core.h>

#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/scheduler/core.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {
namespace detail {

// Note [How often the summary is written]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Writing the summary costs time in proportion to the number of tasks (each
// task is a line of both files), and rewriting it at every start and end
// made a run's cost grow with the square of its size: 10,000 tasks of `true`
// were not finished after 400 s. So after a write, the next one waits ten
// times as long as that write took (kSummaryPause): the summary then costs
// at most about a tenth of the scheduler's time, whatever the number of
// tasks, and the time a task waits for a slot stays flat. With a few hundred
// tasks a write takes about a millisecond, and the file is still
// rewritten within a few milliseconds of each change; with 100,000 it may
// be seconds behind. A change is never lost: the loop wakes when the held
// back write is due, and the run's end (done, drained, stopped, or the
// scheduler's own error) writes the final summary at once. What a SIGKILL of
// the scheduler can cost is the changes of that last pause: `status` then
// shows a task that had ended as still running or pending, and a rerun
// checks each task's done marker, not the summary, so nothing is run twice
// or skipped because of it.

/// After a summary write, the next waits this many times as long as the write took.
inline constexpr int kSummaryPause = 10;

inline std::chrono::milliseconds SchedulerCore::until_summary_due() const {
  const auto now = std::chrono::steady_clock::now();
  if (now >= next_summary_) return std::chrono::milliseconds(0);
  // Rounded up: a wait of 0 ms before it is due would spin.
  return std::chrono::ceil<std::chrono::milliseconds>(next_summary_ - now);
}

inline void SchedulerCore::write_summary(const std::vector<Job>& jobs, bool final_write) {
  const auto began = std::chrono::steady_clock::now();
  std::vector<const TaskResult*> results;
  results.reserve(jobs.size());
  // A task that has not run in this run keeps the peak measured before, so
  // that the next run can still pack it (Note [Packing tasks by memory]).
  std::vector<TaskResult> carried;
  carried.reserve(jobs.size());  // no reallocation: `results` points into it
  for (const auto& job : jobs) {
    const auto before = measured_before_.find(job.task.name);
    if (job.result.attempts == 0 && job.result.peak_gpu_bytes < 0 && before != measured_before_.end()) {
      carried.push_back(job.result);
      carried.back().peak_gpu_bytes = before->second;
      results.push_back(&carried.back());
    } else {
      results.push_back(&job.result);
    }
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  SummaryLive live;
  live.running.assign(jobs.size(), false);
  if (!final_write) {
    for (const auto& r : running_) live.running[r->job] = true;
  }
  live.pid = static_cast<long>(::getpid());
  live.host = host_name();
  live.slots = slots();
  live.fail_fast_task = fail_fast_task_;
  live.error = run_error_;
  std::error_code no_throw;
  live.log_dir = std::filesystem::absolute(options_.log_dir, no_throw).lexically_normal().string();
  const std::string json = summary_json(results, final_write, summary_.interrupted, elapsed, live);
  const std::string csv = summary_csv(results);
  // A summary that cannot be written (a full disk, a deleted folder) is the
  // summary's problem, not the tasks': say so once, and try again at the
  // next change. The final write's error is in RunSummary::summary_error.
  try {
    write_file_atomically(summary_.json_path, json);
    write_file_atomically(summary_.csv_path, csv);
    summary_dirty_ = false;
    last_summary_error_.clear();
    if (final_write) summary_.summary_error.clear();
  } catch (const std::exception& e) {
    if (final_write) summary_.summary_error = e.what();
    if (e.what() != last_summary_error_) {
      last_summary_error_ = e.what();
      warn(fmt::format("the summary was not written ({}); trying again as tasks end", e.what()));
    }
  }
#if defined(__GLIBC__)
  // The text and its pieces are freed, but glibc keeps their pages, and
  // every page of ours is a page table entry that the fork of each task's
  // supervisor copies: give them back.
  ::malloc_trim(0);
#endif
  // A failed write waits as long: see Note [How often the summary is written].
  const auto ended = std::chrono::steady_clock::now();
  next_summary_ = ended + (ended - began) * kSummaryPause;
}

inline void SchedulerCore::print_status(const std::vector<Job>& jobs, bool force) {
  if (!options_.status_line) return;
  static const bool tty = ::isatty(STDERR_FILENO) != 0;
  const auto now = std::chrono::steady_clock::now();
  const auto interval = tty ? std::chrono::milliseconds(500) : options_.status_interval;
  if (!force && now - last_status_ < interval) return;
  last_status_ = now;
  std::size_t counts[5] = {};
  double done_seconds = 0;
  for (const auto& job : jobs) {
    ++counts[static_cast<int>(job.result.status)];
    if (job.result.status == TaskStatus::kDone) done_seconds += job.result.seconds;
  }
  std::string running;
  for (const auto& r : running_) {
    running += fmt::format("{}{} {}", running.empty() ? "" : ", ", pool_[r->devices.front()].is_cpu()
                                                                       ? std::string("cpu")
                                                                       : fmt::format("cuda:{}", pool_[r->devices.front()].index),
                           (*jobs_)[r->job].task.name);
  }
  const std::size_t done = counts[static_cast<int>(TaskStatus::kDone)];
  const std::size_t pending = counts[static_cast<int>(TaskStatus::kPending)] - running_.size();
  const double elapsed = std::chrono::duration<double>(now - run_start_).count();
  std::string eta = "?";
  if (done > 0) {
    const auto slots_now = static_cast<double>(slots());
    eta = clock_text(done_seconds / static_cast<double>(done) * static_cast<double>(pending + running_.size()) / slots_now);
  }
  const std::string line = fmt::format("[{}] running {}{}{}{} | done {} failed {} skipped {} pending {} | ETA {}",
                                       clock_text(elapsed), running_.size(), running.empty() ? "" : " (", running,
                                       running.empty() ? "" : ")", done, counts[static_cast<int>(TaskStatus::kFailed)],
                                       counts[static_cast<int>(TaskStatus::kSkipped)], pending, eta);
  // fwrite, not fmt::print: a closed terminal must not stop the run.
  const std::string text = tty ? fmt::format("\r{:<120.120}{}", line, force ? "\n" : "") : line + "\n";
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
}

}  // namespace detail
}  // namespace multigpu
