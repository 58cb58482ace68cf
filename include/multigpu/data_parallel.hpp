#pragma once
/// @file
/// DataParallel: one LibTorch module trained on several devices of this
/// process at once.
///
///   auto devices = multigpu::DeviceManager{}.select("auto");
///   multigpu::DataParallel<Net> dp(std::make_shared<Net>(), devices);
///   auto& optimizer = dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01));
///   for (auto& batch : *loader) {
///     multigpu::StepLoss loss = dp.train_step(batch, [](Net& net, const torch::data::Example<>& shard) {
///       return torch::nll_loss(net.forward(shard.data), shard.target);
///     });
///     if (step % 100 == 0) fmt::print("{}\n", loss.item());  // reading the loss waits for the GPU
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
///
/// Streams: every public operation is ordered against the calling thread's
/// current CUDA streams, at entry and at exit, on the device (the host does
/// not wait): batches copied with non_blocking, your own kernels before a
/// call and after it all see a consistent state. A step waits for the GPU
/// only when you read its loss. See Note [Streams] in streams.hpp.

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>

#include "multigpu/checkpoint.hpp"
#include "multigpu/data_parallel_options.hpp"
#include "multigpu/data_parallel/checkpoint_io.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/data_parallel/core.hpp"
#include "multigpu/data_parallel/optimizer_check.hpp"
#include "multigpu/streams.hpp"
#include "multigpu/batch_plan.hpp"
#include "multigpu/device.hpp"
#include "multigpu/error.hpp"
#include "multigpu/gradient_sync.hpp"
#include "multigpu/replica.hpp"
#include "multigpu/sampler.hpp"
#include "multigpu/scatter.hpp"
#include "multigpu/step_loss.hpp"

namespace multigpu {

/// Data-parallel training of one module over several devices (see the file comment).
template <class M>
class DataParallel {
 public:
  /// The module class (for a holder such as torch::nn::Linear, its Impl).
  using Module = typename detail::module_class<M>::type;
  /// Shared pointer to the module class.
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
  /// As above, on LibTorch devices.
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
  /// As above, with `factory`, on selected devices.
  DataParallel(ModulePtr module, const DeviceSelection& devices, Factory factory, DataParallelOptions options = {})
      : DataParallel(std::move(module), devices.torch_devices(), std::move(factory), std::move(options)) {}
  /// From a module holder (torch::nn::Linear, a TORCH_MODULE type).
  template <class Holder, class = std::enable_if_t<std::is_same<std::decay_t<Holder>, M>::value &&
                                                   !std::is_same<M, Module>::value>>
  DataParallel(const Holder& holder, const DeviceSelection& devices, DataParallelOptions options = {})
      : DataParallel(holder.ptr(), devices, std::move(options)) {}
  /// As above, on LibTorch devices.
  template <class Holder, class = std::enable_if_t<std::is_same<std::decay_t<Holder>, M>::value &&
                                                   !std::is_same<M, Module>::value>>
  DataParallel(const Holder& holder, std::vector<c10::Device> devices, DataParallelOptions options = {})
      : DataParallel(holder.ptr(), std::move(devices), std::move(options)) {}

  // --- the module -------------------------------------------------------------

  /// Your module: replica 0, on the first device, trained in place.
  Module& module() { return *module_; }
  /// Your module (replica 0), read-only.
  const Module& module() const { return *module_; }
  /// Your module's shared pointer (replica 0).
  ModulePtr module_ptr() const { return module_; }
  /// Replica r (0 is module()).
  Module& replica(std::size_t r) { return *replicas_.at(r); }
  /// Number of replicas.
  std::size_t size() const { return core_.size(); }
  /// The replicas' devices, in replica order.
  const std::vector<c10::Device>& devices() const { return core_.devices(); }
  /// The collective backend in use ("local" or "nccl").
  std::string backend() const { return core_.communicator().name(); }
  /// train() / eval() on every replica.
  void train(bool on = true) { core_.train(on); }
  /// Evaluation mode on every replica: train(false).
  void eval() { core_.train(false); }

  // --- training -------------------------------------------------------------------

  /// One optimizer step on `batch`: forward_backward, step, zero_grad (with
  /// a GradScaler: the loss scaled, the gradients unscaled, the step skipped
  /// everywhere when any gradient is not finite; see grad_scaler.hpp).
  /// `loss_fn(Module&, const Batch& shard)` returns the shard's scalar loss
  /// (a loss function may take a third argument, `const ReplicaPlace&`: its
  /// replica's index and device; see Note [The replica's place]);
  /// returns the whole batch's loss (the size-weighted mean of the shards'
  /// losses, or their sum with LossReduction::kSum) as a StepLoss, which
  /// waits for the GPU only when read. Throws ReplicaError naming the
  /// replica and device when a replica fails; the gradients of the failed
  /// step are discarded and the next step works. Across processes a step
  /// that fails on one fails on all, each throwing (see distributed.md).
  template <class Batch, class LossFn>
  StepLoss train_step(const Batch& batch, LossFn&& loss_fn);

