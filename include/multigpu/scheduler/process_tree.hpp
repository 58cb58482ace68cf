#pragma once
// Which processes descend from which: read from /proc, for the scheduler's
// per-task GPU memory (see Note [What a task uses on its GPUs] in
// scheduler/gpu_memory.hpp) and for ending every process a task started
// (see Note [Every process a task started]).

#include <algorithm>
#include <csignal>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

namespace multigpu {
namespace detail {

/// One process as its /proc/PID/stat shows it.
struct ProcessEntry {
  long pid = -1;
  long parent = -1;
  long group = -1;      ///< Its process group.
  bool zombie = false;  ///< Ended, not yet reaped (its children have been re-parented).
  bool below = false;   ///< Set by for_each_descendant(): below the root.
};

/// Reads the parent, process group and state from the text of a
/// /proc/PID/stat ("PID (COMM) STATE PPID PGRP ..."); false when the text is
/// not that. COMM may hold spaces and ')' itself, so the fields are read after
/// the last ')'. Allocates nothing (the task supervisor calls it).
inline bool parse_stat(const char* text, std::size_t size, ProcessEntry& entry) {
  std::size_t close = size;
  for (std::size_t i = size; i > 0; --i) {
    if (text[i - 1] == ')') {
      close = i - 1;
      break;
    }
  }
  if (close == size || close + 4 >= size) return false;
  std::size_t at = close + 2;  // ") S 1234 ..."
  const char state = text[at];
  while (at < size && text[at] != ' ') ++at;  // the state
  long fields[2] = {-1, -1};
  for (long& field : fields) {
    while (at < size && text[at] == ' ') ++at;
    bool negative = at < size && text[at] == '-';
    if (negative) ++at;
    const std::size_t first = at;
    long value = 0;
    while (at < size && text[at] >= '0' && text[at] <= '9') value = value * 10 + (text[at++] - '0');
    if (at == first) return false;
    field = negative ? -value : value;
  }
  entry.parent = fields[0];
  entry.group = fields[1];
  entry.zombie = state == 'Z' || state == 'X';
  return true;
}

/// The parent of a process from the text of its /proc/PID/stat; -1 when the
/// text is not that (see parse_stat()).
inline long parent_from_stat(const std::string& stat) {
  ProcessEntry entry;
  return parse_stat(stat.data(), stat.size(), entry) ? entry.parent : -1;
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

// Note [Every process a task started]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A process group does not hold everything a task starts: torchrun starts its
// workers with start_new_session=True, and `setsid`, `nohup setsid` or
// Popen(start_new_session=True) do the same. A signal to the task's group
// misses them, and they would go on holding their GPUs after the task was
// reported ended. What does hold them is descent: the task supervisor is a
// child subreaper (PR_SET_CHILD_SUBREAPER), so a process whose parent ends is
// re-parented to the supervisor, not to init, and every process the task
// started, in any session, stays below the supervisor for as long as the
// supervisor lives. for_each_descendant() finds them through /proc, and:
//
// - At a stop the supervisor forwards the stop signal (SIGTERM, SIGINT,
//   SIGHUP) to every process below it outside its own group (the group has
//   it from the scheduler already; once is enough for a program that saves on
//   the first SIGTERM).
// - Before it ends, whatever the reason (the shell ended on its own, a stop,
//   the end of the grace period after the scheduler died), the supervisor
//   SIGKILLs everything still below it and waits until it has no child left:
//   with a subreaper, no child means no descendant. So the task is reported
//   ended, and the log folder's lock freed, only when all of it is gone.
// - At the end of the grace period the scheduler does not trust the
//   supervisor to be able to (a task may have stopped it with SIGSTOP): it
//   SIGKILLs every process below the supervisor itself, in rounds until a
//   round finds none it has not signalled (a process killed while it forked
//   may leave a child that the first scan did not see), and only then the
//   supervisor and its group.
//
// Only a process that leaves the tree on purpose escapes: one whose parent is
// killed together with the supervisor (`kill -9 0` from the task; then init
// inherits it), or one that a daemon outside the task starts for it.
//
// The supervisor is a fork of a multithreaded process: it may not allocate.
// The scan below uses system calls only (getdents64 on /proc, read of each
// stat file into a buffer on the stack) and keeps its table in memory from
// mmap.

/// The processes of the machine in a table, read from /proc without
/// allocating on the heap (memory from mmap), so that the task supervisor
/// can use it. Empty where there is no /proc.
class ProcessTable {
 public:
  ProcessTable() { read(); }
  ~ProcessTable() {
    if (entries_ != nullptr) ::munmap(entries_, capacity_ * sizeof(ProcessEntry));
  }
  ProcessTable(const ProcessTable&) = delete;
  ProcessTable& operator=(const ProcessTable&) = delete;

  ProcessEntry* begin() { return entries_; }
  ProcessEntry* end() { return entries_ + size_; }

  /// Marks `below` on every process below `root` (not `root` itself).
  void mark_below(long root) {
    std::sort(begin(), end(), [](const ProcessEntry& a, const ProcessEntry& b) { return a.pid < b.pid; });
    for (bool changed = true; changed;) {  // parents need not have smaller pids
      changed = false;
      for (ProcessEntry& entry : *this) {
        if (entry.below || entry.pid == root) continue;
        bool below = entry.parent == root;
        if (!below) {
          const ProcessEntry* parent = find(entry.parent);
          below = parent != nullptr && parent->below;
        }
        if (below) entry.below = changed = true;
      }
    }
  }

 private:
  const ProcessEntry* find(long pid) const {
    const ProcessEntry* found = std::lower_bound(
        entries_, entries_ + size_, pid, [](const ProcessEntry& entry, long key) { return entry.pid < key; });
    return found != entries_ + size_ && found->pid == pid ? found : nullptr;
  }

  bool grow() {
    const std::size_t capacity = capacity_ == 0 ? 4096 : capacity_ * 2;
    void* memory = ::mmap(nullptr, capacity * sizeof(ProcessEntry), PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return false;
    auto* entries = static_cast<ProcessEntry*>(memory);
    std::copy(entries_, entries_ + size_, entries);
    if (entries_ != nullptr) ::munmap(entries_, capacity_ * sizeof(ProcessEntry));
    entries_ = entries;
    capacity_ = capacity;
    return true;
  }

  void read() {
    const int proc = ::open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (proc < 0) return;
    alignas(8) char names[4096];
    while (true) {
      const long got = ::syscall(SYS_getdents64, proc, names, sizeof(names));
      if (got <= 0) break;
      for (long at = 0; at < got;) {
        // struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, char name[]
        unsigned short length = 0;
        __builtin_memcpy(&length, names + at + 16, sizeof(length));
        const char* name = names + at + 19;
        at += length;
        long pid = 0;
        const char* digit = name;
        for (; *digit >= '0' && *digit <= '9'; ++digit) pid = pid * 10 + (*digit - '0');
        if (digit == name || *digit != '\0') continue;
        char path[32] = "/proc/";
        std::size_t end = 6;
        for (const char* c = name; *c != '\0' && end < 20; ++c) path[end++] = *c;
        for (const char* c = "/stat"; *c != '\0'; ++c) path[end++] = *c;
        path[end] = '\0';
        const int file = ::open(path, O_RDONLY | O_CLOEXEC);
        if (file < 0) continue;  // it ended meanwhile
        char stat[512];          // COMM is at most 16 bytes: the fields needed come early
        const ssize_t size = ::read(file, stat, sizeof(stat));
        ::close(file);
        ProcessEntry entry;
        entry.pid = pid;
        if (size <= 0 || !parse_stat(stat, static_cast<std::size_t>(size), entry)) continue;
        if (size_ == capacity_ && !grow()) break;
        entries_[size_++] = entry;
      }
    }
    ::close(proc);
  }

  ProcessEntry* entries_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t size_ = 0;
};

/// Calls `visit(const ProcessEntry&)` for every process below `root` (not
/// `root` itself), as /proc shows them now. Allocates nothing on the heap.
/// See Note [Every process a task started].
template <class Visit>
void for_each_descendant(long root, Visit visit) {
  ProcessTable table;
  table.mark_below(root);
  for (const ProcessEntry& entry : table) {
    if (entry.below) visit(entry);
  }
}

/// SIGKILLs every process below `root` (not `root` itself), in rounds until
/// a round finds none it has not signalled (at most 50). For the scheduler,
/// not the supervisor: it allocates. See Note [Every process a task started].
inline void kill_descendants(long root) {
  std::set<long> signalled;
  for (int round = 0; round < 50; ++round) {
    bool found_new = false;
    for_each_descendant(root, [&](const ProcessEntry& entry) {
      if (entry.zombie || !signalled.insert(entry.pid).second) return;
      found_new = true;
      ::kill(static_cast<pid_t>(entry.pid), SIGKILL);
    });
    if (!found_new) return;
  }
}

}  // namespace detail
}  // namespace multigpu
