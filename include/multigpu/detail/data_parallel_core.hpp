#pragma once
// The non-template heart of DataParallel (multigpu/data_parallel.hpp): the
// replicas as torch::nn::Module, their workers, streams, communicator,
// gradient reducer and optimizers. DataParallel<M> forwards to it.

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Device.h>
#include <fmt/core.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize.h>

#include "multigpu/backend.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/data_parallel_options.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/detail/autocast.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/gradient_reducer.hpp"
#include "multigpu/detail/streams.hpp"
#include "multigpu/error.hpp"
#include "multigpu/grad_scaler.hpp"
#include "multigpu/step_loss.hpp"
#include "multigpu/worker.hpp"

namespace multigpu {

namespace detail {

/// The non-template heart of DataParallel, over torch::nn::Module replicas.
class DataParallelCore {
 public:
  DataParallelCore(std::vector<std::shared_ptr<torch::nn::Module>> replicas, std::vector<c10::Device> devices,
                   DataParallelOptions options);

  std::size_t size() const { return replicas_.size(); }
  const std::vector<c10::Device>& devices() const { return devices_; }
  const c10::Device& device(std::size_t r) const { return devices_.at(r); }
  torch::nn::Module& replica(std::size_t r) { return *replicas_.at(r); }
  const DataParallelOptions& options() const { return options_; }

  /// Runs `loss_of(r)` on every replica with a non-empty shard (on its
  /// worker), backward on the weighted loss, and the gradient sync.
  StepLoss forward_backward(const std::vector<std::int64_t>& shard_sizes,
                            const std::function<at::Tensor(std::size_t)>& loss_of);
  /// Orders the replicas against the caller's streams while it lives (see
  /// Note [Streams], rule 2); every public operation holds one.
  StreamFence::Scope fenced() { return StreamFence::Scope(fence_); }
  /// Inside a fence: the caller's streams wait for the replicas' work so far
  /// (what the fence's end does), so that the caller can read their results.
  void caller_waits_for_replicas() { fence_.leave(); }
  /// Runs `job(r)` on every replica with `active[r]` (all when empty).
  void run(const std::function<void(std::size_t)>& job, const char* what, const std::vector<bool>& active = {});
  void sync_gradients();
  bool gradients_synchronized() const { return !reducer_ || reducer_->synchronized(); }
  void step();
  void zero_grad();
  /// See DataParallel::clip_grad_norm.
  at::Tensor clip_grad_norm(double max_norm, double norm_type);
  void set_grad_scaler(std::shared_ptr<GradScaler> scaler) { scaler_ = std::move(scaler); }
  GradScaler* grad_scaler() const { return scaler_.get(); }
  void enter_no_sync() { ++no_sync_depth_; }
  void leave_no_sync() { --no_sync_depth_; }
  bool in_no_sync() const { return no_sync_depth_ > 0; }

  void set_optimizers(std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers);
  bool has_optimizer() const { return !optimizers_.empty(); }
  torch::optim::Optimizer& optimizer(std::size_t r = 0);
  std::vector<torch::optim::Optimizer*> optimizers();
  void set_learning_rate(double lr);
  double learning_rate();

  void broadcast_buffers();
  void resync_from_primary();
  void check_parity();
  void train(bool on);

  void save(const std::string& path);
  void load(const std::string& path);
  void save_optimizer(const std::string& path);
  void load_optimizer(const std::string& path);

  const Communicator& communicator() const { return *comm_; }
  /// Timings of the last gradient sync; nullopt with one replica.
  std::optional<SyncStats> last_sync_stats() const;
  const std::vector<BucketInfo>* buckets() const { return reducer_ ? &reducer_->buckets() : nullptr; }
  std::int64_t steps() const { return steps_; }