  /// Forward and backward on every replica (each on its shard) and, unless
  /// inside no_sync(), the gradient sync. Gradients accumulate. `loss_fn`
  /// as in train_step.
  template <class Batch, class LossFn>
  StepLoss forward_backward(const Batch& batch, LossFn&& loss_fn);

  /// Makes every replica's gradients the average (a no-op when they already agree).
  void sync_gradients() { core_.sync_gradients(); }
  /// Steps every replica's optimizers, all of them (syncing gradients first if needed).
  void step() { core_.step(); }
  /// Steps only the optimizer made as make_optimizer(name, factory), on
  /// every replica (syncing gradients first if needed). See Note [Several
  /// optimizers].
  void step(const std::string& name) { core_.step(name); }
  /// Zeroes every replica's gradients (in place; they stay in their
  /// buckets). One replica in one process has no buckets: like the plain
  /// loop's optimizer.zero_grad(), it sets them to none on LibTorch 2.x and
  /// zeroes them on 1.13 (see Note [Zeroing gradients with one replica]).
  void zero_grad() { core_.zero_grad(); }
  /// Zeroes, on every replica, only the gradients of the parameters that the optimizer `name` holds.
  void zero_grad(const std::string& name) { core_.zero_grad(name); }
  /// Scales every replica's gradients so that their global norm is at most
  /// `max_norm` (after the sync, which it makes if needed; the same factor
  /// everywhere: see Note [Clipping across replicas]); with a GradScaler it
  /// unscales them first. Call it between forward_backward and step().
  /// Returns the norm before clipping, a 0-dimensional float tensor (double
  /// for float64 gradients, equal to torch::nn::utils::clip_grad_norm_'s) on
  /// the first device (reading it waits for the device). `norm_type`: p of the
  /// p-norm, or infinity for the largest absolute value.
  at::Tensor clip_grad_norm(double max_norm, double norm_type = 2.0) {
    return core_.clip_grad_norm(max_norm, norm_type);
  }
  /// Uses `scaler` for fp16 loss scaling from the next step on (null: none);
  /// the same as DataParallelOptions::grad_scaler. Call it between steps.
  void set_grad_scaler(std::shared_ptr<GradScaler> scaler) { core_.set_grad_scaler(std::move(scaler)); }
  /// The GradScaler in use, or nullptr.
  GradScaler* grad_scaler() const { return core_.grad_scaler(); }

  /// While the returned guard lives, forward_backward does not synchronise:
  /// gradients accumulate on each replica, and the first synchronising
  /// forward_backward (or step) after it averages everything accumulated.
  class NoSyncGuard {
   public:
    /// Made by DataParallel::no_sync().
    explicit NoSyncGuard(detail::DataParallelCore& core) : core_(&core) { core_->enter_no_sync(); }
    ~NoSyncGuard() {
      if (core_ != nullptr) core_->leave_no_sync();
    }
    /// Moves the guard; the moved-from one does nothing.
    NoSyncGuard(NoSyncGuard&& other) noexcept : core_(other.core_) { other.core_ = nullptr; }
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    detail::DataParallelCore* core_;
  };
  /// Stops gradient synchronisation while the returned guard lives (gradient accumulation; see NoSyncGuard).
  [[nodiscard]] NoSyncGuard no_sync() { return NoSyncGuard(core_); }

  /// Runs `fn(Module&, const Batch& shard)` (or `fn(Module&, const Batch&,
  /// const ReplicaPlace&)`) on every replica's shard with gradients off and
  /// gathers the outputs on the first device, in order.
  template <class Batch, class Fn>
  auto predict(const Batch& batch, Fn&& fn);

  // --- optimizers -------------------------------------------------------------------

