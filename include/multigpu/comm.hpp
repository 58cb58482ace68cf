#pragma once
/// @file
/// Collective operations over the replicas of one process: all-reduce
/// (average or sum) and broadcast, in place on one tensor per replica.
///
/// Streams: like any ATen op, a collective on GPU tensors is enqueued on the
/// calling thread's current stream of each tensor's device, after the work
/// already queued there, and the call returns without waiting for the
/// device. See Note [Streams] in detail/streams.hpp.
///
/// Backends:
///   - LocalCommunicator (this header): CPU replicas, and several replicas on
///     one GPU (or GPUs without NCCL). On CPUs it computes on the calling
///     thread and returns when the result is in place; on GPUs it enqueues
///     ATen copies and sums.
///   - NcclCommunicator (multigpu/nccl/communicator.hpp, with
///     MULTIGPU_WITH_NCCL): distinct GPUs. Enqueues NCCL kernels; a watchdog
///     aborts collectives that outlive the time-out; wait() waits.
/// make_communicator() (multigpu/backend.hpp) chooses between them.
///
/// Thread safety: one collective at a time per communicator unless the
/// backend says otherwise (LocalCommunicator allows concurrent calls on
/// different tensors).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/config.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/worker.hpp"

namespace multigpu {

/// What an all-reduce computes.
enum class ReduceOp { kSum, kAverage };

/// Collectives over one tensor per replica (see the file comment).
class Communicator {
 public:
  virtual ~Communicator() = default;
  /// "local", "nccl", ...
  virtual std::string name() const = 0;
  /// Number of this process's replicas (tensors per collective).
  virtual std::size_t size() const = 0;
  /// Replicas taking part over every process (size() for in-process
  /// backends). Averages divide by it.
  virtual std::size_t world_size() const { return size(); }
  /// True when collectives must be issued in one order everywhere (NCCL,
  /// Gloo across processes match them by order), so that one thread
  /// launches them. Only a purely local backend may say false.
  virtual bool needs_one_order() const { return true; }
  /// Every tensors[r] becomes the sum (or average) over r. tensors[r] belongs
  /// to replica r and lives on its device; all have one shape and dtype.
  virtual void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) = 0;
  /// Every tensors[r] becomes a copy of tensors[root].
  virtual void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) = 0;
  /// Waits until every collective issued so far is complete on every
  /// replica. Throws CommError when one failed or `timeout` passed first.
  virtual void wait(std::chrono::milliseconds timeout) { (void)timeout; }
  /// Why the communicator cannot be used any more ("" while it can), e.g.
  /// an NCCL communicator its watchdog aborted after a time-out.
  virtual std::string failure() const { return ""; }
};

// Note [Virtual functions in a header-only library]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A virtual function declared in its class without `inline` is the class's
// "key function" (Itanium C++ ABI), even when defined `inline` later: then
// every translation unit that includes the header emits the vtable and every
// virtual function, used or not. That cost the umbrella header seconds of
// compile time. Virtual functions defined outside their class are therefore
// declared `inline` inside it.

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

/// "[2, 3]": a shape for messages.
inline std::string shape_text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) out += fmt::format("{}{}", i == 0 ? "" : ", ", sizes[i]);
  return out + "]";
}

/// Checks that a collective's tensors fit together: one per replica, same
/// shape and dtype, each on its replica's device.
inline void check_collective_tensors(const std::vector<at::Tensor>& tensors, const std::vector<ReplicaContext>& replicas,
                                     const char* what) {
  if (tensors.size() != replicas.size()) {
    throw CommError(fmt::format("{}: {} tensors for {} replicas", what, tensors.size(), replicas.size()));
  }
  for (std::size_t r = 0; r < tensors.size(); ++r) {
    const at::Tensor& t = tensors[r];
    if (!t.defined()) throw CommError(fmt::format("{}: replica {}'s tensor is undefined", what, r));
    if (t.device() != replicas[r].device()) {
      throw CommError(fmt::format("{}: replica {}'s tensor is on {}, the replica on {}", what, r, t.device().str(),
                                  replicas[r].device().str()));
    }
    if (t.sizes() != tensors[0].sizes() || t.scalar_type() != tensors[0].scalar_type()) {
      throw CommError(fmt::format("{}: replica {}'s tensor is {}{}, replica 0's {}{}", what, r,
                                  c10::toString(t.scalar_type()), shape_text(t.sizes()),
                                  c10::toString(tensors[0].scalar_type()), shape_text(tensors[0].sizes())));
    }
  }
}

/// Note [Fused local all-reduce]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// The naive all-reduce (t0 += t1 ...; then copy t0 to the others) passes
/// over memory 5(K-1) times the buffer size. Working in chunks that stay in
/// cache, each chunk is summed into replica 0's chunk and copied out while
/// still hot: each replica's buffer is read once and written once, 2K passes
/// in all, which is what bounds an all-reduce on one memory system. Chunks
/// are independent, so they run in parallel. The summation order is fixed
/// (replica 0, 1, ...), so every run and every replica gets the same bits.
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

