#pragma once
// How multigpu orders its GPU work against the caller's: the stream fence
// every public operation passes through, and marking memory that crosses
// streams. Everything here is a no-op for CPU devices.
//
// Note [Streams]
// ~~~~~~~~~~~~~~
// The discipline follows PyTorch's own (ProcessGroupNCCL, the DDP reducer,
// the caching allocator's record_stream); every rule below is applied in one
// place, named here.
//
// 1. Streams. Replica r computes on its own stream S_r (ReplicaContext), so
//    that replicas sharing a GPU still overlap. Its gradient accumulators
//    are created with S_r current, so autograd accumulates there too
//    (GradientReducer::attach_hooks; one made before DataParallel keeps
//    the user's stream: Note [Accumulators made before DataParallel]).
//    Collectives of the gradient sync run on a communication stream C_d
//    per GPU d (GradientReducer), so that backward goes on while buckets
//    are reduced.
//
// 2. Entry and exit (StreamFence). The caller works on its own current
//    streams: a batch copied with non_blocking, zero_grad on each optimizer
//    of dp.optimizers(), an evaluation of dp.module(). At the entry of every public
//    operation each S_r waits for the work queued so far on the caller's
//    current stream of every replica GPU; at its exit the caller's current
//    stream of every replica GPU waits for every S_r. So whatever the caller
//    did before a call is seen by the replicas, and whatever the replicas
//    did is seen by what the caller does after it: save(), check_parity(),
//    the optimizer's state, the loss, predict()'s outputs. Waits are on the
//    device (cudaStreamWaitEvent); the host is never blocked. Fences nest:
//    only the outermost one records and waits (train_step is one fence).
//
// 3. Collectives. A Communicator enqueues a collective for tensors[r] on the
//    calling thread's current stream of tensors[r]'s device, after the work
//    already queued there, like any ATen op. The reducer makes C_d current
//    and lets C_d wait for a bucket's ready event on S_r (recorded once per
//    bucket and replica: by the hook of the bucket's last gradient, or, on
//    every other path, just before the launch); once every bucket is
//    launched, each S_r waits for C_d's join event, so the optimizer step
//    reads reduced gradients. The buffer broadcast and the broadcasts from
//    the primary run with every S_r current, between the same kernels that
//    use the buffers.
//
// 4. Memory crossing streams. The caching allocator reuses a block as soon
//    as its tensor is freed, ordered only against the stream it was
//    allocated on. A tensor used on another stream is marked with
//    record_stream (mark_used_on): a shard that is a view of the caller's
//    batch, read on S_r; a loss or an output made on S_r and read on the
//    caller's stream; a bucket buffer made on S_r and reduced on C_d
//    (marked once, at construction, and again for buckets rebuilt later).
//
// 5. Host synchronisation. A training step does not wait for the GPU: the
//    loss comes back as a StepLoss that reads its value only when asked.
//    The options that need a value on the host say so
//    (check_finite_loss; a GradScaler reads one flag per step, see Note
//    [Gradient scaling across replicas]). A collective that does not finish within the
//    time-out is found by the NCCL backend's watchdog, which aborts the
//    communicators (Note [NCCL watchdog]), so nothing stays blocked; the
//    next collective throws CommError.

