#pragma once
/// @file
/// Many experiments over a pool of GPUs: a queue of tasks, each started as
/// soon as a device of the pool is free (no fixed batches), with per-task
/// logs, skip-if-done, retries, failure isolation, Ctrl-C handling and a
/// summary in JSON and CSV.
///
///   multigpu::SchedulerOptions options;
///   options.devices = "0,1,2,3";              // or "auto", or "cpu" with max_per_device slots
///   options.log_dir = "logs";
///   multigpu::Scheduler scheduler(options);
///   std::vector<multigpu::Task> tasks;
///   for (double rate : {0.125, 0.25, 0.5})
///     tasks.push_back(multigpu::Task::shell(fmt::format("rate-{}", rate),
///                                           fmt::format("./train --noise {} --out out/{}", rate, rate),
///                                           /*done_marker=*/fmt::format("out/{}/model.pt", rate)));
///   multigpu::RunSummary summary = scheduler.run(tasks);
///   return summary.exit_code();
///
/// Tasks are shell commands (run as child processes with CUDA_VISIBLE_DEVICES
/// set to their physical GPUs, output to `<log_dir>/<task>.log`) or C++
/// callables (run in this process on a thread of their own with their
/// device current). Prefer commands for anything that may crash: a CUDA error
/// or a segfault in an in-process task takes the whole process down (CUDA
/// errors are often "sticky": the context stays broken), while a command
/// task that crashes is just recorded as failed.
///
/// Threading: run() is called from one thread and returns when every task has
/// ended; it joins every thread it started. request_stop() may be called from
/// any thread.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/config.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/detail/process.hpp"
#include "multigpu/device.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/runtime.hpp"
#include "multigpu/worker.hpp"

#if MULTIGPU_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace multigpu {

/// What an in-process task gets: its devices, its log, and a stop request.
class TaskContext {
 public:
  TaskContext(std::string name, std::vector<DeviceInfo> devices, std::string log_path, int attempt,
              const std::atomic<bool>* stop)
      : name_(std::move(name)), devices_(std::move(devices)), log_path_(std::move(log_path)), attempt_(attempt),
        stop_(stop) {}
  const std::string& name() const { return name_; }
  /// The devices given to the task (one unless the task asked for more).
  const std::vector<DeviceInfo>& devices() const { return devices_; }
  /// The first device, as LibTorch names it.
  c10::Device device() const { return devices_.front().device(); }
  const std::string& log_path() const { return log_path_; }
  /// 1 for the first try, 2 for the first retry, ...
  int attempt() const { return attempt_; }
  /// True once the run is being stopped (Ctrl-C): finish early if you can.
  bool stop_requested() const { return stop_->load(); }

 private:
  std::string name_;
  std::vector<DeviceInfo> devices_;
  std::string log_path_;
  int attempt_;
  const std::atomic<bool>* stop_;
};

/// One unit of work: a shell command or a C++ callable.
struct Task {
  /// Unique; used for the log file's name (made file-safe) and the summary.
  std::string name;
  /// A shell command (`/bin/sh -c`); `{gpu}` becomes the CUDA_VISIBLE_DEVICES
  /// value given to it, `{task}` its name.
  std::string command;
  /// Or: a callable run in this process.
  std::function<void(TaskContext&)> function;
  /// If this file or folder exists, the task counts as done and is skipped
  /// (unless forced). Written by the task itself when it has finished, so an
  /// interrupted task runs again on the next run.
  std::string done_marker;
  /// Devices the task needs at once.
  int devices = 1;

  static Task shell(std::string name, std::string command, std::string done_marker = {}, int devices = 1) {
    Task task;
    task.name = std::move(name);
    task.command = std::move(command);
    task.done_marker = std::move(done_marker);
    task.devices = devices;
    return task;
  }
  static Task callable(std::string name, std::function<void(TaskContext&)> function, std::string done_marker = {},
                       int devices = 1) {
    Task task;
    task.name = std::move(name);
    task.function = std::move(function);
    task.done_marker = std::move(done_marker);
    task.devices = devices;
    return task;
  }
};

/// Where a task ended up.
enum class TaskStatus {
  kPending,      ///< Never started (the run was stopped first).
  kDone,         ///< Finished successfully.
  kFailed,       ///< Threw, exited non-zero or was killed (after its retries).
  kSkipped,      ///< Its done marker existed.
  kInterrupted,  ///< Stopped by Ctrl-C / SIGTERM / request_stop().
};

/// "pending", "done", "failed", "skipped", "interrupted".
inline const char* to_string(TaskStatus status) {
  switch (status) {
    case TaskStatus::kPending: return "pending";
    case TaskStatus::kDone: return "done";
    case TaskStatus::kFailed: return "failed";
    case TaskStatus::kSkipped: return "skipped";
    case TaskStatus::kInterrupted: return "interrupted";
  }
  return "?";
}

/// What happened to one task.
struct TaskResult {
  std::string name;
  TaskStatus status = TaskStatus::kPending;
  std::vector<std::string> devices;  ///< The devices of its last attempt ("cuda:1 (physical 5, ...)").
  std::string visible_devices;       ///< The CUDA_VISIBLE_DEVICES it got (commands).
  std::chrono::system_clock::time_point start{};  ///< Start of its last attempt.
  double seconds = 0;                             ///< Duration of its last attempt.
  int attempts = 0;
  std::optional<int> exit_code;  ///< Commands that exited.
  std::string error;             ///< Why it failed ("exit code 2", "killed by SIGSEGV", an exception's message).
  /// Some attempt failed looking like running out of GPU memory (each
  /// attempt's whole output is searched).
  bool out_of_memory = false;
  std::string log_path;
};

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

/// How a scheduler runs its queue.
struct SchedulerOptions {
  /// The device pool: a device spec ("0,1,2,3", "all", "cpu"); "auto" is
  /// every visible GPU, busy or not (busy ones are waited for), or the CPU
  /// when there is none.
  std::string devices = "auto";
  /// Tasks at once on one device (several small tasks per GPU; CPU slots).
  int max_per_device = 1;
  /// Memory in use (MiB) above which a device without our tasks (or our
  /// cached memory) is busy (someone else's job) and is not given a task.
  std::int64_t memory_threshold_mib = MULTIGPU_DEFAULT_BUSY_THRESHOLD_MIB;
  /// Fail a task that found no free device for this long (0: wait forever).
  std::chrono::milliseconds busy_wait_limit{0};
  /// Per-task logs and, by default, the summary go here. A run holds a lock
  /// on it (`<log_dir>/.multigpu-run.lock`): a second run on it is refused.
  std::string log_dir = "multigpu-logs";
  /// Summary files: PATH.json and PATH.csv ("": <log_dir>/summary).
  std::string summary_path;
  /// Run tasks whose done marker exists too.
  bool force = false;
  /// Extra attempts for a failed task (on another device when one is free,
  /// always when it ran out of GPU memory).
  int retries = 0;
  /// How often running commands and busy devices are looked at.
  std::chrono::milliseconds poll_interval{200};
  /// After a stop request: how long commands get to end after SIGTERM before
  /// SIGKILL (also when this process dies: see Note [The task supervisor]).
  std::chrono::milliseconds grace_period{std::chrono::seconds(10)};
  /// Handle SIGINT, SIGTERM and SIGHUP during run() (stop dispatching, stop
  /// the commands, write the summary); the previous handlers come back after.
  bool handle_signals = false;
  /// A live status line on stderr: redrawn on a terminal, a plain line every
  /// `status_interval` otherwise.
  bool status_line = false;
  std::chrono::milliseconds status_interval{std::chrono::seconds(30)};
};

