#pragma once
// `multigpu-run status`: the live table of a run, read from its summary file
// by any process. See Note [Seeing a run from anywhere].

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/error.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {

// Note [Seeing a run from anywhere]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The scheduler rewrites its summary (LOG_DIR/summary.json) atomically
// after every change: a task starts, ends or is retried (with many tasks,
// soon after it: see Note [How often the summary is written] in
// scheduler/reporting.hpp). Besides each task's
// outcome it says which tasks are running, since when, the scheduler's pid
// and host, how many tasks run at once, and when it was written. Any process
// can read it at any time (a rename never shows half a file), so `status`
// needs no connection to the scheduler and works after it has ended.
//
// Whether the run is still alive is not guessed from its pid, which the
// kernel may have given to another process: the scheduler holds an flock on
// LOG_DIR/.multigpu-run.lock for its whole life (and its tasks' supervisors
// hold it until the tasks are gone), and /proc/locks lists the holders of
// every lock by inode, without anyone taking the lock (taking it, even for
// a moment, could refuse a run that starts in that moment). The summary
// names its log folder (absolute), so a summary kept elsewhere (--summary)
// still leads to the right lock.
//
// The ETA is an estimate and says so: the mean duration of the tasks done so
// far, times the tasks still to run, spread over the run's slots, plus what
// the running ones have left of that mean. No task done yet: no ETA.

/// One task's line in the status table.
struct TaskStatusLine {
  /// The task's name.
  std::string name;
  std::string status;  ///< The summary's: pending, done, failed, skipped, interrupted.
  /// Whether it runs now.
  bool running = false;
  /// The devices of its last attempt.
  std::vector<std::string> devices;
  double start_unix = 0;  ///< Start of its last attempt (seconds since 1970), 0 if never started.
  double seconds = 0;     ///< Duration of its last attempt, once it has ended.
  /// Attempts so far.
  int attempts = 0;
  /// Why it failed, or "".
  std::string error;
  /// Whether some attempt looked like running out of GPU memory.
  bool out_of_memory = false;
  /// Its log file.
  std::string log_path;
  std::int64_t peak_gpu_bytes = -1;  ///< Its peak GPU memory (-1: not measured).
};

/// Whether the run that wrote a summary is still there.
enum class RunLiveness {
  kRunning,     ///< Its lock is held by its scheduler.
  kOrphaned,    ///< Its lock is held, but the scheduler is gone: its tasks are ending.
  kFinished,    ///< It wrote its final summary.
  kEnded,       ///< Nobody holds its lock, and it never wrote its final summary (killed).
  kElsewhere,   ///< It runs (or ran) on another host: only the file can tell.
};

/// A run as its summary file describes it.
struct RunStatus {
  /// The summary file read.
  std::string summary_path;
  /// Every task, in the summary's order.
  std::vector<TaskStatusLine> tasks;
  /// Whether the run wrote its final summary.
  bool finished = false;
  /// Whether the run was stopped (Ctrl-C, a signal).
  bool interrupted = false;
  std::string fail_fast_task;  ///< The task whose failure stopped the run (--fail-fast), or "".
  std::string error;           ///< The scheduler's own error that ended the run, or "".
  std::string log_dir;         ///< The run's log folder, absolute ("" in summaries before it was written).
  double seconds = 0;        ///< The run's duration when the file was written.
  double updated_unix = 0;   ///< When the file was written (0: a summary from before these fields).
  /// The process id of the run's scheduler.
  long pid = 0;
  /// The host the run's scheduler runs (or ran) on.
  std::string host;
  int slots = 0;             ///< Tasks at once (devices x tasks per device), 0 if unknown.
  /// Whether the run is still there (from its log folder's lock).
  RunLiveness liveness = RunLiveness::kEnded;
};

namespace detail {

/// Holders of locks on the file at `path`, from /proc/locks: their pids.
/// Matched by inode alone: /proc/locks gives the file system's device, which
/// on btrfs subvolumes and some overlay mounts is not the one stat() gives.
/// Any kind of lock (NFS turns an flock into a POSIX lock).
inline std::vector<long> flock_holders(const std::string& path) {
  struct stat info {};
  std::vector<long> pids;
  if (::stat(path.c_str(), &info) != 0) return pids;
  const std::string inode = fmt::format(":{}", static_cast<unsigned long long>(info.st_ino));
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    // "1: FLOCK  ADVISORY  WRITE 3141 fd:01:1315054 0 EOF" ("->" marks a waiter)
    std::istringstream fields(line);
    std::string number, kind, mode, access, pid, file;
    fields >> number >> kind;
    if (kind == "->") continue;
    fields >> mode >> access >> pid >> file;
    const bool same_inode = file.size() > inode.size() && file.compare(file.size() - inode.size(), inode.size(), inode) == 0;
    if ((kind == "FLOCK" || kind == "POSIX" || kind == "OFDLCK") && same_inode) pids.push_back(std::atol(pid.c_str()));
  }
  return pids;
}

inline bool process_exists(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

/// The last line a task wrote, as a terminal would show it (after the last
/// carriage return of a progress bar), at most `width` characters. The
/// scheduler's own lines in the log ("### done in 3.2 s") are passed over.
inline std::string last_log_line(const std::string& path, std::size_t width) {
  std::string tail = file_tail(path, 4096);
  std::string line;
  while (true) {
    while (!tail.empty() && (tail.back() == '\n' || tail.back() == '\r' || tail.back() == ' ')) tail.pop_back();
    const auto newline = tail.find_last_of('\n');
    line = newline == std::string::npos ? tail : tail.substr(newline + 1);
    if (line.rfind("### ", 0) != 0 || newline == std::string::npos) break;
    tail.resize(newline);
  }
  if (line.rfind("### ", 0) == 0) line.clear();
  const auto carriage = line.find_last_of('\r');
  if (carriage != std::string::npos) line = line.substr(carriage + 1);
  for (auto& c : line) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';  // no terminal escapes from a log
  }
  if (line.size() > width) line = line.substr(0, width > 3 ? width - 3 : 0) + "...";
  return line;
}

/// "42s", "3m05s", "2h07m".
inline std::string short_duration(double seconds) {
  const auto s = static_cast<long long>(seconds < 0 ? 0 : seconds + 0.5);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
}

inline double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace detail

/// The lock file a run holds in its log folder while it is alive: the
/// `lock_path` of read_run_status for a run with `--log-dir log_dir`.
inline std::string run_lock_path(const std::string& log_dir) { return detail::lock_path_of(log_dir); }

/// Reads the summary a run keeps at `summary_path` (LOG_DIR/summary.json by
/// default) and finds out whether the run is alive (see the Note; `lock_path`
/// is used when the summary does not name its log folder). Throws
/// SchedulerError naming the file and what is wrong with it.
inline RunStatus read_run_status(const std::string& summary_path, const std::string& lock_path) {
  std::ifstream file(summary_path);
  if (!file) {
    throw SchedulerError(fmt::format("no run summary at {}: {} (a run writes it when its first task starts; "
                                     "give the run's --log-dir, or --summary PATH.json)",
                                     summary_path,
                                     std::filesystem::exists(summary_path) ? "it cannot be read" : "no such file"));
  }
  nlohmann::json json;
  try {
    file >> json;
  } catch (const nlohmann::json::exception& e) {
    throw SchedulerError(fmt::format("{} is not a multigpu-run summary: {}", summary_path, e.what()));
  }
  RunStatus run;
  run.summary_path = summary_path;
  try {
    if (!json.is_object() || !json.contains("tasks") || !json["tasks"].is_array()) {
      throw SchedulerError(fmt::format("{} is not a multigpu-run summary: it has no \"tasks\" list", summary_path));
    }
    run.finished = json.value("finished", false);
    run.interrupted = json.value("interrupted", false);
    if (json.contains("error") && json["error"].is_string()) run.error = json["error"].get<std::string>();
    if (json.contains("log_dir") && json["log_dir"].is_string()) run.log_dir = json["log_dir"].get<std::string>();
    if (json.contains("fail_fast_task") && json["fail_fast_task"].is_string()) {
      run.fail_fast_task = json["fail_fast_task"].get<std::string>();
    }
    run.seconds = json.value("seconds", 0.0);
    run.updated_unix = json.value("updated_unix", 0.0);
    run.pid = json.value("pid", 0L);
    run.host = json.value("host", std::string());
    run.slots = json.value("slots", 0);
    for (const auto& item : json["tasks"]) {
      TaskStatusLine task;
      task.name = item.value("task", std::string());
      task.status = item.value("status", std::string());
      task.running = item.value("running", false);
      if (item.contains("devices") && item["devices"].is_array()) {
        task.devices = item["devices"].get<std::vector<std::string>>();
      }
      task.start_unix = item.value("start_unix", 0.0);
      task.seconds = item.value("seconds", 0.0);
      task.attempts = item.value("attempts", 0);
      task.error = item.value("error", std::string());
      task.out_of_memory = item.value("out_of_memory", false);
      task.log_path = item.value("log", std::string());
      if (item.contains("peak_gpu_mib") && item["peak_gpu_mib"].is_number()) {
        task.peak_gpu_bytes = item["peak_gpu_mib"].get<std::int64_t>() << 20;
      }
      run.tasks.push_back(std::move(task));
    }
  } catch (const nlohmann::json::exception& e) {
    throw SchedulerError(fmt::format("{} is not a multigpu-run summary: {}", summary_path, e.what()));
  }
  if (run.finished) {
    run.liveness = RunLiveness::kFinished;
  } else if (!run.host.empty() && run.host != detail::host_name()) {
    run.liveness = RunLiveness::kElsewhere;
  } else {
    // The run's own log folder when the summary names it (a summary kept
    // elsewhere with --summary); the caller's guess otherwise.
    const auto holders = detail::flock_holders(run.log_dir.empty() ? lock_path : detail::lock_path_of(run.log_dir));
    if (holders.empty()) {
      run.liveness = RunLiveness::kEnded;
    } else {
      run.liveness = detail::process_exists(run.pid) ? RunLiveness::kRunning : RunLiveness::kOrphaned;
    }
  }
  return run;
}

/// The estimated seconds until every task has run (see the Note), or a
/// negative number when there is nothing to estimate from.
inline double run_eta_seconds(const RunStatus& run, double now_unix) {
  double done_seconds = 0;
  int done = 0, waiting = 0;
  for (const auto& task : run.tasks) {
    if (task.status == "done") {
      done_seconds += task.seconds;
      ++done;
    } else if (task.status == "pending" && !task.running) {
      ++waiting;
    }
  }
  if (done == 0 || run.slots <= 0) return -1;
  const double mean = done_seconds / done;
  double left = waiting * mean;
  for (const auto& task : run.tasks) {
    if (task.running) left += std::max(0.0, mean - (now_unix - task.start_unix));
  }
  return left / run.slots;
}

/// The status table at `now_unix` (seconds since 1970), `width` columns wide at most.
inline std::string render_run_status(const RunStatus& run, double now_unix, std::size_t width = 120) {
  // In a run that ended without finishing, what was running was cut off.
  const bool cut_off = run.liveness == RunLiveness::kEnded;
  int running = 0, done = 0, failed = 0, skipped = 0, interrupted = 0, waiting = 0;
  for (const auto& task : run.tasks) {
    if (task.running && cut_off) ++interrupted;
    else if (task.running) ++running;
    else if (task.status == "done") ++done;
    else if (task.status == "failed") ++failed;
    else if (task.status == "skipped") ++skipped;
    else if (task.status == "interrupted") ++interrupted;
    else ++waiting;
  }
  std::string out;
  const std::string who = run.pid > 0 ? fmt::format("pid {} on {}", run.pid, run.host) : std::string("its scheduler");
  switch (run.liveness) {
    case RunLiveness::kRunning: out += fmt::format("running ({})", who); break;
    case RunLiveness::kOrphaned:
      out += fmt::format("its scheduler ({}) is gone; its tasks are being stopped", who);
      break;
    case RunLiveness::kFinished:
      if (!run.error.empty()) {
        out += fmt::format("the scheduler failed: {}", run.error);
      } else if (!run.interrupted) {
        out += "finished";
      } else if (run.fail_fast_task.empty()) {
        out += "stopped before the end";
      } else {
        out += fmt::format("stopped early: task {} failed (--fail-fast)", run.fail_fast_task);
      }
      break;
    case RunLiveness::kEnded:
      out += fmt::format("ended without finishing ({} was killed?)", who);
      break;
    case RunLiveness::kElsewhere: out += fmt::format("on another host ({}): as of its last write", who); break;
  }
  out += fmt::format(" - {} tasks: {} running, {} done, {} failed, {} skipped, {} interrupted, {} pending\n",
                     run.tasks.size(), running, done, failed, skipped, interrupted, waiting);
  if (run.updated_unix > 0) {
    out += fmt::format("summary {} written {} ago", run.summary_path,
                       detail::short_duration(now_unix - run.updated_unix));
  } else {
    out += fmt::format("summary {}", run.summary_path);
  }
  if (run.liveness == RunLiveness::kRunning || run.liveness == RunLiveness::kElsewhere) {
    const double eta = run_eta_seconds(run, now_unix);
    out += eta < 0 ? std::string("; ETA: not yet (no task has finished)")
                   : fmt::format("; ETA ~{} (mean of the tasks done)", detail::short_duration(eta));
  }
  out += "\n\n";
  std::size_t name_width = 4;
  for (const auto& task : run.tasks) name_width = std::max(name_width, std::min<std::size_t>(task.name.size(), 32));
  // GPU runs have a peak memory column (see Note [What a task uses on its GPUs] in gpu_memory.hpp).
  const bool peaks = std::any_of(run.tasks.begin(), run.tasks.end(), [](const auto& t) { return t.peak_gpu_bytes >= 0; });
  const std::string header = fmt::format("{:<{}}  {:<11}  {:<8}  {:>7}  {:>5}  {}", "TASK", name_width, "STATE",
                                         "DEVICE", "TIME", "TRIES", peaks ? fmt::format("{:>9}  ", "PEAK MEM") : "");
  out += header + "LAST LOG LINE\n";
  const std::size_t rest = width > header.size() + 10 ? width - header.size() : 10;
  for (const auto& task : run.tasks) {
    std::string state = task.running ? (cut_off ? "cut off" : "running") : task.status;
    if (task.out_of_memory && task.status == "failed") state = "failed/OOM";
    std::string device = task.devices.empty() || task.attempts == 0
                             ? "-"
                             : task.devices.front().substr(0, task.devices.front().find(' '));
    if (task.devices.size() > 1 && task.attempts > 0) device += fmt::format("+{}", task.devices.size() - 1);
    std::string time = "-";
    if (task.running && cut_off) time = "?";
    else if (task.running && task.start_unix > 0) time = detail::short_duration(now_unix - task.start_unix);
    else if (task.attempts > 0) time = detail::short_duration(task.seconds);
    std::string last = task.status == "failed" && !task.running ? task.error : std::string();
    if (task.attempts > 0 && (task.running || last.empty())) last = detail::last_log_line(task.log_path, rest);
    if (last.size() > rest) last = last.substr(0, rest > 3 ? rest - 3 : 0) + "...";
    std::string name = task.name.size() > 32 ? task.name.substr(0, 29) + "..." : task.name;
    const std::string peak =
        !peaks ? "" : fmt::format("{:>9}  ", task.peak_gpu_bytes < 0 ? "-" : memory_text(task.peak_gpu_bytes));
    out += fmt::format("{:<{}}  {:<11}  {:<8}  {:>7}  {:>5}  {}{}\n", name, name_width, state, device, time,
                       task.attempts, peak, last);
  }
  return out;
}

/// The status table now, 120 columns wide at most.
inline std::string render_run_status(const RunStatus& run) { return render_run_status(run, detail::unix_now()); }

}  // namespace multigpu
