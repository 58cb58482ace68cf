#pragma once
/// @file
/// SyncBatchNorm: a BatchNorm whose training-mode statistics are those of the
/// whole batch of a DataParallel step, over every replica of this process
/// and, through the DataParallel's communicator, every process; and
/// convert_sync_batchnorm, which puts it in place of the BatchNorm layers of
/// a model.
///
///   auto net = torch::nn::Sequential(torch::nn::Conv2d(1, 8, 3), torch::nn::BatchNorm2d(8), torch::nn::ReLU());
///   multigpu::convert_sync_batchnorm(*net);            // or declare multigpu::SyncBatchNorm in the model
///   multigpu::DataParallel<torch::nn::Sequential> dp(net, devices);
///
/// Statistics are count-weighted: uneven shards and replicas without samples
/// give the whole batch's mean and variance exactly. Each layer makes one
/// all-reduce in forward (count, sum, sum of squares) and one in backward
/// (sum of the gradient, and of the gradient times the normalised input).
/// In eval mode, or outside a DataParallel step, it is BatchNorm and
/// communicates nothing. Parameters and buffers have BatchNorm's names
/// (weight, bias, running_mean, running_var, num_batches_tracked), so
/// checkpoints load both ways with torch::load. See Note [SyncBatchNorm
/// across replicas] in sync_batch_norm/rendezvous.hpp for the threads.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/core.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/pimpl.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/sync_batch_norm/rendezvous.hpp"

namespace multigpu {

/// BatchNorm over the whole batch of a DataParallel step (see the file comment).
/// Takes inputs of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W).
class SyncBatchNormImpl : public torch::nn::Cloneable<SyncBatchNormImpl>, public detail::ReplicaSyncedLayer {
 public:
  /// A layer over `num_features` channels with BatchNorm's defaults.
  explicit SyncBatchNormImpl(std::int64_t num_features)
      : SyncBatchNormImpl(torch::nn::BatchNormOptions(num_features)) {}
  /// A layer with BatchNorm's options (eps, momentum or none, affine, track_running_stats).
  explicit SyncBatchNormImpl(const torch::nn::BatchNormOptions& options_) : options(options_) { reset(); }

  /// Registers the parameters and buffers (Cloneable's contract).
  inline void reset() override;
  /// Running mean 0, running variance 1, num_batches_tracked 0.
  inline void reset_running_stats();
  /// reset_running_stats, and weight 1, bias 0.
  inline void reset_parameters();
  /// Normalises `input` (see the class comment).
  inline at::Tensor forward(const at::Tensor& input);
  /// "multigpu::SyncBatchNorm(64, eps=1e-05, ...)".
  inline void pretty_print(std::ostream& stream) const override;
  /// The name used in error messages: the layer's path in the model.
  inline void set_sync_name(const std::string& path) override { sync_name_ = path; }
  /// The name used in error messages.
  std::string sync_name() const {
    return sync_name_.empty() ? fmt::format("SyncBatchNorm({})", options.num_features()) : sync_name_;
  }

  /// The options it was built with.
  torch::nn::BatchNormOptions options;
  /// The learned scale (undefined unless affine).
  at::Tensor weight;
  /// The learned shift (undefined unless affine).
  at::Tensor bias;
  /// The running mean (undefined unless track_running_stats).
  at::Tensor running_mean;
  /// The running (unbiased) variance (undefined unless track_running_stats).
  at::Tensor running_var;
  /// Training-mode calls so far (undefined unless track_running_stats).
  at::Tensor num_batches_tracked;

 private:
  at::Tensor forward_local(const at::Tensor& input);
  at::Tensor forward_synced(const at::Tensor& input, const detail::ReplicaSync& sync);

