#pragma once
/// @file
/// DataParallel: one LibTorch module trained on several devices of this
/// process at once.
///
///   auto devices = multigpu::DeviceManager{}.select("auto");
///   multigpu::DataParallel<Net> dp(std::make_shared<Net>(), devices);
///   auto& optimizer = dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01));
///   for (auto& batch : *loader) {
///     double loss = dp.train_step(batch, [](Net& net, const torch::data::Example<>& shard) {
///       return torch::nll_loss(net.forward(shard.data), shard.target);
///     });
///   }
///   dp.module();          // your Net (replica 0, trained in place), with all its members
///   dp.save("net.pt");    // a plain LibTorch checkpoint: torch::load(net, "net.pt") reads it
///
/// How it works. Replica 0 is your module itself, moved to the first device;
/// the other replicas are built directly on their own devices (cloned, or
/// made by your factory and given your module's parameters and buffers).
/// A step splits the batch along dim 0 (remainders spread over the first
/// replicas; a replica without samples sits the step out), runs forward and
/// backward on every replica in parallel (each on its own persistent thread
/// and, on GPUs, its own stream), averages the gradients so that they equal
/// the gradient of the whole batch's mean loss (see Note [Loss weights]),
/// overlapping that with backward, then steps one optimizer per replica in
/// lockstep: the replicas stay identical.
///
/// Threading: one thread drives a DataParallel at a time. The loss function
/// runs concurrently on every replica's thread, each with its own module and
/// shard; it must not touch shared state without a lock.

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
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize.h>

#include "multigpu/backend.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/detail/gradient_reducer.hpp"
#include "multigpu/device.hpp"
#include "multigpu/error.hpp"
#include "multigpu/scatter.hpp"
#include "multigpu/worker.hpp"

namespace multigpu {

/// How the loss function reduces over its shard's samples.
enum class LossReduction {
  kMean,  ///< The loss is a mean over the shard (LibTorch's default): gradients are weighted by shard size.
  kSum,   ///< The loss is a sum over the shard: gradients are summed.
};

/// How a DataParallel trains and synchronises.
struct DataParallelOptions {
  /// Collective backend: "auto" (NCCL for distinct GPUs when compiled in,
  /// else local), "local" or "nccl".
  std::string backend = "auto";
  /// Copy the primary's buffers (BatchNorm running statistics) to every
  /// replica after each optimizer step.
  bool broadcast_buffers = true;
  /// Gradient bucket size (see Note [Gradient buckets]).
  double bucket_cap_mib = 25.0;
  /// All-reduce each bucket as soon as its gradients are ready, while
  /// backward goes on. Off: one synchronisation after backward.
  bool overlap_sync_with_backward = true;
  /// Parameters that get no gradient in a step count as zero. Off: such a
  /// step is an error naming them (with overlap on), never a hang.
  bool find_unused_parameters = false;
  /// Whether the loss function returns a mean or a sum over its shard.
  LossReduction loss_reduction = LossReduction::kMean;
  /// Fail the step, naming the replica, when a loss is NaN or infinite.
  bool check_finite_loss = false;
  /// Check every N optimizer steps that all replicas hold identical
  /// parameters and buffers (0: only when check_parity() is called).
  int parity_check_every = 0;
  /// A collective that takes longer fails with CommError instead of hanging.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
  /// Threads that run the local backend's all-reduces (0: up to 2). More
  /// than 1 is refused for backends that need one order of collectives
  /// (NCCL, Gloo across processes).
  std::size_t comm_threads = 0;
  /// Makes the communicator instead of `backend`, from the replicas'
  /// contexts: where multi-process training plugs in a communicator that
  /// also reaches the other processes. Its broadcast from replica 0 is used
  /// at construction, so every replica everywhere starts from rank 0's state.
  std::function<std::unique_ptr<Communicator>(const std::vector<ReplicaContext>&)> make_communicator;
};

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
  double forward_backward(const std::vector<std::int64_t>& shard_sizes,
                          const std::function<at::Tensor(std::size_t)>& loss_of);
  /// Runs `job(r)` on every replica with `active[r]` (all when empty).
  void run(const std::function<void(std::size_t)>& job, const char* what, const std::vector<bool>& active = {});
  void sync_gradients();
  bool gradients_synchronized() const { return !reducer_ || reducer_->synchronized(); }
  void step();
  void zero_grad();
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
  void follow_primary_options();
  void broadcast_from_primary();
  void zero_after_failure() noexcept;
  std::vector<at::Tensor> same_tensor_on_every_replica(std::size_t index, bool buffer) const;

