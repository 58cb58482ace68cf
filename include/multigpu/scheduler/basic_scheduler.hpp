#pragma once
/// @file
/// The scheduler over a runtime policy (BasicScheduler) and the real
/// machine's (Scheduler).

#include <cstdint>
#include <csignal>
#include <limits>
#include <memory>
#include <vector>

#include "multigpu/device.hpp"
#include "multigpu/runtime.hpp"
#include "multigpu/scheduler/core.hpp"
#include "multigpu/scheduler/run_loop.hpp"
#include "multigpu/scheduler/options.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/task.hpp"

namespace multigpu {

/// The scheduler over a runtime policy (see runtime.hpp): SystemRuntime for
/// the real machine (Scheduler), testing::FakeRuntime for tests.
template <class Runtime>
class BasicScheduler {
 public:
  /// A scheduler with these options over this runtime (the real machine by default).
  explicit BasicScheduler(SchedulerOptions options = {}, Runtime runtime = Runtime{});

  /// Runs every task; returns when all have ended (or the run was stopped).
  /// Throws SchedulerError for a bad queue (duplicate names, a task needing
  /// more devices than the pool has).
  RunSummary run(const std::vector<Task>& tasks) { return core_.run(tasks); }
  /// What run() would start where, assuming tasks of equal length; runs nothing.
  std::vector<PlannedTask> plan(const std::vector<Task>& tasks) const { return core_.plan(tasks); }
  /// Stops the run: running tasks get SIGTERM, the grace period, then
  /// SIGKILL (a second Ctrl-C). Exit status 130. Thread-safe.
  void request_stop() { core_.request_stop(SIGINT); }
  /// Drains the run: no new task starts, the running ones go on to their end
  /// (a first Ctrl-C; see Note [Two-stage Ctrl-C] in run_loop.hpp). Thread-safe.
  void request_drain() { core_.request_drain(); }
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

}  // namespace multigpu
