// GradScaler and clip_grad_norm on CPU replicas: the scale's rule, skipped
// steps agreed by every replica, clipping with the global norm, state.

#include "support.hpp"  // first: see its comment

#include "small_net.hpp"

#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu::GradScaler;
using multigpu::GradScalerOptions;
using multigpu_test::contains;

namespace {

using namespace multigpu_test::small_net;

torch::data::Example<> make_batch(std::int64_t n, std::uint64_t seed = 5) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}), torch::randn({n, 3})};
}

std::vector<torch::Tensor> snapshot(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (const auto& p : module.parameters()) out.push_back(p.detach().clone());
  return out;
}

bool same_as(const torch::nn::Module& module, const std::vector<torch::Tensor>& saved) {
  const auto params = module.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (!torch::equal(params[i], saved[i])) return false;
  }
  return true;
}

GradScalerOptions quick_growth() {
  GradScalerOptions options;
  options.init_scale = 1024;
  options.growth_interval = 3;
  return options;
}

}  // namespace

TEST_SUITE("GradScaler") {
  TEST_CASE("PyTorch's defaults, and the scale's rule: x2 after growth_interval good steps, x0.5 on overflow") {
    GradScaler defaults;
    CHECK(defaults.scale() == 65536.0);
    CHECK(defaults.options().growth_factor == 2.0);
    CHECK(defaults.options().backoff_factor == 0.5);
    CHECK(defaults.options().growth_interval == 2000);
    for (int i = 0; i < 1999; ++i) defaults.update(false);
    CHECK(defaults.scale() == 65536.0);
    CHECK(defaults.growth_tracker() == 1999);
    defaults.update(false);
    CHECK(defaults.scale() == 131072.0);
    CHECK(defaults.growth_tracker() == 0);

    GradScaler scaler(quick_growth());
    scaler.update(false);
    scaler.update(false);
    scaler.update(true);  // an overflow resets the count
    CHECK(scaler.scale() == 512.0);
    CHECK(scaler.growth_tracker() == 0);
    CHECK(scaler.skipped_steps() == 1);
    CHECK(scaler.last_step_skipped());
    for (int i = 0; i < 3; ++i) scaler.update(false);
    CHECK(scaler.scale() == 1024.0);
    CHECK_FALSE(scaler.last_step_skipped());
  }

  TEST_CASE("options that make no scaler are refused, saying which") {
    GradScalerOptions zero;
    zero.init_scale = 0;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, GradScaler(zero)), "the scale must be positive"));
    GradScalerOptions shrink;
    shrink.growth_factor = 0.5;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, GradScaler(shrink)), "growth_factor must be above 1"));
    GradScalerOptions backoff;
    backoff.backoff_factor = 1.0;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, GradScaler(backoff)), "backoff_factor must be between 0"));
    GradScalerOptions interval;
    interval.growth_interval = 0;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, GradScaler(interval)), "growth_interval must be at least 1"));
  }

  TEST_CASE("state saves and loads through an archive") {
    GradScaler scaler(quick_growth());
    scaler.update(true);
    scaler.update(false);
    torch::serialize::OutputArchive out;
    scaler.save(out);
    std::ostringstream bytes;
    out.save_to(bytes);

    GradScaler restored;
    std::istringstream input(bytes.str());
    torch::serialize::InputArchive in;
    in.load_from(input);
    restored.load(in);
    CHECK(restored.scale() == 512.0);
    CHECK(restored.growth_tracker() == 1);
    CHECK(restored.options().growth_interval == 3);
    restored.update(false);
    restored.update(false);
    CHECK(restored.scale() == 1024.0);

    torch::serialize::OutputArchive empty;
    empty.write("something_else", c10::IValue(1.0));
    std::ostringstream empty_bytes;
    empty.save_to(empty_bytes);
    std::istringstream empty_input(empty_bytes.str());
    torch::serialize::InputArchive empty_in;
    empty_in.load_from(empty_input);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, restored.load(empty_in)),
                   "the archive holds no \"grad_scaler\""));

    // A value of another type (a damaged or foreign archive) is a CheckpointError too, not IValue's c10::Error.
    torch::serialize::OutputArchive inner;
    inner.write("scale", c10::IValue(std::int64_t{512}));
    inner.write("growth_tracker", c10::IValue(std::int64_t{0}));
    torch::serialize::OutputArchive wrong;
    wrong.write("grad_scaler", inner);
    std::ostringstream wrong_bytes;
    wrong.save_to(wrong_bytes);
    std::istringstream wrong_input(wrong_bytes.str());
    torch::serialize::InputArchive wrong_in;
    wrong_in.load_from(wrong_input);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, restored.load(wrong_in)),
                   "GradScaler::load: the archive's grad_scaler's scale is a Int, not a float"));
    CHECK(restored.scale() == 1024.0);  // nothing changed
  }

  TEST_CASE("with a scaler, K replicas train like one model without one (power-of-two scales are exact)") {
    torch::manual_seed(1);
    Net reference;
    Net wrapped;
    copy_parameters(*reference, *wrapped);
    torch::optim::SGD reference_optimizer(reference->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    DataParallelOptions options;
    options.grad_scaler = std::make_shared<GradScaler>(quick_growth());
    DataParallel<Net> dp(wrapped, cpus(3), options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05).momentum(0.9));
    const auto batch = make_batch(11);
    for (int step = 0; step < 7; ++step) {
      reference_optimizer.zero_grad();
      const auto loss = mse(*reference, batch);
      loss.backward();
      reference_optimizer.step();
      const double scaled = dp.train_step(batch, mse);
      CHECK(scaled == doctest::Approx(loss.item<double>()).epsilon(1e-5));  // the loss reported unscaled
    }
    const auto theirs = dp.module().named_parameters();
    for (const auto& p : reference->named_parameters()) CHECK(torch::allclose(p.value(), theirs[p.key()], 1e-5, 1e-6));
    CHECK(dp.grad_scaler()->scale() == 4096.0);  // grew after steps 3 and 6
    CHECK(dp.grad_scaler()->growth_tracker() == 1);
    dp.check_parity();
  }

  TEST_CASE("inf or NaN in one replica's gradients: every replica skips that step and the scale backs off") {
    for (const double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
      CAPTURE(bad);
      Net net;
      DataParallelOptions options;
      options.grad_scaler = std::make_shared<GradScaler>(quick_growth());
      DataParallel<Net> dp(net, cpus(3), options);
      dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
      const auto batch = make_batch(9);
      dp.train_step(batch, mse);
      CHECK(dp.grad_scaler()->growth_tracker() == 1);

      const auto before = snapshot(dp.module());
      dp.forward_backward(batch, mse);
      {
        // After the sync: only replica 1 sees it, so only a flag agreed by all can stop the others.
        torch::NoGradGuard no_grad;
        dp.replica(1).fc2->bias.grad()[1].fill_(bad);
      }
      dp.step();
      dp.zero_grad();
      CHECK(dp.grad_scaler()->last_step_skipped());
      CHECK(dp.grad_scaler()->scale() == 512.0);
      CHECK(dp.grad_scaler()->growth_tracker() == 0);
      for (std::size_t r = 0; r < dp.size(); ++r) CHECK(same_as(dp.replica(r), before));
      dp.check_parity();

      // The same through the loss: replica 2's loss is not finite.
      auto poisoned = [&](NetImpl& m, const torch::data::Example<>& shard) {
        auto loss = mse(m, shard);
        return &m == &dp.replica(2) ? loss * bad : loss;
      };
      dp.train_step(batch, poisoned);
      CHECK(dp.grad_scaler()->scale() == 256.0);
      CHECK(dp.grad_scaler()->skipped_steps() == 2);
      for (std::size_t r = 0; r < dp.size(); ++r) CHECK(same_as(dp.replica(r), before));

      // Then training goes on, and Adam's state saw only the good steps.
      dp.train_step(batch, mse);
      CHECK_FALSE(dp.grad_scaler()->last_step_skipped());
      CHECK_FALSE(same_as(dp.module(), before));
      dp.check_parity();
      CHECK(dp.grad_scaler()->growth_tracker() == 1);
    }
  }

  TEST_CASE("a scaler attached later takes over from the next step") {
    Net net;
    DataParallel<Net> dp(net, cpus(2));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01));
    CHECK(dp.grad_scaler() == nullptr);
    auto scaler = std::make_shared<GradScaler>(quick_growth());
    dp.set_grad_scaler(scaler);
    CHECK(dp.grad_scaler() == scaler.get());
    dp.train_step(make_batch(4), mse);
    CHECK(scaler->growth_tracker() == 1);
  }
}

