#pragma once
/// @file
/// Choosing and making the communicator for a set of replicas, in one
/// process or over several: one table of backends and one pure decision
/// function over it (see Note [Choosing a backend]).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/config.hpp"
#include "multigpu/error.hpp"
#include "multigpu/gloo/communicator.hpp"
#include "multigpu/local/communicator.hpp"
#include "multigpu/replica.hpp"

#if MULTIGPU_WITH_NCCL
#include "multigpu/nccl/communicator.hpp"
#endif

namespace multigpu {

// Note [Choosing a backend]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// Policy apart from mechanism. Which backend a job gets is decided in one
// place, choose_backend(const BackendFacts&), a pure function of facts:
//   - the requested name ("auto", or a backend's name) and this process's
//     replica devices;
//   - what the build has: NCCL (MULTIGPU_WITH_NCCL) and multi-process
//     support (MULTIGPU_WITH_DISTRIBUTED);
//   - for several processes, the facts every process agreed on: whether
//     every process has its replicas on GPUs of their own, and a GPU that
//     two processes share (NCCL refuses two ranks on one GPU).
// It returns the backend's name and the reason in words; `notable` marks a
// choice slower than the hardware allows, which the caller logs.
//
// The rule is the table backend_table(), in order of preference. For
// "auto" the first backend that serves the facts wins (nccl, then gloo,
// then local); a backend asked for by name must serve them, or its refusal
// is the CommError. An entry is: the backend's name; the jobs it can serve
// (one process, several, or both); whether it serves these facts, and why
// (policy); and how to make its communicator from a CommunicatorRequest
// (the mechanism's entry, the same for every backend).
//
// The mechanisms stay in their rooms: each communicator in its backend's
// folder (local/, nccl/, gloo/); gathering the facts of several processes is
// ProcessGroup's vote (distributed/communicator.hpp), which then asks this
// same function, so one process and several follow one rule. The backends'
// folders need nothing of c10d: what crosses processes comes through
// ProcessCollectives (comm.hpp), which ProcessGroup provides.
//
// A new backend is its folder (include/multigpu/<name>/communicator.hpp,
// behind its feature macro when it needs one) and one entry in
// backend_table(), placed by preference; its decisions are tested as facts
// in tests/test_backend.cpp, no devices or processes needed.

/// The facts a backend is chosen from (see Note [Choosing a backend]).
struct BackendFacts {
  /// "auto", or a backend's name.
  std::string requested = "auto";
  /// This process's replica devices, one per replica.
  std::vector<c10::Device> devices;
  /// Whether this build has NCCL (MULTIGPU_WITH_NCCL).
  bool with_nccl = false;
  /// Whether this build can reach other processes (MULTIGPU_WITH_DISTRIBUTED).
  bool with_distributed = false;
  /// Number of processes in the job.
  int processes = 1;
  /// Several processes, agreed by all: every process has its replicas on
  /// GPUs, each on a GPU of its own.
  bool every_process_on_distinct_gpus = false;
  /// Several processes, agreed by all: a GPU ("host/PCI bus id") that two
  /// of them use; "" when none is shared.
  std::string shared_gpu;

  /// One process's facts in this build: `devices`, `requested`, and the
  /// build's MULTIGPU_WITH_NCCL and MULTIGPU_WITH_DISTRIBUTED.
  static BackendFacts of_this_build(std::vector<c10::Device> devices, std::string requested) {
    BackendFacts facts;
    facts.requested = std::move(requested);
    facts.devices = std::move(devices);
    facts.with_nccl = MULTIGPU_WITH_NCCL != 0;
    facts.with_distributed = MULTIGPU_WITH_DISTRIBUTED != 0;
    return facts;
  }
};

/// What choose_backend() decided.
struct BackendChoice {
  /// A name in backend_table().
  std::string name;
  /// Why, in words.
  std::string reason;
  /// The job gets a slower backend than its hardware allows: worth a log line.
  bool notable = false;
};

/// Whether a backend serves a job's facts, and why or why not.
struct BackendVerdict {
  /// True when the backend can serve the facts.
  bool serves = false;
  /// Why; when it refuses, the CommError's message for a request by name.
  std::string reason;
  /// See BackendChoice::notable.
  bool notable = false;
};

/// What a backend's communicator is made from.
struct CommunicatorRequest {
  /// This process's replicas.
  std::vector<ReplicaContext> replicas;
  /// Bounds NCCL's set-up and every collective (see NcclCommunicator).
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  /// Several processes: how to reach the others (a ProcessGroup); null for one.
  std::shared_ptr<ProcessCollectives> processes;
  /// Several processes: the replicas of every lower rank.
  std::size_t first_replica = 0;
  /// Several processes: the replicas of every process.
  std::size_t world_replicas = 0;
};

/// The jobs a backend can serve.
enum class BackendScope { kOneProcess, kSeveralProcesses, kBoth };

/// One backend in backend_table() (see Note [Choosing a backend]).
struct BackendEntry {
  /// What "requested" names it.
  const char* name;
  /// The jobs it can serve.
  BackendScope scope;
  /// Whether it serves these facts (policy: pure).
  BackendVerdict (*serves)(const BackendFacts& facts);
  /// Makes its communicator (mechanism; collective across processes).
  std::unique_ptr<Communicator> (*make)(const CommunicatorRequest& request);
};

/// Every backend, in order of preference for "auto".
const std::vector<BackendEntry>& backend_table();

/// Which backend serves these facts, and why (see Note [Choosing a
/// backend]). Pure. An impossible or unknown request throws CommError.
BackendChoice choose_backend(const BackendFacts& facts);

/// Which backend a set of replica devices of one process gets in this
/// build: "nccl" for two or more distinct GPUs when NCCL is compiled in,
/// else "local". `requested` is "auto", "local" or "nccl"; an impossible
/// request throws CommError.
std::string choose_backend(const std::vector<c10::Device>& devices, const std::string& requested);

/// Makes the chosen backend's communicator.
std::unique_ptr<Communicator> make_communicator(const BackendChoice& choice, const CommunicatorRequest& request);

/// Makes the communicator for these replicas of one process (see
/// choose_backend). `timeout` bounds NCCL's set-up and every collective
/// (see NcclCommunicator).
std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas,
                                                const std::string& requested = "auto",
                                                std::chrono::milliseconds timeout = std::chrono::minutes(5));

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

