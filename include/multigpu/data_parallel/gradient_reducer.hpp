#pragma once
// Gradient synchronisation of in-process replicas, in buckets, overlapped
// with backward.
//
// Note [Gradient buckets]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Each replica's trainable parameters are grouped into buckets as Note
// [Bucket assignment] (bucket_assignment.hpp) decides; the reducer only
// allocates what that assignment says, and assigns once more in the order
// gradients became ready in the first overlapped step. Across processes
// rank 0's ready order is broadcast first, since every process must reduce
// the same buckets in the same order. A bucket is one flat buffer per
// replica, and each parameter's .grad() is an alias of its slot in that
// buffer, so autograd accumulates straight into the buffer and the
// all-reduce needs no copy in or out. The aliases are detached (not autograd
// views), so LibTorch's own Optimizer::zero_grad can zero them in place. If
// something replaces a .grad() (zero_grad(set_to_none), double backward), the
// next hook or sync copies it back into its slot and points .grad() there
// again.
//
// Note [Overlapping the all-reduce with backward]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A post-hook on every parameter's gradient accumulator (the AccumulateGrad
// node, the same mechanism PyTorch's DDP reducer uses; it exists in LibTorch
// 1.13 and 2.x) counts, per bucket, the gradients still to come from every
// replica taking part in this step. When the count reaches zero the bucket
// is complete everywhere and its all-reduce is launched on a communication
// thread, while backward goes on with the earlier layers. Buckets are
// launched in bucket order only (a complete bucket waits for the earlier ones
// to be complete): collectives that span processes (c10d, NCCL) must be issued
// in the same order by every process, and completion order is a race. After backward,
// buckets that never completed hold parameters without a gradient in this
// step: an error naming them, or (find_unused_parameters) reduced as they
// are. The accumulators are kept alive here; hooks reach the reducer through
// a weak pointer, so hooks that outlive it do nothing.
//
// Gradients are averaged over replicas; DataParallel scales each replica's
// loss so that the average is the full-batch gradient. Averaging identical
// values gives them back, so syncing twice is harmless.
//
// On GPUs the all-reduces run on a communication stream per GPU, each
// after its bucket's ready event: see Note [Streams] in streams.hpp.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <fmt/core.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "multigpu/comm.hpp"
#include "multigpu/comm_hook.hpp"
#include "multigpu/data_parallel/bucket_assignment.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/task_pool.hpp"
#include "multigpu/detail/tensor_text.hpp"
#include "multigpu/error.hpp"
#include "multigpu/gradient_sync.hpp"
#include "multigpu/replica.hpp"
#include "multigpu/streams.hpp"

namespace multigpu {
namespace detail {

/// How the reducer buckets and synchronises.
struct ReducerOptions {
  std::int64_t bucket_cap_bytes = std::int64_t{25} << 20;
  bool overlap = true;
  bool find_unused_parameters = false;
  std::size_t threads = 1;  ///< Threads that launch (local backend: run) the all-reduces.
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  /// Averages each bucket instead of a plain all-reduce (null: the
  /// communicator's average). See Note [Compressed gradients].
  std::shared_ptr<CommHook> hook;
};

class GradientReducer {
 public:
  /// params[r][i]: replica r's i-th trainable parameter (the same i is the
  /// same parameter on every replica); names[i] for messages.
  GradientReducer(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                  std::vector<ReplicaContext> replicas, Communicator& comm, ReducerOptions options);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  const std::vector<BucketInfo>& buckets() const { return buckets_; }
  /// Whether the buckets were rebuilt in the order gradients became ready
  /// (see Note [Bucket assignment]).
  bool rebuilt() const { return rebuilt_; }
  const ReducerOptions& options() const { return options_; }
  const SyncStats& last_stats() const { return stats_; }

  /// Before the replicas' backward of one micro-step. `active[r]`: replica r
  /// runs backward (a replica with an empty shard does not). `sync`: reduce
  /// at the end of this backward (false inside no_sync()).
  void prepare_backward(const std::vector<bool>& active, bool sync);
  /// After every active replica's backward has returned: reduces whatever
  /// the hooks did not launch, waits for every all-reduce, checks for
  /// parameters without a gradient. Throws (Error, CommError) on failure;
  /// across processes every bucket is reduced before that Error (see Note
  /// [A step that fails on one process]).
  void finish_backward();
  /// After this process's part of a step failed, across processes: reduces
  /// every bucket the hooks did not launch, as the other processes do (the
  /// step is discarded, so whatever the buffers hold), waits, and abandons
  /// the step. Throws CommError when an all-reduce fails.
  void finish_failed_backward();
  /// Reduces every bucket not reduced since the last backward and waits
  /// (for callers that ran backward themselves, or with overlap off).
  void synchronize();
  /// True when every replica holds the same gradients.
  bool synchronized() const { return synchronized_; }
  /// Zeroes replica r's gradients (run it on r's worker).
  void zero(std::size_t replica);
  /// Replica r's gradient of `param` was zeroed in place by the caller
  /// (zero_grad(name)); a tensor that is no trainable parameter is ignored.
  /// See Note [Gradients of parameters no backward reached].
  void note_zeroed(std::size_t replica, const at::Tensor& param);
  /// After a sync: sets to None, on every replica, the gradients of the
  /// parameters that no replica reached since they were zeroed, as the
  /// one-device program has them, and points every other one released
  /// before at its slot. See Note [Gradients of parameters no backward reached].
  void release_unreached();
  /// Every replica was zeroed: gradients agree again.
  void mark_zeroed() { synchronized_ = true; }
  /// The gradients may differ from the other replicas': the next step() or
  /// synchronize() reduces them (see Note [A failed micro-step across processes]).
  void mark_unsynchronized() { synchronized_ = false; }
  /// After a step that failed on some process, on every process: when this
  /// step was the one to record the bucket order, the next synchronising
  /// step records it instead (see Note [A step that fails on one process]).
  void forget_order_recording() {
    if (recording_step_) rebuild_due_ = false;
    recording_step_ = false;
  }
  /// After a failed step: waits (up to the time-out) for launched work,
  /// forgets this step's readiness. Gradients are left as they are (zero them).
  void abandon_step() noexcept;
  /// Why the reducer cannot be used any more ("" while it can): a collective
  /// that timed out may still write into the buffers.
  const std::string& broken() const { return broken_; }

