#pragma once
/// @file
/// DistributedSampler: each process's own part of a data set, reshuffled
/// every epoch, for LibTorch's data loaders.
///
///   multigpu::DistributedSampler sampler(dataset_size, group->size(), group->rank());
///   auto loader = torch::data::make_data_loader(std::move(dataset), sampler, options);
///
/// Every process shuffles the same way (a seeded std::mt19937_64, seed plus
/// epoch), pads the order by repeating its beginning until it divides by the
/// number of processes, and takes every size-th index from its rank on: the
/// parts are disjoint (up to the padding) and together cover the set. The
/// epoch advances by itself each time the loader starts a pass (reset()),
/// so there is no set_epoch() to forget; set_epoch() exists for resuming.
/// Each process then splits its batches over its replicas (DataParallel).
///
/// A DistributedSampler is a handle, like a module holder: copies share one
/// state. make_data_loader takes its sampler by value, so the sampler you
/// keep follows the loader's, and a DataParallel it is attached to
/// (dp.attach(sampler)) saves and restores the place in the data with every
/// checkpoint (see multigpu/checkpoint.hpp).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <c10/util/Optional.h>
#include <fmt/core.h>
#include <torch/data/samplers/base.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include "multigpu/error.hpp"

namespace multigpu {

/// Each process's own part of a data set, reshuffled every epoch, for LibTorch's data loaders (see the file comment). A handle: copies share one state.
class DistributedSampler : public torch::data::samplers::Sampler<std::vector<std::size_t>> {
 public:
  /// `size` samples, `processes` parts, this process's part `rank`.
  /// `shuffle` off: the parts are strided slices of 0..size-1, in order.
  DistributedSampler(std::size_t size, int processes, int rank, bool shuffle = true, std::uint64_t seed = 0)
      : state_(std::make_shared<State>()) {
    if (processes < 1) throw Error(fmt::format("DistributedSampler: {} processes; it needs at least 1", processes));
    if (rank < 0 || rank >= processes) {
      throw Error(fmt::format("DistributedSampler: rank {} is out of range for {} processes: valid ranks are 0..{}",
                              rank, processes, processes - 1));
    }
    state_->size = size;
    state_->processes = processes;
    state_->rank = rank;
    state_->shuffle = shuffle;
    state_->seed = seed;
  }

  // A handle: moving one copies it, so that what a sampler was moved from
  // (into make_data_loader) still shares the state.
  /// A copy shares the state (a handle).
  DistributedSampler(const DistributedSampler&) = default;
  /// A move shares the state too: the moved-from sampler stays usable.
  DistributedSampler(DistributedSampler&& other) noexcept : state_(other.state_) {}
  /// Shares `other`'s state.
  DistributedSampler& operator=(const DistributedSampler&) = default;
  /// Shares `other`'s state.
  DistributedSampler& operator=(DistributedSampler&& other) noexcept {
    state_ = other.state_;
    return *this;
  }
  ~DistributedSampler() override = default;

  // c10::optional, not std::optional: the base class's type in LibTorch 1.13
  // (2.x makes it an alias of std::optional).
  /// Starts the next epoch (the loader calls it at the start of every pass).
  /// After resume_at(), the first reset() continues the resumed epoch.
  void reset(c10::optional<std::size_t> new_size = c10::nullopt) override {
    State& s = *state_;
    if (new_size) s.size = *new_size;
    s.epoch = s.started ? s.epoch + 1 : s.epoch;
    s.started = true;
    build();
    s.position = std::min(s.indices.size(), s.skip);
    s.skip = 0;
  }

  /// The next `batch_size` indices of this process's part; nullopt at the end of the epoch.
  c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override {
    State& s = *state_;
    if (!s.started) reset();
    if (s.position >= s.indices.size()) return c10::nullopt;
    const std::size_t end = std::min(s.indices.size(), s.position + batch_size);
    std::vector<std::size_t> batch(s.indices.begin() + static_cast<std::ptrdiff_t>(s.position),
                                   s.indices.begin() + static_cast<std::ptrdiff_t>(end));
    s.position = end;
    return batch;
  }

