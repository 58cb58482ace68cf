#pragma once
// Helpers shared by the tests. Include it first: LibTorch (through glog)
// defines CHECK macros that clash with doctest's, so LibTorch comes first and
// its macros are dropped before doctest defines its own.

#include <iostream>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "multigpu/multigpu.hpp"

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>

namespace multigpu_test {

/// The repository's top folder (tests/paths.cpp).
const char* source_dir();

/// The distributed_worker program's path (tests/paths.cpp).
const char* distributed_worker();

/// Collects multigpu's log lines while in scope (instead of printing them).
class CapturedLog {
 public:
  CapturedLog() {
    previous_ = multigpu::set_log_handler([this](multigpu::LogLevel level, std::string_view line) {
      std::lock_guard<std::mutex> lock(mutex_);
      (level == multigpu::LogLevel::kWarning ? warnings_ : infos_).emplace_back(line);
    });
  }
  ~CapturedLog() { multigpu::set_log_handler(previous_); }
  CapturedLog(const CapturedLog&) = delete;
  CapturedLog& operator=(const CapturedLog&) = delete;

  std::vector<std::string> warnings() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return warnings_;
  }
  std::vector<std::string> infos() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return infos_;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::string> warnings_;
  std::vector<std::string> infos_;
  multigpu::LogHandler previous_;
};

/// True when `text` contains `part`.
inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// The message of the exception `expression` throws as ExceptionType ("" if none).
#define MULTIGPU_TEST_MESSAGE(ExceptionType, expression) \
  [&]() -> std::string {                                 \
    try {                                                \
      (void)(expression);                                \
    } catch (const ExceptionType& e) {                   \
      return e.what();                                   \
    }                                                    \
    return std::string();                                \
  }()

/// Why this process cannot run a test that needs `count` GPUs ("" when it can).
inline std::string why_not_gpus(std::size_t count) {
  multigpu::DeviceManager devices;
  const std::size_t visible = devices.devices().size();
  if (visible >= count) return "";
  if (visible == 0) return "no GPU is visible: " + devices.no_gpu_reason();
  return std::to_string(count) + " GPUs needed, " + std::to_string(visible) + " visible";
}

/// Ends a CUDA test early where it cannot run, printing the line by which
/// ctest reports it skipped (SKIP_REGULAR_EXPRESSION in tests/CMakeLists.txt).
#define MULTIGPU_TEST_NEEDS_GPUS(count)                                                   \
  do {                                                                                    \
    const std::string multigpu_why_not_ = ::multigpu_test::why_not_gpus(count);           \
    if (!multigpu_why_not_.empty()) {                                                     \
      std::cout << "multigpu test skipped: " << multigpu_why_not_ << std::endl;           \
      return;                                                                             \
    }                                                                                     \
  } while (false)

}  // namespace multigpu_test