  std::vector<std::shared_ptr<torch::nn::Module>> replicas_;
  std::vector<c10::Device> devices_;
  DataParallelOptions options_;
  ReplicaWorkers workers_;
  std::unique_ptr<Communicator> comm_;
  std::vector<std::string> parameter_names_;
  std::vector<std::vector<at::Tensor>> parameters_;  // [replica][i], every parameter
  std::vector<std::string> buffer_names_;
  std::vector<std::vector<at::Tensor>> buffers_;     // [replica][i]
  std::unique_ptr<GradientReducer> reducer_;         // null with one replica
  std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers_;
  int no_sync_depth_ = 0;
  std::int64_t steps_ = 0;
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

/// Data-parallel training of one module over several devices (see the file comment).
template <class M>
class DataParallel {
 public:
  /// The module class (for a holder such as torch::nn::Linear, its Impl).
  using Module = typename detail::module_class<M>::type;
  using ModulePtr = std::shared_ptr<Module>;
  /// Builds a fresh, untrained module (on the CPU) for a replica.
  using Factory = std::function<ModulePtr()>;

  static_assert(std::is_base_of<torch::nn::Module, Module>::value,
                "DataParallel<M>: M must be a torch::nn::Module or a module holder (torch::nn::Linear, TORCH_MODULE)");

  /// Replicates `module` over the selected devices. Module classes that are
  /// torch::nn::Cloneable are cloned; others are built with their default
  /// constructor (or use the constructor taking a factory).
  DataParallel(ModulePtr module, const DeviceSelection& devices, DataParallelOptions options = {})
      : DataParallel(std::move(module), devices.torch_devices(), std::move(options)) {}
  DataParallel(ModulePtr module, std::vector<c10::Device> devices, DataParallelOptions options = {})
      : DataParallel(std::move(module), std::move(devices), default_factory(), std::move(options)) {
    static_assert(std::is_base_of<torch::nn::Cloneable<Module>, Module>::value ||
                      std::is_default_constructible<Module>::value,
                  "DataParallel: this module is neither torch::nn::Cloneable nor default-constructible; pass a "
                  "factory that builds a fresh one: DataParallel<Net>(net, devices, [] { return "
                  "std::make_shared<Net>(args...); })");
  }
  /// As above, with `factory` building the replicas of a module that is not Cloneable.
  DataParallel(ModulePtr module, std::vector<c10::Device> devices, Factory factory, DataParallelOptions options = {})
      : module_(std::move(module)),
        replicas_(make_replicas(module_, devices, factory)),
        core_(upcast(replicas_), std::move(devices), std::move(options)) {}
  DataParallel(ModulePtr module, const DeviceSelection& devices, Factory factory, DataParallelOptions options = {})
      : DataParallel(std::move(module), devices.torch_devices(), std::move(factory), std::move(options)) {}
  /// From a module holder (torch::nn::Linear, a TORCH_MODULE type).
  template <class Holder, class = std::enable_if_t<std::is_same<std::decay_t<Holder>, M>::value &&
                                                   !std::is_same<M, Module>::value>>
  DataParallel(const Holder& holder, const DeviceSelection& devices, DataParallelOptions options = {})
      : DataParallel(holder.ptr(), devices, std::move(options)) {}
  template <class Holder, class = std::enable_if_t<std::is_same<std::decay_t<Holder>, M>::value &&
                                                   !std::is_same<M, Module>::value>>
  DataParallel(const Holder& holder, std::vector<c10::Device> devices, DataParallelOptions options = {})
      : DataParallel(holder.ptr(), std::move(devices), std::move(options)) {}

  // --- the module -------------------------------------------------------------

  /// Your module: replica 0, on the first device, trained in place.
  Module& module() { return *module_; }
  const Module& module() const { return *module_; }
  ModulePtr module_ptr() const { return module_; }
  /// Replica r (0 is module()).
  Module& replica(std::size_t r) { return *replicas_.at(r); }
  std::size_t size() const { return core_.size(); }
  const std::vector<c10::Device>& devices() const { return core_.devices(); }
  /// The collective backend in use ("local" or "nccl").
  std::string backend() const { return core_.communicator().name(); }
  /// train() / eval() on every replica.
  void train(bool on = true) { core_.train(on); }
  void eval() { core_.train(false); }

