#pragma once
/// @file
/// Task files (see docs/scheduler.md, "Task files"): one shell command per line,
/// `#` comments, `[name=... done=... gpus=N after=A,B mem=12G]` options, `grid NAME =
/// VALUES...` lines whose `{NAME}` placeholders expand a command over every combination.

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/core.h>

#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scheduler/dependencies.hpp"
#include "multigpu/scheduler/task.hpp"
#include "multigpu/scheduler/text.hpp"

namespace multigpu {

/// The most tasks a task file may expand to unless the caller allows more
/// (multigpu-run --max-tasks): three grids of 1,000 values would otherwise
/// be 10^9 tasks, and all of the machine's memory.
constexpr std::size_t kDefaultMaxTasks = 100000;

/// Parses a task file (see docs/scheduler.md, "Task files"): one shell command per
/// line, `#` comments, `[name=... done=... gpus=N after=A,B mem=12G]` options before a command,
/// `grid NAME = VALUES...` lines whose variables `{NAME}` expand a command
/// over every combination. `source` names the text in errors (file:line);
/// `default_devices` is what a line without gpus=N needs. More than
/// `max_tasks` tasks is an error, found by counting each line's grid
/// combinations before expanding them (see kDefaultMaxTasks).
std::vector<Task> parse_tasks(std::string_view text, const std::string& source = "tasks", int default_devices = 1,
                              std::size_t max_tasks = kDefaultMaxTasks);
/// Reads and parses a task file.
std::vector<Task> read_task_file(const std::string& path, int default_devices = 1,
                                 std::size_t max_tasks = kDefaultMaxTasks);

namespace detail {

inline bool is_identifier(std::string_view text) {
  if (text.empty() || !(std::isalpha(static_cast<unsigned char>(text[0])) || text[0] == '_')) return false;
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

/// The `{name}` placeholders of a text ({{ and }} are literal braces).
inline std::vector<std::string> placeholders_of(const std::string& text) {
  std::vector<std::string> names;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text.compare(i, 2, "{{") == 0 || text.compare(i, 2, "}}") == 0) {
      ++i;
      continue;
    }
    if (text[i] != '{') continue;
    const std::size_t close = text.find('}', i);
    if (close == std::string::npos) break;
    const std::string name = text.substr(i + 1, close - i - 1);
    if (is_identifier(name)) names.push_back(name);
    i = close;
  }
  return names;
}

/// Fills grid values and turns {{ }} into { }; {gpu} and {task} stay for run time.
inline std::string expand_line(const std::string& text, const std::map<std::string, std::string>& values) {
  return fill_placeholders(text, values, /*unescape=*/true);
}

}  // namespace detail

