#pragma once
/// @file
/// What a task's failure says: how a command ended, and whether it ran out
/// of GPU memory.

#include <cctype>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include <fmt/core.h>

#include "multigpu/scheduler/process.hpp"
#include "multigpu/device_spec.hpp"

namespace multigpu {
namespace detail {

/// Whether a failure's text says the GPU ran out of memory.
inline bool looks_like_out_of_memory(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text.find("out of memory") != std::string::npos || text.find("outofmemoryerror") != std::string::npos;
}

/// Whether the output in `path` from byte `from` on says the GPU ran out of
/// memory. Reads it in pieces, so a long log costs no memory.
inline bool output_mentions_out_of_memory(const std::string& path, std::uint64_t from) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  in.seekg(static_cast<std::streamoff>(from));
  constexpr std::size_t kPiece = 1 << 20;
  constexpr std::size_t kOverlap = 32;  // longer than any phrase looked for
  std::string carry;
  std::string piece(kPiece, '\0');
  while (in) {
    in.read(piece.data(), static_cast<std::streamsize>(piece.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    if (got == 0) break;
    const std::string text = carry + piece.substr(0, got);
    if (looks_like_out_of_memory(text)) return true;
    carry = text.substr(text.size() > kOverlap ? text.size() - kOverlap : 0);
  }
  return false;
}

/// What a command's exit says. /bin/sh exits with 128 + N when the command
/// it waited for was killed by signal N, and dash then prints the signal's
/// description ("Segmentation fault"); a program may also exit with such a
/// code itself. So "killed by" is said only when the shell's message is the
/// attempt's last line. `output`: the end of the attempt's output.
inline std::string describe_command_exit(const ProcessExit& exit, const std::string& output) {
  if (!exit.exit_code || *exit.exit_code <= 128 || *exit.exit_code >= 128 + NSIG) return exit.describe();
  const int signal = *exit.exit_code - 128;
  const char* abbreviation = sigabbrev_np(signal);
  if (abbreviation == nullptr) return exit.describe();
  std::string last_line(trim(output));
  if (const auto newline = last_line.rfind('\n'); newline != std::string::npos) last_line.erase(0, newline + 1);
  const std::string message = ::strsignal(signal);
  const bool shell_prefix = last_line.rfind("sh: ", 0) == 0 || last_line.rfind("bash: ", 0) == 0;  // bash as sh
  const bool from_shell = last_line == message || last_line == message + " (core dumped)" ||
                          (shell_prefix && last_line.find(message) != std::string::npos);
  if (from_shell) {
    return fmt::format("killed by SIG{} (signal {}; /bin/sh reported exit code {})", abbreviation, signal,
                       *exit.exit_code);
  }
  return fmt::format("exit code {} (a command under sh killed by SIG{}?)", *exit.exit_code, abbreviation);
}

}  // namespace detail
}  // namespace multigpu
