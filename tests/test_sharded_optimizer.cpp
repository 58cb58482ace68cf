// DataParallelOptions::shard_optimizer_state: each parameter's optimizer
// state on one replica, against unsharded training and the one-device
// program in float64; the owners' assignment; the state each replica
// holds; checkpoints across layouts. See Note [Sharded optimizer state] in
// multigpu/data_parallel/optimizer_shards.hpp.

#include "support.hpp"  // first: see its comment
#include "small_net.hpp"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <unistd.h>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu_test::contains;
using multigpu_test::small_net::cpus;
using multigpu_test::small_net::max_difference;

namespace {

struct ThreeLayerImpl : torch::nn::Cloneable<ThreeLayerImpl> {
  ThreeLayerImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 12));
    fc3 = register_module("fc3", torch::nn::Linear(12, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc3(torch::tanh(fc2(torch::tanh(fc1(x))))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
};
TORCH_MODULE(ThreeLayer);

torch::Tensor mse(ThreeLayerImpl& net, const torch::data::Example<>& shard) {
  return torch::mse_loss(net.forward(shard.data), shard.target);
}

torch::data::Example<> make_batch(std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}, torch::kFloat64), torch::randn({n, 3}, torch::kFloat64)};
}

ThreeLayer fresh_model(std::uint64_t seed = 3) {
  torch::manual_seed(seed);
  ThreeLayer net;
  net->to(torch::kFloat64);
  return net;
}

ThreeLayer copy_of(const ThreeLayer& net) { return std::dynamic_pointer_cast<ThreeLayerImpl>(net->clone()); }

bool same_parameters(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto theirs = b.named_parameters();
  for (const auto& p : a.named_parameters()) {
    if (!torch::equal(p.value(), theirs[p.key()])) return false;
  }
  return true;
}

DataParallelOptions sharding(bool on) {
  DataParallelOptions options;
  options.shard_optimizer_state = on;
  return options;
}

// Weights with weight decay, biases without, at two rates: the recipe.
std::unique_ptr<torch::optim::AdamW> make_adamw(ThreeLayerImpl& net) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{net.fc1->weight, net.fc2->weight, net.fc3->weight},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.01).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{net.fc1->bias, net.fc2->bias, net.fc3->bias},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.03).weight_decay(0)));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(0.02));
}

std::unique_ptr<torch::optim::SGD> make_sgd(ThreeLayerImpl& net) {
  return std::make_unique<torch::optim::SGD>(
      net.parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01));
}

std::unique_ptr<torch::optim::Adam> make_adam(ThreeLayerImpl& net) {
  return std::make_unique<torch::optim::Adam>(net.parameters(), torch::optim::AdamOptions(0.01).weight_decay(0.02));
}

// Adagrad makes its state when it is built; RMSprop keeps three tensors.
std::unique_ptr<torch::optim::Adagrad> make_adagrad(ThreeLayerImpl& net) {
  return std::make_unique<torch::optim::Adagrad>(net.parameters(), torch::optim::AdagradOptions(0.05));
}

std::unique_ptr<torch::optim::RMSprop> make_rmsprop(ThreeLayerImpl& net) {
  return std::make_unique<torch::optim::RMSprop>(net.parameters(),
                                                 torch::optim::RMSpropOptions(0.01).momentum(0.5).centered(true));
}

// A schedule set on the primary's groups before each step.
void schedule(torch::optim::Optimizer& optimizer) {
  for (std::size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    auto& options = optimizer.param_groups()[g].options();
    options.set_lr(options.get_lr() * (g == 0 ? 0.9 : 0.95));
  }
}

enum class Extra { kNone, kClip, kScaler, kNoSync };

using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(ThreeLayerImpl&)>;