/// A task as a dry run would start it.
struct PlannedTask {
  std::string name;
  bool skipped = false;            ///< Its done marker exists.
  std::vector<std::string> devices;
  std::string visible_devices;
  std::string command;             ///< With {gpu} and {task} filled in ("" for callables).
};

/// Parses a task file (see the README, "Task files"): one shell command per
/// line, `#` comments, `[name=... done=... gpus=N]` options before a command,
/// `grid NAME = VALUES...` lines whose variables `{NAME}` expand a command
/// over every combination. `source` names the text in errors (file:line);
/// `default_devices` is what a line without gpus=N needs.
std::vector<Task> parse_tasks(std::string_view text, const std::string& source = "tasks", int default_devices = 1);
/// Reads and parses a task file.
std::vector<Task> read_task_file(const std::string& path, int default_devices = 1);

namespace detail {

/// Note [Emptying the cache between tasks]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// An in-process task leaves the memory it used in LibTorch's caching
/// allocator. The scheduler gives it back (emptyCache) when the task has
/// ended, so that other processes, and command tasks, can use it. But
/// emptyCache releases the cached blocks of every GPU of this process with
/// cudaFree, which synchronises the device and can deadlock against the NCCL
/// launches of an in-process task still running (see Note [NCCL and
/// cudaFree] in detail/cuda.hpp). So the scheduler empties the cache, from
/// its own thread, only when no other in-process task on a GPU is running;
/// until then the GPUs of the tasks that ended keep our cache and are not
/// judged busy by the memory in use there (a later in-process task reuses
/// that cache). A task's own worker threads have ended with it.

/// Note [Waking the scheduler]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// The scheduler's loop sleeps until something happens: a command task's
/// process ends (its pidfd becomes readable), an in-process task ends or a
/// stop is requested (an eventfd is written), or `poll_interval` passes (busy
/// devices, signals, the status line). So a short task's slot is given to
/// the next task at once, not at the next poll.

/// What the scheduler's loop waits on. Thread-safe notify().
class WakeUp {
 public:
  WakeUp() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  ~WakeUp() {
    if (fd_ >= 0) ::close(fd_);
  }
  WakeUp(const WakeUp&) = delete;
  WakeUp& operator=(const WakeUp&) = delete;

  void notify() {
    const std::uint64_t one = 1;
    if (fd_ >= 0) {
      const ssize_t written = ::write(fd_, &one, sizeof(one));
      (void)written;
    }
  }

  /// Waits until notified, one of `fds` (pidfds; -1 entries are ignored) is
  /// readable, or `limit` passes.
  void wait(const std::vector<int>& fds, std::chrono::milliseconds limit) {
    std::vector<pollfd> watched;
    if (fd_ >= 0) watched.push_back({fd_, POLLIN, 0});
    for (int fd : fds) {
      if (fd >= 0) watched.push_back({fd, POLLIN, 0});
    }
    ::poll(watched.data(), static_cast<nfds_t>(watched.size()), static_cast<int>(limit.count()));
    std::uint64_t count = 0;
    if (fd_ >= 0) {
      const ssize_t got = ::read(fd_, &count, sizeof(count));  // drained: the next wait sleeps again
      (void)got;
    }
  }

 private:
  int fd_;
};

/// The non-template scheduler: dispatches over a pool whose busy state a
/// callback reports (see BasicScheduler).
class SchedulerCore {
 public:
  /// `real_devices`: the pool's GPUs are CUDA's, so in-process tasks run
  /// with theirs current (false for a scripted machine).
  /// `release_cached_memory`: empties LibTorch's caching allocator, on every
  /// GPU (see Note [Emptying the cache between tasks]).
  SchedulerCore(SchedulerOptions options, std::vector<DeviceInfo> pool,
                std::function<std::vector<DeviceInfo>()> query, bool real_devices,
                std::function<void()> release_cached_memory = {});
  RunSummary run(const std::vector<Task>& tasks);
  std::vector<PlannedTask> plan(const std::vector<Task>& tasks) const;
  void request_stop(int signal = SIGINT);

 private:
  struct Job;
  struct Running;
  void validate(const std::vector<Task>& tasks) const;
  bool is_done(const Task& task) const;
  std::optional<std::vector<std::size_t>> place(const Job& job, const std::vector<DeviceInfo>& now) const;
  std::vector<DeviceInfo> query_devices();
  void start(Job& job, const std::vector<std::size_t>& devices);
  void finish(Running& running);
  void conclude(Job& job, const std::vector<std::size_t>& devices, bool success, bool out_of_memory);
  void release_cache_unless_in_use(const Running& ended);
  void write_summary(const std::vector<Job>& jobs, bool final_write);
  void print_status(const std::vector<Job>& jobs, bool force);

  SchedulerOptions options_;
  std::vector<DeviceInfo> pool_;
  std::function<std::vector<DeviceInfo>()> query_;
  bool real_devices_ = true;
  std::function<void()> release_cached_memory_;
  std::vector<int> load_;  // our running tasks per pool device
  std::vector<bool> holds_our_cache_;  // per pool device: see Note [Emptying the cache between tasks]
  std::vector<std::unique_ptr<Running>> running_;
  std::atomic<bool> stop_{false};
  std::atomic<int> stop_signal_{0};
  std::mutex mutex_;             // in-process completions
  WakeUp wake_;                  // see Note [Waking the scheduler]
  std::chrono::steady_clock::time_point run_start_{};
  std::chrono::steady_clock::time_point last_status_{};
  RunSummary summary_;
  std::vector<Job>* jobs_ = nullptr;
  bool summary_dirty_ = false;        // a task changed since the summary was last written
  std::string last_summary_error_;    // warned about once
  bool warned_query_ = false;
  int lock_fd_ = -1;  // the log folder's lock, kept by command tasks' supervisors too
};

}  // namespace detail