#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "multigpu/detail/event_pool.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {
namespace detail {

/// The calling thread's current stream on `device`; nullopt on the CPU.
inline std::optional<c10::Stream> current_stream(const c10::Device& device) {
  if (device.is_cpu()) return std::nullopt;
  const c10::impl::VirtualGuardImpl guard(device.type());
  return guard.getStream(device);
}

/// Marks `tensor`'s memory as used by work queued on `stream`, so that the
/// caching allocator does not hand it out again before that work has run.
/// See Note [Streams], rule 4. No-op for tensors not on a CUDA device.
inline void mark_used_on(const at::Tensor& tensor, const c10::Stream& stream) {
  if (tensor.defined() && tensor.is_cuda() && tensor.device() == stream.device()) tensor.record_stream(stream);
}

/// The same for the calling thread's current stream on the tensor's device.
inline void mark_used_on_current_stream(const at::Tensor& tensor) {
  if (!tensor.defined() || !tensor.is_cuda()) return;
  mark_used_on(tensor, *current_stream(tensor.device()));
}

/// Makes the replicas' streams current on the calling thread for its
/// lifetime: work issued there (a collective, packing buffers) runs between
/// the replicas' own kernels. One stream per GPU can be current; where
/// replicas share a GPU, the first one's stream is made current and the
/// others' are joined to it at both ends (events).
class ReplicaStreamsCurrent {
 public:
  explicit ReplicaStreamsCurrent(const std::vector<ReplicaContext>& replicas) {
    std::vector<c10::Stream> chosen;
    for (const auto& replica : replicas) {
      if (!replica.stream()) continue;
      const c10::Stream stream = *replica.stream();
      const c10::Stream* same_device = nullptr;
      for (const auto& other : chosen) same_device = other.device() == stream.device() ? &other : same_device;
      if (same_device == nullptr) {
        chosen.push_back(stream);
      } else if (*same_device != stream) {
        joined_.emplace_back(stream, *same_device);
        wait_for(*same_device, stream);
      }
    }
    if (!chosen.empty()) guard_.emplace(chosen);
  }
  ~ReplicaStreamsCurrent() {
    try {
      for (const auto& pair : joined_) wait_for(pair.first, pair.second);
    } catch (const std::exception& e) {
      warn(std::string("could not join a replica's stream after a collective: ") + e.what());
    }
  }
  ReplicaStreamsCurrent(const ReplicaStreamsCurrent&) = delete;
  ReplicaStreamsCurrent& operator=(const ReplicaStreamsCurrent&) = delete;

  /// `waiter` waits (on the device) for the work queued so far on `producer`.
  static void wait_for(const c10::Stream& waiter, const c10::Stream& producer) {
    const EventPool::Event event = pooled_event(producer.device());  // See Note [Event pool]
    event->record(producer);
    event->block(waiter);
  }

 private:
  std::vector<std::pair<c10::Stream, c10::Stream>> joined_;  // (a replica's stream, the stream current for its GPU)
  std::optional<c10::MultiStreamGuard> guard_;
};

/// Orders the replicas' streams against the caller's current streams; see
/// Note [Streams], rule 2. Holds one reusable event per GPU and per replica.
class StreamFence {
 public:
  explicit StreamFence(const std::vector<ReplicaContext>& replicas) {
    for (const auto& replica : replicas) {
      if (!replica.stream()) continue;
      replica_streams_.push_back(*replica.stream());
      replica_events_.push_back(std::make_unique<c10::Event>(replica.device().type()));
      bool seen = false;
      for (const auto& device : devices_) seen = seen || device == replica.device();
      if (!seen) {
        devices_.push_back(replica.device());
        device_events_.push_back(std::make_unique<c10::Event>(replica.device().type()));
      }
    }
  }

  /// Every replica stream waits for the work queued so far on the caller's
  /// current stream of every replica GPU.
  void enter() {
    for (std::size_t d = 0; d < devices_.size(); ++d) device_events_[d]->record(*current_stream(devices_[d]));
    for (const auto& stream : replica_streams_) {
      for (const auto& event : device_events_) event->block(stream);
    }
  }

  /// The caller's current stream of every replica GPU waits for the work
  /// queued so far on every replica stream.
  void leave() {
    for (std::size_t r = 0; r < replica_streams_.size(); ++r) replica_events_[r]->record(replica_streams_[r]);
    for (const auto& device : devices_) {
      const c10::Stream caller = *current_stream(device);
      for (const auto& event : replica_events_) event->block(caller);
    }
  }

  /// enter() for the outermost of nested scopes, leave() when it ends (also
  /// when an exception leaves it: the caller's streams are ordered either way).
  class Scope {
   public:
    explicit Scope(StreamFence& fence) : fence_(fence) {
      if (fence_.depth_++ == 0) {
        try {
          fence_.enter();
        } catch (...) {
          --fence_.depth_;
          throw;
        }
      }
    }
    ~Scope() {
      if (--fence_.depth_ != 0) return;
      try {
        fence_.leave();
      } catch (const std::exception& e) {
        warn(std::string("could not order the caller's streams after the replicas' work: ") + e.what());
      }
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    StreamFence& fence_;
  };

 private:
  std::vector<c10::Device> devices_;  // distinct GPUs of the replicas
  std::vector<std::unique_ptr<c10::Event>> device_events_;
  std::vector<c10::Stream> replica_streams_;
  std::vector<std::unique_ptr<c10::Event>> replica_events_;
  int depth_ = 0;
};

}  // namespace detail
}  // namespace multigpu
