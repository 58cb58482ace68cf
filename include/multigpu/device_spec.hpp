#pragma once
/// @file
/// The two small languages that name devices: multigpu's device specs
/// ("auto", "auto:2", "all", "cpu", "cuda", "0,1,4,7", "cuda:0,cuda:2") and
/// CUDA's own CUDA_VISIBLE_DEVICES. Parsing only: whether the devices exist is
/// decided by DeviceManager (device.hpp). This header needs no LibTorch, so
/// the parsers can be fuzzed on their own.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

#include "multigpu/error.hpp"

namespace multigpu {

/// A parsed device spec; what it resolves to depends on the machine.
struct DeviceSpec {
  /// What the spec asks for.
  enum class Kind {
    kAuto,  ///< "auto": every visible non-busy GPU, else the CPU (with a warning); "auto:N": the N freest
    kAll,   ///< "all": every visible GPU, busy ones too
    kCpu,   ///< "cpu" (or "cpu,cpu,..." for several CPU replicas)
    kCuda,  ///< "cuda": the first visible GPU, as torch::Device("cuda") means
    kList,  ///< "0,1,4,7" / "cuda:0,cuda:2": these logical GPU numbers, in this order
  };
  /// Which form the spec has.
  Kind kind = Kind::kAuto;
  /// kAuto: 0 for every free GPU, else N from "auto:N". kCpu: number of CPU replicas.
  int count = 0;
  /// kList: logical GPU numbers (as CUDA numbers them after CUDA_VISIBLE_DEVICES), in order.
  std::vector<int> gpus;
  /// The spec as written, for messages.
  std::string text;
};

/// Parses a device spec. Whitespace around items is ignored and keywords are
/// case-insensitive. Throws DeviceError naming the spec, the problem and the
/// valid forms. Duplicates are kept here; DeviceManager decides about them.
DeviceSpec parse_device_spec(std::string_view spec);

/// One entry of CUDA_VISIBLE_DEVICES that CUDA honours.
struct VisibleDeviceEntry {
  /// Index: a GPU number in CUDA's enumeration order. Uuid: "GPU-..." (a
  /// unique prefix is enough). Mig: "MIG-..." (a MIG instance).
  enum class Kind { kIndex, kUuid, kMig };
  /// Which form the entry has.
  Kind kind = Kind::kIndex;
  int index = -1;     ///< kIndex: the number.
  std::string text;   ///< The entry as written, trimmed.
};

/// CUDA_VISIBLE_DEVICES as CUDA reads it.
struct VisibleDevices {
  bool set = false;   ///< The variable exists (an empty value hides every GPU).
  std::string value;  ///< Its value as found.
  /// The entries CUDA honours, in order: logical GPU i is entries[i].
  std::vector<VisibleDeviceEntry> entries;
  /// Where CUDA stops reading, if it does: CUDA ignores an invalid entry and
  /// everything after it. Empty when every entry is used.
  std::string ignored;
  /// Why reading stopped there (for the report and a warning).
  std::string problem;
};

/// Parses CUDA_VISIBLE_DEVICES the way CUDA does: entries are GPU numbers or
/// UUIDs; reading stops at the first invalid or repeated entry (everything
/// from there on is ignored, which is reported, not thrown). `set` false
/// means the variable is absent: every GPU is visible. Never throws for any
/// value.
VisibleDevices parse_cuda_visible_devices(bool set, std::string_view value);

/// Which GPUs CUDA shows, given the machine's GPUs in CUDA's enumeration
/// order (their UUIDs, "GPU-..."). Returns positions in that order, one per
/// logical GPU. An index past the last GPU or a UUID that matches none (or
/// several) stops the list there, as in CUDA; `why` (if given) says so.
std::vector<int> apply_cuda_visible_devices(const VisibleDevices& cvd,
                                            const std::vector<std::string>& uuids,
                                            std::string* why = nullptr);

namespace detail {

/// The text in double quotes, with bytes outside printable ASCII written as
/// \xNN, so that any user input is safe to put in a message.
inline std::string quote(std::string_view text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  out += '"';
  return out;
}

inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

inline std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

inline bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

/// Splits on commas, keeping empty pieces.
inline std::vector<std::string_view> split_commas(std::string_view s) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  while (true) {
    std::size_t comma = s.find(',', start);
    if (comma == std::string_view::npos) {
      parts.push_back(s.substr(start));
      return parts;
    }
    parts.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
}

/// Result of reading a non-negative decimal number.
enum class NumberStatus { kOk, kEmpty, kNegative, kNotANumber, kTooLarge };

/// Reads all of `s` as a non-negative int (digits only, no sign or spaces).
inline NumberStatus parse_index(std::string_view s, int& out) {
  if (s.empty()) return NumberStatus::kEmpty;
  if (s.front() == '-') return NumberStatus::kNegative;
  long long value = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return NumberStatus::kNotANumber;
    value = value * 10 + (c - '0');
    if (value > 1000000) return NumberStatus::kTooLarge;  // no machine has a million GPUs
  }
  out = static_cast<int>(value);
  return NumberStatus::kOk;
}

constexpr const char* kValidSpecs =
    "valid: auto, auto:N, all, cpu, cuda, or GPU numbers such as 0,1,4,7 or cuda:0,cuda:2";

[[noreturn]] inline void throw_spec_error(std::string_view spec, const std::string& problem) {
  throw DeviceError(fmt::format("device spec {}: {}; {}", quote(spec), problem, kValidSpecs));
}

/// The first byte outside printable ASCII (or -1), for a precise message.
inline std::ptrdiff_t first_non_ascii(std::string_view s) {
  for (std::size_t i = 0; i < s.size(); ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if ((c < 0x20 && !is_space(s[i])) || c >= 0x7f) return static_cast<std::ptrdiff_t>(i);
  }
  return -1;
}

/// One list item of a device spec: a GPU number or "cpu".
struct SpecItem {
  bool cpu = false;
  int gpu = -1;
};

inline SpecItem parse_spec_item(std::string_view spec, std::string_view raw, std::size_t position) {
  const std::string_view item = trim(raw);
  const std::string lower = ascii_lower(item);
  const std::string where = fmt::format("item {} ({})", position + 1, quote(item));
  if (item.empty()) throw_spec_error(spec, fmt::format("item {} is empty", position + 1));
  if (lower == "cpu") return SpecItem{true, -1};
  if (lower == "auto" || starts_with(lower, "auto:") || lower == "all") {
    throw_spec_error(spec, fmt::format("{} is a whole spec and cannot be part of a list", quote(item)));
  }
  if (starts_with(lower, "cpu:")) {
    throw_spec_error(spec, fmt::format("{}: a CPU has no number; for several CPU replicas "
                                       "repeat it (cpu,cpu) and allow duplicates", where));
  }
  std::string_view number = item;
  if (starts_with(lower, "cuda:")) {
    number = trim(item.substr(5));
  } else if (lower == "cuda") {
    throw_spec_error(spec, fmt::format("{}: inside a list, name GPUs by number (cuda:0)", where));
  } else if (starts_with(lower, "gpu") || starts_with(lower, "device")) {
    throw_spec_error(spec, fmt::format("{}: write GPUs as plain numbers (0) or cuda:N", where));
  }
  int index = -1;
  switch (parse_index(number, index)) {
    case NumberStatus::kOk:
      return SpecItem{false, index};
    case NumberStatus::kEmpty:
      throw_spec_error(spec, fmt::format("{}: a GPU number is missing after \"cuda:\"", where));
    case NumberStatus::kNegative:
      throw_spec_error(spec, fmt::format("{}: GPU numbers are 0 or more", where));
    case NumberStatus::kTooLarge:
      throw_spec_error(spec, fmt::format("{}: GPU number is too large", where));
    case NumberStatus::kNotANumber:
      break;
  }
  throw_spec_error(spec, fmt::format("{} is not a GPU number", where));
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline DeviceSpec parse_device_spec(std::string_view spec) {
  DeviceSpec result;
  result.text = std::string(spec);
  const std::ptrdiff_t bad = detail::first_non_ascii(spec);
  if (bad >= 0) {
    detail::throw_spec_error(
        spec, fmt::format("byte {} (0x{:02x}) is not a printable ASCII character", bad + 1,
                          static_cast<unsigned char>(spec[static_cast<std::size_t>(bad)])));
  }
  const std::string_view body = detail::trim(spec);
  if (body.empty()) detail::throw_spec_error(spec, "the spec is empty");
  const std::string lower = detail::ascii_lower(body);

  if (lower == "auto") return result;
  if (detail::starts_with(lower, "auto:")) {
    const std::string_view number = detail::trim(body.substr(5));
    int n = 0;
    const auto status = detail::parse_index(number, n);
    if (status != detail::NumberStatus::kOk || n == 0) {
      detail::throw_spec_error(
          spec, fmt::format("\"auto:N\" needs a GPU count N of 1 or more, got {}", detail::quote(number)));
    }
    result.count = n;
    return result;
  }
  if (lower == "all") {
    result.kind = DeviceSpec::Kind::kAll;
    return result;
  }
  if (lower == "cuda") {
    result.kind = DeviceSpec::Kind::kCuda;
    return result;
  }

  const auto pieces = detail::split_commas(body);
  int cpus = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const detail::SpecItem item = detail::parse_spec_item(spec, pieces[i], i);
    if (item.cpu) {
      ++cpus;
    } else {
      result.gpus.push_back(item.gpu);
    }
  }
  if (cpus > 0 && !result.gpus.empty()) {
    detail::throw_spec_error(spec, "CPU and GPUs cannot be mixed: replicas must be all GPUs or all CPU");
  }
  if (cpus > 0) {
    result.kind = DeviceSpec::Kind::kCpu;
    result.count = cpus;
  } else {
    result.kind = DeviceSpec::Kind::kList;
  }
  return result;
}

inline VisibleDevices parse_cuda_visible_devices(bool set, std::string_view value) {
  VisibleDevices result;
  result.set = set;
  result.value = std::string(value);
  if (!set) return result;
  const std::string_view body = detail::trim(value);
  if (body.empty()) return result;  // set but empty: no GPU at all

  const auto pieces = detail::split_commas(body);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const std::string_view entry = detail::trim(pieces[i]);
    VisibleDeviceEntry parsed;
    parsed.text = std::string(entry);
    std::string problem;
    if (detail::starts_with(entry, "GPU-") && entry.size() > 4) {
      parsed.kind = VisibleDeviceEntry::Kind::kUuid;
    } else if (detail::starts_with(entry, "MIG-") && entry.size() > 4) {
      parsed.kind = VisibleDeviceEntry::Kind::kMig;
    } else {
      switch (detail::parse_index(entry, parsed.index)) {
        case detail::NumberStatus::kOk:
          break;
        case detail::NumberStatus::kEmpty:
          problem = fmt::format("entry {} is empty", i + 1);
          break;
        case detail::NumberStatus::kNegative:
          problem = fmt::format("entry {} ({}) is negative", i + 1, detail::quote(entry));
          break;
        case detail::NumberStatus::kTooLarge:
          problem = fmt::format("entry {} ({}) is too large", i + 1, detail::quote(entry));
          break;
        case detail::NumberStatus::kNotANumber:
          problem = fmt::format("entry {} ({}) is neither a GPU number nor a GPU-/MIG- UUID", i + 1,
                                detail::quote(entry));
          break;
      }
    }
    if (problem.empty()) {
      for (const auto& earlier : result.entries) {
        if (earlier.text == parsed.text) {
          problem = fmt::format("entry {} ({}) repeats an earlier one", i + 1, detail::quote(entry));
          break;
        }
      }
    }
    if (!problem.empty()) {
      result.ignored = std::string(body.substr(static_cast<std::size_t>(pieces[i].data() - body.data())));
      result.problem = problem;
      return result;
    }
    result.entries.push_back(std::move(parsed));
  }
  return result;
}

