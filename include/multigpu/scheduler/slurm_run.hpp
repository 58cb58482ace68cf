#pragma once
/// @file
/// `multigpu-run --slurm`: submitting a task file as Slurm array jobs and
/// following it (slurm::submit), `multigpu-run status` and `cancel` of such a
/// run, and the per-task wrapper that each array task runs (slurm::run_task).
/// Runs sbatch, squeue, scontrol and scancel; the decisions are in
/// scheduler/slurm.hpp (Note [A task file on Slurm]). Not included by
/// scheduler.hpp.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/device.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scheduler/done_record.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/run_status.hpp"
#include "multigpu/scheduler/slurm.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/task.hpp"

namespace multigpu {
namespace slurm {

/// What `multigpu-run --slurm` was given besides the task file.
struct SubmitOptions {
  std::vector<std::string> sbatch;    ///< The user's sbatch options, as given.
  std::string log_dir = "multigpu-logs";  ///< Where the logs, the summary and LOG_DIR/.slurm go.
  int retries = 0;                    ///< Extra attempts of a failed task, in its allocation.
  bool cpu_only = false;              ///< No GRES asked (--gpus cpu).
  bool force = false;                 ///< Run tasks whose done marker exists.
  std::vector<std::string> force_tasks;  ///< Run these even when done.
  int throttle = 0;                   ///< At most this many tasks of each array at once (0: no limit).
  bool follow = true;                 ///< Follow the run until it ends (Ctrl-C leaves it).
  bool dry_run = false;               ///< Print the sbatch commands, submit nothing.
  bool quiet = false;                 ///< No progress lines.
  double poll_seconds = 10;           ///< Between looks at squeue while following (a cluster's squeue is shared: not too often).
};

/// Submits `tasks` (read from `task_file`) to Slurm and, with
/// `options.follow`, follows them to their end, printing progress, and writes
/// the summary; SIGINT then stops following and leaves the tasks. Returns the
/// exit status of multigpu-run: 0, 1 (some failed), 2 (refused), 130
/// (stopped following). Throws SchedulerError for input refused before
/// anything is submitted.
int submit(const std::vector<Task>& tasks, const std::string& task_file, SubmitOptions options);
/// What each array task runs (`multigpu-run slurm-task LOG_DIR OFFSET`): its task, with retries. Returns the task's exit status.
int run_task(const std::string& log_dir, const std::string& offset);
/// Whether `log_dir` holds a --slurm submission (what `multigpu-run status` shows).
bool is_submission(const std::string& log_dir);
/// Forgets the --slurm submission recorded in `log_dir` (a local run of the
/// folder begins); throws SchedulerError while its tasks are queued or running.
void forget_submission(const std::string& log_dir);
/// Prints the status table of a --slurm run: each task's state, job, node, GPUs, time, attempts and last log line.
int print_status(const std::string& log_dir);
/// Cancels the tasks of a --slurm run still queued or running, each by JOBID_INDEX; returns 0, or 1 when scancel failed.
int cancel(const std::string& log_dir);

namespace detail {

using Json = nlohmann::json;

/// Set by SIGINT while following: stop following (a function's static, so
/// that including the header defines nothing).
inline volatile std::sig_atomic_t& stop_following() {
  static volatile std::sig_atomic_t flag = 0;
  return flag;
}

// Note [Signals for the task]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Some of Slurm's signals go to the batch shell alone, not to every
// process of the job: `sbatch --signal=B:USR1@90` (a training's cue to
// save before its time limit, as Lightning and submitit use it) and
// `scancel --batch --signal=...`. Here the batch shell execs the wrapper,
// so such a signal reached only the wrapper, which died of it (USR1's
// default action), leaving its task running unsupervised and reported
// failed. The wrapper passes SIGUSR1 and SIGUSR2 on to the task's process
// group (the task runs in one of its own, so a shell's children get it as
// the shell does) and goes on waiting. SIGTERM and SIGINT are not passed
// on: Slurm sends them (scancel, preemption, the time limit) to every
// process of the job itself, and a second copy would read as a second
// Ctrl-C to a training that saves on the first. A signal that arrives
// between two attempts, or before the first, finds no task and is dropped.
// The handler is installed without SA_RESTART, so that the wrapper's
// waitpid returns EINTR and is called again: under ThreadSanitizer a
// handler runs late, when the interrupted call returns into the runtime,
// and a waitpid the kernel restarted never returned (the task waited for
// its USR1 and the wrapper for the task).
inline volatile std::sig_atomic_t& task_group() {
  static volatile std::sig_atomic_t group = 0;
  return group;
}

/// A command's output (stdout and stderr together) and exit status.
struct Output {
  int status = -1;
  std::string text;
};

/// Runs argv (found on PATH) and returns its output and exit status.
inline Output run_command(const std::vector<std::string>& argv) {
  std::string line;
  for (const auto& arg : argv) line += multigpu::detail::shell_quoted(arg, multigpu::detail::ShellQuoting::kNone) + " ";
  Output out;
  FILE* pipe = ::popen((line + "2>&1").c_str(), "r");
  if (pipe == nullptr) return out;
  char buffer[4096];
  std::size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.text.append(buffer, got);
  const int status = ::pclose(pipe);
  out.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return out;
}

/// Whether `name` is an executable on PATH.
inline bool on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && ::access((dir + "/" + name).c_str(), X_OK) == 0) return true;
  }
  return false;
}