  /// One `Opt` per replica over that replica's parameters, all with
  /// `options`; they step in lockstep. Returns the primary's.
  template <class Opt, class Options>
  Opt& make_optimizer(const Options& options);
  /// One optimizer per replica, built by `factory(Module& replica)`, which
  /// returns a std::unique_ptr to any torch::optim::Optimizer (parameter
  /// groups, your own class) over that replica's parameters:
  ///
  ///   dp.make_optimizer([](Net& net) {
  ///     return std::make_unique<torch::optim::AdamW>(
  ///         std::vector<torch::optim::OptimizerParamGroup>{{weights_of(net)}, {biases_of(net), no_decay()}},
  ///         torch::optim::AdamWOptions(1e-3));
  ///   });
  ///
  /// Every optimizer must hold only its replica's parameters, each once,
  /// and be the primary's twin (class, groups, order); otherwise Error, and
  /// the previous optimizers stay. Options set on the primary's groups reach
  /// the same group of every replica. Returns the primary's, as the type
  /// the factory returns. See Note [Optimizers the user builds].
  template <class MakeOptimizer, class = std::enable_if_t<std::is_invocable<MakeOptimizer&, Module&>::value>>
  auto& make_optimizer(MakeOptimizer&& factory);
  /// As make_optimizer(factory), for one of several optimizers side by side:
  /// the optimizer `name` (letters, digits and underscores), made beside the
  /// others (or replacing the one of that name). step(name) and
  /// zero_grad(name) step and zero it alone; step() and train_step step
  /// every optimizer. See Note [Several optimizers].
  template <class MakeOptimizer, class = std::enable_if_t<std::is_invocable<MakeOptimizer&, Module&>::value>>
  auto& make_optimizer(const std::string& name, MakeOptimizer&& factory);
  /// The primary replica's optimizer (of your module's parameters); with
  /// `name`, the one made as make_optimizer(name, factory).
  torch::optim::Optimizer& optimizer(const std::string& name = "") { return core_.optimizer(0, name); }
  /// The primary's optimizer (`name`: as above) as its own type.
  template <class Opt>
  Opt& optimizer(const std::string& name = "");
  /// Every replica's optimizer (`name`: as above), in replica order.
  std::vector<torch::optim::Optimizer*> optimizers(const std::string& name = "") { return core_.optimizers(name); }
  /// Sets the learning rate of every parameter group of every replica's optimizers, all of them.
  void set_learning_rate(double lr) { core_.set_learning_rate(lr); }
  /// The primary optimizer's learning rate (its first parameter group): the one made without a name.
  double learning_rate() { return core_.learning_rate(); }
  /// The bytes of optimizer state (of every optimizer) each replica holds,
  /// in replica order: sharded (DataParallelOptions::shard_optimizer_state)
  /// about 1/K of the unsharded state each.
  std::vector<std::int64_t> optimizer_state_bytes() const { return core_.optimizer_state_bytes(); }
  /// Calls `fn(Options&)` on every parameter group's options of every
  /// replica's optimizers whose options are `Options`: one call changes any
  /// option everywhere.
  template <class Options, class Fn>
  void update_options(Fn&& fn);

  // --- checks and repairs --------------------------------------------------------------

  /// Throws ReplicaError naming the first replica (and parameter or buffer)
  /// that differs from the primary.
  void check_parity() { core_.check_parity(); }
  /// Copies the primary's buffers to every replica (done after each step by default).
  void broadcast_buffers() { core_.broadcast_buffers(); }
  /// Copies the primary's parameters, buffers and optimizer state to every
  /// replica (with a sharded optimizer state, each owner keeps its own).
  void resync_from_primary() { core_.resync_from_primary(); }
  /// Timings of the last gradient sync (nullopt with one replica).
  std::optional<SyncStats> last_sync_stats() const { return core_.last_sync_stats(); }
  /// How the gradients are bucketed (nullptr with one replica).
  const std::vector<BucketInfo>* gradient_buckets() const { return core_.buckets(); }

  // --- checkpoints (see Note [Checkpoints] in multigpu/checkpoint.hpp) ---------------------

  /// Saves the whole training: module, optimizer state, step count, the
  /// attached sampler's place in the data, random states and values().
  /// Written atomically, by rank 0; collective over processes.
  void save_state(const std::string& path) { detail::save_training_state(core_, path, extras_); }
  /// Resumes the training saved by save_state, also on another number of
  /// replicas or processes (ResumeInfo says what changed). Checks everything
  /// before changing anything: a checkpoint of another model, or a damaged
  /// one, is refused and every replica stays as it was. Make the optimizer
  /// and attach the sampler first. Collective over processes.
  ResumeInfo load_state(const std::string& path) { return detail::load_training_state(core_, path, extras_); }
  /// The sampler whose place in the data checkpoints record (a handle that
  /// shares its state with the loader's copy); load_state makes it skip
  /// what was already trained on.
  void attach(const DistributedSampler& sampler) { detail::attach_sampler(core_, sampler); }
  /// Saves and restores `object` with every checkpoint, under `name`: a
  /// GradScaler, or anything of yours with save(torch::serialize::
  /// OutputArchive&) const and load(torch::serialize::InputArchive&). It
  /// must live as long as this DataParallel saves or loads.
  template <class T>
  void attach(const std::string& name, T& object) {
    check_checkpoint_name(name, "attach");
    extras_.objects[name] = {[&object](torch::serialize::OutputArchive& archive) { object.save(archive); },
                             [&object](torch::serialize::InputArchive& archive) { object.load(archive); }};
  }
  /// Your own numbers and tensors, saved and restored with the training.
  CheckpointValues& values() { return extras_.values; }
  /// Optimizer steps taken (restored by load_state).
  std::int64_t steps() const { return core_.steps(); }