/// Whether the devices are all GPUs, and all different.
struct DeviceKinds {
  bool all_cuda = false;
  bool distinct = true;
};

inline DeviceKinds device_kinds(const std::vector<c10::Device>& devices) {
  DeviceKinds kinds;
  kinds.all_cuda = !devices.empty();
  for (std::size_t i = 0; i < devices.size(); ++i) {
    kinds.all_cuda = kinds.all_cuda && devices[i].is_cuda();
    for (std::size_t j = 0; j < i; ++j) kinds.distinct = kinds.distinct && devices[i] != devices[j];
  }
  return kinds;
}

/// The replicas' devices, in order.
inline std::vector<c10::Device> replica_devices(const std::vector<ReplicaContext>& replicas) {
  std::vector<c10::Device> devices;
  for (const auto& replica : replicas) devices.push_back(replica.device());
  return devices;
}

inline bool in_scope(BackendScope scope, int processes) {
  return scope == BackendScope::kBoth || (scope == BackendScope::kSeveralProcesses) == (processes > 1);
}

/// "auto, " and the names of the backends that can serve `processes`, sorted.
inline std::string valid_backends(int processes) {
  std::vector<std::string> names;
  for (const auto& entry : backend_table()) {
    if (in_scope(entry.scope, processes)) names.emplace_back(entry.name);
  }
  std::sort(names.begin(), names.end());
  std::string text = "auto";
  for (const auto& name : names) text += ", " + name;
  return text;
}

}  // namespace detail