 private:
  void require_usable(const char* what) const;
  void check_communicator(const char* what) const;
  void follow_primary_options();
  void broadcast_from_primary();
  void zero_after_failure() noexcept;
  StepLoss combine_losses(const std::vector<at::Tensor>& losses, const std::vector<double>& weights);
  void unscale_gradients();
  bool gradients_overflowed();
  std::vector<at::Tensor> same_tensor_on_every_replica(std::size_t index, bool buffer) const;

  std::vector<std::shared_ptr<torch::nn::Module>> replicas_;
  std::vector<c10::Device> devices_;
  DataParallelOptions options_;
  ReplicaWorkers workers_;
  std::vector<ReplicaContext> contexts_;  // workers_' contexts, in replica order
  StreamFence fence_;
  std::unique_ptr<Communicator> comm_;
  std::vector<std::string> parameter_names_;
  std::vector<std::vector<at::Tensor>> parameters_;  // [replica][i], every parameter
  std::vector<std::string> buffer_names_;
  std::vector<std::vector<at::Tensor>> buffers_;     // [replica][i]
  std::unique_ptr<GradientReducer> reducer_;         // null with one replica
  std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers_;
  int no_sync_depth_ = 0;
  std::int64_t steps_ = 0;
  std::shared_ptr<GradScaler> scaler_;
  bool unscaled_ = false;               // this step's gradients were unscaled (by clip_grad_norm or step)
  std::vector<at::Tensor> found_inf_;   // [replica], one float each; see Note [Gradient scaling across replicas]
  std::string diverged_;  // why the replicas may differ ("" when they cannot)
};

/// The module class behind M: M itself, or the Impl of a module holder
/// (torch::nn::Linear -> torch::nn::LinearImpl, TORCH_MODULE(Net) -> NetImpl).
template <class M, class = void>
struct module_class {
  using type = M;
};
template <class M>
struct module_class<M, std::void_t<typename M::ContainedType>> {
  using type = typename M::ContainedType;
};

/// Keeps LibTorch's CPU random stream where it was: building replicas runs
/// module constructors and reset(), which draw random initial values that
/// are then overwritten. Without this, wrapping a model would change the
/// random numbers (dropout masks, shuffles) of the rest of the program.
class PreserveCpuRandomState {
 public:
  PreserveCpuRandomState() : state_(at::detail::getDefaultCPUGenerator().get_state()) {}
  ~PreserveCpuRandomState() {
    auto generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(state_);
  }
  PreserveCpuRandomState(const PreserveCpuRandomState&) = delete;
  PreserveCpuRandomState& operator=(const PreserveCpuRandomState&) = delete;