  // --- training -------------------------------------------------------------------

  /// One optimizer step on `batch`: forward_backward, step, zero_grad.
  /// `loss_fn(Module&, const Batch& shard)` returns the shard's scalar loss;
  /// returns the whole batch's loss (the size-weighted mean of the shards'
  /// losses, or their sum with LossReduction::kSum). Throws ReplicaError
  /// naming the replica and device when a replica fails; the gradients of
  /// the failed step are discarded and the next step works.
  template <class Batch, class LossFn>
  double train_step(const Batch& batch, LossFn&& loss_fn);

  /// Forward and backward on every replica (each on its shard) and, unless
  /// inside no_sync(), the gradient sync. Gradients accumulate.
  template <class Batch, class LossFn>
  double forward_backward(const Batch& batch, LossFn&& loss_fn);

  /// Makes every replica's gradients the average (a no-op when they already agree).
  void sync_gradients() { core_.sync_gradients(); }
  /// Steps every replica's optimizer (syncing gradients first if needed).
  void step() { core_.step(); }
  /// Zeroes every replica's gradients (in place; they stay in their buckets).
  void zero_grad() { core_.zero_grad(); }

  /// While the returned guard lives, forward_backward does not synchronise:
  /// gradients accumulate on each replica, and the first synchronising
  /// forward_backward (or step) after it averages everything accumulated.
  class NoSyncGuard {
   public:
    explicit NoSyncGuard(detail::DataParallelCore& core) : core_(&core) { core_->enter_no_sync(); }
    ~NoSyncGuard() {
      if (core_ != nullptr) core_->leave_no_sync();
    }
    NoSyncGuard(NoSyncGuard&& other) noexcept : core_(other.core_) { other.core_ = nullptr; }
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    detail::DataParallelCore* core_;
  };
  [[nodiscard]] NoSyncGuard no_sync() { return NoSyncGuard(core_); }

  /// Runs `fn(Module&, const Batch& shard)` on every replica's shard with
  /// gradients off and gathers the outputs on the first device, in order.
  template <class Batch, class Fn>
  auto predict(const Batch& batch, Fn&& fn);

  // --- optimizers -------------------------------------------------------------------

  /// One `Opt` per replica over that replica's parameters, all with
  /// `options`; they step in lockstep. Returns the primary's.
  template <class Opt, class Options>
  Opt& make_optimizer(const Options& options);
  /// The primary replica's optimizer (of your module's parameters).
  torch::optim::Optimizer& optimizer() { return core_.optimizer(0); }
  /// The primary's optimizer as its own type.
  template <class Opt>
  Opt& optimizer();
  /// Every replica's optimizer, in replica order.
  std::vector<torch::optim::Optimizer*> optimizers() { return core_.optimizers(); }
  /// Sets the learning rate of every parameter group of every replica's optimizer.
  void set_learning_rate(double lr) { core_.set_learning_rate(lr); }
  /// The primary optimizer's learning rate (its first parameter group).
  double learning_rate() { return core_.learning_rate(); }
  /// Calls `fn(Options&)` on every parameter group's options of every
  /// replica's optimizer: one call changes any option everywhere.
  template <class Options, class Fn>
  void update_options(Fn&& fn);

  // --- checks and repairs --------------------------------------------------------------

  /// Throws ReplicaError naming the first replica (and parameter or buffer)
  /// that differs from the primary.
  void check_parity() { core_.check_parity(); }
  /// Copies the primary's buffers to every replica (done after each step by default).
  void broadcast_buffers() { core_.broadcast_buffers(); }
  /// Copies the primary's parameters, buffers and optimizer state to every replica.
  void resync_from_primary() { core_.resync_from_primary(); }
  /// Timings of the last gradient sync (nullopt with one replica).
  std::optional<detail::SyncStats> last_sync_stats() const { return core_.last_sync_stats(); }
  /// How the gradients are bucketed (nullptr with one replica).
  const std::vector<detail::BucketInfo>* gradient_buckets() const { return core_.buckets(); }

  // --- checkpoints --------------------------------------------------------------------

  /// Saves your module with plain torch::save (no "module." prefix): a plain
  /// `Net` loads it with torch::load. Written atomically.
  void save(const std::string& path) { core_.save(path); }
  /// Loads a plain LibTorch checkpoint of the module into every replica.
  void load(const std::string& path) { core_.load(path); }
  /// Saves the primary optimizer's state (torch::save of the optimizer).
  void save_optimizer(const std::string& path) { core_.save_optimizer(path); }
  /// Loads an optimizer state into every replica's optimizer.
  void load_optimizer(const std::string& path) { core_.load_optimizer(path); }