/// The scheduler over a runtime policy (see runtime.hpp): SystemRuntime for
/// the real machine (Scheduler), testing::FakeRuntime for tests.
template <class Runtime>
class BasicScheduler {
 public:
  explicit BasicScheduler(SchedulerOptions options = {}, Runtime runtime = Runtime{});

  /// Runs every task; returns when all have ended (or the run was stopped).
  /// Throws SchedulerError for a bad queue (duplicate names, a task needing
  /// more devices than the pool has).
  RunSummary run(const std::vector<Task>& tasks) { return core_.run(tasks); }
  /// What run() would start where, assuming tasks of equal length; runs nothing.
  std::vector<PlannedTask> plan(const std::vector<Task>& tasks) const { return core_.plan(tasks); }
  /// Stops the run as Ctrl-C would. Thread-safe.
  void request_stop() { core_.request_stop(SIGINT); }
  /// The pool's devices, in order.
  const std::vector<DeviceInfo>& pool() const { return pool_; }

 private:
  static std::vector<DeviceInfo> resolve_pool(BasicDeviceManager<Runtime>& manager, const SchedulerOptions& options);

  std::shared_ptr<BasicDeviceManager<Runtime>> manager_;
  std::vector<DeviceInfo> pool_;
  detail::SchedulerCore core_;
};

/// The scheduler of the real machine.
using Scheduler = BasicScheduler<SystemRuntime>;

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

/// A name made safe as a file name: letters, digits, '.', '_', '-'.
inline std::string file_safe(const std::string& name) {
  std::string out;
  for (char c : name) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-';
    out += keep ? c : '_';
  }
  if (out.empty() || out == "." || out == "..") out = "task";
  return out;
}

/// The length of the valid UTF-8 sequence at the start of `text` (0 if none).
inline std::size_t utf8_sequence_length(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  std::size_t length = 0;
  unsigned char low = 0x80;
  unsigned char high = 0xBF;
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;   // no overlong forms
    if (lead == 0xED) high = 0x9F;  // no surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;  // nothing above U+10FFFF
  } else {
    return 0;
  }
  if (text.size() < length) return 0;
  if (byte(1) < low || byte(1) > high) return 0;
  for (std::size_t i = 2; i < length; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return length;
}

/// The byte offset of the first invalid UTF-8 sequence in `text`, if any.
inline std::optional<std::size_t> invalid_utf8_at(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_sequence_length(text.substr(i));
    if (length == 0) return i;
    i += length;
  }
  return std::nullopt;
}

/// JSON string literal; bytes that are not UTF-8 (a command's or a
/// program's output) become U+FFFD, so the file stays valid JSON.
inline std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80) {
      const std::size_t length = utf8_sequence_length(text.substr(i));
      if (length == 0) {
        out += "\ufffd";
      } else {
        out.append(text.substr(i, length));
        i += length - 1;
      }
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

/// CSV field (RFC 4180).
inline std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

/// "2026-11-22T16:02:05Z".
inline std::string iso8601(std::chrono::system_clock::time_point time) {
  if (time.time_since_epoch().count() == 0) return "";
  const std::time_t t = std::chrono::system_clock::to_time_t(time);
  std::tm utc{};
  gmtime_r(&t, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

/// "1:02:03" or "2:03".
inline std::string clock_text(double seconds) {
  const auto total = static_cast<long>(seconds + 0.5);
  return total >= 3600 ? fmt::format("{}:{:02}:{:02}", total / 3600, (total / 60) % 60, total % 60)
                       : fmt::format("{}:{:02}", total / 60, total % 60);
}

/// Replaces `{name}` for each name in `values`; other braces stay as they are.
inline std::string fill_placeholders(const std::string& text, const std::map<std::string, std::string>& values) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '{') {
      const std::size_t close = text.find('}', i);
      if (close != std::string::npos) {
        const auto found = values.find(text.substr(i + 1, close - i - 1));
        if (found != values.end()) {
          out += found->second;
          i = close;
          continue;
        }
      }
    }
    out += text[i];
  }
  return out;
}

inline bool path_exists(const std::string& path) {
  struct stat info {};
  return !path.empty() && ::stat(path.c_str(), &info) == 0;
}

/// Makes a folder and its parents (like mkdir -p).
inline void make_directories(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  if (!path.empty() && path.front() == '/') partial = "/";
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty()) continue;
    partial += part + "/";
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      throw SchedulerError(fmt::format("cannot create folder {}: {}", partial, std::strerror(errno)));
    }
  }
}

/// The last `bytes` of a file ("" if unreadable).
inline std::string file_tail(const std::string& path, std::size_t bytes) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  const auto size = static_cast<std::size_t>(in.tellg());
  const std::size_t start = size > bytes ? size - bytes : 0;
  in.seekg(static_cast<std::streamoff>(start));
  std::string text(size - start, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  return text;
}

/// Whether a failure's text says the GPU ran out of memory.
inline bool looks_like_out_of_memory(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text.find("out of memory") != std::string::npos || text.find("outofmemoryerror") != std::string::npos;
}

/// Appends to a task's log, never through a symbolic link. Best effort: a
/// full disk or a deleted folder loses the line, not the run.
inline void append_to_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const ssize_t written = ::write(fd, text.data(), text.size());
  (void)written;
  ::close(fd);
}

/// The size of a file (0 if it cannot be read).
inline std::uint64_t file_size(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 ? static_cast<std::uint64_t>(info.st_size) : 0;
}