 private:
  struct Shared;  // what hooks reach through a weak pointer
  class ReadyHook;

  struct Bucket {
    BucketInfo info;
    std::vector<at::Tensor> buffers;  // per replica
    std::unique_ptr<std::atomic<int>> pending;
    std::unique_ptr<std::atomic<bool>> ready;  // every taking-part gradient is in (or the step forces it)
    std::unique_ptr<std::atomic<bool>> launched;
    std::unique_ptr<std::atomic<bool>> finished;  // its all-reduce returned (or threw)
    std::vector<int> remaining;  // per replica: its gradients still to come (each written by r's backward only)
    std::vector<std::unique_ptr<c10::Event>> ready_events;  // per replica, GPUs only
  };

  void check_usable() const;
  void build_buckets(const std::vector<std::size_t>& order);
  void rebuild_buckets();
  void record_ready_events(std::size_t bucket);
  void join_communication();
  void attach_hooks();
  void check_accumulator_stream(const torch::autograd::Node& accumulator, std::size_t replica, std::size_t param);
  void on_grad_ready(std::size_t replica, std::size_t param);
  void ensure_slot(std::size_t replica, std::size_t param);
  void mark_ready(std::size_t bucket);
  void launch(std::size_t bucket);
  void launch_not_ready();
  /// Of the `missing` buckets (incomplete after backward), marks those that
  /// need no reduction as done without one. See Note [A backward that
  /// reaches part of the parameters].
  void leave_alone_unreached(const std::vector<std::size_t>& missing);
  /// Launches every bucket not launched yet and waits for all; a failure abandons the step.
  void launch_rest_and_wait();
  /// Across processes with find_unused_parameters: makes reached_ say
  /// whether any replica of any process reached each parameter (one
  /// all-reduce). See Note [Gradients of parameters no backward reached].
  void agree_on_reached();
  bool across_processes() const { return comm_.world_size() > comm_.size(); }
  void reduce(std::size_t bucket);
  void wait_for_launched(const char* what);
  std::string describe_bucket(std::size_t bucket) const;
  std::string unfinished() const;

  std::vector<std::vector<at::Tensor>> params_;
  std::vector<std::string> names_;
  std::vector<ReplicaContext> replicas_;
  Communicator& comm_;
  ReducerOptions options_;

  std::vector<Bucket> bucket_state_;
  std::vector<BucketInfo> buckets_;
  std::vector<std::size_t> bucket_of_;                  // param -> bucket
  std::vector<std::vector<at::Tensor>> slots_;          // [replica][param]
  std::vector<std::vector<char>> fired_;                // [replica][param], written by r's backward only
  // [replica][param]: a gradient arrived since the parameter's last
  // reduction (or zeroing); written by r's backward and zero(r) only. See
  // Note [A backward that reaches part of the parameters].
  std::vector<std::vector<char>> unreduced_;
  // [replica][param]: a gradient arrived since the parameter's gradient was
  // zeroed where LibTorch's zero_grad sets it to None (across processes,
  // after a sync: on any replica of any process); written by r's backward,
  // and between backwards only. See Note [Gradients of parameters no
  // backward reached].
  std::vector<std::vector<char>> reached_;
  std::unordered_map<const c10::TensorImpl*, std::size_t> index_of_;  // any replica's parameter -> its index
  std::vector<std::vector<compat::NodePtr>> accumulators_;
  bool warned_accumulator_stream_ = false;  // See Note [Accumulators made before DataParallel]
  std::shared_ptr<Shared> shared_;
  std::vector<c10::Stream> comm_streams_;        // one per GPU; see Note [Streams]
  std::vector<std::size_t> comm_stream_of_;      // replica -> index into comm_streams_
  std::vector<std::unique_ptr<c10::Event>> join_events_;  // per comm stream
  std::vector<std::size_t> ready_order_;         // replica 0's parameters as their gradients became ready
  bool record_order_ = false;
  bool rebuild_due_ = false;
  bool recording_step_ = false;  // this step set rebuild_due_
  bool rebuilt_ = false;

  std::atomic<bool> armed_{false};
  std::atomic<bool> fired_twice_{false};
  std::atomic<bool> backward_running_{false};
  std::vector<bool> active_;
  bool synchronized_ = true;
  bool sync_this_step_ = true;
  std::string broken_;
  std::mutex launch_mutex_;
  std::size_t next_launch_ = 0;  // buckets below it are launched; see Note [Overlapping the all-reduce with backward]

