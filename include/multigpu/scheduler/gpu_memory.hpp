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

#include "multigpu/scheduler/process_tree.hpp"
#include "multigpu/scheduler/core.hpp"

namespace multigpu {
namespace detail {

// Note [What a task uses on its GPUs]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// While command tasks run on GPUs, the scheduler looks at the pool's GPUs
// once per poll interval: memory, and NVML's list of compute processes with
// the memory of each (Note [Which process uses a GPU] in detail/nvml.hpp).
// A task's processes are its supervisor and every process below it, found
// from /proc's parent links at each look: a process the task starts later
// counts, and so does one that left the task's process group (setsid). A
// task's use on a GPU is the sum of its processes' memory there; its peak,
// in the summary, is the largest use on one of its GPUs at one look, over
// every attempt. A peak shorter than the poll interval can be missed, so
// the figure is a lower bound. Seeing a task's process on its GPU also ends
// the GPU's promise to it (Note [A GPU promised to a task] in
// reservations.hpp). In-process tasks run in the scheduler's own process,
// which NVML cannot split by task: they are not measured. GPU-seconds are
// the GPUs held times the seconds of each attempt.
//
// Note [Packing tasks by memory]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// With SchedulerOptions::pack_by_memory (`--max-per-gpu auto`):
//   - A task's size is what it declared (`[mem=12G]`, Task::memory_mib),
//     else its peak measured by the last run in this log folder (read from
//     summary.json when the run starts; a run that skips the task writes the
//     peak it found there again), else unknown. A retry after running out of
//     memory counts at least the peak the failed attempt reached; a size that
//     then exceeds every GPU with the margin counts as unknown.
//   - The room on a GPU is its total memory, less what the driver reserves,
//     less what processes other than our tasks use, less for each of our
//     tasks there the larger of its size and what it uses now, less what
//     other runs have promised there.
//   - A task of known size starts on a GPU where its size plus
//     memory_margin_mib fits in the room. A task of unknown size gets a GPU
//     to itself, and no task joins it: it may grow to the whole GPU. Its
//     measured peak lets the next run pack it.
//   - A task whose size plus the margin exceeds every GPU of the pool (its
//     total less what the driver reserves) fails at once, saying so, rather
//     than wait forever.
//   - Where a GPU's memory is unknown (no NVML, no cudaMemGetInfo), it takes
//     one task at a time.
//
// Note [Retrying after out of memory]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A task that ran out of GPU memory would fail again with the same room, so
// its retry (within SchedulerOptions::retries) waits for a GPU, its own GPU
// included, whose room is larger by at least memory_margin_mib than the
// room the failed attempt had. That is the smallest room seen while its
// processes were on the GPU (what it held plus what nobody held, at each
// look; the room when it started for a task never seen there), the smallest
// over its GPUs: a neighbour that grew is what often took it. Memory that
// others' jobs and our tasks use will be freed; others' use under the busy
// threshold (a desktop, an idle context) is taken to stay. Where no GPU of
// the pool can then offer that much (it had about a whole GPU), or where GPU
// memory is unknown, the retry goes to another GPU when one is free, as any
// failed task's does. A retry that waits while none of our tasks runs says
// what it waits for, and counts towards the busy-wait limit. The summary's memory_note says what happened ("attempt 1 ran
// out of GPU memory on cuda:0 with 9.5 GiB free; attempt 2 on cuda:1 with
// 22.0 GiB free").

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
    if (mib > 0 && mib < 1e9 && task.contains("task") && task["task"].is_string()) {
      peaks[task["task"].get<std::string>()] = static_cast<std::int64_t>(mib * (1 << 20));
    }
  }
  return peaks;
}

// ---------------------------------------------------------------------------
// SchedulerCore's members for GPU memory

inline std::int64_t SchedulerCore::size_of(const Job& job) const {
  // See Note [Packing tasks by memory].
  std::int64_t size = -1;
  if (job.task.memory_mib >= 0) {
    size = job.task.memory_mib << 20;
  } else if (const auto found = measured_before_.find(job.task.name); found != measured_before_.end()) {
    size = found->second;
  }
  if (size >= 0 && job.result.out_of_memory) size = std::max(size, job.result.peak_gpu_bytes);
  // A size that no GPU can hold with the margin (measured, or raised by what
  // an attempt reached before it ran out) is no basis for packing: the task
  // gets a GPU to itself. (A declared one that large is refused: never_fits.)
  const auto largest = largest_gpu(last_devices_, nullptr);
  if (size >= 0 && largest && size + (options_.memory_margin_mib << 20) > *largest) size = -1;
  return size;
}

inline bool SchedulerCore::gpu_command(const Running& running) const {
  return running.child != nullptr && pool_[running.devices.front()].is_cuda();
}

