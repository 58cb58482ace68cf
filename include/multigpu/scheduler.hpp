#pragma once
/// @file
/// Many experiments over a pool of GPUs: a queue of tasks, each started as
/// soon as a device of the pool is free (no fixed batches), with per-task
/// logs, skip-if-done, retries, failure isolation, Ctrl-C handling and a
/// summary in JSON and CSV.
///
/// @code
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
/// @endcode
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

#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/options.hpp"
#include "multigpu/scheduler/summary.hpp"
#include "multigpu/scheduler/task_file.hpp"
#include "multigpu/scheduler/basic_scheduler.hpp"
