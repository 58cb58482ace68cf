// Autocast on every replica (DataParallelOptions::precision), on CPU replicas.

#include "support.hpp"  // first: see its comment

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu::Precision;
using multigpu_test::contains;

namespace {

struct SmallMlpImpl : torch::nn::Cloneable<SmallMlpImpl> {
  SmallMlpImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 32));
    fc2 = register_module("fc2", torch::nn::Linear(32, 3));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(SmallMlp);

std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

/// A learnable target: y = tanh(x A) B.
torch::data::Example<> make_task(std::int64_t n) {
  torch::manual_seed(11);
  const auto a = torch::randn({6, 8});
  const auto b = torch::randn({8, 3}) * 0.5;
  const auto x = torch::randn({n, 6});
  return {x, torch::tanh(x.mm(a)).mm(b)};
}

}  // namespace

TEST_SUITE("precision") {
  TEST_CASE("precision names parse, and a wrong one is told what is valid") {
    CHECK((multigpu::parse_precision("fp32") == Precision::kFloat32));
    CHECK((multigpu::parse_precision("bf16") == Precision::kBFloat16));
    CHECK((multigpu::parse_precision("float16") == Precision::kFloat16));
    CHECK(std::string(multigpu::precision_name(Precision::kBFloat16)) == "bf16");
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::parse_precision("fp8"));
    CHECK(contains(message, "\"fp8\" is not one of fp32, bf16, fp16"));
  }

  TEST_CASE("bf16 on every CPU replica: Linear outputs are bf16, the rest float32, replicas identical, it converges") {
    torch::manual_seed(3);
    SmallMlp net;
    DataParallelOptions options;
    options.precision = Precision::kBFloat16;
    DataParallel<SmallMlp> dp(net, cpus(3), options);
    dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));

    std::mutex mutex;
    std::set<std::thread::id> threads;
    std::set<c10::ScalarType> hidden_types;
    auto loss_fn = [&](SmallMlpImpl& m, const torch::data::Example<>& shard) {
      const auto hidden = m.fc1(shard.data);
      {
        const std::lock_guard<std::mutex> lock(mutex);
        threads.insert(std::this_thread::get_id());
        hidden_types.insert(hidden.scalar_type());
      }
      return torch::mse_loss(m.fc2(torch::tanh(hidden)).to(torch::kFloat), shard.target);
    };
    const auto batch = make_task(96);
    const double first = dp.train_step(batch, loss_fn);
    double last = first;
    for (int step = 0; step < 150; ++step) last = dp.train_step(batch, loss_fn);

    CHECK(threads.size() == 3);  // every replica's thread ran under autocast
    CHECK((hidden_types == std::set<c10::ScalarType>{torch::kBFloat16}));
    CHECK(last < 0.1 * first);
    for (const auto& p : dp.module().parameters()) CHECK((p.scalar_type() == torch::kFloat));
    dp.check_parity();
    // Replica 0 runs on this thread: autocast is off here again afterwards.
    CHECK_FALSE(multigpu::compat::autocast_enabled(c10::DeviceType::CPU));
    CHECK((net->fc1(batch.data).scalar_type() == torch::kFloat));
  }

  TEST_CASE("bf16 autocast leaves a caller's own autocast setting as it was") {
    SmallMlp net;
    DataParallelOptions options;
    options.precision = Precision::kBFloat16;
    DataParallel<SmallMlp> dp(net, cpus(2), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01));
    const auto previous = multigpu::compat::autocast_dtype(c10::DeviceType::CPU);
    dp.train_step(make_task(8), [](SmallMlpImpl& m, const torch::data::Example<>& shard) {
      return torch::mse_loss(m.fc2(m.fc1(shard.data)).to(torch::kFloat), shard.target);
    });
    CHECK((multigpu::compat::autocast_dtype(c10::DeviceType::CPU) == previous));
    CHECK_FALSE(multigpu::compat::autocast_enabled(c10::DeviceType::CPU));
  }

  TEST_CASE("fp16 on CPU replicas runs in float16 where LibTorch can, and is refused where it cannot") {
    SmallMlp net;
    DataParallelOptions options;
    options.precision = Precision::kFloat16;
    std::string message;
    std::mutex mutex;  // both replicas' threads write `seen`
    c10::ScalarType seen = torch::kFloat;
    try {
      DataParallel<SmallMlp> dp(net, cpus(2), options);
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01));
      dp.train_step(make_task(8), [&](SmallMlpImpl& m, const torch::data::Example<>& shard) {
        const auto out = m.fc2(m.fc1(shard.data));
        const std::lock_guard<std::mutex> lock(mutex);
        seen = out.scalar_type();
        return torch::mse_loss(out.to(torch::kFloat), shard.target);
      });
    } catch (const multigpu::Error& e) {
      message = e.what();
    }
#if TORCH_VERSION_MAJOR < 2
    // LibTorch 1.13's CPU autocast has no float16 kernels.
    CHECK(contains(message, "DataParallelOptions::precision is fp16, but LibTorch"));
    CHECK(contains(message, "cannot autocast to Half on cpu"));
    CHECK(contains(message, "Use bf16 or fp32 instead"));
#elif TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 4
    CHECK(message.empty());
    CHECK((seen == torch::kHalf));
#else
    CHECK((message.empty() ? seen == torch::kHalf : contains(message, "cannot autocast to Half on cpu")));
#endif
  }
}
