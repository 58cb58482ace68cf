#pragma once
/// @file
/// A task of the scheduler: what it runs (a shell command or a C++ callable),
/// what an in-process task gets (TaskContext), and what happened to it
/// (TaskStatus, TaskResult).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <c10/core/Device.h>

#include "multigpu/device.hpp"

namespace multigpu {

/// What an in-process task gets: its devices, its log, and a stop request.
class TaskContext {
 public:
  /// Made by the scheduler for each attempt of a callable task (tests make their own).
  TaskContext(std::string name, std::vector<DeviceInfo> devices, std::string log_path, int attempt,
              const std::atomic<bool>* stop)
      : name_(std::move(name)), devices_(std::move(devices)), log_path_(std::move(log_path)), attempt_(attempt),
        stop_(stop) {}
  /// The task's name.
  const std::string& name() const { return name_; }
  /// The devices given to the task (one unless the task asked for more).
  const std::vector<DeviceInfo>& devices() const { return devices_; }
  /// The first device, as LibTorch names it.
  c10::Device device() const { return devices_.front().device(); }
  /// The task's log file.
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
  /// value given to it, `{task}` its name, each quoted for the shell.
  std::string command;
  /// Or: a callable run in this process.
  std::function<void(TaskContext&)> function;
  /// If this file or folder exists, the task counts as done and is skipped
  /// (unless forced). Written by the task itself when it has finished, so an
  /// interrupted task runs again on the next run.
  std::string done_marker;
  /// Devices the task needs at once.
  int devices = 1;
  /// Names of tasks that must be done (or skipped) before this one starts;
  /// when one of them fails, this task is not run (see Note [Dependencies]
  /// in scheduler/dependencies.hpp).
  std::vector<std::string> after;
  /// The most GPU memory (MiB) the task uses on one of its GPUs, as declared
  /// (`[mem=12G]`); -1: not declared. Used to pack tasks by memory
  /// (SchedulerOptions::pack_by_memory).
  std::int64_t memory_mib = -1;

