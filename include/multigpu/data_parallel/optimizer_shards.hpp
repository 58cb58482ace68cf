#pragma once
// Sharded optimizer state (DataParallelOptions::shard_optimizer_state): which
// replica owns each parameter's optimizer state, a pure function tested on
// its own, and the check of the optimizers that can be sharded. The
// mechanism is DataParallelCore's (data_parallel/core.hpp).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <numeric>
#include <string>
#include <typeinfo>
#include <vector>

#include <c10/util/Type.h>
#include <fmt/core.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/output-archive.h>

#include "multigpu/error.hpp"

namespace multigpu {
namespace detail {

// Note [Sharded optimizer state]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Unsharded, every replica's optimizer holds state (Adam's two moments, SGD's
// momentum) for every parameter: K replicas pay K times what one device
// pays. With DataParallelOptions::shard_optimizer_state each parameter has
// one owner among the replicas, and only the owner's optimizer holds its
// state (ZeRO stage 1, as PyTorch's ZeroRedundancyOptimizer in Python):
//
// - Owners are a pure function of the parameters' sizes
//   (assign_parameter_owners): largest first, each to the replica that owns
//   the fewest bytes so far, the lower replica on a tie. Frozen parameters
//   weigh nothing. The same sizes give the same owners on every replica and
//   every run, so nothing needs to be agreed.
// - The optimizers are built as unsharded ones (make_optimizer's options
//   and factory forms alike, with the usual checks), then each replica's
//   optimizer keeps, in each parameter group, only the parameters it owns
//   (a group may become empty), and drops any state made for the others
//   (Adagrad makes its state at construction). Groups keep their options, so
//   any torch::optim optimizer whose state is per parameter works; the
//   primary's groups still carry the options that the followers take before
//   each step (Note [The primary's optimizer options rule]), so learning-rate
//   schedules set on dp.optimizer() work as before. An optimizer whose state
//   spans parameters (LBFGS keeps one history over all of them) cannot be
//   split and is refused when it is made.
// - A step: the gradients are all-reduced as before (every replica holds
//   the averaged gradient, so clip_grad_norm's global norm and a
//   GradScaler's overflow check need nothing new), each replica's
//   optimizer steps its share only, and then every parameter of the stepped
//   optimizers is broadcast from its owner. The owner's arithmetic is the
//   unsharded replica's, and the broadcast copies bits, so sharded training
//   gives exactly the unsharded parameters.
// - What reads an optimizer's parameters (zero_grad(name), checkpoints)
//   uses the groups as they were built, kept beside the optimizers.
// - Checkpoints stay layout-independent: to save, each owner's state
//   entries are moved (pointers, no copies) into the primary's optimizer
//   with its groups put back whole, the primary saves the usual LibTorch
//   archive, and everything is moved back. To load, each replica's
//   optimizer loads the archive with its whole groups and then drops what
//   it does not own. So a checkpoint loads sharded or not, on any number of
//   replicas, with the usual all-or-nothing rule.
// - One replica in one process has nothing to shard; across processes
//   the option is refused for now (owners would span ranks, and a
//   checkpoint would have to be gathered over processes).
// Not yet: reduce-scattering the gradients to their owners (ZeRO-2), and
// loading without a whole copy of the state on each replica for a moment.

/// The replica (0..replicas-1) that owns each parameter's optimizer state,
/// given each parameter's size in bytes: balanced by bytes, deterministic.
inline std::vector<std::size_t> assign_parameter_owners(const std::vector<std::int64_t>& bytes,
                                                        std::size_t replicas) {
  if (replicas == 0) throw Error("assign_parameter_owners: there must be at least one replica");
  std::vector<std::size_t> order(bytes.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return bytes[a] > bytes[b]; });
  std::vector<std::int64_t> load(replicas, 0);
  std::vector<std::size_t> owners(bytes.size(), 0);
  for (const std::size_t i : order) {
    std::size_t lightest = 0;
    for (std::size_t r = 1; r < replicas; ++r) {
      if (load[r] < load[lightest]) lightest = r;
    }
    owners[i] = lightest;
    load[lightest] += bytes[i];
  }
  return owners;
}

/// Throws Error when `optimizer` keeps state across parameters, which
/// cannot be split among owners (LBFGS). `what` is the call that asked.
inline void check_shardable(const torch::optim::Optimizer& optimizer, const std::string& what) {
  if (dynamic_cast<const torch::optim::LBFGS*>(&optimizer) == nullptr) return;
  throw Error(fmt::format("{}: {} keeps one state across all its parameters, which cannot be split among replicas: "
                          "DataParallelOptions::shard_optimizer_state needs an optimizer with state per parameter "
                          "(SGD, Adam, AdamW, Adagrad, RMSprop); turn sharding off to use it",
                          what, c10::demangle(typeid(optimizer).name())));
}

/// The bytes of the tensors in one parameter's optimizer state: exact for
/// LibTorch's SGD, Adam, AdamW, Adagrad and RMSprop; for another class, the
/// size of what its serialize() writes (its tensors and a little more).
inline std::int64_t optimizer_param_state_bytes(const torch::optim::OptimizerParamState& state) {
  const auto bytes = [](std::initializer_list<at::Tensor> tensors) {
    std::int64_t total = 0;
    for (const auto& t : tensors) {
      if (t.defined()) total += static_cast<std::int64_t>(t.numel() * t.element_size());
    }
    return total;
  };
  if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(&state)) {
    return bytes({sgd->momentum_buffer()});
  }
  if (const auto* adam = dynamic_cast<const torch::optim::AdamParamState*>(&state)) {
    return bytes({adam->exp_avg(), adam->exp_avg_sq(), adam->max_exp_avg_sq()});
  }
  if (const auto* adamw = dynamic_cast<const torch::optim::AdamWParamState*>(&state)) {
    return bytes({adamw->exp_avg(), adamw->exp_avg_sq(), adamw->max_exp_avg_sq()});
  }
  if (const auto* adagrad = dynamic_cast<const torch::optim::AdagradParamState*>(&state)) {
    return bytes({adagrad->sum()});
  }
  if (const auto* rmsprop = dynamic_cast<const torch::optim::RMSpropParamState*>(&state)) {
    return bytes({rmsprop->square_avg(), rmsprop->momentum_buffer(), rmsprop->grad_avg()});
  }
  torch::serialize::OutputArchive archive;
  state.serialize(archive);
  std::ostringstream written;
  archive.save_to(written);
  return static_cast<std::int64_t>(written.tellp());
}

}  // namespace detail
}  // namespace multigpu