inline std::string slurm_dir(const std::string& log_dir) { return log_dir + "/.slurm"; }
inline std::string status_path(const std::string& log_dir, const std::string& name) {
  return slurm_dir(log_dir) + "/status/" + multigpu::detail::file_safe(name) + ".json";
}
inline std::string log_path(const std::string& log_dir, const std::string& name) {
  return log_dir + "/" + multigpu::detail::file_safe(name) + ".log";
}

inline Json read_json(const std::string& path) {
  std::ifstream file(path);
  if (!file) return Json();
  try {
    return Json::parse(file);
  } catch (const Json::exception&) {
    return Json();
  }
}

/// Task name -> JOBID_INDEX, from LOG_DIR/.slurm/jobs.txt.
inline std::map<std::string, std::string> submitted_jobs(const std::string& log_dir) {
  std::map<std::string, std::string> jobs;
  std::ifstream file(slurm_dir(log_dir) + "/jobs.txt");
  std::string job;
  std::string name;
  while (file >> job && std::getline(file >> std::ws, name)) jobs[name] = job;
  return jobs;
}

/// JOBID_INDEX -> squeue state of this user's jobs (one squeue call; by
/// user, not by job id: squeue -j fails for a job slurmctld has forgotten),
/// or nothing when squeue failed (slurmctld not answering: state unknown).
inline std::optional<std::map<std::string, std::string>> queue_states() {
  const auto out = run_command({"squeue", "-h", "-r", "--me", "-o", "%i %T"});
  if (out.status != 0) return std::nullopt;
  std::map<std::string, std::string> states;
  std::istringstream lines(out.text);
  std::string id;
  std::string state;
  while (lines >> id >> state) states[id] = state;
  return states;
}

/// One task's row: from its status file and squeue.
struct Row {
  std::string name;
  std::string job;
  std::string state;
  Json status;
};

inline std::vector<Row> rows_of(const std::string& log_dir) {
  const Json run = read_json(slurm_dir(log_dir) + "/run.json");
  const auto jobs = submitted_jobs(log_dir);
  const auto states =
      jobs.empty() ? std::optional<std::map<std::string, std::string>>(std::map<std::string, std::string>()) : queue_states();
  std::vector<Row> rows;
  if (!run.is_object()) return rows;
  for (const auto& task : run["tasks"]) {
    Row row;
    row.name = task["name"].get<std::string>();
    row.status = read_json(status_path(log_dir, row.name));
    const auto job = jobs.find(row.name);
    if (job == jobs.end()) {
      row.state = "not submitted";
    } else {
      row.job = job->second;
      const std::string file_state = row.status.is_object() ? row.status.value("state", "") : "";
      if (!states) {
        row.state = file_state == "done" || file_state == "failed" ? file_state : "unknown";  // asked again later
      } else {
        const auto state = states->find(row.job);
        row.state = multigpu::slurm::task_state(file_state, state == states->end() ? "" : state->second);
      }
    }
    rows.push_back(std::move(row));
  }
  if (run.contains("skipped")) {
    for (const auto& name : run["skipped"]) rows.push_back({name.get<std::string>(), "", "skipped", Json()});
  }
  return rows;
}

inline bool is_final(const std::string& state) {
  return state != "queued" && state != "running" && state != "requeued" && state != "unknown";
}