/// Whether the output in `path` from byte `from` on says the GPU ran out of
/// memory. Reads it in pieces, so a long log costs no memory.
inline bool output_mentions_out_of_memory(const std::string& path, std::uint64_t from) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  in.seekg(static_cast<std::streamoff>(from));
  constexpr std::size_t kPiece = 1 << 20;
  constexpr std::size_t kOverlap = 32;  // longer than any phrase looked for
  std::string carry;
  std::string piece(kPiece, '\0');
  while (in) {
    in.read(piece.data(), static_cast<std::streamsize>(piece.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    if (got == 0) break;
    const std::string text = carry + piece.substr(0, got);
    if (looks_like_out_of_memory(text)) return true;
    carry = text.substr(text.size() > kOverlap ? text.size() - kOverlap : 0);
  }
  return false;
}

/// What a command's exit says. /bin/sh exits with 128 + N when the command
/// it waited for was killed by signal N, and dash then prints the signal's
/// description ("Segmentation fault"); a program may also exit with such a
/// code itself. So "killed by" is said only when the shell's message is the
/// attempt's last line. `output`: the end of the attempt's output.
inline std::string describe_command_exit(const ProcessExit& exit, const std::string& output) {
  if (!exit.exit_code || *exit.exit_code <= 128 || *exit.exit_code >= 128 + NSIG) return exit.describe();
  const int signal = *exit.exit_code - 128;
  const char* abbreviation = sigabbrev_np(signal);
  if (abbreviation == nullptr) return exit.describe();
  std::string last_line(trim(output));
  if (const auto newline = last_line.rfind('\n'); newline != std::string::npos) last_line.erase(0, newline + 1);
  const std::string message = ::strsignal(signal);
  const bool shell_prefix = last_line.rfind("sh: ", 0) == 0 || last_line.rfind("bash: ", 0) == 0;  // bash as sh
  const bool from_shell = last_line == message || last_line == message + " (core dumped)" ||
                          (shell_prefix && last_line.find(message) != std::string::npos);
  if (from_shell) {
    return fmt::format("killed by SIG{} (signal {}; /bin/sh reported exit code {})", abbreviation, signal,
                       *exit.exit_code);
  }
  return fmt::format("exit code {} (a command under sh killed by SIG{}?)", *exit.exit_code, abbreviation);
}

/// Note [The log folder's lock]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// Two runs on one log folder would run the same tasks twice, side by side,
/// and write over each other's logs and summary. A run takes an exclusive
/// flock on `<log_dir>/.multigpu-run.lock` and writes who it is (pid, host,
/// start time) into it; a second run is refused with that line. The lock
/// goes when its open file goes: when the run ends, or when its process dies
/// (no stale lock to clean up by hand), except that the supervisors of the
/// command tasks keep it (see Note [The task supervisor]): after a crash, a
/// rerun waits until the old run's tasks are gone.

/// The lock file of a log folder.
inline std::string lock_path_of(const std::string& log_dir) { return log_dir + "/.multigpu-run.lock"; }

/// Takes the log folder's lock, or throws SchedulerError saying who holds it.
/// Returns the lock's file descriptor.
inline int lock_log_dir(const std::string& log_dir) {
  const std::string path = lock_path_of(log_dir);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw SchedulerError(fmt::format("cannot open the log folder's lock {}: {}", path, std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    std::string holder(512, '\0');
    const ssize_t got = ::pread(fd, holder.data(), holder.size(), 0);
    holder.resize(got > 0 ? static_cast<std::size_t>(got) : 0);
    ::close(fd);
    if (error == EWOULDBLOCK) {
      throw SchedulerError(fmt::format(
          "the log folder {} is in use by another run ({}); wait for it to end (its tasks included), or choose "
          "another log folder",
          log_dir, holder.empty() ? std::string("who, it did not say") : std::string(trim(holder))));
    }
    throw SchedulerError(fmt::format("cannot lock {}: {}", path, std::strerror(error)));
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string holder = fmt::format("pid {} on host {}, started {}\n", static_cast<long>(::getpid()), host,
                                         iso8601(std::chrono::system_clock::now()));
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, holder.data(), holder.size(), 0) < 0) {
    // The lock holds without the note; a second run just cannot say who.
  }
  return fd;
}

/// Installs SIGINT/SIGTERM/SIGHUP handlers that only record the signal, and puts
/// the previous ones back when destroyed.
class SignalWatch {
 public:
  explicit SignalWatch(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    received() = 0;
    struct sigaction action {};
    action.sa_handler = [](int signal) { received() = signal; };
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGINT, &action, &previous_int_);
    ::sigaction(SIGTERM, &action, &previous_term_);
    ::sigaction(SIGHUP, &action, &previous_hup_);  // a closed terminal (ssh dropped) stops like SIGTERM
  }
  ~SignalWatch() {
    if (!enabled_) return;
    ::sigaction(SIGINT, &previous_int_, nullptr);
    ::sigaction(SIGTERM, &previous_term_, nullptr);
    ::sigaction(SIGHUP, &previous_hup_, nullptr);
  }
  SignalWatch(const SignalWatch&) = delete;
  SignalWatch& operator=(const SignalWatch&) = delete;
  /// The signal received since installation (0 if none, or not watching).
  int signal() const { return enabled_ ? static_cast<int>(received()) : 0; }

 private:
  static volatile std::sig_atomic_t& received() {
    static volatile std::sig_atomic_t value = 0;
    return value;
  }
  bool enabled_;
  struct sigaction previous_int_ {};
  struct sigaction previous_term_ {};
  struct sigaction previous_hup_ {};
};

struct SchedulerCore::Job {
  Task task;
  TaskResult result;
  std::set<std::size_t> avoid;  // devices not to retry on
  bool queued = true;
  std::optional<std::chrono::steady_clock::time_point> waiting_since;
};

struct SchedulerCore::Running {
  std::size_t job = 0;
  std::vector<std::size_t> devices;
  std::chrono::steady_clock::time_point started;
  std::unique_ptr<ChildProcess> child;
  std::uint64_t output_start = 0;  // where this attempt's output begins in the log
  std::thread thread;  // in-process tasks
  std::atomic<bool> finished{false};
  std::exception_ptr error;
};

inline SchedulerCore::SchedulerCore(SchedulerOptions options, std::vector<DeviceInfo> pool,
                                    std::function<std::vector<DeviceInfo>()> query, bool real_devices,
                                    std::function<void()> release_cached_memory)
    : options_(std::move(options)),
      pool_(std::move(pool)),
      query_(std::move(query)),
      real_devices_(real_devices),
      release_cached_memory_(std::move(release_cached_memory)),
      load_(pool_.size(), 0),
      holds_our_cache_(pool_.size(), false) {
  if (pool_.empty()) throw SchedulerError("the device pool is empty");
  if (options_.max_per_device < 1) {
    throw SchedulerError(fmt::format("max_per_device must be 1 or more, got {}", options_.max_per_device));
  }
  if (options_.retries < 0) throw SchedulerError(fmt::format("retries must be 0 or more, got {}", options_.retries));
  if (options_.poll_interval.count() <= 0) throw SchedulerError("poll_interval must be positive");
  if (options_.log_dir.empty()) {
    throw SchedulerError("the log folder is \"\"; name a folder for the task logs and the summary (default "
                         "multigpu-logs; \".\" for the current folder)");
  }
}

inline void SchedulerCore::validate(const std::vector<Task>& tasks) const {
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
    if (task.devices < 1 || task.devices > static_cast<int>(pool_.size())) {
      throw SchedulerError(fmt::format("{} needs {} device(s), but the pool has {} ({})", which, task.devices,
                                       pool_.size(), pool_.front().is_cpu() ? "cpu" : "GPUs"));
    }
  }
}

inline bool SchedulerCore::is_done(const Task& task) const {
  return !options_.force && path_exists(task.done_marker);
}

