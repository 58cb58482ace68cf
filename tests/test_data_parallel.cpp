// DataParallel on CPU replicas: equivalence with plain training, replicas,
// optimizers, checkpoints, failures.

#include "support.hpp"  // first: see its comment

#include <atomic>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu_test::contains;

namespace {

/// A small MLP, Cloneable (the usual LibTorch way).
struct MlpImpl : torch::nn::Cloneable<MlpImpl> {
  explicit MlpImpl(int in = 6, int hidden = 16, int out = 3) : in_(in), hidden_(hidden), out_(out) { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(in_, hidden_));
    fc2 = register_module("fc2", torch::nn::Linear(hidden_, out_));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  int in_, hidden_, out_;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Mlp);

/// Like the official LibTorch MNIST example's Net: a plain module, not Cloneable.
struct PlainNet : torch::nn::Module {
  PlainNet() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 12));
    fc2 = register_module("fc2", torch::nn::Linear(12, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  int custom_member = 42;
};

/// With BatchNorm (buffers) and dropout (randomness).
struct BnNetImpl : torch::nn::Cloneable<BnNetImpl> {
  explicit BnNetImpl(double dropout = 0.0) : p_(dropout) { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    bn = register_module("bn", torch::nn::BatchNorm1d(16));
    drop = register_module("drop", torch::nn::Dropout(p_));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(drop(torch::relu(bn(fc1(x))))); }
  double p_;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(BnNet);

/// A module with a parameter that forward never uses.
struct UnusedNetImpl : torch::nn::Cloneable<UnusedNetImpl> {
  UnusedNetImpl() { reset(); }
  void reset() override {
    used = register_module("used", torch::nn::Linear(6, 3));
    unused = register_module("unused", torch::nn::Linear(6, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return used(x); }
  torch::nn::Linear used{nullptr}, unused{nullptr};
};
TORCH_MODULE(UnusedNet);

/// A predict output type with BatchTraits but no for_each_tensor.
struct Opaque {
  torch::Tensor hidden;
};
/// One whose BatchTraits lists its tensors.
struct Listed {
  torch::Tensor first, second;
};

}  // namespace

template <>
struct multigpu::BatchTraits<Opaque> {
  static Opaque gather(const std::vector<Opaque>& parts, const c10::Device& /*device*/) { return parts.front(); }
};

template <>
struct multigpu::BatchTraits<Listed> {
  static void for_each_tensor(const Listed& value, const std::function<void(const at::Tensor&)>& fn) {
    fn(value.first);
    fn(value.second);
  }
};

namespace {

std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

torch::data::Example<> make_batch(std::int64_t n, std::uint64_t seed = 7) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}), torch::randn({n, 3})};
}

template <class Module>
torch::Tensor mse(Module& net, const torch::data::Example<>& shard) {
  return torch::mse_loss(net.forward(shard.data), shard.target);
}

/// Copies every parameter and buffer (same structure) from `from` into `to`.
void copy_state(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto source = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(source[p.key()]);
  auto buffers = from.named_buffers();
  for (auto& b : to.named_buffers()) b.value().copy_(buffers[b.key()]);
}

/// Largest relative difference between two modules' parameters.
void check_same_parameters(const torch::nn::Module& a, const torch::nn::Module& b, double rtol, double atol) {
  auto theirs = b.named_parameters();
  for (const auto& p : a.named_parameters()) {
    CAPTURE(p.key());
    const auto& other = theirs[p.key()];
    CHECK(torch::allclose(p.value(), other.to(p.value().device()), rtol, atol));
  }
}

enum class OptimizerKind { kSgdMomentum, kAdam };

std::unique_ptr<torch::optim::Optimizer> make_reference_optimizer(OptimizerKind kind,
                                                                  const std::vector<torch::Tensor>& params) {
  if (kind == OptimizerKind::kSgdMomentum) {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  }
  return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(0.01));
}

template <class Wrapper>
void make_dp_optimizer(Wrapper& dp, OptimizerKind kind) {
  if (kind == OptimizerKind::kSgdMomentum) {
    dp.template make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05).momentum(0.9));
  } else {
    dp.template make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
  }
}

/// Trains a plain model and a DataParallel one from the same start on the
/// same batch and compares their parameters.
void check_equivalence(std::size_t replicas, std::int64_t batch_size, OptimizerKind kind, DataParallelOptions options,
                       int steps = 20) {
  CAPTURE(replicas);
  CAPTURE(batch_size);
  torch::manual_seed(1);
  Mlp reference;
  Mlp wrapped;
  copy_state(*reference, *wrapped);
  auto reference_optimizer = make_reference_optimizer(kind, reference->parameters());

  DataParallel<Mlp> dp(wrapped, cpus(replicas), options);
  make_dp_optimizer(dp, kind);

  const auto batch = make_batch(batch_size);
  for (int step = 0; step < steps; ++step) {
    reference_optimizer->zero_grad();
    const auto reference_loss = mse(*reference, batch);
    reference_loss.backward();
    reference_optimizer->step();
    const double loss = dp.train_step(batch, mse<MlpImpl>);
    CHECK(loss == doctest::Approx(reference_loss.item<double>()).epsilon(1e-5));
  }
  check_same_parameters(*reference, dp.module(), 1e-5, 1e-6);
  dp.check_parity();
}

}  // namespace