  /// The epoch the next reset() starts (for replaying an epoch).
  void set_epoch(std::size_t epoch) {
    state_->epoch = epoch;
    state_->started = false;
    state_->skip = 0;
  }
  /// Resuming: the next reset() starts epoch `epoch` at this process's
  /// sample `position` instead of its beginning (what was seen is skipped).
  void resume_at(std::size_t epoch, std::size_t position) {
    set_epoch(epoch);
    state_->skip = position;
  }
  /// The epoch running (or, before the first pass, the one the next pass runs).
  std::size_t epoch() const { return state_->epoch; }
  /// Samples in the whole data set.
  std::size_t size() const { return state_->size; }
  /// Number of parts (processes).
  int processes() const { return state_->processes; }
  /// This process's part.
  int rank() const { return state_->rank; }
  /// Whether every epoch is reshuffled.
  bool shuffle() const { return state_->shuffle; }
  /// Seed of the shuffle (with the epoch).
  std::uint64_t seed() const { return state_->seed; }
  /// Samples this process gets per epoch: ceil(size / processes).
  std::size_t local_size() const {
    const auto parts = static_cast<std::size_t>(state_->processes);
    return (state_->size + parts - 1) / parts;
  }
  /// This epoch's indices of this process, in order.
  const std::vector<std::size_t>& indices() {
    if (!state_->started) reset();
    return state_->indices;
  }

  /// Saves the epoch and the place in it.
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("epoch", torch::tensor(static_cast<std::int64_t>(state_->epoch)), /*is_buffer=*/true);
    archive.write("position", torch::tensor(static_cast<std::int64_t>(state_->position)), /*is_buffer=*/true);
  }
  /// Loads what save() wrote.
  void load(torch::serialize::InputArchive& archive) override {
    torch::Tensor epoch = torch::empty(1, torch::kInt64);
    torch::Tensor position = torch::empty(1, torch::kInt64);
    archive.read("epoch", epoch, /*is_buffer=*/true);
    archive.read("position", position, /*is_buffer=*/true);
    state_->epoch = static_cast<std::size_t>(epoch.item<std::int64_t>());
    state_->started = true;
    state_->skip = 0;
    build();
    state_->position = std::min(state_->indices.size(), static_cast<std::size_t>(position.item<std::int64_t>()));
  }

 private:
  struct State {
    std::size_t size = 0;
    int processes = 1;
    int rank = 0;
    bool shuffle = true;
    std::uint64_t seed = 0;
    std::size_t epoch = 0;
    bool started = false;
    std::size_t position = 0;
    std::size_t skip = 0;  // where the next reset() starts (resume_at)
    std::vector<std::size_t> indices;
  };

  void build() {
    State& s = *state_;
    std::vector<std::size_t> order(s.size);
    std::iota(order.begin(), order.end(), std::size_t{0});
    if (s.shuffle) {
      // std::shuffle's algorithm is the library's choice; this one is fixed,
      // so every process (and every standard library) draws the same order.
      std::mt19937_64 generator(s.seed + s.epoch);
      for (std::size_t i = order.size(); i > 1; --i) {
        const std::size_t j = static_cast<std::size_t>(generator() % i);
        std::swap(order[i - 1], order[j]);
      }
    }
    const std::size_t total = local_size() * static_cast<std::size_t>(s.processes);
    for (std::size_t i = 0; order.size() < total && s.size > 0; ++i) order.push_back(order[i % s.size]);
    s.indices.clear();
    for (std::size_t i = static_cast<std::size_t>(s.rank); i < order.size(); i += static_cast<std::size_t>(s.processes)) {
      s.indices.push_back(order[i]);
    }
    s.position = 0;
  }

  std::shared_ptr<State> state_;
};

}  // namespace multigpu
