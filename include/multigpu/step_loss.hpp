#pragma once
/// @file
/// StepLoss: the loss of a training step, kept on the device until read.
///
///   multigpu::StepLoss loss = dp.train_step(batch, loss_fn);  // returns without waiting for the GPU
///   running += loss.tensor();                                 // accumulate on the device, still no wait
///   double value = loss;                                      // reading waits for the step to finish
///
/// Reading the value on every step makes the host wait for the GPU on every
/// step, which keeps the GPU idle while the host prepares the next batch;
/// read it every few steps, or accumulate tensor() on the device. A StepLoss
/// of a GPU step holds a small block of pinned host memory for as long as it
/// lives: to keep many steps' losses, keep item()'s double (or tensor()),
/// not the StepLoss.

// Note [Reading a step's loss]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The loss of step n is read when the host wants it, often after step n+1
// was launched (a loop that prints the previous loss). Reading the device
// tensor then would copy it on the reading thread's current stream, behind
// everything queued there since: the whole of step n+1, which the exit
// fence ordered onto the caller's stream (Note [Streams], rule 2). So, as
// the loss is made, it is also copied to pinned host memory with
// non_blocking on the stream it was made on, and `ready` is recorded after
// that copy; reading waits for that event only, then reads host memory.
// The copy is one small transfer per step, queued on the replica's stream
// right after the loss; the pinned block goes back to LibTorch's host
// allocator, which reuses it only once the copy is done. tensor() stays on the device, for
// code that accumulates losses there.
// The pinned block, and the event, belong to the StepLoss until it is
// destroyed, read or not: each live StepLoss holds one block of page-locked
// host memory that the allocator cannot hand out again. A loop that keeps
// every step's StepLoss (a vector of them for a plot) pins one more block per
// step, for as long as it keeps them; keep only what you need: the double
// that item() returns, or tensor() (on the device), not the StepLoss.

#include <memory>
#include <optional>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"

namespace multigpu {

/// The whole batch's loss of one step (see the file comment).
class StepLoss {
 public:
  StepLoss() = default;
  /// `value`: a one-element tensor (float64) on the first replica's device;
  /// `ready`: recorded where it was computed (null on the CPU); `host`:
  /// where a GPU's value is copied to, in pinned memory, complete once
  /// `ready` has happened (see Note [Reading a step's loss]).
  explicit StepLoss(at::Tensor value, std::shared_ptr<c10::Event> ready = nullptr, at::Tensor host = {})
      : value_(std::move(value)), ready_(std::move(ready)), host_(std::move(host)) {}

  /// The loss as a number; waits for the step's work on the device the
  /// first time. Throws multigpu::Error for an empty StepLoss.
  double item() const {
    if (!cached_) {
      if (!value_.defined()) throw Error("StepLoss: no loss here (a default-constructed StepLoss)");
      // Whatever thread or stream reads it: the value is complete first.
      if (ready_) compat::wait_for_event(*ready_);
      cached_ = host_.defined() ? host_.item<double>() : value_.item<double>();  // See Note [Reading a step's loss]
    }
    return *cached_;
  }
  /// The same as item(): `double loss = dp.train_step(...)` reads it at once.
  operator double() const { return item(); }  // NOLINT(google-explicit-constructor): reads like the double it was
  /// The loss as a 0-dimensional float64 tensor on the first replica's
  /// device, ordered after the step on the caller's current stream.
  const at::Tensor& tensor() const { return value_; }
  /// Whether the value has been read already (the host waited for it).
  bool read() const { return cached_.has_value(); }

 private:
  at::Tensor value_;
  std::shared_ptr<c10::Event> ready_;
  at::Tensor host_;  // pinned; defined for a loss on a GPU
  mutable std::optional<double> cached_;
};

}  // namespace multigpu