  std::mutex stats_mutex_;
  SyncStats stats_;
  std::chrono::steady_clock::time_point last_finish_;

  // Last, so destroyed first: its destructor joins the threads, and a job
  // still running (an all-reduce that outlived its time-out) uses the members
  // above (stats_mutex_ among them) until it returns.
  TaskPool pool_;
};

// ---------------------------------------------------------------------------
// Definitions

struct GradientReducer::Shared {
  std::shared_mutex mutex;  // shared while a hook runs; exclusive to detach hooks on destruction
  GradientReducer* reducer = nullptr;
};

class GradientReducer::ReadyHook : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(std::weak_ptr<Shared> shared, std::size_t replica, std::size_t param)
      : shared_(std::move(shared)), replica_(replica), param_(param) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    if (auto shared = shared_.lock()) {
      // Hooks of different replicas run concurrently; each touches its own
      // replica's state, and the shared counters are atomic. The lock only
      // keeps the reducer alive while the hook runs.
      std::shared_lock<std::shared_mutex> lock(shared->mutex);
      if (shared->reducer != nullptr) shared->reducer->on_grad_ready(replica_, param_);
    }
    return outputs;
  }

 private:
  std::weak_ptr<Shared> shared_;
  std::size_t replica_;
  std::size_t param_;
};

inline GradientReducer::GradientReducer(std::vector<std::vector<at::Tensor>> params, std::vector<std::string> names,
                                        std::vector<ReplicaContext> replicas, Communicator& comm,
                                        ReducerOptions options)
    : params_(std::move(params)),
      names_(std::move(names)),
      replicas_(std::move(replicas)),
      comm_(comm),
      options_(options),
      shared_(std::make_shared<Shared>()),
      pool_(std::max<std::size_t>(options.threads, 1)) {
  if (params_.size() != replicas_.size()) {
    throw Error(fmt::format("gradient reducer: parameters of {} replicas for {} replicas", params_.size(),
                            replicas_.size()));
  }
  for (std::size_t r = 0; r < params_.size(); ++r) {
    if (params_[r].size() != names_.size()) {
      throw Error(fmt::format("gradient reducer: replica {} has {} trainable parameters, replica 0 has {}", r,
                              params_[r].size(), names_.size()));
    }
  }
  shared_->reducer = this;
  reached_.assign(params_.size(), std::vector<char>(names_.size(), 0));
  for (std::size_t r = 0; r < params_.size(); ++r) {
    for (std::size_t k = 0; k < names_.size(); ++k) {
      reached_[r][k] = params_[r][k].grad().defined() ? 1 : 0;  // as the one-device program has it
      index_of_.emplace(params_[r][k].unsafeGetTensorImpl(), k);
    }
  }
  for (const auto& replica : replicas_) {
    std::size_t index = comm_streams_.size();
    if (replica.stream()) {
      for (std::size_t i = 0; i < comm_streams_.size(); ++i) {
        if (comm_streams_[i].device() == replica.device()) index = i;
      }
      if (index == comm_streams_.size()) {
        const c10::impl::VirtualGuardImpl guard(replica.device().type());
        // From the high-priority pool, as ProcessGroupNCCL can: never one of
        // the replicas' (low-priority) streams, and ahead of compute.
        comm_streams_.push_back(guard.getStreamFromGlobalPool(replica.device(), /*isHighPriority=*/true));
        join_events_.push_back(std::make_unique<c10::Event>(replica.device().type()));
      }
    }
    comm_stream_of_.push_back(index);
  }
  build_buckets(reverse_registration_order(names_.size()));
}

inline GradientReducer::~GradientReducer() {
  {
    std::unique_lock<std::shared_mutex> lock(shared_->mutex);  // waits for a hook in progress
    shared_->reducer = nullptr;
  }
  armed_ = false;
  // pool_'s destructor, which runs first (it is the last member), waits for launched all-reduces.
}

