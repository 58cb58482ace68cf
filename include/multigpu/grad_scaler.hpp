#pragma once
/// @file
/// GradScaler: dynamic loss scaling for float16 training, across every
/// replica and every process (LibTorch has autocast, but its GradScaler is
/// Python only).
///
///   multigpu::DataParallelOptions options;
///   options.precision = multigpu::Precision::kFloat16;
///   options.grad_scaler = std::make_shared<multigpu::GradScaler>();
///   multigpu::DataParallel<Net> dp(net, devices, options);
///   dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(1e-3));
///   for (auto& batch : *loader) dp.train_step(batch, loss_fn);  // scaled, unscaled, skipped on overflow
///
/// With your own loop: dp.forward_backward(...) back-propagates the scaled
/// loss; dp.clip_grad_norm(...) (optional) unscales first; dp.step()
/// unscales if that was not done, skips the step everywhere when a gradient
/// anywhere is not finite, and updates the scale; then dp.zero_grad().
/// See Note [Gradient scaling across replicas] in data_parallel/core_scaling-inl.hpp.
///
/// The scaler belongs to one DataParallel and is changed only by the thread
/// that drives it. Its state goes into a checkpoint with save() and load().

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <fmt/core.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"

namespace multigpu {

/// How the loss scale starts, grows and backs off (PyTorch's defaults).
struct GradScalerOptions {
  /// The first scale.
  double init_scale = 65536.0;
  /// The scale is multiplied by it after `growth_interval` steps in a row without overflow.
  double growth_factor = 2.0;
  /// The scale is multiplied by it on a step whose gradients overflowed.
  double backoff_factor = 0.5;
  /// Steps in a row without overflow before the scale grows.
  std::int64_t growth_interval = 2000;
};

/// Dynamic loss scaling (see the file comment).
class GradScaler {
 public:
  /// Throws Error for options that make no scaler (a scale that is not
  /// positive, growth not above 1, back-off not in (0, 1), an interval below 1).
  explicit GradScaler(GradScalerOptions options = {});

  /// The factor the loss is multiplied by now.
  double scale() const { return scale_; }
  /// Steps in a row without overflow since the scale last changed.
  std::int64_t growth_tracker() const { return growth_tracker_; }
  /// Steps skipped because a gradient was infinite or NaN (not saved).
  std::int64_t skipped_steps() const { return skipped_steps_; }
  /// Whether the last step was skipped.
  bool last_step_skipped() const { return last_step_skipped_; }
  /// The options it was made with.
  const GradScalerOptions& options() const { return options_; }

  /// Records one step's outcome: with `found_inf` the step was skipped and
  /// the scale backs off; otherwise it grows after growth_interval good
  /// steps in a row. DataParallel calls it from step().
  void update(bool found_inf);

  /// Writes the scale, the growth tracker and the options under the key
  /// "grad_scaler" of `archive` (PyTorch's GradScaler.state_dict()).
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what save() wrote. Throws CheckpointError when `archive` holds none, or a state that is not valid.
  void load(torch::serialize::InputArchive& archive);

 private:
  /// What is wrong with `options` and `scale`, after `what: ` ("" when nothing).
  static std::string problem(const GradScalerOptions& options, double scale, const char* what);