/// Trains `net` on `replicas` CPU replicas for `steps` steps with the
/// optimizer `make` builds, and `extra`.
void train(const ThreeLayer& net, std::size_t replicas, bool sharded, const Factory& make, int steps,
           Extra extra = Extra::kNone) {
  auto options = sharding(sharded);
  if (extra == Extra::kScaler) {
    multigpu::GradScalerOptions scaler;
    scaler.init_scale = 1024;
    scaler.growth_interval = 2;
    options.grad_scaler = std::make_shared<multigpu::GradScaler>(scaler);
  }
  DataParallel<ThreeLayer> dp(net, cpus(replicas), options);
  dp.make_optimizer(make);
  for (int step = 0; step < steps; ++step) {
    schedule(dp.optimizer());
    const auto batch = make_batch(11, 100 + step);
    dp.zero_grad();
    if (extra == Extra::kNoSync) {
      auto guard = dp.no_sync();
      dp.forward_backward(make_batch(9, 500 + step), mse);
    }
    dp.forward_backward(batch, mse);
    if (extra == Extra::kClip) dp.clip_grad_norm(0.05);
    dp.step();
  }
  dp.check_parity();
}

/// The one-device program of train() without extras.
void train_plain(ThreeLayer net, const Factory& make, int steps) {
  auto optimizer = make(*net);
  for (int step = 0; step < steps; ++step) {
    schedule(*optimizer);
    const auto batch = make_batch(11, 100 + step);
    optimizer->zero_grad();
    mse(*net, batch).backward();
    optimizer->step();
  }
}

void check_sharded_is_unsharded(const Factory& make, Extra extra) {
  for (std::size_t k : {2, 3, 4}) {
    CAPTURE(k);
    const ThreeLayer start = fresh_model();
    ThreeLayer sharded = copy_of(start);
    ThreeLayer unsharded = copy_of(start);
    train(sharded, k, true, make, 6, extra);
    train(unsharded, k, false, make, 6, extra);
    CHECK(same_parameters(*sharded, *unsharded));
    CHECK_FALSE(same_parameters(*sharded, *start));
    if (extra == Extra::kNone) {
      ThreeLayer plain = copy_of(start);
      train_plain(plain, make, 6);
      CHECK(max_difference(*sharded, *plain) <= 1e-12);
    }
  }
}

struct OtherImpl : torch::nn::Cloneable<OtherImpl> {
  OtherImpl() { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(6, 3)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc{nullptr};
};

/// Steps [from, to) of train()'s loop (without extras) on `dp`.
void train_steps(DataParallel<ThreeLayer>& dp, int from, int to) {
  for (int step = from; step < to; ++step) {
    schedule(dp.optimizer());
    dp.zero_grad();
    dp.forward_backward(make_batch(11, 100 + step), mse);
    dp.step();
  }
}

/// A file name of this test's own in the temporary folder.
std::string scratch_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("multigpu-sharded-" + std::to_string(::getpid()) + "-" + name))
      .string();
}

}  // namespace

