#pragma once
// A small model and helpers shared by the mixed-precision tests
// (test_grad_scaler.cpp, test_comm_hook.cpp) and test_program_shapes.cpp.
// Include support.hpp first.

#include <algorithm>
#include <cstddef>
#include <vector>

#include <torch/torch.h>

namespace multigpu_test {
namespace small_net {

struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

inline std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

inline torch::Tensor mse(NetImpl& net, const torch::data::Example<>& shard) {
  return torch::mse_loss(net.forward(shard.data), shard.target);
}

inline void copy_parameters(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto source = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(source[p.key()]);
}

/// The largest difference between the same-named parameters of two modules.
inline double max_difference(const torch::nn::Module& a, const torch::nn::Module& b) {
  double worst = 0;
  auto theirs = b.named_parameters();
  for (const auto& p : a.named_parameters()) {
    worst = std::max(worst, (p.value() - theirs[p.key()]).abs().max().item<double>());
  }
  return worst;
}

}  // namespace small_net
}  // namespace multigpu_test
