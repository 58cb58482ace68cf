#pragma once
/// @file
/// What made a task's done marker: the command recorded beside the log, so
/// that a changed command runs again. See Note [A done marker's command].

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/scheduler/log_dir.hpp"
#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {
namespace detail {

// Note [A done marker's command]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A done marker (`[done=PATH]`) is a file the task itself makes when it has
// finished; the scheduler skips a task whose marker exists. But the marker
// says nothing about what made it: change a grid value or a flag in the
// task file, and the old result would be taken for the new one. So when a
// command task succeeds and its marker exists, the scheduler records the
// command (as given, after grid expansion, before {gpu} is filled in: which
// GPU ran it does not matter) in LOG_DIR/.done/NAME.json. A task is done
// when its marker exists and
// - its record holds the same command: skipped;
// - its record holds another command: it runs again, and its log and the
//   dry run say so, with the old command;
// - there is no record (a marker made by hand, by another log folder's run,
//   or before records existed): it is trusted, as before, since running it
//   again could cost hours; --force NAME runs it.
// The command is recorded only when this attempt made the marker (it did not
// exist, or its time changed): a rerun that finds its old output and exits
// at once must not turn the old result into the new command's.
// The whole command is kept, not a hash: the record then says what changed.
// It is kept byte for byte: JSON holds text, so a command with bytes that are
// not UTF-8 (a Latin-1 file name) is written as text with U+FFFD in their
// place, for the reader, and also as `command_hex`, its bytes in hex, which
// is what is compared (otherwise it would never match, and run every time).
// Callables have no command: their marker alone decides.

/// The done marker's modification time, or nothing when there is none.
inline std::optional<std::filesystem::file_time_type> marker_time(const std::string& marker) {
  if (marker.empty()) return std::nullopt;
  std::error_code error;
  const auto time = std::filesystem::last_write_time(marker, error);
  if (error) return std::nullopt;
  return time;
}

/// Where the record of task `name`'s done marker is kept.
inline std::string done_record_path(const std::string& log_dir, const std::string& name) {
  return log_dir + "/.done/" + file_safe(name) + ".json";
}

/// `bytes` in hexadecimal, two digits a byte.
inline std::string hex_of(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(bytes.size() * 2);
  for (const char c : bytes) {
    const auto byte = static_cast<unsigned char>(c);
    hex += kDigits[byte >> 4];
    hex += kDigits[byte & 15];
  }
  return hex;
}

/// The bytes written in `hex` (see hex_of()), or nothing when it is not that.
inline std::optional<std::string> bytes_from_hex(std::string_view hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string bytes;
  bytes.reserve(hex.size() / 2);
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    const int high = digit(hex[i]);
    const int low = digit(hex[i + 1]);
    if (high < 0 || low < 0) return std::nullopt;
    bytes += static_cast<char>(high * 16 + low);
  }
  return bytes;
}

/// The command recorded for `name`, if there is a readable record.
inline std::optional<std::string> recorded_command(const std::string& log_dir, const std::string& name) {
  std::ifstream file(done_record_path(log_dir, name));
  if (!file) return std::nullopt;
  try {
    const auto json = nlohmann::json::parse(file);
    if (json.is_object() && json.contains("command_hex") && json["command_hex"].is_string()) {
      if (auto bytes = bytes_from_hex(json["command_hex"].get<std::string>())) return bytes;
      return std::nullopt;
    }
    if (json.is_object() && json.contains("command") && json["command"].is_string()) {
      return json["command"].get<std::string>();
    }
  } catch (const nlohmann::json::exception&) {
  }
  return std::nullopt;  // unreadable: as if none (see the Note)
}

/// Whether a task whose marker exists is done; when not, `why` says why it runs again.
inline bool marker_is_current(const std::string& log_dir, const Task& task, std::string* why) {
  if (task.command.empty()) return true;
  const auto recorded = recorded_command(log_dir, task.name);
  if (!recorded || *recorded == task.command) return true;
  if (why != nullptr) {
    *why = fmt::format("its done marker {} was made by another command: {}", task.done_marker, *recorded);
  }
  return false;
}

/// Records the command that made `task`'s marker. Throws std::runtime_error
/// (from the atomic write) when it cannot.
inline void record_done_command(const std::string& log_dir, const Task& task) {
  make_directories(log_dir + "/.done");
  nlohmann::ordered_json record{{"task", task.name},
                                {"command", task.command},
                                {"done_marker", task.done_marker},
                                {"recorded", iso8601(std::chrono::system_clock::now())}};
  // Byte for byte where the text cannot hold it: see the Note.
  if (invalid_utf8_at(task.command)) record["command_hex"] = hex_of(task.command);
  write_file_atomically(done_record_path(log_dir, task.name),
                        record.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

}  // namespace detail
}  // namespace multigpu