inline std::vector<Task> parse_tasks(std::string_view text, const std::string& source, int default_devices,
                                     std::size_t max_tasks) {
  struct Grid {
    std::string name;
    std::vector<std::string> values;
  };
  std::vector<Grid> grids;
  std::vector<Task> tasks;
  std::vector<bool> named;
  std::vector<std::size_t> lines;  // per task: the line it comes from
  std::map<std::string, std::size_t> name_lines;
  const auto fail = [&](std::size_t line, const std::string& problem) -> SchedulerError {
    return SchedulerError(fmt::format("{}:{}: {}", source, line, problem));
  };

  std::size_t line_number = 0;
  std::size_t start_line = 0;
  std::string pending;
  std::istringstream in{std::string(text)};
  for (std::string raw; std::getline(in, raw);) {
    ++line_number;
    if (const auto nul = raw.find('\0'); nul != std::string::npos) {
      throw fail(line_number, fmt::format("a NUL byte at column {}; a task file is text, and the shell would cut the "
                                          "command there",
                                          nul + 1));
    }
    if (!raw.empty() && raw.back() == '\r') raw.pop_back();
    if (pending.empty()) start_line = line_number;
    if (!pending.empty()) raw = std::string(detail::trim(raw));  // a continuation's indent is layout
    if (!raw.empty() && raw.back() == '\\') {                   // continued on the next line
      pending += std::string(detail::trim(raw.substr(0, raw.size() - 1))) + " ";
      continue;
    }
    std::string line = pending + raw;
    pending.clear();
    const std::string_view trimmed = detail::trim(line);
    if (trimmed.empty() || trimmed.front() == '#') continue;

    if (trimmed.substr(0, 5) == "grid " || trimmed.substr(0, 5) == "grid\t") {
      const std::string body(trimmed.substr(5));
      const auto equals = body.find('=');
      const std::string name(detail::trim(body.substr(0, equals == std::string::npos ? body.size() : equals)));
      if (equals == std::string::npos || !detail::is_identifier(name)) {
        throw fail(start_line, "a grid line reads `grid NAME = VALUE VALUE ...` (NAME: letters, digits, _)");
      }
      Grid grid{name, {}};
      std::istringstream values(body.substr(equals + 1));
      for (std::string value; values >> value;) grid.values.push_back(value);
      if (grid.values.empty()) throw fail(start_line, fmt::format("grid {} has no values", name));
      if (name == "gpu" || name == "task") {
        throw fail(start_line, fmt::format("{{{}}} is filled in at run time; choose another grid name", name));
      }
      grids.erase(std::remove_if(grids.begin(), grids.end(), [&](const Grid& g) { return g.name == name; }),
                  grids.end());
      grids.push_back(std::move(grid));
      continue;
    }

    std::string options_text;
    std::string command(trimmed);
    if (command.front() == '[') {
      const auto close = command.find(']');
      if (close == std::string::npos) throw fail(start_line, "an option list `[` has no closing `]`");
      options_text = command.substr(1, close - 1);
      command = std::string(detail::trim(std::string_view(command).substr(close + 1)));
    }
    if (command.empty()) throw fail(start_line, "the line has options but no command");
    std::string name_template;
    std::string done_template;
    std::string after_template;  // comma-separated names
    int devices = default_devices;
    std::int64_t memory_mib = -1;
    std::istringstream option_stream(options_text);
    for (std::string option; option_stream >> option;) {
      const auto equals = option.find('=');
      const std::string key = option.substr(0, equals);
      const std::string value = equals == std::string::npos ? "" : option.substr(equals + 1);
      if (equals == std::string::npos || value.empty()) {
        throw fail(start_line, fmt::format("option \"{}\" needs a value: name=..., done=..., gpus=N, after=NAME,..., mem=SIZE",
                                           option));
      }
      if (key == "name") {
        name_template = value;
      } else if (key == "done") {
        done_template = value;
      } else if (key == "gpus") {
        int parsed = 0;
        if (detail::parse_index(value, parsed) != detail::NumberStatus::kOk || parsed < 1) {
          throw fail(start_line, fmt::format("gpus={} is not a number of devices (1 or more)", value));
        }
        devices = parsed;
      } else if (key == "mem") {
        const auto mib = parse_memory_mib(value);
        if (!mib || *mib == 0) {
          throw fail(start_line, fmt::format("mem={} is not a size of GPU memory; write more than 0 with a unit: "
                                             "mem=12G, mem=1.5G or mem=800M (G: GiB, M: MiB)",
                                             value));
        }
        memory_mib = *mib;
      } else if (key == "after") {
        after_template += (after_template.empty() ? "" : ",") + value;  // after= twice: both lists
      } else {
        throw fail(start_line, fmt::format("unknown option \"{}\"; valid: name, done, gpus, after, mem", key));
      }
    }

    // Which grid variables the line uses; unknown names are an error.
    std::vector<std::size_t> used;
    for (const std::string* part : {&name_template, &done_template, &after_template, &command}) {
      for (const auto& placeholder : detail::placeholders_of(*part)) {
        if (placeholder == "gpu" || placeholder == "task") continue;
        std::size_t found = grids.size();
        for (std::size_t g = 0; g < grids.size(); ++g) {
          if (grids[g].name == placeholder) found = g;
        }
        if (found == grids.size()) {
          std::string known;
          for (const auto& g : grids) known += fmt::format("{{{}}}, ", g.name);
          throw fail(start_line, fmt::format("unknown placeholder {{{}}}; known: {}{{gpu}} and {{task}} (write {{{{ "
                                             "and }}}} for literal braces)",
                                             placeholder, known));
        }
        if (std::find(used.begin(), used.end(), found) == used.end()) used.push_back(found);
      }
    }
    std::sort(used.begin(), used.end());  // combinations in the order the grids were written

    // Counted before anything is expanded: the product saturates instead of overflowing.
    std::size_t combinations = 1;
    bool overflow = false;
    std::string factors;
    for (const std::size_t g : used) {
      const std::size_t size = grids[g].values.size();
      overflow = overflow || combinations > std::numeric_limits<std::size_t>::max() / size;
      combinations = overflow ? std::numeric_limits<std::size_t>::max() : combinations * size;
      factors += fmt::format("{}{} {}", factors.empty() ? "" : " x ", grids[g].name, size);
    }
    if (overflow || combinations > max_tasks || tasks.size() + combinations > max_tasks) {
      const std::string count = overflow ? "more than 2^64" : std::to_string(combinations);
      const std::string what = overflow || combinations > max_tasks
                                   ? fmt::format("this line expands to {} tasks (grids {})", count, factors)
                                   : fmt::format("with this line the file has {} tasks", tasks.size() + combinations);
      throw fail(start_line, fmt::format("{}, more than the limit of {}; give a larger --max-tasks (max_tasks in C++) "
                                         "to run that many",
                                         what, max_tasks));
    }

    std::vector<std::size_t> choice(used.size(), 0);
    while (true) {
      std::map<std::string, std::string> values;
      for (std::size_t u = 0; u < used.size(); ++u) values[grids[used[u]].name] = grids[used[u]].values[choice[u]];
      Task task;
      task.command = detail::expand_line(command, values);
      task.done_marker = detail::expand_line(done_template, values);
      task.devices = devices;
      task.memory_mib = memory_mib;
      task.name = detail::expand_line(name_template, values);
      const std::string after = detail::expand_line(after_template, values);
      for (std::size_t begin = 0; !after_template.empty() && begin <= after.size();) {
        const std::size_t comma = std::min(after.find(',', begin), after.size());
        const std::string name = after.substr(begin, comma - begin);
        if (name.empty()) {
          throw fail(start_line, fmt::format("after={} has an empty name; write after=NAME or after=NAME,NAME",
                                             after_template));
        }
        if (std::find(task.after.begin(), task.after.end(), name) == task.after.end()) task.after.push_back(name);
        begin = comma + 1;
      }
      if (!task.name.empty()) {
        const auto [where, inserted] = name_lines.emplace(task.name, start_line);
        if (!inserted) {
          throw fail(start_line, fmt::format("task name \"{}\" is already used on line {}; names must be unique (add "
                                             "grid variables to name=...)",
                                             task.name, where->second));
        }
      }
      named.push_back(!task.name.empty());
      lines.push_back(start_line);
      tasks.push_back(std::move(task));
      bool advanced = false;  // next combination, the last grid fastest
      for (std::size_t u = used.size(); u-- > 0;) {
        if (++choice[u] < grids[used[u]].values.size()) {
          advanced = true;
          break;
        }
        choice[u] = 0;
      }
      if (!advanced) break;
    }
  }
  if (!pending.empty()) throw fail(start_line, "the last line ends with `\\` but nothing follows");

  const std::size_t width = std::to_string(tasks.size()).size() < 2 ? 2 : std::to_string(tasks.size()).size();
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (named[i]) continue;
    std::string name = fmt::format("task-{:0{}}", i + 1, width);
    if (name_lines.count(name) != 0) name += "-" + std::to_string(i + 1);
    tasks[i].name = name;
  }
  if (const auto problem = detail::find_dependency_problem(tasks)) throw fail(lines[problem->task], problem->message);
  return tasks;
}

inline std::vector<Task> read_task_file(const std::string& path, int default_devices, std::size_t max_tasks) {
  std::ifstream in(path);
  if (!in) throw SchedulerError(fmt::format("cannot read the task file {}: {}", path, std::strerror(errno)));
  std::stringstream text;
  text << in.rdbuf();
  return parse_tasks(text.str(), path, default_devices, max_tasks);
}

}  // namespace multigpu
