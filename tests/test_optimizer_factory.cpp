// DataParallel::make_optimizer(factory): optimizers the user builds, with
// parameter groups and of any class, against the one-device program in
// float64; every bad factory refused with nothing changed. See Note
// [Optimizers the user builds] in multigpu/data_parallel/optimizer_check.hpp.

#include "support.hpp"  // first: see its comment

#include <cstdio>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

using multigpu::DataParallel;
using multigpu_test::contains;

namespace {

struct TwoLayerImpl : torch::nn::Cloneable<TwoLayerImpl> {
  TwoLayerImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 8));
    fc2 = register_module("fc2", torch::nn::Linear(8, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(TwoLayer);

std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

torch::Tensor mse(TwoLayerImpl& net, const torch::data::Example<>& shard) {
  return torch::mse_loss(net.forward(shard.data), shard.target);
}

torch::data::Example<> make_batch(std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}, torch::kFloat64), torch::randn({n, 3}, torch::kFloat64)};
}

/// A float64 model and an identical copy for the one-device program.
std::pair<TwoLayer, TwoLayer> twin_models() {
  torch::manual_seed(3);
  TwoLayer net;
  net->to(torch::kFloat64);
  TwoLayer plain = std::dynamic_pointer_cast<TwoLayerImpl>(net->clone());
  return {net, plain};
}

double max_difference(const torch::nn::Module& a, const torch::nn::Module& b) {
  double worst = 0;
  auto theirs = b.named_parameters();
  for (const auto& p : a.named_parameters()) {
    worst = std::max(worst, (p.value() - theirs[p.key()]).abs().max().item<double>());
  }
  return worst;
}

// Weights with weight decay at one rate, biases without at another: the recipe.
std::vector<torch::optim::OptimizerParamGroup> adamw_groups(TwoLayerImpl& net) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{net.fc1->weight, net.fc2->weight},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.01).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{net.fc1->bias, net.fc2->bias},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.03).weight_decay(0)));
  return groups;
}

std::unique_ptr<torch::optim::AdamW> make_adamw(TwoLayerImpl& net) {
  return std::make_unique<torch::optim::AdamW>(adamw_groups(net), torch::optim::AdamWOptions(0.02));
}

// The per-group schedule, set on the primary's groups between steps.
void schedule(torch::optim::Optimizer& optimizer, int step) {
  auto& groups = optimizer.param_groups();
  groups[0].options().set_lr(0.01 * (1.0 - 0.05 * step));
  groups[1].options().set_lr(0.03 * (step % 2 == 0 ? 1.0 : 0.5));
}

// A user's own optimizer with its own constructor: heavy-ball momentum with
// a learning rate per group.
struct MomentumOptions : torch::optim::OptimizerCloneableOptions<MomentumOptions> {
  explicit MomentumOptions(double lr = 0.1) : lr_(lr) {}
  double get_lr() const override { return lr_; }
  void set_lr(const double lr) override { lr_ = lr; }
  double lr_;
};

class HeavyBall : public torch::optim::Optimizer {
 public:
  HeavyBall(const std::vector<torch::optim::OptimizerParamGroup>& groups, double lr, double beta)
      : Optimizer(groups, std::make_unique<MomentumOptions>(lr)), beta_(beta) {}
  torch::Tensor step(LossClosure /*closure*/ = nullptr) override {
    torch::NoGradGuard no_grad;
    for (auto& group : param_groups()) {
      const double lr = group.options().get_lr();
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        auto& buffer = velocity_[p.unsafeGetTensorImpl()];
        buffer = buffer.defined() ? buffer.mul(beta_).add(p.grad()) : p.grad().clone();
        p.sub_(buffer, lr);
      }
    }
    return {};
  }

 private:
  double beta_;
  std::unordered_map<void*, torch::Tensor> velocity_;
};

std::unique_ptr<HeavyBall> make_heavy_ball(TwoLayerImpl& net) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(net.fc1->parameters(), std::make_unique<MomentumOptions>(0.05));
  groups.emplace_back(net.fc2->parameters(), std::make_unique<MomentumOptions>(0.2));
  return std::make_unique<HeavyBall>(groups, 0.1, 0.9);
}

/// K replicas with `make(replica)` against the one-device program with
/// `make(plain)`, under the per-group schedule, to 1e-10.
template <class Make>
void check_equivalence(std::size_t replicas, std::int64_t batch_size, Make make) {
  CAPTURE(replicas);
  CAPTURE(batch_size);
  auto [net, plain] = twin_models();
  auto reference = make(*plain);
  DataParallel<TwoLayer> dp(net, cpus(replicas));
  auto& optimizer = dp.make_optimizer(make);
  static_assert(std::is_same<decltype(optimizer), decltype(*reference)>::value, "typed as the factory returns");
  for (int step = 0; step < 8; ++step) {
    schedule(optimizer, step);
    schedule(*reference, step);
    const auto batch = make_batch(batch_size, 100 + step);
    dp.train_step(batch, mse);
    reference->zero_grad();
    mse(*plain, batch).backward();
    reference->step();
  }
  CHECK(max_difference(*net, *plain) <= 1e-10);
  dp.check_parity();
  // Every follower's group took the primary group's rate of the last step.
  for (auto* follower : dp.optimizers()) {
    CHECK(follower->param_groups()[0].options().get_lr() == doctest::Approx(0.01 * (1.0 - 0.05 * 7)));
    CHECK(follower->param_groups()[1].options().get_lr() == doctest::Approx(0.03 * 0.5));
  }
}

}  // namespace

