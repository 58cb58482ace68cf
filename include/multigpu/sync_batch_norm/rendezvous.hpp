#pragma once
// The meeting point of the replicas of one DataParallel, for layers whose
// forward or backward needs a collective over the whole batch
// (SyncBatchNorm, multigpu/sync_batch_norm.hpp). Internal: the engine
// (data_parallel/core.hpp) owns one and makes it visible to each replica's
// thread for the length of a step; the layers use it.

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/util/intrusive_ptr.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"
#include "multigpu/streams.hpp"

namespace multigpu {
namespace detail {

// Note [SyncBatchNorm across replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A training step runs the loss function and backward on every replica at
// once: replica 0 on the caller's thread, the others on their workers
// (ReplicaWorkers::run). A SyncBatchNorm layer therefore runs on K threads,
// each with its own shard, while a Communicator takes the K tensors of one
// collective from ONE thread. The replicas meet here:
//
//   - Per DataParallel, one ReplicaRendezvous. forward_backward calls
//     begin_step(active) before the replicas start, and each replica's job
//     runs under a ReplicaSyncScope (a thread-local: this rendezvous and the
//     replica's index), which is how a layer deep in the user's model finds
//     it. Outside a step there is no scope, and SyncBatchNorm is BatchNorm.
//   - The n-th synced call of a step, per phase (forward, backward), is
//     round n of that phase. Each replica deposits its tensor in slot r of
//     its round; the last of the step's active replicas to arrive fills the
//     slots of the inactive ones (empty shards: their loss function does not
//     run) with zeros, runs the communicator's all_reduce (sum) on the K
//     tensors with every replica's stream current, and wakes the others. A
//     replica without samples thus takes part in every collective, with
//     count 0, and the communicator (which spans processes for the
//     multi-process backends) pairs one call per round with the other
//     processes' calls.
//   - The backward finds the rendezvous through its autograd node (saved in
//     forward), not the thread-local: on GPUs LibTorch runs backward on its
//     own device threads.
//   - Never a hang. A round records the layer's name: a replica whose n-th
//     call is another layer fails the round at once. A replica whose job
//     threw fails the step at once (ReplicaSyncScope's end); one that ended
//     normally while a round still waits for it fails that round. Any other
//     mismatch (a branch taken on one replica only) ends when a wait for
//     replicas that have not arrived passes the DataParallel's collective
//     time-out (once all arrived, the collective's own time-out applies). A
//     failure fails the whole step: every replica waiting anywhere is woken
//     with the error, which names the layer, the call and the replicas that
//     never came (and where they wait). begin_step clears it; the
//     DataParallel stays usable (gradients zeroed, as after any failed step).
//   - One GPU per replica. LibTorch runs the backward of one GPU's work on
//     one thread, so two replicas on one GPU would meet in backward on that
//     thread, one waiting for the other, which can never come: a synced
//     call on such replicas is an error at once, in forward.
//   - One order. The rounds of a step follow each other (no replica starts
//     round n+1 before round n is done), so one thread at a time issues
//     them, in the same order in every process. The gradient reducer's
//     bucket launches during backward would interleave with the backward's
//     rounds in an order that differs between processes, so with a backend
//     that needs one order (NCCL, Gloo across processes) a model with a
//     synced layer has its gradients synchronised after backward instead
//     (DataParallelCore's constructor turns the overlap off). Queueing the
//     layer's collectives on the reducer's thread, to keep the overlap, is
//     left to do.

/// A step's phase, each with its own sequence of rounds.
enum class SyncPhase { kForward = 0, kBackward = 1 };

/// A layer that meets the other replicas in the rendezvous; the engine tells
/// it its path in the model, for error messages.
class ReplicaSyncedLayer {
 public:
  virtual ~ReplicaSyncedLayer() = default;
  /// The layer's path in the replica's module ("features.1").
  virtual void set_sync_name(const std::string& path) = 0;
};

/// Where the replicas of one DataParallel meet (see Note [SyncBatchNorm across replicas]).
class ReplicaRendezvous : public torch::CustomClassHolder {  // held in autograd nodes as an IValue capsule
 public:
  /// `comm` must outlive the rendezvous or be detach()ed first.
  inline ReplicaRendezvous(Communicator& comm, std::vector<ReplicaContext> contexts,
                           std::chrono::milliseconds timeout);

