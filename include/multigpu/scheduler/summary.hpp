#pragma once
/// @file
/// The outcome of a run (RunSummary) and its files: summary.json and
/// summary.csv.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#if !__has_include(<nlohmann/json.hpp>)
// See Note [nlohmann-json, for the scheduler] in cmake/multigpuDependencies.cmake.
#error "multigpu/scheduler.hpp needs nlohmann-json 3 (Debian: nlohmann-json3-dev; or scripts/vendor-deps.sh's)"
#endif
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {

/// The outcome of a run.
struct RunSummary {
  std::vector<TaskResult> tasks;  ///< In the order the tasks were given.
  /// Whether the run was stopped (Ctrl-C, a signal, --fail-fast).
  bool interrupted = false;
  int stop_signal = 0;  ///< SIGINT or SIGTERM when a signal stopped the run.
  /// With SchedulerOptions::fail_fast: the task whose failure stopped the run ("" otherwise).
  std::string fail_fast_task;
  /// The run's duration.
  double seconds = 0;
  std::string json_path;  ///< Where the summary was written.
  /// Where the CSV summary was written.
  std::string csv_path;
  /// Why the summary files could not be written at the end ("" when they were).
  std::string summary_error;

  /// Tasks that ended with this status.
  std::size_t count(TaskStatus status) const {
    return static_cast<std::size_t>(
        std::count_if(tasks.begin(), tasks.end(), [status](const TaskResult& r) { return r.status == status; }));
  }
  /// 0 when every task is done or skipped, 1 when some failed (also when
  /// that stopped the run: fail_fast), 128 + signal (130 for Ctrl-C, 143 for
  /// SIGTERM, 129 for SIGHUP) when the run was stopped.
  int exit_code() const {
    if (interrupted && !fail_fast_task.empty() && stop_signal == 0) return 1;
    if (interrupted) return 128 + (stop_signal != 0 ? stop_signal : SIGINT);
    return count(TaskStatus::kFailed) > 0 ? 1 : 0;
  }
};

namespace detail {

// Note [The summary's JSON]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// summary.json is written with nlohmann-json. Task names are refused unless
// they are UTF-8 (validate_tasks), but an error's text (a program's output,
// an exception's message) may hold any bytes: those that are not UTF-8
// become U+FFFD, so the file always parses. nlohmann-json is found by
// multigpu's CMake files where present and needed only by the scheduler's
// headers: a training program builds without it.

/// A JSON string literal of `text`; bytes that are not UTF-8 become U+FFFD
/// (see Note [The summary's JSON]).
inline std::string json_string(std::string_view text) {
  return nlohmann::json(std::string(text)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// Who is writing a summary, and what is running now: what `multigpu-run
/// status` needs besides the results (see Note [Seeing a run from anywhere]
/// in scheduler/run_status.hpp).
struct SummaryLive {
  std::vector<bool> running;  ///< Per task (in the order given): running now.
  long pid = 0;               ///< The scheduler's process.
  std::string host;
  std::size_t slots = 0;      ///< Tasks at once (devices x tasks per device).
  std::string fail_fast_task;  ///< The task whose failure stopped the run (fail_fast), or "".
  std::string error;           ///< The scheduler's own error that ended the run, or "".
  std::string log_dir;         ///< Absolute: where `status` finds the run's lock.
};

/// Seconds since 1970 of `time` (0 for a time never set).
inline double unix_seconds(std::chrono::system_clock::time_point time) {
  if (time == std::chrono::system_clock::time_point{}) return 0;
  return std::round(std::chrono::duration<double>(time.time_since_epoch()).count() * 1000) / 1000;
}

/// summary.json's text: each task's result, in the order given, and the run's
/// state (`finished`: the run has ended; `seconds`: its time so far; what is
/// running now, who writes it and when).
inline std::string summary_json(const std::vector<const TaskResult*>& results, bool finished, bool interrupted,
                                double seconds, const SummaryLive& live = {}) {
  using Json = nlohmann::ordered_json;  // keys in the order written, for people reading the file
  const auto milliseconds = [](double value) { return std::round(value * 1000) / 1000; };
  // One task's object at a time, appended as text: a document of every task
  // at once took several times the file's size in memory, for 100,000 tasks
  // hundreds of MB (the text is the same: each object indented as an
  // element of "tasks").
  std::string tasks = results.empty() ? "[]" : "[\n";
  std::size_t counts[5] = {};
  for (std::size_t i = 0; i < results.size(); ++i) {
    const TaskResult& r = *results[i];
    ++counts[static_cast<int>(r.status)];
    const Json task{{"task", r.name},
                    {"status", to_string(r.status)},
                    {"running", i < live.running.size() && live.running[i]},
                    {"devices", r.devices},
                    {"cuda_visible_devices", r.visible_devices},
                    {"start", iso8601(r.start)},
                    {"start_unix", unix_seconds(r.start)},
                    {"seconds", milliseconds(r.seconds)},
                    {"attempts", r.attempts},
                    {"exit_code", r.exit_code ? Json(*r.exit_code) : Json(nullptr)},
                    {"error", r.error},
                    {"out_of_memory", r.out_of_memory},
                    {"peak_gpu_mib", r.peak_gpu_bytes < 0 ? Json(nullptr) : Json(r.peak_gpu_bytes >> 20)},
                    {"gpu_seconds", milliseconds(r.gpu_seconds)},
                    {"memory_note", r.memory_note},
                    {"log", r.log_path}};
    tasks += "    ";
    for (const char c : task.dump(2, ' ', false, Json::error_handler_t::replace)) {
      tasks += c;
      if (c == '\n') tasks += "    ";
    }
    tasks += i + 1 < results.size() ? ",\n" : "\n  ]";
  }
  const Json summary{{"tasks", Json::array()},
                     {"finished", finished},
                     {"interrupted", interrupted},
                     {"fail_fast_task", live.fail_fast_task.empty() ? Json(nullptr) : Json(live.fail_fast_task)},
                     {"error", live.error.empty() ? Json(nullptr) : Json(live.error)},
                     {"log_dir", live.log_dir},
                     {"seconds", milliseconds(seconds)},
                     {"counts", Json{{"done", counts[static_cast<int>(TaskStatus::kDone)]},
                                     {"failed", counts[static_cast<int>(TaskStatus::kFailed)]},
                                     {"skipped", counts[static_cast<int>(TaskStatus::kSkipped)]},
                                     {"interrupted", counts[static_cast<int>(TaskStatus::kInterrupted)]},
                                     {"pending", counts[static_cast<int>(TaskStatus::kPending)]}}},
                     {"pid", live.pid},
                     {"host", live.host},
                     {"slots", live.slots},
                     {"updated_unix", unix_seconds(std::chrono::system_clock::now())}};
  std::string text = summary.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  const std::string head = "{\n  \"tasks\": ";  // then "[]" in `text`
  return head + tasks + text.substr(head.size() + 2);
}

/// summary.csv's text: a header line, then one line per task.
inline std::string summary_csv(const std::vector<const TaskResult*>& results) {
  std::string csv =
      "task,status,devices,cuda_visible_devices,start,seconds,attempts,exit_code,error,log,peak_gpu_mib,gpu_seconds\n";
  for (const TaskResult* result : results) {
    const TaskResult& r = *result;
    std::string devices_csv;
    for (std::size_t d = 0; d < r.devices.size(); ++d) devices_csv += (d == 0 ? "" : "; ") + r.devices[d];
    csv += fmt::format("{},{},{},{},{},{:.3f},{},{},{},{},{},{:.3f}\n", csv_field(r.name), to_string(r.status),
                       csv_field(devices_csv), csv_field(r.visible_devices), iso8601(r.start), r.seconds, r.attempts,
                       r.exit_code ? std::to_string(*r.exit_code) : "", csv_field(r.error), csv_field(r.log_path),
                       r.peak_gpu_bytes < 0 ? std::string() : std::to_string(r.peak_gpu_bytes >> 20), r.gpu_seconds);
  }
  return csv;
}

}  // namespace detail
}  // namespace multigpu
