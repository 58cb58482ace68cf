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
// and the file it points to overwritten. So the temporary is created here
// with O_CREAT | O_EXCL | O_NOFOLLOW: a name that exists already, as a link
// or anything else, is never opened but skipped for the next one (and left
// alone: it is not ours). The bytes go through the descriptor of the
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

// Note [A full disk fails a save, not the program]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// LibTorch's stream writer, given a file name or a stream, throws c10::Error
// when a write fails (a full disk, a quota, a read-only remount, EIO), and
// throws again from its destructor while that first error unwinds: the
// program ends in std::terminate, leaving a partial temporary that keeps the
// disk full. So nothing but this file writes a checkpoint's bytes: LibTorch
// serialises through a function (OutputArchive::save_to(writer)) that hands
// them to a FileSink, which writes them with write(2) and checks every
// return. A sink never reports a failure to the serialiser: it keeps the
// first errno, writes nothing more, and answers "all written", so that the
// serialiser ends normally. Only then is the failure thrown, as one
// multigpu::Error naming the file and the reason (strerror), with the
// temporary removed and the file it was to replace untouched. fsync and
// close are checked too: a file system may report a full disk (NFS, a
// quota) or EIO only there.

/// Writes bytes to a descriptor with write(2), keeping the first failure
/// (see Note [A full disk fails a save, not the program]).
class FileSink {
 public:
  /// A sink writing to `fd` (not owned).
  explicit FileSink(int fd) : fd_(fd) {}
  /// Writes the `size` bytes at `data`, unless a write failed before;
  /// returns `size` in any case, so that a serialiser goes on to its end.
  std::size_t write(const void* data, std::size_t size) noexcept {
    const char* bytes = static_cast<const char*>(data);
    for (std::size_t done = 0; error_ == 0 && done < size;) {
      const ssize_t written = ::write(fd_, bytes + done, size - done);
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) {
        error_ = written < 0 ? errno : ENOSPC;
      } else {
        done += static_cast<std::size_t>(written);
      }
    }
    return size;
  }
  /// The errno of the first failed write; 0 when none failed.
  int error() const { return error_; }

 private:
  int fd_;
  int error_ = 0;
};

/// Writes a file at `path` atomically: `produce` writes its bytes into a
/// sink on a new temporary beside it, which is checked, flushed and renamed
/// over `path`. If `produce` throws or any write, flush or rename fails, the
/// temporary is removed, `path` keeps its old content, and the error
/// propagates (file-system failures as multigpu::Error naming `path`, the
/// temporary and the reason). See Note [A full disk fails a save, not the
/// program].
inline void write_file_atomically_with(const std::string& path, const std::function<void(FileSink&)>& produce) {
  auto created = create_temporary_beside(path);  // not bound to names: C++17 lambdas cannot capture those
  const std::string temporary = std::move(created.first);
  int fd = created.second;
  const auto failed = [&](const char* doing, int error) {
    return Error(fmt::format("cannot write {}: {} {} failed: {}", path, doing, temporary, std::strerror(error)));
  };
  try {
    FileSink sink(fd);
    produce(sink);
    if (sink.error() != 0) throw failed("writing", sink.error());
    int flushed = 0;
    do {
      flushed = ::fsync(fd);
    } while (flushed != 0 && errno == EINTR);  // a signal during the flush: flush again
    if (flushed != 0) throw failed("flushing", errno);
    const int closing = fd;
    fd = -1;
    // EINTR from close: the descriptor is closed all the same (Linux), and
    // the bytes are on disk since the fsync above; not a failed save.
    if (::close(closing) != 0 && errno != EINTR) throw failed("writing", errno);
    move_into_place(temporary, path, /*synced=*/true);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    std::remove(temporary.c_str());
    throw;
  }
}

/// Writes `content` to `path` atomically (see write_file_atomically_with).
inline void write_file_atomically(const std::string& path, std::string_view content) {
  write_file_atomically_with(path, [content](FileSink& sink) { sink.write(content.data(), content.size()); });
}

}  // namespace detail
}  // namespace multigpu