inline std::optional<std::vector<std::size_t>> SchedulerCore::place(const Job& job,
                                                                     const std::vector<DeviceInfo>& now) const {
  // Free and not busy; devices the task failed on come last, and are used
  // only when every device of the pool is among them.
  std::vector<std::size_t> preferred;
  std::vector<std::size_t> avoided;
  for (std::size_t d = 0; d < pool_.size(); ++d) {
    if (load_[d] >= options_.max_per_device) continue;
    // A device with a task of ours, or our cache, uses memory because of
    // it: only devices without either are judged busy.
    if (load_[d] == 0 && !holds_our_cache_[d] && d < now.size() && now[d].busy) continue;
    (job.avoid.count(d) != 0 ? avoided : preferred).push_back(d);
  }
  const auto needed = static_cast<std::size_t>(job.task.devices);
  if (job.avoid.size() >= pool_.size()) preferred.insert(preferred.end(), avoided.begin(), avoided.end());
  if (preferred.size() < needed) return std::nullopt;
  preferred.resize(needed);
  return preferred;
}

inline std::vector<DeviceInfo> SchedulerCore::query_devices() {
  try {
    return query_();
  } catch (const std::exception& e) {
    // The tasks already running are not the query's business: go on with
    // the pool as it was (no device judged busy), and say so once.
    if (!warned_query_) {
      warn(fmt::format("cannot look at the devices' memory ({}); tasks are placed without busy detection",
                       e.what()));
      warned_query_ = true;
    }
    std::vector<DeviceInfo> now = pool_;
    for (auto& device : now) device.busy = false;
    return now;
  }
}

inline void SchedulerCore::start(Job& job, const std::vector<std::size_t>& devices) {
  auto running = std::make_unique<Running>();
  running->job = static_cast<std::size_t>(&job - jobs_->data());
  running->devices = devices;
  running->started = std::chrono::steady_clock::now();
  TaskResult& result = job.result;
  ++result.attempts;
  result.start = std::chrono::system_clock::now();
  result.devices.clear();
  std::vector<DeviceInfo> infos;
  std::string visible;
  for (std::size_t d : devices) {
    ++load_[d];
    infos.push_back(pool_[d]);
    result.devices.push_back(pool_[d].is_cpu() ? std::string("cpu") : pool_[d].label());
    if (!pool_[d].is_cpu()) visible += (visible.empty() ? "" : ",") + pool_[d].visible_devices_token;
  }
  result.visible_devices = visible;
  result.exit_code.reset();
  result.error.clear();
  std::string on;
  for (const auto& label : result.devices) on += (on.empty() ? "" : ", ") + label;
  append_to_file(result.log_path, fmt::format("### multigpu: task {}, attempt {}, on {}, CUDA_VISIBLE_DEVICES={}, {}\n",
                                              job.task.name, result.attempts, on, visible, iso8601(result.start)));
  if (!job.task.command.empty()) {
    const std::string command = fill_placeholders(job.task.command, {{"gpu", visible}, {"task", job.task.name}});
    append_to_file(result.log_path, fmt::format("### command: {}\n", command));
    const auto env = environment_with({{"CUDA_VISIBLE_DEVICES", visible},
                                       {"MULTIGPU_TASK", job.task.name},
                                       {"MULTIGPU_TASK_ATTEMPT", std::to_string(result.attempts)}});
    running->output_start = file_size(result.log_path);
    try {
      running->child = std::make_unique<ChildProcess>(
          command, env, result.log_path,
          std::chrono::duration_cast<std::chrono::seconds>(options_.grace_period + std::chrono::milliseconds(999)),
          lock_fd_);
    } catch (const std::exception& e) {
      // This task's failure (a command over the argument limit, a log that
      // cannot be opened), not the run's.
      result.error = e.what();
      append_to_file(result.log_path, fmt::format("### cannot start: {}\n", result.error));
      result.seconds = 0;
      summary_dirty_ = true;
      conclude(job, devices, false, false);
      return;
    }
  } else {
    Running* raw = running.get();
    const std::function<void(TaskContext&)>* function = &job.task.function;
    const bool on_cuda = real_devices_ && infos.front().is_cuda();
    running->thread = std::thread([this, raw, function, infos, on_cuda, name = job.task.name, log = result.log_path,
                                   attempt = result.attempts] {
      try {
#if MULTIGPU_WITH_CUDA
        std::optional<c10::cuda::CUDAGuard> guard;
        if (on_cuda) guard.emplace(infos.front().device());
#endif
        TaskContext context(name, infos, log, attempt, &stop_);
        (*function)(context);
      } catch (...) {
        raw->error = std::current_exception();
      }
#if !MULTIGPU_WITH_CUDA
      (void)on_cuda;
#endif
      {
        std::lock_guard<std::mutex> lock(mutex_);
        raw->finished = true;
      }
      wake_.notify();
    });
  }
  running_.push_back(std::move(running));
  summary_dirty_ = true;
}


inline void SchedulerCore::finish(Running& running) {
  Job& job = (*jobs_)[running.job];
  TaskResult& result = job.result;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - running.started).count();
  bool success = false;
  bool out_of_memory = false;
  if (running.child) {
    const ProcessExit& exit = running.child->wait_blocking();
    result.exit_code = exit.exit_code;
    success = exit.success();
    if (!success) {
      result.error = describe_command_exit(exit, file_tail(result.log_path, 4096));
      out_of_memory = output_mentions_out_of_memory(result.log_path, running.output_start);
    }
  } else {
    if (running.thread.joinable()) running.thread.join();
    if (pool_[running.devices.front()].is_cuda()) {
      for (std::size_t d : running.devices) holds_our_cache_[d] = true;
      release_cache_unless_in_use(running);
    }
    if (running.error) {
      result.error = describe_exception(running.error);
      out_of_memory = looks_like_out_of_memory(result.error);
      append_to_file(result.log_path, fmt::format("### exception: {}\n", result.error));
    } else {
      success = true;
    }
  }
  summary_dirty_ = true;
  conclude(job, running.devices, success, out_of_memory);
}

inline void SchedulerCore::conclude(Job& job, const std::vector<std::size_t>& devices, bool success,
                                    bool out_of_memory) {
  TaskResult& result = job.result;
  for (std::size_t d : devices) --load_[d];
  result.out_of_memory = result.out_of_memory || out_of_memory;  // any attempt
  const bool stopping = stop_.load();
  if (success) {
    result.status = TaskStatus::kDone;
    append_to_file(result.log_path, fmt::format("### done in {:.1f} s\n", result.seconds));
    if (!job.task.done_marker.empty() && !path_exists(job.task.done_marker)) {
      warn(fmt::format("task {} succeeded but did not create its done marker {}; a rerun will run it again",
                       job.task.name, job.task.done_marker));
    }
  } else if (stopping) {
    result.status = TaskStatus::kInterrupted;
    append_to_file(result.log_path, fmt::format("### interrupted after {:.1f} s ({})\n", result.seconds, result.error));
  } else if (result.attempts <= options_.retries) {
    // Another device next time: it may be this one that is crowded or broken.
    for (std::size_t d : devices) job.avoid.insert(d);
    result.status = TaskStatus::kPending;
    job.queued = true;
    append_to_file(result.log_path, fmt::format("### failed ({}){}; retrying ({} of {})\n", result.error,
                                                out_of_memory ? ", out of GPU memory" : "", result.attempts,
                                                options_.retries));
  } else {
    result.status = TaskStatus::kFailed;
    append_to_file(result.log_path, fmt::format("### failed after {:.1f} s: {}\n", result.seconds, result.error));
  }
}