TEST_SUITE("clip_grad_norm") {
  TEST_CASE("the global norm after the sync, the same factor on every replica, with and without a scaler") {
    for (const bool scaled : {false, true}) {
      for (const double max_norm : {0.05, 1e6}) {
        CAPTURE(scaled);
        CAPTURE(max_norm);
        torch::manual_seed(2);
        Net reference;
        Net wrapped;
        copy_parameters(*reference, *wrapped);
        torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
        DataParallelOptions options;
        if (scaled) options.grad_scaler = std::make_shared<GradScaler>();
        DataParallel<Net> dp(wrapped, cpus(3), options);
        dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
        const auto batch = make_batch(10);

        mse(*reference, batch).backward();
        const double reference_norm = torch::nn::utils::clip_grad_norm_(reference->parameters(), max_norm);
        reference_optimizer.step();

        dp.forward_backward(batch, mse);
        const double norm = dp.clip_grad_norm(max_norm).item<double>();
        CHECK(norm == doctest::Approx(reference_norm).epsilon(1e-5));
        if (scaled) {
          const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.forward_backward(batch, mse));
          CHECK(contains(message, "forward_backward after clip_grad_norm and before step()"));
        }
        const auto reference_grads = reference->parameters();
        for (std::size_t r = 0; r < dp.size(); ++r) {
          const auto grads = dp.replica(r).parameters();
          for (std::size_t i = 0; i < grads.size(); ++i) {
            CHECK(torch::allclose(grads[i].grad(), reference_grads[i].grad(), 1e-5, 1e-7));
          }
        }
        // A second clip sees the clipped gradients (not unscaled twice).
        const double again = dp.clip_grad_norm(max_norm).item<double>();
        CHECK(again == doctest::Approx(std::min(reference_norm, max_norm)).epsilon(1e-4));
        dp.step();
        dp.zero_grad();
        const auto theirs = dp.module().named_parameters();
        for (const auto& p : reference->named_parameters()) {
          CHECK(torch::allclose(p.value(), theirs[p.key()], 1e-5, 1e-6));
        }
        dp.check_parity();
      }
    }
  }

  TEST_CASE("float64 gradients: the norm and the clipped gradients of torch::nn::utils::clip_grad_norm_") {
    const double inf = std::numeric_limits<double>::infinity();
    for (const std::size_t replicas : {std::size_t{1}, std::size_t{3}}) {
      for (const double norm_type : {2.0, 1.0, 3.5, inf}) {
        CAPTURE(replicas);
        CAPTURE(norm_type);
        torch::manual_seed(3);
        Net net;
        net->to(torch::kDouble);
        DataParallel<Net> dp(net, cpus(replicas));
        dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
        auto batch = make_batch(9);
        batch = {batch.data.to(torch::kDouble), batch.target.to(torch::kDouble)};
        dp.forward_backward(batch, mse);
        // Their clip_grad_norm_ on copies of the synchronised gradients.
        std::vector<torch::Tensor> theirs;
        for (const auto& p : net->parameters()) {
          theirs.push_back(p.detach().clone().requires_grad_(true));
          theirs.back().mutable_grad() = p.grad().clone();
        }
        const double max_norm = 0.01;
        const double expected = torch::nn::utils::clip_grad_norm_(theirs, max_norm, norm_type);
        const torch::Tensor norm = dp.clip_grad_norm(max_norm, norm_type);
        CHECK((norm.scalar_type() == torch::kDouble));
        CHECK(std::abs(norm.item<double>() - expected) <= 1e-12 * expected);
        for (std::size_t r = 0; r < replicas; ++r) {
          const auto clipped = dp.replica(r).parameters();
          for (std::size_t i = 0; i < theirs.size(); ++i) {
            CHECK((clipped[i].grad() - theirs[i].grad()).abs().max().item<double>() <=
                  1e-12 * theirs[i].grad().abs().max().item<double>());
          }
        }
      }
    }
  }

  TEST_CASE("a replica whose gradients were set to none is left alone, the others are clipped") {
    Net net;
    DataParallel<Net> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.forward_backward(make_batch(9), mse);
    for (auto& p : dp.replica(1).parameters()) p.mutable_grad().reset();  // what its zero_grad() does on 2.x
    const double norm = dp.clip_grad_norm(1e-3).item<double>();  // the foreach op refuses an empty list
    CHECK(norm > 1e-3);
    double clipped = 0;
    for (const auto& p : net->parameters()) clipped += p.grad().pow(2).sum().item<double>();
    CHECK(std::sqrt(clipped) == doctest::Approx(1e-3).epsilon(1e-3));
    for (const auto& p : dp.replica(1).parameters()) CHECK_FALSE(p.grad().defined());
  }

  TEST_CASE("the infinity norm, one replica, and bad arguments") {
    Net net;
    DataParallel<Net> dp(net, cpus(1));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.forward_backward(make_batch(4), mse);
    double largest = 0;
    for (const auto& p : net->parameters()) largest = std::max(largest, p.grad().abs().max().item<double>());
    const double inf = std::numeric_limits<double>::infinity();
    CHECK(dp.clip_grad_norm(1e6, inf).item<double>() == doctest::Approx(largest));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.clip_grad_norm(0)), "max_norm must be positive, got 0"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.clip_grad_norm(1, -2)), "norm_type must be positive"));
  }
}
