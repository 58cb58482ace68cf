#pragma once
/// @file
/// The decisions of `multigpu-run --slurm` (see Note [A task file on Slurm]):
/// which sbatch options the runner owns, how tasks become array jobs, what a
/// task asks of Slurm, and a task's state from its status file and squeue.
/// Pure functions; multigpu-run runs the commands.

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

#include "multigpu/error.hpp"
#include "multigpu/scheduler/done_record.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/task.hpp"

namespace multigpu {
namespace slurm {

// Note [A task file on Slurm]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// `multigpu-run --slurm [sbatch options...] TASKS` gives the same task file
// the meaning it has locally, with Slurm placing the tasks:
// - The file is parsed as locally (names, grids, [after=], [gpus=N],
//   [mem=]), and a task whose done marker exists (and whose recorded command
//   is the same, Note [A done marker's command]) is skipped unless --force.
// - The tasks to run are written to LOG_DIR/.slurm/run.json; tasks with the
//   same request ([gpus=N] -> --gres=gpu:N, [mem=SIZE] -> --mem=SIZE) and no
//   [after=] on a task of this run go into one array job, split into arrays
//   of at most MaxArraySize tasks (scontrol show config) with indices from 0.
//   A task with [after=] is a job of its own, submitted after the tasks it
//   waits for, with --dependency=afterok:JOBID_INDEX,... (each array task,
//   never the whole array) and --kill-on-invalid-dep=yes: when one of them
//   fails, Slurm removes it, and the runner reports it as not run.
// - Each array task runs `multigpu-run slurm-task LOG_DIR OFFSET`, the
//   runner's per-task wrapper: it finds its task (OFFSET + the array index),
//   appends to LOG_DIR/NAME.log a header and the device report (the GPUs
//   Slurm gave it in CUDA_VISIBLE_DEVICES), runs the command with {gpu} and
//   {task} filled in as locally, retries it --retries times in the same
//   allocation, records the command of a done marker it made, and keeps
//   LOG_DIR/.slurm/status/NAME.json (state, node, GPUs, time, attempts,
//   restarts) up to date. Its exit status is the task's, so afterok works.
//   Without sbatch's --ntasks, Slurm sets SLURM_PROCID=0 but not
//   SLURM_NTASKS in the script: a training task is one process, as locally
//   (See Note [A Slurm batch script is one process]).
// - State is read from those status files plus squeue (never sacct, which
//   needs slurmdbd): `status` and the follower combine them with
//   task_state(). The submitted JOBID_INDEX of each task is appended to
//   LOG_DIR/.slurm/jobs.txt right after its sbatch returned. A submission
//   that fails half-way (sbatch refused, other than for the submit limit)
//   cancels what it had submitted: every task is then either in Slurm and
//   recorded, or not submitted and reported as such, never both.
// - A requeued array task (preemption, scontrol requeue) runs the wrapper
//   again with SLURM_RESTART_COUNT set: same name, same log, appended.
// - sbatch refused for the submit limit (MaxSubmitJobs of a QOS or an
//   association) waits and tries again; any other refusal ends the
//   submission there.

/// The sbatch options the runner sets itself, which a user's option must not
/// repeat: it throws SchedulerError naming the option and why.
inline void check_sbatch_options(const std::vector<std::string>& options) {
  static const std::map<std::string, std::string> kOwned{
      {"--array", "the runner makes the arrays from the task file (throttle them with --throttle N)"},
      {"-a", "the runner makes the arrays from the task file (throttle them with --throttle N)"},
      {"--output", "each task's log is LOG_DIR/NAME.log (choose the folder with --log-dir)"},
      {"-o", "each task's log is LOG_DIR/NAME.log (choose the folder with --log-dir)"},
      {"--error", "each task's log is LOG_DIR/NAME.log (choose the folder with --log-dir)"},
      {"-e", "each task's log is LOG_DIR/NAME.log (choose the folder with --log-dir)"},
      {"--open-mode", "the runner appends to each task's log"},
      {"--wrap", "the runner writes the job script: the commands come from the task file"},
      {"--dependency", "dependencies come from the task file's [after=NAME]"},
      {"-d", "dependencies come from the task file's [after=NAME]"},
      {"--gres", "GPUs come from the task file's [gpus=N] (or --gpus-per-task N)"},
      {"--gpus", "GPUs come from the task file's [gpus=N] (or --gpus-per-task N)"},
      {"-G", "GPUs come from the task file's [gpus=N] (or --gpus-per-task N)"},
      {"--mem", "memory comes from the task file's [mem=SIZE]"},
  };
  for (const auto& option : options) {
    if (option.size() < 2 || option[0] != '-') continue;  // an option's value
    const std::string name = option.substr(0, option.find('='));
    const auto owned = kOwned.find(name.size() > 2 && name[1] != '-' ? name.substr(0, 2) : name);
    if (owned != kOwned.end()) {
      throw SchedulerError(fmt::format("--slurm: the sbatch option {} is set by multigpu-run itself: {}", option,
                                       owned->second));
    }
  }
}

/// MaxArraySize from `scontrol show config`'s text (1001, Slurm's default, when absent).
inline int max_array_size(std::string_view config) {
  std::istringstream lines{std::string(config)};
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("MaxArraySize", 0) != 0) continue;
    const auto equals = line.find('=');
    if (equals == std::string::npos) continue;
    try {
      const int value = std::stoi(line.substr(equals + 1));
      if (value > 0) return value;
    } catch (const std::exception&) {
    }
  }
  return 1001;
}