TEST_SUITE("DataParallel equivalence") {
  TEST_CASE("K replicas on a batch not divisible by K train like one model on the whole batch") {
    for (const auto kind : {OptimizerKind::kSgdMomentum, OptimizerKind::kAdam}) {
      for (std::size_t k : {1, 2, 3, 4}) check_equivalence(k, 13, kind, {});
    }
  }

  TEST_CASE("a batch smaller than K: empty shards still take part") {
    for (const auto kind : {OptimizerKind::kSgdMomentum, OptimizerKind::kAdam}) {
      check_equivalence(3, 2, kind, {});
      check_equivalence(4, 1, kind, {});
    }
  }

  TEST_CASE("the same with tiny buckets, without overlap, and with a summed loss") {
    DataParallelOptions tiny;
    tiny.bucket_cap_mib = 0.0001;  // about one parameter per bucket
    check_equivalence(3, 10, OptimizerKind::kAdam, tiny);
    DataParallelOptions after;
    after.overlap_sync_with_backward = false;
    check_equivalence(3, 10, OptimizerKind::kSgdMomentum, after);
    DataParallelOptions threads;
    threads.comm_threads = 3;
    check_equivalence(4, 11, OptimizerKind::kSgdMomentum, threads);

    // A summed loss: the gradient of the whole batch's sum.
    torch::manual_seed(2);
    Mlp reference;
    Mlp wrapped;
    copy_state(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.001);
    DataParallelOptions sum;
    sum.loss_reduction = multigpu::LossReduction::kSum;
    DataParallel<Mlp> dp(wrapped, cpus(3), sum);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.001));
    const auto batch = make_batch(10);
    auto summed = [](MlpImpl& net, const torch::data::Example<>& shard) {
      return torch::mse_loss(net.forward(shard.data), shard.target, torch::Reduction::Sum);
    };
    for (int step = 0; step < 5; ++step) {
      reference_optimizer.zero_grad();
      const auto loss = summed(*reference, batch);
      loss.backward();
      reference_optimizer.step();
      CHECK(dp.train_step(batch, summed) == doctest::Approx(loss.item<double>()).epsilon(1e-5));
    }
    check_same_parameters(*reference, dp.module(), 1e-5, 1e-6);
  }

  TEST_CASE("gradient accumulation with no_sync equals one step on the concatenated batch") {
    torch::manual_seed(3);
    Mlp reference;
    Mlp wrapped;
    copy_state(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
    DataParallel<Mlp> dp(wrapped, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto a = make_batch(8, 11);
    const auto b = make_batch(8, 12);
    // Reference: mean over a + mean over b (two micro-batches of equal size).
    reference_optimizer.zero_grad();
    mse(*reference, a).backward();
    mse(*reference, b).backward();
    reference_optimizer.step();
    {
      auto guard = dp.no_sync();
      dp.forward_backward(a, mse<MlpImpl>);
      CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.train_step(b, mse<MlpImpl>)), "no_sync() forbids"));
      CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.step()), "step() inside no_sync()"));
    }
    dp.forward_backward(b, mse<MlpImpl>);
    dp.step();
    dp.zero_grad();
    check_same_parameters(*reference, dp.module(), 1e-5, 1e-6);
    dp.check_parity();
  }

  TEST_CASE("accumulating without no_sync gives the same result (syncing agreed gradients is harmless)") {
    torch::manual_seed(4);
    Mlp reference;
    Mlp wrapped;
    copy_state(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
    DataParallel<Mlp> dp(wrapped, cpus(2));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto a = make_batch(6, 21);
    const auto b = make_batch(5, 22);
    reference_optimizer.zero_grad();
    mse(*reference, a).backward();
    mse(*reference, b).backward();
    reference_optimizer.step();
    dp.forward_backward(a, mse<MlpImpl>);
    dp.forward_backward(b, mse<MlpImpl>);
    dp.sync_gradients();
    dp.step();
    check_same_parameters(*reference, dp.module(), 1e-5, 1e-6);
  }
}