 private:
  at::Tensor state_;
};

/// Copies `source`'s parameters and buffers into `target` (same structure).
void copy_module_state(const torch::nn::Module& source, torch::nn::Module& target, const char* origin);

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

inline void copy_module_state(const torch::nn::Module& source, torch::nn::Module& target, const char* origin) {
  const compat::NoGradGuard no_grad;
  auto copy = [&](const auto& from, const auto& to, const char* kind) {
    if (from.size() != to.size()) {
      throw Error(fmt::format("DataParallel: {} has {} {}s, your module has {}", origin, to.size(), kind,
                              from.size()));
    }
    for (const auto& item : from) {
      const at::Tensor* destination = to.find(item.key());
      if (destination == nullptr) {
        throw Error(fmt::format("DataParallel: {} has no {} named {}", origin, kind, item.key()));
      }
      if (destination->sizes() != item.value().sizes()) {
        throw Error(fmt::format("DataParallel: {} {} has shape {}, yours {}", kind, item.key(),
                                shape_text(destination->sizes()), shape_text(item.value().sizes())));
      }
      at::Tensor target_tensor = *destination;
      target_tensor.copy_(item.value());
    }
  };
  copy(source.named_parameters(), target.named_parameters(), "parameter");
  copy(source.named_buffers(), target.named_buffers(), "buffer");
}

inline DataParallelCore::DataParallelCore(std::vector<std::shared_ptr<torch::nn::Module>> replicas,
                                          std::vector<c10::Device> devices, DataParallelOptions options)
    : replicas_(std::move(replicas)),
      devices_(std::move(devices)),
      options_(std::move(options)),
      workers_(devices_),
      contexts_(workers_.contexts()),
      fence_(contexts_),
      scaler_(options_.grad_scaler) {
  if (options_.bucket_cap_mib <= 0) {
    throw Error(fmt::format("DataParallelOptions::bucket_cap_mib must be positive, got {}", options_.bucket_cap_mib));
  }
  if (options_.collective_timeout.count() <= 0) throw Error("DataParallelOptions::collective_timeout must be positive");
  check_precision_supported(options_.precision, devices_);
  // The replicas were made on the caller's streams (clone, to): the
  // replicas' streams start after that, and the caller's own go on after
  // what is done here.
  const auto fence = fenced();
  comm_ = options_.make_communicator
              ? options_.make_communicator(contexts_)
              : multigpu::make_communicator(contexts_, options_.backend, options_.collective_timeout);
  if (!comm_ || comm_->size() != size()) {
    throw Error(fmt::format("DataParallelOptions::make_communicator must return a communicator for the {} replicas",
                            size()));
  }
  if (options_.comm_threads > 1 && comm_->needs_one_order()) {
    throw Error(fmt::format("DataParallelOptions::comm_threads is {}, but the {} backend must receive every "
                            "collective in one order, so one thread launches them: use 0 (the default) or 1",
                            options_.comm_threads, comm_->name()));
  }

  parameters_.resize(size());
  buffers_.resize(size());
  std::vector<std::vector<at::Tensor>> trainable(size());
  for (std::size_t r = 0; r < size(); ++r) {
    for (const auto& item : replicas_[r]->named_parameters()) {
      if (r == 0) parameter_names_.push_back(item.key());
      parameters_[r].push_back(item.value());
    }
    for (const auto& item : replicas_[r]->named_buffers()) {
      if (r == 0) buffer_names_.push_back(item.key());
      buffers_[r].push_back(item.value());
    }
    if (parameters_[r].size() != parameter_names_.size() || buffers_[r].size() != buffer_names_.size()) {
      throw Error(fmt::format("DataParallel: replica {} has {} parameters and {} buffers, replica 0 {} and {}", r,
                              parameters_[r].size(), buffers_[r].size(), parameter_names_.size(),
                              buffer_names_.size()));
    }
  }
  // A parameter frozen in your module stays frozen on every replica: clones
  // and factory-built replicas come with every parameter trainable.
  for (std::size_t r = 1; r < size(); ++r) {
    for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
      const bool trainable_here = parameters_[0][i].requires_grad();
      if (parameters_[r][i].requires_grad() != trainable_here) parameters_[r][i].set_requires_grad(trainable_here);
    }
  }
  if (comm_->world_size() > 1) {
    broadcast_from_primary();
    std::vector<std::string> trainable_names;
    for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
      if (!parameters_[0][i].requires_grad()) continue;
      trainable_names.push_back(parameter_names_[i]);
      for (std::size_t r = 0; r < size(); ++r) trainable[r].push_back(parameters_[r][i]);
    }
    ReducerOptions reducer;
    reducer.bucket_cap_bytes = static_cast<std::int64_t>(options_.bucket_cap_mib * (1 << 20));
    reducer.overlap = options_.overlap_sync_with_backward;
    reducer.find_unused_parameters = options_.find_unused_parameters;
    reducer.timeout = options_.collective_timeout;
    reducer.hook = options_.comm_hook;
    reducer.threads = options_.comm_threads > 0 ? options_.comm_threads
                                                : (comm_->needs_one_order() ? 1 : std::min<std::size_t>(2, size()));
    reducer_ = std::make_unique<GradientReducer>(std::move(trainable), std::move(trainable_names), contexts_, *comm_,
                                                 reducer);
  }
}