TEST_SUITE("DataParallel optimizers the user builds") {
  TEST_CASE("AdamW with two parameter groups under a per-group schedule trains like one device (float64)") {
    for (std::size_t k : {1, 2, 3}) check_equivalence(k, 13, make_adamw);
    check_equivalence(3, 2, make_adamw);  // a batch smaller than K
  }

  TEST_CASE("a user's own Optimizer subclass with its own constructor trains like one device (float64)") {
    for (std::size_t k : {1, 2, 3}) check_equivalence(k, 13, make_heavy_ball);
    check_equivalence(3, 2, make_heavy_ball);
  }

  TEST_CASE("parameter groups survive save_state and load_state on another number of replicas") {
    const std::string path = "multigpu_test_optimizer_groups.pt";
    auto [net, plain] = twin_models();
    auto reference = make_adamw(*plain);
    DataParallel<TwoLayer> dp(net, cpus(2));
    dp.make_optimizer(make_adamw);
    for (int step = 0; step < 3; ++step) {
      schedule(dp.optimizer(), step);
      schedule(*reference, step);
      const auto batch = make_batch(7, 200 + step);
      dp.train_step(batch, mse);
      reference->zero_grad();
      mse(*plain, batch).backward();
      reference->step();
    }
    dp.save_state(path);

    torch::manual_seed(11);
    TwoLayer other;
    other->to(torch::kFloat64);
    DataParallel<TwoLayer> resumed(other, cpus(3));
    auto& optimizer = resumed.make_optimizer(make_adamw);
    resumed.load_state(path);
    CHECK(optimizer.param_groups()[0].options().get_lr() == doctest::Approx(0.01 * (1.0 - 0.05 * 2)));
    CHECK(optimizer.param_groups()[1].options().get_lr() == doctest::Approx(0.03));
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(optimizer.param_groups()[1].options());
    CHECK(options.weight_decay() == 0);
    for (int step = 3; step < 6; ++step) {
      schedule(resumed.optimizer(), step);
      schedule(*reference, step);
      const auto batch = make_batch(7, 200 + step);
      resumed.train_step(batch, mse);
      reference->zero_grad();
      mse(*plain, batch).backward();
      reference->step();
    }
    CHECK(max_difference(*other, *plain) <= 1e-10);
    resumed.check_parity();

    // save_optimizer / load_optimizer carry the groups too, and an optimizer
    // with other groups refuses them and stays as it was.
    const std::string optimizer_path = "multigpu_test_optimizer_groups_alone.pt";
    resumed.save_optimizer(optimizer_path);
    DataParallel<TwoLayer> one_group(std::dynamic_pointer_cast<TwoLayerImpl>(other->clone()), cpus(2));
    auto& single = one_group.make_optimizer([](TwoLayerImpl& replica) {
      return std::make_unique<torch::optim::AdamW>(replica.parameters(), torch::optim::AdamWOptions(0.5));
    });
    std::string message;
    try {
      one_group.load_optimizer(optimizer_path);
    } catch (const multigpu::CheckpointError& e) {
      message = e.what();
    }
    CHECK(contains(message, "different number of parameter groups"));
    CHECK(contains(message, "the optimizers are unchanged"));
    CHECK(single.param_groups().size() == 1);
    CHECK(single.param_groups()[0].options().get_lr() == 0.5);
    DataParallel<TwoLayer> grouped(std::dynamic_pointer_cast<TwoLayerImpl>(other->clone()), cpus(1));
    auto& restored = grouped.make_optimizer(make_adamw);
    grouped.load_optimizer(optimizer_path);
    CHECK(restored.param_groups()[0].options().get_lr() == doctest::Approx(0.01 * (1.0 - 0.05 * 5)));
    CHECK(restored.param_groups()[1].options().get_lr() == doctest::Approx(0.03 * 0.5));
    std::remove(optimizer_path.c_str());
    std::remove(path.c_str());
  }

  TEST_CASE("bad factories are refused with one message, and the previous optimizers stay") {
    TwoLayer net = twin_models().first;
    DataParallel<TwoLayer> dp(net, cpus(3));
    torch::optim::SGD& previous = dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto refused = [&](auto factory, const std::vector<std::string>& parts) {
      std::string message;
      try {
        dp.make_optimizer(factory);
      } catch (const multigpu::Error& e) {
        message = e.what();
      }
      CAPTURE(message);
      for (const auto& part : parts) CHECK(contains(message, part));
      CHECK(contains(message, "the previous optimizers are unchanged"));
      CHECK(&dp.optimizer() == &previous);
      dp.train_step(make_batch(5, 300), mse);  // the previous optimizers still train
      dp.check_parity();
    };
    TwoLayerImpl* primary = &dp.module();
    const auto index_of = [&](TwoLayerImpl& replica) {
      for (std::size_t r = 0; r < dp.size(); ++r) {
        if (&dp.replica(r) == &replica) return r;
      }
      return dp.size();
    };

    SUBCASE("the factory returns null") {
      refused(
          [&](TwoLayerImpl& replica) {
            return &replica == primary ? make_adamw(replica) : std::unique_ptr<torch::optim::AdamW>();
          },
          {"make_optimizer(factory): the factory returned no optimizer for replica 1 (cpu)",
           "it must return a std::unique_ptr to an optimizer over the parameters of the module it is given"});
    }
    SUBCASE("an optimizer over the master's parameters (a captured module)") {
      refused([&](TwoLayerImpl&) { return make_adamw(*net); },
              {"the optimizer of replica 1 (cpu) holds, in parameter group 0, parameter \"fc1.weight\" of replica 0 "
               "(cpu, your module)",
               "build each optimizer over the module the factory is given (its argument), not over a module it "
               "captured"});
    }
    SUBCASE("an optimizer over another replica's parameters") {
      refused([&](TwoLayerImpl& replica) { return make_adamw(dp.replica((index_of(replica) + 1) % dp.size())); },
              {"the optimizer of replica 0 (cpu, your module) holds, in parameter group 0, parameter \"fc1.weight\" "
               "of replica 1 (cpu)"});
    }
    SUBCASE("an optimizer over a tensor that is not a parameter of the replica") {
      const auto stray = torch::zeros({4, 2}, torch::kFloat64).requires_grad_();
      refused(
          [&](TwoLayerImpl& replica) {
            auto groups = adamw_groups(replica);
            groups[1].params().push_back(stray);
            return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(0.02));
          },
          {"the optimizer of replica 0 (cpu, your module) holds, in parameter group 1 (position 2), a tensor of "
           "shape [4, 2] that is not a parameter of that replica",
           "an optimizer may hold only the parameters of the module the factory is given"});
    }
    SUBCASE("the same parameter twice") {
      refused(
          [&](TwoLayerImpl& replica) {
            auto groups = adamw_groups(replica);
            groups[1].params().push_back(replica.fc2->weight);
            return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(0.02));
          },
          {"the optimizer of replica 0 (cpu, your module) holds parameter \"fc2.weight\" twice, in parameter group 0 "
           "and in parameter group 1: put each parameter in one group, once"});
    }
    SUBCASE("another class on one replica") {
      refused(
          [&](TwoLayerImpl& replica) -> std::unique_ptr<torch::optim::Optimizer> {
            if (index_of(replica) == 2) return std::make_unique<torch::optim::Adam>(adamw_groups(replica));
            return make_adamw(replica);
          },
          {"the optimizer of replica 2 (cpu) is a torch::optim::Adam, the primary's (replica 0 (cpu, your module)) "
           "a torch::optim::AdamW: the factory must build the same optimizer class for every replica"});
    }
    SUBCASE("another number of groups on one replica") {
      refused(
          [&](TwoLayerImpl& replica) {
            if (index_of(replica) == 1) {
              return std::make_unique<torch::optim::AdamW>(replica.parameters(), torch::optim::AdamWOptions(0.02));
            }
            return make_adamw(replica);
          },
          {"the optimizer of replica 1 (cpu) has 1 parameter groups, the primary's (replica 0 (cpu, your module)) "
           "has 2"});
    }
    SUBCASE("another number of parameters in a group on one replica") {
      refused(
          [&](TwoLayerImpl& replica) {
            auto groups = adamw_groups(replica);
            if (index_of(replica) == 2) groups[1].params().pop_back();
            return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(0.02));
          },
          {"parameter group 1 of replica 2 (cpu)'s optimizer holds 1 parameters, the primary's (replica 0 (cpu, "
           "your module)) holds 2: every replica's group must hold the same parameters, in the same order"});
    }
    SUBCASE("another order in a group on one replica") {
      refused(
          [&](TwoLayerImpl& replica) {
            auto groups = adamw_groups(replica);
            if (index_of(replica) == 1) std::swap(groups[0].params()[0], groups[0].params()[1]);
            return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(0.02));
          },
          {"parameter group 0 of replica 1 (cpu)'s optimizer holds \"fc2.weight\" at position 0, where the "
           "primary's (replica 0 (cpu, your module)) holds \"fc1.weight\""});
    }
  }
}
