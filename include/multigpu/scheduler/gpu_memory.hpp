#pragma once
/// @file
/// What the scheduler's tasks use on their GPUs: per-task measurement,
/// packing tasks by memory, and retrying a task that ran out of memory where
/// it will have more (SchedulerCore's members for these, and the size texts
/// "12G", "9.5 GiB").

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cctype>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/detail/process_tree.hpp"
#include "multigpu/scheduler/core.hpp"

namespace multigpu {
namespace detail {

/// Note [What a task uses on its GPUs]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// While command tasks run on GPUs, the scheduler looks at the pool's GPUs
/// once per poll interval: memory, and NVML's list of compute processes with
/// the memory of each (Note [Which process uses a GPU] in detail/nvml.hpp).
/// A task's processes are its supervisor and every process below it, found
/// from /proc's parent links at each look: a process the task starts later
/// counts, and so does one that left the task's process group (setsid). A
/// task's use on a GPU is the sum of its processes' memory there; its peak,
/// in the summary, is the largest use on one of its GPUs at one look, over
/// every attempt. A peak shorter than the poll interval can be missed, so
/// the figure is a lower bound. Seeing a task's process on its GPU also ends
/// the GPU's promise to it (Note [A GPU promised to a task] in
/// reservations.hpp). In-process tasks run in the scheduler's own process,
/// which NVML cannot split by task: they are not measured. GPU-seconds are
/// the GPUs held times the seconds of each attempt.
///
/// Note [Packing tasks by memory]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// With SchedulerOptions::pack_by_memory (`--max-per-gpu auto`):
///   - A task's size is what it declared (`[mem=12G]`, Task::memory_mib),
///     else its peak measured by the last run in this log folder (read from
///     summary.json when the run starts), else unknown. A retry after running
///     out of memory counts at least the peak the failed attempt reached.
///   - The room on a GPU is its total memory, less what the driver reserves,
///     less what processes other than our tasks use, less for each of our
///     tasks there the larger of its size and what it uses now, less what
///     other runs have promised there.
///   - A task of known size starts on a GPU where its size plus
///     memory_margin_mib fits in the room. A task of unknown size gets a GPU
///     to itself, and no task joins it: it may grow to the whole GPU. Its
///     measured peak lets the next run pack it.
///   - A task whose size plus the margin exceeds every GPU of the pool (its
///     total less what the driver reserves) fails at once, saying so, rather
///     than wait forever.
///   - Where a GPU's memory is unknown (no NVML, no cudaMemGetInfo), it takes
///     one task at a time.
///
/// Note [Retrying after out of memory]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// A task that ran out of GPU memory would fail again with the same room, so
/// its retry (within SchedulerOptions::retries) waits for a GPU, its own GPU
/// included, whose room is larger by at least memory_margin_mib than the
/// room the failed attempt had. That is the smallest room seen while its
/// processes were on the GPU (what it held plus what nobody held, at each
/// look; the room when it started for a task never seen there), the smallest
/// over its GPUs: a neighbour that grew is what often took it. Where no GPU of the pool can
/// offer that much (it had about a whole GPU), or where GPU memory is
/// unknown, the retry goes to another GPU when one is free, as any failed
/// task's does. The summary's memory_note says what happened ("attempt 1 ran
/// out of GPU memory on cuda:0 with 9.5 GiB free; attempt 2 on cuda:1 with
/// 22.0 GiB free").

/// What summary.json says each task's peak was (name -> bytes); empty when
/// there is no readable summary. See Note [Packing tasks by memory].
inline std::map<std::string, std::int64_t> peaks_in_summary(const std::string& path) {
  std::map<std::string, std::int64_t> peaks;
  std::ifstream file(path);
  if (!file) return peaks;
  const auto summary = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
  if (!summary.is_object() || !summary.contains("tasks") || !summary["tasks"].is_array()) return peaks;
  for (const auto& task : summary["tasks"]) {
    if (!task.is_object() || !task.contains("peak_gpu_mib") || !task["peak_gpu_mib"].is_number()) continue;
    const auto mib = task["peak_gpu_mib"].get<double>();
    if (mib > 0 && task.contains("task") && task["task"].is_string()) {
      peaks[task["task"].get<std::string>()] = static_cast<std::int64_t>(mib * (1 << 20));
    }
  }
  return peaks;
}

// ---------------------------------------------------------------------------
// SchedulerCore's members for GPU memory

inline std::int64_t SchedulerCore::size_of(const Job& job) const {
  std::int64_t size = -1;
  if (job.task.memory_mib >= 0) {
    size = job.task.memory_mib << 20;
  } else if (const auto found = measured_before_.find(job.task.name); found != measured_before_.end()) {
    size = found->second;
  }
  if (job.result.out_of_memory && size >= 0) size = std::max(size, job.result.peak_gpu_bytes);
  return size;
}

inline bool SchedulerCore::gpu_command(const Running& running) const {
  return running.child != nullptr && pool_[running.devices.front()].is_cuda();
}

inline void SchedulerCore::measure_tasks(const std::vector<DeviceInfo>& now) {
  // See Note [What a task uses on its GPUs].
  if (std::none_of(running_.begin(), running_.end(), [&](const auto& r) { return gpu_command(*r); })) return;
  const auto parents = process_parents();
  const auto steady_now = std::chrono::steady_clock::now();
  for (auto& r : running_) {
    if (!gpu_command(*r)) continue;
    const auto tree = process_tree(parents, static_cast<long>(r->child->pid()));
    TaskResult& result = (*jobs_)[r->job].result;
    for (std::size_t i = 0; i < r->devices.size(); ++i) {
      const std::size_t d = r->devices[i];
      if (d >= now.size() || !now[d].processes) continue;
      std::int64_t bytes = 0;
      bool seen = false;
      for (const auto& process : *now[d].processes) {
        if (tree.count(process.pid) == 0) continue;
        seen = true;
        bytes += std::max<std::int64_t>(process.used_bytes, 0);
      }
      r->current[i] = bytes;
      if (seen && now[d].total_bytes >= 0 && now[d].used_bytes >= 0) {
        // The room it has now: what it holds and what nobody holds. Its
        // smallest is the room it had when it ran out (Note [Retrying after
        // out of memory]). Only while it is seen there: a process that has
        // just ended may still be listed with its memory for a moment.
        const std::int64_t room = bytes + std::max<std::int64_t>(0, now[d].total_bytes - now[d].used_bytes -
                                                                        std::max<std::int64_t>(now[d].reserved_bytes, 0));
        r->room[i] = r->room[i] < 0 ? room : std::min(r->room[i], room);
      }
      if (seen && bytes > result.peak_gpu_bytes) {
        result.peak_gpu_bytes = bytes;
        summary_dirty_ = true;
      }
      if (seen && !r->appeared[i]) {
        r->appeared[i] = true;
        reservations_.release(pool_[d].uuid, (*jobs_)[r->job].task.name);
      }
      if (!r->appeared[i] && steady_now - r->started >= options_.reservation_timeout) {
        reservations_.release(pool_[d].uuid, (*jobs_)[r->job].task.name);  // the promise has run out
        if (!warned_unseen_ && !now[d].processes->empty()) {
          warned_unseen_ = true;
          warn(fmt::format("no process of task {} has appeared on {} in {} s, though NVML lists {} process(es) "
                           "there; in a container without the host's PID namespace NVML's process ids are the "
                           "host's, and tasks' GPU memory cannot be measured",
                           (*jobs_)[r->job].task.name, pool_[d].label(),
                           options_.reservation_timeout.count() / 1000.0, now[d].processes->size()));
        }
      }
    }
  }
}

inline std::optional<std::int64_t> SchedulerCore::room_on(std::size_t d, const std::vector<DeviceInfo>& now) const {
  // See Note [Packing tasks by memory].
  if (d >= now.size() || !pool_[d].is_cuda() || now[d].total_bytes < 0 || now[d].used_bytes < 0) return std::nullopt;
  std::int64_t ours_now = 0;
  std::int64_t ours_held = 0;
  for (const auto& r : running_) {
    for (std::size_t i = 0; i < r->devices.size(); ++i) {
      if (r->devices[i] != d) continue;
      const std::int64_t size = size_of((*jobs_)[r->job]);
      // Without NVML's process list, a task of ours is taken to use its size.
      ours_now += now[d].processes ? r->current[i] : std::max<std::int64_t>(size, 0);
      ours_held += std::max(size, r->current[i]);
    }
  }
  const std::int64_t others = std::max<std::int64_t>(0, now[d].used_bytes - ours_now);
  const std::int64_t promised = d < promised_.size() ? promised_[d].bytes : 0;
  return now[d].total_bytes - std::max<std::int64_t>(now[d].reserved_bytes, 0) - others - ours_held - promised;
}

inline std::optional<std::int64_t> SchedulerCore::largest_gpu(const std::vector<DeviceInfo>& now,
                                                              std::string* which) const {
  std::optional<std::int64_t> largest;
  for (std::size_t d = 0; d < pool_.size() && d < now.size(); ++d) {
    if (!pool_[d].is_cuda() || now[d].total_bytes < 0) return std::nullopt;  // one unknown: no judgement
    const std::int64_t capacity = now[d].total_bytes - std::max<std::int64_t>(now[d].reserved_bytes, 0);
    if (!largest || capacity > *largest) {
      largest = capacity;
      if (which != nullptr) *which = pool_[d].label();
    }
  }
  return largest;
}

inline bool SchedulerCore::room_allows(const Job& job, std::size_t d, const std::vector<DeviceInfo>& now) const {
  if (!pool_[d].is_cuda()) return true;
  const std::int64_t margin = options_.memory_margin_mib << 20;
  const auto room = room_on(d, now);
  if (job.oom_room >= 0 && room && *room < job.oom_room + margin) return false;  // Note [Retrying after out of memory]
  if (!options_.pack_by_memory) return true;
  // See Note [Packing tasks by memory].
  const bool unsized_here = std::any_of(running_.begin(), running_.end(), [&](const auto& r) {
    return std::find(r->devices.begin(), r->devices.end(), d) != r->devices.end() && size_of((*jobs_)[r->job]) < 0;
  });
  if (unsized_here) return false;
  const std::int64_t size = size_of(job);
  if (size < 0 || !room) return load_[d] == 0;
  return *room >= size + margin;
}

inline std::string SchedulerCore::never_fits(const Job& job, const std::vector<DeviceInfo>& now) const {
  if (!options_.pack_by_memory || !pool_.front().is_cuda()) return "";
  const std::int64_t size = size_of(job);
  std::string which;
  const auto largest = largest_gpu(now, &which);
  const std::int64_t margin = options_.memory_margin_mib << 20;
  if (size < 0 || !largest || size + margin <= *largest) return "";
  return fmt::format("it needs {}{} and a margin of {}, but the largest GPU of the pool ({}) has {}",
                     memory_text(size), job.task.memory_mib >= 0 ? " (declared)" : " (measured in an earlier run)",
                     memory_text(margin), which, memory_text(*largest));
}

inline std::string SchedulerCore::busy_reason(std::size_t d, const std::vector<DeviceInfo>& now) const {
  if (d < promised_.size() && promised_[d].count > 0 && (promised_[d].unsized || !options_.pack_by_memory)) {
    return fmt::format("{} (promised to task {} of another run)", pool_[d].label(), promised_[d].first_task);
  }
  return fmt::format("{} ({} MiB in use)", pool_[d].label(), d < now.size() ? now[d].used_bytes >> 20 : -1);
}

inline void SchedulerCore::after_out_of_memory(Job& job, const Running& running) {
  // See Note [Retrying after out of memory].
  std::int64_t had = -1;
  std::string where;
  for (std::size_t i = 0; i < running.devices.size(); ++i) {
    const std::int64_t room = running.room[i];
    if (room < 0) return;  // unknown: the usual retry elsewhere
    if (had < 0 || room < had) {
      had = room;
      where = pool_[running.devices[i]].label();
    }
  }
  if (had < 0) return;
  job.oom_room = had;
  TaskResult& result = job.result;
  result.memory_note += fmt::format("{}attempt {} ran out of GPU memory on {} with {} free", result.memory_note.empty() ? "" : "; ",
                                    result.attempts, where, memory_text(had));
  std::string largest_name;
  const auto largest = largest_gpu(last_devices_, &largest_name);
  if (largest && *largest < had + (options_.memory_margin_mib << 20)) {
    // Nothing can offer more: a retry goes elsewhere as any failed task's does.
    job.oom_room = -1;
    result.memory_note += fmt::format(", and no GPU of the pool can offer {} more (the largest, {}, has {})",
                                      memory_text(options_.memory_margin_mib << 20), largest_name,
                                      memory_text(*largest));
  }
}

}  // namespace detail
}  // namespace multigpu
