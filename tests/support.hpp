#pragma once
// Helpers shared by the tests. Include it first: LibTorch (through glog)
// defines CHECK macros that clash with doctest's, so LibTorch comes first and
// its macros are dropped before doctest defines its own.

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

}  // namespace multigpu_test
