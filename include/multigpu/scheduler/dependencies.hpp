#pragma once
/// @file
/// Dependencies between tasks (`Task::after`, `[after=NAME,...]` in a task
/// file): the checks before a run (unknown names, a task after itself,
/// cycles) and, during a run, when a task may start and which tasks cannot
/// run because a task they run after failed.

#include <algorithm>
#include <cstddef>
#include <exception>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/task.hpp"

namespace multigpu {
namespace detail {

// Note [Dependencies]
// ~~~~~~~~~~~~~~~~~~~
// A task with `after` starts only once every task it names is done or
// skipped (skipped means done already). Until then it stays in the queue
// without holding a device slot, so a dependency still waiting for a device
// always finds one: there is no deadlock, and cycles are refused before the
// run. When a task fails for good (after its retries, or by waiting too long
// for a busy device) or is interrupted, the tasks that run after it, and
// the tasks that run after those, never start: they end `failed`, with 0
// attempts and an error that begins "not run: " and names the task they ran
// after and the task that failed. When the run drains or is stopped
// (Ctrl-C, --fail-fast), no task starts, and tasks waiting for others stay
// `pending`: a rerun runs them. A task that is done (its marker is current)
// is not run again because a task it runs after runs again: rerun it with
// --force NAME, or have its done marker depend on its input.

/// A problem with the tasks' `after` lists: which task, and what is wrong.
struct DependencyProblem {
  std::size_t task = 0;
  std::string message;
};

/// Each task's `after` as indexes into `tasks`; names no task has are left
/// out (find_dependency_problem reports them).
inline std::vector<std::vector<std::size_t>> dependency_indexes(const std::vector<Task>& tasks) {
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < tasks.size(); ++i) index.emplace(tasks[i].name, i);
  std::vector<std::vector<std::size_t>> after(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    for (const auto& name : tasks[i].after) {
      const auto found = index.find(name);
      if (found != index.end()) after[i].push_back(found->second);
    }
  }
  return after;
}

/// The first problem with the tasks' dependencies, if any: a name no task
/// has, a task after itself, a cycle (named: "a -> b -> a").
inline std::optional<DependencyProblem> find_dependency_problem(const std::vector<Task>& tasks) {
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < tasks.size(); ++i) index.emplace(tasks[i].name, i);
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    for (const auto& name : tasks[i].after) {
      if (name == tasks[i].name) {
        return DependencyProblem{i, fmt::format("task \"{}\" runs after itself; after= names other tasks", name)};
      }
      if (index.count(name) == 0) {
        return DependencyProblem{i, fmt::format("task \"{}\" runs after \"{}\", but no task has that name",
                                                tasks[i].name, name)};
      }
    }
  }
  // Depth-first search; a task met again while on the path closes a cycle.
  const auto after = dependency_indexes(tasks);
  enum Mark { kNew, kOnPath, kChecked };
  std::vector<Mark> mark(tasks.size(), kNew);
  for (std::size_t root = 0; root < tasks.size(); ++root) {
    if (mark[root] != kNew) continue;
    std::vector<std::pair<std::size_t, std::size_t>> path{{root, 0}};  // task, next dependency to look at
    mark[root] = kOnPath;
    while (!path.empty()) {
      auto& [task, next] = path.back();
      if (next == after[task].size()) {
        mark[task] = kChecked;
        path.pop_back();
        continue;
      }
      const std::size_t dependency = after[task][next++];
      if (mark[dependency] == kOnPath) {
        std::string cycle;
        bool in_cycle = false;
        for (const auto& step : path) {
          in_cycle = in_cycle || step.first == dependency;
          if (in_cycle) cycle += tasks[step.first].name + " -> ";
        }
        cycle += tasks[dependency].name;
        return DependencyProblem{dependency, fmt::format("the tasks' after= form a cycle: {}; none of them could "
                                                         "ever start",
                                                         cycle)};
      }
      if (mark[dependency] == kNew) {
        mark[dependency] = kOnPath;
        path.emplace_back(dependency, 0);
      }
    }
  }
  return std::nullopt;
}

// Note [Dependencies at scale]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The run loop must not look at every task on every event: with 100,000
// tasks that made a run's cost grow with the square of its size (a chain of
// 2,000 dependent tasks took 135 s). So the scheduler keeps, per task, how
// many of the tasks it runs after are not done or skipped yet, and the
// queued tasks whose count is 0, in the order given; only those are
// dispatched, and a task that ends done lowers the counts of the tasks that
// run after it (dependents_of). A task that fails for
// good is remembered, and only the waiting tasks reachable from it through
// `after` are looked at (tasks_not_run's `candidates`): what they end with is
// what looking at every task would give.