// A collective that failed after the call that launched it returned (the
// NCCL watchdog aborted it) may have left partly reduced gradients behind,
// which a step may already have applied: nothing trained here can be
// trusted any more, the primary's parameters included.
inline void DataParallelCore::check_communicator(const char* what) const {
  std::string failed = comm_->failure();
  if (failed.empty() && reducer_) failed = reducer_->broken();
  if (failed.empty()) return;
  throw CommError(fmt::format("{}: the gradient sync is unusable after an earlier failure ({}); the last step "
                              "may have applied partly reduced gradients, so the parameters cannot be trusted: build "
                              "a new DataParallel and load the last checkpoint",
                              what, failed));
}

inline void DataParallelCore::require_usable(const char* what) const {
  check_communicator(what);
  if (!diverged_.empty()) {
    throw Error(fmt::format("{}: {}. Call resync_from_primary() to copy the primary replica to the others, or "
                            "build a new DataParallel",
                            what, diverged_));
  }
}

inline void DataParallelCore::run(const std::function<void(std::size_t)>& job, const char* what,
                                  const std::vector<bool>& active) {
  workers_.run(job, what, active);
}

/// Note [Loss weights]
/// ~~~~~~~~~~~~~~~~~~~
/// Replica r's loss is the mean over its n_r samples; the whole batch's mean
/// loss is sum_r (n_r / N) loss_r, so its gradient is sum_r (n_r / N) g_r.
/// The reducer averages gradients over the K replicas, so each replica
/// back-propagates K n_r / N times its loss: the average is then exactly the
/// full-batch gradient, whatever the split, and a replica without samples
/// adds nothing. Averaging (not summing) keeps a second sync of gradients
/// that already agree harmless. With LossReduction::kSum the weight is the
/// number of replicas the average divides by: W = K x P over P processes,
/// so that the result is the sum of every replica's gradient.
///
/// Over several processes with kMean, each process weighs its own replicas
/// by its own batch: the result is the mean of the processes' mean losses,
/// which is the mean over all samples only when every process has the same
/// batch size (DistributedSampler makes them so; a last, shorter batch on
/// some ranks does not).
inline StepLoss DataParallelCore::forward_backward(const std::vector<std::int64_t>& shard_sizes,
                                                   const std::function<at::Tensor(std::size_t)>& loss_of) {
  require_usable("forward_backward");
  if (unscaled_) {
    throw Error("forward_backward after clip_grad_norm and before step(): the gradients are unscaled already, so "
                "new, scaled gradients cannot be added to them; accumulate first, then clip, then step");
  }
  const auto fence = fenced();
  const std::size_t n = size();
  if (shard_sizes.size() != n) {
    throw Error(fmt::format("forward_backward: {} shard sizes for {} replicas", shard_sizes.size(), n));
  }
  std::int64_t total = 0;
  for (auto s : shard_sizes) total += s;
  if (total <= 0) throw Error("forward_backward: the batch has no samples");
  std::vector<bool> active(n);
  std::vector<double> weights(n);
  const double loss_scale = scaler_ ? scaler_->scale() : 1.0;
  for (std::size_t r = 0; r < n; ++r) {
    active[r] = shard_sizes[r] > 0;
    weights[r] = options_.loss_reduction == LossReduction::kMean
                     ? static_cast<double>(n) * static_cast<double>(shard_sizes[r]) / static_cast<double>(total)
                     : static_cast<double>(comm_->world_size());
    weights[r] *= loss_scale;
  }
  std::vector<at::Tensor> losses(n);
  std::vector<const char*> stages(n, nullptr);
  if (reducer_) reducer_->prepare_backward(active, !in_no_sync());
  try {
    workers_.run(
        [&](std::size_t r) {
          stages[r] = "the loss function (forward)";
          at::Tensor loss;
          {
            const AutocastScope autocast(options_.precision, devices_[r].type());  // See Note [Autocast on every replica]
            loss = loss_of(r);
          }
          stages[r] = "checking the loss";
          if (!loss.defined()) throw Error("the loss function returned an undefined tensor");
          if (loss.numel() != 1) {
            throw Error(fmt::format("the loss function returned a tensor of shape {}; it must return one value "
                                    "(reduce with mean or sum)",
                                    shape_text(loss.sizes())));
          }
          if (!loss.requires_grad()) {
            throw Error("the loss does not require grad: no parameter took part in computing it (was the forward "
                        "run under NoGradGuard, or are all parameters frozen?)");
          }
          stages[r] = "backward";
          (weights[r] == 1.0 ? loss : loss * weights[r]).backward();
          losses[r] = loss.detach().reshape({});
          if (options_.check_finite_loss) {
            stages[r] = "the finite-loss check";
            const double value = losses[r].item<double>();  // the one host wait this option costs
            if (!std::isfinite(value)) {
              throw Error(fmt::format("the loss is {} (DataParallelOptions::check_finite_loss)", value));
            }
          }
        },
        "a training step", active, &stages);
    if (reducer_) reducer_->finish_backward();
  } catch (...) {
    zero_after_failure();
    throw;
  }
  std::vector<double> loss_weights(n, 1.0);
  if (options_.loss_reduction == LossReduction::kMean) {
    for (std::size_t r = 0; r < n; ++r) {
      loss_weights[r] = static_cast<double>(shard_sizes[r]) / static_cast<double>(total);
    }
  }
  return combine_losses(losses, loss_weights);
}

