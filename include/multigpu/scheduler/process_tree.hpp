#pragma once
// Which processes descend from which: read from /proc, for the scheduler's
// per-task GPU memory (see Note [What a task uses on its GPUs] in
// scheduler/gpu_memory.hpp).

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <vector>

namespace multigpu {
namespace detail {

/// The parent of a process from the text of its /proc/PID/stat ("PID (COMM)
/// STATE PPID ..."); -1 when the text is not that. COMM may hold spaces and
/// ')' itself, so the fields are read after the last ')'.
inline long parent_from_stat(const std::string& stat) {
  const auto close = stat.rfind(')');
  if (close == std::string::npos || close + 4 >= stat.size()) return -1;
  // ") S 1234 ..."
  const char* fields = stat.c_str() + close + 2;
  while (*fields != '\0' && *fields != ' ') ++fields;  // the state
  char* end = nullptr;
  const long parent = std::strtol(fields, &end, 10);
  return end == fields ? -1 : parent;
}

/// Every process's parent (pid -> parent pid), as /proc shows them now; empty
/// where there is no /proc.
inline std::map<long, long> process_parents() {
  std::map<long, long> parents;
  std::error_code error;
  for (std::filesystem::directory_iterator it("/proc", error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream file(it->path() / "stat");
    std::string stat;
    if (!std::getline(file, stat)) continue;  // it ended meanwhile
    const long parent = parent_from_stat(stat);
    if (parent >= 0) parents[std::strtol(name.c_str(), nullptr, 10)] = parent;
  }
  return parents;
}

/// Each process's children, from `parents` (see process_parents()).
inline std::map<long, std::vector<long>> process_children(const std::map<long, long>& parents) {
  std::map<long, std::vector<long>> children;
  for (const auto& [pid, parent] : parents) children[parent].push_back(pid);
  return children;
}

/// `root` and every process below it (see process_children()).
inline std::set<long> process_tree(const std::map<long, std::vector<long>>& children, long root) {
  std::set<long> tree{root};
  std::vector<long> todo{root};
  while (!todo.empty()) {
    const long pid = todo.back();
    todo.pop_back();
    const auto found = children.find(pid);
    if (found == children.end()) continue;
    for (long child : found->second) {
      if (tree.insert(child).second) todo.push_back(child);
    }
  }
  return tree;
}

}  // namespace detail
}  // namespace multigpu
