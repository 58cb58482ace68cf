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
  /// Runs `fn` on a contiguous host copy of `tensor` (the tensor itself
  /// when it is one already) and copies the result back.
  template <class Fn>
  void on_host(const at::Tensor& tensor, Fn&& fn);

  LocalCommunicator local_;
  std::shared_ptr<ProcessCollectives> group_;
  std::size_t world_replicas_ = 0;
};

// ---------------------------------------------------------------------------
// Definitions

inline CrossProcessCommunicator::CrossProcessCommunicator(std::vector<ReplicaContext> replicas,
                                                          std::shared_ptr<ProcessCollectives> group)
    : local_(std::move(replicas)), group_(std::move(group)) {
  const CollectivePurpose purpose("replica count");
  const auto counts = group_->all_gather_text(std::to_string(local_.size()));
  for (const auto& count : counts) world_replicas_ += std::stoul(count);
}

// Note [Staging a GPU tensor for Gloo]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Gloo reduces host memory, so a GPU tensor is copied to the host, reduced,
// and copied back, both copies blocking (pageable memory: ATen's copy_
// synchronises the stream it ran on before it returns, so the host buffer
// can go). Both run on the calling thread's current stream of the tensor's
// GPU, as every collective does (Note [Streams], rule 3): during the
// gradient sync that is the communication stream, which waits only for the
// bucket's ready event, so the host waits for that bucket's gradients and
// no more. (Copying back on the replica's own stream, as this once did,
// made the host wait, for every bucket, for the replica's whole backward
// queued so far: no overlap at all.) What runs on the replica's stream
// later is ordered after the copy by the reducer's join event, and, the
// copy being complete when copy_ returns, by the host itself.
template <class Fn>
void CrossProcessCommunicator::on_host(const at::Tensor& tensor, Fn&& fn) {
  compat::NoGradGuard no_grad;
  const bool staged = !tensor.device().is_cpu() || !tensor.is_contiguous();
  at::Tensor host = staged ? tensor.to(at::kCPU).contiguous() : tensor;
  fn(host);
  if (staged) tensor.copy_(host);  // See Note [Staging a GPU tensor for Gloo]
}

inline void CrossProcessCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  local_.all_reduce(tensors, ReduceOp::kSum);
  on_host(tensors[0], [&](const at::Tensor& host) {
    group_->all_reduce_sum(host);
    if (op == ReduceOp::kAverage) host.div_(static_cast<double>(world_replicas_));
  });
  local_.broadcast(tensors, 0);
}

inline void CrossProcessCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  if (root >= tensors.size()) throw CommError(fmt::format("broadcast: root {} is not a replica", root));
  on_host(tensors[root], [&](const at::Tensor& host) { group_->broadcast(host, 0); });
  local_.broadcast(tensors, root);
}

}  // namespace multigpu
