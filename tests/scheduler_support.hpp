#pragma once
// What the scheduler's tests share: a fresh folder per test, fast options,
// reading files and results, waiting for a condition, counting processes,
// and the names they use unqualified.

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include <dirent.h>
#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/scheduler.hpp"
#include "multigpu/testing/fake_runtime.hpp"
#include "support.hpp"

namespace multigpu_test {

using multigpu::RunSummary;
using multigpu::SchedulerOptions;

/// A fresh folder for one test, under the current directory.
inline std::string fresh_dir(const std::string& name) {
  const std::string dir = fmt::format("scheduler_test_{}_{}", name, ::getpid());
  std::system(fmt::format("rm -rf '{}'", dir).c_str());
  multigpu::detail::make_directories(dir);
  return dir;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

inline SchedulerOptions fast_options(const std::string& dir, const std::string& devices) {
  SchedulerOptions options;
  options.devices = devices;
  options.log_dir = dir + "/logs";
  options.poll_interval = std::chrono::milliseconds(5);
  options.grace_period = std::chrono::seconds(5);
  // Scripted GPUs share their UUIDs between test processes: promises stay in the test's folder.
  options.reservation_dir = dir + "/reservations";
  return options;
}

inline const multigpu::TaskResult& result_of(const RunSummary& summary, const std::string& name) {
  for (const auto& r : summary.tasks) {
    if (r.name == name) return r;
  }
  throw std::runtime_error("no task " + name);
}

/// Waits (bounded) until `condition` holds.
template <class Condition>
bool eventually(Condition condition, std::chrono::seconds limit = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

/// Processes of this machine whose command line contains `text`.
inline int processes_with(const std::string& text) {
  int count = 0;
  if (DIR* proc = opendir("/proc")) {
    while (dirent* entry = readdir(proc)) {
      if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
      std::string cmdline = read_file(std::string("/proc/") + entry->d_name + "/cmdline");
      for (char& c : cmdline) c = c == '\0' ? ' ' : c;
      count += multigpu_test::contains(cmdline, text) ? 1 : 0;
    }
    closedir(proc);
  }
  return count;
}

/// `signal`'s action set to `handler` while it lives; with `if_ignored`,
/// only where it is ignored now (a test that sends itself SIGINT must not
/// depend on how it was started: a script's background job starts with
/// SIGINT ignored, which the scheduler keeps).
class SignalAction {
 public:
  SignalAction(int signal, void (*handler)(int), bool if_ignored = false) : signal_(signal) {
    ::sigaction(signal, nullptr, &previous_);
    if (if_ignored && previous_.sa_handler != SIG_IGN) return;
    struct sigaction action {};
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    ::sigaction(signal, &action, nullptr);
    changed_ = true;
  }
  ~SignalAction() {
    if (changed_) ::sigaction(signal_, &previous_, nullptr);
  }
  SignalAction(const SignalAction&) = delete;
  SignalAction& operator=(const SignalAction&) = delete;

 private:
  int signal_;
  bool changed_ = false;
  struct sigaction previous_ {};
};

}  // namespace multigpu_test

// What every scheduler test file uses, by its short name.
using multigpu::RunSummary;
using multigpu::SchedulerOptions;
using multigpu::Task;
using multigpu::TaskContext;
using multigpu::TaskStatus;
using multigpu::testing::FakeRuntime;
using multigpu_test::CapturedLog;
using multigpu_test::contains;
using multigpu_test::eventually;
using multigpu_test::fast_options;
using multigpu_test::fresh_dir;
using multigpu_test::processes_with;
using multigpu_test::read_file;
using multigpu_test::result_of;
using multigpu_test::SignalAction;
using FakeScheduler = multigpu::BasicScheduler<FakeRuntime>;