/// Per task, the tasks that run after it (`after` turned round; a task named
/// twice in one `after` is listed twice, as it is counted twice).
inline std::vector<std::vector<std::size_t>> dependents_of(const std::vector<std::vector<std::size_t>>& after) {
  std::vector<std::vector<std::size_t>> dependents(after.size());
  for (std::size_t i = 0; i < after.size(); ++i) {
    for (std::size_t d : after[i]) dependents[d].push_back(i);
  }
  return dependents;
}

/// The waiting tasks (`waiting(i)`) that run after one of `roots`, directly
/// or through other waiting tasks, in ascending order.
template <class Waiting>
std::vector<std::size_t> waiting_dependents(const std::vector<std::vector<std::size_t>>& dependents,
                                            const std::vector<std::size_t>& roots, const Waiting& waiting) {
  std::vector<std::size_t> found;
  std::set<std::size_t> seen;
  std::vector<std::size_t> stack(roots.begin(), roots.end());
  while (!stack.empty()) {
    const std::size_t task = stack.back();
    stack.pop_back();
    for (std::size_t next : dependents[task]) {
      if (!waiting(next) || !seen.insert(next).second) continue;
      found.push_back(next);
      stack.push_back(next);
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

/// The tasks among `candidates` (ascending) that can never run because a
/// task they run after failed or was interrupted, transitively (see Note
/// [Dependencies]): each with the error it ends with. `waiting(i)`: task i
/// has not started and may still start. Every task that can be ended must be
/// among the candidates (waiting_dependents of the tasks that failed).
template <class Waiting>
std::vector<std::pair<std::size_t, std::string>> tasks_not_run(const std::vector<std::vector<std::size_t>>& after,
                                                               const std::vector<const TaskResult*>& results,
                                                               const std::vector<std::size_t>& candidates,
                                                               const Waiting& waiting) {
  std::vector<std::pair<std::size_t, std::string>> not_run;
  std::map<std::size_t, std::string> cause;  // task not run -> the task that failed ("task X failed")
  const auto still_waiting = [&](std::size_t i) { return waiting(i) && cause.count(i) == 0; };
  const auto failed = [&](std::size_t d) {
    return !still_waiting(d) &&
           (results[d]->status == TaskStatus::kFailed || results[d]->status == TaskStatus::kInterrupted);
  };
  for (bool changed = true; changed;) {
    changed = false;
    for (std::size_t i : candidates) {
      if (!still_waiting(i)) continue;
      for (std::size_t d : after[i]) {
        if (!failed(d) && cause.count(d) == 0) continue;
        std::string error;
        const auto earlier = cause.find(d);
        if (earlier != cause.end()) {
          error = fmt::format("not run: task {}, which it runs after, was not run ({})", results[d]->name,
                              earlier->second);
          cause[i] = earlier->second;
        } else {
          const char* outcome = results[d]->status == TaskStatus::kFailed ? "failed" : "was interrupted";
          error = fmt::format("not run: task {}, which it runs after, {}", results[d]->name, outcome);
          cause[i] = fmt::format("task {} {}", results[d]->name, outcome);
        }
        not_run.emplace_back(i, std::move(error));
        changed = true;
        break;
      }
    }
  }
  return not_run;
}

/// Ends the scheduler's queued jobs (`.task`, `.result`, `.queued`) that
/// cannot run because one of `failed` (tasks that failed or were interrupted
/// for good) did not run to its end (tasks_not_run): failed, with the
/// error, also in their logs. `results[i]` is `&jobs[i].result`. Returns the
/// jobs it ended; their `.queued` is left to the caller.
template <class Job>
std::vector<std::size_t> end_tasks_not_run(const std::vector<std::vector<std::size_t>>& after,
                                           const std::vector<std::vector<std::size_t>>& dependents,
                                           std::vector<Job>& jobs, const std::vector<const TaskResult*>& results,
                                           const std::vector<std::size_t>& failed) {
  const auto waiting = [&](std::size_t i) { return jobs[i].queued; };
  const auto not_run = tasks_not_run(after, results, waiting_dependents(dependents, failed, waiting), waiting);
  std::vector<std::size_t> ended;
  for (const auto& [i, error] : not_run) {
    Job& job = jobs[i];
    job.result.status = TaskStatus::kFailed;
    job.result.error = error;
    ended.push_back(i);
    try {
      append_to_file(job.result.log_path, fmt::format("### multigpu: task {} {}\n", job.task.name, error));
    } catch (const std::exception&) {
      // The log only repeats the summary's error; the run goes on without it.
    }
  }
  return ended;
}

}  // namespace detail
}  // namespace multigpu
