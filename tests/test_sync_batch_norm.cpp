// SyncBatchNorm (multigpu/sync_batch_norm.hpp): K CPU replicas in float64
// against one model with plain BatchNorm on the whole batch.

#include "support.hpp"

#include <chrono>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

using multigpu::DataParallel;
using multigpu_test::contains;

namespace {

constexpr std::int64_t kC = 5;  // channels: the statistics' all-reduces have 2C+1 and 2C values

std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

struct Shape {
  int dims = 1;  // BatchNorm1d, 2d or 3d
  bool affine = true;
  c10::optional<double> momentum = 0.1;
};

// Linear/Conv -> BatchNorm -> Tanh, in float64, with the BatchNorm's weight
// and bias not at their defaults.
torch::nn::Sequential make_net(const Shape& shape) {
  torch::manual_seed(11);
  torch::nn::BatchNormOptions options(kC);
  options.affine(shape.affine).momentum(shape.momentum);
  torch::nn::Sequential net;
  if (shape.dims == 1) {
    net = torch::nn::Sequential(torch::nn::Linear(3, kC), torch::nn::BatchNorm1d(options), torch::nn::Tanh());
  } else if (shape.dims == 2) {
    net = torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(2, kC, 1)), torch::nn::BatchNorm2d(options),
                                torch::nn::Tanh());
  } else {
    net = torch::nn::Sequential(torch::nn::Conv3d(torch::nn::Conv3dOptions(2, kC, 1)), torch::nn::BatchNorm3d(options),
                                torch::nn::Tanh());
  }
  net->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (auto& item : net->named_parameters()) {
    if (contains(item.key(), "1.")) item.value().uniform_(0.5, 1.5);
  }
  return net;
}

torch::data::Example<> make_batch(const Shape& shape, std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  const auto options = torch::TensorOptions().dtype(torch::kDouble);
  if (shape.dims == 1) return {torch::randn({n, 3}, options) * 2 + 1, torch::randn({n, kC}, options)};
  if (shape.dims == 2) return {torch::randn({n, 2, 3, 2}, options) * 2 + 1, torch::randn({n, kC, 3, 2}, options)};
  return {torch::randn({n, 2, 2, 2, 2}, options) * 2 + 1, torch::randn({n, kC, 2, 2, 2}, options)};
}

template <class Module>
torch::Tensor loss_of(Module& net, const torch::data::Example<>& shard) {
  return (net.forward(shard.data) - shard.target).pow(2).mean();
}

void check_same_state(torch::nn::Module& got, torch::nn::Module& want, const std::string& what) {
  auto want_parameters = want.named_parameters();
  for (const auto& item : got.named_parameters()) {
    INFO(what << ": parameter " << item.key());
    REQUIRE(want_parameters.contains(item.key()));
    CHECK(torch::allclose(item.value(), want_parameters[item.key()], 0, 1e-10));
  }
  CHECK(got.named_parameters().size() == want_parameters.size());
  auto want_buffers = want.named_buffers();
  for (const auto& item : got.named_buffers()) {
    INFO(what << ": buffer " << item.key());
    REQUIRE(want_buffers.contains(item.key()));
    if (item.value().scalar_type() == torch::kLong) {
      CHECK(torch::equal(item.value(), want_buffers[item.key()]));
    } else {
      CHECK(torch::allclose(item.value(), want_buffers[item.key()], 0, 1e-10));
    }
  }
  CHECK(got.named_buffers().size() == want_buffers.size());
}

// Two SGD steps of K replicas with SyncBatchNorm against one plain model on
// the whole batch: same losses, parameters and buffers.
void check_against_plain(const Shape& shape, std::size_t replicas, std::int64_t batch) {
  auto plain = make_net(shape);
  torch::optim::SGD plain_optimizer(plain->parameters(), torch::optim::SGDOptions(0.1));
  auto net = make_net(shape);
  REQUIRE(multigpu::convert_sync_batchnorm(*net) == 1);
  DataParallel<torch::nn::Sequential> dp(net, cpus(replicas));
  dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
  for (std::uint64_t step = 0; step < 2; ++step) {
    const auto data = make_batch(shape, batch, 100 + step);
    plain_optimizer.zero_grad();
    const torch::Tensor plain_loss = loss_of(*plain, data);
    plain_loss.backward();
    plain_optimizer.step();
    const double loss = dp.train_step(data, [](auto& m, const torch::data::Example<>& shard) {
      return loss_of(m, shard);
    });
    CHECK(std::abs(loss - plain_loss.item<double>()) < 1e-10);
  }
  check_same_state(dp.module(), *plain, "after two steps");
}