inline void GradientReducer::build_buckets(const std::vector<std::size_t>& order) {
  compat::NoGradGuard no_grad;
  const std::size_t n_replicas = params_.size();
  const std::size_t n_params = names_.size();
  bucket_of_.assign(n_params, 0);
  buckets_.clear();

  std::vector<BucketedParameter> described;
  described.reserve(n_params);
  for (std::size_t k = 0; k < n_params; ++k) {
    const at::Tensor& p = params_[0][k];
    described.push_back({p.numel() * static_cast<std::int64_t>(p.element_size()), p.scalar_type(), p.device()});
  }
  for (std::size_t k : order) {
    const at::Tensor& p = params_[0][k];
    for (std::size_t r = 1; r < n_replicas; ++r) {
      const at::Tensor& other = params_[r][k];
      if (other.sizes() != p.sizes() || other.scalar_type() != p.scalar_type()) {
        throw Error(fmt::format("gradient reducer: parameter {} differs between replica 0 ({}{}) and replica {} ({}{})",
                                names_[k], c10::toString(p.scalar_type()), shape_text(p.sizes()), r,
                                c10::toString(other.scalar_type()), shape_text(other.sizes())));
      }
    }
  }
  // See Note [Bucket assignment]: every bucket has the same cap.
  const BucketCaps caps{options_.bucket_cap_bytes, options_.bucket_cap_bytes};
  for (auto& parameters : assign_buckets(described, order, caps)) {
    BucketInfo info;
    info.dtype = described[parameters.front()].dtype;
    for (std::size_t k : parameters) {
      info.numel += params_[0][k].numel();
      info.bytes += described[k].bytes;
      bucket_of_[k] = buckets_.size();
    }
    info.parameters = std::move(parameters);
    buckets_.push_back(std::move(info));
  }

  slots_.assign(n_replicas, std::vector<at::Tensor>(n_params));
  fired_.assign(n_replicas, std::vector<char>(n_params, 0));
  if (unreduced_.empty()) unreduced_.assign(n_replicas, std::vector<char>(n_params, 0));  // kept by a rebuild
  if (accumulators_.empty()) accumulators_.assign(n_replicas, std::vector<compat::NodePtr>(n_params));
  bucket_state_.clear();
  bucket_state_.resize(buckets_.size());
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    Bucket& bucket = bucket_state_[b];
    bucket.info = buckets_[b];
    bucket.pending = std::make_unique<std::atomic<int>>(0);
    bucket.ready = std::make_unique<std::atomic<bool>>(false);
    bucket.launched = std::make_unique<std::atomic<bool>>(false);
    bucket.finished = std::make_unique<std::atomic<bool>>(true);
    bucket.remaining.assign(n_replicas, 0);
    for (std::size_t r = 0; r < n_replicas; ++r) {
      const ReplicaContext::Scope scope(replicas_[r]);  // allocate on the replica's device and stream
      at::Tensor buffer = at::zeros({bucket.info.numel}, params_[r][bucket.info.parameters[0]].options());
      if (replicas_[r].stream()) mark_used_on(buffer, comm_streams_[comm_stream_of_[r]]);  // reduced there
      bucket.buffers.push_back(buffer);
      bucket.ready_events.push_back(
          replicas_[r].device().is_cpu() ? nullptr : std::make_unique<c10::Event>(replicas_[r].device().type()));
      std::int64_t offset = 0;
      for (std::size_t k : bucket.info.parameters) {
        const at::Tensor& p = params_[r][k];
        at::Tensor slot = p.is_non_overlapping_and_dense() && !p.is_contiguous()
                              ? buffer.as_strided(p.sizes(), p.strides(), offset)
                              : buffer.narrow(0, offset, p.numel()).view(p.sizes());
        slot = slot.detach();  // an alias, not an autograd view: see Note [Gradient buckets]
        if (p.grad().defined()) slot.copy_(p.grad());
        p.mutable_grad() = slot;
        slots_[r][k] = slot;
        offset += p.numel();
      }
    }
  }

  attach_hooks();
}

// A parameter's gradient accumulator can be replaced behind our back:
// Tensor::set_ (which torch::load uses) gives the parameter a new one. So the
// hooks are checked, and attached to new accumulators, before each backward.
inline void GradientReducer::attach_hooks() {
  for (std::size_t r = 0; r < params_.size(); ++r) {
    // An accumulator made now takes the current stream as its own: autograd
    // then accumulates on the replica's stream (Note [Streams], rule 1).
    const ReplicaContext::Scope scope(replicas_[r]);
    for (std::size_t k = 0; k < names_.size(); ++k) {
      auto accumulator = torch::autograd::impl::grad_accumulator(params_[r][k]);
      if (!accumulator) {
        throw Error(fmt::format("gradient reducer: parameter {} of replica {} has no gradient accumulator (does it "
                                "require grad, and is it a leaf?)",
                                names_[k], r));
      }
      if (accumulator == accumulators_[r][k]) continue;
      check_accumulator_stream(*accumulator, r, k);
      accumulator->add_post_hook(std::make_unique<ReadyHook>(shared_, r, k));
      accumulators_[r][k] = std::move(accumulator);
    }
  }
}

// Note [Accumulators made before DataParallel]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// An accumulator takes as its stream the current stream of its device when
// it is made, and autograd runs it there (Note [Streams], rule 1). One that
// already exists when the reducer binds it, because an autograd graph of
// the user's module was alive when DataParallel was built (an output or a
// loss kept from before), keeps the user's stream: results stay right, since
// autograd orders that stream against the replica's, but every step then
// pays that ordering (an event per such parameter) and LibTorch 2.10 and
// newer warn that the AccumulateGrad node's stream does not match its
// inputs'. It cannot be replaced while the graph holding it lives (that
// graph would then accumulate without our hook), so the reducer says once
// what it found and what to do; an accumulator made later (the graph
// gone, or torch::load giving the parameter a new one) is made on the
// replica's stream, and the message does not come back.
inline void GradientReducer::check_accumulator_stream(const torch::autograd::Node& accumulator, std::size_t replica,
                                                      std::size_t param) {
  const auto& own = replicas_[replica].stream();
  if (!own || warned_accumulator_stream_ || accumulator.num_inputs() == 0) return;
  const c10::Stream stream = accumulator.input_metadata(0).stream();
  if (stream == *own) return;
  warned_accumulator_stream_ = true;
  warn(fmt::format("DataParallel: the gradient accumulator of parameter {} on replica {} ({}) was made before "
                   "DataParallel, on stream {}, not on the replica's stream {}: results are right, but every step "
                   "orders the two streams for each such parameter (and LibTorch 2.10 and newer warn about it). "
                   "Build DataParallel before running the module, or free every tensor that still holds an autograd "
                   "graph of it (outputs, losses) first",
                   names_[param], replica, replicas_[replica].device().str(), stream.id(), own->id()));
}