// The step's loss is computed on the device, on the replicas' streams, so
// that nothing waits for the GPU (Note [Streams], rule 5); the caller's
// stream reads it after the fence's exit.
inline StepLoss DataParallelCore::combine_losses(const std::vector<at::Tensor>& losses,
                                                 const std::vector<double>& weights) {
  const compat::NoGradGuard no_grad;
  const auto caller = current_stream(devices_[0]);
  const ReplicaStreamsCurrent on_replicas(contexts_);
  at::Tensor sum;
  for (std::size_t r = 0; r < losses.size(); ++r) {
    if (!losses[r].defined()) continue;
    mark_used_on_current_stream(losses[r]);  // read on its GPU's current stream, maybe another replica's
    at::Tensor part = losses[r].to(devices_[0], at::kDouble);
    if (weights[r] != 1.0) part = part * weights[r];
    sum = sum.defined() ? sum + part : part;
  }
  std::shared_ptr<c10::Event> ready;
  if (caller) {
    mark_used_on(sum, *caller);
    ready = std::make_shared<c10::Event>(devices_[0].type());
    ready->record(*current_stream(devices_[0]));
  }
  return StepLoss(sum, std::move(ready));
}

inline void DataParallelCore::zero_after_failure() noexcept {
  try {
    if (reducer_) reducer_->abandon_step();
    if (reducer_ && !reducer_->broken().empty()) return;  // its buffers may still be written: leave them
    zero_grad();
  } catch (const std::exception& e) {
    warn(fmt::format("could not zero the gradients after a failed step: {}", e.what()));
  }
}

inline void DataParallelCore::sync_gradients() {
  require_usable("sync_gradients");
  const auto fence = fenced();
  if (reducer_) reducer_->synchronize();
}

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
inline void DataParallelCore::step() {
  require_usable("step");
  if (in_no_sync()) {
    throw Error("step() inside no_sync() would step replicas on different gradients; step after the guard is gone");
  }
  if (optimizers_.empty()) throw Error("step: no optimizer yet; call make_optimizer<Opt>(options) first");
  const auto fence = fenced();
  if (reducer_ && !reducer_->synchronized()) reducer_->synchronize();
  follow_primary_options();
  bool skip = false;
  if (scaler_) {
    unscale_gradients();
    skip = gradients_overflowed();
    scaler_->update(skip);
    unscaled_ = false;
  }
  if (!skip) {
    try {
      workers_.run([&](std::size_t r) { optimizers_[r]->step(); }, "the optimizer step");
    } catch (const ReplicaError& e) {
      if (size() > 1) diverged_ = fmt::format("an optimizer step failed, so the replicas may differ ({})", e.what());
      throw;
    }
  }
  if (options_.broadcast_buffers && !buffer_names_.empty()) broadcast_buffers();
  if (skip) return;
  ++steps_;
  if (options_.parity_check_every > 0 && steps_ % options_.parity_check_every == 0) check_parity();
}

