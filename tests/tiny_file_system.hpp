#pragma once
// A small tmpfs mounted for one test, to fill it: what a full disk does to
// a save (test_checkpoint.cpp, test_distributed.cpp). Include support.hpp
// first.

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

namespace multigpu_test {

/// A tmpfs of `size` mounted on a new folder `path` for the time of a test,
/// unmounted when it ends (also when a check fails or it throws; a crash
/// leaves it mounted). Needs the right to mount (root, or CAP_SYS_ADMIN):
/// without it, mounted() is false and why says why.
struct TinyFileSystem {
  TinyFileSystem(std::filesystem::path where, const char* size) : path(std::move(where)) {
    made_ = std::filesystem::create_directories(path);
    mounted_ = ::mount("tmpfs", path.c_str(), "tmpfs", 0, (std::string("size=") + size).c_str()) == 0;
    if (!mounted_) {
      why = std::strerror(errno);
      if (made_) ::rmdir(path.c_str());  // where it cannot mount (a CI container), no empty folder is left in /tmp
    }
  }
  ~TinyFileSystem() {
    if (mounted_ && ::umount2(path.c_str(), MNT_DETACH) == 0 && made_) ::rmdir(path.c_str());
  }
  TinyFileSystem(const TinyFileSystem&) = delete;
  TinyFileSystem& operator=(const TinyFileSystem&) = delete;
  bool mounted() const { return mounted_; }
  std::string file(const std::string& name) const { return (path / name).string(); }
  /// Takes every free byte left, into the file "filler".
  void fill() const {
    const int fd = ::open(file("filler").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    REQUIRE(fd >= 0);
    const std::string block(4096, 'x');
    while (::write(fd, block.data(), block.size()) > 0) {
    }
    const std::string byte(1, 'x');
    while (::write(fd, byte.data(), 1) > 0) {
    }
    ::close(fd);
  }
  /// Remounts it read-only (true) or writable again (false).
  void read_only(bool on) const {
    REQUIRE(::mount(nullptr, path.c_str(), nullptr, MS_REMOUNT | (on ? MS_RDONLY : 0), nullptr) == 0);
  }
  std::filesystem::path path;
  std::string why;

 private:
  bool made_ = false;
  bool mounted_ = false;
};

}  // namespace multigpu_test
