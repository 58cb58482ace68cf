#pragma once
/// @file
/// Choosing and making the communicator for a set of replicas: NCCL for
/// distinct GPUs when it is compiled in, the local backend otherwise.

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/config.hpp"
#include "multigpu/error.hpp"
#include "multigpu/local/communicator.hpp"
#include "multigpu/replica.hpp"

#if MULTIGPU_WITH_NCCL
#include "multigpu/nccl/communicator.hpp"
#endif

namespace multigpu {

/// Which backend a set of replica devices gets: "nccl" for two or more
/// distinct GPUs when NCCL is compiled in, else "local". `requested` is
/// "auto", "local" or "nccl"; an impossible request throws CommError.
std::string choose_backend(const std::vector<c10::Device>& devices, const std::string& requested);

/// Makes the communicator for these replicas (see choose_backend).
/// `timeout` bounds NCCL's set-up and every collective (see NcclCommunicator).
std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas,
                                                const std::string& requested = "auto",
                                                std::chrono::milliseconds timeout = std::chrono::minutes(5));

// ---------------------------------------------------------------------------
// Definitions


inline std::string choose_backend(const std::vector<c10::Device>& devices, const std::string& requested) {
  bool all_cuda = !devices.empty();
  bool distinct = true;
  for (std::size_t i = 0; i < devices.size(); ++i) {
    all_cuda = all_cuda && devices[i].is_cuda();
    for (std::size_t j = 0; j < i; ++j) distinct = distinct && devices[i] != devices[j];
  }
  if (requested == "local") return "local";
  if (requested == "nccl") {
    if (!MULTIGPU_WITH_NCCL) {
      throw CommError("backend \"nccl\" was asked for, but this build has no NCCL (MULTIGPU_WITH_NCCL=0); "
                      "use \"local\" or \"auto\"");
    }
    if (!all_cuda) throw CommError("backend \"nccl\" needs GPU replicas; use \"local\" for CPU replicas");
    if (!distinct) {
      throw CommError("backend \"nccl\" needs distinct GPUs (NCCL refuses two ranks on one GPU); use \"local\" "
                      "for several replicas on one GPU");
    }
    return "nccl";
  }
  if (requested != "auto") {
    throw CommError(fmt::format("backend \"{}\" is unknown; valid: auto, local, nccl", requested));
  }
  return (MULTIGPU_WITH_NCCL && all_cuda && distinct && devices.size() > 1) ? "nccl" : "local";
}

inline std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas,
                                                       const std::string& requested,
                                                       std::chrono::milliseconds timeout) {
  std::vector<c10::Device> devices;
  for (const auto& replica : replicas) devices.push_back(replica.device());
  const std::string backend = choose_backend(devices, requested);
#if MULTIGPU_WITH_NCCL
  if (backend == "nccl") return std::make_unique<NcclCommunicator>(replicas, timeout);
#else
  (void)timeout;
#endif
  return std::make_unique<LocalCommunicator>(replicas);
}

}  // namespace multigpu
