#pragma once
// ProcessGroup::make_communicator: the processes agree on the facts of Note
// [Choosing a backend] (the vote, a mechanism), and choose_backend() in
// multigpu/backend.hpp decides, the same on every process since the facts
// are the same. Included by multigpu/distributed/process_group.hpp, after
// ProcessGroup.

#include "multigpu/config.hpp"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/backend.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/distributed/process_group.hpp"
#include "multigpu/distributed/rendezvous.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

#if MULTIGPU_WITH_NCCL
#include "multigpu/detail/cuda.hpp"
#endif

namespace multigpu {

inline std::unique_ptr<Communicator> ProcessGroup::make_communicator(const std::vector<ReplicaContext>& replicas) {
  if (!distributed()) return multigpu::make_communicator(replicas, "auto");
  BackendFacts facts = BackendFacts::of_this_build(detail::replica_devices(replicas), "auto");
  facts.processes = size();
  CommunicatorRequest request;
  request.replicas = replicas;
  request.timeout = timeout_;
  request.processes = shared_from_this();
#if MULTIGPU_WITH_NCCL
  bool distinct_gpus = true;
  for (std::size_t i = 0; i < replicas.size(); ++i) {
    distinct_gpus = distinct_gpus && replicas[i].device().is_cuda();
    for (std::size_t j = 0; j < i; ++j) distinct_gpus = distinct_gpus && replicas[j].device() != replicas[i].device();
  }
  // Every process must take the same path: agree on the facts first. A vote
  // is "<distinct GPUs: 0|1> <replicas> <host/PCI bus id of each GPU>...":
  // NCCL refuses two ranks on one GPU, so processes sharing one (several
  // processes on a one-GPU machine) must see it. Without NCCL there is
  // nothing to vote on: every process is the same build.
  std::string vote_text = fmt::format("{} {}", distinct_gpus ? 1 : 0, replicas.size());
  for (const auto& replica : replicas) {
    if (!replica.device().is_cuda()) continue;
    char bus_id[64] = {};
    if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), replica.device().index()) != cudaSuccess) {
      cudaGetLastError();
      std::snprintf(bus_id, sizeof(bus_id), "cuda:%d", static_cast<int>(replica.device().index()));
    }
    vote_text += fmt::format(" {}/{}", detail::this_host(), bus_id);
  }
  const auto votes = all_gather_text(vote_text);
  facts.every_process_on_distinct_gpus = true;
  std::vector<std::string> gpus;
  for (int r = 0; r < size(); ++r) {
    std::istringstream vote(votes[static_cast<std::size_t>(r)]);
    int distinct = 0;
    std::size_t count = 0;
    vote >> distinct >> count;
    facts.every_process_on_distinct_gpus = facts.every_process_on_distinct_gpus && distinct == 1;
    if (r < rank()) request.first_replica += count;
    request.world_replicas += count;
    for (std::string gpu; vote >> gpu;) {
      if (std::find(gpus.begin(), gpus.end(), gpu) != gpus.end() && facts.shared_gpu.empty()) facts.shared_gpu = gpu;
      gpus.push_back(gpu);
    }
  }
#endif
  const BackendChoice choice = choose_backend(facts);
  if (choice.notable && is_primary()) log(LogLevel::kInfo, choice.reason);
  return multigpu::make_communicator(choice, request);
}

}  // namespace multigpu