/// One array job: `count` tasks of the run list from `offset`, indices 0..count-1.
struct ArrayPart {
  std::size_t offset = 0;  ///< The first task's place in the run list.
  std::size_t count = 0;   ///< Tasks in the array.
};

/// `count` tasks from `offset` as arrays of at most `max_array_size` tasks
/// (an array's last index is MaxArraySize - 1).
inline std::vector<ArrayPart> split_array(std::size_t offset, std::size_t count, int max_array_size) {
  std::vector<ArrayPart> parts;
  const auto size = static_cast<std::size_t>(std::max(1, max_array_size));
  for (std::size_t done = 0; done < count; done += size) parts.push_back({offset + done, std::min(size, count - done)});
  return parts;
}

/// What a task asks of Slurm: --gres=gpu:N (none with `cpu_only`), --mem=SIZE when it declared [mem=].
inline std::vector<std::string> resource_options(const Task& task, bool cpu_only) {
  std::vector<std::string> options;
  if (!cpu_only) options.push_back(fmt::format("--gres=gpu:{}", task.devices));
  if (task.memory_mib >= 0) options.push_back(fmt::format("--mem={}M", task.memory_mib));
  return options;
}

/// Whether sbatch's error text is a refusal for the submit limit (MaxSubmitJobs,
/// GrpSubmitJobs), to wait and retry: by the reason line (AssocMaxSubmitJobLimit,
/// QOSMaxSubmitJobPerUserLimit, AssocGrpSubmitJobsLimit...), since the line after it,
/// "Job violates accounting/QOS policy (job submit limit, user's size and/or time
/// limits)", is the same for a time or size over a limit, which waiting never cures.
inline bool is_submit_limit(std::string_view error) {
  return error.find("MaxSubmitJob") != std::string_view::npos || error.find("GrpSubmitJob") != std::string_view::npos;
}

/// Whether a task counts as done already (the local rule, Note [A done marker's command]).
inline bool is_done(const Task& task, const std::string& log_dir, bool force, const std::vector<std::string>& forced,
                    std::string* why_not = nullptr) {
  if (force || task.done_marker.empty()) return false;
  if (std::find(forced.begin(), forced.end(), task.name) != forced.end()) return false;
  return detail::path_exists(task.done_marker) && detail::marker_is_current(log_dir, task, why_not);
}

/// A task's state for `status` and the follower: its status file's state
/// ("running", "done", "failed", "" when none) and squeue's state of its job
/// ("PENDING", "RUNNING", ..., "" when squeue no longer lists it).
/// Returns "queued", "running", "done", "failed", "requeued" or "not run".
inline std::string task_state(const std::string& file_state, const std::string& squeue_state) {
  if (file_state == "done" || file_state == "failed") return file_state;
  if (squeue_state.empty()) return file_state == "running" ? "failed" : "not run";
  if (squeue_state == "PENDING" || squeue_state == "REQUEUED" || squeue_state == "REQUEUE_HOLD") {
    return file_state.empty() ? "queued" : "requeued";
  }
  return "running";
}

}  // namespace slurm
}  // namespace multigpu
