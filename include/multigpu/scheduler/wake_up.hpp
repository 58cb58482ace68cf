#pragma once
/// @file
/// What the scheduler's loop waits on: its tasks' ends, stop requests and
/// signals.

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <vector>

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

namespace multigpu {
namespace detail {

// Note [Waking the scheduler]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The scheduler's loop sleeps until something happens: a command task's
// process ends (its pidfd becomes readable), an in-process task ends or a
// stop is requested (an eventfd is written), or `poll_interval` passes (busy
// devices, signals, the status line). So a short task's slot is given to
// the next task at once, not at the next poll.

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

/// Installs SIGINT/SIGTERM/SIGHUP handlers that only record the signal (SIGINT
/// and SIGHUP not where they were inherited ignored), and puts the previous
/// ones back when destroyed. The records are lock-free atomics,
/// not `volatile sig_atomic_t`: a signal sent to the process runs its handler
/// on any thread, so two signals in quick succession can run two handlers at
/// once.
class SignalWatch {
 public:
  explicit SignalWatch(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    interrupts_count().store(0);
    hard().store(0);
    struct sigaction action {};
    action.sa_handler = [](int signal) {
      if (signal == SIGINT) interrupts_count().fetch_add(1);
      int none = 0;
      if (signal != SIGINT) hard().compare_exchange_strong(none, signal);  // the first SIGTERM or SIGHUP stays
    };
    sigemptyset(&action.sa_mask);
    // An inherited "ignore" stays: `nohup multigpu-run ... &` must survive the
    // ssh connection that drops (SIGHUP), and a run started in the background
    // of a non-interactive shell (`multigpu-run ... &` in a script, which sets
    // SIGINT to ignore) must survive the Ctrl-C meant for the foreground.
    // SIGTERM is always a stop request.
    install_unless_ignored(SIGINT, action, previous_int_);
    ::sigaction(SIGTERM, &action, &previous_term_);
    install_unless_ignored(SIGHUP, action, previous_hup_);  // a closed terminal (ssh dropped) stops like SIGTERM
  }
  ~SignalWatch() {
    if (!enabled_) return;
    ::sigaction(SIGINT, &previous_int_, nullptr);
    ::sigaction(SIGTERM, &previous_term_, nullptr);
    ::sigaction(SIGHUP, &previous_hup_, nullptr);
  }
  SignalWatch(const SignalWatch&) = delete;
  SignalWatch& operator=(const SignalWatch&) = delete;
  /// Whether any of the three signals was received since installation.
  bool any() const { return interrupts() > 0 || hard_signal() != 0; }
  /// How many SIGINTs (Ctrl-C) were received since installation.
  int interrupts() const { return enabled_ ? interrupts_count().load() : 0; }
  /// The first SIGTERM or SIGHUP received since installation (0 if none).
  int hard_signal() const { return enabled_ ? hard().load() : 0; }

 private:
  static void install_unless_ignored(int signal, const struct sigaction& action, struct sigaction& previous) {
    ::sigaction(signal, nullptr, &previous);
    if (previous.sa_handler != SIG_IGN) ::sigaction(signal, &action, nullptr);
  }
  static_assert(std::atomic<int>::is_always_lock_free, "a signal handler needs a lock-free atomic");
  // Function statics, constant-initialised (no guard in a handler), so that
  // including the header emits no symbol.
  static std::atomic<int>& hard() {
    static std::atomic<int> value{0};
    return value;
  }
  static std::atomic<int>& interrupts_count() {
    static std::atomic<int> value{0};
    return value;
  }
  bool enabled_;
  struct sigaction previous_int_ {};
  struct sigaction previous_term_ {};
  struct sigaction previous_hup_ {};
};

}  // namespace detail
}  // namespace multigpu