TEST_SUITE("DataParallel modules") {
  TEST_CASE("a plain, non-Cloneable module is built by its default constructor and given the master's state") {
    torch::manual_seed(5);
    auto net = std::make_shared<PlainNet>();
    auto reference = std::make_shared<PlainNet>();
    copy_state(*net, *reference);
    net->custom_member = 7;
    DataParallel<PlainNet> dp(net, cpus(3));
    CHECK(&dp.module() == net.get());  // your module is replica 0, not a copy
    CHECK(dp.module().custom_member == 7);
    check_same_parameters(*reference, dp.replica(2), 0, 0);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
    const auto batch = make_batch(9);
    for (int step = 0; step < 5; ++step) {
      reference_optimizer.zero_grad();
      mse(*reference, batch).backward();
      reference_optimizer.step();
      dp.train_step(batch, mse<PlainNet>);
    }
    check_same_parameters(*reference, *net, 1e-5, 1e-6);
  }

  TEST_CASE("a factory builds replicas of a module without a default constructor") {
    struct Sized : torch::nn::Module {
      explicit Sized(int hidden) { fc = register_module("fc", torch::nn::Linear(6, hidden)); }
      torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
      torch::nn::Linear fc{nullptr};
    };
    auto net = std::make_shared<Sized>(3);
    int built = 0;
    DataParallel<Sized> dp(net, cpus(3), [&] {
      ++built;
      return std::make_shared<Sized>(3);
    });
    CHECK(built == 2);
    CHECK(torch::equal(dp.replica(1).fc->weight, net->fc->weight));
    const std::string message =
        MULTIGPU_TEST_MESSAGE(multigpu::Error, DataParallel<Sized>(net, cpus(2), [] { return std::make_shared<Sized>(4); }));
    CHECK(contains(message, "parameter fc.weight has shape [4, 6], yours [3, 6]"));
  }

  TEST_CASE("train_step's loss stays on the device until it is read") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto batch = make_batch(7);
    const double before_step = mse(*net, batch).item<double>();
    const multigpu::StepLoss loss = dp.train_step(batch, mse<MlpImpl>);
    CHECK_FALSE(loss.read());
    REQUIRE(loss.tensor().defined());
    CHECK(loss.tensor().dim() == 0);
    CHECK((loss.tensor().scalar_type() == torch::kDouble));
    CHECK(loss.tensor().device() == dp.devices()[0]);
    CHECK_FALSE(loss.tensor().requires_grad());
    CHECK(loss.item() == doctest::Approx(before_step).epsilon(1e-6));  // the whole batch's, from before the step
    CHECK(loss.read());
    const double converted = loss;
    CHECK(converted == loss.item());
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::StepLoss().item()), "no loss"));
  }

  TEST_CASE("module holders: torch::nn::Linear and TORCH_MODULE types") {
    torch::nn::Linear linear(4, 2);
    DataParallel<torch::nn::Linear> dp(linear, cpus(2));
    CHECK(&dp.module() == linear.get());
    CHECK(dp.replica(1).options.in_features() == 4);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto loss = dp.train_step(torch::randn({5, 4}), [](torch::nn::LinearImpl& m, const torch::Tensor& x) {
      return m.forward(x).pow(2).mean();
    });
    CHECK(std::isfinite(loss));
    dp.check_parity();

    Mlp mlp;
    DataParallel<Mlp> wrapped(mlp, cpus(2));
    CHECK(&wrapped.module() == mlp.get());
  }

  TEST_CASE("building replicas leaves the CPU random stream where it was") {
    torch::manual_seed(9);
    Mlp net;
    torch::manual_seed(10);
    const auto without = torch::randn({4});
    torch::manual_seed(10);
    DataParallel<Mlp> dp(net, cpus(4));
    const auto with = torch::randn({4});
    CHECK(torch::equal(without, with));
  }

  TEST_CASE("BatchNorm: buffers follow the primary, and one replica trains and zeroes gradients as the plain loop") {
    torch::manual_seed(6);
    BnNet reference;
    BnNet wrapped;
    copy_state(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.05);
    DataParallel<BnNet> one(wrapped, cpus(1));
    one.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto batch = make_batch(12);
    for (int step = 0; step < 5; ++step) {
      reference_optimizer.zero_grad();
      mse(*reference, batch).backward();
      reference_optimizer.step();
      one.train_step(batch, mse<BnNetImpl>);
    }
    check_same_parameters(*reference, one.module(), 1e-6, 1e-7);
    CHECK(torch::allclose(reference->bn->running_mean, one.module().bn->running_mean));
    // One replica has no buckets: its zero_grad is the plain optimizer's
    // (LibTorch 2.x sets gradients to none, 1.13 zeroes them in place).
    reference_optimizer.zero_grad();
    const auto ours = wrapped->parameters();
    const auto theirs = reference->parameters();
    for (std::size_t k = 0; k < ours.size(); ++k) {
      REQUIRE(ours[k].grad().defined() == theirs[k].grad().defined());
      if (ours[k].grad().defined()) CHECK(ours[k].grad().abs().sum().item<double>() == 0);
    }
#if TORCH_VERSION_MAJOR >= 2
    CHECK_FALSE(wrapped->fc1->weight.grad().defined());
#endif

    BnNet four;
    DataParallel<BnNet> dp(four, cpus(4));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    for (int step = 0; step < 3; ++step) dp.train_step(batch, mse<BnNetImpl>);
    dp.check_parity();  // includes running_mean, running_var, num_batches_tracked
    CHECK(dp.replica(3).bn->num_batches_tracked.item<int64_t>() == 3);

    DataParallelOptions no_broadcast;
    no_broadcast.broadcast_buffers = false;
    BnNet drifting;
    DataParallel<BnNet> apart(drifting, cpus(2), no_broadcast);
    apart.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    apart.train_step(batch, mse<BnNetImpl>);
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, apart.check_parity());
    CHECK(contains(message, "replica 1 (cpu) has drifted from the primary after 1 optimizer steps: buffer "
                            "bn.running_mean differs"));
  }

  TEST_CASE("dropout (seeded): replicas stay identical, eval outputs agree, one replica is reproducible") {
    const auto batch = make_batch(16);
    auto run_once = [&](std::size_t replicas) {
      torch::manual_seed(42);
      BnNet net(0.3);
      DataParallel<BnNet> dp(net, cpus(replicas));
      dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
      for (int step = 0; step < 4; ++step) {
        CHECK(std::isfinite(dp.train_step(batch, mse<BnNetImpl>)));
      }
      dp.check_parity();
      dp.eval();
      const auto outputs = dp.predict(batch.data, [](BnNetImpl& m, const torch::Tensor& x) { return m.forward(x); });
      const auto direct = [&] {
        torch::NoGradGuard no_grad;
        return dp.module().forward(batch.data);
      }();
      CHECK(torch::allclose(outputs, direct, 1e-6, 1e-7));
      return dp.module().fc2->weight.clone();
    };
    CHECK(torch::equal(run_once(1), run_once(1)));
    run_once(3);
  }
}

