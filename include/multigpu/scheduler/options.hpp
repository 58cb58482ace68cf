#pragma once
/// @file
/// How a scheduler runs its queue (SchedulerOptions).

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "multigpu/config.hpp"

namespace multigpu {

/// How a scheduler runs its queue.
struct SchedulerOptions {
  /// The device pool: a device spec ("0,1,2,3", "all", "cpu"); "auto" is
  /// every visible GPU, busy or not (busy ones are waited for), or the CPU
  /// when there is none.
  std::string devices = "auto";
  /// Tasks at once on one device (several small tasks per GPU; CPU slots).
  /// With pack_by_memory: at most this many, memory permitting (set it
  /// higher than 1 there; multigpu-run's `auto` sets 64).
  int max_per_device = 1;
  /// `--max-per-gpu auto`: place tasks several to a GPU by memory: a task
  /// starts on a GPU only where its size (Task::memory_mib, else its peak
  /// measured in an earlier run of this log folder) plus memory_margin_mib
  /// fits next to what is there; a task of unknown size gets a GPU to itself.
  /// GPU pools only. See Note [Packing tasks by memory] in scheduler/gpu_memory.hpp.
  bool pack_by_memory = false;
  /// Kept free beside each task's size when packing by memory.
  std::int64_t memory_margin_mib = 1024;
  /// A GPU given to a command task is promised to it, to this scheduler and
  /// to other runs on the machine, until the task's processes appear on it or
  /// this time passes. See Note [A GPU promised to a task] in scheduler/reservations.hpp.
  std::chrono::milliseconds reservation_timeout{std::chrono::seconds(60)};
  /// Where the promises of every run on this machine are kept ("": the
  /// environment's MULTIGPU_RESERVATION_DIR, else /tmp/multigpu-reservations).
  std::string reservation_dir;
  /// Memory in use (MiB) above which a device without our tasks (or our
  /// cached memory) is busy (someone else's job) and is not given a task.
  std::int64_t memory_threshold_mib = MULTIGPU_DEFAULT_BUSY_THRESHOLD_MIB;
  /// Fail a task that found no free device for this long (0: wait forever).
  std::chrono::milliseconds busy_wait_limit{0};
  /// Per-task logs and, by default, the summary go here. A run holds a lock
  /// on it (`<log_dir>/.multigpu-run.lock`): a second run on it is refused.
  std::string log_dir = "multigpu-logs";
  /// Summary files: PATH.json and PATH.csv ("": `<log_dir>/summary`).
  std::string summary_path;
  /// Run tasks whose done marker exists too.
  bool force = false;
  /// Run these tasks (by name) even if their done marker exists; a name that
  /// is no task's is an error.
  std::vector<std::string> force_tasks;
  /// Extra attempts for a failed task: on another device when one is free;
  /// after running out of GPU memory, where it will have more room (Note
  /// [Retrying after out of memory] in scheduler/gpu_memory.hpp).
  int retries = 0;
  /// After the first task that fails for good (its retries used up, or it
  /// waited too long for a busy device): start nothing new, stop the running
  /// tasks as a stop request does (SIGTERM, the grace period, SIGKILL), and
  /// end the run; RunSummary::fail_fast_task names that task, exit code 1.
  bool fail_fast = false;
  /// How often running commands and busy devices are looked at.
  std::chrono::milliseconds poll_interval{200};
  /// After a stop request: how long commands get to end after SIGTERM before
  /// SIGKILL (also when this process dies: see Note [The task supervisor]).
  std::chrono::milliseconds grace_period{std::chrono::seconds(10)};
  /// Handle SIGINT, SIGTERM and SIGHUP during run() (stop dispatching, stop
  /// the commands, write the summary); the previous handlers come back after.
  /// SIGINT and SIGHUP inherited as ignored (nohup) stay ignored.
  bool handle_signals = false;
  /// With handle_signals: the first Ctrl-C (SIGINT) only drains the run (no
  /// new task starts; the running ones go on to their end), the second stops
  /// them as SIGTERM does. false: the first Ctrl-C stops them.
  bool interrupt_drains = true;
  /// A live status line on stderr: redrawn on a terminal, a plain line every
  /// `status_interval` otherwise.
  bool status_line = false;
  /// How often the plain status line is printed when stderr is not a terminal.
  std::chrono::milliseconds status_interval{std::chrono::seconds(30)};
};

}  // namespace multigpu