  /// Replicas of this process.
  std::size_t size() const { return contexts_.size(); }
  /// Replicas over every process.
  std::size_t world_size() const { return world_size_; }
  /// Step number (begin_step counts them).
  std::uint64_t step() const { return step_; }

  /// Starts a step in which the replicas with `active[r]` run.
  inline void begin_step(const std::vector<bool>& active);
  /// Replica `replica` is done with the step; rounds waiting for it fail.
  inline void leave(std::size_t replica);
  /// Replica `replica` failed: every replica waiting is woken with `why`.
  inline void abort(std::size_t replica, const std::string& why);
  /// The communicator is gone: any later use is an error.
  inline void detach();
  /// Sums `tensor` (replica `replica`'s, on its device) in place over every
  /// replica of every process: round n of `phase` for the replica's n-th
  /// call. Throws Error naming `layer` when the replicas do not meet.
  inline void all_reduce(std::size_t replica, SyncPhase phase, const std::string& layer, const at::Tensor& tensor,
                         std::uint64_t step);

 private:
  struct Round {
    std::string layer;
    std::size_t first = 0;  // the replica that opened it
    std::vector<at::Tensor> tensors;
    std::size_t arrived = 0;
    bool done = false;
  };
  inline void fail_locked(std::string why);
  inline std::string missing(const Round& round) const;
  inline void check_left_locked(const Round& round, SyncPhase phase, std::size_t index);

  Communicator* comm_;
  std::vector<ReplicaContext> contexts_;
  std::size_t world_size_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::uint64_t step_ = 0;
  std::vector<bool> active_;
  std::vector<bool> left_;
  std::vector<std::string> waiting_at_;       // [replica]: the call it waits at ("" when it does not)
  std::size_t expected_ = 0;
  std::vector<std::size_t> calls_[2];         // [phase][replica]: calls made this step
  std::map<std::size_t, Round> rounds_[2];    // [phase][index]
  std::string shared_gpu_;                    // why synced calls cannot work here ("" when they can)
  std::string failure_;                       // why this step's meeting failed ("" while it did not)
};

/// Owns a rendezvous, and detaches it when destroyed: autograd nodes that
/// outlive their DataParallel then fail instead of using its communicator.
class OwnedRendezvous {
 public:
  OwnedRendezvous() = default;
  /// Owns `rendezvous`.
  explicit OwnedRendezvous(c10::intrusive_ptr<ReplicaRendezvous> rendezvous) : rendezvous_(std::move(rendezvous)) {}
  OwnedRendezvous(OwnedRendezvous&& other) noexcept = default;
  OwnedRendezvous& operator=(OwnedRendezvous&& other) noexcept {
    reset();
    rendezvous_ = std::move(other.rendezvous_);
    return *this;
  }
  ~OwnedRendezvous() { reset(); }
  /// The rendezvous (null when moved from).
  const c10::intrusive_ptr<ReplicaRendezvous>& get() const { return rendezvous_; }
  /// The rendezvous.
  ReplicaRendezvous* operator->() const { return rendezvous_.get(); }

 private:
  void reset() noexcept {
    if (rendezvous_) rendezvous_->detach();
    rendezvous_.reset();
  }
  c10::intrusive_ptr<ReplicaRendezvous> rendezvous_;
};

/// What a replica's thread sees during a step (see Note [SyncBatchNorm across replicas]).
struct ReplicaSync {
  c10::intrusive_ptr<ReplicaRendezvous> rendezvous;  // null outside a step
  std::size_t replica = 0;
};

/// This thread's ReplicaSync.
inline ReplicaSync& current_replica_sync() {
  static thread_local ReplicaSync sync;
  return sync;
}

/// Makes `rendezvous` and `replica` this thread's ReplicaSync for its
/// lifetime (a replica's part of a step); at its end the replica leaves the
/// step, or, when an exception ends it, aborts the step for the others.
class ReplicaSyncScope {
 public:
  ReplicaSyncScope(c10::intrusive_ptr<ReplicaRendezvous> rendezvous, std::size_t replica)
      : saved_(std::move(current_replica_sync())), exceptions_(std::uncaught_exceptions()) {
    current_replica_sync() = ReplicaSync{std::move(rendezvous), replica};
  }
  ~ReplicaSyncScope() {
    ReplicaSync& sync = current_replica_sync();
    if (sync.rendezvous) {
      if (std::uncaught_exceptions() > exceptions_) {
        sync.rendezvous->abort(sync.replica, "its loss function or backward threw");
      } else {
        sync.rendezvous->leave(sync.replica);
      }
    }
    sync = std::move(saved_);
  }
  ReplicaSyncScope(const ReplicaSyncScope&) = delete;
  ReplicaSyncScope& operator=(const ReplicaSyncScope&) = delete;