TEST_SUITE("sharded optimizer state") {
  TEST_CASE("owners are balanced by bytes, largest first, the same every time") {
    using multigpu::detail::assign_parameter_owners;
    CHECK(assign_parameter_owners({100, 10, 60, 50}, 2) == std::vector<std::size_t>{0, 0, 1, 1});
    CHECK(assign_parameter_owners({5, 5, 5}, 1) == std::vector<std::size_t>{0, 0, 0});
    CHECK(assign_parameter_owners({8, 8, 8}, 3) == std::vector<std::size_t>{0, 1, 2});
    CHECK(assign_parameter_owners({0, 4}, 3) == std::vector<std::size_t>{1, 0});
    const std::vector<std::int64_t> bytes{768, 128, 1536, 96, 288, 24, 4000, 8};
    for (std::size_t k : {2, 3, 4, 5}) {
      CAPTURE(k);
      const auto owners = assign_parameter_owners(bytes, k);
      CHECK(owners == assign_parameter_owners(bytes, k));
      std::vector<std::int64_t> load(k, 0);
      for (std::size_t i = 0; i < bytes.size(); ++i) load[owners.at(i)] += bytes[i];
      const auto [least, most] = std::minmax_element(load.begin(), load.end());
      CHECK(*most - *least <= 4000);
    }
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, assign_parameter_owners({1}, 0)), "at least one replica"));
  }

  TEST_CASE("SGD with nesterov momentum and weight decay: sharded is unsharded, bit for bit (float64)") {
    check_sharded_is_unsharded(make_sgd, Extra::kNone);
  }

  TEST_CASE("Adam, and AdamW with two parameter groups under a schedule: sharded is unsharded, bit for bit") {
    check_sharded_is_unsharded(make_adam, Extra::kNone);
    check_sharded_is_unsharded(make_adamw, Extra::kNone);
  }

  TEST_CASE("Adagrad (state made when built) and centered RMSprop: sharded is unsharded, bit for bit") {
    check_sharded_is_unsharded(make_adagrad, Extra::kNone);
    check_sharded_is_unsharded(make_rmsprop, Extra::kNone);
    DataParallel<ThreeLayer> dp(fresh_model(), cpus(3), sharding(true));
    dp.make_optimizer(make_adagrad);
    std::size_t entries = 0;
    for (auto* optimizer : dp.optimizers()) entries += optimizer->state().size();
    CHECK(entries == fresh_model()->parameters().size());  // each parameter's state once, on its owner
  }

  TEST_CASE("with clip_grad_norm, a GradScaler and no_sync, sharded is unsharded, bit for bit") {
    check_sharded_is_unsharded(make_adamw, Extra::kClip);
    check_sharded_is_unsharded(make_sgd, Extra::kScaler);
    check_sharded_is_unsharded(make_adam, Extra::kNoSync);
  }

  TEST_CASE("the options form: make_optimizer<Opt>(options) is sharded too") {
    const ThreeLayer start = fresh_model();
    ThreeLayer sharded = copy_of(start);
    ThreeLayer unsharded = copy_of(start);
    for (auto* net : {&sharded, &unsharded}) {
      DataParallel<ThreeLayer> dp(*net, cpus(3), sharding(net == &sharded));
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.5));
      for (int step = 0; step < 4; ++step) dp.train_step(make_batch(10, 40 + step), mse);
      dp.check_parity();
    }
    CHECK(same_parameters(*sharded, *unsharded));
  }

  TEST_CASE("each replica holds the state of its share only: about 1/K of the unsharded state") {
    const ThreeLayer start = fresh_model();
    std::int64_t largest = 0;
    for (const auto& p : start->parameters()) largest = std::max<std::int64_t>(largest, p.numel() * 8 * 2);
    DataParallel<ThreeLayer> unsharded(copy_of(start), cpus(1));
    unsharded.make_optimizer(make_adam);
    unsharded.train_step(make_batch(8, 1), mse);
    const std::int64_t whole = unsharded.optimizer_state_bytes().at(0);
    std::int64_t numel = 0;
    for (const auto& p : start->parameters()) numel += p.numel();
    CHECK(whole == 2 * 8 * numel);  // Adam's two moments in float64
    for (std::size_t k : {2, 3, 4}) {
      CAPTURE(k);
      DataParallel<ThreeLayer> dp(copy_of(start), cpus(k), sharding(true));
      dp.make_optimizer(make_adam);
      dp.train_step(make_batch(8, 1), mse);
      const auto bytes = dp.optimizer_state_bytes();
      REQUIRE(bytes.size() == k);
      CHECK(std::accumulate(bytes.begin(), bytes.end(), std::int64_t{0}) == whole);
      for (std::size_t r = 0; r < k; ++r) {
        CAPTURE(r);
        CHECK(bytes[r] <= whole / static_cast<std::int64_t>(k) + largest);
        CHECK(bytes[r] >= whole / static_cast<std::int64_t>(k) - largest);
      }
      DataParallel<ThreeLayer> replicated(copy_of(start), cpus(k));
      replicated.make_optimizer(make_adam);
      replicated.train_step(make_batch(8, 1), mse);
      CHECK(replicated.optimizer_state_bytes() == std::vector<std::int64_t>(k, whole));
    }
  }

  TEST_CASE("LBFGS keeps state across parameters and is refused when made, naming it") {
    DataParallel<ThreeLayer> dp(fresh_model(), cpus(2), sharding(true));
    const std::string message = MULTIGPU_TEST_MESSAGE(
        multigpu::Error, dp.make_optimizer<torch::optim::LBFGS>(torch::optim::LBFGSOptions(0.1)));
    CHECK(contains(message, "make_optimizer: torch::optim::LBFGS keeps one state across all its parameters"));
    CHECK(contains(message, "turn sharding off"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.optimizer()), "no optimizer yet"));
  }

  TEST_CASE("across processes the option is refused when the DataParallel is built, for now") {
    // A communicator that says other processes take part, as a ProcessGroup's does.
    struct SeesTwoProcesses : multigpu::LocalCommunicator {
      using LocalCommunicator::LocalCommunicator;
      std::size_t world_size() const override { return 2 * size(); }
    };
    auto options = sharding(true);
    options.make_communicator = [](const std::vector<multigpu::ReplicaContext>& replicas) {
      return std::make_unique<SeesTwoProcesses>(replicas);
    };
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, DataParallel<ThreeLayer>(fresh_model(), cpus(2), options)),
                   "DataParallelOptions::shard_optimizer_state across processes (4 replicas over every process, 2 "
                   "here) is not supported yet"));
  }

  TEST_CASE("one replica has nothing to shard and trains as before") {
    DataParallel<ThreeLayer> dp(fresh_model(), cpus(1), sharding(true));
    dp.make_optimizer(make_adam);
    dp.train_step(make_batch(4, 2), mse);  // one replica: nothing to shard
    CHECK(dp.optimizer_state_bytes().size() == 1);
  }

  TEST_CASE("save_state gathers the owners' state: it resumes sharded or not, on any number of replicas") {
    const std::string path = scratch_file("sharded.pt");
    const ThreeLayer start = fresh_model();
    // The uninterrupted run, sharded on 2 replicas.
    ThreeLayer whole = copy_of(start);
    train(whole, 2, true, make_adamw, 6);

    // Three steps sharded on 2, saved; then resumed on several layouts.
    ThreeLayer first = copy_of(start);
    {
      DataParallel<ThreeLayer> dp(first, cpus(2), sharding(true));
      dp.make_optimizer(make_adamw);
      train_steps(dp, 0, 3);
      dp.save_state(path);
      // Unsharded, the same training saves the same state.
      ThreeLayer twin = copy_of(start);
      DataParallel<ThreeLayer> plain(twin, cpus(2));
      plain.make_optimizer(make_adamw);
      train_steps(plain, 0, 3);
      plain.save_state(scratch_file("unsharded.pt"));
    }
    struct Layout {
      std::size_t replicas;
      bool sharded;
      const char* file;
    };
    for (const Layout layout : {Layout{2, true, "sharded.pt"}, Layout{2, false, "sharded.pt"},
                                Layout{3, true, "sharded.pt"}, Layout{4, false, "sharded.pt"},
                                Layout{2, true, "unsharded.pt"}, Layout{3, true, "unsharded.pt"}}) {
      CAPTURE(layout.replicas);
      CAPTURE(layout.sharded);
      CAPTURE(std::string(layout.file));
      ThreeLayer resumed = fresh_model(99);
      DataParallel<ThreeLayer> dp(resumed, cpus(layout.replicas), sharding(layout.sharded));
      dp.make_optimizer(make_adamw);
      const std::string said = dp.load_state(scratch_file(layout.file)).describe();
      const bool saved_sharded = std::string(layout.file) == "sharded.pt";
      CHECK(contains(said, "optimizer state saved") == (saved_sharded != (layout.sharded && layout.replicas > 1)));
      if (saved_sharded && !layout.sharded) {
        CHECK(contains(said, "optimizer state saved sharded over the replicas, resuming whole on every replica"));
      }
      train_steps(dp, 3, 6);
      dp.check_parity();
      if (layout.replicas == 2) {
        CHECK(same_parameters(*resumed, *whole));
      } else {
        CHECK(max_difference(*resumed, *whole) <= 1e-12);
      }
    }
    std::filesystem::remove(path);
    std::filesystem::remove(scratch_file("unsharded.pt"));
  }

  TEST_CASE("a checkpoint of another model is refused, and nothing changes") {
    auto other = std::make_shared<OtherImpl>();
    other->to(torch::kFloat64);
    DataParallel<OtherImpl> other_dp(other, cpus(2), sharding(true));
    other_dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.1));
    other_dp.train_step(make_batch(4, 7), [](OtherImpl& net, const torch::data::Example<>& shard) {
      return torch::mse_loss(net.forward(shard.data), shard.target);
    });
    other_dp.save_state(scratch_file("other.pt"));

    ThreeLayer net = fresh_model();
    DataParallel<ThreeLayer> dp(net, cpus(3), sharding(true));
    dp.make_optimizer(make_adamw);
    dp.train_step(make_batch(11, 3), mse);
    const ThreeLayer before = copy_of(net);
    const auto bytes = dp.optimizer_state_bytes();
    CHECK_THROWS_AS(dp.load_state(scratch_file("other.pt")), multigpu::CheckpointError);
    CHECK(same_parameters(*net, *before));
    CHECK(dp.optimizer_state_bytes() == bytes);
    // And it trains on as if nothing had been asked.
    ThreeLayer twin = copy_of(fresh_model());
    DataParallel<ThreeLayer> reference(twin, cpus(3), sharding(true));
    reference.make_optimizer(make_adamw);
    reference.train_step(make_batch(11, 3), mse);
    dp.train_step(make_batch(11, 4), mse);
    reference.train_step(make_batch(11, 4), mse);
    CHECK(same_parameters(*net, *twin));
    std::filesystem::remove(scratch_file("other.pt"));
  }

  TEST_CASE("several named optimizers, stepped and zeroed one by one: sharded is unsharded, bit for bit") {
    const ThreeLayer start = fresh_model();
    ThreeLayer sharded = copy_of(start);
    ThreeLayer unsharded = copy_of(start);
    for (auto* net : {&sharded, &unsharded}) {
      DataParallel<ThreeLayer> dp(*net, cpus(3), sharding(net == &sharded));
      dp.make_optimizer("first", [](ThreeLayerImpl& m) {
        return std::make_unique<torch::optim::Adam>(m.fc1->parameters(), torch::optim::AdamOptions(0.01));
      });
      dp.make_optimizer("rest", [](ThreeLayerImpl& m) {
        std::vector<torch::Tensor> rest = m.fc2->parameters();
        for (const auto& p : m.fc3->parameters()) rest.push_back(p);
        return std::make_unique<torch::optim::SGD>(rest, torch::optim::SGDOptions(0.05).momentum(0.9));
      });
      for (int step = 0; step < 4; ++step) {
        dp.zero_grad("first");
        dp.zero_grad("rest");
        dp.forward_backward(make_batch(10, 60 + step), mse);
        dp.step(step % 2 == 0 ? "first" : "rest");
      }
      dp.check_parity();
    }
    CHECK(same_parameters(*sharded, *unsharded));
    CHECK_FALSE(same_parameters(*sharded, *start));
  }

  TEST_CASE("zero_grad(name) zeroes every parameter of that optimizer, not only a replica's share") {
    DataParallel<ThreeLayer> dp(fresh_model(), cpus(2), sharding(true));
    dp.make_optimizer("all", make_sgd);
    dp.forward_backward(make_batch(6, 5), mse);
    dp.zero_grad("all");
    for (std::size_t r = 0; r < 2; ++r) {
      for (const auto& p : dp.replica(r).parameters()) {
        if (p.grad().defined()) CHECK(p.grad().abs().sum().item<double>() == 0);
      }
    }
  }
}