inline const std::vector<BackendEntry>& backend_table() {
  static const std::vector<BackendEntry> table = {
      {"nccl", BackendScope::kBoth,
       [](const BackendFacts& facts) -> BackendVerdict {
         const bool several = facts.processes > 1;
         const char* instead = several ? "\"gloo\"" : "\"local\"";
         if (!facts.with_nccl) {
           return {false, fmt::format("backend \"nccl\" was asked for, but this build has no NCCL "
                                      "(MULTIGPU_WITH_NCCL=0); use {} or \"auto\"",
                                      instead)};
         }
         if (several) {
           if (!facts.every_process_on_distinct_gpus) {
             return {false, "backend \"nccl\" needs every process's replicas on GPUs of their own; use \"gloo\" or "
                            "\"auto\""};
           }
           if (!facts.shared_gpu.empty()) {
             return {false, fmt::format("backend \"nccl\" needs distinct GPUs, and the processes share the GPU {} "
                                        "(NCCL refuses two ranks on one GPU); use \"gloo\" or \"auto\"",
                                        facts.shared_gpu)};
           }
           return {true, "every replica of every process has a GPU of its own: one NCCL communicator over all"};
         }
         const auto kinds = detail::device_kinds(facts.devices);
         if (!kinds.all_cuda) return {false, "backend \"nccl\" needs GPU replicas; use \"local\" for CPU replicas"};
         if (!kinds.distinct) {
           return {false, "backend \"nccl\" needs distinct GPUs (NCCL refuses two ranks on one GPU); use \"local\" "
                          "for several replicas on one GPU"};
         }
         if (facts.requested == "auto" && facts.devices.size() < 2) {
           return {false, "one GPU replica: nothing to reduce between GPUs"};
         }
         return {true, fmt::format("{} replicas on distinct GPUs", facts.devices.size())};
       },
       [](const CommunicatorRequest& request) -> std::unique_ptr<Communicator> {
#if MULTIGPU_WITH_NCCL
         if (!request.processes) return std::make_unique<NcclCommunicator>(request.replicas, request.timeout);
         return std::make_unique<NcclCommunicator>(
             request.replicas,
             agree_on_nccl_world(*request.processes, request.first_replica, request.world_replicas),
             request.timeout);
#else
         (void)request;
         throw CommError("backend \"nccl\" was asked for, but this build has no NCCL (MULTIGPU_WITH_NCCL=0)");
#endif
       }},
      {"gloo", BackendScope::kSeveralProcesses,
       [](const BackendFacts& facts) -> BackendVerdict {
         if (!facts.with_distributed) {
           return {false, "backend \"gloo\" needs multi-process support, and this build has none "
                          "(MULTIGPU_WITH_DISTRIBUTED=0)"};
         }
         if (facts.requested == "gloo") return {true, "asked for by name"};
         if (!facts.with_nccl) {
           return {true, "this build has no NCCL (MULTIGPU_WITH_NCCL=0): the gradients go through Gloo"};
         }
         if (!facts.every_process_on_distinct_gpus) {
           return {true, "not every process has its replicas on GPUs of their own: the gradients go through Gloo"};
         }
         if (!facts.shared_gpu.empty()) {
           return {true,
                   fmt::format("the processes share the GPU {} and NCCL refuses two ranks on one GPU: the "
                               "gradients go through Gloo (slower; one process per GPU uses NCCL)",
                               facts.shared_gpu),
                   true};
         }
         return {true, "the gradients go through Gloo"};
       },
       [](const CommunicatorRequest& request) -> std::unique_ptr<Communicator> {
         if (!request.processes) {
           throw CommError("backend \"gloo\" needs the other processes: make it through a ProcessGroup "
                           "(multigpu/distributed.hpp)");
         }
         return std::make_unique<CrossProcessCommunicator>(request.replicas, request.processes);
       }},
      {"local", BackendScope::kOneProcess,
       [](const BackendFacts& facts) -> BackendVerdict {
         if (facts.requested == "local") return {true, "asked for by name"};
         const auto kinds = detail::device_kinds(facts.devices);
         if (!kinds.all_cuda) return {true, "CPU replicas: reduced on the host"};
         if (facts.devices.size() < 2) return {true, "one GPU replica: nothing to reduce between GPUs"};
         if (!kinds.distinct) return {true, "several replicas share a GPU, and NCCL refuses two ranks on one GPU"};
         return {true, "this build has no NCCL (MULTIGPU_WITH_NCCL=0): reduced with ATen copies and sums", true};
       },
       [](const CommunicatorRequest& request) -> std::unique_ptr<Communicator> {
         return std::make_unique<LocalCommunicator>(request.replicas);
       }},
  };
  return table;
}

inline BackendChoice choose_backend(const BackendFacts& facts) {
  const auto& table = backend_table();
  if (facts.requested == "auto") {
    std::string refusals;
    for (const auto& entry : table) {
      if (!detail::in_scope(entry.scope, facts.processes)) continue;
      BackendVerdict verdict = entry.serves(facts);
      if (verdict.serves) return {entry.name, std::move(verdict.reason), verdict.notable};
      refusals += fmt::format("{}{}: {}", refusals.empty() ? "" : "; ", entry.name, verdict.reason);
    }
    throw CommError(fmt::format("no backend serves a job of {} process(es): {}", facts.processes, refusals));
  }
  for (const auto& entry : table) {
    if (facts.requested != entry.name) continue;
    if (!detail::in_scope(entry.scope, facts.processes)) {
      throw CommError(fmt::format("backend \"{}\" serves {}, and this job has {} process(es); valid: {}",
                                  facts.requested,
                                  entry.scope == BackendScope::kOneProcess ? "one process" : "several processes",
                                  facts.processes, detail::valid_backends(facts.processes)));
    }
    BackendVerdict verdict = entry.serves(facts);
    if (!verdict.serves) throw CommError(verdict.reason);
    return {entry.name, std::move(verdict.reason), verdict.notable};
  }
  throw CommError(fmt::format("backend \"{}\" is unknown; valid: {}", facts.requested,
                              detail::valid_backends(facts.processes)));
}

inline std::string choose_backend(const std::vector<c10::Device>& devices, const std::string& requested) {
  return choose_backend(BackendFacts::of_this_build(devices, requested)).name;
}

inline std::unique_ptr<Communicator> make_communicator(const BackendChoice& choice,
                                                       const CommunicatorRequest& request) {
  for (const auto& entry : backend_table()) {
    if (choice.name == entry.name) return entry.make(request);
  }
  throw CommError(fmt::format("backend \"{}\" is unknown; valid: {}", choice.name,
                              detail::valid_backends(request.processes ? request.processes->size() : 1)));
}

inline std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas,
                                                       const std::string& requested,
                                                       std::chrono::milliseconds timeout) {
  CommunicatorRequest request;
  request.replicas = replicas;
  request.timeout = timeout;
  return make_communicator(choose_backend(BackendFacts::of_this_build(detail::replica_devices(replicas), requested)),
                           request);
}

}  // namespace multigpu