  std::string sync_name_;
};

/// A module holder for SyncBatchNormImpl (as torch::nn::BatchNorm2d for BatchNorm2dImpl).
TORCH_MODULE(SyncBatchNorm);

/// Replaces every torch::nn::BatchNorm1d/2d/3d below `module` (not `module`
/// itself) with a SyncBatchNorm of the same options, parameters, buffers,
/// device, dtype and mode, under the same name. Returns how many it
/// replaced; warns when there were none. A BatchNorm that is also held
/// elsewhere (a member its parent's forward() calls, a ModuleList) cannot
/// be replaced from outside in C++: then it throws Error naming those
/// layers and changes nothing; declare them as multigpu::SyncBatchNorm.
inline std::size_t convert_sync_batchnorm(torch::nn::Module& module);

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

// The normalisation x̂ = (x - mean) * invstd with the whole batch's mean and
// invstd; its backward needs the whole batch's sums of dy and dy * x̂, hence
// a collective of its own (PyTorch's SyncBatchNorm backward, written on x̂:
// the affine part stays with autograd, whose weight and bias gradients are
// the local sums the gradient reducer then averages).
struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& count,
                            c10::intrusive_ptr<ReplicaRendezvous> rendezvous, std::int64_t replica,
                            const std::string& layer, std::int64_t step) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(input.dim()), 1);
    shape[1] = input.size(1);
    const at::Tensor xhat =
        ((input.to(mean.scalar_type()) - mean.view(shape)) * invstd.view(shape)).to(input.scalar_type());
    ctx->save_for_backward({xhat, invstd, count});
    ctx->saved_data["rendezvous"] = at::IValue::make_capsule(std::move(rendezvous));
    ctx->saved_data["replica"] = replica;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["step"] = step;
    return xhat;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& xhat = saved[0];
    const at::Tensor& invstd = saved[1];
    const at::Tensor& count = saved[2];
    const at::Tensor& grad = grad_outputs[0];
    const auto capsule = ctx->saved_data["rendezvous"].toCapsule();  // keeps the rendezvous alive
    auto* rendezvous = static_cast<ReplicaRendezvous*>(capsule.get());
    const std::int64_t channels = invstd.size(0);
    std::vector<std::int64_t> shape(static_cast<std::size_t>(xhat.dim()), 1);
    shape[1] = channels;
    std::vector<std::int64_t> dims{0};
    for (std::int64_t d = 2; d < xhat.dim(); ++d) dims.push_back(d);

    const at::Tensor g = grad.to(invstd.scalar_type());
    const at::Tensor x = xhat.to(invstd.scalar_type());
    const at::Tensor sums = at::cat({g.sum(dims), (g * x).sum(dims)});
    rendezvous->all_reduce(static_cast<std::size_t>(ctx->saved_data["replica"].toInt()), SyncPhase::kBackward,
                           ctx->saved_data["layer"].toStringRef(), sums,
                           static_cast<std::uint64_t>(ctx->saved_data["step"].toInt()));
    const at::Tensor mean_g = (sums.narrow(0, 0, channels) / count).view(shape);
    const at::Tensor mean_gx = (sums.narrow(0, channels, channels) / count).view(shape);
    const at::Tensor grad_input = (invstd.view(shape) * (g - mean_g - x * mean_gx)).to(grad.scalar_type());
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

inline void note_sync_batch_norm_alone() {
  static std::once_flag once;
  std::call_once(once, [] {
    log(LogLevel::kInfo,
        "SyncBatchNorm ran in training mode outside a DataParallel step: it normalises with this batch's own "
        "statistics, as BatchNorm does (this note is shown once)");
  });
}

}  // namespace detail

inline void SyncBatchNormImpl::reset() {
  const auto features = options.num_features();
  if (options.affine()) {
    weight = register_parameter("weight", at::empty({features}));
    bias = register_parameter("bias", at::empty({features}));
  } else {
    weight = register_parameter("weight", at::Tensor(), /*requires_grad=*/false);
    bias = register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = register_buffer("running_mean", at::zeros({features}));
    running_var = register_buffer("running_var", at::ones({features}));
    num_batches_tracked = register_buffer("num_batches_tracked", at::zeros({}, at::kLong));
  } else {
    running_mean = register_buffer("running_mean", at::Tensor());
    running_var = register_buffer("running_var", at::Tensor());
    num_batches_tracked = register_buffer("num_batches_tracked", at::Tensor());
  }
  reset_parameters();
}

inline void SyncBatchNormImpl::reset_running_stats() {
  if (!options.track_running_stats()) return;
  const compat::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
}

inline void SyncBatchNormImpl::reset_parameters() {
  reset_running_stats();
  if (!options.affine()) return;
  const compat::NoGradGuard no_grad;
  weight.fill_(1);
  bias.zero_();
}

inline void SyncBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "multigpu::SyncBatchNorm(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << options.affine() << ", track_running_stats=" << options.track_running_stats() << ")";
}

inline at::Tensor SyncBatchNormImpl::forward(const at::Tensor& input) {
  if (input.dim() < 2) {
    throw Error(fmt::format("SyncBatchNorm '{}': expected an input (N, C, ...) of 2 to 5 dimensions, got {}",
                            sync_name(), input.dim()));
  }
  if (input.size(1) != options.num_features()) {
    throw Error(fmt::format("SyncBatchNorm '{}': the input has {} channels (dimension 1), the layer {}", sync_name(),
                            input.size(1), options.num_features()));
  }
  if (!is_training()) return forward_local(input);
  const detail::ReplicaSync& sync = detail::current_replica_sync();
  if (!sync.rendezvous) {
    detail::note_sync_batch_norm_alone();
    return forward_local(input);
  }
  if (sync.rendezvous->world_size() <= 1) return forward_local(input);
  return forward_synced(input, sync);
}