 private:
  ReplicaSync saved_;
  int exceptions_;
};

// ---------------------------------------------------------------------------
// Definitions

inline ReplicaRendezvous::ReplicaRendezvous(Communicator& comm, std::vector<ReplicaContext> contexts,
                                            std::chrono::milliseconds timeout)
    : comm_(&comm), contexts_(std::move(contexts)), world_size_(comm.world_size()), timeout_(timeout) {
  active_.assign(size(), true);
  left_.assign(size(), false);
  waiting_at_.assign(size(), "");
  expected_ = size();
  for (std::size_t r = 0; r < size() && shared_gpu_.empty(); ++r) {
    for (std::size_t q = 0; q < r && shared_gpu_.empty(); ++q) {
      const auto& device = contexts_[r].device();
      if (!device.is_cpu() && device == contexts_[q].device()) {
        shared_gpu_ = fmt::format("replicas {} and {} share {}, where LibTorch runs their backward on one thread, so "
                                  "their backward collectives could never meet: give each replica its own GPU",
                                  q, r, device.str());
      }
    }
  }
}

inline void ReplicaRendezvous::begin_step(const std::vector<bool>& active) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++step_;
  active_ = active.empty() ? std::vector<bool>(size(), true) : active;
  left_.assign(size(), false);
  waiting_at_.assign(size(), "");
  expected_ = 0;
  for (bool a : active_) expected_ += a ? 1 : 0;
  for (auto& calls : calls_) calls.assign(size(), 0);
  for (auto& rounds : rounds_) rounds.clear();
  failure_.clear();
}

inline void ReplicaRendezvous::fail_locked(std::string why) {
  if (failure_.empty()) failure_ = std::move(why);
  wake_.notify_all();
}

inline std::string ReplicaRendezvous::missing(const Round& round) const {
  std::string out;
  for (std::size_t r = 0; r < size(); ++r) {
    if (!active_[r] || round.tensors[r].defined()) continue;
    out += fmt::format("{}{}", out.empty() ? "" : ", ", r);
    if (!waiting_at_[r].empty()) out += fmt::format(" (waiting at {})", waiting_at_[r]);
  }
  return out;
}

inline const char* phase_name(SyncPhase phase) { return phase == SyncPhase::kForward ? "forward" : "backward"; }

inline void ReplicaRendezvous::check_left_locked(const Round& round, SyncPhase phase, std::size_t index) {
  if (round.done || !failure_.empty()) return;
  for (std::size_t r = 0; r < size(); ++r) {
    if (active_[r] && left_[r] && !round.tensors[r].defined()) {
      fail_locked(fmt::format("SyncBatchNorm '{}': replica {} made call #{} in {}, but replica {} ended its step "
                              "after {} such call(s): every replica must call the same SyncBatchNorm layers, in the "
                              "same order, in a step (is a branch taken on some replicas only?)",
                              round.layer, round.first, index + 1, phase_name(phase), r,
                              calls_[static_cast<int>(phase)][r]));
      return;
    }
  }
}

inline void ReplicaRendezvous::leave(std::size_t replica) {
  std::lock_guard<std::mutex> lock(mutex_);
  left_.at(replica) = true;
  for (int p = 0; p < 2; ++p) {
    for (const auto& [index, round] : rounds_[p]) check_left_locked(round, static_cast<SyncPhase>(p), index);
  }
}

inline void ReplicaRendezvous::abort(std::size_t replica, const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  left_.at(replica) = true;
  fail_locked(fmt::format("replica {} failed: {}", replica, why));
}

inline void ReplicaRendezvous::detach() {
  std::lock_guard<std::mutex> lock(mutex_);
  comm_ = nullptr;
  fail_locked("its DataParallel is gone");
}

inline void ReplicaRendezvous::all_reduce(std::size_t replica, SyncPhase phase, const std::string& layer,
                                          const at::Tensor& tensor, std::uint64_t step) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (comm_ == nullptr) throw Error(fmt::format("SyncBatchNorm '{}': its DataParallel is gone", layer));
  if (!shared_gpu_.empty()) throw Error(fmt::format("SyncBatchNorm '{}': {}", layer, shared_gpu_));
  if (step != step_) {
    throw Error(fmt::format("SyncBatchNorm '{}': {} outside the DataParallel step that ran its forward (step {}, "
                            "now {}); run backward inside the loss function's step",
                            layer, phase_name(phase), step, step_));
  }
  if (!failure_.empty()) {
    throw Error(
        fmt::format("SyncBatchNorm '{}' in {}: the step failed already: {}", layer, phase_name(phase), failure_));
  }
  if (replica >= size() || !active_[replica]) {
    throw Error(fmt::format("SyncBatchNorm '{}': replica {} is not running in this step", layer, replica));
  }
  const auto p = static_cast<int>(phase);
  const std::size_t index = calls_[p][replica]++;
  Round& round = rounds_[p][index];
  if (round.tensors.empty()) {
    round.layer = layer;
    round.first = replica;
    round.tensors.resize(size());
  } else if (round.layer != layer) {
    fail_locked(fmt::format("SyncBatchNorm '{}': replica {}'s call #{} in {} is this layer, replica {}'s is '{}': "
                            "every replica must call the same SyncBatchNorm layers, in the same order, in a step (is "
                            "a branch taken on some replicas only?)",
                            layer, replica, index + 1, phase_name(phase), round.first, round.layer));
    throw Error(failure_);
  }
  round.tensors[replica] = tensor;
  ++round.arrived;
  if (round.arrived == expected_) {
    // The last to arrive runs the collective, outside the lock, so that a
    // failure elsewhere can still be recorded.
    std::vector<at::Tensor> tensors = round.tensors;
    Communicator* comm = comm_;
    lock.unlock();
    std::string error;
    try {
      const compat::NoGradGuard no_grad;
      const ReplicaStreamsCurrent on_replicas(contexts_);
      for (std::size_t r = 0; r < size(); ++r) {
        if (tensors[r].defined()) continue;
        tensors[r] = at::zeros(tensor.sizes(), tensor.options().device(contexts_[r].device()));
      }
      const CollectivePurpose purpose("sync-bn", -1, layer.c_str());
      comm->all_reduce(tensors, ReduceOp::kSum);
    } catch (const std::exception& e) {
      error = e.what();
    }
    lock.lock();
    if (!error.empty()) {
      fail_locked(fmt::format("SyncBatchNorm '{}': the all-reduce of call #{} in {} failed: {}", layer, index + 1,
                              phase_name(phase), error));
      throw Error(failure_);
    }
    round.done = true;
    round.tensors.clear();
    wake_.notify_all();
    return;
  }
  check_left_locked(round, phase, index);
  waiting_at_[replica] = fmt::format("its call #{} in {}, of '{}'", index + 1, phase_name(phase), layer);
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  while (!round.done && failure_.empty()) {
    if (round.arrived == expected_) {
      wake_.wait(lock);  // the collective runs: the communicator's own time-out bounds it
      continue;
    }
    if (wake_.wait_until(lock, deadline) == std::cv_status::timeout && round.arrived < expected_ && !round.done &&
        failure_.empty()) {
      fail_locked(fmt::format("SyncBatchNorm '{}': replica {} waited {} ms at call #{} in {} for replica(s) {}, which "
                              "never made that call: every replica must call the same SyncBatchNorm layers, in the "
                              "same order, in a step (is a branch taken on some replicas only?)",
                              layer, replica, timeout_.count(), index + 1, phase_name(phase), missing(round)));
    }
  }
  waiting_at_[replica].clear();
  if (round.done) return;
  if (failure_.rfind("SyncBatchNorm", 0) == 0) throw Error(failure_);  // it names a layer already
  throw Error(fmt::format("SyncBatchNorm '{}' stopped waiting at call #{} in {}: {}", layer, index + 1,
                          phase_name(phase), failure_));
}

}  // namespace detail
}  // namespace multigpu
