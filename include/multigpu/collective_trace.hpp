#pragma once
/// @file
/// CollectiveTrace: the last N collectives a process issued across
/// processes (sequence number, kind, purpose, bytes, dtype, state, times),
/// kept in a fixed ring, read online: by the error of a failed collective,
/// which compares the processes' traces (see Note [The collective trace]),
/// and by the user on demand (ProcessGroup::trace(), dump_trace_on_signal).
/// CollectivePurpose tells the trace what the collectives issued on the
/// calling thread are for.

#include "multigpu/config.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/core.h>

namespace multigpu {

// Note [The collective trace]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Collectives across processes pair by order: the k-th collective of one
// process meets the k-th of every other. When a process issues one more,
// one less or another one (it skipped a step, called save_state alone,
// bucketed its gradients in another order, built another model), the
// others wait until the time-out, or pair the wrong tensors, and the error
// says only "all-reduce timed out". What helps is where each process is:
// "rank 0 waits in all_reduce #13 (gradient bucket 1, 1.2 KiB float);
// rank 1 is in barrier #13". PyTorch's Flight Recorder keeps such records
// for a post-mortem dump read by Python tools; here they are read online,
// by the failing collective itself:
//
//   1. Every ProcessGroup keeps the last N (DistributedOptions::trace_size,
//      default 2000; 0 turns it off) collectives it issued in a ring of
//      fixed records: the sequence number (the same on every process for
//      the same collective, since all issue them in one order), the kind,
//      the purpose, the bytes and dtype, the state (started, done, failed:
//      a Gloo collective runs on the calling thread, so none waits queued)
//      and the times. A record holds no pointer to anything that may die
//      (the purpose is copied into a fixed buffer), and the ring allocates
//      nothing after construction, so recording costs two clock reads, a
//      short format and an uncontended lock: the lock only keeps a reader
//      (a dump from another thread) from seeing half a record. Collectives
//      of one group are already serialised by its own lock, so replicas
//      never contend for the trace.
//   2. The purpose comes from the caller, who alone knows it: a
//      CollectivePurpose on the issuing thread ("gradient bucket 3",
//      "buffers", "scaler flag", "step agreement", "save_state", ...). A
//      thread-local pointer, so the Communicator interface stays as it is.
//   3. When a collective fails (a time-out, a peer gone, Gloo's size
//      check), the process posts a short summary of its trace (the last
//      kSummaryRecords records) to the store and reads the others' for a
//      short while (peers fail at about the same time, since they wait as
//      long). A process that ended posts its summary when its group ends,
//      so a rank that went on to finish is still heard. The first sequence
//      number that one process issued and another did not (known from the
//      counts, also where the record is no longer kept), or at which both
//      records differ in kind, purpose, bytes or dtype, is where they took
//      different paths. A rank with no
//      summary is named as not answering.
//   4. The dump (text or JSON) is a copy taken under the lock: on demand
//      by ProcessGroup::trace(), or on a signal the user asked for
//      (dump_trace_on_signal: the handler only writes a byte to a pipe,
//      which is async-signal-safe; a thread reads it and prints). The
//      pipe is the process's, made once and never closed, and its write
//      end never blocks: a handler running on another thread while the
//      group ends writes into it, not into a reused descriptor, and a
//      flood of signals drops requests instead of blocking the handler.
//
// What is traced: the collectives of the ProcessGroup (Gloo, and the
// all-gathers through the store), which are every collective across
// processes but the NCCL communicator's: those are enqueued on streams
// (a queued state until their event completes) and are not recorded yet.
// Collectives among the replicas of one process cannot desynchronise
// processes and are not recorded either. Before any of this, DataParallel
// checks that the processes built the same model (Note [Checking the model
// across processes]), since a collective of another size cannot be named
// afterwards.

/// What the collectives issued on this thread are for, while it lives:
/// "gradient bucket" with index 3 reads "gradient bucket 3" in the trace.
/// `what` and `name` must outlive the guard (literals, or a string that does).
class CollectivePurpose {
 public:
  /// Sets this thread's purpose until the guard ends.
  explicit CollectivePurpose(const char* what, std::int64_t index = -1, const char* name = nullptr)
      : saved_(current()) {
    current() = Label{what, index, name};
  }
  ~CollectivePurpose() { current() = saved_; }
  CollectivePurpose(const CollectivePurpose&) = delete;
  CollectivePurpose& operator=(const CollectivePurpose&) = delete;