// BatchNorm's own forward (torch::nn::BatchNormImplBase::forward).
inline at::Tensor SyncBatchNormImpl::forward_local(const at::Tensor& input) {
  double factor = options.momentum().has_value() ? *options.momentum() : 0.0;
  if (is_training() && options.track_running_stats() && num_batches_tracked.defined()) {
    num_batches_tracked += 1;
    factor = options.momentum().has_value() ? *options.momentum() : 1.0 / num_batches_tracked.item<double>();
  }
  return at::batch_norm(input, weight, bias, running_mean, running_var,
                        is_training() || !options.track_running_stats(), factor, options.eps(),
                        at::globalContext().userEnabledCuDNN());
}

// Note [SyncBatchNorm statistics]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Each replica sends [sum x, sum x^2, n] per channel (one all-reduce); with
// the totals S1, S2, N every replica computes mean = S1/N and the biased
// variance S2/N - mean^2 (normalisation), N/(N-1) of it for running_var, as
// BatchNorm. Sums, not per-replica means: an empty shard adds zeros, and one
// all-reduce (no all-gather, which the Communicator has not) combines any
// number of replicas and processes exactly. The price is cancellation in
// S2/N - mean^2 when |mean| is much larger than the standard deviation:
// the sums are kept in the input's dtype, float32 for fp16/bf16 (PyTorch's
// Welford merge of per-replica means avoids it, at the cost of an
// all-gather). Backward, on x̂ = (x - mean) * invstd with g = dL/dx̂:
// dL/dx = invstd * (g - sum(g)/N - x̂ * sum(g x̂)/N), the two sums over the
// whole batch (the second all-reduce). Host never waits: counts, factors
// and running statistics stay tensors on the device.
inline at::Tensor SyncBatchNormImpl::forward_synced(const at::Tensor& input, const detail::ReplicaSync& sync) {
  const std::int64_t channels = options.num_features();
  const auto input_type = input.scalar_type();
  const auto stats_type = (input_type == at::kHalf || input_type == at::kBFloat16) ? at::kFloat : input_type;
  std::vector<std::int64_t> dims{0};
  for (std::int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  const std::string layer = sync_name();
  const std::uint64_t step = sync.rendezvous->step();

  // One tensor per replica: [sum (C), sum of squares (C), count (1)]. See Note [SyncBatchNorm statistics].
  at::Tensor stats;
  {
    const compat::NoGradGuard no_grad;
    const at::Tensor x = input.to(stats_type);
    const double count = channels > 0 ? static_cast<double>(input.numel() / channels) : 0.0;
    stats = at::cat({x.sum(dims), (x * x).sum(dims), at::full({1}, count, x.options())});
  }
  sync.rendezvous->all_reduce(sync.replica, detail::SyncPhase::kForward, layer, stats, step);

  at::Tensor mean;
  at::Tensor invstd;
  at::Tensor count;
  {
    const compat::NoGradGuard no_grad;
    count = stats.narrow(0, 2 * channels, 1);
    mean = stats.narrow(0, 0, channels) / count;
    const at::Tensor var = (stats.narrow(0, channels, channels) / count - mean * mean).clamp_min(0);
    invstd = (var + options.eps()).rsqrt();
    if (options.track_running_stats() && running_mean.defined()) {
      at::Tensor factor;
      num_batches_tracked.add_(1);
      if (options.momentum().has_value()) {
        factor = at::full({}, *options.momentum(), mean.options());
      } else {
        factor = num_batches_tracked.to(stats_type).reciprocal();
      }
      const at::Tensor unbiased = var * count / (count - 1);
      running_mean.copy_(running_mean * (1 - factor) + mean.to(running_mean.scalar_type()) * factor);
      running_var.copy_(running_var * (1 - factor) + unbiased.to(running_var.scalar_type()) * factor);
    }
  }
  at::Tensor out = detail::SyncBatchNormFunction::apply(input, mean, invstd, count, sync.rendezvous,
                                                        static_cast<std::int64_t>(sync.replica), layer,
                                                        static_cast<std::int64_t>(step));
  if (options.affine()) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(input.dim()), 1);
    shape[1] = channels;
    out = out * weight.view(shape) + bias.view(shape);
  }
  return out;
}

