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
#include <utility>

#include <fcntl.h>
#include <sys/stat.h>
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

// Note [Temporary files are made, never found]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A temporary's name is predictable (the target's, the pid, a counter), and
// the folders it is made in (a log folder, a checkpoint folder) may be
// writable by others: a symbolic link planted at that name would be followed,
// and the file it points to overwritten. So the temporary is created here,
// before the writer runs, with O_CREAT | O_EXCL | O_NOFOLLOW: a name that
// exists already, as a link or anything else, is never opened but skipped
// for the next one (and left alone: it is not ours). The writer then opens a
// regular file this process has just made. Before the rename, the name must
// still be a regular file, so that no link is ever renamed over the target.

/// The most names create_temporary_beside() tries before it gives up.
constexpr int kTemporaryAttempts = 100;

/// Creates a new, empty temporary file beside `path` and returns its name
/// and an open descriptor (see Note [Temporary files are made, never found]).
/// Throws multigpu::Error naming `path` when none can be created.
inline std::pair<std::string, int> create_temporary_beside(const std::string& path) {
  int error = 0;
  for (int attempt = 0; attempt < kTemporaryAttempts; ++attempt) {
    std::string temporary = temporary_path_for(path);
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0) return {std::move(temporary), fd};
    error = errno;
    if (error != EEXIST) {
      throw Error(fmt::format("cannot write {}: creating {} failed: {}", path, temporary, std::strerror(error)));
    }
  }
  throw Error(fmt::format("cannot write {}: {} temporary names beside it ({}.tmp-*) exist already, made by someone "
                          "else; remove them",
                          path, kTemporaryAttempts, path));
}

/// Moves the finished `temporary` over `path` after flushing it (unless
/// `synced`: the writer did); throws
/// multigpu::Error naming `path` when that fails.
inline void move_into_place(const std::string& temporary, const std::string& path, bool synced = false) {
  struct stat status {};
  if (::lstat(temporary.c_str(), &status) != 0 || !S_ISREG(status.st_mode)) {
    throw Error(fmt::format("cannot write {}: the temporary {} is no longer a regular file (replaced meanwhile?)",
                            path, temporary));
  }
  if (!synced && !sync_file(temporary)) {
    throw Error(fmt::format("cannot write {}: flushing {} failed: {}", path, temporary, std::strerror(errno)));
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    throw Error(fmt::format("cannot write {}: renaming {} over it failed: {}", path, temporary,
                            std::strerror(errno)));
  }
  sync_folder_of(path);
}

/// Calls `write(temporary_path)` to produce the file, then moves it over
/// `path` atomically. The temporary exists (empty) when `write` is called:
/// see Note [Temporary files are made, never found]. If `write` throws or
/// anything fails, the temporary file is removed, `path` keeps its old
/// content, and the error propagates (as multigpu::Error naming the path,
/// for file-system failures).
inline void replace_file_atomically(const std::string& path,
                                    const std::function<void(const std::string&)>& write) {
  const auto [temporary, fd] = create_temporary_beside(path);
  ::close(fd);
  try {
    write(temporary);
    move_into_place(temporary, path);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
}

/// Writes `content` to `path` atomically (see replace_file_atomically), through
/// the descriptor of the temporary it created.
inline void write_file_atomically(const std::string& path, std::string_view content) {
  auto [temporary, fd] = create_temporary_beside(path);
  try {
    for (std::size_t done = 0; done < content.size();) {
      const ssize_t written = ::write(fd, content.data() + done, content.size() - done);
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) {
        throw Error(fmt::format("cannot write {}: writing {} failed: {}", path, temporary,
                                std::strerror(written < 0 ? errno : ENOSPC)));
      }
      done += static_cast<std::size_t>(written);
    }
    if (::fsync(fd) != 0) {
      throw Error(fmt::format("cannot write {}: flushing {} failed: {}", path, temporary, std::strerror(errno)));
    }
    const int closing = fd;
    fd = -1;
    if (::close(closing) != 0) {
      throw Error(fmt::format("cannot write {}: writing {} failed: {}", path, temporary, std::strerror(errno)));
    }
    move_into_place(temporary, path, /*synced=*/true);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    std::remove(temporary.c_str());
    throw;
  }
}

}  // namespace detail
}  // namespace multigpu