// A LocalCommunicator that records the size of every all-reduce.
class CountingCommunicator : public multigpu::LocalCommunicator {
 public:
  CountingCommunicator(std::vector<multigpu::ReplicaContext> replicas, std::vector<std::int64_t>* sizes,
                       std::mutex* mutex)
      : LocalCommunicator(std::move(replicas)), sizes_(sizes), mutex_(mutex) {}
  void all_reduce(const std::vector<at::Tensor>& tensors, multigpu::ReduceOp op) override {
    {
      std::lock_guard<std::mutex> lock(*mutex_);
      sizes_->push_back(tensors[0].numel());
    }
    LocalCommunicator::all_reduce(tensors, op);
  }

 private:
  std::vector<std::int64_t>* sizes_;
  std::mutex* mutex_;
};

// A model that calls `extra` only on samples marked by a large first feature.
struct BranchNetImpl : torch::nn::Cloneable<BranchNetImpl> {
  BranchNetImpl() { reset(); }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(3, kC));
    bn = register_module("bn", multigpu::SyncBatchNorm(kC));
    extra = register_module("extra", multigpu::SyncBatchNorm(kC));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = bn(linear(x));
    if (x.size(0) > 0 && x[0][0].item<double>() > 100) y = extra(y);
    return y;
  }
  torch::nn::Linear linear{nullptr};
  multigpu::SyncBatchNorm bn{nullptr}, extra{nullptr};
};
TORCH_MODULE(BranchNet);

// A BatchNorm its parent calls through a member.
struct MemberNetImpl : torch::nn::Cloneable<MemberNetImpl> {
  MemberNetImpl() { reset(); }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(3, kC));
    bn = register_module("bn", torch::nn::BatchNorm1d(kC));
  }
  torch::Tensor forward(const torch::Tensor& x) { return bn(linear(x)); }
  torch::nn::Linear linear{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(MemberNet);

}  // namespace

TEST_CASE("SyncBatchNorm: K replicas give the whole batch's outputs, gradients and running statistics") {
  for (const int dims : {1, 2}) {
    for (const bool affine : {true, false}) {
      for (const bool cumulative : {false, true}) {
        Shape shape;
        shape.dims = dims;
        shape.affine = affine;
        shape.momentum = cumulative ? c10::optional<double>() : c10::optional<double>(0.1);
        for (const std::size_t replicas : {2, 3, 4}) {
          // An empty shard (K-1 samples, at least 2), shards of 1 sample (K+1), uneven shards (2K+3).
          std::vector<std::int64_t> batches{static_cast<std::int64_t>(replicas) + 1,
                                            2 * static_cast<std::int64_t>(replicas) + 3};
          if (replicas >= 3) batches.push_back(static_cast<std::int64_t>(replicas) - 1);
          for (const auto batch : batches) {
            INFO(dims << "d, affine " << affine << ", momentum " << (cumulative ? "none" : "0.1") << ", " << replicas
                      << " replicas, batch " << batch);
            check_against_plain(shape, replicas, batch);
          }
        }
      }
    }
  }
}

TEST_CASE("SyncBatchNorm: 3d inputs over 3 replicas, with an empty shard") {
  Shape shape;
  shape.dims = 3;
  check_against_plain(shape, 3, 2);
  check_against_plain(shape, 3, 7);
}

