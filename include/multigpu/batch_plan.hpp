#pragma once
/// @file
/// Batch planning: how a batch's samples are split over replicas (evenly,
/// or by weights), and how an optimizer step's samples are spread over
/// devices and gradient-accumulation micro-steps. Pure functions over
/// sizes; scatter.hpp cuts the batch itself.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/error.hpp"

namespace multigpu {

/// Splits `total` samples over `parts` replicas: sizes differ by at most one
/// and the first replicas take the remainder (10 over 4 → 3,3,2,2).
std::vector<std::int64_t> split_batch(std::int64_t total, std::size_t parts);

/// Splits `total` samples in proportion to `weights` (largest remainder,
/// ties to the lower index). Weights are finite and >= 0, with a positive sum.
std::vector<std::int64_t> split_batch(std::int64_t total, const std::vector<double>& weights);

/// How one optimizer step's samples are spread over devices and micro-steps.
struct BatchPlan {
  std::int64_t effective_batch = 0;  ///< Samples per optimizer step.
  int accumulation_steps = 1;        ///< Micro-steps (forward/backward) per optimizer step.
  /// per_device[s][d]: samples device d takes in micro-step s.
  std::vector<std::vector<std::int64_t>> per_device;
  /// Samples in micro-step s, over all devices.
  std::int64_t micro_batch(std::size_t step) const;
  /// The largest share any device takes in any micro-step.
  std::int64_t largest_share() const;
  /// "effective batch 16 = 2 accumulation steps x 8 (4 devices x 2)".
  std::string describe() const;
};

/// Plans an optimizer step of `effective_batch` samples over `devices`
/// devices, none taking more than `max_per_device` samples at once (0: no
/// limit; e.g. what fits in its memory), with as few gradient-accumulation
/// micro-steps as that allows. Optional `weights` give faster devices more.
BatchPlan plan_batch(std::int64_t effective_batch, std::size_t devices,
                     std::int64_t max_per_device = 0, const std::vector<double>& weights = {});

// ---------------------------------------------------------------------------
// Definitions

inline std::vector<std::int64_t> split_batch(std::int64_t total, std::size_t parts) {
  if (parts == 0) throw Error("split_batch: cannot split over 0 parts");
  if (total < 0) throw Error(fmt::format("split_batch: batch size must be 0 or more, got {}", total));
  const auto n = static_cast<std::int64_t>(parts);
  std::vector<std::int64_t> sizes(parts, total / n);
  for (std::int64_t i = 0; i < total % n; ++i) ++sizes[static_cast<std::size_t>(i)];
  return sizes;
}

inline std::vector<std::int64_t> split_batch(std::int64_t total, const std::vector<double>& weights) {
  if (weights.empty()) throw Error("split_batch: no weights given");
  if (total < 0) throw Error(fmt::format("split_batch: batch size must be 0 or more, got {}", total));
  double sum = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (!std::isfinite(weights[i]) || weights[i] < 0) {
      throw Error(fmt::format("split_batch: weight {} is {}; weights must be finite and 0 or more", i, weights[i]));
    }
    sum += weights[i];
  }
  if (!(sum > 0)) throw Error("split_batch: the weights add up to 0; give at least one positive weight");
  std::vector<std::int64_t> sizes(weights.size());
  std::vector<std::pair<double, std::size_t>> remainders;
  std::int64_t assigned = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    const double exact = static_cast<double>(total) * weights[i] / sum;
    sizes[i] = static_cast<std::int64_t>(std::floor(exact));
    assigned += sizes[i];
    remainders.emplace_back(exact - std::floor(exact), i);
  }
  std::stable_sort(remainders.begin(), remainders.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (std::size_t k = 0; assigned < total; k = (k + 1) % remainders.size()) {
    if (weights[remainders[k].second] > 0) {
      ++sizes[remainders[k].second];
      ++assigned;
    }
  }
  return sizes;
}

inline std::int64_t BatchPlan::micro_batch(std::size_t step) const {
  const auto& shares = per_device.at(step);
  return std::accumulate(shares.begin(), shares.end(), std::int64_t{0});
}

inline std::int64_t BatchPlan::largest_share() const {
  std::int64_t largest = 0;
  for (const auto& step : per_device) {
    for (auto share : step) largest = std::max(largest, share);
  }
  return largest;
}

inline std::string BatchPlan::describe() const {
  const std::size_t devices = per_device.empty() ? 0 : per_device.front().size();
  const std::int64_t micro = per_device.empty() ? 0 : micro_batch(0);
  bool uniform = true;
  for (const auto& step : per_device) {
    for (auto share : step) uniform = uniform && share == per_device.front().front();
  }
  std::string split = uniform ? fmt::format("{} devices x {}", devices, per_device.front().front())
                              : fmt::format("over {} devices, at most {} each", devices, largest_share());
  if (accumulation_steps == 1) return fmt::format("effective batch {} = {} ({})", effective_batch, micro, split);
  return fmt::format("effective batch {} = {} accumulation steps x {}{} ({})", effective_batch, accumulation_steps,
                     uniform ? "" : "up to ", micro, split);
}

inline BatchPlan plan_batch(std::int64_t effective_batch, std::size_t devices, std::int64_t max_per_device,
                            const std::vector<double>& weights) {
  if (effective_batch < 1) {
    throw Error(fmt::format("plan_batch: effective batch must be 1 or more, got {}", effective_batch));
  }
  if (devices == 0) throw Error("plan_batch: needs at least one device");
  if (max_per_device < 0) {
    throw Error(fmt::format("plan_batch: max_per_device must be 0 (no limit) or more, got {}", max_per_device));
  }
  if (!weights.empty() && weights.size() != devices) {
    throw Error(fmt::format("plan_batch: {} weights for {} devices", weights.size(), devices));
  }
  if (!weights.empty()) split_batch(effective_batch, weights);  // throws for bad weights
  auto split_step = [&](std::int64_t samples) {
    return weights.empty() ? split_batch(samples, devices) : split_batch(samples, weights);
  };
  const auto n = static_cast<std::int64_t>(devices);
  std::int64_t steps = 1;
  if (max_per_device > 0) {
    // Start from the fewest micro-steps that could work: the whole batch over
    // every device's limit, and the heaviest weighted device's share.
    steps = (effective_batch + n * max_per_device - 1) / (n * max_per_device);
    if (!weights.empty()) {
      const double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
      const double heaviest = *std::max_element(weights.begin(), weights.end()) / sum;
      const auto weighted = static_cast<std::int64_t>(
          std::floor(static_cast<double>(effective_batch) * heaviest / static_cast<double>(max_per_device)));
      steps = std::max(steps, std::max<std::int64_t>(weighted, 1));
    }
  }
  while (true) {
    BatchPlan plan;
    plan.effective_batch = effective_batch;
    plan.accumulation_steps = static_cast<int>(steps);
    for (auto micro : split_batch(effective_batch, static_cast<std::size_t>(steps))) {
      plan.per_device.push_back(split_step(micro));
    }
    if (max_per_device == 0 || plan.largest_share() <= max_per_device) return plan;
    ++steps;  // uneven weights overfilled a device: one more micro-step
  }
}

}  // namespace multigpu