 private:
  static Factory default_factory() {
    if constexpr (std::is_default_constructible<Module>::value) {
      return [] { return std::make_shared<Module>(); };
    } else {
      return nullptr;
    }
  }
  static std::vector<ModulePtr> make_replicas(const ModulePtr& master, const std::vector<c10::Device>& devices,
                                              const Factory& factory);
  static std::vector<std::shared_ptr<torch::nn::Module>> upcast(const std::vector<ModulePtr>& replicas) {
    return {replicas.begin(), replicas.end()};
  }

  ModulePtr module_;
  std::vector<ModulePtr> replicas_;
  detail::DataParallelCore core_;
};

// ---------------------------------------------------------------------------
// Definitions: the template

template <class M>
std::vector<typename DataParallel<M>::ModulePtr> DataParallel<M>::make_replicas(const ModulePtr& master,
                                                                               const std::vector<c10::Device>& devices,
                                                                               const Factory& factory) {
  if (!master) throw Error("DataParallel: the module is null");
  if (devices.empty()) throw Error("DataParallel: no device given; select some with DeviceManager::select");
  for (const auto& device : devices) {
    if (device.type() != devices[0].type()) {
      throw Error(fmt::format("DataParallel: replicas must be all GPUs or all CPU, got {} and {}",
                              devices[0].str(), device.str()));
    }
  }
  std::vector<ModulePtr> replicas;
  replicas.push_back(master);
  master->to(devices[0]);  // your module is replica 0; it goes nowhere but the first listed device
  const detail::PreserveCpuRandomState keep_random_state;
  for (std::size_t r = 1; r < devices.size(); ++r) {
    ModulePtr replica;
    if constexpr (std::is_base_of<torch::nn::Cloneable<Module>, Module>::value) {
      replica = std::dynamic_pointer_cast<Module>(master->clone(devices[r]));  // copies straight to devices[r]
    } else {
      if (!factory) {
        throw Error("DataParallel: the module is not Cloneable; pass a factory that builds a fresh one");
      }
      replica = factory();
      if (!replica) throw Error("DataParallel: the factory returned a null module");
      replica->to(devices[r]);
      detail::copy_module_state(*master, *replica, "the factory's module");
    }
    replicas.push_back(std::move(replica));
  }
  return replicas;
}

template <class M>
template <class Batch, class LossFn>
double DataParallel<M>::forward_backward(const Batch& batch, LossFn&& loss_fn) {
  const std::int64_t total = batch_size(batch);
  if (total <= 0) throw Error("forward_backward: the batch has no samples");
  const std::vector<std::int64_t> sizes = split_batch(total, size());
  const std::vector<Batch> shards = split_shards(batch, sizes);
  return core_.forward_backward(sizes, [&](std::size_t r) -> at::Tensor {
    const Batch shard = shard_to(shards[r], core_.device(r));
    return std::invoke(loss_fn, *replicas_[r], shard);
  });
}

template <class M>
template <class Batch, class LossFn>
double DataParallel<M>::train_step(const Batch& batch, LossFn&& loss_fn) {
  if (core_.in_no_sync()) {
    throw Error("train_step steps the optimizers, which no_sync() forbids; inside no_sync() call "
                "forward_backward, and train_step after the guard is gone");
  }
  if (!core_.has_optimizer()) throw Error("train_step: no optimizer yet; call make_optimizer<Opt>(options) first");
  const double loss = forward_backward(batch, std::forward<LossFn>(loss_fn));
  core_.step();
  core_.zero_grad();
  return loss;
}

template <class M>
template <class Batch, class Fn>
auto DataParallel<M>::predict(const Batch& batch, Fn&& fn) {
  using Output = std::decay_t<std::invoke_result_t<Fn&, Module&, const Batch&>>;
  const std::int64_t total = batch_size(batch);
  if (total <= 0) throw Error("predict: the batch has no samples");
  const std::vector<std::int64_t> sizes = split_batch(total, size());
  const std::vector<Batch> shards = split_shards(batch, sizes);
  std::vector<std::optional<Output>> outputs(size());
  std::vector<bool> active(size());
  for (std::size_t r = 0; r < size(); ++r) active[r] = sizes[r] > 0;
  core_.run(
      [&](std::size_t r) {
        const compat::NoGradGuard no_grad;
        const Batch shard = shard_to(shards[r], core_.device(r));
        outputs[r].emplace(std::invoke(fn, *replicas_[r], shard));
      },
      "predict", active);
  std::vector<Output> parts;
  for (auto& output : outputs) {
    if (output) parts.push_back(std::move(*output));
  }
  return gather_outputs(parts, core_.device(0));
}

template <class M>
template <class Opt, class Options>
Opt& DataParallel<M>::make_optimizer(const Options& options) {
  static_assert(std::is_base_of<torch::optim::Optimizer, Opt>::value,
                "make_optimizer<Opt>: Opt must be a torch::optim::Optimizer (SGD, Adam, AdamW, ...)");
  std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers;
  for (std::size_t r = 0; r < size(); ++r) {
    optimizers.push_back(std::make_unique<Opt>(replicas_[r]->parameters(), options));
  }
  core_.set_optimizers(std::move(optimizers));
  return optimizer<Opt>();
}

template <class M>
template <class Opt>
Opt& DataParallel<M>::optimizer() {
  auto* typed = dynamic_cast<Opt*>(&core_.optimizer(0));
  if (typed == nullptr) throw Error("DataParallel::optimizer<Opt>(): the optimizer is of another type");
  return *typed;
}

template <class M>
template <class Options, class Fn>
void DataParallel<M>::update_options(Fn&& fn) {
  for (auto* optimizer : core_.optimizers()) {
    for (auto& group : optimizer->param_groups()) {
      auto* options = dynamic_cast<Options*>(&group.options());
      if (options == nullptr) throw Error("update_options<Options>: the optimizer's options are of another type");
      fn(*options);
    }
  }
}

// ---------------------------------------------------------------------------
// Definitions: the core

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
      workers_(devices_) {
  if (options_.bucket_cap_mib <= 0) {
    throw Error(fmt::format("DataParallelOptions::bucket_cap_mib must be positive, got {}", options_.bucket_cap_mib));
  }
  if (options_.collective_timeout.count() <= 0) throw Error("DataParallelOptions::collective_timeout must be positive");
  std::vector<ReplicaContext> contexts;
  for (std::size_t r = 0; r < size(); ++r) contexts.push_back(workers_.context(r));
  comm_ = options_.make_communicator ? options_.make_communicator(contexts)
                                     : multigpu::make_communicator(contexts, options_.backend);
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
    reducer.threads = options_.comm_threads > 0 ? options_.comm_threads
                                                : (comm_->needs_one_order() ? 1 : std::min<std::size_t>(2, size()));
    reducer_ = std::make_unique<GradientReducer>(std::move(trainable), std::move(trainable_names), contexts, *comm_,
                                                 reducer);
  }
}

