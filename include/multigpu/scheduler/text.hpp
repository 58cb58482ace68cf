#pragma once
/// @file
/// How the scheduler writes text into its files: UTF-8 checks, CSV fields,
/// times, and memory sizes (memory_text and parse_memory_mib are public:
/// sizes as the scheduler writes them, and as task files give them).

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

namespace multigpu {
namespace detail {

/// The length of the valid UTF-8 sequence at the start of `text` (0 if none).
inline std::size_t utf8_sequence_length(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  std::size_t length = 0;
  unsigned char low = 0x80;
  unsigned char high = 0xBF;
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;   // no overlong forms
    if (lead == 0xED) high = 0x9F;  // no surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;  // nothing above U+10FFFF
  } else {
    return 0;
  }
  if (text.size() < length) return 0;
  if (byte(1) < low || byte(1) > high) return 0;
  for (std::size_t i = 2; i < length; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return length;
}

/// The byte offset of the first invalid UTF-8 sequence in `text`, if any.
inline std::optional<std::size_t> invalid_utf8_at(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_sequence_length(text.substr(i));
    if (length == 0) return i;
    i += length;
  }
  return std::nullopt;
}

/// CSV field (RFC 4180).
inline std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

/// "2026-11-22T16:02:05Z".
inline std::string iso8601(std::chrono::system_clock::time_point time) {
  if (time.time_since_epoch().count() == 0) return "";
  const std::time_t t = std::chrono::system_clock::to_time_t(time);
  std::tm utc{};
  gmtime_r(&t, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

/// "1:02:03" or "2:03".
inline std::string clock_text(double seconds) {
  const auto total = static_cast<long>(seconds + 0.5);
  return total >= 3600 ? fmt::format("{}:{:02}:{:02}", total / 3600, (total / 60) % 60, total % 60)
                       : fmt::format("{}:{:02}", total / 60, total % 60);
}

/// "cuda:0, cuda:1": device labels for messages.
inline std::string on_text(const std::vector<std::string>& labels) {
  std::string on;
  for (const auto& label : labels) on += (on.empty() ? "" : ", ") + label;
  return on;
}

}  // namespace detail

/// "9.5 GiB", "900 MiB": `bytes` as the scheduler writes sizes ("unknown" when negative).
inline std::string memory_text(std::int64_t bytes) {
  if (bytes < 0) return "unknown";
  const double mib = static_cast<double>(bytes) / (1 << 20);
  return mib >= 1024 ? fmt::format("{:.1f} GiB", mib / 1024) : fmt::format("{:.0f} MiB", mib);
}

/// MiB from a size text: "12G", "12GiB", "12GB", "1.5G", "500M", "500MiB"
/// (G and GB mean GiB, M and MB MiB, as nvidia-smi counts; parts of a MiB
/// round up, "0M" is 0); nullopt for anything else, a bare number included
/// (its unit would be a guess), and for more than 2^30 MiB.
inline std::optional<std::int64_t> parse_memory_mib(std::string_view text) {
  std::size_t digits = 0;
  while (digits < text.size() && (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.')) {
    ++digits;
  }
  if (digits == 0 || digits == text.size()) return std::nullopt;
  const std::string number(text.substr(0, digits));
  if (std::count(number.begin(), number.end(), '.') > 1 || number.front() == '.' || number.back() == '.') {
    return std::nullopt;
  }
  std::string unit(text.substr(digits));
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double scale = 0;
  if (unit == "G" || unit == "GB" || unit == "GIB") scale = 1024;
  if (unit == "M" || unit == "MB" || unit == "MIB") scale = 1;
  if (scale == 0) return std::nullopt;
  const double mib = std::strtod(number.c_str(), nullptr) * scale;
  if (!(mib >= 0) || mib > static_cast<double>(1 << 30)) return std::nullopt;
  return static_cast<std::int64_t>(std::ceil(mib));
}

}  // namespace multigpu