namespace detail {

// A SyncBatchNorm in `bn`'s place: its options, parameters, buffers, device,
// dtype and mode. Null when `module` is not a BatchNorm1d/2d/3d.
template <class BatchNorm>
std::shared_ptr<SyncBatchNormImpl> sync_copy_of(const std::shared_ptr<torch::nn::Module>& module) {
  auto* bn = dynamic_cast<BatchNorm*>(module.get());
  if (bn == nullptr) return nullptr;
  auto sync = std::make_shared<SyncBatchNormImpl>(bn->options);
  const at::Tensor like = bn->running_mean.defined() ? bn->running_mean : bn->weight;
  if (like.defined()) sync->to(like.device(), like.scalar_type());
  const compat::NoGradGuard no_grad;
  if (bn->weight.defined()) {
    sync->weight.copy_(bn->weight);
    sync->weight.set_requires_grad(bn->weight.requires_grad());
    sync->bias.copy_(bn->bias);
    sync->bias.set_requires_grad(bn->bias.requires_grad());
  }
  if (bn->running_mean.defined()) {
    sync->running_mean.copy_(bn->running_mean);
    sync->running_var.copy_(bn->running_var);
    sync->num_batches_tracked.copy_(bn->num_batches_tracked);
  }
  sync->train(bn->is_training());
  return sync;
}

inline std::shared_ptr<SyncBatchNormImpl> sync_copy_of_batch_norm(const std::shared_ptr<torch::nn::Module>& module) {
  if (auto sync = sync_copy_of<torch::nn::BatchNorm1dImpl>(module)) return sync;
  if (auto sync = sync_copy_of<torch::nn::BatchNorm2dImpl>(module)) return sync;
  return sync_copy_of<torch::nn::BatchNorm3dImpl>(module);
}

inline bool is_batch_norm(const torch::nn::Module& module) {
  return dynamic_cast<const torch::nn::BatchNorm1dImpl*>(&module) != nullptr ||
         dynamic_cast<const torch::nn::BatchNorm2dImpl*>(&module) != nullptr ||
         dynamic_cast<const torch::nn::BatchNorm3dImpl*>(&module) != nullptr;
}

// Walks the tree; with `apply`, replaces, else lists in `held` the
// BatchNorms held outside the tree. Returns the BatchNorms found.
inline std::size_t convert_batch_norms(torch::nn::Module& module, const std::string& prefix, bool apply,
                                       std::vector<std::string>& held) {
  auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&module);
  std::size_t found = 0;
  const auto children = module.named_children();
  for (const auto& item : children) {
    const std::shared_ptr<torch::nn::Module>& child = item.value();
    const std::string path = prefix.empty() ? item.key() : prefix + "." + item.key();
    if (!is_batch_norm(*child)) {
      found += convert_batch_norms(*child, path, apply, held);
      continue;
    }
    ++found;
    // Holders: the parent's registry, `children`, and a Sequential's element.
    const long expected = 2 + (sequential != nullptr ? 1 : 0);
    if (!apply) {
      if (child.use_count() > expected) held.push_back(path);
      continue;
    }
    auto sync = sync_copy_of_batch_norm(child);
    sync->set_sync_name(path);
    if (sequential != nullptr) {
      for (auto& element : *sequential) {
        if (element.ptr() == child) element = torch::nn::AnyModule(sync);
      }
    }
    module.replace_module(item.key(), sync);
  }
  return found;
}

}  // namespace detail

inline std::size_t convert_sync_batchnorm(torch::nn::Module& module) {
  std::vector<std::string> held;
  const std::size_t found = detail::convert_batch_norms(module, "", /*apply=*/false, held);
  if (found == 0) {
    warn(fmt::format("convert_sync_batchnorm: {} has no torch::nn::BatchNorm1d/2d/3d below it; nothing was converted",
                     module.name()));
    return 0;
  }
  if (!held.empty()) {
    std::string names;
    for (const auto& name : held) names += (names.empty() ? "'" : ", '") + name + "'";
    throw Error(fmt::format(
        "convert_sync_batchnorm: {} of the {} BatchNorm layers of {} ({}) are also held outside the module tree "
        "(a member that the parent's forward() calls, a ModuleList, or another handle), where C++ cannot replace "
        "them; nothing was converted. Declare those layers as multigpu::SyncBatchNorm (it has BatchNorm's "
        "parameter and buffer names, so checkpoints load both ways), or keep them in a torch::nn::Sequential",
        held.size(), found, module.name(), names));
  }
  return detail::convert_batch_norms(module, "", /*apply=*/true, held);
}

}  // namespace multigpu