TEST_SUITE("DataParallel optimizers") {
  TEST_CASE("module() and optimizer() are the primary's, a learning-rate change reaches every replica") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    auto& sgd = dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.5));
    CHECK(&sgd == &dp.optimizer());
    CHECK(&dp.optimizer<torch::optim::SGD>() == &sgd);
    CHECK(dp.optimizers().size() == 3);
    CHECK(dp.optimizer().param_groups()[0].params()[0].is_same(net->parameters()[0]));
    dp.set_learning_rate(0.01);
    for (auto* optimizer : dp.optimizers()) {
      CHECK(optimizer->param_groups()[0].options().get_lr() == doctest::Approx(0.01));
    }
    CHECK(dp.learning_rate() == doctest::Approx(0.01));
    dp.update_options<torch::optim::SGDOptions>([](torch::optim::SGDOptions& o) { o.momentum(0.8); });
    for (auto* optimizer : dp.optimizers()) {
      CHECK(static_cast<torch::optim::SGDOptions&>(optimizer->param_groups()[0].options()).momentum() ==
            doctest::Approx(0.8));
    }
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.optimizer<torch::optim::Adam>()), "of another type"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.set_learning_rate(-1)), "is not a learning rate"));
  }

  TEST_CASE("train_step without an optimizer says what to do") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.train_step(make_batch(4), mse<MlpImpl>)),
                   "call make_optimizer<Opt>(options) first"));
  }

  TEST_CASE("the optimizer's own zero_grad works on the bucketed gradients") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.forward_backward(make_batch(6), mse<MlpImpl>);
    CHECK(net->fc1->weight.grad().abs().sum().item<double>() > 0);
    // LibTorch 1.x zeroes the gradients; 2.x sets them to None by default.
    for (auto* optimizer : dp.optimizers()) optimizer->zero_grad();
    const auto& cleared = net->fc1->weight.grad();
    CHECK((!cleared.defined() || cleared.abs().sum().item<double>() == 0));
    dp.forward_backward(make_batch(6), mse<MlpImpl>);  // still synchronising into the buckets
    for (std::size_t k = 0; k < dp.replica(0).parameters().size(); ++k) {
      const auto first = dp.replica(0).parameters()[k].grad();
      REQUIRE(first.defined());
      CHECK(first.abs().sum().item<double>() > 0);
      CHECK(torch::equal(first, dp.replica(1).parameters()[k].grad()));  // the shards differ: only a sync makes these equal
    }
    dp.step();
    dp.check_parity();
  }

  TEST_CASE("a replaced gradient is folded back into its bucket") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    for (std::size_t r = 0; r < 2; ++r) {
      for (auto& p : dp.replica(r).parameters()) p.mutable_grad() = torch::Tensor();  // "set to None"
    }
    dp.train_step(make_batch(6), mse<MlpImpl>);
    dp.check_parity();
  }

  TEST_CASE("optimizer state saves and loads into every replica") {
    const std::string path = "multigpu_test_optimizer.pt";
    torch::manual_seed(8);
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2));
    dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
    const auto batch = make_batch(6);
    dp.train_step(batch, mse<MlpImpl>);
    dp.save_optimizer(path);
    dp.save("multigpu_test_module.pt");

    Mlp other;
    DataParallel<Mlp> resumed(other, cpus(2));
    resumed.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
    resumed.load("multigpu_test_module.pt");
    resumed.load_optimizer(path);
    dp.train_step(batch, mse<MlpImpl>);
    resumed.train_step(batch, mse<MlpImpl>);
    check_same_parameters(dp.module(), resumed.module(), 1e-6, 1e-7);
    resumed.check_parity();
    std::remove(path.c_str());
    std::remove("multigpu_test_module.pt");
  }
}

TEST_SUITE("DataParallel checkpoints") {
  TEST_CASE("a checkpoint of DataParallel<Net> is a plain LibTorch checkpoint, both ways") {
    const std::string path = "multigpu_test_checkpoint.pt";
    torch::manual_seed(12);
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(make_batch(9), mse<MlpImpl>);
    dp.save(path);

    Mlp plain;
    torch::load(plain, path);
    check_same_parameters(*net, *plain, 0, 0);
    for (const auto& p : plain->named_parameters()) CHECK_FALSE(contains(p.key(), "module."));

    // And back: a plain checkpoint loads into every replica.
    {
      torch::NoGradGuard no_grad;
      for (auto& p : plain->parameters()) p.add_(1.0);
    }
    torch::save(plain, path);
    dp.load(path);
    for (std::size_t r = 0; r < 3; ++r) check_same_parameters(*plain, dp.replica(r), 0, 0);

    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load("no_such_checkpoint.pt")) ==
          "load: there is no file no_such_checkpoint.pt");
    std::remove(path.c_str());
  }

  TEST_CASE("a failed save leaves the previous checkpoint intact") {
    const std::string path = "multigpu_test_atomic.pt";
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(1));
    dp.save(path);
    Mlp before;
    torch::load(before, path);
    CHECK_THROWS(multigpu::detail::write_file_atomically_with(path, [](multigpu::detail::FileSink& sink) {
      sink.write("half a checkpoint", 6);
      throw std::runtime_error("disk full");
    }));
    Mlp after;
    torch::load(after, path);
    check_same_parameters(*before, *after, 0, 0);
    std::remove(path.c_str());
  }
}