inline void GradientReducer::ensure_slot(std::size_t replica, std::size_t param) {
  at::Tensor& grad = params_[replica][param].mutable_grad();
  const at::Tensor& slot = slots_[replica][param];
  if (grad.defined() && grad.data_ptr() == slot.data_ptr() && grad.sizes() == slot.sizes() &&
      grad.strides() == slot.strides()) {
    return;
  }
  compat::NoGradGuard no_grad;
  if (grad.defined()) {
    slot.copy_(grad);
  } else {
    slot.zero_();  // set to None means zero
    // Not reached on this replica since it was set to None (a hook marks
    // it reached after this). See Note [Gradients of parameters no backward reached].
    reached_[replica][param] = 0;
  }
  grad = slot;
}

inline void GradientReducer::on_grad_ready(std::size_t replica, std::size_t param) {
  ensure_slot(replica, param);
  unreduced_[replica][param] = 1;
  reached_[replica][param] = 1;
  if (!armed_.load()) return;
  if (fired_[replica][param] != 0) {
    fired_twice_ = true;  // reported by finish_backward
    return;
  }
  fired_[replica][param] = 1;
  if (replica == 0 && record_order_) ready_order_.push_back(param);
  Bucket& bucket = bucket_state_[bucket_of_[param]];
  auto& event = bucket.ready_events[replica];
  if (--bucket.remaining[replica] == 0 && event) {
    // The bucket's last gradient on this replica: the all-reduce goes after
    // the kernels that produced it, on the stream autograd ran them on.
    event->record(*current_stream(replicas_[replica].device()));
  }
  if (bucket.pending->fetch_sub(1) == 1) mark_ready(bucket_of_[param]);
}

inline void GradientReducer::check_usable() const {
  if (!broken_.empty()) {
    throw CommError(fmt::format("gradient sync is unusable after an earlier failure ({}); build a new "
                                "DataParallel to go on",
                                broken_));
  }
}

inline void GradientReducer::prepare_backward(const std::vector<bool>& active, bool sync) {
  check_usable();
  if (sync && rebuild_due_) rebuild_buckets();
  attach_hooks();
  active_ = active;
  sync_this_step_ = sync;
  synchronized_ = false;
  fired_twice_ = false;
  for (auto& row : fired_) std::fill(row.begin(), row.end(), 0);
  int active_replicas = 0;
  for (bool a : active_) active_replicas += a ? 1 : 0;
  for (auto& bucket : bucket_state_) {
    bucket.pending->store(active_replicas * static_cast<int>(bucket.info.parameters.size()));
    bucket.ready->store(false);
    bucket.launched->store(false);
    for (std::size_t r = 0; r < active_.size(); ++r) {
      const int count = static_cast<int>(bucket.info.parameters.size());
      bucket.remaining[r] = active_[r] ? count : 0;
      // A replica without samples fires no hook; its (unchanged) gradients
      // are ready now.
      if (!active_[r] && bucket.ready_events[r]) bucket.ready_events[r]->record(*replicas_[r].stream());
    }
  }
  {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    next_launch_ = 0;
  }
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats_ = SyncStats{};
    stats_.buckets = buckets_.size();
  }
  backward_running_ = true;
  armed_ = sync && options_.overlap && active_replicas > 0;
  // The first synchronising step records the order; the next one rebuilds,
  // whatever became of this one, so that every process rebuilds at the
  // same step. Which step that is depends only on facts equal on every
  // process (not on this process's batch, which may be empty on one rank
  // only); a process without an active replica records nothing, and rank
  // 0's order is the one every process takes.
  recording_step_ = sync && options_.overlap && !rebuilt_ && !rebuild_due_;
  if (recording_step_) rebuild_due_ = true;
  record_order_ = recording_step_ && armed_;
  ready_order_.clear();
}

inline void GradientReducer::rebuild_buckets() {
  rebuild_due_ = false;
  rebuilt_ = true;
  const std::size_t n = names_.size();
  std::vector<std::size_t> order = ready_order_first(ready_order_, n);  // See Note [Bucket assignment]
  if (comm_.world_size() > comm_.size()) {
    // Every process must bucket alike: rank 0's order, once (a host wait).
    const compat::NoGradGuard no_grad;
    const ReplicaStreamsCurrent on_replicas(replicas_);
    std::vector<std::int64_t> values(order.begin(), order.end());
    std::vector<at::Tensor> tensors;
    for (const auto& replica : replicas_) {
      tensors.push_back(at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(replica.device()));
    }
    {
      const CollectivePurpose purpose("bucket order");
      comm_.broadcast(tensors, 0);
    }
    const at::Tensor agreed = tensors[0].cpu();
    std::vector<char> seen(n, 0);
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t k = agreed.data_ptr<std::int64_t>()[i];
      if (k < 0 || static_cast<std::size_t>(k) >= n || seen[static_cast<std::size_t>(k)] != 0) {
        throw CommError(fmt::format("gradient buckets: rank 0's parameter order is not one of this process's {} "
                                    "trainable parameters; every process must train the same model",
                                    n));
      }
      seen[static_cast<std::size_t>(k)] = 1;
      order[i] = static_cast<std::size_t>(k);
    }
  }
  std::vector<std::size_t> current;
  for (const auto& bucket : buckets_) current.insert(current.end(), bucket.parameters.begin(), bucket.parameters.end());
  if (order != current) build_buckets(order);
}