inline void SchedulerCore::release_cache_unless_in_use(const Running& ended) {
  // See Note [Emptying the cache between tasks].
  const bool in_use = std::any_of(running_.begin(), running_.end(), [&](const std::unique_ptr<Running>& other) {
    return other.get() != &ended && !other->child && pool_[other->devices.front()].is_cuda();
  });
  if (in_use || !release_cached_memory_) return;
  try {
#if MULTIGPU_WITH_CUDA
    // On a GPU that has a context already, so that none is made on cuda:0.
    std::optional<c10::cuda::CUDAGuard> guard;
    if (real_devices_) guard.emplace(pool_[ended.devices.front()].device());
#endif
    release_cached_memory_();
    std::fill(holds_our_cache_.begin(), holds_our_cache_.end(), false);
  } catch (const std::exception& e) {
    warn(fmt::format("could not give the cached GPU memory of task {} back: {}", (*jobs_)[ended.job].task.name,
                     e.what()));
  }
}

inline void SchedulerCore::write_summary(const std::vector<Job>& jobs, bool final_write) {
  std::string json = "{\n  \"tasks\": [\n";
  std::string csv = "task,status,devices,cuda_visible_devices,start,seconds,attempts,exit_code,error,log\n";
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const TaskResult& r = jobs[i].result;
    std::string devices_json = "[";
    std::string devices_csv;
    for (std::size_t d = 0; d < r.devices.size(); ++d) {
      devices_json += (d == 0 ? "" : ", ") + json_string(r.devices[d]);
      devices_csv += (d == 0 ? "" : "; ") + r.devices[d];
    }
    devices_json += "]";
    json += fmt::format(
        "    {{\"task\": {}, \"status\": \"{}\", \"devices\": {}, \"cuda_visible_devices\": {}, \"start\": {}, "
        "\"seconds\": {:.3f}, \"attempts\": {}, \"exit_code\": {}, \"error\": {}, \"out_of_memory\": {}, \"log\": {}}}{}\n",
        json_string(r.name), to_string(r.status), devices_json, json_string(r.visible_devices),
        json_string(iso8601(r.start)), r.seconds, r.attempts, r.exit_code ? std::to_string(*r.exit_code) : "null",
        json_string(r.error), r.out_of_memory ? "true" : "false", json_string(r.log_path),
        i + 1 < jobs.size() ? "," : "");
    csv += fmt::format("{},{},{},{},{},{:.3f},{},{},{},{}\n", csv_field(r.name), to_string(r.status),
                       csv_field(devices_csv), csv_field(r.visible_devices), iso8601(r.start), r.seconds, r.attempts,
                       r.exit_code ? std::to_string(*r.exit_code) : "", csv_field(r.error), csv_field(r.log_path));
  }
  std::size_t counts[5] = {};
  for (const auto& job : jobs) ++counts[static_cast<int>(job.result.status)];
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  json += fmt::format(
      "  ],\n  \"finished\": {},\n  \"interrupted\": {},\n  \"seconds\": {:.3f},\n  \"counts\": {{\"done\": {}, "
      "\"failed\": {}, \"skipped\": {}, \"interrupted\": {}, \"pending\": {}}}\n}}\n",
      final_write ? "true" : "false", summary_.interrupted ? "true" : "false", elapsed,
      counts[static_cast<int>(TaskStatus::kDone)], counts[static_cast<int>(TaskStatus::kFailed)],
      counts[static_cast<int>(TaskStatus::kSkipped)], counts[static_cast<int>(TaskStatus::kInterrupted)],
      counts[static_cast<int>(TaskStatus::kPending)]);
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
    const double slots = static_cast<double>(pool_.size() * static_cast<std::size_t>(options_.max_per_device));
    eta = clock_text(done_seconds / static_cast<double>(done) * static_cast<double>(pending + running_.size()) / slots);
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

inline void SchedulerCore::request_stop(int signal) {
  stop_signal_ = signal;
  stop_ = true;
  wake_.notify();
}