  /// The calling thread's purpose, written into `out` ("" when none).
  static void write(char* out, std::size_t size) {
    const Label& label = current();
    if (label.what == nullptr) {
      out[0] = '\0';
    } else if (label.name != nullptr) {
      std::snprintf(out, size, "%s %s", label.what, label.name);
    } else if (label.index >= 0) {
      std::snprintf(out, size, "%s %lld", label.what, static_cast<long long>(label.index));
    } else {
      std::snprintf(out, size, "%s", label.what);
    }
  }

 private:
  struct Label {
    const char* what = nullptr;
    std::int64_t index = -1;
    const char* name = nullptr;
  };
  static Label& current() {
    thread_local Label label;
    return label;
  }
  Label saved_;
};

/// Where a traced collective stands.
enum class CollectiveState : std::uint8_t { kStarted, kDone, kFailed };

/// One collective in a CollectiveTrace.
struct CollectiveRecord {
  std::int64_t sequence = -1;  ///< 0, 1, ...: the same on every process for the same collective
  char kind[24] = {};          ///< "all_reduce", "broadcast", "barrier", "all_gather"
  char purpose[56] = {};       ///< from CollectivePurpose ("" when none was set)
  char dtype[16] = {};         ///< "float", "double", "text", ...
  std::int64_t bytes = 0;      ///< this process's bytes
  CollectiveState state = CollectiveState::kStarted;  ///< started, done or failed
  std::int64_t started_us = 0;  ///< microseconds since the trace was made
  std::int64_t ended_us = -1;   ///< -1 while it runs

  /// "all_reduce #12 (gradient bucket 3, 4.0 MiB float)".
  std::string describe() const {
    std::string size;
    if (bytes >= 1024 * 1024) {
      size = fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
    } else if (bytes >= 1024) {
      size = fmt::format("{:.1f} KiB", static_cast<double>(bytes) / 1024.0);
    } else {
      size = fmt::format("{} B", bytes);
    }
    const std::string what = purpose[0] != '\0' ? fmt::format("{}, ", purpose) : std::string();
    return fmt::format("{} #{} ({}{} {})", kind, sequence, what, size, dtype);
  }
  /// Whether `other` is the same collective (what pairs across processes):
  /// texts exchanged through the store may differ in length.
  bool same_call(const CollectiveRecord& other) const {
    return sequence == other.sequence && std::strcmp(kind, other.kind) == 0 &&
           std::strcmp(purpose, other.purpose) == 0 && std::strcmp(dtype, other.dtype) == 0 &&
           (bytes == other.bytes || std::strcmp(dtype, "text") == 0);
  }
};

/// The last N collectives of one process (see Note [The collective trace]).
/// Thread safety: record calls come from the one thread that holds the
/// group's collective lock; reads may come from any thread.
class CollectiveTrace {
 public:
  /// The records kept in a summary exchanged after a failure.
  static constexpr std::size_t kSummaryRecords = 32;

  /// Keeps the last `capacity` collectives (0: keeps none).
  explicit CollectiveTrace(std::size_t capacity = 2000)
      : ring_(capacity), origin_(std::chrono::steady_clock::now()) {}

  /// Records the start of a collective; returns its sequence number.
  std::int64_t start(const char* kind, std::int64_t bytes, const char* dtype) {
    const std::int64_t now = micros();
    std::lock_guard<std::mutex> lock(mutex_);
    const std::int64_t sequence = next_++;
    if (ring_.empty()) return sequence;
    CollectiveRecord& record = ring_[static_cast<std::size_t>(sequence) % ring_.size()];
    record.sequence = sequence;
    std::snprintf(record.kind, sizeof(record.kind), "%s", kind);
    std::snprintf(record.dtype, sizeof(record.dtype), "%s", dtype);
    CollectivePurpose::write(record.purpose, sizeof(record.purpose));
    record.bytes = bytes;
    record.state = CollectiveState::kStarted;
    record.started_us = now;
    record.ended_us = -1;
    return sequence;
  }
  /// Records the end of collective `sequence`.
  void finish(std::int64_t sequence, bool ok) {
    if (ring_.empty()) return;
    const std::int64_t now = micros();
    std::lock_guard<std::mutex> lock(mutex_);
    CollectiveRecord& record = ring_[static_cast<std::size_t>(sequence) % ring_.size()];
    if (record.sequence != sequence) return;
    record.state = ok ? CollectiveState::kDone : CollectiveState::kFailed;
    record.ended_us = now;
  }

