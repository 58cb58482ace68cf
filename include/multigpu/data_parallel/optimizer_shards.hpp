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
#include <utility>
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
//   and factory forms alike, with the usual checks) and keep their whole
//   groups: dp.optimizer().param_groups() lists every parameter, as
//   unsharded, so what a user's code reads there (a scheduler, a loop over
//   the parameters) is unchanged. Each replica's optimizer drops the state
//   made for parameters it does not own (Adagrad makes it when built), and
//   only for its step its groups hold its share (OwnedShare: a group may be
//   empty there). Groups keep their options, and the primary's still reach
//   the followers before each step (Note [The primary's optimizer options
//   rule]), so learning-rate schedules work as before; a parameter group
//   added to every replica's optimizer later is sharded the same way. Any
//   torch::optim optimizer whose step treats each parameter on its own
//   works. Not one that keeps state across parameters (LBFGS keeps one
//   history over all of them): it is refused when it is made. Nor, silently,
//   a user's class whose step reads a quantity over a whole group (a norm of
//   all its parameters): each replica would compute it over its share.
// - A step: the gradients are all-reduced as before (every replica holds
//   the averaged gradient, so clip_grad_norm's global norm and a
//   GradScaler's overflow check need nothing new), each replica's
//   optimizer steps its share only, and then every parameter of the stepped
//   optimizers is broadcast from its owner. The owner's arithmetic is the
//   unsharded replica's, and the broadcast copies bits, so sharded training
//   gives exactly the unsharded parameters.
// - Checkpoints stay layout-independent: to save, each owner's state
//   entries are moved (pointers, no copies) into the primary's optimizer,
//   the primary saves the usual LibTorch archive, and every entry goes back
//   to its owner, whether the save worked or threw. To load, each replica's
//   optimizer loads the archive and then drops what it does not own. So a
//   checkpoint loads sharded or not, on any number of replicas, with the
//   usual all-or-nothing rule.
// - One replica in one process has nothing to shard; across processes
//   the option is refused for now (owners would span ranks, and a
//   checkpoint would have to be gathered over processes).
// Not yet: reduce-scattering the gradients to their owners (ZeRO-2),
// saving without the whole state serialized in host memory, loading without
// a whole copy of it on each replica for a moment, and one broadcast per
// owner instead of one per parameter.

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

/// While it lives, `optimizer`'s groups hold only the parameters that
/// `owned` accepts (a replica's share, for its step); then the whole groups
/// again, so that what reads param_groups() between steps sees them all.
class OwnedShare {
 public:
  template <class Owned>
  OwnedShare(torch::optim::Optimizer& optimizer, const Owned& owned) : optimizer_(optimizer) {
    std::vector<std::vector<at::Tensor>> shares;  // all made before any group changes: `owned` may throw
    for (const auto& group : optimizer_.param_groups()) {
      shares.emplace_back();
      for (const auto& p : group.params()) {
        if (owned(p)) shares.back().push_back(p);
      }
    }
    for (std::size_t g = 0; g < shares.size(); ++g) {
      whole_.push_back(std::exchange(optimizer_.param_groups()[g].params(), std::move(shares[g])));
    }
  }
  ~OwnedShare() {
    for (std::size_t g = 0; g < whole_.size(); ++g) optimizer_.param_groups()[g].params() = std::move(whole_[g]);
  }
  OwnedShare(const OwnedShare&) = delete;
  OwnedShare& operator=(const OwnedShare&) = delete;

 private:
  torch::optim::Optimizer& optimizer_;
  std::vector<std::vector<at::Tensor>> whole_;
};

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
