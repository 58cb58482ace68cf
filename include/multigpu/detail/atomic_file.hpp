#pragma once
// Writing files so that a crash never leaves a half-written one where a good
// one was: write beside the target under a temporary name, flush it to disk,
// then rename over the target (rename is atomic within a file system).

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/core.h>

#include "multigpu/error.hpp"

namespace multigpu {
namespace detail {

/// A temporary name beside `path`, unique in this process and across processes.
inline std::string temporary_path_for(const std::string& path) {
  static std::atomic<unsigned> counter{0};
  return fmt::format("{}.tmp-{}-{}", path, static_cast<long>(::getpid()), counter.fetch_add(1));
}

/// Flushes a written file's data to disk. Returns false (errno set) on failure.
inline bool sync_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  const int saved = errno;
  ::close(fd);
  errno = saved;
  return ok;
}

/// Flushes the folder entry of `path` (its rename) to disk, where the file
/// system allows it; a failure only costs durability after a power loss.
inline void sync_folder_of(const std::string& path) {
  const auto slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

/// Calls `write(temporary_path)` to produce the file, then moves it over
/// `path` atomically. If `write` throws or anything fails, the temporary file
/// is removed, `path` keeps its old content, and the error propagates (as
/// multigpu::Error naming the path, for file-system failures).
inline void replace_file_atomically(const std::string& path,
                                    const std::function<void(const std::string&)>& write) {
  const std::string temporary = temporary_path_for(path);
  try {
    write(temporary);
    if (!sync_file(temporary)) {
      throw Error(fmt::format("cannot write {}: flushing {} failed: {}", path, temporary, std::strerror(errno)));
    }
    if (std::rename(temporary.c_str(), path.c_str()) != 0) {
      throw Error(fmt::format("cannot write {}: renaming {} over it failed: {}", path, temporary,
                              std::strerror(errno)));
    }
    sync_folder_of(path);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
}

/// Writes `content` to `path` atomically (see replace_file_atomically).
inline void write_file_atomically(const std::string& path, std::string_view content) {
  replace_file_atomically(path, [&](const std::string& temporary) {
    std::FILE* file = std::fopen(temporary.c_str(), "wb");
    if (file == nullptr) {
      throw Error(fmt::format("cannot write {}: opening {} failed: {}", path, temporary, std::strerror(errno)));
    }
    const bool written = std::fwrite(content.data(), 1, content.size(), file) == content.size();
    const bool closed = std::fclose(file) == 0;
    if (!written || !closed) {
      throw Error(fmt::format("cannot write {}: writing {} failed: {}", path, temporary, std::strerror(errno)));
    }
  });
}

}  // namespace detail
}  // namespace multigpu
