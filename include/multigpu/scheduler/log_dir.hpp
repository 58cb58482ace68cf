#pragma once
/// @file
/// The scheduler's log folder: where a task's log goes (file_safe), appending
/// to and reading back logs, and the folder's lock.

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {
namespace detail {

/// A name made safe as a file name: letters, digits, '.', '_', '-'.
inline std::string file_safe(const std::string& name) {
  std::string out;
  for (char c : name) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-';
    out += keep ? c : '_';
  }
  if (out.empty() || out == "." || out == "..") out = "task";
  return out;
}

/// Whether a file or folder is there (following symbolic links); false for "".
inline bool path_exists(const std::string& path) {
  std::error_code error;
  return !path.empty() && std::filesystem::exists(path, error);
}

/// Makes a folder and its parents (like mkdir -p), with mode 0755 (less the
/// umask), and says which part it could not make. (std::filesystem's
/// create_directories would make them 0777 less the umask, and name only the
/// whole path.)
inline void make_directories(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  if (!path.empty() && path.front() == '/') partial = "/";
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty()) continue;
    partial += part + "/";
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      throw SchedulerError(fmt::format("cannot create folder {}: {}", partial, std::strerror(errno)));
    }
  }
}

/// The last `bytes` of a file ("" if unreadable).
inline std::string file_tail(const std::string& path, std::size_t bytes) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  const auto size = static_cast<std::size_t>(in.tellg());
  const std::size_t start = size > bytes ? size - bytes : 0;
  in.seekg(static_cast<std::streamoff>(start));
  std::string text(size - start, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  return text;
}

/// Appends to a task's log, never through a symbolic link. Best effort: a
/// full disk or a deleted folder loses the line, not the run.
inline void append_to_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const ssize_t written = ::write(fd, text.data(), text.size());
  (void)written;
  ::close(fd);
}

/// The size of a file (0 if it cannot be read).
inline std::uint64_t file_size(const std::string& path) {
  std::error_code error;
  const auto size = std::filesystem::file_size(path, error);
  return error ? 0 : static_cast<std::uint64_t>(size);
}

// Note [The log folder's lock]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Two runs on one log folder would run the same tasks twice, side by side,
// and write over each other's logs and summary. A run takes an exclusive
// flock on `<log_dir>/.multigpu-run.lock` and writes who it is (pid, host,
// start time) into it; a second run is refused with that line. The lock
// goes when its open file goes: when the run ends, or when its process dies
// (no stale lock to clean up by hand), except that the supervisors of the
// command tasks keep it (see Note [The task supervisor]): after a crash, a
// rerun waits until the old run's tasks are gone.

/// This machine's host name.
inline std::string host_name() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

/// The lock file of a log folder.
inline std::string lock_path_of(const std::string& log_dir) { return log_dir + "/.multigpu-run.lock"; }

/// Takes the log folder's lock, or throws SchedulerError saying who holds it.
/// Returns the lock's file descriptor.
inline int lock_log_dir(const std::string& log_dir) {
  const std::string path = lock_path_of(log_dir);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw SchedulerError(fmt::format("cannot open the log folder's lock {}: {}", path, std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    std::string holder(512, '\0');
    const ssize_t got = ::pread(fd, holder.data(), holder.size(), 0);
    holder.resize(got > 0 ? static_cast<std::size_t>(got) : 0);
    ::close(fd);
    if (error == EWOULDBLOCK) {
      throw SchedulerError(fmt::format(
          "the log folder {} is in use by another run ({}); wait for it to end (its tasks included), or choose "
          "another log folder",
          log_dir, holder.empty() ? std::string("who, it did not say") : std::string(trim(holder))));
    }
    throw SchedulerError(fmt::format("cannot lock {}: {}", path, std::strerror(error)));
  }
  const std::string holder = fmt::format("pid {} on host {}, started {}\n", static_cast<long>(::getpid()), host_name(),
                                         iso8601(std::chrono::system_clock::now()));
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, holder.data(), holder.size(), 0) < 0) {
    // The lock holds without the note; a second run just cannot say who.
  }
  return fd;
}

}  // namespace detail
}  // namespace multigpu