TEST_CASE("SyncBatchNorm: one collective per layer in forward and one in backward, none in eval mode") {
  std::vector<std::int64_t> sizes;
  std::mutex mutex;
  multigpu::DataParallelOptions options;
  options.make_communicator = [&](const std::vector<multigpu::ReplicaContext>& contexts) {
    return std::make_unique<CountingCommunicator>(contexts, &sizes, &mutex);
  };
  const Shape shape;
  auto plain = make_net(shape);
  auto net = make_net(shape);
  multigpu::convert_sync_batchnorm(*net);
  DataParallel<torch::nn::Sequential> dp(net, cpus(3), options);
  const auto data = make_batch(shape, 7, 5);
  auto count = [&](std::int64_t numel) {
    std::lock_guard<std::mutex> lock(mutex);
    return std::count(sizes.begin(), sizes.end(), numel);
  };
  dp.eval();
  plain->eval();
  sizes.clear();
  const double loss =
      dp.forward_backward(data, [](auto& m, const torch::data::Example<>& shard) { return loss_of(m, shard); });
  CHECK(count(2 * kC + 1) == 0);
  CHECK(count(2 * kC) == 0);
  CHECK(std::abs(loss - loss_of(*plain, data).item<double>()) < 1e-10);  // with the running statistics
  check_same_state(dp.module(), *plain, "after an eval-mode step");     // which eval mode does not update

  dp.zero_grad();
  dp.train();
  sizes.clear();
  dp.forward_backward(data, [](auto& m, const torch::data::Example<>& shard) { return loss_of(m, shard); });
  CHECK(count(2 * kC + 1) == 1);
  CHECK(count(2 * kC) == 1);
}

TEST_CASE("SyncBatchNorm: a layer called on one replica only ends in an error naming it, not a hang") {
  multigpu::DataParallelOptions options;
  options.collective_timeout = std::chrono::milliseconds(300);
  options.find_unused_parameters = true;  // `extra` is used on some steps only
  BranchNet net;
  net->to(torch::kDouble);
  DataParallel<BranchNet> dp(net, cpus(2), options);
  dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
  auto data = make_batch(Shape{}, 4, 3);
  data.data[2][0] = 1000;  // replica 1's first sample: only replica 1 calls `extra`
  const auto start = std::chrono::steady_clock::now();
  const std::string message = MULTIGPU_TEST_MESSAGE(
      multigpu::Error,
      dp.train_step(data, [](auto& m, const torch::data::Example<>& shard) { return loss_of(m, shard); }));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  INFO(message);
  CHECK(contains(message, "SyncBatchNorm '"));
  CHECK(contains(message, "'extra'"));
  CHECK(contains(message, "branch taken on some replicas only"));

  // The next step, where the replicas agree, trains.
  const auto fine = make_batch(Shape{}, 4, 4);
  const double loss =
      dp.train_step(fine, [](auto& m, const torch::data::Example<>& shard) { return loss_of(m, shard); });
  CHECK(std::isfinite(loss));
}

TEST_CASE("SyncBatchNorm: a replica that fails wakes the others waiting for it at once, with an error") {
  multigpu::DataParallelOptions options;
  options.collective_timeout = std::chrono::seconds(60);  // the others must not wait for it
  BranchNet net;
  net->to(torch::kDouble);
  DataParallel<BranchNet> dp(net, cpus(3), options);
  auto data = make_batch(Shape{}, 6, 3);
  data.data[4][0] = 1000;  // replica 2's first sample
  const auto start = std::chrono::steady_clock::now();
  auto loss = [](auto& m, const torch::data::Example<>& shard) {
    if (shard.data[0][0].template item<double>() > 100) throw std::runtime_error("replica 2's own failure");
    return loss_of(m, shard);
  };
  const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.forward_backward(data, loss));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  INFO(message);
  CHECK(contains(message, "replica 2's own failure"));
  // The others either were waiting in the layer when replica 2 failed ("stopped waiting at call #1") or
  // reached it after ("the step failed already"): which one depends on the threads' timing, and both
  // must name replica 2's failure without waiting for the time-out.
  CHECK(contains(message, "SyncBatchNorm 'bn'"));
  CHECK(contains(message, "replica 2 failed: its loss function or backward threw"));
}