/// Throws SchedulerError when tasks of the --slurm submission in `log_dir`
/// are still queued or running (or squeue cannot tell): a second run of the
/// folder, with or without --slurm, is refused meanwhile, as locally.
inline void refuse_live(const std::string& log_dir, const std::string& asked) {
  std::vector<std::string> live;
  for (const auto& row : rows_of(log_dir)) {
    if (!row.job.empty() && !is_final(row.state)) live.push_back(row.job);
  }
  if (!live.empty()) {
    throw multigpu::SchedulerError(fmt::format(
        "{}: the log folder {} belongs to a submission whose {} task(s) are still queued or running (Slurm "
        "jobs {}{}); follow it with `multigpu-run status {}`, end it with `multigpu-run cancel {}`, or give "
        "another --log-dir",
        asked, log_dir, live.size(), live.front(), live.size() > 1 ? ", ..." : "", log_dir, log_dir));
  }
}

/// `multigpu-run status LOG_DIR` for a Slurm run.
inline int show_status(const std::string& log_dir) {
  const auto rows = rows_of(log_dir);
  fmt::print("{:<24} {:<10} {:<12} {:<10} {:<8} {:>8} {:>8}  {}\n", "TASK", "STATE", "JOB", "NODE", "GPUS", "TIME",
             "ATTEMPTS", "LAST LOG LINE");
  for (const auto& row : rows) {
    const auto& s = row.status;
    const bool has = s.is_object();
    fmt::print("{:<24} {:<10} {:<12} {:<10} {:<8} {:>8} {:>8}  {}\n", row.name, row.state, row.job,
               has ? s.value("node", "") : "", has ? s.value("gpus", "") : "",
               has ? multigpu::detail::short_duration(row.state == "running"
                                                          ? multigpu::detail::unix_now() - s.value("start", 0.0)
                                                          : s.value("seconds", 0.0))
                   : "",
               has ? std::to_string(s.value("attempts", 0)) : "",
               multigpu::detail::last_log_line(log_path(log_dir, row.name), 60));
  }
  return 0;
}

/// `multigpu-run cancel LOG_DIR`: scancel each task still queued or running (by JOBID_INDEX).
inline int cancel(const std::string& log_dir) {
  std::vector<std::string> argv{"scancel"};
  for (const auto& row : rows_of(log_dir)) {
    if (!row.job.empty() && !is_final(row.state)) argv.push_back(row.job);
  }
  if (argv.size() == 1) {
    fmt::print("multigpu-run cancel: nothing of {} is queued or running\n", log_dir);
    return 0;
  }
  const auto out = run_command(argv);
  if (out.status != 0) {
    fmt::print(stderr, "multigpu-run cancel: scancel failed: {}", out.text);
    return 1;
  }
  fmt::print("cancelled {} task(s) of {}\n", argv.size() - 1, log_dir);
  return 0;
}

/// The summary files, from the rows, as a local run writes them.
inline multigpu::RunSummary write_summary(const std::string& log_dir, const std::vector<multigpu::Task>& all,
                                          const std::set<std::string>& skipped, double seconds,
                                          const std::string& not_submitted = "") {
  multigpu::RunSummary summary;
  summary.seconds = seconds;
  std::map<std::string, Row> rows;
  for (auto& row : rows_of(log_dir)) rows[row.name] = row;
  for (const auto& task : all) {
    multigpu::TaskResult r;
    r.name = task.name;
    r.log_path = log_path(log_dir, task.name);
    if (skipped.count(task.name) != 0) {
      r.status = multigpu::TaskStatus::kSkipped;
    } else if (!not_submitted.empty()) {
      r.error = not_submitted;
    } else if (const auto row = rows.find(task.name); row != rows.end()) {
      const auto& s = row->second.status;
      const auto& state = row->second.state;
      r.status = state == "done" ? multigpu::TaskStatus::kDone
                 : state == "failed" ? multigpu::TaskStatus::kFailed
                 : state == "not run" ? multigpu::TaskStatus::kFailed
                                      : multigpu::TaskStatus::kPending;
      if (s.is_object()) {
        r.attempts = s.value("attempts", 0);
        r.seconds = s.value("seconds", 0.0);
        r.visible_devices = s.value("gpus", "");
        r.start = std::chrono::system_clock::time_point(
            std::chrono::duration_cast<std::chrono::system_clock::duration>(
                std::chrono::duration<double>(s.value("start", 0.0))));
        if (s.contains("exit_code")) r.exit_code = s["exit_code"].get<int>();
        r.error = s.value("error", "");
        r.devices.push_back(s.value("node", "") + " (slurm job " + row->second.job + ")");
      }
      if (state == "not run") r.error = "not run: its Slurm job ended without running it (cancelled, or a task it "
                                        "waits for failed)";
      if (state == "failed" && r.error.empty()) r.error = "its Slurm job ended while it ran (time limit, node failure, scancel)";
    }
    summary.tasks.push_back(std::move(r));
  }
  std::vector<const multigpu::TaskResult*> results;
  for (const auto& r : summary.tasks) results.push_back(&r);
  summary.json_path = log_dir + "/summary.json";
  summary.csv_path = log_dir + "/summary.csv";
  try {
    multigpu::detail::SummaryLive live;
    live.log_dir = std::filesystem::absolute(log_dir).string();
    live.host = multigpu::detail::host_name();
    multigpu::detail::write_file_atomically(summary.json_path,
                                            multigpu::detail::summary_json(results, true, false, seconds, live));
    multigpu::detail::write_file_atomically(summary.csv_path, multigpu::detail::summary_csv(results));
  } catch (const std::exception& e) {
    summary.summary_error = e.what();
  }
  return summary;
}