TEST_SUITE("sharded optimizer state") {
  TEST_CASE("dp.optimizer()'s groups list every parameter, as unsharded, and a loop over them sees them all") {
    DataParallel<ThreeLayer> dp(fresh_model(), cpus(3), sharding(true));
    dp.make_optimizer(make_adamw);
    for (int step = 0; step < 2; ++step) dp.train_step(make_batch(9, 70 + step), mse);
    for (std::size_t r = 0; r < 3; ++r) {
      CAPTURE(r);
      const auto& groups = dp.optimizers()[r]->param_groups();
      REQUIRE(groups.size() == 2);
      CHECK(groups[0].params().size() == 3);
      CHECK(groups[1].params().size() == 3);
    }
    // The state, though, is each owner's alone, and stays so after a save.
    const auto held = [&] {
      std::vector<std::size_t> entries;
      for (auto* optimizer : dp.optimizers()) entries.push_back(optimizer->state().size());
      return entries;
    };
    const auto before = held();
    CHECK(std::accumulate(before.begin(), before.end(), std::size_t{0}) == 6);
    const std::string path = scratch_file("groups.pt");
    dp.save_state(path);
    CHECK(held() == before);
    std::filesystem::remove(path);
  }

  TEST_CASE("a parameter group added to every replica's optimizer later is sharded too: sharded is unsharded") {
    const ThreeLayer start = fresh_model();
    ThreeLayer sharded = copy_of(start);
    ThreeLayer unsharded = copy_of(start);
    for (auto* net : {&sharded, &unsharded}) {
      DataParallel<ThreeLayer> dp(*net, cpus(3), sharding(net == &sharded));
      dp.make_optimizer([](ThreeLayerImpl& m) {
        return std::make_unique<torch::optim::Adam>(m.fc1->parameters(), torch::optim::AdamOptions(0.01));
      });
      dp.train_step(make_batch(10, 80), mse);
      for (std::size_t r = 0; r < 3; ++r) {
        auto& replica = dp.replica(r);
        std::vector<torch::Tensor> rest = replica.fc2->parameters();
        for (const auto& p : replica.fc3->parameters()) rest.push_back(p);
        dp.optimizers()[r]->add_param_group(torch::optim::OptimizerParamGroup(
            rest, std::make_unique<torch::optim::AdamOptions>(torch::optim::AdamOptions(0.02))));
      }
      for (int step = 1; step < 4; ++step) dp.train_step(make_batch(10, 80 + step), mse);
      dp.check_parity();
      if (net == &sharded) {
        std::size_t entries = 0;
        for (auto* optimizer : dp.optimizers()) entries += optimizer->state().size();
        CHECK(entries == 6);  // each parameter's state once, on its owner
      }
    }
    CHECK(same_parameters(*sharded, *unsharded));
  }

  TEST_CASE("a tensor that is not a parameter, added to a group later, is refused at the step, naming the replica") {
    ThreeLayer net = fresh_model();
    DataParallel<ThreeLayer> dp(net, cpus(2), sharding(true));
    dp.make_optimizer("all", make_sgd);
    for (std::size_t r = 0; r < 2; ++r) {
      dp.optimizers("all")[r]->add_param_group(torch::optim::OptimizerParamGroup(
          {torch::zeros({4, 5}, torch::kFloat64).requires_grad_()},
          std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.1))));
    }
    const ThreeLayer before = copy_of(net);
    dp.forward_backward(make_batch(6, 5), mse);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.step()),
                   "replica 0's optimizer \"all\" holds a tensor of shape [4, 5] that is not a parameter of its "
                   "module: with DataParallelOptions::shard_optimizer_state each tensor an optimizer steps needs an "
                   "owner"));
    CHECK(same_parameters(*net, *before));  // nothing stepped
    CHECK(dp.optimizers("all")[0]->param_groups()[0].params().size() == 6);  // the groups are whole again
  }
}

TEST_SUITE("sharded optimizer state") {
  TEST_CASE("replicas that own nothing (two parameters on four replicas) step nothing: sharded is unsharded") {
    torch::manual_seed(5);
    auto start = std::make_shared<OtherImpl>();
    start->to(torch::kFloat64);
    const auto loss = [](OtherImpl& net, const torch::data::Example<>& shard) {
      return torch::mse_loss(net.forward(shard.data), shard.target);
    };
    std::vector<std::shared_ptr<OtherImpl>> trained;
    for (const bool sharded : {true, false}) {
      auto net = std::dynamic_pointer_cast<OtherImpl>(start->clone());
      DataParallel<OtherImpl> dp(net, cpus(4), sharding(sharded));
      dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.05));
      for (int step = 0; step < 3; ++step) dp.train_step(make_batch(12, 90 + step), loss);
      dp.check_parity();
      if (sharded) {
        const auto bytes = dp.optimizer_state_bytes();
        CHECK(std::count(bytes.begin(), bytes.end(), std::int64_t{0}) == 2);
      }
      trained.push_back(net);
    }
    CHECK(same_parameters(*trained[0], *trained[1]));
    CHECK_FALSE(same_parameters(*trained[0], *start));
  }
}