TEST_SUITE("DataParallel failures") {
  TEST_CASE("an exception in replica 2's loss on step 5 names the replica, and step 6 runs normally") {
    torch::manual_seed(13);
    Mlp reference;
    Mlp wrapped;
    copy_state(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), 0.05);
    DataParallel<Mlp> dp(wrapped, cpus(4));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto batch = make_batch(10);
    int step = 0;
    std::vector<MlpImpl*> replicas;
    for (std::size_t r = 0; r < 4; ++r) replicas.push_back(&dp.replica(r));
    auto failing = [&](MlpImpl& net, const torch::data::Example<>& shard) {
      if (step == 5 && &net == replicas[2]) throw std::runtime_error("injected failure");
      return mse(net, shard);
    };
    for (step = 1; step <= 7; ++step) {
      if (step == 5) {
        try {
          dp.train_step(batch, failing);
          FAIL("step 5 should have failed");
        } catch (const multigpu::ReplicaError& e) {
          CHECK(e.replica() == 2);
          CHECK(e.device() == "cpu");
          CHECK(std::string(e.what()) == "replica 2 of 4 (cpu) failed in the loss function (forward): injected failure");
        }
        for (std::size_t r = 0; r < 4; ++r) {
          CHECK(dp.replica(r).fc1->weight.grad().abs().sum().item<double>() == 0);  // nothing left behind
        }
        continue;
      }
      reference_optimizer.zero_grad();
      mse(*reference, batch).backward();
      reference_optimizer.step();
      dp.train_step(batch, failing);
    }
    check_same_parameters(*reference, dp.module(), 1e-5, 1e-6);
    dp.check_parity();
  }

  TEST_CASE("the finite-loss check names the replica") {
    DataParallelOptions options;
    options.check_finite_loss = true;
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    auto batch = make_batch(9);
    batch.target[7][0] = std::numeric_limits<float>::quiet_NaN();  // 9 over 3: sample 7 is replica 2's
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, dp.train_step(batch, mse<MlpImpl>));
    CHECK(contains(message, "replica 2 of 3 (cpu) failed in the finite-loss check: the loss is nan"));
    dp.check_parity();  // the failed step did not touch the parameters
    CHECK(std::isfinite(dp.train_step(make_batch(9), mse<MlpImpl>)));
  }

  TEST_CASE("loss functions that return the wrong thing are told so") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto batch = make_batch(4);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError,
                                         dp.train_step(batch, [](MlpImpl& m, const torch::data::Example<>& s) {
                                           return m.forward(s.data);
                                         })),
                   "returned a tensor of shape [2, 3]; it must return one value"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError,
                                         dp.train_step(batch, [](MlpImpl&, const torch::data::Example<>& s) {
                                           return s.target.sum();
                                         })),
                   "the loss does not require grad"));
    {
      torch::NoGradGuard no_grad;  // carried to every replica's thread
      CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, dp.train_step(batch, mse<MlpImpl>)),
                     "was the forward run under NoGradGuard"));
    }
    CHECK(std::isfinite(dp.train_step(batch, mse<MlpImpl>)));
  }

  TEST_CASE("unused parameters: an error naming them, or left alone with find_unused_parameters") {
    UnusedNet net;
    DataParallel<UnusedNet> strict(net, cpus(2));
    strict.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto batch = make_batch(6);
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, strict.train_step(batch, mse<UnusedNetImpl>));
    CHECK(contains(message, "2 parameter(s) received no gradient in this step: unused.weight (replica 0), "
                            "unused.bias (replica 0)"));
    CHECK(contains(message, "find_unused_parameters = true (each then keeps the gradient it has on one device: None "
                            "after zero_grad on LibTorch 2, which no optimizer steps)"));

    DataParallelOptions lenient;
    lenient.find_unused_parameters = true;
    UnusedNet other;
    const auto before = other->unused->weight.clone();
    DataParallel<UnusedNet> dp(other, cpus(2), lenient);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(batch, mse<UnusedNetImpl>);
    CHECK(torch::equal(other->unused->weight, before));
    dp.check_parity();

    // Frozen parameters are simply left out.
    UnusedNet frozen;
    for (auto& p : frozen->unused->parameters()) p.set_requires_grad(false);
    DataParallel<UnusedNet> freeze(frozen, cpus(2));
    freeze.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    CHECK(std::isfinite(freeze.train_step(batch, mse<UnusedNetImpl>)));
  }

  TEST_CASE("a parameter frozen before wrapping stays frozen on every replica") {
    for (int cloneable = 0; cloneable < 2; ++cloneable) {
      CAPTURE(cloneable);
      torch::manual_seed(3);
      std::shared_ptr<torch::nn::Module> module;
      std::unique_ptr<DataParallel<Mlp>> cloned;
      std::unique_ptr<DataParallel<PlainNet>> built;
      if (cloneable == 1) {
        Mlp net;
        net->fc1->weight.set_requires_grad(false);
        cloned = std::make_unique<DataParallel<Mlp>>(net, cpus(3));
        cloned->make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.9));
        module = net.ptr();
      } else {
        auto net = std::make_shared<PlainNet>();
        net->fc1->weight.set_requires_grad(false);
        built = std::make_unique<DataParallel<PlainNet>>(net, cpus(3));
        built->make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.9));
        module = net;
      }
      const auto frozen = module->named_parameters()["fc1.weight"].clone();
      for (int step = 0; step < 3; ++step) {
        if (cloned) cloned->train_step(make_batch(7, 10 + step), mse<MlpImpl>);
        if (built) built->train_step(make_batch(7, 10 + step), mse<PlainNet>);
      }
      for (std::size_t r = 0; r < 3; ++r) {
        auto& replica = cloned ? static_cast<torch::nn::Module&>(cloned->replica(r))
                               : static_cast<torch::nn::Module&>(built->replica(r));
        const auto weight = replica.named_parameters()["fc1.weight"];
        CHECK_FALSE(weight.requires_grad());
        CHECK(torch::equal(weight, frozen));  // no replica trained it
      }
      if (cloned) cloned->check_parity();
      if (built) built->check_parity();
    }
  }

  TEST_CASE("an option changed on dp.optimizer() (a learning-rate schedule) reaches every replica") {
    torch::manual_seed(4);
    Mlp net;
    Mlp plain = std::dynamic_pointer_cast<MlpImpl>(net->clone());
    DataParallel<Mlp> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.9));
    torch::optim::SGD reference(plain->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    // LibTorch's own scheduler, holding the primary optimizer as users write it.
    torch::optim::StepLR schedule(dp.optimizer(), /*step_size=*/1, /*gamma=*/0.5);
    torch::optim::StepLR reference_schedule(reference, 1, 0.5);
    for (int step = 0; step < 4; ++step) {
      const auto batch = make_batch(9, 20 + step);
      dp.train_step(batch, mse<MlpImpl>);
      reference.zero_grad();
      mse(*plain, batch).backward();
      reference.step();
      schedule.step();
      reference_schedule.step();
    }
    dp.check_parity();  // the replicas did not drift apart
    // The other replicas take the primary's options at each step: they hold
    // the rate of the last step until the next one.
    const auto optimizers = dp.optimizers();
    CHECK(optimizers[0]->param_groups()[0].options().get_lr() == doctest::Approx(0.1 * 0.5 * 0.5 * 0.5));
    for (std::size_t r = 1; r < optimizers.size(); ++r) {
      CHECK(optimizers[r]->param_groups()[0].options().get_lr() == doctest::Approx(0.1 * 0.5 * 0.5));
    }
    for (std::size_t i = 0; i < plain->parameters().size(); ++i) {
      CHECK(torch::allclose(net->parameters()[i], plain->parameters()[i], 1e-5, 1e-6));
    }
  }

  TEST_CASE("the parity check names the replica and parameter that drifted") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    {
      torch::NoGradGuard no_grad;
      dp.replica(2).fc2->bias[0].add_(0.5);
    }
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, dp.check_parity());
    CHECK(contains(message, "replica 2 (cpu) has drifted from the primary after 0 optimizer steps: parameter "
                            "fc2.bias differs (largest difference 0.5)"));
    dp.resync_from_primary();
    dp.check_parity();

    DataParallelOptions every;
    every.parity_check_every = 2;
    Mlp watched;
    DataParallel<Mlp> checked(watched, cpus(2), every);
    checked.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    checked.train_step(make_batch(4), mse<MlpImpl>);
    {
      torch::NoGradGuard no_grad;
      checked.replica(1).fc1->weight[0][0].add_(1.0);
    }
    CHECK_THROWS_AS(checked.train_step(make_batch(4), mse<MlpImpl>), multigpu::ReplicaError);
  }

  TEST_CASE("devices must be all CPU or all GPUs, and present") {
    Mlp net;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, DataParallel<Mlp>(net, std::vector<c10::Device>{})),
                   "no device given"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error,
                                         DataParallel<Mlp>(net, {c10::Device("cpu"), c10::Device("cuda:0")})),
                   "replicas must be all GPUs or all CPU"));
  }
}

