#pragma once
// Child processes for the scheduler's command tasks: `/bin/sh -c COMMAND`
// under a small supervisor process, in a process group of its own (so
// stopping it stops everything it started), with a chosen environment, stdin
// from /dev/null and stdout and stderr appended to a log file.
// See Note [The task supervisor].

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/error.hpp"
#include "multigpu/scheduler/process_tree.hpp"

extern char** environ;

namespace multigpu {
namespace detail {

// Note [The task supervisor]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// A command task is not started as `/bin/sh -c` directly but under a
// supervisor: a forked copy of this process that runs only async-signal-safe
// system calls, leads the task's process group and starts the shell in it.
// It exists for three promises that the shell alone cannot keep:
//
// - The grace period is the task's. Debian's /bin/sh (dash) does not exec a
//   single command: on SIGTERM the shell dies at once while the program it
//   started may still be saving. The supervisor is a child subreaper: what
//   the shell started is re-parented to it, and after a stop request it waits
//   until every descendant is gone before it ends (the scheduler's SIGKILL at
//   the end of the grace period still ends everything). Being the subreaper
//   also keeps every process the task started below it, in any session:
//   see Note [Every process a task started] in scheduler/process_tree.hpp.
// - Children die with the scheduler. The supervisor gets a parent-death
//   signal (PR_SET_PDEATHSIG, sent when the thread that started it ends, so
//   the scheduler starts every child from run()'s thread); it then sends
//   SIGTERM to the task's group, waits up to the grace period, and SIGKILLs
//   the group. The shell's own descendants cannot get a parent-death signal
//   of their own (it is cleared on fork), which is why one process watches.
//   The signal is SIGUSR1, which a task may also send to its own process
//   group (`kill -USR1 0`): it counts as the scheduler's death only when the
//   supervisor's parent is no longer the scheduler (the kernel reparents a
//   child before it sends the parent-death signal), or when the signal comes
//   from the scheduler's pid (the kernel sends it so; the scheduler itself
//   never sends SIGUSR1, a task's shell has another pid).
// - A failure to start is reported: the supervisor writes the
//   errno of a failed open, posix_spawn or execve (a command over the kernel's
//   128 KiB argument limit: E2BIG) into a close-on-exec pipe, so the error
//   reaches the scheduler as an exception about that one task.
//
// Without a stop request the supervisor ends as soon as the shell ends, as
// the shell would, after it has SIGKILLed what the shell left running
// (background jobs, in its group or not) and seen it gone. The supervisor ends with
// the shell's status (the same exit code, or the same signal), so the
// scheduler sees what the shell did. It closes every file descriptor it does
// not need right after the fork, so that it holds nothing of the scheduler's
// (sockets, a GPU driver's files).
//
// The supervisor installs no signal handler. It blocks the signals it acts
// on and takes them with sigwaitinfo between reaping its children, so the
// order of events is the kernel's: the scheduler sends a stop to the
// supervisor itself before its group, so it is pending before the shell it
// killed can be reaped, and the supervisor takes every
// pending signal before it decides that the shell ended on its own. (With
// handlers, a sanitizer's runtime, which defers handlers to a safe point,
// made that decision before the handler had run, and killed a task that was
// still saving.)

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

namespace supervisor {

/// The signal the supervisor gets when the scheduler's thread ends.
constexpr int kParentDeathSignal = SIGUSR1;
/// Where the supervisor keeps the error pipe and the descriptor it keeps
/// open for the scheduler (every other descriptor above 2 is closed).
constexpr int kErrorFd = 3;
constexpr int kKeptFd = 4;
/// How long, in seconds, the supervisor waits for the processes it SIGKILLed
/// before it ends anyway (a process stuck in the kernel does not end).
constexpr unsigned kKillWait = 5;

/// The signals the supervisor takes synchronously (blocked, then taken with
/// sigwaitinfo, or sigtimedwait for what is already pending). It installs no handler: nothing runs at an arbitrary point,
/// and a sanitizer's deferred handlers cannot reorder "the shell ended" and
/// "a stop was asked for".
inline sigset_t watched_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int signal : {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGALRM, kParentDeathSignal}) sigaddset(&set, signal);
  return set;
}

inline void set_default_action(int signal) {
  struct sigaction action {};
  action.sa_handler = SIG_DFL;
  sigemptyset(&action.sa_mask);
  ::sigaction(signal, &action, nullptr);
}

/// A report on the error pipe: the shell's pid, or an errno. One write of
/// 8 bytes, which a pipe keeps whole.
struct Report {
  int kind;  // kShellPid or kErrno
  int value;
};
constexpr int kShellPid = 1;
constexpr int kErrno = 2;

inline void report(int kind, int value) {
  const Report message{kind, value};
  const ssize_t written = ::write(kErrorFd, &message, sizeof(message));
  (void)written;
}

/// Ends the supervisor with `status` through the exit_group system call
/// itself: _exit's wrappers (a sanitizer's finaliser, which reports and
/// changes the exit code in a fork of a multithreaded process) must not run
/// in this copy of the scheduler.
[[noreturn]] inline void leave(int status) {
  ::syscall(SYS_exit_group, status);
  __builtin_unreachable();
}

/// Reports `error` (an errno) to the scheduler and ends. Async-signal-safe.
[[noreturn]] inline void fail(int error) {
  report(kErrno, error);
  leave(127);
}

/// Closes every descriptor from `first` on. Async-signal-safe.
inline void close_from(int first) {
#ifdef SYS_close_range
  if (::syscall(SYS_close_range, static_cast<unsigned>(first), ~0U, 0U) == 0) return;
#endif
  struct rlimit limit {};
  const rlim_t last = ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                          ? limit.rlim_cur
                          : 65536;
  for (rlim_t fd = static_cast<rlim_t>(first); fd < last; ++fd) ::close(static_cast<int>(fd));
}

/// Ends with `status` as the shell ended: the same exit code or signal.
[[noreturn]] inline void end_like(int status) {
  if (WIFSIGNALED(status)) {
    const int signal = WTERMSIG(status);
    struct rlimit no_core {};
    ::setrlimit(RLIMIT_CORE, &no_core);  // a core of this copy of the scheduler helps nobody
    set_default_action(signal);
    sigset_t just;
    sigemptyset(&just);
    sigaddset(&just, signal);
    ::sigprocmask(SIG_UNBLOCK, &just, nullptr);
    ::kill(::getpid(), signal);
    leave(128 + signal);
  }
  leave(WIFEXITED(status) ? WEXITSTATUS(status) : 127);
}

/// Starts the shell with posix_spawn, with every signal unblocked (a
/// blocked signal would stay blocked across execve). glibc's posix_spawn
/// starts a child that shares the supervisor's memory until its execve
/// (CLONE_VM|CLONE_VFORK), so that the supervisor's page tables (a copy of
/// the scheduler's: LibTorch alone maps 100 MB) are not copied for a process
/// that replaces them at once: a fork here copied them twice per task, half
/// of a short task's cost. It takes nothing but system calls in the child and
/// reports the execve's error itself, and the sanitizers know it (a raw clone
/// would run instrumented code on a stack they do not know, sharing memory).
/// Returns the shell's pid, or ends the supervisor through fail() with the
/// error.
inline pid_t start_shell(char* const* argv, char* const* envp) {
  posix_spawnattr_t attributes;
  int error = ::posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  if (error == 0) error = ::posix_spawnattr_setsigmask(&attributes, &none);
  if (error == 0) error = ::posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
  pid_t shell = -1;
  if (error == 0) error = ::posix_spawn(&shell, "/bin/sh", nullptr, &attributes, argv, envp);
  if (error != 0) fail(error);
  return shell;
}

/// The supervisor's life, in the forked child. Only async-signal-safe calls:
/// everything it needs was prepared before the fork.
[[noreturn]] inline void run(pid_t scheduler, int error_fd, int keep_fd, const char* log_path, char* const* argv,
                             char* const* envp, unsigned grace) {
  ::setpgid(0, 0);
  const sigset_t watched = watched_signals();
  ::sigprocmask(SIG_SETMASK, &watched, nullptr);  // every other signal: unblocked
  // Default actions: a blocked signal that is ignored is discarded, not
  // pending (and an ignored SIGCHLD reaps children unseen); the shell starts
  // with these too.
  for (int signal : {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGALRM, kParentDeathSignal, SIGPIPE}) {
    set_default_action(signal);
  }
  ::prctl(PR_SET_PDEATHSIG, kParentDeathSignal);
  if (::getppid() != scheduler) ::kill(::getpid(), kParentDeathSignal);  // it ended before the line above
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);