inline void GradientReducer::record_ready_events(std::size_t bucket) {
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    if (auto& event = bucket_state_[bucket].ready_events[r]) event->record(*replicas_[r].stream());
  }
}

inline void GradientReducer::join_communication() {
  if (comm_streams_.empty()) return;
  for (std::size_t i = 0; i < comm_streams_.size(); ++i) join_events_[i]->record(comm_streams_[i]);
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    if (replicas_[r].stream()) join_events_[comm_stream_of_[r]]->block(*replicas_[r].stream());
  }
}

inline void GradientReducer::mark_ready(std::size_t bucket) {
  bucket_state_[bucket].ready->store(true);
  std::lock_guard<std::mutex> lock(launch_mutex_);
  while (next_launch_ < bucket_state_.size() && bucket_state_[next_launch_].ready->load()) launch(next_launch_++);
}

inline void GradientReducer::launch(std::size_t bucket) {
  if (bucket_state_[bucket].launched->exchange(true)) return;
  bucket_state_[bucket].finished->store(false);
  if (backward_running_.load()) {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++stats_.overlapped_buckets;
  }
  pool_.submit([this, bucket] { reduce(bucket); });
}

inline void GradientReducer::reduce(std::size_t bucket) {
  Bucket& state = bucket_state_[bucket];
  struct MarkFinished {
    std::atomic<bool>& flag;
    ~MarkFinished() { flag.store(true); }
  } mark_finished{*state.finished};
  const auto start = std::chrono::steady_clock::now();
  std::optional<c10::MultiStreamGuard> on_comm_streams;
  if (!comm_streams_.empty()) on_comm_streams.emplace(comm_streams_);
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    if (state.ready_events[r]) state.ready_events[r]->block(comm_streams_[comm_stream_of_[r]]);
  }
  const CollectivePurpose purpose("gradient bucket", static_cast<std::int64_t>(bucket));
  if (options_.hook) {
    options_.hook->all_reduce_average(comm_, state.buffers);
  } else {
    comm_.all_reduce(state.buffers, ReduceOp::kAverage);
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.total_ms += ms;
  stats_.last_bucket_ms = ms;
}

inline std::string GradientReducer::describe_bucket(std::size_t bucket) const {
  const auto& info = buckets_[bucket];
  return fmt::format("bucket {} ({} parameters, {:.2f} MiB of {})", bucket, info.parameters.size(),
                     static_cast<double>(info.bytes) / (1 << 20), c10::toString(info.dtype));
}

/// "the all-reduce of bucket 2 (...) over replicas 0..3", for time-outs.
inline std::string GradientReducer::unfinished() const {
  std::string buckets;
  for (std::size_t b = 0; b < bucket_state_.size(); ++b) {
    if (bucket_state_[b].launched->load() && !bucket_state_[b].finished->load()) {
      buckets += (buckets.empty() ? "" : ", ") + describe_bucket(b);
    }
  }
  if (buckets.empty()) buckets = "the last launched bucket";
  return fmt::format("the all-reduce of {} over replicas 0..{}", buckets, replicas_.size() - 1);
}

// Waits on the host only until every all-reduce is launched (the local
// backend on CPUs computes while launching); on GPUs the replicas' streams
// then wait for the communication streams, and a collective that never ends
// is the NCCL watchdog's to abort (Note [Streams], rule 5).
inline void GradientReducer::wait_for_launched(const char* what) {
  if (!pool_.wait_idle(options_.timeout)) {
    broken_ = fmt::format("{}: {} on the {} backend did not finish within {} ms", what, unfinished(), comm_.name(),
                          options_.timeout.count());
    throw CommError(broken_);
  }
  join_communication();
  if (auto error = pool_.take_error()) {
    throw CommError(fmt::format("{}: all-reduce on the {} backend failed: {}", what, comm_.name(),
                                describe_exception(error)));
  }
}

// Launches, in bucket order, every bucket not ready yet (and those waiting
// behind them), with each parameter's gradient in its slot.
inline void GradientReducer::launch_not_ready() {
  for (std::size_t b = 0; b < bucket_state_.size(); ++b) {
    if (bucket_state_[b].ready->load()) continue;
    for (std::size_t r = 0; r < params_.size(); ++r) {
      const ReplicaContext::Scope scope(replicas_[r]);  // copied on r's stream, before its ready event
      for (std::size_t k : buckets_[b].parameters) ensure_slot(r, k);
    }
    record_ready_events(b);
    mark_ready(b);
  }
}

inline void GradientReducer::launch_rest_and_wait() {
  launch_not_ready();
  try {
    wait_for_launched("gradient sync");
    agree_on_reached();  // every process passes here, a failed step's too
  } catch (...) {
    abandon_step();
    throw;
  }
}