// See Note [Gradient scaling across replicas].
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
  comm_->all_reduce(found_inf_, ReduceOp::kSum);
  const bool overflowed = found_inf_[0].item<double>() > 0;  // the host wait a GradScaler costs
  found_inf_.clear();
  return overflowed;
}

/// Note [Clipping across replicas]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// Clipping needs the norm of the whole gradient, and every replica must
/// scale its gradients by the same factor. After the sync (made here if
/// needed) every replica holds the same averaged gradients, and across
/// processes each process holds the same averages, so the norm is computed
/// once, from the primary's gradients on its stream; the clip factor
/// min(1, max_norm / (norm + 1e-6)) is copied from the primary's device to
/// every other replica's, device to device (no host wait), and applied
/// there. Computing it on each replica would agree only as far as every
/// device's reduction gives the same bits. With a GradScaler the gradients
/// are unscaled first (once per step: see Note [Gradient scaling across
/// replicas]); an overflowed step has an infinite or NaN norm, and step()
/// skips it anyway.
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
  std::vector<at::Tensor> norms;
  for (const auto& p : parameters_[0]) {
    if (p.grad().defined()) norms.push_back(p.grad().norm(norm_type).to(at::kFloat));
  }
  at::Tensor total = at::zeros({}, at::TensorOptions().device(devices_[0]).dtype(at::kFloat));
  if (!norms.empty()) {
    const at::Tensor stacked = at::stack(norms);
    total = std::isinf(norm_type) ? stacked.max() : stacked.norm(norm_type);
    const at::Tensor factor = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (std::size_t r = 0; r < size(); ++r) {
      const at::Tensor here = r == 0 ? factor : factor.to(devices_[r]);
      for (const auto& p : parameters_[r]) {
        if (p.grad().defined()) p.grad().mul_(here);
      }
    }
  }
  if (caller) mark_used_on(total, *caller);  // read on the caller's stream (Note [Streams], rule 4)
  return total;
}

// Note [The primary's optimizer options rule]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Every replica has its own optimizer, but the user sees one: dp.optimizer()
// is the primary's, and a learning-rate schedule or any other option change
// is made there (a LibTorch scheduler holds the primary's optimizer). Before
// each step the other optimizers take the primary's options, group by group,
// so that the replicas cannot drift apart; a change made to another replica's
// optimizer alone is overwritten. Copying a few scalars per group per step
// costs nothing next to the step.
inline void DataParallelCore::follow_primary_options() {
  auto& primary = optimizers_[0]->param_groups();
  for (std::size_t r = 1; r < optimizers_.size(); ++r) {
    auto& groups = optimizers_[r]->param_groups();
    if (groups.size() != primary.size()) {
      throw Error(fmt::format("step: the primary optimizer has {} parameter groups, replica {}'s has {}: add "
                              "parameter groups to every optimizer in dp.optimizers(), not only to dp.optimizer()",
                              primary.size(), r, groups.size()));
    }
    for (std::size_t g = 0; g < groups.size(); ++g) {
      if (primary[g].has_options()) groups[g].set_options(primary[g].options().clone());
    }
  }
}