  // Out of the way first (either may be 3 or 4), then into place.
  const int error_copy = ::fcntl(error_fd, F_DUPFD_CLOEXEC, 10);
  const int keep_copy = keep_fd >= 0 ? ::fcntl(keep_fd, F_DUPFD_CLOEXEC, 10) : -1;
  if (error_copy < 0 || ::dup2(error_copy, kErrorFd) < 0) leave(127);
  ::fcntl(kErrorFd, F_SETFD, FD_CLOEXEC);
  if (keep_fd >= 0) {
    if (keep_copy < 0 || ::dup2(keep_copy, kKeptFd) < 0) fail(errno);
    ::fcntl(kKeptFd, F_SETFD, FD_CLOEXEC);  // not the shell's
  }
  const int in = ::open("/dev/null", O_RDONLY);
  if (in < 0) fail(errno);
  if (in != 0 && (::dup2(in, 0) < 0 || ::close(in) != 0)) fail(errno);
  const int log = ::open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW, 0644);
  if (log < 0) fail(errno);
  if (::dup2(log, 1) < 0 || ::dup2(log, 2) < 0) fail(errno);
  if (log > 2) ::close(log);
  close_from(keep_fd >= 0 ? kKeptFd + 1 : kErrorFd + 1);

  const pid_t shell = start_shell(argv, envp);
  report(kShellPid, static_cast<int>(shell));
  ::close(kErrorFd);

  int shell_status = 0;
  bool shell_ended = false;
  bool stopping = false;
  bool ending = false;   // every descendant has been sent SIGKILL; the supervisor ends when they are gone
  bool give_up = false;  // they did not go (a process stuck in the kernel): end anyway
  const pid_t self = ::getpid();
  const struct timespec no_wait {};
  // See Note [Every process a task started].
  auto signal_descendants = [&](int signal, bool other_groups_only) {
    for_each_descendant(self, [&](const ProcessEntry& entry) {
      if (entry.zombie || (other_groups_only && entry.group == self)) return;
      ::kill(static_cast<pid_t>(entry.pid), signal);
    });
  };
  auto end_all = [&] {
    if (!ending) ::alarm(kKillWait);
    ending = true;
    signal_descendants(SIGKILL, false);
  };
  auto take = [&](int signal, const siginfo_t& info) {
    if (signal == SIGTERM || signal == SIGINT || signal == SIGHUP) {
      stopping = true;
      // The group has it already (from the scheduler, or from this process
      // below); the others (setsid, torchrun's workers) have it from here.
      if (!ending) signal_descendants(signal, true);
    }
    // The scheduler is gone: SIGTERM to the group (this process takes its own
    // next), SIGKILL when the grace period has passed. Only then: a task may
    // send SIGUSR1 to its own group, this process included. The kernel sends
    // the parent-death signal as from the scheduler (SI_USER, its pid) after
    // it has reparented this process; a thread of the scheduler that ends
    // leaves it the scheduler's child, hence both tests.
    const bool from_scheduler = info.si_code == SI_USER && info.si_pid == scheduler;
    if (signal == kParentDeathSignal && !ending && (::getppid() != scheduler || from_scheduler)) {
      ::kill(0, SIGTERM);
      ::alarm(grace == 0 ? 1 : grace);
    }
    if (signal == SIGALRM) {
      if (ending) {
        give_up = true;
      } else {
        end_all();
      }
    }
  };
  while (true) {
    bool all_gone = false;
    while (true) {  // reap whatever has ended
      int status = 0;
      const pid_t ended = ::waitpid(-1, &status, WNOHANG);
      if (ended == shell) {
        shell_ended = true;
        shell_status = status;
      } else if (ended < 0 && errno == ECHILD) {
        all_gone = true;
        break;
      } else if (ended <= 0) {
        break;
      }
    }
    // A stop sent to the group (killpg) is pending here before the shell it
    // ended can have been reaped: take what is pending, then decide.
    bool child_ended = false;
    siginfo_t info{};
    for (int signal; (signal = ::sigtimedwait(&watched, &info, &no_wait)) > 0;) {
      child_ended = child_ended || signal == SIGCHLD;
      take(signal, info);
    }
    if (all_gone) break;  // every descendant is gone: with a subreaper, no child means none below
    if (give_up) break;
    if (shell_ended && !stopping && !ending) end_all();  // as the shell would, without what it left; see the Note
    if (child_ended) {
      if (ending) signal_descendants(SIGKILL, false);  // a child forked while the last scan ran
      continue;                                       // it may have ended after the reaping above
    }
    const int signal = ::sigwaitinfo(&watched, &info);
    if (signal > 0) take(signal, info);
  }
  if (!shell_ended) leave(127);
  end_like(shell_status);
}

}  // namespace supervisor