// Note [A backward that reaches part of the parameters]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A program in phases (a GAN's discriminator phase back-propagates into the
// discriminator only) leaves whole parts of the module without a gradient
// in a step, on every replica alike. By default that is an error naming the
// parameters (a forgotten part of the model is found at once); with
// find_unused_parameters the step goes on. Within one process, the hooks
// tell exactly which gradients arrived: a bucket none of whose parameters
// received a gradient on any replica since its last reduction (this
// backward's, or an earlier one inside no_sync(); a reduction or zeroing
// clears the mark) holds what every replica already agrees on. It is left
// alone: not reduced, its gradients as they were, as in the one-device
// program. Every other bucket is reduced as usual, an unreached parameter's
// gradient as it is. So a phase costs no collective for the part it did not reach, and
// gradients accumulated on that part earlier are averaged by the next step
// that reduces, never skipped. Across processes the other processes'
// backward is not seen without one more collective per step, so there
// every bucket is reduced, as before.
//
// A parameter that no replica reached since it was zeroed gets the
// gradient the one-device program has (None on LibTorch 2) before the
// optimizers step: see Note [Gradients of parameters no backward reached].
inline void GradientReducer::leave_alone_unreached(const std::vector<std::size_t>& missing) {
  std::size_t left = 0;
  for (std::size_t b : missing) {
    bool untouched = true;
    for (std::size_t k : buckets_[b].parameters) {
      for (const auto& row : unreduced_) untouched = untouched && row[k] == 0;
    }
    if (!untouched) continue;
    bucket_state_[b].launched->store(true);  // launch() passes it by
    mark_ready(b);
    ++left;
  }
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.buckets -= left;
}

inline void GradientReducer::finish_backward() {
  const auto backward_done = std::chrono::steady_clock::now();
  armed_ = false;
  backward_running_ = false;
  if (!sync_this_step_) return;
  // Across processes, a step that fails here still reduces every bucket, as
  // the other processes do: see Note [A step that fails on one process].
  const auto fail = [&](const std::string& message) {
    if (across_processes()) {
      launch_rest_and_wait();
    }
    abandon_step();
    throw Error(message);
  };
  if (fired_twice_) {
    fail("a parameter received its gradient twice in one step (backward ran twice, e.g. retain_graph), "
         "which the overlapped gradient sync cannot follow; run one backward per forward_backward, or set "
         "DataParallelOptions::overlap_sync_with_backward = false");
  }
  std::vector<std::size_t> missing;
  for (std::size_t b = 0; b < bucket_state_.size(); ++b) {
    if (!bucket_state_[b].ready->load()) missing.push_back(b);
  }
  if (!missing.empty() && options_.overlap && options_.find_unused_parameters && !across_processes()) {
    leave_alone_unreached(missing);
  }
  if (!missing.empty() && options_.overlap && !options_.find_unused_parameters) {
    std::vector<std::size_t> unused_params;
    for (std::size_t b : missing) {
      for (std::size_t k : buckets_[b].parameters) unused_params.push_back(k);
    }
    std::sort(unused_params.begin(), unused_params.end());  // registration order reads best
    std::vector<std::string> unused;
    for (std::size_t k : unused_params) {
      for (std::size_t r = 0; r < fired_.size(); ++r) {
        if (active_[r] && fired_[r][k] == 0) {
          unused.push_back(fmt::format("{} (replica {})", names_[k], r));
          break;
        }
      }
    }
    std::string list;
    const std::size_t shown = std::min<std::size_t>(unused.size(), 10);
    for (std::size_t i = 0; i < shown; ++i) list += (i == 0 ? "" : ", ") + unused[i];
    if (unused.size() > shown) list += fmt::format(" and {} more", unused.size() - shown);
    fail(fmt::format("{} parameter(s) received no gradient in this step: {}. Their gradients cannot be "
                     "synchronised during backward; if the model does not use them every step, set "
                     "DataParallelOptions::find_unused_parameters = true (they count as zero), or freeze "
                     "them (requires_grad false) before building DataParallel",
                     unused.size(), list));
  }
  launch_rest_and_wait();
  for (auto& row : unreduced_) std::fill(row.begin(), row.end(), 0);
  synchronized_ = true;
  record_order_ = false;
  release_unreached();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.exposed_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - backward_done).count();
}

inline void GradientReducer::finish_failed_backward() {
  armed_ = false;
  backward_running_ = false;
  if (sync_this_step_ && broken_.empty()) {
    launch_rest_and_wait();
  }
  abandon_step();
}

inline void GradientReducer::synchronize() {
  if (synchronized_) return;
  check_usable();
  armed_ = false;
  backward_running_ = false;
  for (std::size_t r = 0; r < params_.size(); ++r) {
    const ReplicaContext::Scope scope(replicas_[r]);  // copied on r's stream, before its ready event
    for (std::size_t k = 0; k < names_.size(); ++k) ensure_slot(r, k);
  }
  for (auto& bucket : bucket_state_) {
    bucket.ready->store(false);
    bucket.launched->store(false);
  }
  {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    next_launch_ = 0;
  }
  for (std::size_t b = 0; b < bucket_state_.size(); ++b) {
    record_ready_events(b);
    mark_ready(b);
  }
  wait_for_launched("gradient sync");
  agree_on_reached();
  for (auto& row : unreduced_) std::fill(row.begin(), row.end(), 0);
  synchronized_ = true;
  release_unreached();
}

inline void GradientReducer::zero(std::size_t replica) {
  check_usable();  // a timed-out all-reduce may still write the buffers
  compat::NoGradGuard no_grad;
  for (auto& bucket : bucket_state_) bucket.buffers[replica].zero_();
  for (std::size_t k = 0; k < names_.size(); ++k) ensure_slot(replica, k);
  std::fill(unreduced_[replica].begin(), unreduced_[replica].end(), 0);  // zeros agree everywhere
  if (compat::kZeroGradSetsToNone) std::fill(reached_[replica].begin(), reached_[replica].end(), 0);
}

