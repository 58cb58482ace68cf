#pragma once
// The non-template heart of DataParallel (multigpu/data_parallel.hpp): the
// replicas as torch::nn::Module, their workers, streams, communicator,
// gradient reducer and optimizers. DataParallel<M> forwards to it.

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
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
#include "multigpu/data_parallel/autocast.hpp"
#include "multigpu/data_parallel/gradient_reducer.hpp"
#include "multigpu/data_parallel/training_progress.hpp"
#include "multigpu/data_parallel_options.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/event_pool.hpp"
#include "multigpu/detail/module_state.hpp"
#include "multigpu/detail/tensor_text.hpp"
#include "multigpu/error.hpp"
#include "multigpu/grad_scaler.hpp"
#include "multigpu/step_loss.hpp"
#include "multigpu/streams.hpp"
#include "multigpu/sync_batch_norm/rendezvous.hpp"
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
  /// Fails this forward_backward with Error(message) before any replica
  /// ran; across processes once every process has agreed (see Note [A step
  /// that fails on one process]).
  [[noreturn]] void fail_step(const std::string& message);
  /// fail_step for a failure of the caller's own (splitting the batch):
  /// rethrows it, across processes once every process has agreed.
  [[noreturn]] void fail_step(std::exception_ptr failure);
  /// Orders the replicas against the caller's streams while it lives (see
  /// Note [Streams], rule 2); every public operation holds one.
  StreamFence::Scope fenced() { return StreamFence::Scope(fence_); }
  /// Inside a fence: the caller's streams wait for the replicas' work so far
  /// (what the fence's end does), so that the caller can read their results.
  void caller_waits_for_replicas() { fence_.leave(); }
  /// The host waits for the caller's current streams on every replica's
  /// device (for predict outputs it cannot see into: Note [Predict's
  /// outputs on the caller's streams]).
  void host_waits_for_callers();
  /// Runs `job(r)` on every replica with `active[r]` (all when empty).
  void run(const std::function<void(std::size_t)>& job, const char* what, const std::vector<bool>& active = {});
  void sync_gradients();
  bool gradients_synchronized() const { return !reducer_ || reducer_->synchronized(); }
  /// Steps every optimizer.
  void step() { step_optimizers(nullptr, "step"); }
  /// Steps the optimizer named `name` only.
  void step(const std::string& name) { step_optimizers(&find_optimizers(name, "step(name)"), "step(name)"); }
  void zero_grad();
  /// Zeroes the gradients of the parameters that the optimizer `name` holds, on every replica.
  void zero_grad(const std::string& name);
  /// See DataParallel::clip_grad_norm.
  at::Tensor clip_grad_norm(double max_norm, double norm_type);
  void set_grad_scaler(std::shared_ptr<GradScaler> scaler) { scaler_ = std::move(scaler); }
  GradScaler* grad_scaler() const { return scaler_.get(); }
  void enter_no_sync() { ++no_sync_depth_; }
  void leave_no_sync() { --no_sync_depth_; }
  bool in_no_sync() const { return no_sync_depth_ > 0; }

  /// Makes `optimizers` (one per replica) the optimizer `name` ("": the
  /// one made without a name), replacing the one of that name.
  void set_optimizers(std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers, const std::string& name = "");
  bool has_optimizer() const { return !optimizers_.empty(); }
  /// Replica r's optimizer `name`; Error naming the optimizers there are when there is none.
  torch::optim::Optimizer& optimizer(std::size_t r = 0, const std::string& name = "");
  /// Every replica's optimizer `name`, in replica order.
  std::vector<torch::optim::Optimizer*> optimizers(const std::string& name = "");
  /// The names of the optimizers, in the order they were first made ("": made without a name).
  std::vector<std::string> optimizer_names() const;
  void set_learning_rate(double lr);
  double learning_rate();

  void broadcast_buffers();
  void resync_from_primary();
  void check_parity();
  void train(bool on);

  const Communicator& communicator() const { return *comm_; }
  /// Timings of the last gradient sync; nullopt with one replica.
  std::optional<SyncStats> last_sync_stats() const;
  const std::vector<BucketInfo>* buckets() const { return reducer_ ? &reducer_->buckets() : nullptr; }
  std::int64_t steps() const { return steps_; }

  // --- for checkpoints (data_parallel/checkpoint_io.hpp) ---
  const std::vector<std::string>& parameter_names() const { return parameter_names_; }
  const std::vector<std::string>& buffer_names() const { return buffer_names_; }
  const std::vector<at::Tensor>& parameters(std::size_t r) const { return parameters_.at(r); }
  const std::vector<at::Tensor>& buffers(std::size_t r) const { return buffers_.at(r); }
  const std::vector<ReplicaContext>& contexts() const { return contexts_; }
  Communicator& comm() { return *comm_; }
  TrainingProgress& progress() { return progress_; }
  /// Throws when the replicas cannot be trusted (a failed sync, a failed step).
  void require_usable(const char* what) const;
  /// Throws when the communicator failed (see check_usable's callers).
  void check_communicator(const char* what) const;
  /// Copies `parameters` and `buffers` (in the order of parameter_names()
  /// and buffer_names(), matching shapes and dtypes, on any device) into
  /// every replica; the replicas agree again afterwards.
  void assign_module_state(const std::vector<at::Tensor>& parameters, const std::vector<at::Tensor>& buffers);
  /// The primary's optimizer `name`'s state, serialised.
  std::string optimizer_state(const std::string& name = "");
  /// Loads a serialised optimizer state into every replica's optimizer
  /// `name`: into all of them or, when it does not fit, into none.
  void load_optimizer_state(const std::string& state, const std::string& origin, const std::string& name = "");
  void set_steps(std::int64_t steps) { steps_ = steps; }
  /// After the module and every optimizer were given one state: the
  /// replicas agree again.
  void mark_consistent() { diverged_.clear(); }

 private:
  /// One optimizer, made on every replica (see Note [Several optimizers]).
  struct ReplicatedOptimizer {
    std::string name;  // "": made without a name
    std::vector<std::unique_ptr<torch::optim::Optimizer>> replicas;
  };
  ReplicatedOptimizer& find_optimizers(const std::string& name, const char* what);
  /// Steps `only`, or every optimizer when it is null.
  void step_optimizers(ReplicatedOptimizer* only, const char* what);
  void follow_primary_options(const ReplicatedOptimizer& optimizer);
  void broadcast_from_primary();
  /// Throws, on every process alike, when the processes' models differ in
  /// their parameters or buffers (names, shapes, dtypes, trainable).
  /// Collective. See Note [Checking the model across processes].
  void check_same_model_across_processes();
  void zero_after_failure() noexcept;
  bool agrees_across_processes() const { return options_.agree_on_step && reducer_ && !in_no_sync(); }
  /// The gradient sync spans several processes.
  bool spans_processes() const { return comm_->world_size() > size(); }
  void mark_micro_step();
  void finish_step_across_processes(std::exception_ptr failure);
  void load_optimizer_into(torch::optim::Optimizer& optimizer, std::size_t r, const std::string& state);
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
  std::vector<ReplicatedOptimizer> optimizers_;  // in the order first made
  int no_sync_depth_ = 0;
  std::int64_t steps_ = 0;
  TrainingProgress progress_;
  std::shared_ptr<GradScaler> scaler_;
  bool unscaled_ = false;               // this step's gradients were unscaled (by clip_grad_norm or step)
  std::vector<at::Tensor> found_inf_;   // [replica], one float each; see Note [Gradient scaling across replicas]
  std::string diverged_;  // why the replicas may differ ("" when they cannot)
  OwnedRendezvous rendezvous_;  // last: detached before comm_ goes; see Note [SyncBatchNorm across replicas]
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

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

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
  // See Note [SyncBatchNorm across replicas].
  rendezvous_ = OwnedRendezvous(c10::make_intrusive<ReplicaRendezvous>(*comm_, contexts_, options_.collective_timeout));
  bool synced_layers = false;
  for (auto& replica : replicas_) {
    for (const auto& item : replica->named_modules()) {
      if (auto* layer = dynamic_cast<ReplicaSyncedLayer*>(item.value().get())) {
        layer->set_sync_name(item.key().empty() ? "(the root module)" : item.key());
        synced_layers = true;
      }
    }
  }
  if (comm_->world_size() > 1) {
    if (options_.exchange_text) check_same_model_across_processes();
    broadcast_from_primary();
    std::vector<std::string> trainable_names;
    for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
      if (!parameters_[0][i].requires_grad()) continue;
      trainable_names.push_back(parameter_names_[i]);
      for (std::size_t r = 0; r < size(); ++r) trainable[r].push_back(parameters_[r][i]);
    }
    ReducerOptions reducer;
    reducer.bucket_cap_bytes = static_cast<std::int64_t>(options_.bucket_cap_mib * (1 << 20));
    reducer.overlap = options_.overlap_sync_with_backward && !(synced_layers && comm_->needs_one_order());
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