TEST_CASE("SyncBatchNorm: outside a DataParallel it is BatchNorm, with a note shown once") {
  for (const bool cumulative : {false, true}) {
    torch::nn::BatchNormOptions options(kC);
    options.momentum(cumulative ? c10::optional<double>() : c10::optional<double>(0.1));
    torch::nn::BatchNorm2d plain(options);
    multigpu::SyncBatchNorm sync(options);
    plain->to(torch::kDouble);
    sync->to(torch::kDouble);
    multigpu_test::CapturedLog log;
    for (int step = 0; step < 2; ++step) {
      const auto x = torch::randn({4, kC, 3, 3}, torch::kDouble);
      CHECK(torch::allclose(sync(x), plain(x), 0, 1e-12));
    }
    check_same_state(*sync, *plain, "outside DataParallel");
    sync->eval();
    plain->eval();
    const auto x = torch::randn({4, kC, 3, 3}, torch::kDouble);
    CHECK(torch::allclose(sync(x), plain(x), 0, 1e-12));
    for (const auto& line : log.infos()) CHECK(contains(line, "outside a DataParallel step"));
    if (cumulative) CHECK(log.infos().empty());  // once per program
  }
}

TEST_CASE("SyncBatchNorm: clone() gives an equal, independent layer") {
  multigpu::SyncBatchNorm sync(torch::nn::BatchNormOptions(kC).momentum(c10::nullopt));
  {
    torch::NoGradGuard no_grad;
    sync->weight.uniform_();
    sync->running_mean.uniform_();
  }
  auto copy = std::dynamic_pointer_cast<multigpu::SyncBatchNormImpl>(sync->clone());
  REQUIRE(copy);
  check_same_state(*copy, *sync, "clone");
  CHECK_FALSE(copy->options.momentum().has_value());
  CHECK(copy->weight.data_ptr() != sync->weight.data_ptr());
}

TEST_CASE("convert_sync_batchnorm: names, options and state kept, and checkpoints load both ways") {
  Shape shape;
  shape.dims = 2;
  shape.momentum = c10::nullopt;
  auto plain = make_net(shape);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : plain->named_buffers()) {
      if (item.value().is_floating_point()) item.value().uniform_(0.5, 1.5);
    }
  }
  auto converted = make_net(shape);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : plain->named_buffers()) converted->named_buffers()[item.key()].copy_(item.value());
  }
  converted->eval();
  REQUIRE(multigpu::convert_sync_batchnorm(*converted) == 1);
  auto* layer = converted->ptr(1)->as<multigpu::SyncBatchNormImpl>();  // the element forward() calls
  REQUIRE(layer != nullptr);
  CHECK(converted->named_children()[std::string("1")]->as<multigpu::SyncBatchNormImpl>() == layer);
  CHECK_FALSE(layer->options.momentum().has_value());
  CHECK_FALSE(layer->is_training());
  check_same_state(*converted, *plain, "converted");

  const std::string path = "/tmp/multigpu_test_sync_bn.pt";
  torch::save(converted, path);
  auto plain_again = make_net(shape);
  torch::load(plain_again, path);
  check_same_state(*plain_again, *converted, "converted -> plain");

  torch::save(plain, path);
  auto converted_again = make_net(Shape{2, true, 0.1});
  multigpu::convert_sync_batchnorm(*converted_again);
  torch::load(converted_again, path);
  check_same_state(*converted_again, *plain, "plain -> converted");
  std::remove(path.c_str());
}

TEST_CASE("convert_sync_batchnorm: a module without BatchNorm warns, and a member-held BatchNorm is an error") {
  {
    multigpu_test::CapturedLog log;
    torch::nn::Sequential net(torch::nn::Linear(3, 2));
    CHECK(multigpu::convert_sync_batchnorm(*net) == 0);
    REQUIRE(log.warnings().size() == 1);
    CHECK(contains(log.warnings()[0], "has no torch::nn::BatchNorm1d/2d/3d"));
  }
  MemberNet net;
  const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::convert_sync_batchnorm(*net));
  INFO(message);
  CHECK(contains(message, "('bn')"));
  CHECK(contains(message, "Declare those layers as multigpu::SyncBatchNorm"));
  CHECK(net->named_children()[std::string("bn")]->as<torch::nn::BatchNorm1dImpl>() != nullptr);  // unchanged
}