inline void GradientReducer::note_zeroed(std::size_t replica, const at::Tensor& param) {
  if (!compat::kZeroGradSetsToNone) return;
  const auto found = index_of_.find(param.unsafeGetTensorImpl());
  if (found != index_of_.end() && params_[replica][found->second].is_same(param)) reached_[replica][found->second] = 0;
}

// Note [Gradients of parameters no backward reached]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// In the one-device program a parameter that no backward reached since
// zero_grad has the gradient zero_grad left: None on LibTorch 2 (its
// Optimizer::zero_grad sets to none), zeros on 1.13 once it ever had one
// (None before its first). An optimizer skips a None gradient and steps a
// zero one: weight decay and momentum move the parameter, Adam counts the
// step. Here every gradient is its bucket slot, zeroed in place, so a GAN's
// step() after a phase that reached only the discriminator would move the
// generator. PyTorch's DDP leaves a parameter that no rank used untouched,
// None included; so does this:
//
// - reached_[r][k] says whether replica r's backward gave parameter k a
//   gradient since it was zeroed: its hook sets it (hooks run inside
//   no_sync() too); zero(r) and note_zeroed (zero_grad(name)) clear it
//   where LibTorch's zero_grad sets to none, never on 1.13; a .grad() the
//   user set to None clears it when a sync finds it so (ensure_slot). It
//   starts as whether the parameter had a gradient when DataParallel was
//   built.
// - With find_unused_parameters (without it every synchronising backward
//   reaches every parameter, or fails), after each synchronisation and
//   before the optimizers step, release_unreached sets to None, on every
//   replica, the .grad() of each parameter reached on no replica. Its slot
//   stays in its bucket, holding zeros (nothing reached it since it was
//   zeroed, and the reduction of zeros is zero); the next hook that gives
//   it a gradient, or the next zeroing, points .grad() at the slot again
//   (ensure_slot), so a parameter that a phase left out pays one copy when
//   it is next reached, and nothing else changes. A replica without
//   samples in the step that reaches it again fires no hook: its .grad()
//   is pointed at its slot, which the reduction filled, by the same
//   release_unreached after that sync.
// - Across processes, whether another rank reached a parameter is agreed
//   on after each reduction of every bucket (launch_rest_and_wait, which
//   every process runs in a synchronising step, a failed one's too, and
//   synchronize()): one all-reduce of a flag per parameter, what DDP's
//   reducer does for find_unused_parameters, and a host wait for its
//   result. From then on every process's reached_ says whether any replica
//   anywhere reached it, so every process releases the same parameters.
//   zero_grad and zero_grad(name) clear the flags alike on every process
//   (they run the same program), and across processes a step() after any
//   forward_backward syncs first (Note [A failed micro-step across
//   processes]), so the flags a step reads are always agreed ones.
//
// So the optimizers skip it as on one device, and a caller reading it
// after forward_backward sees None as on one device. Without
// find_unused_parameters nothing is tracked nor agreed: every backward
// reaches every parameter.
inline void GradientReducer::agree_on_reached() {
  if (!options_.find_unused_parameters || !across_processes()) return;
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(replicas_);
  std::vector<float> local(names_.size(), 0.0F);
  for (std::size_t k = 0; k < names_.size(); ++k) {
    for (const auto& row : reached_) local[k] = row[k] != 0 ? 1.0F : local[k];
  }
  std::vector<at::Tensor> flags;
  for (const auto& replica : replicas_) {
    flags.push_back(at::tensor(local, at::TensorOptions().dtype(at::kFloat)).to(replica.device()));
  }
  {
    const CollectivePurpose purpose("reached parameters");
    comm_.all_reduce(flags, ReduceOp::kSum);
  }
  const at::Tensor agreed = flags[0].cpu();  // a host wait, as DDP's
  for (std::size_t k = 0; k < names_.size(); ++k) {
    const char reached = agreed.data_ptr<float>()[k] > 0 ? 1 : 0;
    for (auto& row : reached_) row[k] = reached;
  }
}

inline void GradientReducer::release_unreached() {
  if (!options_.find_unused_parameters) return;
  for (std::size_t k = 0; k < names_.size(); ++k) {
    bool reached = false;
    for (const auto& row : reached_) reached = reached || row[k] != 0;
    for (std::size_t r = 0; r < params_.size(); ++r) {
      at::Tensor& grad = params_[r][k].mutable_grad();
      if (!reached) {
        grad.reset();
      } else if (!grad.defined()) {
        grad = slots_[r][k];  // released before, reached elsewhere since: the slot holds the average
      }
    }
  }
}

inline void GradientReducer::abandon_step() noexcept {
  armed_ = false;
  backward_running_ = false;
  if (broken_.empty() && !pool_.wait_idle(options_.timeout)) {
    broken_ = fmt::format("{} on the {} backend did not finish within {} ms", unfinished(), comm_.name(),
                          options_.timeout.count());
  }
  pool_.take_error();
  record_order_ = false;
  synchronized_ = false;
  try {
    if (broken_.empty()) join_communication();  // zeroing the gradients goes after what was launched
  } catch (const std::exception& e) {
    warn(fmt::format("could not order the replicas after the gradient sync: {}", e.what()));
  }
}

}  // namespace detail
}  // namespace multigpu