/// A running `/bin/sh -c` command under its supervisor, in its own process
/// group. See Note [The task supervisor].
class ChildProcess {
 public:
  /// Starts `command`; stdout and stderr are appended to `log_path` (which
  /// must not be a symbolic link). `orphan_grace`: how long the command gets
  /// to end after SIGTERM when this process dies. `keep_fd`: a descriptor
  /// the supervisor keeps open until the command's processes are gone (the
  /// log folder's lock), or -1. Throws SchedulerError naming the command
  /// when it cannot be started.
  ChildProcess(const std::string& command, const std::vector<std::string>& environment, const std::string& log_path,
               std::chrono::seconds orphan_grace = std::chrono::seconds(10), int keep_fd = -1) {
    // Everything the child needs is made here: after fork it may not allocate.
    std::vector<char*> argv = {const_cast<char*>("sh"), const_cast<char*>("-c"), const_cast<char*>(command.c_str()),
                               nullptr};
    std::vector<char*> envp;
    for (const auto& item : environment) envp.push_back(const_cast<char*>(item.c_str()));
    envp.push_back(nullptr);
    int errors[2];
    if (::pipe2(errors, O_CLOEXEC) != 0) {
      throw SchedulerError(fmt::format("cannot start \"{}\": pipe failed: {}", shorten(command), std::strerror(errno)));
    }
    const pid_t scheduler = ::getpid();
    const auto grace = static_cast<unsigned>(std::max<long long>(0, orphan_grace.count()));
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(errors[0]);
      supervisor::run(scheduler, errors[1], keep_fd, log_path.c_str(), argv.data(), envp.data(), grace);
    }
    const int fork_error = errno;
    ::close(errors[1]);
    if (pid_ < 0) {
      ::close(errors[0]);
      throw SchedulerError(fmt::format("cannot start \"{}\": fork failed: {}", shorten(command),
                                       std::strerror(fork_error)));
    }
    // Blocks until the shell has been exec'd (the pipe closes) or failed.
    int error = 0;
    while (true) {
      supervisor::Report message{};
      const ssize_t got = ::read(errors[0], &message, sizeof(message));
      if (got < 0 && errno == EINTR) continue;
      if (got != static_cast<ssize_t>(sizeof(message))) break;
      if (message.kind == supervisor::kShellPid) command_pid_ = static_cast<pid_t>(message.value);
      if (message.kind == supervisor::kErrno) error = message.value;
    }
    ::close(errors[0]);
    if (error != 0) {
      wait_blocking();
      throw SchedulerError(start_error(command, log_path, error));
    }
#ifdef SYS_pidfd_open
    exit_fd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0U));  // -1 before Linux 5.3: callers poll