TEST_SUITE("DataParallel inference and sync statistics") {
  TEST_CASE("predict gathers every replica's output in order") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    const auto x = torch::randn({8, 6});
    const auto out = dp.predict(x, [](MlpImpl& m, const torch::Tensor& shard) { return m.forward(shard); });
    torch::NoGradGuard no_grad;
    CHECK(torch::allclose(out, net->forward(x), 1e-6, 1e-7));
    const auto two = dp.predict(torch::randn({2, 6}), [](MlpImpl& m, const torch::Tensor& s) { return m.forward(s); });
    CHECK(two.size(0) == 2);
  }

  TEST_CASE("predict outputs that are not one tensor come back whole and in order") {
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(3));
    const auto x = torch::randn({7, 6});
    const auto direct = [&] {
      torch::NoGradGuard no_grad;
      return net->forward(x);
    }();
    const auto tuple = dp.predict(x, [](MlpImpl& m, const torch::Tensor& s) {
      const auto y = m.forward(s);
      return std::make_tuple(y, y.argmax(1), std::make_pair(y * 2, y.sum(1)));
    });
    CHECK(torch::allclose(std::get<0>(tuple), direct, 1e-6, 1e-7));
    CHECK(torch::equal(std::get<1>(tuple), direct.argmax(1)));
    CHECK(torch::allclose(std::get<2>(tuple).first, direct * 2, 1e-6, 1e-7));
    CHECK(torch::allclose(std::get<2>(tuple).second, direct.sum(1), 1e-5, 1e-6));
    const auto example = dp.predict(x, [](MlpImpl& m, const torch::Tensor& s) {
      return torch::data::Example<>(m.forward(s), s);
    });
    CHECK(torch::allclose(example.data, direct, 1e-6, 1e-7));
    CHECK(torch::equal(example.target, x));
    const auto rows = dp.predict(x, [](MlpImpl& m, const torch::Tensor& s) {
      std::vector<torch::Tensor> out;
      const auto y = m.forward(s);
      for (std::int64_t i = 0; i < y.size(0); ++i) out.push_back(y[i]);
      return out;
    });
    REQUIRE(rows.size() == 7);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      CHECK(torch::allclose(rows[i], direct[static_cast<std::int64_t>(i)], 1e-6, 1e-7));
    }
  }

  TEST_CASE("visit_tensors finds every tensor of a nested output, and says when it cannot see into one") {
    const auto a = torch::zeros({1});
    const auto b = torch::ones({2});
    const auto c = torch::ones({3});
    std::vector<std::int64_t> seen;
    const auto record = [&](const torch::Tensor& t) { seen.push_back(t.numel()); };
    const std::tuple<torch::Tensor, std::vector<std::pair<torch::Tensor, torch::Tensor>>, torch::data::Example<>,
                     torch::data::TensorExample>
        nested{a, {{b, c}, {c, a}}, {b, c}, torch::data::TensorExample(a)};
    CHECK(multigpu::detail::visit_tensors(nested, record));
    CHECK(seen == std::vector<std::int64_t>{1, 2, 3, 3, 1, 2, 3, 1});
    seen.clear();
    const std::pair<torch::Tensor, Opaque> mixed{b, Opaque{c}};
    CHECK_FALSE(multigpu::detail::visit_tensors(mixed, record));  // the tensor it can see is still visited
    CHECK(seen == std::vector<std::int64_t>{2});
    seen.clear();
    CHECK(multigpu::detail::visit_tensors(std::vector<Listed>{Listed{a, b}}, record));  // through BatchTraits
    CHECK(seen == std::vector<std::int64_t>{1, 2});
  }

  TEST_CASE("buckets follow reverse registration order, and the sync overlaps backward") {
    DataParallelOptions options;
    options.bucket_cap_mib = 0.0001;
    Mlp net;
    DataParallel<Mlp> dp(net, cpus(2), options);
    const auto* buckets = dp.gradient_buckets();
    REQUIRE(buckets != nullptr);
    CHECK(buckets->size() == 4);  // fc2.bias, fc2.weight, fc1.bias, fc1.weight: each over the cap
    CHECK(buckets->front().parameters == std::vector<std::size_t>{3});
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(make_batch(8), mse<MlpImpl>);
    const auto stats = dp.last_sync_stats();
    REQUIRE(stats.has_value());
    CHECK(stats->buckets == 4);
    CHECK(stats->overlapped_buckets >= 1);  // at least the first bucket is launched during backward
    CHECK(stats->total_ms >= 0);

    Mlp single;
    DataParallel<Mlp> one(single, cpus(1));
    CHECK(one.gradient_buckets() == nullptr);
    CHECK_FALSE(one.last_sync_stats().has_value());
  }
}