inline void DataParallelCore::zero_grad() {
  const auto fence = fenced();
  unscaled_ = false;
  if (reducer_) {
    workers_.run([&](std::size_t r) { reducer_->zero(r); }, "zeroing gradients");
    reducer_->mark_zeroed();
    return;
  }
  const compat::NoGradGuard no_grad;
  const ReplicaContext::Scope on_replica(contexts_[0]);
  for (auto& p : parameters_[0]) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

inline void DataParallelCore::set_optimizers(std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers) {
  if (optimizers.size() != size()) {
    throw Error(fmt::format("DataParallel: {} optimizers for {} replicas", optimizers.size(), size()));
  }
  optimizers_ = std::move(optimizers);
}

inline torch::optim::Optimizer& DataParallelCore::optimizer(std::size_t r) {
  if (optimizers_.empty()) throw Error("DataParallel has no optimizer yet; call make_optimizer<Opt>(options) first");
  return *optimizers_.at(r);
}

inline std::vector<torch::optim::Optimizer*> DataParallelCore::optimizers() {
  std::vector<torch::optim::Optimizer*> out;
  for (auto& optimizer : optimizers_) out.push_back(optimizer.get());
  return out;
}

inline void DataParallelCore::set_learning_rate(double lr) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw Error(fmt::format("set_learning_rate: {} is not a learning rate", lr));
  if (optimizers_.empty()) throw Error("set_learning_rate: no optimizer yet; call make_optimizer<Opt>(options) first");
  for (auto& optimizer : optimizers_) {
    for (auto& group : optimizer->param_groups()) group.options().set_lr(lr);
  }
}

inline double DataParallelCore::learning_rate() { return optimizer(0).param_groups().at(0).options().get_lr(); }

inline std::vector<at::Tensor> DataParallelCore::same_tensor_on_every_replica(std::size_t index, bool buffer) const {
  std::vector<at::Tensor> tensors;
  for (std::size_t r = 0; r < size(); ++r) tensors.push_back(buffer ? buffers_[r][index] : parameters_[r][index]);
  return tensors;
}

inline void DataParallelCore::broadcast_from_primary() {
  if (comm_->world_size() == 1) return;
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);
  for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
    comm_->broadcast(same_tensor_on_every_replica(i, false), 0);
  }
  broadcast_buffers();
}

/// Note [Coalesced buffer broadcast]
/// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
/// Buffers (BatchNorm's running statistics and counters) go from the
/// primary to every replica after each step. One collective per buffer
/// would cost a launch (and, across processes, a round trip) per BatchNorm
/// tensor: a ResNet-50 has 160. Instead the buffers of one dtype are packed
/// into one flat tensor per replica, broadcast once, and unpacked on the
/// other replicas: one collective per dtype (two for BatchNorm: float
/// statistics, int64 counters). Parameters, broadcast only at construction
/// and by resync_from_primary(), go one by one, so that a large model never
/// needs a second copy of itself.
inline void DataParallelCore::broadcast_buffers() {
  if (comm_->world_size() == 1) return;
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  // Packed, broadcast and unpacked on the replicas' streams, between the
  // kernels that use the buffers: no wait for the host (Note [Streams], rule 3).
  const ReplicaStreamsCurrent on_replicas(contexts_);
  std::map<at::ScalarType, std::vector<std::size_t>> by_type;  // dtype -> buffer indices, in module order
  for (std::size_t i = 0; i < buffer_names_.size(); ++i) {
    if (buffers_[0][i].defined()) by_type[buffers_[0][i].scalar_type()].push_back(i);
  }
  std::vector<std::vector<at::Tensor>> packed;  // [dtype group][replica]
  for (const auto& group : by_type) {
    std::vector<at::Tensor> flat(size());
    for (std::size_t r = 0; r < size(); ++r) {
      std::vector<at::Tensor> parts;
      for (std::size_t i : group.second) parts.push_back(buffers_[r][i].reshape({-1}));
      flat[r] = parts.size() == 1 ? parts[0].clone() : at::cat(parts);
    }
    comm_->broadcast(flat, 0);
    packed.push_back(std::move(flat));
  }
  // Replica 0 too: in another process than global rank 0 it receives as well
  // (on the root itself it gets back its own values).
  std::size_t g = 0;
  for (const auto& group : by_type) {
    for (std::size_t r = 0; r < size(); ++r) {
      std::int64_t offset = 0;
      for (std::size_t i : group.second) {
        at::Tensor& buffer = buffers_[r][i];
        buffer.copy_(packed[g][r].narrow(0, offset, buffer.numel()).view(buffer.sizes()));
        offset += buffer.numel();
      }
    }
    ++g;
  }
}

