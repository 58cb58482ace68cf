#pragma once
// Where a training is in its data: the epoch and how many of its samples
// went into completed optimizer steps. DataParallel counts them as it
// trains, so that a checkpoint records what was really trained on, not
// what a data loader fetched ahead (see Note [Checkpoints] in
// multigpu/checkpoint.hpp).

#include <algorithm>
#include <cstdint>
#include <optional>

#include "multigpu/sampler.hpp"

namespace multigpu {
namespace detail {

class TrainingProgress {
 public:
  /// Follows `sampler` (a handle sharing the loader's state) from now on.
  void attach(const DistributedSampler& sampler) {
    sampler_ = sampler;
    epoch_ = sampler.epoch();
    epoch_samples_ = 0;
  }
  const std::optional<DistributedSampler>& sampler() const { return sampler_; }

  /// forward_backward was given `samples` (this process's): they count as
  /// read from the data whether the step trains on them or fails (a
  /// resumed training must not read them again).
  void on_batch(std::int64_t samples) {
    // The sampler's epoch moves when the loader starts a pass, after the
    // last pass's batches were all used: a batch belongs to the epoch the
    // sampler is in when it is given.
    if (sampler_ && sampler_->epoch() != epoch_) {
      epoch_ = sampler_->epoch();
      epoch_samples_ = 0;
    }
    epoch_samples_ += samples;
    pending_ += samples;
  }
  /// An optimizer step used what was accumulated.
  void on_step() {
    largest_step_ = std::max(largest_step_, pending_);
    pending_ = 0;
  }
  /// The gradients were zeroed: what was accumulated is gone.
  void on_zero_grad() { pending_ = 0; }

  /// Samples trained on but not stepped yet (forward_backward without step).
  std::int64_t pending() const { return pending_; }
  std::size_t epoch() const { return epoch_; }
  /// This process's samples of epoch() read so far.
  std::int64_t epoch_samples() const { return epoch_samples_; }
  /// The most samples (of this process) one optimizer step has used.
  std::int64_t largest_step() const { return largest_step_; }

  /// After loading a checkpoint: the place it recorded.
  void restore(std::size_t epoch, std::int64_t epoch_samples, std::int64_t largest_step) {
    epoch_ = epoch;
    epoch_samples_ = epoch_samples;
    largest_step_ = largest_step;
    pending_ = 0;
  }

 private:
  std::optional<DistributedSampler> sampler_;
  std::size_t epoch_ = 0;
  std::int64_t epoch_samples_ = 0;
  std::int64_t pending_ = 0;
  std::int64_t largest_step_ = 0;
};

}  // namespace detail
}  // namespace multigpu