namespace {

/// Registered a then b, but run b then a: backward produces a's gradients
/// first, while bucketing (reverse registration) puts b's in the first buckets.
struct OutOfOrderImpl : torch::nn::Cloneable<OutOfOrderImpl> {
  OutOfOrderImpl() { reset(); }
  void reset() override {
    a = register_module("a", torch::nn::Linear(5, 2));
    b = register_module("b", torch::nn::Linear(3, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) { return a(b(x)); }
  torch::nn::Linear a{nullptr}, b{nullptr};
};
TORCH_MODULE(OutOfOrder);

/// The local backend, noting the size of every all-reduce in call order.
class RecordingCommunicator : public multigpu::LocalCommunicator {
 public:
  RecordingCommunicator(std::vector<multigpu::ReplicaContext> replicas, std::shared_ptr<std::vector<std::int64_t>> log)
      : LocalCommunicator(std::move(replicas)), log_(std::move(log)) {}
  void all_reduce(const std::vector<at::Tensor>& tensors, multigpu::ReduceOp op) override {
    log_->push_back(tensors[0].numel());
    LocalCommunicator::all_reduce(tensors, op);
  }

 private:
  std::shared_ptr<std::vector<std::int64_t>> log_;
};

/// The local backend, counting its broadcasts.
class CountingCommunicator : public multigpu::LocalCommunicator {
 public:
  CountingCommunicator(std::vector<multigpu::ReplicaContext> replicas, std::shared_ptr<std::atomic<int>> broadcasts)
      : LocalCommunicator(std::move(replicas)), broadcasts_(std::move(broadcasts)) {}
  void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override {
    ++*broadcasts_;
    LocalCommunicator::broadcast(tensors, root);
  }

 private:
  std::shared_ptr<std::atomic<int>> broadcasts_;
};

/// The same, as a backend that matches collectives by their order (NCCL, Gloo).
class OrderedCommunicator : public RecordingCommunicator {
 public:
  using RecordingCommunicator::RecordingCommunicator;
  bool needs_one_order() const override { return true; }
};

}  // namespace

TEST_SUITE("DataParallel bucket order") {
  TEST_CASE("buffers reach the replicas in one broadcast per dtype after each step") {
    auto broadcasts = std::make_shared<std::atomic<int>>(0);
    DataParallelOptions options;
    options.make_communicator = [broadcasts](const std::vector<multigpu::ReplicaContext>& replicas) {
      return std::make_unique<CountingCommunicator>(replicas, broadcasts);
    };
    torch::manual_seed(5);
    BnNet net;  // buffers: running_mean and running_var (float), num_batches_tracked (int64)
    DataParallel<BnNet> dp(net, cpus(3), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const int at_construction = broadcasts->load();
    CHECK(at_construction == static_cast<int>(net->parameters().size()) + 2);  // parameters one by one
    for (int step = 1; step <= 3; ++step) {
      dp.train_step(make_batch(9, 30 + static_cast<std::uint64_t>(step)), mse<BnNetImpl>);
      CHECK(broadcasts->load() - at_construction == 2 * step);
    }
    dp.check_parity();  // every replica holds the primary's statistics
    for (std::size_t r = 1; r < 3; ++r) {
      CHECK(torch::equal(dp.replica(r).bn->running_var, net->bn->running_var));
      CHECK(dp.replica(r).bn->num_batches_tracked.item<std::int64_t>() == 3);
    }
  }

  TEST_CASE("the buffer broadcast writes the receivers only, never the primary's own buffers") {
    // An in-place write bumps a tensor's version, and autograd refuses a
    // backward through a buffer saved by a forward (BatchNorm in eval mode
    // saves its running statistics) once it was written.
    torch::manual_seed(8);
    BnNet net;
    DataParallel<BnNet> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(make_batch(9), mse<BnNetImpl>);
    dp.eval();
    const auto output = net->forward(torch::randn({4, 6}));  // saves running_mean and running_var
    {
      torch::NoGradGuard no_grad;
      for (std::size_t r = 1; r < 3; ++r) dp.replica(r).bn->running_mean.fill_(-1);
    }
    const auto version = net->bn->running_mean._version();
    dp.broadcast_buffers();
    CHECK(net->bn->running_mean._version() == version);
    output.sum().backward();  // "modified by an inplace operation" if the primary's buffer had been written
    dp.check_parity();
  }

  TEST_CASE("several launch threads are refused for a backend that needs one order of collectives") {
    auto log = std::make_shared<std::vector<std::int64_t>>();
    DataParallelOptions options;
    options.comm_threads = 2;
    options.make_communicator = [log](const std::vector<multigpu::ReplicaContext>& replicas) {
      return std::make_unique<OrderedCommunicator>(replicas, log);
    };
    Mlp net;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, DataParallel<Mlp>(net, cpus(2), options)),
                   "comm_threads is 2, but the local backend must receive every collective in one order"));
    options.comm_threads = 1;
    DataParallel<Mlp> dp(net, cpus(2), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(make_batch(6), mse<MlpImpl>);
    CHECK_FALSE(log->empty());
  }