inline RunSummary SchedulerCore::run(const std::vector<Task>& tasks) {
  validate(tasks);
  make_directories(options_.log_dir);
  const std::string base = options_.summary_path.empty() ? options_.log_dir + "/summary" : options_.summary_path;
  const auto slash = base.rfind('/');
  if (slash != std::string::npos && slash > 0) make_directories(base.substr(0, slash));
  // See Note [The log folder's lock]. Released when run() returns.
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
  for (const auto& task : tasks) {
    Job job;
    job.task = task;
    job.result.name = task.name;
    job.result.log_path = options_.log_dir + "/" + file_safe(task.name) + ".log";
    if (is_done(task)) {
      job.result.status = TaskStatus::kSkipped;
      job.queued = false;
    }
    jobs.push_back(std::move(job));
  }
  jobs_ = &jobs;
  stop_ = false;
  stop_signal_ = 0;
  std::fill(load_.begin(), load_.end(), 0);
  std::fill(holds_our_cache_.begin(), holds_our_cache_.end(), false);
  const SignalWatch signals(options_.handle_signals);
  run_start_ = std::chrono::steady_clock::now();
  last_status_ = {};
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
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    try {
      if (!stopping && (stop_.load() || signals.signal() != 0)) {
        stopping = true;
        if (signals.signal() != 0) stop_signal_ = signals.signal();
        stop_ = true;  // in-process tasks see it
        for (auto& r : running_) {
          if (r->child) r->child->kill_group(SIGTERM);
        }
        kill_deadline = now + options_.grace_period;
        log(LogLevel::kWarning, fmt::format("stopping: no new task starts; {} running task(s) get {} s to end",
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
      if (!stopping && !own_error) {
        std::optional<std::vector<DeviceInfo>> devices_now;
        for (auto& job : jobs) {
          if (!job.queued) continue;
          queue_empty = false;
          if (stop_.load() || signals.signal() != 0) break;  // asked to stop since the top of the loop
          if (std::none_of(load_.begin(), load_.end(), [&](int l) { return l < options_.max_per_device; })) break;
          if (!devices_now) devices_now = query_devices();
          if (auto placement = place(job, *devices_now)) {
            job.queued = false;
            job.waiting_since.reset();
            start(job, *placement);
            continue;
          }
          // Waiting. Only waiting on someone else's busy device counts towards the limit.
          std::string busy;
          for (std::size_t d = 0; d < pool_.size(); ++d) {
            if (load_[d] == 0 && !holds_our_cache_[d] && d < devices_now->size() && (*devices_now)[d].busy) {
              busy += fmt::format("{}{} ({} MiB in use)", busy.empty() ? "" : ", ", pool_[d].label(),
                                  (*devices_now)[d].used_bytes >> 20);
            }
          }
          if (busy.empty()) {
            job.waiting_since.reset();
            continue;
          }
          if (!warned_busy) {
            warn(fmt::format("tasks wait for busy devices: {}; busy means more than {} MiB in use by others", busy,
                             options_.memory_threshold_mib));
            warned_busy = true;
          }
          if (!job.waiting_since) job.waiting_since = now;
          if (options_.busy_wait_limit.count() > 0 && now - *job.waiting_since >= options_.busy_wait_limit) {
            job.queued = false;
            job.result.status = TaskStatus::kFailed;
            job.result.error = fmt::format("no device became free within {} s: {}",
                                           options_.busy_wait_limit.count() / 1000.0, busy);
            summary_dirty_ = true;
          }
        }
      }
      if (summary_dirty_) write_summary(jobs, false);
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
    if (running_.empty() && (stopping || own_error || queue_empty)) break;
    if (stop_.load() == stopping &&
        std::none_of(running_.begin(), running_.end(), [](const auto& r) { return r->finished.load(); })) {
      std::vector<int> children;
      for (const auto& r : running_) {
        if (r->child) children.push_back(r->child->exit_fd());
      }
      wake_.wait(children, options_.poll_interval);
    }
  }

  summary_.interrupted = stopping;
  if (own_error) {
    write_summary(jobs, true);
    jobs_ = nullptr;
    std::rethrow_exception(own_error);
  }
  summary_.stop_signal = stopping ? stop_signal_.load() : 0;
  summary_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  write_summary(jobs, true);
  print_status(jobs, true);
  for (const auto& job : jobs) summary_.tasks.push_back(job.result);
  jobs_ = nullptr;
  return summary_;
}

inline std::vector<PlannedTask> SchedulerCore::plan(const std::vector<Task>& tasks) const {
  validate(tasks);
  std::vector<PlannedTask> planned;
  std::vector<int> load(pool_.size(), 0);
  std::size_t next = 0;  // round-robin start, so equal-length waves spread evenly
  for (const auto& task : tasks) {
    PlannedTask p;
    p.name = task.name;
    p.skipped = is_done(task);
    if (!p.skipped) {
      if (std::count_if(load.begin(), load.end(), [&](int l) { return l < options_.max_per_device; }) < task.devices) {
        std::fill(load.begin(), load.end(), 0);  // the next wave
      }
      for (int taken = 0; taken < task.devices;) {
        const std::size_t d = next++ % pool_.size();
        if (load[d] >= options_.max_per_device) continue;
        ++load[d];
        ++taken;
        p.devices.push_back(pool_[d].is_cpu() ? std::string("cpu") : pool_[d].label());
        if (!pool_[d].is_cpu()) p.visible_devices += (p.visible_devices.empty() ? "" : ",") + pool_[d].visible_devices_token;
      }
      if (!task.command.empty()) {
        p.command = fill_placeholders(task.command, {{"gpu", p.visible_devices}, {"task", task.name}});
      }
    }
    planned.push_back(std::move(p));
  }
  return planned;
}

}  // namespace detail

template <class Runtime>
BasicScheduler<Runtime>::BasicScheduler(SchedulerOptions options, Runtime runtime)
    : manager_(std::make_shared<BasicDeviceManager<Runtime>>(std::move(runtime))),
      pool_(resolve_pool(*manager_, options)),
      core_(options, pool_, [manager = manager_, pool = pool_]() {
        manager->refresh();
        std::vector<DeviceInfo> now;
        const auto& visible = manager->devices();
        for (const auto& device : pool) {
          DeviceInfo current = device;
          current.busy = false;
          for (const auto& seen : visible) {
            if (device.is_cuda() && seen.index == device.index) current = seen;
          }
          now.push_back(current);
        }
        return now;
      }, detail::runtime_has_real_devices<Runtime>(),
      [manager = manager_] { detail::release_cached_memory(manager->runtime()); }) {}

template <class Runtime>
std::vector<DeviceInfo> BasicScheduler<Runtime>::resolve_pool(BasicDeviceManager<Runtime>& manager,
                                                              const SchedulerOptions& options) {
  // Busy devices belong in the pool: the scheduler waits for them, so the
  // spec is resolved with busy detection off, then turned back on.
  DeviceManagerOptions lenient;
  lenient.busy_threshold_mib = std::numeric_limits<std::int64_t>::max() >> 21;
  manager.set_options(lenient);
  std::vector<DeviceInfo> pool;
  if (options.devices == "auto" && !manager.devices().empty()) {
    pool = manager.devices();
  } else {
    pool = manager.select(options.devices).devices;  // "auto" without GPUs: the CPU, with a warning
  }
  DeviceManagerOptions strict;
  strict.busy_threshold_mib = options.memory_threshold_mib;
  manager.set_options(strict);
  return pool;
}

// --- task files -----------------------------------------------------------------

namespace detail {

inline bool is_identifier(std::string_view text) {
  if (text.empty() || !(std::isalpha(static_cast<unsigned char>(text[0])) || text[0] == '_')) return false;
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

/// The `{name}` placeholders of a text ({{ and }} are literal braces).
inline std::vector<std::string> placeholders_of(const std::string& text) {
  std::vector<std::string> names;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text.compare(i, 2, "{{") == 0 || text.compare(i, 2, "}}") == 0) {
      ++i;
      continue;
    }
    if (text[i] != '{') continue;
    const std::size_t close = text.find('}', i);
    if (close == std::string::npos) break;
    const std::string name = text.substr(i + 1, close - i - 1);
    if (is_identifier(name)) names.push_back(name);
    i = close;
  }
  return names;
}

/// Fills grid values and turns {{ }} into { }; {gpu} and {task} stay for run time.
inline std::string expand_line(const std::string& text, const std::map<std::string, std::string>& values) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text.compare(i, 2, "{{") == 0 || text.compare(i, 2, "}}") == 0) {
      out += text[i];
      ++i;
      continue;
    }
    if (text[i] == '{') {
      const std::size_t close = text.find('}', i);
      if (close != std::string::npos) {
        const auto found = values.find(text.substr(i + 1, close - i - 1));
        if (found != values.end()) {
          out += found->second;
          i = close;
          continue;
        }
      }
    }
    out += text[i];
  }
  return out;
}

}  // namespace detail

