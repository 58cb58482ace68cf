#pragma once
/// @file
/// ReplicaContext: the device and, on GPUs, the private stream of one
/// replica. Most of the library needs only this (communicators, the stream
/// fence, the reducer); the threads that run replicas are in worker.hpp.

#include <cstddef>
#include <optional>

#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace multigpu {

/// Where a loss function runs: DataParallel passes it as the third
/// argument to a loss function that takes one (see Note [The replica's place]
/// in data_parallel.hpp).
struct ReplicaPlace {
  /// The replica's index in this process, 0 .. size()-1 (0: your module).
  std::size_t index;
  /// The replica's device.
  c10::Device device;
};

/// The device and, on GPUs, the private stream of one replica.
class ReplicaContext {
 public:
  /// `own_stream`: give a GPU replica a stream from LibTorch's pool instead
  /// of the default one (true for training replicas).
  explicit ReplicaContext(c10::Device device, bool own_stream = true);

  /// The replica's device.
  const c10::Device& device() const { return device_; }
  /// The replica's stream; nullopt on the CPU.
  const std::optional<c10::Stream>& stream() const { return stream_; }
  /// Waits until everything queued on the replica's stream is done (no-op on the CPU).
  void synchronize() const;

  /// Makes the replica's device and stream current for the scope's lifetime.
  class Scope {
   public:
    /// Makes `context`'s device and stream current.
    explicit Scope(const ReplicaContext& context);

   private:
    std::optional<c10::DeviceGuard> device_guard_;
    std::optional<c10::StreamGuard> stream_guard_;
  };

 private:
  c10::Device device_;
  std::optional<c10::Stream> stream_;
};

// ---------------------------------------------------------------------------
// Definitions

inline ReplicaContext::ReplicaContext(c10::Device device, bool own_stream) : device_(device) {
  if (device_.type() != c10::DeviceType::CPU) {
    const c10::impl::VirtualGuardImpl guard(device_.type());
    stream_ = own_stream ? guard.getStreamFromGlobalPool(device_) : guard.getDefaultStream(device_);
  }
}

inline void ReplicaContext::synchronize() const {
  if (stream_) stream_->synchronize();
}

inline ReplicaContext::Scope::Scope(const ReplicaContext& context) {
  if (context.stream()) {
    stream_guard_.emplace(*context.stream());  // sets the device too
  } else if (context.device().type() != c10::DeviceType::CPU) {
    device_guard_.emplace(context.device());
  }
}

}  // namespace multigpu
