#pragma once
/// @file
/// LocalCommunicator: collectives over the replicas of one process with
/// plain memory operations: CPU replicas, and several replicas on one GPU
/// (or GPUs without NCCL). On CPUs it computes on the calling thread and
/// returns when the result is in place; on GPUs it enqueues ATen copies and
/// sums on the current streams. Concurrent calls on different tensors are
/// allowed. make_communicator() (multigpu/backend.hpp) chooses it.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {

/// In-process collectives with plain memory operations (see the file comment).
class LocalCommunicator : public Communicator {
 public:
  /// One context per replica: its device and (on GPUs) the stream its work runs on.
  explicit LocalCommunicator(std::vector<ReplicaContext> replicas);

  std::string name() const override { return "local"; }
  std::size_t size() const override { return replicas_.size(); }
  bool needs_one_order() const override { return false; }
  inline void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) override;
  inline void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override;

 private:
  std::vector<ReplicaContext> replicas_;
};

namespace detail {

// Note [Fused local all-reduce]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The naive all-reduce (t0 += t1 ...; then copy t0 to the others) passes
// over memory 5(K-1) times the buffer size. Working in chunks that stay in
// cache, each chunk is summed into replica 0's chunk and copied out while
// still hot: each replica's buffer is read once and written once, 2K passes
// in all, which is what bounds an all-reduce on one memory system. Chunks
// are independent, so they run in parallel. The summation order is fixed
// (replica 0, 1, ...), so every run and every replica gets the same bits.
template <class T>
void fused_all_reduce(const std::vector<T*>& buffers, std::int64_t numel, bool average) {
  constexpr std::int64_t kChunk = 4096;  // 16 KiB of float: several chunks fit in L1/L2
  const auto replicas = buffers.size();
  const T scale = static_cast<T>(1) / static_cast<T>(replicas);
  at::parallel_for(0, numel, kChunk, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t start = begin; start < end; start += kChunk) {
      const std::int64_t stop = std::min(end, start + kChunk);
      T* __restrict sum = buffers[0] + start;
      const std::int64_t n = stop - start;
      for (std::size_t r = 1; r < replicas; ++r) {
        const T* __restrict other = buffers[r] + start;
        for (std::int64_t i = 0; i < n; ++i) sum[i] += other[i];
      }
      if (average) {
        for (std::int64_t i = 0; i < n; ++i) sum[i] *= scale;
      }
      for (std::size_t r = 1; r < replicas; ++r) {
        std::memcpy(buffers[r] + start, sum, static_cast<std::size_t>(n) * sizeof(T));
      }
    }
  });
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline LocalCommunicator::LocalCommunicator(std::vector<ReplicaContext> replicas) : replicas_(std::move(replicas)) {
  if (replicas_.empty()) throw CommError("local communicator: no replicas");
}

inline void LocalCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  detail::check_collective_tensors(tensors, replicas_, "local all-reduce");
  if (tensors.size() == 1) return;
  const bool average = op == ReduceOp::kAverage;
  bool plain_cpu = true;
  for (const auto& t : tensors) plain_cpu = plain_cpu && t.device().is_cpu() && t.is_contiguous();
  const auto dtype = tensors[0].scalar_type();
  if (plain_cpu && (dtype == at::kFloat || dtype == at::kDouble)) {
    if (dtype == at::kFloat) {
      std::vector<float*> buffers;
      for (const auto& t : tensors) buffers.push_back(t.data_ptr<float>());
      detail::fused_all_reduce(buffers, tensors[0].numel(), average);
    } else {
      std::vector<double*> buffers;
      for (const auto& t : tensors) buffers.push_back(t.data_ptr<double>());
      detail::fused_all_reduce(buffers, tensors[0].numel(), average);
    }
    return;
  }
  // Any other dtype or device: ATen ops on the current streams, which a
  // copy between GPUs orders against each other (see the file comment).
  compat::NoGradGuard no_grad;
  const at::Tensor& sum = tensors[0];
  for (std::size_t r = 1; r < tensors.size(); ++r) sum.add_(tensors[r].to(sum.device()));
  if (average) sum.div_(static_cast<double>(tensors.size()));
  for (std::size_t r = 1; r < tensors.size(); ++r) tensors[r].copy_(sum);
}

inline void LocalCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  detail::check_collective_tensors(tensors, replicas_, "local broadcast");
  if (root >= tensors.size()) {
    throw CommError(fmt::format("local broadcast: root {} is not a replica (0..{})", root, tensors.size() - 1));
  }
  compat::NoGradGuard no_grad;
  for (std::size_t r = 0; r < tensors.size(); ++r) {
    if (r != root) tensors[r].copy_(tensors[root]);
  }
}

}  // namespace multigpu