inline void DataParallelCore::require_usable(const char* what) const {
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
inline double DataParallelCore::forward_backward(const std::vector<std::int64_t>& shard_sizes,
                                                 const std::function<at::Tensor(std::size_t)>& loss_of) {
  require_usable("forward_backward");
  const std::size_t n = size();
  if (shard_sizes.size() != n) {
    throw Error(fmt::format("forward_backward: {} shard sizes for {} replicas", shard_sizes.size(), n));
  }
  std::int64_t total = 0;
  for (auto s : shard_sizes) total += s;
  if (total <= 0) throw Error("forward_backward: the batch has no samples");
  std::vector<bool> active(n);
  std::vector<double> weights(n);
  for (std::size_t r = 0; r < n; ++r) {
    active[r] = shard_sizes[r] > 0;
    weights[r] = options_.loss_reduction == LossReduction::kMean
                     ? static_cast<double>(n) * static_cast<double>(shard_sizes[r]) / static_cast<double>(total)
                     : static_cast<double>(comm_->world_size());
  }
  std::vector<double> losses(n, 0.0);
  std::vector<const char*> stages(n, nullptr);
  if (reducer_) reducer_->prepare_backward(active, !in_no_sync());
  try {
    workers_.run(
        [&](std::size_t r) {
          stages[r] = "the loss function (forward)";
          at::Tensor loss = loss_of(r);
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
          stages[r] = "reading the loss";
          losses[r] = loss.item<double>();
          if (options_.check_finite_loss && !std::isfinite(losses[r])) {
            stages[r] = "the finite-loss check";
            throw Error(fmt::format("the loss is {} (DataParallelOptions::check_finite_loss)", losses[r]));
          }
        },
        "a training step", active, &stages);
    if (reducer_) reducer_->finish_backward();
  } catch (...) {
    zero_after_failure();
    throw;
  }
  double result = 0;
  for (std::size_t r = 0; r < n; ++r) {
    result += options_.loss_reduction == LossReduction::kMean
                  ? static_cast<double>(shard_sizes[r]) / static_cast<double>(total) * losses[r]
                  : losses[r];
  }
  return result;
}

inline void DataParallelCore::zero_after_failure() noexcept {
  try {
    if (reducer_) reducer_->abandon_step();
    zero_grad();
  } catch (const std::exception& e) {
    warn(fmt::format("could not zero the gradients after a failed step: {}", e.what()));
  }
}

inline void DataParallelCore::sync_gradients() {
  require_usable("sync_gradients");
  if (reducer_) reducer_->synchronize();
}

inline void DataParallelCore::step() {
  require_usable("step");
  if (in_no_sync()) {
    throw Error("step() inside no_sync() would step replicas on different gradients; step after the guard is gone");
  }
  if (optimizers_.empty()) throw Error("step: no optimizer yet; call make_optimizer<Opt>(options) first");
  if (reducer_ && !reducer_->synchronized()) reducer_->synchronize();
  follow_primary_options();
  try {
    workers_.run([&](std::size_t r) { optimizers_[r]->step(); }, "the optimizer step");
  } catch (const ReplicaError& e) {
    if (size() > 1) diverged_ = fmt::format("an optimizer step failed, so the replicas may differ ({})", e.what());
    throw;
  }
  if (options_.broadcast_buffers && !buffer_names_.empty()) broadcast_buffers();
  ++steps_;
  if (options_.parity_check_every > 0 && steps_ % options_.parity_check_every == 0) check_parity();
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
  if (reducer_) {
    workers_.run([&](std::size_t r) { reducer_->zero(r); }, "zeroing gradients");
    reducer_->mark_zeroed();
    return;
  }
  const compat::NoGradGuard no_grad;
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
  const compat::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
    comm_->broadcast(same_tensor_on_every_replica(i, false), 0);
  }
  broadcast_buffers();  // waits for these too
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
  const compat::NoGradGuard no_grad;
  std::map<at::ScalarType, std::vector<std::size_t>> by_type;  // dtype -> buffer indices, in module order
  for (std::size_t i = 0; i < buffer_names_.size(); ++i) {
    if (buffers_[0][i].defined()) by_type[buffers_[0][i].scalar_type()].push_back(i);
  }
  std::vector<std::vector<at::Tensor>> packed;  // [dtype group][replica]
  for (const auto& group : by_type) {
    std::vector<at::Tensor> flat(size());
    for (std::size_t r = 0; r < size(); ++r) {
      const ReplicaContext::Scope scope(workers_.context(r));  // packed on the stream the broadcast runs on
      std::vector<at::Tensor> parts;
      for (std::size_t i : group.second) parts.push_back(buffers_[r][i].reshape({-1}));
      flat[r] = parts.size() == 1 ? parts[0].clone() : at::cat(parts);
    }
    comm_->broadcast(flat, 0);
    packed.push_back(std::move(flat));
  }
  comm_->wait(options_.collective_timeout);
  // Replica 0 too: in another process than global rank 0 it receives as well
  // (on the root itself it gets back its own values).
  std::size_t g = 0;
  for (const auto& group : by_type) {
    for (std::size_t r = 0; r < size(); ++r) {
      const ReplicaContext::Scope scope(workers_.context(r));  // unpacked there too, before its next forward
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
  const compat::NoGradGuard no_grad;
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
  replace_file_atomically(path, [&](const std::string& temporary) { torch::save(replicas_[0], temporary); });
}

inline void DataParallelCore::load(const std::string& path) {
  try {
    torch::load(replicas_[0], path, devices_[0]);
  } catch (const c10::Error& e) {
    throw Error(fmt::format("cannot load the checkpoint {} into the module: {}", path, e.what_without_backtrace()));
  }
  broadcast_from_primary();
}

inline void DataParallelCore::save_optimizer(const std::string& path) {
  auto& primary = optimizer(0);
  replace_file_atomically(path, [&](const std::string& temporary) { torch::save(primary, temporary); });
}

inline void DataParallelCore::load_optimizer(const std::string& path) {
  optimizer(0);  // throws when there is none
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
