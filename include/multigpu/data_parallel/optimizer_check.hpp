#pragma once
// The check of the optimizers a user's factory built, one per replica
// (DataParallel::make_optimizer(factory)): a pure function over the
// replicas' parameters and the optimizers, tested on its own.

#include <cstddef>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Type.h>
#include <fmt/core.h>
#include <torch/optim/optimizer.h>

#include "multigpu/detail/tensor_text.hpp"
#include "multigpu/error.hpp"

namespace multigpu {
namespace detail {

// Note [Optimizers the user builds]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// make_optimizer(factory) calls the factory once per replica with that
// replica's module, so that any parameter groups and any Optimizer subclass
// can be had. The replicas then step in lockstep only if every optimizer is
// the primary's twin: over its own replica's parameters (a factory that
// captured your module instead of using its argument would step replica 0's
// parameters K times), each parameter once, the same class, the same groups
// holding the same parameters in the same order. Group g of every follower
// takes the options of the primary's group g before each step (Note [The
// primary's optimizer options rule]), and checkpoints map state group by
// group, position by position: both rely on that twin structure. It is
// checked here once, when the optimizers are made; nothing is changed
// unless every check passes.

/// Throws Error unless `optimizers[r]` (one per replica) holds only
/// parameters of replica r, each once, and every optimizer has the
/// primary's class and groups. `parameters[r][i]` is replica r's i-th
/// parameter, named `names[i]`. `what` is the call that asked, for messages.
inline void check_replica_optimizers(const std::string& what, const std::vector<std::string>& names,
                                     const std::vector<std::vector<at::Tensor>>& parameters,
                                     const std::vector<c10::Device>& devices,
                                     const std::vector<const torch::optim::Optimizer*>& optimizers) {
  const auto replica = [&](std::size_t r) {
    return r == 0 ? fmt::format("replica 0 ({}, your module)", devices.at(0).str())
                  : fmt::format("replica {} ({})", r, devices.at(r).str());
  };
  const std::string unchanged = "; the previous optimizers are unchanged";
  // Where each parameter tensor lives: (replica, index).
  std::unordered_map<const void*, std::pair<std::size_t, std::size_t>> owner;
  for (std::size_t r = 0; r < parameters.size(); ++r) {
    for (std::size_t i = 0; i < parameters[r].size(); ++i) {
      owner.emplace(parameters[r][i].unsafeGetTensorImpl(), std::make_pair(r, i));
    }
  }
  // Every optimizer, as the parameter indices of each group.
  std::vector<std::vector<std::vector<std::size_t>>> layout(optimizers.size());
  for (std::size_t r = 0; r < optimizers.size(); ++r) {
    if (optimizers[r] == nullptr) {
      throw Error(fmt::format("{}: the factory returned no optimizer for {}; it must return a std::unique_ptr to an "
                              "optimizer over the parameters of the module it is given{}",
                              what, replica(r), unchanged));
    }
    std::unordered_map<std::size_t, std::size_t> group_of;  // parameter index -> first group holding it
    const auto& groups = optimizers[r]->param_groups();
    for (std::size_t g = 0; g < groups.size(); ++g) {
      std::vector<std::size_t> indices;
      const auto& params = groups[g].params();
      for (std::size_t j = 0; j < params.size(); ++j) {
        const auto found = owner.find(params[j].unsafeGetTensorImpl());
        if (found == owner.end()) {
          throw Error(fmt::format(
              "{}: the optimizer of {} holds, in parameter group {} (position {}), a tensor of shape {} that is "
              "not a parameter of that replica: an optimizer may hold only the parameters of the module the "
              "factory is given (its named_parameters()){}",
              what, replica(r), g, j, shape_text(params[j].sizes()), unchanged));
        }
        const auto [where, index] = found->second;
        if (where != r) {
          throw Error(fmt::format(
              "{}: the optimizer of {} holds, in parameter group {}, parameter \"{}\" of {}: build each optimizer "
              "over the module the factory is given (its argument), not over a module it captured{}",
              what, replica(r), g, names.at(index), replica(where), unchanged));
        }
        const auto [previous, fresh] = group_of.emplace(index, g);
        if (!fresh) {
          throw Error(fmt::format("{}: the optimizer of {} holds parameter \"{}\" twice, in parameter group {} and "
                                  "in parameter group {}: put each parameter in one group, once{}",
                                  what, replica(r), names.at(index), previous->second, g, unchanged));
        }
        indices.push_back(index);
      }
      layout[r].push_back(std::move(indices));
    }
  }
  // Every follower is the primary's twin.
  for (std::size_t r = 1; r < optimizers.size(); ++r) {
    if (typeid(*optimizers[r]) != typeid(*optimizers[0])) {
      throw Error(fmt::format("{}: the optimizer of {} is a {}, the primary's ({}) a {}: the factory must build the "
                              "same optimizer class for every replica{}",
                              what, replica(r), c10::demangle(typeid(*optimizers[r]).name()), replica(0),
                              c10::demangle(typeid(*optimizers[0]).name()), unchanged));
    }
    if (layout[r].size() != layout[0].size()) {
      throw Error(fmt::format("{}: the optimizer of {} has {} parameter groups, the primary's ({}) has {}: the "
                              "factory must build the same groups for every replica{}",
                              what, replica(r), layout[r].size(), replica(0), layout[0].size(), unchanged));
    }
    for (std::size_t g = 0; g < layout[r].size(); ++g) {
      const auto& mine = layout[r][g];
      const auto& primary = layout[0][g];
      if (mine.size() != primary.size()) {
        throw Error(fmt::format("{}: parameter group {} of {}'s optimizer holds {} parameters, the primary's ({}) "
                                "holds {}: every replica's group must hold the same parameters, in the same order{}",
                                what, g, replica(r), mine.size(), replica(0), primary.size(), unchanged));
      }
      for (std::size_t j = 0; j < mine.size(); ++j) {
        if (mine[j] != primary[j]) {
          throw Error(fmt::format("{}: parameter group {} of {}'s optimizer holds \"{}\" at position {}, where the "
                                  "primary's ({}) holds \"{}\": every replica's group must hold the same "
                                  "parameters, in the same order{}",
                                  what, g, replica(r), names.at(mine[j]), j, replica(0), names.at(primary[j]),
                                  unchanged));
        }
      }
    }
  }
}

}  // namespace detail
}  // namespace multigpu
