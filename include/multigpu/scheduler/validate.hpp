#pragma once
/// @file
/// The checks a queue of tasks passes before the scheduler runs it.

#include <cstddef>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/device.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scheduler/dependencies.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {
namespace detail {

/// Checks a queue before it runs, or throws SchedulerError saying what is
/// wrong: every task has a unique UTF-8 name that maps to its own log file,
/// exactly one of a command (without NUL bytes) and a function, and needs no
/// more devices than the pool (`pool`, not empty) has, and runs after tasks
/// of the queue without a cycle.
inline void validate_tasks(const std::vector<Task>& tasks, const std::vector<DeviceInfo>& pool) {
  std::set<std::string> names;
  std::map<std::string, std::string> files;  // log file name -> task name
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const Task& task = tasks[i];
    const std::string which = task.name.empty() ? fmt::format("task {}", i + 1) : fmt::format("task \"{}\"", task.name);
    if (task.name.empty()) throw SchedulerError(fmt::format("{} has no name", which));
    if (!names.insert(task.name).second) {
      throw SchedulerError(fmt::format("two tasks are named \"{}\"; names must be unique (they name the logs)",
                                       task.name));
    }
    const auto [other, fresh] = files.emplace(file_safe(task.name), task.name);
    if (!fresh) {
      throw SchedulerError(fmt::format(
          "tasks \"{}\" and \"{}\" would share the log {}.log; rename one (a name keeps letters, digits, '.', "
          "'_' and '-' in its log's name, and every other character becomes '_')",
          other->second, task.name, other->first));
    }
    if (const auto at = invalid_utf8_at(task.name)) {
      throw SchedulerError(fmt::format("task {} has a name that is not UTF-8 (byte {}); names go into the summary's "
                                       "JSON and must be text",
                                       i + 1, *at + 1));
    }
    if (task.command.empty() == !task.function) {
      throw SchedulerError(fmt::format("{} needs exactly one of a command and a function", which));
    }
    if (const auto nul = task.command.find('\0'); nul != std::string::npos) {
      throw SchedulerError(fmt::format("{}: its command holds a NUL byte at byte {}, where the shell would cut it",
                                       which, nul + 1));
    }
    if (task.devices < 1 || task.devices > static_cast<int>(pool.size())) {
      throw SchedulerError(fmt::format("{} needs {} device(s), but the pool has {} ({})", which, task.devices,
                                       pool.size(), pool.front().is_cpu() ? "cpu" : "GPUs"));
    }
    if (task.memory_mib != -1 && (task.memory_mib < 1 || task.memory_mib > (std::int64_t{1} << 30))) {
      throw SchedulerError(fmt::format("{}: its size is {} MiB; give 1 to 2^30 MiB, or -1 for none", which,
                                       task.memory_mib));
    }
  }
  if (const auto problem = find_dependency_problem(tasks)) throw SchedulerError(problem->message);
}

}  // namespace detail
}  // namespace multigpu