/// Submits one sbatch; waits and retries while refused for the submit limit.
/// Returns the job id, or throws SchedulerError with sbatch's message.
inline std::string sbatch(const std::vector<std::string>& argv) {
  for (int wait_seconds = 2;; wait_seconds = std::min(wait_seconds * 2, 300)) {
    const auto out = run_command(argv);
    if (out.status == 0) {  // the job id's line ("123" or "123;cluster"), among any warnings
      std::istringstream lines(out.text);
      for (std::string line; std::getline(lines, line);) {
        const std::string id = line.substr(0, line.find(';'));
        if (!id.empty() && std::all_of(id.begin(), id.end(), [](char c) { return c >= '0' && c <= '9'; })) return id;
      }
      throw multigpu::SchedulerError(fmt::format("sbatch gave no job id: {}", out.text));
    }
    if (!multigpu::slurm::is_submit_limit(out.text)) {
      throw multigpu::SchedulerError(fmt::format("sbatch refused the submission: {}", out.text));
    }
    fmt::print(stderr, "multigpu-run: sbatch refused for the submit limit ({}); trying again in {} s\n",
               out.text.substr(0, out.text.find('\n')), wait_seconds);
    std::this_thread::sleep_for(std::chrono::seconds(wait_seconds));
  }
}

inline std::string self_path() {
  std::error_code error;
  const auto path = std::filesystem::read_symlink("/proc/self/exe", error);
  return error ? std::string("multigpu-run") : path.string();
}