// Note [Predict's outputs on the caller's streams]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// predict's outputs are made on the replicas' streams, and the caller's
// streams read them: the gather (a cat, a copy between GPUs) and, where
// a part is returned as it is (an element of a std::vector output on the
// first device), the caller's own kernels. The fence orders those reads
// after the replicas' work (Note [Streams], rule 2), and every tensor of
// every part is marked as used on the caller's current stream of its
// device (rule 4), so that the caching allocator does not give its memory
// to the replica's stream again before the caller's reads are done. The
// parts are any mix of tensors, std::vector, std::tuple, std::pair and
// torch::data::Example, nested; detail::visit_tensors (scatter.hpp) finds
// their tensors, and a batch type of yours lists its own through its
// BatchTraits' for_each_tensor. A type it cannot see into cannot be marked:
// then the host waits for the caller's streams after the gather instead
// (correct, and a host wait per call: give the type for_each_tensor). On
// CPUs there is nothing to mark and nothing to wait for.
inline void DataParallelCore::host_waits_for_callers() {
  for (const auto& device : devices_) {
    if (const auto stream = current_stream(device)) stream->synchronize();
  }
}

inline void DataParallelCore::run(const std::function<void(std::size_t)>& job, const char* what,
                                  const std::vector<bool>& active) {
  workers_.run(job, what, active);
}