#endif
  }

  ~ChildProcess() {
    if (!exit_) {  // never leave a child behind, or a zombie
      kill_group(SIGKILL);
      wait_blocking();
    }
    if (exit_fd_ >= 0) ::close(exit_fd_);
  }

  /// A descriptor that becomes readable when the child ends (a pidfd), or -1.
  int exit_fd() const { return exit_fd_; }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  /// The supervisor's process id, which is also the task's process group.
  pid_t pid() const { return pid_; }
  /// The process id of `/bin/sh -c COMMAND` (of the program, when the
  /// command begins with `exec`).
  pid_t command_pid() const { return command_pid_; }

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

  /// Sends `signal` to the child's whole process group; SIGKILL goes to
  /// every process below the supervisor first, in any session (see Note
  /// [Every process a task started]).
  void kill_group(int signal) {
    if (exit_) return;
    if (signal == SIGKILL) kill_descendants(pid_);
    // The supervisor first, then its group: so that the supervisor has the
    // signal pending before the shell it outlives can end (see the Note).
    ::kill(pid_, signal);
    ::killpg(pid_, signal);
  }

 private:
  static std::string shorten(const std::string& command) {
    return command.size() <= 200 ? command : command.substr(0, 200) + fmt::format("... ({} bytes)", command.size());
  }

  static std::string start_error(const std::string& command, const std::string& log_path, int error) {
    if (error == E2BIG) {
      return fmt::format("cannot start \"{}\": the command is {} bytes, over the kernel's limit for one argument "
                         "(128 KiB) or for all arguments and the environment together: {}",
                         shorten(command), command.size(), std::strerror(error));
    }
    if (error == ELOOP) {
      return fmt::format("cannot open the log {}: it is a symbolic link, and logs are never written through one",
                         log_path);
    }
    return fmt::format("cannot start \"{}\" with its output to {}: {}", shorten(command), log_path,
                       std::strerror(error));
  }

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
  pid_t command_pid_ = -1;
  int exit_fd_ = -1;
  std::optional<ProcessExit> exit_;
};

}  // namespace detail
}  // namespace multigpu