/// `multigpu-run --slurm ... TASKS`: submits, then follows unless told not to.
inline int submit(const std::vector<multigpu::Task>& tasks, const std::string& task_file, SubmitOptions options) {
  namespace fs = std::filesystem;
  for (const char* command : {"sbatch", "squeue", "scontrol", "scancel"}) {
    if (!on_path(command)) {
      throw multigpu::SchedulerError(fmt::format(
          "--slurm: {} is not on PATH ({}); run where Slurm's commands are (a login node), or without --slurm to "
          "run on this machine's GPUs",
          command, std::getenv("PATH") != nullptr ? std::getenv("PATH") : ""));
    }
  }
  multigpu::slurm::check_sbatch_options(options.sbatch);
  for (const auto& name : options.force_tasks) {
    if (std::none_of(tasks.begin(), tasks.end(), [&](const multigpu::Task& t) { return t.name == name; })) {
      throw multigpu::SchedulerError(fmt::format("--force names no task: \"{}\"", name));
    }
  }
  options.log_dir = fs::absolute(options.log_dir).lexically_normal().string();
  if (!options.log_dir.empty() && options.log_dir.back() == '/') options.log_dir.pop_back();
  const std::string& log_dir = options.log_dir;
  if (!options.dry_run) {
    multigpu::detail::make_directories(slurm_dir(log_dir));
    const int lock = multigpu::detail::lock_log_dir(log_dir);  // a local run of this folder is refused meanwhile
    (void)lock;
  }
  refuse_live(log_dir, "--slurm");
  // Which tasks run; GPUs asked where the cluster has none.
  std::vector<const multigpu::Task*> to_run;
  std::set<std::string> skipped;
  bool wants_gpus = false;
  for (const auto& task : tasks) {
    if (multigpu::slurm::is_done(task, log_dir, options.force, options.force_tasks)) {
      skipped.insert(task.name);
    } else {
      to_run.push_back(&task);
      wants_gpus = wants_gpus || !options.cpu_only;
    }
  }
  if (wants_gpus) {
    const auto gres = run_command({"sinfo", "-h", "-o", "%G"});
    if (gres.status == 0 && gres.text.find("gpu") == std::string::npos) {
      throw multigpu::SchedulerError(fmt::format(
          "--slurm: the tasks ask for GPUs (--gres=gpu:N), but no node of this cluster has GPUs in its GRES (sinfo "
          "-o %G: {}); for tasks that need no GPU, give --gpus cpu",
          gres.text.substr(0, gres.text.find('\n'))));
    }
  }
  const int max_array = multigpu::slurm::max_array_size(run_command({"scontrol", "show", "config"}).text);
  // Order: tasks without [after=] on a task of this run grouped by request, then the others as they become ready.
  std::vector<const multigpu::Task*> order;
  std::map<std::pair<int, std::int64_t>, std::vector<const multigpu::Task*>> groups;
  std::vector<const multigpu::Task*> waiting;
  std::set<std::string> running_names;
  for (const auto* task : to_run) running_names.insert(task->name);
  for (const auto* task : to_run) {
    const bool waits = std::any_of(task->after.begin(), task->after.end(),
                                   [&](const std::string& a) { return running_names.count(a) != 0; });
    if (waits) {
      waiting.push_back(task);
    } else {
      groups[{options.cpu_only ? 0 : task->devices, task->memory_mib}].push_back(task);
    }
  }
  struct Submission {
    std::size_t offset;
    std::size_t count;
    const multigpu::Task* task;  // the request's example
    std::vector<std::string> dependency;
  };
  std::vector<Submission> submissions;
  for (const auto& group : groups) {
    const std::size_t offset = order.size();
    order.insert(order.end(), group.second.begin(), group.second.end());
    for (const auto& part : multigpu::slurm::split_array(offset, group.second.size(), max_array)) {
      submissions.push_back({part.offset, part.count, group.second.front(), {}});
    }
  }
  std::set<std::string> placed;
  for (const auto* task : order) placed.insert(task->name);
  while (!waiting.empty()) {  // cycles were refused by the parser
    for (auto it = waiting.begin(); it != waiting.end();) {
      const auto* task = *it;
      const bool ready = std::all_of(task->after.begin(), task->after.end(), [&](const std::string& a) {
        return running_names.count(a) == 0 || placed.count(a) != 0;
      });
      if (!ready) {
        ++it;
        continue;
      }
      std::vector<std::string> after;
      for (const auto& a : task->after) if (running_names.count(a) != 0) after.push_back(a);
      submissions.push_back({order.size(), 1, task, after});
      order.push_back(task);
      placed.insert(task->name);
      it = waiting.erase(it);
    }
  }
  const std::string script = slurm_dir(log_dir) + "/array.sh";
  if (!options.dry_run) {  // a fresh record of this submission
    fs::remove_all(slurm_dir(log_dir) + "/status");
    fs::remove(slurm_dir(log_dir) + "/jobs.txt");
    multigpu::detail::make_directories(slurm_dir(log_dir) + "/status");
    multigpu::detail::make_directories(slurm_dir(log_dir) + "/out");
    Json run{{"task_file", fs::absolute(task_file).string()}, {"retries", options.retries}, {"tasks", Json::array()},
             {"skipped", Json(std::vector<std::string>(skipped.begin(), skipped.end()))}};
    for (const auto* task : order) {
      run["tasks"].push_back({{"name", task->name},
                              {"command", task->command},
                              {"done_marker", task->done_marker},
                              {"devices", task->devices}});
    }
    multigpu::detail::write_file_atomically(slurm_dir(log_dir) + "/run.json", run.dump(2) + "\n");
    multigpu::detail::write_file_atomically(
        script,
        fmt::format("#!/bin/sh\n# multigpu-run --slurm: each array task runs its task of LOG_DIR/.slurm/run.json\n"
                    "exec {} slurm-task {} \"$1\"\n",
                    multigpu::detail::shell_quoted(self_path(), multigpu::detail::ShellQuoting::kNone),
                    multigpu::detail::shell_quoted(log_dir, multigpu::detail::ShellQuoting::kNone)));
    fs::permissions(script, fs::perms::owner_all | fs::perms::group_read | fs::perms::others_read);
  }
  fmt::print("{} task(s) from {} to Slurm ({} skipped: done already) in {} job submission(s); logs in {}\n",
             order.size(), task_file, skipped.size(), submissions.size(), log_dir);
  std::map<std::string, std::string> job_of;
  const auto start = std::chrono::steady_clock::now();
  std::size_t submitted = 0;
  try {
    for (const auto& s : submissions) {
      std::vector<std::string> argv{"sbatch", "--parsable", "--job-name", s.count == 1 ? order[s.offset]->name : "multigpu-run",
                                    fmt::format("--array=0-{}{}", s.count - 1,
                                                options.throttle > 0 ? fmt::format("%{}", options.throttle) : ""),
                                    "--output", slurm_dir(log_dir) + "/out/%A_%a.out", "--open-mode=append"};
      for (const auto& option : multigpu::slurm::resource_options(*s.task, options.cpu_only)) argv.push_back(option);
      if (!s.dependency.empty()) {
        std::string dependency = "--dependency=afterok";
        for (const auto& name : s.dependency) dependency += ":" + job_of[name];
        argv.push_back(dependency);
        argv.emplace_back("--kill-on-invalid-dep=yes");
      }
      argv.insert(argv.end(), options.sbatch.begin(), options.sbatch.end());
      argv.push_back(script);
      argv.push_back(std::to_string(s.offset));
      if (options.dry_run) {
        std::string line;
        for (const auto& arg : argv) line += " " + multigpu::detail::shell_quoted(arg, multigpu::detail::ShellQuoting::kNone);
        std::string names;
        for (std::size_t i = 0; i < s.count; ++i) names += (i == 0 ? "" : ", ") + order[s.offset + i]->name;
        fmt::print(" {}\n    # {}\n", line, names);
        for (std::size_t i = 0; i < s.count; ++i) job_of[order[s.offset + i]->name] = fmt::format("<{}>", order[s.offset + i]->name);
        continue;
      }
      const std::string id = sbatch(argv);
      submitted += s.count;
      std::string lines;
      for (std::size_t i = 0; i < s.count; ++i) {
        job_of[order[s.offset + i]->name] = fmt::format("{}_{}", id, i);
        lines += fmt::format("{}_{} {}\n", id, i, order[s.offset + i]->name);
      }
      multigpu::detail::append_to_file(slurm_dir(log_dir) + "/jobs.txt", lines);
    }
  } catch (const std::exception& e) {
    // All or nothing: what was submitted is cancelled, so that no task is
    // both in Slurm and reported as not submitted (See Note [A task file on Slurm]).
    std::vector<std::string> cancel_argv{"scancel"};
    for (const auto& entry : job_of) cancel_argv.push_back(entry.second);
    fmt::print(stderr, "multigpu-run: {}\n", e.what());
    if (cancel_argv.size() > 1) {
      const auto cancelled = run_command(cancel_argv);
      if (cancelled.status != 0) {  // jobs.txt stays: status and cancel still see them
        fmt::print(stderr, "multigpu-run: the {} task(s) submitted before could not be cancelled ({}); see them "
                           "with `multigpu-run status {}`, cancel them with `multigpu-run cancel {}`\n",
                   submitted, cancelled.text.substr(0, cancelled.text.find('\n')), log_dir, log_dir);
        return 2;
      }
    }
    std::error_code ignored;
    fs::remove(slurm_dir(log_dir) + "/jobs.txt", ignored);
    fmt::print(stderr, "multigpu-run: nothing is left submitted ({} of {} task(s) had been, and were cancelled); "
                       "correct it and submit again\n",
               submitted, order.size());
    write_summary(log_dir, tasks, skipped, 0, "not submitted: " + std::string(e.what()));
    return 2;
  }
  if (options.dry_run) return 0;
  fmt::print("submitted: Slurm job(s) ");
  {
    std::set<std::string> ids;
    for (const auto& entry : job_of) ids.insert(entry.second.substr(0, entry.second.find('_')));
    std::string list;
    for (const auto& id : ids) list += (list.empty() ? "" : ", ") + id;
    fmt::print("{}\n", list);
  }
  if (!options.follow) {
    fmt::print("see them with `multigpu-run status {}`; cancel with `multigpu-run cancel {}`\n", log_dir, log_dir);
    return 0;
  }
  std::signal(SIGINT, [](int) { stop_following() = 1; });
  std::string last;
  while (true) {
    const auto rows = rows_of(log_dir);
    std::map<std::string, int> counts;
    bool over = true;
    for (const auto& row : rows) {
      ++counts[row.state];
      over = over && is_final(row.state);
    }
    std::string line;
    for (const char* state : {"queued", "requeued", "running", "done", "failed", "not run"}) {
      if (counts[state] > 0) line += fmt::format("{}{} {}", line.empty() ? "" : ", ", counts[state], state);
    }
    if (line != last && !options.quiet) fmt::print("[slurm] {}\n", line);
    std::fflush(stdout);
    last = line;
    if (over) break;
    for (double waited = 0; waited < options.poll_seconds && stop_following() == 0; waited += 0.05) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (stop_following() != 0) {
      fmt::print("\nstopped following; the tasks go on in Slurm. See them with `multigpu-run status {}`, cancel "
                 "them with `multigpu-run cancel {}`\n",
                 log_dir, log_dir);
      return 130;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto summary = write_summary(log_dir, tasks, skipped, seconds);
  fmt::print("{} task(s): {} done, {} failed, {} skipped\n", summary.tasks.size(),
             summary.count(multigpu::TaskStatus::kDone), summary.count(multigpu::TaskStatus::kFailed),
             summary.count(multigpu::TaskStatus::kSkipped));
  for (const auto& r : summary.tasks) {
    if (r.status == multigpu::TaskStatus::kFailed) fmt::print("  failed: {} ({}), log {}\n", r.name, r.error, r.log_path);
  }
  if (summary.summary_error.empty()) fmt::print("summary: {} and {}\n", summary.json_path, summary.csv_path);
  return summary.exit_code();
}

/// `multigpu-run slurm-task LOG_DIR OFFSET`: what each array task runs (See
/// Note [A task file on Slurm]).
inline int run_task(const std::string& log_dir, const std::string& offset_text) {
  const Json run = read_json(slurm_dir(log_dir) + "/run.json");
  const char* array_index = std::getenv("SLURM_ARRAY_TASK_ID");
  if (!run.is_object() || array_index == nullptr) {
    fmt::print(stderr, "multigpu-run slurm-task: no run in {} or not in a Slurm array task\n", log_dir);
    return 2;
  }
  const std::size_t index = std::stoul(offset_text) + std::stoul(array_index);
  if (index >= run["tasks"].size()) {
    fmt::print(stderr, "multigpu-run slurm-task: task {} of {} tasks\n", index, run["tasks"].size());
    return 2;
  }
  const auto& entry = run["tasks"][index];
  multigpu::Task task = multigpu::Task::shell(entry["name"].get<std::string>(), entry["command"].get<std::string>(),
                                              entry["done_marker"].get<std::string>());
  const auto env = [](const char* name) { const char* v = std::getenv(name); return std::string(v != nullptr ? v : ""); };
  const std::string gpus = env("CUDA_VISIBLE_DEVICES");
  const std::string job = env("SLURM_ARRAY_JOB_ID") + "_" + env("SLURM_ARRAY_TASK_ID");
  const int restarts = std::atoi(env("SLURM_RESTART_COUNT").c_str());
  const std::string node = env("SLURMD_NODENAME").empty() ? multigpu::detail::host_name() : env("SLURMD_NODENAME");
  const std::string log = log_path(log_dir, task.name);
  const int retries = run.value("retries", 0);
  Json status{{"name", task.name}, {"state", "running"}, {"job", job}, {"node", node}, {"gpus", gpus},
              {"restarts", restarts}, {"attempts", 0}, {"seconds", 0.0}};
  const auto save = [&] {
    multigpu::detail::write_file_atomically(status_path(log_dir, task.name), status.dump(2) + "\n");
  };
  if (restarts > 0) {
    multigpu::detail::append_to_file(log, fmt::format("### multigpu: Slurm requeued the task (SLURM_RESTART_COUNT={}); "
                                                      "it runs again\n", restarts));
  }
  // The device report from a child of its own: a CUDA context made here
  // would hold GPU memory for as long as the task runs.
  if (const pid_t reporter = ::fork(); reporter == 0) {
    try {
      multigpu::DeviceManager devices;
      multigpu::detail::append_to_file(log, devices.report("auto").text());
    } catch (const std::exception& e) {
      multigpu::detail::append_to_file(log, fmt::format("### multigpu: no device report: {}\n", e.what()));
    }
    ::_exit(0);
  } else if (reporter > 0) {
    int ignored = 0;
    while (::waitpid(reporter, &ignored, 0) < 0 && errno == EINTR) {
    }
  }
  const std::string command = multigpu::detail::command_for(task.command, gpus, task.name);
  struct sigaction pass_on {};
  pass_on.sa_handler = [](int signal) {  // See Note [Signals for the task]
    const int saved_errno = errno;          // kill() of a group just gone sets it
    const pid_t group = static_cast<pid_t>(task_group());
    if (group > 0) ::kill(-group, signal);
    errno = saved_errno;
  };
  pass_on.sa_flags = 0;  // no SA_RESTART: see the Note
  ::sigemptyset(&pass_on.sa_mask);
  for (const int signal : {SIGUSR1, SIGUSR2}) ::sigaction(signal, &pass_on, nullptr);
  int code = 0;
  for (int attempt = 1; attempt <= retries + 1; ++attempt) {
    const auto marker_before = multigpu::detail::marker_time(task.done_marker);
    const double started = multigpu::detail::unix_now();
    status["attempts"] = attempt;
    status["start"] = started;
    save();
    multigpu::detail::append_to_file(log, fmt::format("### multigpu: task {}, attempt {}, Slurm job {} on {}, "
                                                      "CUDA_VISIBLE_DEVICES={}\n### command: {}\n",
                                                      task.name, attempt, job, node, gpus, command));
    const pid_t child = ::fork();
    if (child == 0) {
      ::setpgid(0, 0);
      const int fd = ::open(log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::setenv("MULTIGPU_TASK", task.name.c_str(), 1);
      ::setenv("MULTIGPU_TASK_ATTEMPT", std::to_string(attempt).c_str(), 1);
      ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    if (child > 0) {
      ::setpgid(child, child);  // also here, so that no signal finds the group not yet made
      task_group() = child;
    }
    int wait_status = 0;
    while (::waitpid(child, &wait_status, 0) < 0 && errno == EINTR) {
    }
    task_group() = 0;
    code = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
    const double seconds = multigpu::detail::unix_now() - started;
    status["seconds"] = seconds;
    status["exit_code"] = code;
    if (code == 0) {
      if (!task.done_marker.empty() && multigpu::detail::marker_time(task.done_marker) != marker_before) {
        try {
          multigpu::detail::record_done_command(log_dir, task);
        } catch (const std::exception&) {
        }
      }
      multigpu::detail::append_to_file(log, fmt::format("### done in {:.1f} s\n", seconds));
      status["state"] = "done";
      save();
      return 0;
    }
    status["error"] = WIFEXITED(wait_status) ? fmt::format("exit code {}", code)
                                             : fmt::format("killed by signal {}", WTERMSIG(wait_status));
    if (attempt <= retries) {
      multigpu::detail::append_to_file(log, fmt::format("### failed ({}); retrying ({} of {})\n",
                                                        status["error"].get<std::string>(), attempt, retries));
    }
  }
  multigpu::detail::append_to_file(log, fmt::format("### failed: {}\n", status["error"].get<std::string>()));
  status["state"] = "failed";
  save();
  return code == 0 ? 1 : code;
}

}  // namespace detail

inline int submit(const std::vector<Task>& tasks, const std::string& task_file, SubmitOptions options) {
  return detail::submit(tasks, task_file, std::move(options));
}
inline int run_task(const std::string& log_dir, const std::string& offset) { return detail::run_task(log_dir, offset); }
inline bool is_submission(const std::string& log_dir) {
  std::error_code error;
  return std::filesystem::exists(detail::slurm_dir(log_dir) + "/run.json", error);
}
inline void forget_submission(const std::string& log_dir) {
  if (log_dir.empty() || !is_submission(log_dir)) return;
  // Where Slurm's commands are (squeue tells whether its tasks are live).
  if (detail::on_path("squeue")) detail::refuse_live(log_dir, "a run on this machine");
  std::error_code ignored;
  std::filesystem::remove(detail::slurm_dir(log_dir) + "/run.json", ignored);
}
inline int print_status(const std::string& log_dir) { return detail::show_status(log_dir); }
inline int cancel(const std::string& log_dir) { return detail::cancel(log_dir); }

}  // namespace slurm
}  // namespace multigpu
