#pragma once
// Gradient scaling and clipping across replicas: the definitions of these DataParallelCore members
// (declared in data_parallel/core.hpp, which includes this file).

#include "multigpu/data_parallel/core.hpp"

namespace multigpu {
namespace detail {

// Note [Gradient scaling across replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// With a GradScaler (fp16), every replica back-propagates its weighted loss
// times the scale S (Note [Loss weights]), so that small gradients survive
// in float16; the reported loss is the unscaled one. Before the optimizer
// sees them the gradients are unscaled, once per step, on every replica's
// own thread and stream: multiplied by 1/S (exact: S is a power of two
// with the default factors), while a flag per replica records whether any
// value is infinite or NaN. clip_grad_norm unscales first, so that it
// clips true gradients; step() unscales if nothing did.
//
// Whether to skip must be one decision everywhere: a replica whose own
// gradients are finite must still skip when another replica's (or another
// process's) are not, or the replicas drift apart. Gradients agree after
// the sync, but a flag computed from them would agree only by luck (a
// replica's gradient changed after the sync, a NaN that the sum turned into
// a value). So step() all-reduces the replicas' flags (a sum, over the
// communicator, which spans every process in multi-process training: one
// collective of one float per replica) and reads the sum on the host: that
// read is the one host wait per step that a GradScaler costs (Note
// [Streams], rule 5), the wait PyTorch's GradScaler.step() makes too,
// since LibTorch's optimizers cannot take the flag on the device. A
// positive sum skips every replica's optimizer step; then the scale backs
// off, else it grows after growth_interval good steps in a row (update()).
// A skipped step is not counted in steps(); buffers are still broadcast.

inline void DataParallelCore::unscale_gradients() {
  if (unscaled_) return;
  const double inv_scale = 1.0 / scaler_->scale();
  found_inf_.assign(size(), at::Tensor());
  workers_.run(
      [&](std::size_t r) {
        found_inf_[r] = at::zeros({1}, at::TensorOptions().device(devices_[r]).dtype(at::kFloat));
        std::vector<at::Tensor> grads;
        for (const auto& p : parameters_[r]) grads.push_back(p.grad());
        detail::unscale_gradients(grads, inv_scale, found_inf_[r]);
      },
      "unscaling gradients");
  unscaled_ = true;
}

inline bool DataParallelCore::gradients_overflowed() {
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);  // after the flags were set, on the replicas' streams
  const CollectivePurpose purpose("scaler flag");
  comm_->all_reduce(found_inf_, ReduceOp::kSum);
  const bool overflowed = found_inf_[0].item<double>() > 0;  // the host wait a GradScaler costs
  found_inf_.clear();
  return overflowed;
}

// Note [Clipping across replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Clipping needs the norm of the whole gradient, and every replica must
// scale its gradients by the same factor. After the sync (made here if
// needed) every replica holds the same averaged gradients, and across
// processes each process holds the same averages, so the norm is computed
// once, from the primary's gradients on its stream; the clip factor
// min(1, max_norm / (norm + 1e-6)) is copied from the primary's device to
// every other replica's, device to device (no host wait), and applied
// there. Computing it on each replica would agree only as far as every
// device's reduction gives the same bits. With a GradScaler the gradients
// are unscaled first (once per step: see Note [Gradient scaling across
// replicas]); an overflowed step has an infinite or NaN norm, and step()
// skips it anyway.
//
// The norm and the scaling are foreach ops (Note [Foreach ops across
// versions]): on a GPU a few fused launches per replica, not one or two
// per parameter, on the CPU the very loop of per-tensor ops that
// torch::nn::utils::clip_grad_norm_ runs. Its arithmetic is kept too: each
// gradient's norm in its own dtype, their norm (or, with one gradient, that
// norm itself), max_norm / (norm + 1e-6) clamped at 1. On the CPU float64
// gradients give the same bits as clip_grad_norm_ (tested within 1e-12, so
// that another LibTorch's reduction order may differ in the last bit); a
// GPU's fused norm may round differently there. The norm is float32, or
// float64 when a gradient is (a float16 model's norm in float32, as before).
inline at::Tensor DataParallelCore::clip_grad_norm(double max_norm, double norm_type) {
  require_usable("clip_grad_norm");
  if (!(max_norm > 0) || std::isnan(max_norm)) {
    throw Error(fmt::format("clip_grad_norm: max_norm must be positive, got {}", max_norm));
  }
  if (!(norm_type > 0) || std::isnan(norm_type)) {
    throw Error(fmt::format("clip_grad_norm: norm_type must be positive (2 for the Euclidean norm, infinity for the "
                            "largest value), got {}",
                            norm_type));
  }
  if (in_no_sync()) {
    throw Error("clip_grad_norm inside no_sync(): the replicas' gradients are not averaged yet; clip after the guard "
                "is gone");
  }
  const auto fence = fenced();
  if (reducer_ && !reducer_->synchronized()) reducer_->synchronize();
  if (scaler_) unscale_gradients();
  const compat::NoGradGuard no_grad;
  const auto caller = current_stream(devices_[0]);
  const ReplicaStreamsCurrent on_replicas(contexts_);
  std::vector<std::vector<at::Tensor>> grads(size());  // [replica], the defined ones
  at::ScalarType dtype = at::kFloat;  // the norm's: float, or double when a gradient is
  for (std::size_t r = 0; r < size(); ++r) {
    for (const auto& p : parameters_[r]) {
      if (!p.grad().defined()) continue;
      grads[r].push_back(p.grad());
      if (r == 0 && p.grad().scalar_type() == at::kDouble) dtype = at::kDouble;
    }
  }
  at::Tensor total = at::zeros({}, at::TensorOptions().device(devices_[0]).dtype(dtype));
  if (!grads[0].empty()) {
    std::vector<at::Tensor> norms = at::_foreach_norm(grads[0], norm_type);
    for (auto& norm : norms) norm = norm.to(dtype);
    if (norms.size() == 1) {
      total = norms[0];
    } else {
      const at::Tensor stacked = at::stack(norms);
      total = std::isinf(norm_type) ? stacked.max() : stacked.norm(norm_type);
    }
    const at::Tensor factor = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (std::size_t r = 0; r < size(); ++r) {
      // A foreach op refuses an empty list: a replica whose gradients were
      // all set to none behind our back (its module's zero_grad()) has
      // nothing to scale.
      if (grads[r].empty()) continue;
      compat::foreach_mul_(grads[r], r == 0 ? factor : factor.to(devices_[r]));
    }
  }
  if (caller) mark_used_on(total, *caller);  // read on the caller's stream (Note [Streams], rule 4)
  return total;
}

}  // namespace detail
}  // namespace multigpu