  /// Saves your module with plain torch::save (no "module." prefix): a plain
  /// `Net` loads it with torch::load. Written atomically.
  void save(const std::string& path) { detail::save_module(core_, path); }
  /// Loads a module checkpoint (torch::save of the module, dp.save, or the
  /// module part of save_state's) into every replica. A checkpoint of
  /// another model is refused, naming the first difference, before any
  /// replica changes.
  void load(const std::string& path) { detail::load_module(core_, path); }
  /// Saves the primary optimizer's state (torch::save of the optimizer).
  void save_optimizer(const std::string& path) { detail::save_optimizer(core_, path); }
  /// Loads an optimizer state into every replica's optimizer (all or none).
  void load_optimizer(const std::string& path) { detail::load_optimizer(core_, path); }

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
  detail::CheckpointExtras extras_;
};

// ---------------------------------------------------------------------------
// Definitions: the template

namespace detail {

// Note [The replica's place]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A loss function (or predict's function) that needs to know where it runs
// (to pick per-replica state, draw its own random numbers, or find a second
// model's copy on its device) takes a third argument, `const ReplicaPlace&`:
// its replica's index and device. Which form a function has is found at
// compile time, so the two-argument form costs and changes nothing; a
// generic lambda (`auto&...`) is given the third argument when it can take
// it.
template <class Fn, class Module, class Batch>
decltype(auto) call_with_place(Fn& fn, Module& module, const Batch& shard, const ReplicaPlace& place) {
  if constexpr (std::is_invocable<Fn&, Module&, const Batch&, const ReplicaPlace&>::value) {
    return std::invoke(fn, module, shard, place);
  } else {
    static_assert(std::is_invocable<Fn&, Module&, const Batch&>::value,
                  "the loss function must take (Module&, const Batch& shard) or (Module&, const Batch& shard, const "
                  "multigpu::ReplicaPlace&)");
    return std::invoke(fn, module, shard);
  }
}

}  // namespace detail

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
StepLoss DataParallel<M>::forward_backward(const Batch& batch, LossFn&& loss_fn) {
  std::vector<std::int64_t> sizes;
  std::vector<Batch> shards;
  try {
    const std::int64_t total = batch_size(batch);
    if (total <= 0) throw Error("forward_backward: the batch has no samples");
    sizes = split_batch(total, size());
    shards = split_shards(batch, sizes);
  } catch (...) {
    // A batch that fails on one process only (fields that disagree, a
    // BatchTraits that throws) fails the step on every process: see Note
    // [A step that fails on one process].
    core_.fail_step(std::current_exception());
  }
  return core_.forward_backward(sizes, [&](std::size_t r) -> at::Tensor {
    const Batch shard = shard_to(shards[r], core_.device(r));
    return detail::call_with_place(loss_fn, *replicas_[r], shard, ReplicaPlace{r, core_.device(r)});
  });
}

template <class M>
template <class Batch, class LossFn>
StepLoss DataParallel<M>::train_step(const Batch& batch, LossFn&& loss_fn) {
  if (core_.in_no_sync()) {
    throw Error("train_step steps the optimizers, which no_sync() forbids; inside no_sync() call "
                "forward_backward, and train_step after the guard is gone");
  }
  if (!core_.has_optimizer()) throw Error("train_step: no optimizer yet; call make_optimizer<Opt>(options) first");
  const auto fence = core_.fenced();  // one fence for the three
  StepLoss loss = forward_backward(batch, std::forward<LossFn>(loss_fn));
  core_.step();
  core_.zero_grad();
  return loss;
}

template <class M>
template <class Batch, class Fn>
auto DataParallel<M>::predict(const Batch& batch, Fn&& fn) {
  using Output = std::decay_t<decltype(detail::call_with_place(fn, std::declval<Module&>(),
                                                                 std::declval<const Batch&>(),
                                                                 std::declval<const ReplicaPlace&>()))>;
  const std::int64_t total = batch_size(batch);
  if (total <= 0) throw Error("predict: the batch has no samples");
  const std::vector<std::int64_t> sizes = split_batch(total, size());
  const std::vector<Batch> shards = split_shards(batch, sizes);
  std::vector<std::optional<Output>> outputs(size());
  std::vector<bool> active(size());
  for (std::size_t r = 0; r < size(); ++r) active[r] = sizes[r] > 0;
  const auto fence = core_.fenced();
  core_.run(
      [&](std::size_t r) {
        const compat::NoGradGuard no_grad;
        const Batch shard = shard_to(shards[r], core_.device(r));
        outputs[r].emplace(detail::call_with_place(fn, *replicas_[r], shard, ReplicaPlace{r, core_.device(r)}));
      },
      "predict", active);
  std::vector<Output> parts;
  for (auto& output : outputs) {
    if (output) parts.push_back(std::move(*output));
  }
  // Gathered on the caller's streams, after the replicas' work: the result
  // is the caller's. See Note [Predict's outputs on the caller's streams].
  core_.caller_waits_for_replicas();
  bool seen_all = true;
  for (const auto& part : parts) {
    seen_all = detail::visit_tensors(part, [](const at::Tensor& t) { detail::mark_used_on_current_stream(t); }) &&
               seen_all;
  }
  Output gathered = gather_outputs(parts, core_.device(0));
  if (!seen_all) core_.host_waits_for_callers();
  return gathered;
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

namespace detail {
template <class T>
struct is_optimizer_pointer : std::false_type {};
template <class Opt>
struct is_optimizer_pointer<std::unique_ptr<Opt>> : std::is_base_of<torch::optim::Optimizer, Opt> {};
}  // namespace detail

template <class M>
template <class MakeOptimizer, class>
auto& DataParallel<M>::make_optimizer(MakeOptimizer&& factory) {
  return make_optimizer(std::string(), std::forward<MakeOptimizer>(factory));
}

template <class M>
template <class MakeOptimizer, class>
auto& DataParallel<M>::make_optimizer(const std::string& name, MakeOptimizer&& factory) {
  if (!name.empty()) check_checkpoint_name(name, "make_optimizer(name, factory)");
  using Made = std::invoke_result_t<MakeOptimizer&, Module&>;
  static_assert(detail::is_optimizer_pointer<Made>::value,
                "make_optimizer(factory): the factory must return a std::unique_ptr to a torch::optim::Optimizer or a "
                "subclass, e.g. std::make_unique<torch::optim::AdamW>(groups, options)");
  using Opt = typename Made::element_type;
  std::vector<std::unique_ptr<torch::optim::Optimizer>> optimizers;
  std::vector<const torch::optim::Optimizer*> made;
  for (std::size_t r = 0; r < size(); ++r) {
    optimizers.push_back(factory(*replicas_[r]));
    made.push_back(optimizers.back().get());
    if (!optimizers.back()) break;  // reported below
  }
  std::vector<std::vector<at::Tensor>> parameters;
  for (std::size_t r = 0; r < size(); ++r) parameters.push_back(core_.parameters(r));
  detail::check_replica_optimizers(name.empty() ? "make_optimizer(factory)" : "make_optimizer(name, factory)",
                                   core_.parameter_names(), parameters, devices(), made);
  core_.set_optimizers(std::move(optimizers), name);
  return static_cast<Opt&>(core_.optimizer(0, name));
}

template <class M>
template <class Opt>
Opt& DataParallel<M>::optimizer(const std::string& name) {
  auto* typed = dynamic_cast<Opt*>(&core_.optimizer(0, name));
  if (typed == nullptr) throw Error("DataParallel::optimizer<Opt>(): the optimizer is of another type");
  return *typed;
}

template <class M>
template <class Options, class Fn>
void DataParallel<M>::update_options(Fn&& fn) {
  // With several optimizers of several classes, each takes the change its options can.
  if (!core_.has_optimizer()) throw Error("update_options<Options>: no optimizer yet; call make_optimizer first");
  bool any = false;
  for (const std::string& name : core_.optimizer_names()) {
    for (auto* optimizer : core_.optimizers(name)) {
      for (auto& group : optimizer->param_groups()) {
        auto* options = dynamic_cast<Options*>(&group.options());
        if (options == nullptr) continue;
        fn(*options);
        any = true;
      }
    }
  }
  if (!any) {
    throw Error("update_options<Options>: no optimizer has a parameter group whose options are of type Options; "
                "name the options class of the optimizer to change (torch::optim::AdamOptions for Adam)");
  }
}

}  // namespace multigpu