  GradScalerOptions options_;
  double scale_;
  std::int64_t growth_tracker_ = 0;
  std::int64_t skipped_steps_ = 0;
  bool last_step_skipped_ = false;
};

namespace detail {

/// Multiplies every gradient by `inv_scale` in place and sets `found_inf`
/// (one float on the gradients' device) to 1 when any value is infinite or
/// NaN. Runs on the calling thread's current stream; no host wait.
void unscale_gradients(const std::vector<at::Tensor>& grads, double inv_scale, const at::Tensor& found_inf);

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline std::string GradScaler::problem(const GradScalerOptions& options, double scale, const char* what) {
  if (!(scale > 0) || !std::isfinite(scale)) {
    return fmt::format("{}: the scale must be positive and finite, got {}", what, scale);
  }
  if (!(options.growth_factor > 1) || !std::isfinite(options.growth_factor)) {
    return fmt::format("{}: growth_factor must be above 1, got {}", what, options.growth_factor);
  }
  if (!(options.backoff_factor > 0 && options.backoff_factor < 1)) {
    return fmt::format("{}: backoff_factor must be between 0 and 1 (exclusive), got {}", what,
                       options.backoff_factor);
  }
  if (options.growth_interval < 1) {
    return fmt::format("{}: growth_interval must be at least 1, got {}", what, options.growth_interval);
  }
  return "";
}

inline GradScaler::GradScaler(GradScalerOptions options) : options_(options), scale_(options.init_scale) {
  if (const std::string wrong = problem(options_, scale_, "GradScalerOptions"); !wrong.empty()) throw Error(wrong);
}

inline void GradScaler::update(bool found_inf) {
  last_step_skipped_ = found_inf;
  if (found_inf) {
    ++skipped_steps_;
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    return;
  }
  if (++growth_tracker_ == options_.growth_interval) {
    const double grown = scale_ * options_.growth_factor;
    if (std::isfinite(grown)) scale_ = grown;  // as PyTorch: a scale that would overflow stays
    growth_tracker_ = 0;
  }
}

inline void GradScaler::save(torch::serialize::OutputArchive& archive) const {
  torch::serialize::OutputArchive mine(archive.compilation_unit());
  mine.write("scale", c10::IValue(scale_));
  mine.write("growth_tracker", c10::IValue(growth_tracker_));
  mine.write("growth_factor", c10::IValue(options_.growth_factor));
  mine.write("backoff_factor", c10::IValue(options_.backoff_factor));
  mine.write("growth_interval", c10::IValue(options_.growth_interval));
  archive.write("grad_scaler", mine);
}

inline void GradScaler::load(torch::serialize::InputArchive& archive) {
  torch::serialize::InputArchive mine;
  if (!archive.try_read("grad_scaler", mine)) {
    throw CheckpointError("GradScaler::load: the archive holds no \"grad_scaler\" (write one with GradScaler::save)");
  }
  auto read = [&](const char* key) {
    c10::IValue value;
    if (!mine.try_read(key, value)) {
      throw CheckpointError(fmt::format("GradScaler::load: the archive's grad_scaler has no {}", key));
    }
    return value;
  };
  // A value of another type is a damaged or foreign archive, not a bug of
  // the caller: CheckpointError, like the rest (IValue's own error would be
  // a c10::Error).
  auto read_double = [&](const char* key) {
    const c10::IValue value = read(key);
    if (!value.isDouble()) {
      throw CheckpointError(fmt::format("GradScaler::load: the archive's grad_scaler's {} is a {}, not a float",
                                        key, value.tagKind()));
    }
    return value.toDouble();
  };
  auto read_int = [&](const char* key) {
    const c10::IValue value = read(key);
    if (!value.isInt()) {
      throw CheckpointError(fmt::format("GradScaler::load: the archive's grad_scaler's {} is a {}, not an integer",
                                        key, value.tagKind()));
    }
    return value.toInt();
  };
  GradScalerOptions options = options_;
  const double scale = read_double("scale");
  const std::int64_t tracker = read_int("growth_tracker");
  options.growth_factor = read_double("growth_factor");
  options.backoff_factor = read_double("backoff_factor");
  options.growth_interval = read_int("growth_interval");
  if (const std::string wrong = problem(options, scale, "GradScaler::load"); !wrong.empty()) {
    throw CheckpointError(wrong);
  }
  if (tracker < 0 || tracker >= options.growth_interval) {
    throw CheckpointError(fmt::format("GradScaler::load: growth_tracker {} is not in 0..{}", tracker,
                                      options.growth_interval - 1));
  }
  options_ = options;
  scale_ = scale;
  growth_tracker_ = tracker;
}

namespace detail {

inline void unscale_gradients(const std::vector<at::Tensor>& grads, double inv_scale, const at::Tensor& found_inf) {
  const compat::NoGradGuard no_grad;
  if (found_inf.is_cuda()) {
    // One fused kernel for the whole list (what PyTorch's GradScaler runs).
    std::vector<at::Tensor> defined;
    for (const auto& grad : grads) {
      if (grad.defined()) defined.push_back(grad);
    }
    if (defined.empty()) return;
    at::Tensor flag = found_inf;  // the same tensor: the function takes a non-const reference
    at::_amp_foreach_non_finite_check_and_unscale_(defined, flag, at::full({1}, inv_scale, found_inf.options()));
    return;
  }
  for (const auto& grad : grads) {
    if (!grad.defined()) continue;
    // all() of isfinite: an exact test, where a sum could overflow by itself.
    found_inf.logical_or_(grad.isfinite().all().logical_not());
    grad.mul_(inv_scale);
  }
}

}  // namespace detail
}  // namespace multigpu
