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

#include <algorithm>
#include <cstddef>
#include <cstdint>
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

class DistributedSampler : public torch::data::samplers::Sampler<std::vector<std::size_t>> {
 public:
  /// `size` samples, `processes` parts, this process's part `rank`.
  /// `shuffle` off: the parts are strided slices of 0..size-1, in order.
  DistributedSampler(std::size_t size, int processes, int rank, bool shuffle = true, std::uint64_t seed = 0)
      : size_(size), processes_(processes), rank_(rank), shuffle_(shuffle), seed_(seed) {
    if (processes < 1) throw Error(fmt::format("DistributedSampler: {} processes; it needs at least 1", processes));
    if (rank < 0 || rank >= processes) {
      throw Error(fmt::format("DistributedSampler: rank {} is out of range for {} processes: valid ranks are 0..{}",
                              rank, processes, processes - 1));
    }
  }

  // c10::optional, not std::optional: the base class's type in LibTorch 1.13
  // (2.x makes it an alias of std::optional).
  /// Starts the next epoch (the loader calls it at the start of every pass).
  void reset(c10::optional<std::size_t> new_size = c10::nullopt) override {
    if (new_size) size_ = *new_size;
    epoch_ = started_ ? epoch_ + 1 : epoch_;
    started_ = true;
    build();
  }

  c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override {
    if (!started_) reset();
    if (position_ >= indices_.size()) return c10::nullopt;
    const std::size_t end = std::min(indices_.size(), position_ + batch_size);
    std::vector<std::size_t> batch(indices_.begin() + static_cast<std::ptrdiff_t>(position_),
                                   indices_.begin() + static_cast<std::ptrdiff_t>(end));
    position_ = end;
    return batch;
  }

  /// The epoch the next reset() starts (for resuming a run).
  void set_epoch(std::size_t epoch) {
    epoch_ = epoch;
    started_ = false;
  }
  std::size_t epoch() const { return epoch_; }
  /// Samples this process gets per epoch: ceil(size / processes).
  std::size_t local_size() const {
    const auto parts = static_cast<std::size_t>(processes_);
    return (size_ + parts - 1) / parts;
  }
  /// This epoch's indices of this process, in order.
  const std::vector<std::size_t>& indices() {
    if (!started_) reset();
    return indices_;
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("epoch", torch::tensor(static_cast<std::int64_t>(epoch_)), /*is_buffer=*/true);
    archive.write("position", torch::tensor(static_cast<std::int64_t>(position_)), /*is_buffer=*/true);
  }
  void load(torch::serialize::InputArchive& archive) override {
    torch::Tensor epoch = torch::empty(1, torch::kInt64);
    torch::Tensor position = torch::empty(1, torch::kInt64);
    archive.read("epoch", epoch, /*is_buffer=*/true);
    archive.read("position", position, /*is_buffer=*/true);
    epoch_ = static_cast<std::size_t>(epoch.item<std::int64_t>());
    started_ = true;
    build();
    position_ = std::min(indices_.size(), static_cast<std::size_t>(position.item<std::int64_t>()));
  }

 private:
  void build() {
    std::vector<std::size_t> order(size_);
    std::iota(order.begin(), order.end(), std::size_t{0});
    if (shuffle_) {
      // std::shuffle's algorithm is the library's choice; this one is fixed,
      // so every process (and every standard library) draws the same order.
      std::mt19937_64 generator(seed_ + epoch_);
      for (std::size_t i = order.size(); i > 1; --i) {
        const std::size_t j = static_cast<std::size_t>(generator() % i);
        std::swap(order[i - 1], order[j]);
      }
    }
    const std::size_t total = local_size() * static_cast<std::size_t>(processes_);
    for (std::size_t i = 0; order.size() < total && size_ > 0; ++i) order.push_back(order[i % size_]);
    indices_.clear();
    for (std::size_t i = static_cast<std::size_t>(rank_); i < order.size(); i += static_cast<std::size_t>(processes_)) {
      indices_.push_back(order[i]);
    }
    position_ = 0;
  }

  std::size_t size_;
  int processes_;
  int rank_;
  bool shuffle_;
  std::uint64_t seed_;
  std::size_t epoch_ = 0;
  bool started_ = false;
  std::size_t position_ = 0;
  std::vector<std::size_t> indices_;
};

}  // namespace multigpu