inline std::vector<int> apply_cuda_visible_devices(const VisibleDevices& cvd,
                                                   const std::vector<std::string>& uuids,
                                                   std::string* why) {
  std::vector<int> visible;
  if (!cvd.set) {
    for (std::size_t i = 0; i < uuids.size(); ++i) visible.push_back(static_cast<int>(i));
    return visible;
  }
  auto stop = [&](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return visible;
  };
  for (std::size_t i = 0; i < cvd.entries.size(); ++i) {
    const auto& entry = cvd.entries[i];
    int position = -1;
    if (entry.kind == VisibleDeviceEntry::Kind::kIndex) {
      if (entry.index >= static_cast<int>(uuids.size())) {
        return stop(fmt::format("entry {} ({}) names GPU {}, but the machine has {} GPU(s)", i + 1,
                                detail::quote(entry.text), entry.index, uuids.size()));
      }
      position = entry.index;
    } else {
      int matches = 0;
      for (std::size_t g = 0; g < uuids.size(); ++g) {
        if (detail::starts_with(uuids[g], entry.text)) {
          position = static_cast<int>(g);
          ++matches;
        }
      }
      if (matches != 1) {
        return stop(fmt::format("entry {} ({}) matches {} GPU(s)", i + 1, detail::quote(entry.text),
                                matches == 0 ? "no" : "several"));
      }
    }
    for (int earlier : visible) {
      if (earlier == position) {
        return stop(fmt::format("entry {} ({}) names a GPU already listed", i + 1,
                                detail::quote(entry.text)));
      }
    }
    visible.push_back(position);
  }
  if (why != nullptr && !cvd.problem.empty()) *why = cvd.problem;
  return visible;
}

}  // namespace multigpu
