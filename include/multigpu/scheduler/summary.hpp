#pragma once
/// @file
/// The outcome of a run (RunSummary) and its files: summary.json and
/// summary.csv.

#include <algorithm>
#include <csignal>
#include <cstddef>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {

/// The outcome of a run.
struct RunSummary {
  std::vector<TaskResult> tasks;  ///< In the order the tasks were given.
  bool interrupted = false;
  int stop_signal = 0;  ///< SIGINT or SIGTERM when a signal stopped the run.
  double seconds = 0;
  std::string json_path;  ///< Where the summary was written.
  std::string csv_path;
  /// Why the summary files could not be written at the end ("" when they were).
  std::string summary_error;

  std::size_t count(TaskStatus status) const {
    return static_cast<std::size_t>(
        std::count_if(tasks.begin(), tasks.end(), [status](const TaskResult& r) { return r.status == status; }));
  }
  /// 0 when every task is done or skipped, 1 when some failed, 128 + signal
  /// (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP) when the run was stopped.
  int exit_code() const {
    if (interrupted) return 128 + (stop_signal != 0 ? stop_signal : SIGINT);
    return count(TaskStatus::kFailed) > 0 ? 1 : 0;
  }
};

namespace detail {

/// summary.json's text: each task's result, in the order given, and the run's
/// state (`finished`: the run has ended; `seconds`: its time so far).
inline std::string summary_json(const std::vector<const TaskResult*>& results, bool finished, bool interrupted,
                                double seconds) {
  std::string json = "{\n  \"tasks\": [\n";
  std::size_t counts[5] = {};
  for (std::size_t i = 0; i < results.size(); ++i) {
    const TaskResult& r = *results[i];
    ++counts[static_cast<int>(r.status)];
    std::string devices_json = "[";
    for (std::size_t d = 0; d < r.devices.size(); ++d) devices_json += (d == 0 ? "" : ", ") + json_string(r.devices[d]);
    devices_json += "]";
    json += fmt::format(
        "    {{\"task\": {}, \"status\": \"{}\", \"devices\": {}, \"cuda_visible_devices\": {}, \"start\": {}, "
        "\"seconds\": {:.3f}, \"attempts\": {}, \"exit_code\": {}, \"error\": {}, \"out_of_memory\": {}, \"log\": {}}}{}\n",
        json_string(r.name), to_string(r.status), devices_json, json_string(r.visible_devices),
        json_string(iso8601(r.start)), r.seconds, r.attempts, r.exit_code ? std::to_string(*r.exit_code) : "null",
        json_string(r.error), r.out_of_memory ? "true" : "false", json_string(r.log_path),
        i + 1 < results.size() ? "," : "");
  }
  json += fmt::format(
      "  ],\n  \"finished\": {},\n  \"interrupted\": {},\n  \"seconds\": {:.3f},\n  \"counts\": {{\"done\": {}, "
      "\"failed\": {}, \"skipped\": {}, \"interrupted\": {}, \"pending\": {}}}\n}}\n",
      finished ? "true" : "false", interrupted ? "true" : "false", seconds,
      counts[static_cast<int>(TaskStatus::kDone)], counts[static_cast<int>(TaskStatus::kFailed)],
      counts[static_cast<int>(TaskStatus::kSkipped)], counts[static_cast<int>(TaskStatus::kInterrupted)],
      counts[static_cast<int>(TaskStatus::kPending)]);
  return json;
}

/// summary.csv's text: a header line, then one line per task.
inline std::string summary_csv(const std::vector<const TaskResult*>& results) {
  std::string csv = "task,status,devices,cuda_visible_devices,start,seconds,attempts,exit_code,error,log\n";
  for (const TaskResult* result : results) {
    const TaskResult& r = *result;
    std::string devices_csv;
    for (std::size_t d = 0; d < r.devices.size(); ++d) devices_csv += (d == 0 ? "" : "; ") + r.devices[d];
    csv += fmt::format("{},{},{},{},{},{:.3f},{},{},{},{}\n", csv_field(r.name), to_string(r.status),
                       csv_field(devices_csv), csv_field(r.visible_devices), iso8601(r.start), r.seconds, r.attempts,
                       r.exit_code ? std::to_string(*r.exit_code) : "", csv_field(r.error), csv_field(r.log_path));
  }
  return csv;
}

}  // namespace detail
}  // namespace multigpu
