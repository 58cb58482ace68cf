#pragma once
// One small, deterministic training run, shared by the multi-process worker
// and the tests that check it: the same model, data and optimizer whether it
// runs as one plain model, one process with K replicas, or P processes.

#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace multigpu_test {

struct RecipeNetImpl : torch::nn::Cloneable<RecipeNetImpl> {
  RecipeNetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(RecipeNet);

/// The initial model. Each process may pass its own seed: training must
/// still start from rank 0's parameters (broadcast at construction).
inline RecipeNet recipe_model(std::uint64_t seed) {
  torch::manual_seed(seed);
  return RecipeNet();
}

constexpr std::uint64_t kRecipeSeed = 1;
constexpr std::int64_t kRecipeBatch = 24;  // divisible by 2, 4 and 8: every layout sees the same shards

/// Step `step`'s whole batch: inputs and targets.
inline std::pair<torch::Tensor, torch::Tensor> recipe_batch(int step) {
  auto generator = at::detail::createCPUGenerator(static_cast<std::uint64_t>(1000 + step));
  auto x = torch::randn({kRecipeBatch, 8}, generator, torch::kFloat);
  auto y = torch::randn({kRecipeBatch, 2}, generator, torch::kFloat);
  return {x, y};
}

/// Rows [rank * B / processes, (rank + 1) * B / processes): one process's part.
inline torch::Tensor part_of(const torch::Tensor& whole, int processes, int rank) {
  const std::int64_t rows = whole.size(0) / processes;
  return whole.narrow(0, rank * rows, rows);
}

/// `summed`: the loss is a sum over the samples (LossReduction::kSum), with a
/// learning rate scaled down by the batch size to match.
inline torch::optim::SGDOptions recipe_optimizer(bool summed = false) {
  return torch::optim::SGDOptions(summed ? 0.1 / static_cast<double>(kRecipeBatch) : 0.1).momentum(0.9);
}

inline torch::Tensor recipe_loss(RecipeNetImpl& net, const torch::Tensor& x, const torch::Tensor& y,
                                 bool summed = false) {
  return torch::mse_loss(net.forward(x), y, summed ? at::Reduction::Sum : at::Reduction::Mean);
}

/// A program in phases: step 0 reaches the whole model, the later steps fc2
/// only (fc1's output detached), so fc1's gradients are what zero_grad left.
inline torch::Tensor recipe_phase_loss(RecipeNetImpl& net, const torch::Tensor& x, const torch::Tensor& y, int step) {
  if (step == 0) return recipe_loss(net, x, y);
  return torch::mse_loss(net.fc2(torch::tanh(net.fc1(x)).detach()), y);
}

/// The phases' optimizer: weight decay and momentum move a parameter whose
/// gradient is zero, and skip one whose gradient is None.
inline torch::optim::SGDOptions recipe_phase_optimizer() { return recipe_optimizer().weight_decay(0.1); }

/// Every parameter, flattened and concatenated, for comparisons.
inline torch::Tensor flat_parameters(torch::nn::Module& module) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : module.parameters()) parts.push_back(p.detach().flatten());
  return torch::cat(parts);
}

/// The recipe with a BatchNorm, in float64 (SyncBatchNorm's tests): the
/// workers convert it with multigpu::convert_sync_batchnorm.
inline torch::nn::Sequential recipe_bn_model(std::uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Sequential net(torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16), torch::nn::Tanh(),
                            torch::nn::Linear(16, 2));
  net->to(torch::kDouble);
  return net;
}

/// Every parameter and buffer, as float64, flattened and concatenated.
inline torch::Tensor flat_state(torch::nn::Module& module) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : module.parameters()) parts.push_back(p.detach().flatten().to(torch::kDouble));
  for (const auto& b : module.buffers()) parts.push_back(b.detach().flatten().to(torch::kDouble));
  return torch::cat(parts);
}

}  // namespace multigpu_test
