#pragma once
/// @file
/// Promises of GPUs to tasks that have not reached them yet, shared by every
/// run on the machine (GpuReservations).

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {
namespace detail {

/// Note [A GPU promised to a task]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// A task started on a free GPU takes seconds (loading data, building a
/// model, creating its CUDA context) before it allocates anything there. For
/// that time the GPU still reads free, and a second run of multigpu-run (or
/// anything else that judges GPUs by their memory) would start a task on it
/// too. So a GPU given to a command task is promised to it until the task's
/// processes appear on it in NVML's process list, the task ends, or
/// SchedulerOptions::reservation_timeout passes:
///   - within the run, the task's slot (and, packing by memory, its size)
///     counts whether or not its processes have appeared;
///   - for other runs on the machine, the promise is a small file in a
///     folder they all read (MULTIGPU_RESERVATION_DIR, else
///     /tmp/multigpu-reservations, made with the sticky bit so that several
///     users share it): one per GPU and task, named by the GPU's UUID, and
///     holding the promising process, its host, its expiry and the task's
///     size. A run reading it treats that GPU as busy (or, packing by memory,
///     as using the task's declared size). A promise whose process is gone
///     or whose time is over counts for nothing and is removed by whoever
///     sees it, so a killed run blocks nothing for long; a time more than an
///     hour ahead is not believed.
/// A run's own promises are told apart from other runs' by a token made at
/// start (host, pid and a random number), not by pid alone, so that two
/// schedulers of one process see each other's. The folder only protects
/// runs that share it: runs in containers with their own /tmp do not see
/// each other unless MULTIGPU_RESERVATION_DIR names a shared folder.

/// One GPU's promises by other runs.
struct OtherReservations {
  int count = 0;               ///< Live promises of other runs on this GPU.
  std::int64_t bytes = 0;      ///< Their declared sizes together.
  bool unsized = false;        ///< One of them has no size: the GPU is taken.
  std::string first_task;      ///< For messages: one of the tasks promised it.
};

class GpuReservations {
 public:
  explicit GpuReservations(std::string dir = {}) : dir_(std::move(dir)) {
    if (dir_.empty()) {
      const char* env = std::getenv("MULTIGPU_RESERVATION_DIR");
      dir_ = env != nullptr && *env != '\0' ? env : "/tmp/multigpu-reservations";
    }
    std::random_device random;
    token_ = fmt::format("{}-{}-{:08x}", file_safe(host_name()), ::getpid(), random());
  }

  const std::string& dir() const { return dir_; }

  /// Promises GPU `uuid` to `task` for `timeout`; `bytes` its size (-1:
  /// unknown, the GPU is taken). Returns "" or why it could not be written
  /// (the run goes on; the caller says so once).
  std::string reserve(const std::string& uuid, const std::string& task, std::int64_t bytes,
                      std::chrono::milliseconds timeout) {
    try {
      if (!made_dir_) {
        std::error_code error;
        std::filesystem::create_directories(dir_, error);
        // Shared by every user of the machine: writable by all, files removable by their owners.
        if (::chmod(dir_.c_str(), 01777) != 0 && errno != EPERM) {
          return fmt::format("cannot use {}: {}", dir_, std::strerror(errno));
        }
        made_dir_ = true;
      }
      const auto expires = std::chrono::system_clock::now() + timeout;
      const nlohmann::json record{{"pid", static_cast<long>(::getpid())},
                                  {"host", host_name()},
                                  {"task", task},
                                  {"bytes", bytes},
                                  {"expires_unix", std::chrono::duration<double>(expires.time_since_epoch()).count()}};
      write_file_atomically(path_of(uuid, task), record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      return "";
    } catch (const std::exception& e) {
      return e.what();
    }
  }

  /// Withdraws the promise of `uuid` to `task` (nothing when there is none).
  void release(const std::string& uuid, const std::string& task) { ::unlink(path_of(uuid, task).c_str()); }

  /// The live promises of other runs on GPU `uuid`; stale ones are removed.
  OtherReservations others(const std::string& uuid) const {
    OtherReservations out;
    if (uuid.empty()) return out;
    const std::string prefix = file_safe(uuid) + "@";
    const std::string mine = prefix + token_ + "@";
    std::error_code error;
    const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    for (std::filesystem::directory_iterator it(dir_, error), end; !error && it != end; it.increment(error)) {
      const std::string name = it->path().filename().string();
      if (name.compare(0, prefix.size(), prefix) != 0 || name.compare(0, mine.size(), mine) == 0) continue;
      std::ifstream file(it->path());
      const auto record = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
      if (!record.is_object()) continue;  // being written, or not ours to judge
      const double expires = record.value("expires_unix", 0.0);
      const long pid = record.value("pid", 0L);
      const bool here = record.value("host", std::string()) == host_name();
      const bool gone = here && pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
      if (gone || expires <= now) {
        ::unlink(it->path().c_str());  // anyone may clear a dead promise (the sticky bit allows the owner only)
        continue;
      }
      if (expires > now + 3600) continue;  // not believed
      const std::int64_t bytes = record.value("bytes", std::int64_t{-1});
      ++out.count;
      if (bytes < 0) {
        out.unsized = true;
      } else {
        out.bytes += bytes;
      }
      if (out.first_task.empty()) out.first_task = record.value("task", std::string("?"));
    }
    return out;
  }

 private:
  std::string path_of(const std::string& uuid, const std::string& task) const {
    return dir_ + "/" + file_safe(uuid) + "@" + token_ + "@" + file_safe(task) + ".json";
  }

  std::string dir_;
  std::string token_;
  bool made_dir_ = false;
};

}  // namespace detail
}  // namespace multigpu