inline void DataParallelCore::resync_from_primary() {
  const auto fence = fenced();
  broadcast_from_primary();
  if (size() > 1) {
    if (!optimizers_.empty()) {
      std::ostringstream state;
      torch::serialize::OutputArchive archive;
      optimizers_[0]->save(archive);
      archive.save_to(state);
      for (std::size_t r = 1; r < size(); ++r) {
        std::istringstream input(state.str());
        torch::serialize::InputArchive in;
        in.load_from(input, devices_[r]);
        optimizers_[r]->load(in);
      }
    }
  }
  diverged_.clear();
}

inline void DataParallelCore::check_parity() {
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);  // compared after the replicas' work
  auto compare = [&](const std::vector<std::string>& names, const std::vector<std::vector<at::Tensor>>& tensors,
                     const char* kind) {
    for (std::size_t r = 1; r < size(); ++r) {
      for (std::size_t i = 0; i < names.size(); ++i) {
        const at::Tensor& primary = tensors[0][i];
        if (!primary.defined()) continue;
        const at::Tensor other = tensors[r][i].to(primary.device());
        if (at::equal(primary, other)) continue;
        std::string difference;
        if (primary.is_floating_point()) {
          difference = fmt::format(" (largest difference {:.3g})", (primary - other).abs().max().item<double>());
        }
        throw ReplicaError(fmt::format("replica {} ({}) has drifted from the primary after {} optimizer steps: {} {} "
                                       "differs{}",
                                       r, devices_[r].str(), steps_, kind, names[i], difference),
                           static_cast<int>(r), devices_[r].str());
      }
    }
  };
  compare(parameter_names_, parameters_, "parameter");
  compare(buffer_names_, buffers_, "buffer");
}

inline void DataParallelCore::train(bool on) {
  for (auto& replica : replicas_) replica->train(on);
}

inline void DataParallelCore::save(const std::string& path) {
  check_communicator("save");
  const auto fence = fenced();
  const ReplicaStreamsCurrent on_replicas(contexts_);  // read after the replicas' work
  replace_file_atomically(path, [&](const std::string& temporary) { torch::save(replicas_[0], temporary); });
}

inline void DataParallelCore::load(const std::string& path) {
  const auto fence = fenced();
  try {
    const ReplicaStreamsCurrent on_replicas(contexts_);
    torch::load(replicas_[0], path, devices_[0]);
  } catch (const c10::Error& e) {
    throw Error(fmt::format("cannot load the checkpoint {} into the module: {}", path, e.what_without_backtrace()));
  }
  broadcast_from_primary();
}

inline void DataParallelCore::save_optimizer(const std::string& path) {
  auto& primary = optimizer(0);
  const auto fence = fenced();
  const ReplicaStreamsCurrent on_replicas(contexts_);
  replace_file_atomically(path, [&](const std::string& temporary) { torch::save(primary, temporary); });
}

inline void DataParallelCore::load_optimizer(const std::string& path) {
  optimizer(0);  // throws when there is none
  const auto fence = fenced();
  const ReplicaStreamsCurrent on_replicas(contexts_);
  for (std::size_t r = 0; r < size(); ++r) {
    try {
      torch::load(*optimizers_[r], path, devices_[r]);
    } catch (const c10::Error& e) {
      throw Error(fmt::format("cannot load the optimizer state {} into replica {}'s optimizer: {}", path, r,
                              e.what_without_backtrace()));
    }
  }
}

inline std::optional<SyncStats> DataParallelCore::last_sync_stats() const {
  if (!reducer_) return std::nullopt;
  return reducer_->last_stats();
}

}  // namespace detail
}  // namespace multigpu
