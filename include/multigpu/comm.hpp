#pragma once
/// @file
/// Collective operations over the replicas of one process: all-reduce
/// (average or sum) and broadcast, in place on one tensor per replica.
///
/// Streams: like any ATen op, a collective on GPU tensors is enqueued on the
/// calling thread's current stream of each tensor's device, after the work
/// already queued there, and the call returns without waiting for the
/// device. See Note [Streams] in streams.hpp.
///
/// Backends:
///   - LocalCommunicator (multigpu/local/communicator.hpp): CPU replicas, and several replicas on
///     one GPU (or GPUs without NCCL). On CPUs it computes on the calling
///     thread and returns when the result is in place; on GPUs it enqueues
///     ATen copies and sums.
///   - NcclCommunicator (multigpu/nccl/communicator.hpp, with
///     MULTIGPU_WITH_NCCL): distinct GPUs. Enqueues NCCL kernels; a watchdog
///     aborts collectives that outlive the time-out; wait() waits.
///   - CrossProcessCommunicator (multigpu/gloo/communicator.hpp): several
///     processes without NCCL, or sharing a GPU: local reduction, then the
///     ProcessCollectives of a ProcessGroup (Gloo) between processes.
/// make_communicator() (multigpu/backend.hpp) chooses between them; see
/// Note [Choosing a backend] there.
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
#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/collective_trace.hpp"
#include "multigpu/config.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/tensor_text.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

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

/// The collectives between processes that a cross-process backend builds
/// on: ProcessGroup (multigpu/distributed.hpp) provides them over c10d, so
/// that the backends' folders need none of c10d's headers. Every process
/// calls each of them, in the same order.
class ProcessCollectives {
 public:
  virtual ~ProcessCollectives() = default;
  /// This process's rank, 0 .. size()-1.
  virtual int rank() const = 0;
  /// Number of processes.
  virtual int size() const = 0;
  /// In place on a CPU tensor of every process: the sum over processes.
  virtual void all_reduce_sum(const at::Tensor& tensor) = 0;
  /// In place on a CPU tensor of every process: a copy of `root`'s.
  virtual void broadcast(const at::Tensor& tensor, int root) = 0;
  /// Every process's `value`, by rank (for small facts).
  virtual std::vector<std::string> all_gather_text(const std::string& value) = 0;
};

// Note [Virtual functions in a header-only library]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A virtual function declared in its class without `inline` is the class's
// "key function" (Itanium C++ ABI), even when defined `inline` later: then
// every translation unit that includes the header emits the vtable and every
// virtual function, used or not. That cost the umbrella header seconds of
// compile time. Virtual functions defined outside their class are therefore
// declared `inline` inside it.

namespace detail {

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

}  // namespace detail

}  // namespace multigpu

// LocalCommunicator was first declared in this header: programs that include
// only comm.hpp for it still find it.
#include "multigpu/local/communicator.hpp"