inline std::vector<Task> parse_tasks(std::string_view text, const std::string& source, int default_devices) {
  struct Grid {
    std::string name;
    std::vector<std::string> values;
  };
  std::vector<Grid> grids;
  std::vector<Task> tasks;
  std::vector<bool> named;
  std::map<std::string, std::size_t> name_lines;
  const auto fail = [&](std::size_t line, const std::string& problem) -> SchedulerError {
    return SchedulerError(fmt::format("{}:{}: {}", source, line, problem));
  };

  std::size_t line_number = 0;
  std::size_t start_line = 0;
  std::string pending;
  std::istringstream in{std::string(text)};
  for (std::string raw; std::getline(in, raw);) {
    ++line_number;
    if (const auto nul = raw.find('\0'); nul != std::string::npos) {
      throw fail(line_number, fmt::format("a NUL byte at column {}; a task file is text, and the shell would cut the "
                                          "command there",
                                          nul + 1));
    }
    if (!raw.empty() && raw.back() == '\r') raw.pop_back();
    if (pending.empty()) start_line = line_number;
    if (!pending.empty()) raw = std::string(detail::trim(raw));  // a continuation's indent is layout
    if (!raw.empty() && raw.back() == '\\') {                   // continued on the next line
      pending += std::string(detail::trim(raw.substr(0, raw.size() - 1))) + " ";
      continue;
    }
    std::string line = pending + raw;
    pending.clear();
    const std::string_view trimmed = detail::trim(line);
    if (trimmed.empty() || trimmed.front() == '#') continue;

    if (trimmed.substr(0, 5) == "grid " || trimmed.substr(0, 5) == "grid\t") {
      const std::string body(trimmed.substr(5));
      const auto equals = body.find('=');
      const std::string name(detail::trim(body.substr(0, equals == std::string::npos ? body.size() : equals)));
      if (equals == std::string::npos || !detail::is_identifier(name)) {
        throw fail(start_line, "a grid line reads `grid NAME = VALUE VALUE ...` (NAME: letters, digits, _)");
      }
      Grid grid{name, {}};
      std::istringstream values(body.substr(equals + 1));
      for (std::string value; values >> value;) grid.values.push_back(value);
      if (grid.values.empty()) throw fail(start_line, fmt::format("grid {} has no values", name));
      if (name == "gpu" || name == "task") {
        throw fail(start_line, fmt::format("{{{}}} is filled in at run time; choose another grid name", name));
      }
      grids.erase(std::remove_if(grids.begin(), grids.end(), [&](const Grid& g) { return g.name == name; }),
                  grids.end());
      grids.push_back(std::move(grid));
      continue;
    }

    std::string options_text;
    std::string command(trimmed);
    if (command.front() == '[') {
      const auto close = command.find(']');
      if (close == std::string::npos) throw fail(start_line, "an option list `[` has no closing `]`");
      options_text = command.substr(1, close - 1);
      command = std::string(detail::trim(std::string_view(command).substr(close + 1)));
    }
    if (command.empty()) throw fail(start_line, "the line has options but no command");
    std::string name_template;
    std::string done_template;
    int devices = default_devices;
    std::istringstream option_stream(options_text);
    for (std::string option; option_stream >> option;) {
      const auto equals = option.find('=');
      const std::string key = option.substr(0, equals);
      const std::string value = equals == std::string::npos ? "" : option.substr(equals + 1);
      if (equals == std::string::npos || value.empty()) {
        throw fail(start_line, fmt::format("option \"{}\" needs a value: name=..., done=..., gpus=N", option));
      }
      if (key == "name") {
        name_template = value;
      } else if (key == "done") {
        done_template = value;
      } else if (key == "gpus") {
        int parsed = 0;
        if (detail::parse_index(value, parsed) != detail::NumberStatus::kOk || parsed < 1) {
          throw fail(start_line, fmt::format("gpus={} is not a number of devices (1 or more)", value));
        }
        devices = parsed;
      } else {
        throw fail(start_line, fmt::format("unknown option \"{}\"; valid: name, done, gpus", key));
      }
    }

    // Which grid variables the line uses; unknown names are an error.
    std::vector<std::size_t> used;
    for (const std::string* part : {&name_template, &done_template, &command}) {
      for (const auto& placeholder : detail::placeholders_of(*part)) {
        if (placeholder == "gpu" || placeholder == "task") continue;
        std::size_t found = grids.size();
        for (std::size_t g = 0; g < grids.size(); ++g) {
          if (grids[g].name == placeholder) found = g;
        }
        if (found == grids.size()) {
          std::string known;
          for (const auto& g : grids) known += fmt::format("{{{}}}, ", g.name);
          throw fail(start_line, fmt::format("unknown placeholder {{{}}}; known: {}{{gpu}} and {{task}} (write {{{{ "
                                             "and }}}} for literal braces)",
                                             placeholder, known));
        }
        if (std::find(used.begin(), used.end(), found) == used.end()) used.push_back(found);
      }
    }
    std::sort(used.begin(), used.end());  // combinations in the order the grids were written

    std::vector<std::size_t> choice(used.size(), 0);
    while (true) {
      std::map<std::string, std::string> values;
      for (std::size_t u = 0; u < used.size(); ++u) values[grids[used[u]].name] = grids[used[u]].values[choice[u]];
      Task task;
      task.command = detail::expand_line(command, values);
      task.done_marker = detail::expand_line(done_template, values);
      task.devices = devices;
      task.name = detail::expand_line(name_template, values);
      if (!task.name.empty()) {
        const auto [where, inserted] = name_lines.emplace(task.name, start_line);
        if (!inserted) {
          throw fail(start_line, fmt::format("task name \"{}\" is already used on line {}; names must be unique (add "
                                             "grid variables to name=...)",
                                             task.name, where->second));
        }
      }
      named.push_back(!task.name.empty());
      tasks.push_back(std::move(task));
      bool advanced = false;  // next combination, the last grid fastest
      for (std::size_t u = used.size(); u-- > 0;) {
        if (++choice[u] < grids[used[u]].values.size()) {
          advanced = true;
          break;
        }
        choice[u] = 0;
      }
      if (!advanced) break;
    }
  }
  if (!pending.empty()) throw fail(start_line, "the last line ends with `\\` but nothing follows");

  const std::size_t width = std::to_string(tasks.size()).size() < 2 ? 2 : std::to_string(tasks.size()).size();
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (named[i]) continue;
    std::string name = fmt::format("task-{:0{}}", i + 1, width);
    if (name_lines.count(name) != 0) name += "-" + std::to_string(i + 1);
    tasks[i].name = name;
  }
  return tasks;
}

inline std::vector<Task> read_task_file(const std::string& path, int default_devices) {
  std::ifstream in(path);
  if (!in) throw SchedulerError(fmt::format("cannot read the task file {}: {}", path, std::strerror(errno)));
  std::stringstream text;
  text << in.rdbuf();
  return parse_tasks(text.str(), path, default_devices);
}

}  // namespace multigpu
