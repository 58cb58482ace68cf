#pragma once
/// @file
/// The exception hierarchy of multigpu, and the sink for its warnings.
///
/// Every error that multigpu raises derives from multigpu::Error, so one catch
/// clause covers the library. Messages say what was asked, what is wrong and
/// what would be valid, for example:
///   device spec "0,9": cuda:9 is not visible; visible: cuda:0..cuda:3
///   (CUDA_VISIBLE_DEVICES=0,1,4,7)

#include <cstdio>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <c10/util/Exception.h>
#include <fmt/core.h>

#include "multigpu/config.hpp"

namespace multigpu {

/// Root of every exception thrown by multigpu.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A device spec that cannot be parsed or satisfied, or a device query that failed.
class DeviceError : public Error {
 public:
  using Error::Error;
};

/// A collective operation failed or timed out.
class CommError : public Error {
 public:
  using Error::Error;
};

/// Something went wrong on one replica; the message and the accessors name it.
class ReplicaError : public Error {
 public:
  /// `what` already names the replica and device; the fields are for code.
  ReplicaError(const std::string& what, int replica, std::string device, std::exception_ptr cause = nullptr)
      : Error(what), replica_(replica), device_(std::move(device)), cause_(std::move(cause)) {}
  /// Index of the replica (0 is the primary).
  int replica() const noexcept { return replica_; }
  /// The replica's device, as LibTorch writes it ("cuda:1", "cpu").
  const std::string& device() const noexcept { return device_; }
  /// The exception the replica threw (null when the failure was detected, not thrown),
  /// e.g. to tell a c10::OutOfMemoryError apart: std::rethrow_exception(e.cause()).
  const std::exception_ptr& cause() const noexcept { return cause_; }

 private:
  int replica_;
  std::string device_;
  std::exception_ptr cause_;
};

/// A checkpoint could not be saved or loaded (not one of this model, damaged, an unwritable path, a bad value).
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// A task queue could not be run as asked (bad task file, bad options), or a run's summary could not be read.
class SchedulerError : public Error {
 public:
  using Error::Error;
};

/// Rendezvous or cross-process communication failed.
class DistributedError : public Error {
 public:
  using Error::Error;
};

/// How loud a message is.
enum class LogLevel { kInfo, kWarning };

/// Receives multigpu's informational lines and warnings (without a trailing newline).
using LogHandler = std::function<void(LogLevel, std::string_view)>;

namespace detail {
struct LogState {
  std::mutex mutex;
  LogHandler handler;
};
inline LogState& log_state() {
  static LogState state;
  return state;
}
inline void default_log_handler(LogLevel level, std::string_view message) {
  // fwrite, not fmt::print: a warning must not throw when stderr is gone (a
  // closed terminal, a pipe whose reader ended).
  const std::string line = fmt::format("multigpu: {}{}\n", level == LogLevel::kWarning ? "warning: " : "", message);
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}
}  // namespace detail

/// Replaces where warnings go (default: one line on stderr, prefixed
/// "multigpu: warning: "). Returns the previous handler; an empty handler
/// restores the default. Thread-safe.
inline LogHandler set_log_handler(LogHandler handler) {
  auto& state = detail::log_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  std::swap(state.handler, handler);
  return handler;
}

/// Sends one message to the current handler. Thread-safe.
inline void log(LogLevel level, std::string_view message) {
  auto& state = detail::log_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.handler) {
    state.handler(level, message);
  } else {
    detail::default_log_handler(level, message);
  }
}

/// Shorthand for log(LogLevel::kWarning, message).
inline void warn(std::string_view message) { log(LogLevel::kWarning, message); }

/// The text of an exception, without LibTorch's C++ backtrace (for messages
/// that carry another thread's or process's failure).
inline std::string describe_exception(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

}  // namespace multigpu