inline void SchedulerCore::measure_tasks(const std::vector<DeviceInfo>& now) {
  // See Note [What a task uses on its GPUs].
  if (std::none_of(running_.begin(), running_.end(), [&](const auto& r) { return gpu_command(*r); })) return;
  const auto children = process_children(process_parents());
  const auto steady_now = std::chrono::steady_clock::now();
  for (auto& r : running_) {
    if (!gpu_command(*r)) continue;
    const auto tree = process_tree(children, static_cast<long>(r->child->pid()));
    Job& job = (*jobs_)[r->job];
    TaskResult& result = job.result;
    for (std::size_t i = 0; i < r->devices.size(); ++i) {
      const std::size_t d = r->devices[i];
      if (d >= now.size() || !now[d].processes) continue;
      std::int64_t bytes = 0;
      bool seen = false;
      bool known = false;  // NVML gave the memory of at least one of them
      for (const auto& process : *now[d].processes) {
        if (tree.count(process.pid) == 0) continue;
        seen = true;
        known = known || process.used_bytes >= 0;
        bytes += std::max<std::int64_t>(process.used_bytes, 0);
      }
      r->current[i] = bytes;
      if (known && bytes > result.peak_gpu_bytes) {
        result.peak_gpu_bytes = bytes;
        summary_dirty_ = true;
      }
      if (seen && known && now[d].total_bytes >= 0 && now[d].used_bytes >= 0) {
        // The room it has now: what it holds and what nobody holds. Its
        // smallest is the room it had when it ran out (Note [Retrying after
        // out of memory]). Only while it is seen there: a process that has
        // just ended may still be listed with its memory for a moment.
        const std::int64_t room = bytes + std::max<std::int64_t>(0, now[d].total_bytes - now[d].used_bytes -
                                                                        std::max<std::int64_t>(now[d].reserved_bytes, 0));
        r->room[i] = r->room[i] ? std::min(*r->room[i], room) : room;
      }
      if (!r->promised[i]) continue;
      // See Note [A GPU promised to a task]: until what it uses speaks for it.
      const std::int64_t size = size_of(job);
      const std::int64_t enough = options_.pack_by_memory && size >= 0 ? size : (options_.memory_threshold_mib << 20) + 1;
      const bool timed_out = steady_now - r->started >= options_.reservation_timeout;
      if ((seen && bytes >= enough) || timed_out) {
        r->promised[i] = false;
        reservations_.release(pool_[d].uuid, job.task.name);
      }
      if (timed_out && !seen && !warned_unseen_ && !now[d].processes->empty()) {
        warned_unseen_ = true;
        warn(fmt::format("no process of task {} has appeared on {} in {} s, though NVML lists {} process(es) "
                         "there; in a container without the host's PID namespace NVML's process ids are the "
                         "host's, and tasks' GPU memory cannot be measured",
                         job.task.name, pool_[d].label(), options_.reservation_timeout.count() / 1000.0,
                         now[d].processes->size()));
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
      // Without NVML's process list what ours use is unknown: all that is
      // used counts as others', on top of what ours hold (too little room
      // rather than too much).
      if (now[d].processes) ours_now += r->current[i];
      ours_held += std::max(size_of((*jobs_)[r->job]), r->current[i]);
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
  const std::int64_t size = size_of(job);
  // Other runs' promises (Note [A GPU promised to a task]): a GPU promised
  // whole is taken; a sized promise leaves room only for a task of known size.
  if (d < promised_.size() && promised_[d].count > 0 &&
      (promised_[d].unsized || !options_.pack_by_memory || size < 0)) {
    return false;
  }
  const std::int64_t margin = options_.memory_margin_mib << 20;
  const auto room = room_on(d, now);
  if (job.oom_room && room && *room < *job.oom_room + margin) return false;  // Note [Retrying after out of memory]
  if (!options_.pack_by_memory) return true;
  // See Note [Packing tasks by memory].
  const bool unsized_here = std::any_of(running_.begin(), running_.end(), [&](const auto& r) {
    return std::find(r->devices.begin(), r->devices.end(), d) != r->devices.end() && size_of((*jobs_)[r->job]) < 0;
  });
  if (unsized_here) return false;
  if (size < 0 || !room) return load_[d] == 0;
  return *room >= size + margin;
}

inline std::string SchedulerCore::never_fits(const Job& job, const std::vector<DeviceInfo>& now) const {
  // Only a declared size: a measured one too large to pack runs on a GPU of its own (size_of).
  if (!options_.pack_by_memory || !pool_.front().is_cuda() || job.task.memory_mib < 0) return "";
  const std::int64_t size = job.task.memory_mib << 20;
  std::string which;
  const auto largest = largest_gpu(now, &which);
  const std::int64_t margin = options_.memory_margin_mib << 20;
  if (!largest || size + margin <= *largest) return "";
  return fmt::format("it needs {} (declared) and a margin of {}, but the largest GPU of the pool ({}) has {}",
                     memory_text(size), memory_text(margin), which, memory_text(*largest));
}

inline std::string SchedulerCore::busy_reason(std::size_t d, const std::vector<DeviceInfo>& now) const {
  if (d < promised_.size() && promised_[d].count > 0 && (promised_[d].unsized || !options_.pack_by_memory)) {
    return fmt::format("{} (promised to task {} of another run)", pool_[d].label(), promised_[d].first_task);
  }
  return fmt::format("{} ({} MiB in use)", pool_[d].label(), d < now.size() ? now[d].used_bytes >> 20 : -1);
}

inline std::string SchedulerCore::room_wait_reason(const Job& job, const std::vector<DeviceInfo>& now) const {
  // A task waiting for room while none of ours runs waits on others: say so,
  // and let it count towards the busy-wait limit.
  if (!running_.empty() || (!options_.pack_by_memory && !job.oom_room)) return "";
  const std::int64_t size = size_of(job);
  if (options_.pack_by_memory && size < 0) {  // a GPU of its own: what other runs promised is in the way
    for (std::size_t d = 0; d < promised_.size(); ++d) {
      if (promised_[d].count > 0) {
        return fmt::format("{} (promised to task {} of another run)", pool_[d].label(), promised_[d].first_task);
      }
    }
    return "";
  }
  std::optional<std::int64_t> most;
  std::string where;
  for (std::size_t d = 0; d < pool_.size(); ++d) {
    const auto room = room_on(d, now);
    if (room && (!most || *room > *most)) {
      most = room;
      where = pool_[d].label();
    }
  }
  if (!most) return "";
  const std::int64_t wanted = std::max(job.oom_room.value_or(0), std::max<std::int64_t>(size, 0));
  return fmt::format("room for {} more than {} (the most is {} on {})", memory_text(options_.memory_margin_mib << 20),
                     memory_text(wanted), memory_text(*most), where);
}

inline void SchedulerCore::after_out_of_memory(Job& job, const Running& running) {
  // See Note [Retrying after out of memory].
  job.oom_room.reset();
  std::optional<std::int64_t> had;
  std::string where;
  for (std::size_t i = 0; i < running.devices.size(); ++i) {
    const auto& room = running.room[i];
    if (!room) return;  // unknown: the usual retry elsewhere
    if (!had || *room < *had) {
      had = room;
      where = pool_[running.devices[i]].label();
    }
  }
  if (!had) return;
  TaskResult& result = job.result;
  result.memory_note += fmt::format("{}attempt {} ran out of GPU memory on {} with {} free",
                                    result.memory_note.empty() ? "" : "; ", result.attempts, where, memory_text(*had));
  // The most any GPU could offer: all but the driver's memory and others'
  // small use (a desktop, an idle context: under the busy threshold, it
  // stays); others' jobs and ours end.
  std::optional<std::int64_t> reachable;
  std::string reachable_where;
  for (std::size_t d = 0; d < pool_.size() && d < last_devices_.size(); ++d) {
    const DeviceInfo& gpu = last_devices_[d];
    if (!pool_[d].is_cuda() || gpu.total_bytes < 0 || gpu.used_bytes < 0) return;
    std::int64_t ours = 0;
    for (const auto& r : running_) {
      for (std::size_t i = 0; i < r->devices.size(); ++i) ours += r->devices[i] == d ? r->current[i] : 0;
    }
    for (std::size_t i = 0; i < running.devices.size(); ++i) {  // the attempt that ended (no longer in running_)
      ours += running.devices[i] == d ? running.current[i] : 0;
    }
    const std::int64_t others = std::max<std::int64_t>(0, gpu.used_bytes - (gpu.processes ? ours : 0));
    const std::int64_t stays = others <= (options_.memory_threshold_mib << 20) ? others : 0;
    const std::int64_t offer = gpu.total_bytes - std::max<std::int64_t>(gpu.reserved_bytes, 0) - stays;
    if (!reachable || offer > *reachable) {
      reachable = offer;
      reachable_where = pool_[d].label();
    }
  }
  const std::int64_t margin = options_.memory_margin_mib << 20;
  if (reachable && *reachable < *had + margin) {
    // Nothing can offer more: a retry goes elsewhere as any failed task's does.
    result.memory_note += fmt::format(", and no GPU of the pool can offer {} more (the most, on {}, is {})",
                                      memory_text(margin), reachable_where, memory_text(*reachable));
    return;
  }
  job.oom_room = had;
}

}  // namespace detail
}  // namespace multigpu