// Note [Loss weights]
// ~~~~~~~~~~~~~~~~~~~
// Replica r's loss is the mean over its n_r samples; the whole batch's mean
// loss is sum_r (n_r / N) loss_r, so its gradient is sum_r (n_r / N) g_r.
// The reducer averages gradients over the K replicas, so each replica
// back-propagates K n_r / N times its loss: the average is then exactly the
// full-batch gradient, whatever the split, and a replica without samples
// adds nothing. Averaging (not summing) keeps a second sync of gradients
// that already agree harmless. With LossReduction::kSum the weight is the
// number of replicas the average divides by: W = K x P over P processes,
// so that the result is the sum of every replica's gradient.
//
// Over several processes with kMean, each process weighs its own replicas
// by its own batch: the result is the mean of the processes' mean losses,
// which is the mean over all samples only when every process has the same
// batch size (DistributedSampler makes them so; a last, shorter batch on
// some ranks does not).
inline StepLoss DataParallelCore::forward_backward(const std::vector<std::int64_t>& shard_sizes,
                                                   const std::function<at::Tensor(std::size_t)>& loss_of) {
  require_usable("forward_backward");
  mark_micro_step();
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
  if (total <= 0) fail_step("forward_backward: the batch has no samples");
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
  progress_.on_batch(total);  // read from the data, whether it trains or fails
  std::exception_ptr failure;
  rendezvous_->begin_step(active);
  try {
    workers_.run(
        [&](std::size_t r) {
          const ReplicaSyncScope sync(rendezvous_.get(), r);  // See Note [SyncBatchNorm across replicas]
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
  } catch (...) {
    failure = std::current_exception();
  }
  if (agrees_across_processes()) {
    finish_step_across_processes(failure);
  } else {
    try {
      if (failure) std::rethrow_exception(failure);
      if (reducer_) reducer_->finish_backward();
    } catch (...) {
      zero_after_failure();
      throw;
    }
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
  at::Tensor host;
  if (caller) {
    mark_used_on(sum, *caller);
    // See Note [Reading a step's loss] (step_loss.hpp) and Note [Event pool].
    host = at::empty(sum.sizes(), at::TensorOptions().dtype(sum.scalar_type()).pinned_memory(true));
    host.copy_(sum, /*non_blocking=*/true);
    const c10::Stream stream = *current_stream(devices_[0]);
    ready = pooled_event(stream.device());
    ready->record(stream);
  }
  return StepLoss(sum, std::move(ready), std::move(host));
}

// Note [A step that fails on one process]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A step can fail on one process only: its loss function throws, its loss
// is NaN under check_finite_loss, its batch is empty or cannot be split
// (DataParallel::forward_backward hands that to fail_step), a
// data-dependent branch leaves a parameter without a gradient. Collectives
// across processes pair by order, so a process that gave up on the step and
// skipped the step's remaining collectives (gradient buckets, the
// GradScaler's flag, the buffer broadcast) would pair the next step's with
// them: gradients of two steps averaged, a broadcast against an all-reduce
// of another size, or a hang. PyTorch's DDP leaves this to the user.
//
// Here every process issues the same collectives in every synchronising
// forward_backward, failed or not, and then agrees on the outcome:
//  1. a process whose part failed (a replica threw, or the reducer found a
//     parameter without a gradient) still reduces every gradient bucket
//     that its hooks did not launch, in bucket order (finish_failed_backward,
//     and finish_backward before its Error). The others launched theirs
//     during backward; an agreement before the first bucket would have to
//     stop backward on every process and give up that overlap. An empty
//     batch runs no replica and reduces every bucket (fail_step);
//  2. then one agreement: every process says whether it failed
//     (DataParallelOptions::agree_on_step: a Gloo all-reduce of one number
//     on the host, which never waits for a GPU; the reasons go through the
//     store only when one failed);
//  3. if any process failed, every process zeroes its gradients (the
//     reduced buckets hold the failed step's mix) and throws: the failing
//     one its own error, the others an Error naming each failing rank and
//     its reason. No optimizer stepped, and nothing else of the step was
//     issued (train_step's step() and its buffer broadcast come after), so
//     the next step trains exactly as if the failed batch had never been
//     there: parameters and optimizer state, that is; buffers that the
//     failed forward updated (BatchNorm's running statistics) and random
//     numbers it drew stay as they are. If the failed step was the one to
//     record the order of the gradient buckets, the next synchronising step
//     records it instead, on every process (forget_order_recording); which
//     step records depends only on facts equal on every process.
// A failure inside step() (an optimizer that throws, unscaling) is not
// agreed on: that process skips step()'s remaining collectives and marks
// itself diverged, so that its next call says so; the others fail at their
// next collective's time-out. Inside no_sync() see Note [A failed
// micro-step across processes].
// The cost is one small collective per synchronising step (a round trip),
// and only with several processes: one process (and each no_sync()
// micro-step, which issues no collective) keeps the path it had, with no
// agreement. The flag does not ride in the last gradient bucket: a healthy
// process sends that bucket during backward, and a failure can be found
// after a process sent it (a NaN loss checked after backward, a second
// backward, a throw after the last hook), which a flag sent earlier cannot
// tell; on GPUs reading it would also make the host wait for the bucket. A
// collective that fails or times out (a CommError from the reducer) is not
// agreed on: it breaks the process group (or the reducer), and every later
// call on any process says so, naming the silent ranks.
inline void DataParallelCore::finish_step_across_processes(std::exception_ptr failure) {
  bool comm_failed = false;  // a collective of this step failed: not agreed on (it breaks the group)
  try {
    if (failure) {
      reducer_->finish_failed_backward();
    } else {
      reducer_->finish_backward();
    }
  } catch (const CommError&) {
    comm_failed = true;
    if (!failure) failure = std::current_exception();
  } catch (...) {
    if (!failure) failure = std::current_exception();
  }
  const auto discard = [&] {
    reducer_->forget_order_recording();
    zero_after_failure();
  };
  if (failure && (comm_failed || !reducer_->broken().empty() || !comm_->failure().empty())) {
    discard();
    std::rethrow_exception(failure);
  }
  std::vector<std::string> failures;
  try {
    const CollectivePurpose purpose("step agreement");
    failures = options_.agree_on_step(failure ? describe_exception(failure) : "");
  } catch (...) {
    discard();
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  if (failure) {
    discard();
    std::rethrow_exception(failure);
  }
  std::string failed;
  for (std::size_t rank = 0; rank < failures.size(); ++rank) {
    if (failures[rank].empty()) continue;
    failed += fmt::format("{}rank {} failed this step ({})", failed.empty() ? "" : ", ", rank, failures[rank]);
  }
  if (failed.empty()) return;
  discard();
  throw Error(fmt::format("forward_backward: {}; every process discarded this step's gradients and no optimizer "
                          "stepped: go on with the next batch, which trains as if this one had not been there",
                          failed));
}

inline void DataParallelCore::fail_step(const std::string& message) {
  fail_step(std::make_exception_ptr(Error(message)));
}

inline void DataParallelCore::fail_step(std::exception_ptr failure) {
  require_usable("forward_backward");
  mark_micro_step();
  if (agrees_across_processes()) {
    const auto fence = fenced();
    reducer_->prepare_backward(std::vector<bool>(size(), false), /*sync=*/true);
    finish_step_across_processes(failure);
  }
  std::rethrow_exception(failure);
}

// Note [A failed micro-step across processes]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Inside no_sync() a forward_backward issues no collective and nothing is
// agreed: a micro-step that fails on one process throws there only. Whether
// the following step() (or clip_grad_norm, sync_gradients) reduces the
// gradients must still be the same on every process, or one process would
// issue the bucket all-reduces that the others skip. So across processes
// the gradients count as unsynchronised from the moment any
// forward_backward is called (before anything in it can throw), and
// zero_grad does not count them as synchronised again: only a collective
// does (a synchronising backward's buckets, or synchronize()). A step()
// after a zero_grad inside an accumulation window then reduces zeros, which
// costs one sync and changes nothing. The failed micro-step's process
// zeroes its gradients (as one process does), so that process contributes
// nothing to that step: the step averages the other processes' accumulated
// gradients with its zeros. An empty batch inside no_sync() adds nothing and
// zeroes nothing. One process keeps its path exactly.
inline void DataParallelCore::mark_micro_step() {
  if (reducer_ && spans_processes()) reducer_->mark_unsynchronized();
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

// Note [Several optimizers]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// A program may train parts of its module with optimizers of their own (a
// GAN's generator and discriminator, each with its Adam, stepped at its own
// rate). Each is made by make_optimizer(name, factory) on every replica and
// kept by its name; the one made without a name is named "". Every rule of
// the single optimizer holds for each of them on its own: the factory's
// optimizers are checked as one (Note [Optimizers the user builds]), the
// followers take the options of the primary's groups before each step
// (Note [The primary's optimizer options rule]), checkpoints save and load
// each by its name. step(name) syncs the gradients when they are not synced
// yet (all of them: the reducer's buckets do not follow optimizers) and
// steps that optimizer alone; step() steps every optimizer, in the order
// they were made, which train_step does. zero_grad(name) zeroes, on every
// replica, only the gradients of the parameters that optimizer holds, in
// place: zeros agree everywhere, so a sync state stays what it was (one
// replica in one process has no buckets: there it is that optimizer's own
// zero_grad, None on LibTorch 2, as in the plain loop; see also Note
// [Gradients of parameters no backward reached]). Each
// step, named or not, counts as one step (steps(), parity_check_every, the
// buffer broadcast). A GradScaler unscales every gradient and updates once
// per step, so with one it refuses step(name) while there are several
// optimizers (a scaler that follows each optimizer's unscaling, as
// PyTorch's does, is still to come). Nothing forbids two optimizers over
// one parameter: the one-device program allows it too.
inline DataParallelCore::ReplicatedOptimizer& DataParallelCore::find_optimizers(const std::string& name,
                                                                               const char* what) {
  for (auto& optimizer : optimizers_) {
    if (optimizer.name == name) return optimizer;
  }
  if (optimizers_.empty()) {
    throw Error(fmt::format("{}: DataParallel has no optimizer yet; call make_optimizer first", what));
  }
  std::string known;
  for (const auto& optimizer : optimizers_) {
    known += fmt::format("{}{}", known.empty() ? "" : ", ",
                         optimizer.name.empty() ? std::string("the one made without a name")
                                                : fmt::format("\"{}\"", optimizer.name));
  }
  throw Error(fmt::format("{}: {}; the optimizers are: {}", what,
                          name.empty() ? std::string("no optimizer was made without a name")
                                       : fmt::format("no optimizer is named \"{}\"", name),
                          known));
}

inline void DataParallelCore::step_optimizers(ReplicatedOptimizer* only, const char* what) {
  require_usable(what);
  if (in_no_sync()) {
    throw Error(fmt::format("{} inside no_sync() would step replicas on different gradients; step after the guard "
                            "is gone",
                            only == nullptr ? std::string("step()") : fmt::format("step(\"{}\")", only->name)));
  }
  if (optimizers_.empty()) throw Error("step: no optimizer yet; call make_optimizer<Opt>(options) first");
  if (only != nullptr && scaler_ && optimizers_.size() > 1) {
    throw Error(fmt::format("step(\"{}\") with a GradScaler: the scaler unscales every gradient and updates its "
                            "scale once per step, so stepping one optimizer of several is not supported yet; step "
                            "them together with step() (or train_step), or train without a GradScaler",
                            only->name));
  }
  const auto fence = fenced();
  if (reducer_ && !reducer_->synchronized()) reducer_->synchronize();
  // After a zero_grad(name) since the sync: see Note [Gradients of parameters no backward reached].
  if (reducer_) reducer_->release_unreached();
  std::vector<ReplicatedOptimizer*> stepped;
  for (auto& optimizer : optimizers_) {
    if (only == nullptr || only == &optimizer) stepped.push_back(&optimizer);
  }
  for (const auto* optimizer : stepped) follow_primary_options(*optimizer);
  bool skip = false;
  if (scaler_) {
    unscale_gradients();
    skip = gradients_overflowed();
    scaler_->update(skip);
    unscaled_ = false;
  }
  if (!skip) {
    try {
      workers_.run(
          [&](std::size_t r) {
            for (auto* optimizer : stepped) optimizer->replicas[r]->step();
          },
          "the optimizer step");
    } catch (const ReplicaError& e) {
      // Across processes this process alone may have failed (a step() failure is not agreed on).
      if (size() > 1 || spans_processes()) {
        diverged_ = fmt::format("an optimizer step failed, so the replicas may differ ({})", e.what());
      }
      throw;
    }
  }
  if (options_.broadcast_buffers && !buffer_names_.empty()) broadcast_buffers();
  if (skip) return;
  ++steps_;
  progress_.on_step();
  if (options_.parity_check_every > 0 && steps_ % options_.parity_check_every == 0) check_parity();
}

// See Note [Gradient scaling across replicas].
// Note [The primary's optimizer options rule]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Every replica has its own optimizer, but the user sees one: dp.optimizer()
// is the primary's, and a learning-rate schedule or any other option change
// is made there (a LibTorch scheduler holds the primary's optimizer). Before
// each step the other optimizers take the primary's options, group by group,
// so that the replicas cannot drift apart; a change made to another replica's
// optimizer alone is overwritten. Copying a few scalars per group per step
// costs nothing next to the step. With several optimizers the rule holds
// for each (Note [Several optimizers]).
inline void DataParallelCore::follow_primary_options(const ReplicatedOptimizer& optimizer) {
  auto& primary = optimizer.replicas[0]->param_groups();
  const std::string which = optimizer.name.empty() ? "" : fmt::format(" \"{}\"", optimizer.name);
  for (std::size_t r = 1; r < optimizer.replicas.size(); ++r) {
    auto& groups = optimizer.replicas[r]->param_groups();
    if (groups.size() != primary.size()) {
      throw Error(fmt::format("step: the primary optimizer{} has {} parameter groups, replica {}'s has {}: add "
                              "parameter groups to every optimizer in dp.optimizers(), not only to dp.optimizer()",
                              which, primary.size(), r, groups.size()));
    }
    for (std::size_t g = 0; g < groups.size(); ++g) {
      if (primary[g].has_options()) groups[g].set_options(primary[g].options().clone());
    }
  }
}

// Note [Zeroing gradients with one replica]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// With several replicas (or processes) every gradient is a slot of a bucket
// (Note [Gradient buckets]) and is zeroed in place, one kernel per bucket:
// the bucket is the memory the all-reduce works on. One replica in one
// process has no reducer and no bucket, so nothing needs the memory, and
// zero_grad does what the plain loop's optimizer.zero_grad() does on the
// LibTorch in use: from 2.0 on it sets every gradient to none, so that the
// next backward steals its first gradient instead of adding it to zeros
// (no kernel per parameter to zero, none to add, and the memory is free
// between steps); LibTorch 1.13 zeroes in place (detached, as its
// optimizer does). DataParallel(1) then trains, and allocates, exactly as
// the plain loop.
inline void DataParallelCore::zero_grad() {
  const auto fence = fenced();
  progress_.on_zero_grad();
  unscaled_ = false;
  if (reducer_) {
    workers_.run([&](std::size_t r) { reducer_->zero(r); }, "zeroing gradients");
    if (!spans_processes()) reducer_->mark_zeroed();  // See Note [A failed micro-step across processes]
    return;
  }
  const compat::NoGradGuard no_grad;
  const ReplicaContext::Scope on_replica(contexts_[0]);
  for (auto& p : parameters_[0]) {
    if (!p.grad().defined()) continue;
    if (compat::kZeroGradSetsToNone) {
      p.mutable_grad().reset();
    } else {
      p.mutable_grad().detach_();
      p.mutable_grad().zero_();
    }
  }
}

inline void DataParallelCore::zero_grad(const std::string& name) {
  auto& optimizer = find_optimizers(name, "zero_grad(name)");
  const auto fence = fenced();
  workers_.run(
      [&](std::size_t r) {
        if (!reducer_) {
          optimizer.replicas[r]->zero_grad();  // no buckets: as the plain loop (None on LibTorch 2)
          return;
        }
        const compat::NoGradGuard no_grad;
        for (auto& group : optimizer.replicas[r]->param_groups()) {
          for (auto& p : group.params()) {
            if (p.grad().defined()) p.mutable_grad().zero_();  // in place: a bucket's view stays one
            if (reducer_) reducer_->note_zeroed(r, p);
          }
        }
      },
      "zeroing gradients");
}

inline void DataParallelCore::set_optimizers(std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers,
                                             const std::string& name) {
  if (optimizers.size() != size()) {
    throw Error(fmt::format("DataParallel: {} optimizers for {} replicas", optimizers.size(), size()));
  }
  for (auto& optimizer : optimizers_) {
    if (optimizer.name == name) {
      optimizer.replicas = std::move(optimizers);
      return;
    }
  }
  optimizers_.push_back({name, std::move(optimizers)});
}

inline torch::optim::Optimizer& DataParallelCore::optimizer(std::size_t r, const std::string& name) {
  if (optimizers_.empty()) throw Error("DataParallel has no optimizer yet; call make_optimizer<Opt>(options) first");
  return *find_optimizers(name, "optimizer").replicas.at(r);
}

inline std::vector<torch::optim::Optimizer*> DataParallelCore::optimizers(const std::string& name) {
  std::vector<torch::optim::Optimizer*> out;
  if (optimizers_.empty()) return out;
  for (auto& optimizer : find_optimizers(name, "optimizers").replicas) out.push_back(optimizer.get());
  return out;
}

inline std::vector<std::string> DataParallelCore::optimizer_names() const {
  std::vector<std::string> names;
  for (const auto& optimizer : optimizers_) names.push_back(optimizer.name);
  return names;
}

inline void DataParallelCore::set_learning_rate(double lr) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw Error(fmt::format("set_learning_rate: {} is not a learning rate", lr));
  if (optimizers_.empty()) throw Error("set_learning_rate: no optimizer yet; call make_optimizer<Opt>(options) first");
  for (auto& optimizer : optimizers_) {
    for (auto& replica : optimizer.replicas) {
      for (auto& group : replica->param_groups()) group.options().set_lr(lr);
    }
  }
}

// The optimizer made without a name: with named ones only, an Error naming them (ask optimizer(name)).
inline double DataParallelCore::learning_rate() {
  return find_optimizers("", "learning_rate()").replicas[0]->param_groups().at(0).options().get_lr();
}


}  // namespace detail
}  // namespace multigpu

#include "multigpu/data_parallel/core_scaling-inl.hpp"
#include "multigpu/data_parallel/core_state-inl.hpp"