  /// A shell command run as `/bin/sh -c` in its own process group, with CUDA_VISIBLE_DEVICES set to its GPUs; skipped when `done_marker` exists.
  static Task shell(std::string name, std::string command, std::string done_marker = {}, int devices = 1) {
    Task task;
    task.name = std::move(name);
    task.command = std::move(command);
    task.done_marker = std::move(done_marker);
    task.devices = devices;
    return task;
  }
  /// A C++ function run in this process on a thread of its own, with its device current; skipped when `done_marker` exists.
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
  /// The task's name.
  std::string name;
  /// How it ended.
  TaskStatus status = TaskStatus::kPending;
  std::vector<std::string> devices;  ///< The devices of its last attempt ("cuda:1 (physical 5, ...)").
  std::string visible_devices;       ///< The CUDA_VISIBLE_DEVICES it got (commands).
  std::chrono::system_clock::time_point start{};  ///< Start of its last attempt.
  double seconds = 0;                             ///< Duration of its last attempt.
  /// Attempts made (0: not run).
  int attempts = 0;
  std::optional<int> exit_code;  ///< Commands that exited.
  std::string error;             ///< Why it failed ("exit code 2", "killed by SIGSEGV", an exception's message).
  /// Some attempt failed looking like running out of GPU memory (each
  /// attempt's whole output is searched).
  bool out_of_memory = false;
  /// Its log file.
  std::string log_path;
  /// The most GPU memory its processes had on one of its GPUs, over every
  /// attempt (NVML, over the task's process tree); -1 when not measured (a
  /// CPU task, an in-process task, no NVML). See Note [What a task uses on its
  /// GPUs] in scheduler/gpu_memory.hpp.
  std::int64_t peak_gpu_bytes = -1;
  /// GPUs held x seconds, over every attempt.
  double gpu_seconds = 0;
  /// How its memory was judged and what an out-of-memory retry did ("" when
  /// there is nothing to say), e.g. "attempt 1 ran out of GPU memory on cuda:0
  /// with 9.5 GiB free; attempt 2 on cuda:1 with 22.0 GiB free".
  std::string memory_note;
};

/// A task as a dry run would start it.
struct PlannedTask {
  /// The task's name.
  std::string name;
  bool skipped = false;            ///< Its done marker exists (and its command made it).
  std::string note;                ///< Why it runs although its marker exists ("" otherwise).
  /// The devices it would get.
  std::vector<std::string> devices;
  /// The CUDA_VISIBLE_DEVICES it would get.
  std::string visible_devices;
  std::string command;             ///< With {gpu} and {task} filled in ("" for callables).
  std::vector<std::string> after;  ///< The tasks it starts after.
  std::int64_t memory_mib = -1;    ///< Its declared size (Task::memory_mib).
};

namespace detail {

/// Replaces `{name}` for each name in `values`; other braces stay as they
/// are, except that with `unescape` `{{` and `}}` become `{` and `}`.
inline std::string fill_placeholders(const std::string& text, const std::map<std::string, std::string>& values,
                                     bool unescape = false) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (unescape && (text.compare(i, 2, "{{") == 0 || text.compare(i, 2, "}}") == 0)) {
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

// Note [What the runner puts into a command is quoted]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A task's command runs under /bin/sh -c, and {task} and {gpu} are filled in
// at run time with text that is data, not shell code: a name such as
// "lr=0.1;bs=32" pasted as it is would run "bs=32" as a second command. So
// each goes in written so that the shell reads back exactly the value, as
// GNU parallel inserts its arguments, where it stands in the command:
// - outside quotes, as one word: a value of letters, digits and
//   @%+=:,./_- only as it is (the usual names and "0,1" read as before),
//   anything else in single quotes, a single quote inside as '\'';
// - inside "...", with a backslash before $ ` " and \;
// - inside '...', with a single quote as '\''.
// So `--name {task}`, "name={task}" and 'name={task}' all give the name.
// Where the quotes are is read simply: quotes, backslashes, and command
// substitutions, $(...) and `...`, inside which the quoting starts afresh
// (so "$(basename {task})" gets the name as one word: escaped for "..." it
// would be shell code there); inside `...` the backslashes that the shell
// takes off first are doubled. Not read: a `...` nested as \`...\`, a case
// pattern's ')' inside $(...), bash's $'...'. There is no unquoted form:
// for the name as shell text, say so: eval "... $MULTIGPU_TASK". Grid
// values ({NAME} of a grid line) are the task file's own text and stay as
// written, like the rest of the line. "${task}" is the shell's own
// parameter expansion and is left to the shell: filled in there, a name
// starting with "(" would make "$(" and run as a command.

/// Where a place in a shell command is: outside quotes, inside '...', or inside "...".
enum class ShellQuoting { kNone, kSingle, kDouble };

/// `text` written so that the shell reads it back unchanged at a place
/// quoted as `quoting` says; outside quotes as one word (see Note [What the
/// runner puts into a command is quoted]).
inline std::string shell_quoted(std::string_view text, ShellQuoting quoting) {
  std::string out;
  if (quoting == ShellQuoting::kDouble) {
    for (const char c : text) {
      if (c == '$' || c == '`' || c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out;
  }
  const auto plain = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::string_view("@%+=:,./_-").find(c) != std::string_view::npos;
  };
  if (quoting == ShellQuoting::kNone && !text.empty() && std::all_of(text.begin(), text.end(), plain)) {
    return std::string(text);
  }
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoting == ShellQuoting::kSingle ? out : "'" + out + "'";
}

/// A task's command with {gpu} (its CUDA_VISIBLE_DEVICES value) and {task}
/// (its name) filled in, each read back by the shell as it is (see Note
/// [What the runner puts into a command is quoted]).
inline std::string command_for(const std::string& command, const std::string& visible_devices,
                               const std::string& name) {
  const std::map<std::string, std::string> values{{"gpu", visible_devices}, {"task", name}};
  // A command substitution open at a place: the quoting it stands in, and
  // for $(...) how many '(' of its own are open.
  struct Substitution {
    ShellQuoting around;
    bool backquoted;
    int parentheses;
  };
  std::vector<Substitution> substitutions;
  const auto in_double_backquotes = [&substitutions] {
    const auto s = std::find_if(substitutions.rbegin(), substitutions.rend(),
                                [](const Substitution& each) { return each.backquoted; });
    return s != substitutions.rend() && s->around == ShellQuoting::kDouble;
  };
  std::string out;
  ShellQuoting quoting = ShellQuoting::kNone;
  bool after_dollar = false;  // the last character read was a $ the shell expands
  for (std::size_t i = 0; i < command.size(); ++i) {
    const char c = command[i];
    const bool shell_braces = std::exchange(after_dollar, false);  // ${task} is the shell's, not ours
    if (c == '{' && !shell_braces) {
      const std::size_t close = command.find('}', i);
      const auto found = close == std::string::npos ? values.end() : values.find(command.substr(i + 1, close - i - 1));
      if (found != values.end()) {
        std::string text = shell_quoted(found->second, quoting);
        for (auto s = substitutions.rbegin(); s != substitutions.rend(); ++s) {
          if (!s->backquoted) continue;
          std::string escaped;  // the shell first reads \\ \` \$ (and \" in "...") inside `...` as \ ` $ "
          for (const char t : text) {
            if (t == '\\' || t == '`' || t == '$' || (t == '"' && s->around == ShellQuoting::kDouble)) escaped += '\\';
            escaped += t;
          }
          text = std::move(escaped);
        }
        out += text;
        i = close;
        continue;
      }
    }
    out += c;
    after_dollar = c == '$' && quoting != ShellQuoting::kSingle;
    if (quoting == ShellQuoting::kSingle) {
      if (c == '\'') quoting = ShellQuoting::kNone;
    } else if (c == '\\' && i + 1 < command.size()) {
      const bool quote = command[i + 1] == '"' && in_double_backquotes();  // \" inside "`...`" is a quote there
      out += command[++i];                                                  // else an escaped character: no quote
      if (quote) quoting = quoting == ShellQuoting::kDouble ? ShellQuoting::kNone : ShellQuoting::kDouble;
    } else if (c == '$' && i + 1 < command.size() && command[i + 1] == '(') {
      out += command[++i];
      substitutions.push_back({quoting, false, 0});
      quoting = ShellQuoting::kNone;
    } else if (c == '`') {
      if (quoting == ShellQuoting::kNone && !substitutions.empty() && substitutions.back().backquoted) {
        quoting = substitutions.back().around;
        substitutions.pop_back();
      } else {
        substitutions.push_back({quoting, true, 0});
        quoting = ShellQuoting::kNone;
      }
    } else if ((c == '(' || c == ')') && quoting == ShellQuoting::kNone && !substitutions.empty() &&
               !substitutions.back().backquoted) {
      auto& substitution = substitutions.back();
      if (c == '(') {
        ++substitution.parentheses;
      } else if (substitution.parentheses > 0) {
        --substitution.parentheses;
      } else {
        quoting = substitution.around;
        substitutions.pop_back();
      }
    } else if (c == '"') {
      quoting = quoting == ShellQuoting::kDouble ? ShellQuoting::kNone : ShellQuoting::kDouble;
    } else if (c == '\'' && quoting == ShellQuoting::kNone) {
      quoting = ShellQuoting::kSingle;
    }
  }
  return out;
}

}  // namespace detail
}  // namespace multigpu