  TEST_CASE("buckets are all-reduced in bucket order, and rebuilt once in the order gradients become ready") {
    auto log = std::make_shared<std::vector<std::int64_t>>();
    DataParallelOptions options;
    options.bucket_cap_mib = 1e-6;  // one parameter per bucket
    options.comm_threads = 1;       // calls reach the communicator in launch order
    options.make_communicator = [log](const std::vector<multigpu::ReplicaContext>& replicas) {
      return std::make_unique<RecordingCommunicator>(replicas, log);
    };
    OutOfOrder net;
    DataParallel<OutOfOrder> dp(net, cpus(2), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    auto bucket_sizes = [&] {
      std::vector<std::int64_t> sizes;
      for (const auto& bucket : *dp.gradient_buckets()) sizes.push_back(bucket.numel);
      return sizes;
    };
    REQUIRE(dp.gradient_buckets() != nullptr);
    REQUIRE(dp.gradient_buckets()->size() == 4);
    // Reverse registration order puts b's parameters (5 and 15 values)
    // first, but backward finishes a's (2 and 10) first.
    const std::vector<std::int64_t> registered = bucket_sizes();
    CHECK(registered == std::vector<std::int64_t>{5, 15, 2, 10});
    auto loss = [](OutOfOrderImpl& m, const torch::Tensor& x) { return m.forward(x).pow(2).mean(); };
    // The same training without overlap, where nothing is rebuilt: the reference.
    DataParallelOptions plain_options;
    plain_options.overlap_sync_with_backward = false;
    DataParallel<OutOfOrder> plain(std::dynamic_pointer_cast<OutOfOrderImpl>(net->clone()), cpus(2), plain_options);
    plain.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    torch::manual_seed(3);
    std::vector<torch::Tensor> batches;
    for (int step = 0; step < 4; ++step) batches.push_back(torch::randn({4, 3}));

    dp.train_step(batches[0], loss);
    plain.train_step(batches[0], loss);
    CHECK(*log == registered);  // launched in bucket order, a complete bucket waiting for the earlier ones
    CHECK(bucket_sizes() == registered);  // rebuilt only before the next synchronising backward
    for (int step = 1; step < 4; ++step) {
      log->clear();
      dp.train_step(batches[static_cast<std::size_t>(step)], loss);
      plain.train_step(batches[static_cast<std::size_t>(step)], loss);
      const std::vector<std::int64_t> order = bucket_sizes();
      CHECK(*log == order);
      REQUIRE(order.size() == 4);
      CHECK(std::min(order[0], order[1]) == 2);  // a's parameters now lead
      CHECK(std::max(order[0], order[1]) == 10);
      CHECK(std::min(order[2], order[3]) == 5);
      CHECK(std::max(order[2], order[3]) == 15);
    }
    dp.check_parity();
    for (const auto& item : plain.module().named_parameters()) {
      CHECK(torch::allclose(*dp.module().named_parameters().find(item.key()), item.value(), 1e-6, 1e-7));
    }
  }

}
