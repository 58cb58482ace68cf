#pragma once
// Child processes for the scheduler's command tasks: `/bin/sh -c COMMAND`
// in a process group of its own (so stopping it stops everything it
// started), with a chosen environment, stdin from /dev/null and stdout and
// stderr appended to a log file. posix_spawn rather than fork: the parent is
// multi-threaded, and posix_spawn runs nothing of ours in the child.

#include <cerrno>
#include <csignal>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/error.hpp"

extern char** environ;

namespace multigpu {
namespace detail {

/// How a child process ended.
struct ProcessExit {
  std::optional<int> exit_code;  ///< Set when it exited.
  int signal = 0;                ///< The signal that killed it (0 when it exited).
  /// "exit code 3", "killed by SIGSEGV (signal 11)".
  std::string describe() const {
    if (exit_code) return fmt::format("exit code {}", *exit_code);
    const char* name = sigabbrev_np(signal);
    return fmt::format("killed by SIG{} (signal {})", name != nullptr ? name : "?", signal);
  }
  bool success() const { return exit_code && *exit_code == 0; }
};

/// The current environment with some variables replaced or added.
inline std::vector<std::string> environment_with(const std::vector<std::pair<std::string, std::string>>& overrides) {
  std::vector<std::string> env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string item(*entry);
    bool replaced = false;
    for (const auto& [name, value] : overrides) {
      (void)value;
      replaced = replaced || item.compare(0, name.size() + 1, name + "=") == 0;
    }
    if (!replaced) env.push_back(item);
  }
  for (const auto& [name, value] : overrides) env.push_back(name + "=" + value);
  return env;
}

/// A running `/bin/sh -c` child in its own process group.
class ChildProcess {
 public:
  /// Starts `command`; stdout and stderr are appended to `log_path`.
  ChildProcess(const std::string& command, const std::vector<std::string>& environment, const std::string& log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attributes);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    posix_spawnattr_setpgroup(&attributes, 0);  // a group of its own, led by the child
    sigset_t defaults;
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGPIPE);
    posix_spawnattr_setsigdefault(&attributes, &defaults);  // our handlers are not the child's
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

    std::vector<char*> argv = {const_cast<char*>("sh"), const_cast<char*>("-c"), const_cast<char*>(command.c_str()),
                               nullptr};
    std::vector<char*> envp;
    for (const auto& item : environment) envp.push_back(const_cast<char*>(item.c_str()));
    envp.push_back(nullptr);
    const int status = posix_spawn(&pid_, "/bin/sh", &actions, &attributes, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    if (status != 0) {
      throw SchedulerError(fmt::format("cannot start /bin/sh for \"{}\" (log {}): {}", command, log_path,
                                       std::strerror(status)));
    }
  }

  ~ChildProcess() {
    if (!exit_) {  // never leave a child behind, or a zombie
      kill_group(SIGKILL);
      wait_blocking();
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }

  /// The exit, if the child has ended (does not block).
  const std::optional<ProcessExit>& poll() {
    if (!exit_) reap(WNOHANG);
    return exit_;
  }

  /// Waits for the child to end.
  const ProcessExit& wait_blocking() {
    while (!exit_) reap(0);
    return *exit_;
  }

  /// Sends `signal` to the child's whole process group.
  void kill_group(int signal) {
    if (!exit_) ::killpg(pid_, signal);
  }

 private:
  void reap(int flags) {
    // Look without reaping first: while the child is a zombie its process
    // group cannot be reused, so what the shell left running (background
    // jobs) can be ended safely before the zombie goes.
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOWAIT | flags) != 0) {
      if (errno != EINTR) {
        exit_ = ProcessExit{};
        exit_->exit_code = -1;
      }
      return;
    }
    if (info.si_pid != pid_) return;  // still running (WNOHANG)
    ::killpg(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    ProcessExit exit;
    if (WIFEXITED(status)) {
      exit.exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
      exit.signal = WTERMSIG(status);
    }
    exit_ = exit;
  }

  pid_t pid_ = -1;
  std::optional<ProcessExit> exit_;
};

}  // namespace detail
}  // namespace multigpu
