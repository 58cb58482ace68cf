#pragma once
/// @file
/// The communicator of a multi-process job on CPUs (or GPUs without NCCL,
/// or GPUs shared between processes): local reduction plus Gloo between
/// processes. Made by make_communicator() (multigpu/backend.hpp) for
/// ProcessGroup (multigpu/distributed.hpp), whose ProcessCollectives it
/// uses, so that this folder needs none of c10d's headers.

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/config.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/local/communicator.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {

/// The communicator of a multi-process job on CPUs (or GPUs without NCCL, or
/// shared between processes):
/// reduces this process's replicas locally, all-reduces that sum across
/// processes with Gloo (staged through host memory), and copies the result
/// to every local replica. Broadcasts come from global rank 0.
class CrossProcessCommunicator : public Communicator {
 public:
  /// Collective: every process builds one, in the same order.
  inline CrossProcessCommunicator(std::vector<ReplicaContext> replicas, std::shared_ptr<ProcessCollectives> group);

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
  std::shared_ptr<ProcessCollectives> group_;
  std::size_t world_replicas_ = 0;
};

// ---------------------------------------------------------------------------
// Definitions

inline CrossProcessCommunicator::CrossProcessCommunicator(std::vector<ReplicaContext> replicas,
                                                          std::shared_ptr<ProcessCollectives> group)
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