  /// How many records it keeps.
  std::size_t capacity() const { return ring_.size(); }
  /// Collectives issued so far (recorded or not).
  std::int64_t issued() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return next_;
  }
  /// The last `count` records (all kept ones by default), oldest first.
  std::vector<CollectiveRecord> records(std::size_t count = static_cast<std::size_t>(-1)) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto kept = static_cast<std::int64_t>(std::min<std::size_t>(ring_.size(), static_cast<std::size_t>(next_)));
    const std::int64_t n = std::min<std::int64_t>(kept, static_cast<std::int64_t>(std::min<std::size_t>(count, ring_.size())));
    std::vector<CollectiveRecord> out;
    out.reserve(static_cast<std::size_t>(n));
    for (std::int64_t s = next_ - n; s < next_; ++s) out.push_back(ring_[static_cast<std::size_t>(s) % ring_.size()]);
    return out;
  }
  /// One line per record, oldest first: "#12 all_reduce gradient bucket 3 4096 B float done 10.2 ms".
  std::string text(std::size_t count = static_cast<std::size_t>(-1)) const {
    std::string out;
    for (const auto& r : records(count)) {
      out += fmt::format("{} {} at {:.3f} s", r.describe(), state_name(r.state), static_cast<double>(r.started_us) * 1e-6);
      if (r.ended_us >= 0) out += fmt::format(", took {:.3f} ms", static_cast<double>(r.ended_us - r.started_us) * 1e-3);
      out += "\n";
    }
    return out;
  }
  /// The same as a JSON array of objects.
  std::string json(std::size_t count = static_cast<std::size_t>(-1)) const {
    std::string out = "[";
    bool first = true;
    for (const auto& r : records(count)) {
      out += fmt::format("{}\n {{\"sequence\": {}, \"kind\": \"{}\", \"purpose\": \"{}\", \"bytes\": {}, \"dtype\": "
                         "\"{}\", \"state\": \"{}\", \"started_us\": {}, \"ended_us\": {}}}",
                         first ? "" : ",", r.sequence, escaped(r.kind), escaped(r.purpose), r.bytes, escaped(r.dtype),
                         state_name(r.state), r.started_us, r.ended_us);
      first = false;
    }
    return out + (first ? "]" : "\n]");
  }

  /// A short summary for the other processes: "issued\n" and one line per
  /// record, fields separated by tabs (parse_summary reads it back).
  std::string summary() const {
    std::string out = fmt::format("{}\n", issued());
    for (const auto& r : records(kSummaryRecords)) {
      out += fmt::format("{}\t{}\t{}\t{}\t{}\t{}\n", r.sequence, r.kind, r.purpose, r.bytes, r.dtype,
                         static_cast<int>(r.state));
    }
    return out;
  }
  /// The records of a summary, and its count of collectives issued.
  static std::vector<CollectiveRecord> parse_summary(const std::string& text, std::int64_t* issued = nullptr) {
    std::vector<CollectiveRecord> out;
    std::istringstream in(text);
    std::string line;
    if (std::getline(in, line) && issued != nullptr) *issued = std::stoll(line);
    while (std::getline(in, line)) {
      std::vector<std::string> fields;
      std::size_t begin = 0;
      for (std::size_t tab; (tab = line.find('\t', begin)) != std::string::npos; begin = tab + 1) {
        fields.push_back(line.substr(begin, tab - begin));
      }
      fields.push_back(line.substr(begin));
      if (fields.size() != 6) continue;
      CollectiveRecord r;
      r.sequence = std::stoll(fields[0]);
      std::snprintf(r.kind, sizeof(r.kind), "%s", fields[1].c_str());
      std::snprintf(r.purpose, sizeof(r.purpose), "%s", fields[2].c_str());
      r.bytes = std::stoll(fields[3]);
      std::snprintf(r.dtype, sizeof(r.dtype), "%s", fields[4].c_str());
      r.state = static_cast<CollectiveState>(std::stoi(fields[5]));
      out.push_back(r);
    }
    return out;
  }

  /// Where the processes' summaries (by rank; "" for a rank that did not
  /// answer) first differ, in words (see Note [The collective trace], 3).
  static std::string first_difference(const std::vector<std::string>& summaries) {
    std::vector<std::map<std::int64_t, CollectiveRecord>> by_rank(summaries.size());
    std::vector<std::int64_t> issued(summaries.size(), 0);
    std::vector<std::string> silent;
    for (std::size_t r = 0; r < summaries.size(); ++r) {
      if (summaries[r].empty()) {
        silent.push_back(fmt::format("rank {}", r));
        continue;
      }
      for (const auto& record : parse_summary(summaries[r], &issued[r])) by_rank[r][record.sequence] = record;
    }
    const auto where = [&](std::size_t r, std::int64_t sequence) {
      const auto found = by_rank[r].find(sequence);
      if (found != by_rank[r].end()) {
        const CollectiveRecord& record = found->second;
        // A failed record is the collective that rank waited in until it gave up.
        const char* verb = record.state == CollectiveState::kDone ? "finished" : "waits in";
        return fmt::format("rank {} {} {}", r, verb, record.describe());
      }
      if (issued[r] <= sequence) {
        const auto last = by_rank[r].rbegin();
        if (last == by_rank[r].rend()) return fmt::format("rank {} issued no collective #{} (none at all)", r, sequence);
        return fmt::format("rank {} issued no collective #{}: its last is {} ({})", r, sequence,
                           last->second.describe(), state_name(last->second.state));
      }
      return fmt::format("rank {}'s record of #{} is no longer kept", r, sequence);
    };
    std::string found;
    std::size_t reference = summaries.size();  // the lowest answering rank
    for (std::size_t r = 0; r < summaries.size() && reference == summaries.size(); ++r) {
      if (!summaries[r].empty()) reference = r;
    }
    // Where some answering rank first differs from the reference: one of
    // them issued collective #s and the other did not (known from the
    // counts alone, also where the record is no longer kept), or both
    // records are kept and are not the same call. The candidates are the
    // kept records' numbers and every rank's count.
    std::int64_t high = 0;
    std::vector<std::int64_t> candidates;
    for (std::size_t r = 0; r < summaries.size(); ++r) {
      if (summaries[r].empty()) continue;
      high = std::max(high, issued[r]);
      candidates.push_back(issued[r]);
      for (const auto& kept : by_rank[r]) candidates.push_back(kept.first);
    }
    std::sort(candidates.begin(), candidates.end());
    candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
    for (const std::int64_t s : candidates) {
      if (!found.empty() || s >= high) break;
      for (std::size_t r = reference + 1; r < summaries.size(); ++r) {
        if (summaries[r].empty()) continue;
        const auto a = by_rank[reference].find(s);
        const auto b = by_rank[r].find(s);
        const bool both_kept = a != by_rank[reference].end() && b != by_rank[r].end();
        if ((issued[reference] > s) != (issued[r] > s) || (both_kept && !a->second.same_call(b->second))) {
          found = fmt::format("the processes' collectives first differ at #{}: {}; {}", s, where(reference, s),
                              where(r, s));
          break;
        }
      }
    }
    if (found.empty() && reference < summaries.size()) {
      found = "the answering processes' traces agree";
      if (high > 0) found += fmt::format(" up to #{}: {}", high - 1, where(reference, high - 1));
    }
    for (std::size_t i = 0; i < silent.size(); ++i) {
      found += (i == 0 ? (found.empty() ? "" : "; ") : ", ") + silent[i];
      if (i + 1 == silent.size()) found += " did not answer with a trace (gone or stuck)";
    }
    return found;
  }

  /// "started", "done", "failed".
  static const char* state_name(CollectiveState state) {
    switch (state) {
      case CollectiveState::kStarted: return "started";
      case CollectiveState::kDone: return "done";
      case CollectiveState::kFailed: return "failed";
    }
    return "?";
  }

 private:
  std::int64_t micros() const {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - origin_).count();
  }
  static std::string escaped(const char* text) {
    std::string out;
    for (const char* c = text; *c != '\0'; ++c) {
      if (*c == '"' || *c == '\\') out += '\\';
      if (static_cast<unsigned char>(*c) < 0x20) continue;
      out += *c;
    }
    return out;
  }

  std::vector<CollectiveRecord> ring_;
  std::chrono::steady_clock::time_point origin_;
  std::int64_t next_ = 0;  // under mutex_
  mutable std::mutex mutex_;
};

}  // namespace multigpu
