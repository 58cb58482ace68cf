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
#include <algorithm>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
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

// Note [A GPU promised to a task]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A task started on a free GPU takes seconds (loading data, building a
// model, creating its CUDA context) before it allocates anything there. For
// that time the GPU still reads free, and a second run of multigpu-run (or
// anything else that judges GPUs by their memory) would start a task on it
// too. So a GPU given to a command task is promised to it until the task's
// processes appear on it in NVML's process list, the task ends, or
// SchedulerOptions::reservation_timeout passes:
//   - within the run, the task's slot (and, packing by memory, its size)
//     counts whether or not its processes have appeared;
//   - for other runs on the machine, the promise is a small file in a
//     folder they all read (MULTIGPU_RESERVATION_DIR, else
//     /tmp/multigpu-reservations, made with the sticky bit so that several
//     users share it): one per GPU and task, named by the GPU's UUID, and
//     holding the promising process, its host, its expiry and the task's
//     size. A run reading it treats that GPU as busy (or, packing by memory,
//     as using the task's declared size). A promise whose process is gone
//     or whose time is over counts for nothing and is removed by whoever
//     sees it, so a killed run blocks nothing for long; a time more than an
//     hour ahead is not believed.
// A promise lasts until the task uses, on that GPU, its size (packing by
// memory) or more than the busy threshold (otherwise), so that what other
// runs read from the GPU itself speaks for it from then on.
// A run's own promises are told apart from other runs' by a token made at
// start (host, pid and a random number), not by pid alone, so that two
// schedulers of one process see each other's. The folder only protects
// runs that share it: runs in containers with their own /tmp do not see
// each other unless MULTIGPU_RESERVATION_DIR names a shared folder.
// The folder is shared, so it is handled as /tmp is: a folder this process
// did not make is used only if it is a real folder (not a symbolic link)
// owned by this user or root, or sticky; promise files are created with
// O_EXCL and O_NOFOLLOW and read only when they are small regular files.
// Anyone who can write there can make GPUs look promised for up to an hour
// (a promise further ahead is not believed): the folder is a courtesy
// between runs, not a security boundary. A dead promise of another user
// cannot be removed (the sticky bit) and is skipped.

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
      if (const std::string problem = prepare_dir(); !problem.empty()) return problem;
      const auto expires = std::chrono::system_clock::now() + timeout;
      const nlohmann::json record{{"pid", static_cast<long>(::getpid())},
                                  {"host", host_name()},
                                  {"task", task},
                                  {"bytes", bytes},
                                  {"expires_unix", std::chrono::duration<double>(expires.time_since_epoch()).count()}};
      const std::string text = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      const std::string path = path_of(uuid, task);
      const std::string temporary = temporary_path_for(path);
      const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd < 0) return fmt::format("cannot create {}: {}", temporary, std::strerror(errno));
      const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
      ::close(fd);
      if (!written || ::rename(temporary.c_str(), path.c_str()) != 0) {
        const std::string why = std::strerror(errno);
        ::unlink(temporary.c_str());
        return fmt::format("cannot write {}: {}", path, why);
      }
      return "";
    } catch (const std::exception& e) {
      return e.what();
    }
  }

  /// Withdraws the promise of `uuid` to `task` (nothing when there is none).
  void release(const std::string& uuid, const std::string& task) { ::unlink(path_of(uuid, task).c_str()); }

  /// The live promises of other runs, by GPU UUID; stale ones are removed
  /// where this user may. One pass over the folder.
  std::map<std::string, OtherReservations> others() const {
    std::map<std::string, OtherReservations> out;
    if (!check_dir().empty()) return out;  // not a folder to trust: nothing read, nothing removed
    const std::string mine = "@" + token_ + "@";
    std::error_code error;
    const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    for (std::filesystem::directory_iterator it(dir_, error), end; !error && it != end; it.increment(error)) {
      const std::string name = it->path().filename().string();
      const auto at = name.find('@');
      if (at == std::string::npos || name.find(mine) != std::string::npos || name.size() < 5 ||
          name.compare(name.size() - 5, 5, ".json") != 0) {
        continue;  // not a promise (a file being written), or ours
      }
      const auto record = nlohmann::json::parse(read_small_file(it->path().string()), nullptr,
                                                /*allow_exceptions=*/false);
      // Only a whole promise is judged (and perhaps removed): anything else is not ours to touch.
      if (!record.is_object() || !record.contains("host") || !record["host"].is_string() ||
          number_in(record, "pid", -1) <= 0 || number_in(record, "expires_unix", -1) <= 0) {
        continue;
      }
      const double expires = number_in(record, "expires_unix");
      const double pid = number_in(record, "pid");
      const bool here = record.contains("host") && record["host"] == host_name();
      const bool gone = here && pid > 0 && pid < 1e9 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
      if (gone || expires <= now) {
        ::unlink(it->path().c_str());  // fails, harmlessly, for another user's file (the sticky bit)
        continue;
      }
      if (expires > now + 3600) continue;  // not believed
      const double bytes = number_in(record, "bytes", -1);
      OtherReservations& gpu = out[name.substr(0, at)];
      ++gpu.count;
      if (bytes < 0 || bytes > 1e15) {
        gpu.unsized = true;
      } else {
        gpu.bytes = std::min<std::int64_t>(gpu.bytes + static_cast<std::int64_t>(bytes), std::int64_t{1} << 50);
      }
      if (gpu.first_task.empty() && record.contains("task") && record["task"].is_string()) {
        gpu.first_task = record["task"].get<std::string>();
      }
    }
    return out;
  }

  /// The promises of `others()` for one GPU.
  static OtherReservations of_gpu(const std::map<std::string, OtherReservations>& all, const std::string& uuid) {
    const auto found = all.find(file_safe(uuid));
    return found == all.end() || uuid.empty() ? OtherReservations{} : found->second;
  }

 private:
  /// Makes the folder (sticky and writable by all: every user's runs share
  /// it), or checks one that is there. "" or why it cannot be used.
  std::string prepare_dir() {
    if (::mkdir(dir_.c_str(), 0700) == 0) {
      if (::chmod(dir_.c_str(), 01777) != 0) return fmt::format("cannot share {}: {}", dir_, std::strerror(errno));
      return "";
    }
    if (errno != EEXIST) {
      std::error_code error;  // its parents may be missing (a MULTIGPU_RESERVATION_DIR)
      std::filesystem::create_directories(std::filesystem::path(dir_).parent_path(), error);
      if (::mkdir(dir_.c_str(), 0700) == 0) return ::chmod(dir_.c_str(), 01777) == 0 ? "" : std::strerror(errno);
      if (errno != EEXIST) return fmt::format("cannot make {}: {}", dir_, std::strerror(errno));
    }
    return check_dir();
  }

  /// "" when the folder is one to use: a real folder (not a symbolic link),
  /// owned by this user or root, or sticky; else why not.
  std::string check_dir() const {
    struct stat info {};
    if (::lstat(dir_.c_str(), &info) != 0) return fmt::format("cannot use {}: {}", dir_, std::strerror(errno));
    if (!S_ISDIR(info.st_mode)) return fmt::format("{} is not a folder (a symbolic link?): not used", dir_);
    const bool trusted_owner = info.st_uid == ::geteuid() || info.st_uid == 0;
    if (!trusted_owner && (info.st_mode & S_ISVTX) == 0) {
      return fmt::format("{} belongs to another user and is not sticky: not used", dir_);
    }
    return "";
  }

  /// A small regular file's text; "" for anything else (a FIFO, a link, a huge file).
  static std::string read_small_file(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return "";
    struct stat info {};
    std::string text;
    if (::fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_size <= 4096) {
      text.resize(static_cast<std::size_t>(info.st_size));
      const ssize_t got = ::read(fd, text.data(), text.size());
      text.resize(got > 0 ? static_cast<std::size_t>(got) : 0);
    }
    ::close(fd);
    return text;
  }

  static double number_in(const nlohmann::json& record, const char* key, double otherwise = 0) {
    return record.contains(key) && record[key].is_number() ? record[key].get<double>() : otherwise;
  }

  std::string path_of(const std::string& uuid, const std::string& task) const {
    return dir_ + "/" + file_safe(uuid) + "@" + token_ + "@" + file_safe(task) + ".json";
  }

  std::string dir_;
  std::string token_;
};

}  // namespace detail
}  // namespace multigpu
