#pragma once
// The communicators of a multi-process job, and the choice between them
// (ProcessGroup::make_communicator): one NCCL communicator over every GPU of
// every process, or local reduction plus Gloo between processes. Included
// by multigpu/distributed/process_group.hpp, after ProcessGroup.

#include "multigpu/config.hpp"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/core.h>

#include "multigpu/backend.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/distributed/process_group.hpp"
#include "multigpu/distributed/rendezvous.hpp"
#include "multigpu/error.hpp"
#include "multigpu/local/communicator.hpp"
#include "multigpu/replica.hpp"

#if MULTIGPU_WITH_NCCL
#include "multigpu/nccl/communicator.hpp"
#endif

namespace multigpu {

/// The communicator of a multi-process job on CPUs (or GPUs without NCCL):
/// reduces this process's replicas locally, all-reduces that sum across
/// processes with Gloo (staged through host memory), and copies the result
/// to every local replica. Broadcasts come from global rank 0.
class CrossProcessCommunicator : public Communicator {
 public:
  /// Collective: every process builds one, in the same order.
  inline CrossProcessCommunicator(std::vector<ReplicaContext> replicas, std::shared_ptr<ProcessGroup> group);

  std::string name() const override { return "local+gloo"; }
  std::size_t size() const override { return local_.size(); }
  std::size_t world_size() const override { return world_replicas_; }
  inline void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) override;
  inline void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override;

 private:
  /// Runs `fn` on a contiguous host copy of replica r's `tensor` (the tensor
  /// itself when it is one already) and copies the result back.
  template <class Fn>
  void on_host(const at::Tensor& tensor, std::size_t r, Fn&& fn);

  std::vector<ReplicaContext> replicas_;
  LocalCommunicator local_;
  std::shared_ptr<ProcessGroup> group_;
  std::size_t world_replicas_ = 0;
};

// ---------------------------------------------------------------------------
// Definitions

inline std::unique_ptr<Communicator> ProcessGroup::make_communicator(const std::vector<ReplicaContext>& replicas) {
  if (!distributed()) return multigpu::make_communicator(replicas, "auto");
#if MULTIGPU_WITH_NCCL
  bool distinct_gpus = true;
  for (std::size_t i = 0; i < replicas.size(); ++i) {
    distinct_gpus = distinct_gpus && replicas[i].device().is_cuda();
    for (std::size_t j = 0; j < i; ++j) distinct_gpus = distinct_gpus && replicas[j].device() != replicas[i].device();
  }
  // Every process must take the same path: agree on it first. A vote is
  // "<distinct GPUs: 0|1> <replicas> <host/PCI bus id of each GPU>...": NCCL
  // refuses two ranks on one GPU, so processes sharing one (several
  // processes on a one-GPU machine) use Gloo.
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
  bool all_gpus = true;
  std::size_t total = 0;
  std::size_t first = 0;
  std::vector<std::string> gpus;
  std::string shared_gpu;
  for (int r = 0; r < size(); ++r) {
    std::istringstream vote(votes[static_cast<std::size_t>(r)]);
    int distinct = 0;
    std::size_t count = 0;
    vote >> distinct >> count;
    all_gpus = all_gpus && distinct == 1;
    if (r < rank()) first += count;
    total += count;
    for (std::string gpu; vote >> gpu;) {
      if (std::find(gpus.begin(), gpus.end(), gpu) != gpus.end() && shared_gpu.empty()) shared_gpu = gpu;
      gpus.push_back(gpu);
    }
  }
  if (all_gpus && !shared_gpu.empty()) {
    if (is_primary()) {
      log(LogLevel::kInfo, fmt::format("the processes share the GPU {} and NCCL refuses two ranks on one GPU: the "
                                       "gradients go through Gloo (slower; one process per GPU uses NCCL)",
                                       shared_gpu));
    }
    all_gpus = false;
  }
  if (all_gpus) {
    NcclWorld world;
    if (is_primary()) MULTIGPU_NCCL_CHECK(ncclGetUniqueId(&world.id), "rank 0", nullptr);
    const std::string id_text =
        all_gather_text(std::string(reinterpret_cast<const char*>(&world.id), sizeof(world.id)))[0];
    std::copy(id_text.begin(), id_text.end(), reinterpret_cast<char*>(&world.id));
    world.ranks = static_cast<int>(total);
    world.first_rank = static_cast<int>(first);
    return std::make_unique<NcclCommunicator>(replicas, world, timeout_);
  }
#endif
  return std::make_unique<CrossProcessCommunicator>(replicas, shared_from_this());
}

inline CrossProcessCommunicator::CrossProcessCommunicator(std::vector<ReplicaContext> replicas,
                                                          std::shared_ptr<ProcessGroup> group)
    : replicas_(replicas), local_(std::move(replicas)), group_(std::move(group)) {
  const auto counts = group_->all_gather_text(std::to_string(local_.size()));
  for (const auto& count : counts) world_replicas_ += std::stoul(count);
}

template <class Fn>
void CrossProcessCommunicator::on_host(const at::Tensor& tensor, std::size_t r, Fn&& fn) {
  compat::NoGradGuard no_grad;
  const bool staged = !tensor.device().is_cpu() || !tensor.is_contiguous();
  at::Tensor host = staged ? tensor.to(at::kCPU).contiguous() : tensor;
  fn(host);
  if (staged) {
    const ReplicaContext::Scope scope(replicas_[r]);
    tensor.copy_(host);
    replicas_[r].synchronize();
  }
}

inline void CrossProcessCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  local_.all_reduce(tensors, ReduceOp::kSum);
  on_host(tensors[0], 0, [&](const at::Tensor& host) {
    group_->all_reduce_sum(host);
    if (op == ReduceOp::kAverage) host.div_(static_cast<double>(world_replicas_));
  });
  local_.broadcast(tensors, 0);
}

inline void CrossProcessCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  if (root >= tensors.size()) throw CommError(fmt::format("broadcast: root {} is not a replica", root));
  on_host(tensors[root], root, [&](const at::Tensor& host) { group_->broadcast(host, 0); });
  local_.broadcast(tensors, root);
}

}  // namespace multigpu
