// Programs of other shapes than one module and one optimizer (issue 24),
// against the one-device program in float64: a loss function that knows
// its replica's place, several optimizers side by side, a frozen second
// model. See Note [The replica's place] in multigpu/data_parallel.hpp and
// Note [Several optimizers] in multigpu/data_parallel/core.hpp.

#include "support.hpp"  // first: see its comment
#include "small_net.hpp"

#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

using multigpu::DataParallel;
using multigpu::ReplicaPlace;
using multigpu_test::contains;
using multigpu_test::small_net::cpus;
using multigpu_test::small_net::mse;

namespace {

torch::data::Example<> make_batch(std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}, torch::kFloat64), torch::randn({n, 3}, torch::kFloat64)};
}

// Two parts, fc1 and fc2, each trained by an optimizer of its own in the
// tests of several optimizers ("body" and "head").
using TwoPartImpl = multigpu_test::small_net::NetImpl;
using TwoPart = multigpu_test::small_net::Net;
using multigpu_test::small_net::max_difference;

std::pair<TwoPart, TwoPart> twin_models(std::uint64_t seed = 3) {
  torch::manual_seed(seed);
  TwoPart net;
  net->to(torch::kFloat64);
  TwoPart plain = std::dynamic_pointer_cast<TwoPartImpl>(net->clone());
  return {net, plain};
}

// The body: SGD with momentum. The head: AdamW with two groups, weight
// decay on the weight only, each group at its own rate.
std::unique_ptr<torch::optim::SGD> make_body_sgd(TwoPartImpl& net) {
  return std::make_unique<torch::optim::SGD>(net.fc1->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
}
std::unique_ptr<torch::optim::AdamW> make_head_adamw(TwoPartImpl& net) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{net.fc2->weight},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.01).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{net.fc2->bias},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(0.03).weight_decay(0)));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(0.02));
}

// A schedule on each primary: both head groups, and the body.
void schedule(torch::optim::Optimizer& body, torch::optim::Optimizer& head, int step) {
  body.param_groups()[0].options().set_lr(0.05 / (1.0 + 0.1 * step));
  head.param_groups()[0].options().set_lr(0.01 * (1.0 - 0.05 * step));
  head.param_groups()[1].options().set_lr(0.03 * (step % 2 == 0 ? 1.0 : 0.5));
}

// The one-device program of the two-optimizer tests: the head steps every
// step, the body every second step on the gradients of two batches.
struct PlainTwoOptimizers {
  TwoPart net;
  std::unique_ptr<torch::optim::SGD> body;
  std::unique_ptr<torch::optim::AdamW> head;
  explicit PlainTwoOptimizers(TwoPart plain)
      : net(std::move(plain)), body(make_body_sgd(*net)), head(make_head_adamw(*net)) {}
  void train(int step, std::int64_t batch_size) {
    schedule(*body, *head, step);
    mse(*net, make_batch(batch_size, 100 + step)).backward();
    head->step();
    head->zero_grad();
    if (step % 2 == 1) {
      body->step();
      body->zero_grad();
    }
  }
};

void train_two_optimizers(DataParallel<TwoPart>& dp, int step, std::int64_t batch_size) {
  schedule(dp.optimizer("body"), dp.optimizer("head"), step);
  dp.forward_backward(make_batch(batch_size, 100 + step), mse);
  dp.step("head");
  dp.zero_grad("head");
  if (step % 2 == 1) {
    dp.step("body");
    dp.zero_grad("body");
  }
}

void check_two_optimizers(std::size_t replicas, std::int64_t batch_size) {
  CAPTURE(replicas);
  CAPTURE(batch_size);
  auto [net, plain] = twin_models();
  PlainTwoOptimizers reference(plain);
  DataParallel<TwoPart> dp(net, cpus(replicas));
  torch::optim::SGD& body = dp.make_optimizer("body", make_body_sgd);
  torch::optim::AdamW& head = dp.make_optimizer("head", make_head_adamw);
  CHECK(&dp.optimizer("body") == &body);
  CHECK(&dp.optimizer<torch::optim::AdamW>("head") == &head);
  for (int step = 0; step < 8; ++step) {
    train_two_optimizers(dp, step, batch_size);
    reference.train(step, batch_size);
  }
  CHECK(max_difference(*net, *plain) <= 1e-10);
  dp.check_parity();
  // Each follower's groups took its primary's options of the last step.
  for (auto* follower : dp.optimizers("head")) {
    CHECK(follower->param_groups()[0].options().get_lr() == doctest::Approx(0.01 * (1.0 - 0.05 * 7)));
    CHECK(follower->param_groups()[1].options().get_lr() == doctest::Approx(0.03 * 0.5));
  }
  for (auto* follower : dp.optimizers("body")) {
    CHECK(follower->param_groups()[0].options().get_lr() == doctest::Approx(0.05 / 1.7));
  }
  CHECK(dp.optimizers("body").size() == replicas);
}

// A distillation student, with a frozen teacher as a member of the module.
struct DistillImpl : torch::nn::Cloneable<DistillImpl> {
  DistillImpl() { reset(); }
  void reset() override {
    student = register_module("student", TwoPart());
    teacher = register_module("teacher", TwoPart());
  }
  TwoPart student{nullptr}, teacher{nullptr};
};
TORCH_MODULE(Distill);

torch::Tensor distill_loss(DistillImpl& net, const torch::data::Example<>& shard) {
  torch::Tensor soft;
  {
    torch::NoGradGuard no_grad;
    soft = net.teacher->forward(shard.data);
  }
  return torch::mse_loss(net.student->forward(shard.data), soft) + 0.5 * mse(*net.student, shard);
}


// An EMA copy beside the trained model (mean teacher, MoCo, BYOL): a
// frozen member, so DataParallel never synchronises nor steps it, updated
// on every replica from that replica's trained weights after each step.
// The trained weights are the same on every replica after a step, so the
// copies stay the same too, with no collective.
struct WithEmaImpl : torch::nn::Cloneable<WithEmaImpl> {
  WithEmaImpl() { reset(); }
  void reset() override {
    student = register_module("student", TwoPart());
    ema = register_module("ema", TwoPart());
  }
  TwoPart student{nullptr}, ema{nullptr};
};
TORCH_MODULE(WithEma);

void update_ema(WithEmaImpl& net, double decay) {
  const torch::NoGradGuard no_grad;
  const auto trained = net.student->parameters();
  const auto averaged = net.ema->parameters();
  for (std::size_t i = 0; i < trained.size(); ++i) averaged[i].mul_(decay).add_(trained[i], 1.0 - decay);
}

// A GAN in one container module: the batch's data are real samples, its
// target the generator's noise (so that every replica draws nothing).
struct GanImpl : torch::nn::Cloneable<GanImpl> {
  GanImpl() { reset(); }
  void reset() override {
    g = register_module("g", torch::nn::Sequential(torch::nn::Linear(4, 5), torch::nn::Tanh(), torch::nn::Linear(5, 6)));
    d = register_module("d", torch::nn::Sequential(torch::nn::Linear(6, 5), torch::nn::Tanh(), torch::nn::Linear(5, 1)));
  }
  torch::nn::Sequential g{nullptr}, d{nullptr};
};
TORCH_MODULE(Gan);

torch::data::Example<> gan_batch(std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 6}, torch::kFloat64) + 1.0, torch::randn({n, 4}, torch::kFloat64)};
}

// The discriminator's phase: back-propagates into the discriminator only.
torch::Tensor discriminator_loss(GanImpl& gan, const torch::data::Example<>& shard) {
  const auto real = gan.d->forward(shard.data);
  const auto fake = gan.d->forward(gan.g->forward(shard.target).detach());
  return torch::binary_cross_entropy_with_logits(real, torch::ones_like(real)) +
         torch::binary_cross_entropy_with_logits(fake, torch::zeros_like(fake));
}

// The generator's phase: through the discriminator, whose gradients it also fills.
torch::Tensor generator_loss(GanImpl& gan, const torch::data::Example<>& shard) {
  const auto fake = gan.d->forward(gan.g->forward(shard.target));
  return torch::binary_cross_entropy_with_logits(fake, torch::ones_like(fake));
}

// Gives its input no gradient in backward (an undefined one), as some
// autograd functions do for inputs they do not differentiate.
struct NoGradient : torch::autograd::Function<NoGradient> {
  static torch::Tensor forward(torch::autograd::AutogradContext* /*context*/, const torch::Tensor& x) {
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* /*context*/,
                                                 const torch::autograd::variable_list& /*grads*/) {
    return {torch::Tensor()};
  }
};

// The discriminator's phase, plus a term whose backward brings the
// generator's first weight an undefined gradient.
torch::Tensor discriminator_loss_through_nothing(GanImpl& gan, const torch::data::Example<>& shard) {
  const auto weight = gan.g->named_parameters()["0.weight"];
  return discriminator_loss(gan, shard) + 0.0 * NoGradient::apply(weight).sum();
}

std::unique_ptr<torch::optim::Adam> make_adam(torch::nn::Module& part) {
  return std::make_unique<torch::optim::Adam>(part.parameters(),
                                              torch::optim::AdamOptions(0.01).betas(std::make_tuple(0.5, 0.999)));
}

std::unique_ptr<torch::optim::AdamW> make_adamw(torch::nn::Module& part) {
  return std::make_unique<torch::optim::AdamW>(part.parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1));
}

// Whether each parameter of `part` has a gradient, in order.
std::vector<bool> defined_gradients(torch::nn::Module& part) {
  std::vector<bool> defined;
  for (const auto& p : part.parameters()) defined.push_back(p.grad().defined());
  return defined;
}

Gan seeded_gan(std::uint64_t seed) {
  torch::manual_seed(seed);
  Gan gan;
  gan->to(torch::kFloat64);
  return gan;
}

multigpu::DataParallelOptions phase_options(double cap_mib) {
  multigpu::DataParallelOptions options;
  options.find_unused_parameters = true;  // a phase reaches part of the parameters
  options.bucket_cap_mib = cap_mib;
  return options;
}

// A GAN (seeded) on k CPU replicas with find_unused_parameters and buckets
// of cap_mib, its one-device twin, and on each an optimizer per part, "d"
// and "g", that `make` builds (make_adam, make_adamw).
struct GanTwins {
  template <typename Make>
  GanTwins(std::uint64_t seed, std::size_t k, Make make, double cap_mib = 25.0)
      : net(seeded_gan(seed)),
        plain(std::dynamic_pointer_cast<GanImpl>(net->clone())),
        dp(net, cpus(k), phase_options(cap_mib)),
        plain_d(make(*plain->d)),
        plain_g(make(*plain->g)) {
    dp.make_optimizer("d", [make](GanImpl& gan) { return make(*gan.d); });
    dp.make_optimizer("g", [make](GanImpl& gan) { return make(*gan.g); });
  }
  /// Both parts as on one device, every replica as the primary.
  void check_like_one_device() {
    CHECK(max_difference(*net->g, *plain->g) <= 1e-10);
    CHECK(max_difference(*net->d, *plain->d) <= 1e-10);
    dp.check_parity();
  }
  Gan net;
  Gan plain;
  DataParallel<Gan> dp;
  std::unique_ptr<torch::optim::Optimizer> plain_d;
  std::unique_ptr<torch::optim::Optimizer> plain_g;
};

bool any_gradient(torch::nn::Module& part) {
  for (const auto& p : part.parameters()) {
    if (p.grad().defined() && p.grad().abs().sum().item<double>() != 0) return true;
  }
  return false;
}

}  // namespace

TEST_SUITE("DataParallel program shapes") {
  TEST_CASE("a loss function may take its replica's place (index and device) as a third argument") {
    // The teacher trained beside: its own DataParallel, whose replica on the
    // loss function's device the place finds (no address comparisons).
    for (const auto& [k, batch_size] : std::vector<std::pair<std::size_t, std::int64_t>>{{1, 7}, {2, 7}, {3, 7},
                                                                                          {3, 2}}) {
      CAPTURE(k);
      CAPTURE(batch_size);
      auto [net, plain] = twin_models();
      TwoPart teacher = twin_models(5).first;
      DataParallel<TwoPart> teachers(teacher, cpus(k));
      DataParallel<TwoPart> dp(net, cpus(k));
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
      torch::optim::SGD reference(plain->parameters(), torch::optim::SGDOptions(0.1));
      std::mutex lock;
      std::multiset<std::size_t> seen;
      const auto loss = [&](TwoPartImpl& replica, const torch::data::Example<>& shard, const ReplicaPlace& place) {
        {
          const std::lock_guard<std::mutex> hold(lock);
          seen.insert(place.index);
        }
        CHECK(&replica == &dp.replica(place.index));
        CHECK(place.device == dp.devices()[place.index]);
        torch::Tensor target;
        {
          torch::NoGradGuard no_grad;
          target = teachers.replica(place.index).forward(shard.data.to(place.device));
        }
        return torch::mse_loss(replica.forward(shard.data), target);
      };
      for (int step = 0; step < 4; ++step) {
        const auto batch = make_batch(batch_size, 40 + step);
        dp.train_step(batch, loss);
        reference.zero_grad();
        torch::Tensor target;
        {
          torch::NoGradGuard no_grad;
          target = teacher->forward(batch.data);
        }
        torch::mse_loss(plain->forward(batch.data), target).backward();
        reference.step();
      }
      CHECK(max_difference(*net, *plain) <= 1e-10);
      dp.check_parity();
      // A replica without samples sits the step out: it is never called.
      const std::size_t active = std::min<std::size_t>(k, static_cast<std::size_t>(batch_size));
      CHECK(seen.size() == 4 * active);
      for (std::size_t r = 0; r < active; ++r) CHECK(seen.count(r) == 4);

      // forward_backward and predict take it too; the two-argument form still works.
      const auto batch = make_batch(batch_size, 60);
      const auto predicted = dp.predict(batch, [&](TwoPartImpl& replica, const torch::data::Example<>& shard,
                                                   const ReplicaPlace& place) {
        return replica.forward(shard.data) + static_cast<double>(place.index);
      });
      const auto plain_predicted = dp.predict(batch, [](TwoPartImpl& replica, const torch::data::Example<>& shard) {
        return replica.forward(shard.data);
      });
      const auto sizes = multigpu::split_batch(batch_size, k);
      std::int64_t offset = 0;
      for (std::size_t r = 0; r < k; ++r) {
        const auto part = predicted.narrow(0, offset, sizes[r]) - plain_predicted.narrow(0, offset, sizes[r]);
        if (sizes[r] > 0) CHECK(part.sub(static_cast<double>(r)).abs().max().item<double>() <= 1e-12);
        offset += sizes[r];
      }
      dp.forward_backward(batch, loss);
      dp.zero_grad();
    }
  }

  TEST_CASE("two optimizers over disjoint parameters, stepping at different rates under schedules, train like one device (float64)") {
    for (std::size_t k : {1, 2, 3}) check_two_optimizers(k, 13);
    check_two_optimizers(3, 2);  // a batch smaller than K
  }

  TEST_CASE("stepping or zeroing an optimizer that does not exist names it and the ones there are") {
    TwoPart net = twin_models().first;
    DataParallel<TwoPart> dp(net, cpus(2));
    const auto message_of = [](auto&& call) {
      std::string message;
      try {
        call();
      } catch (const multigpu::Error& e) {
        message = e.what();
      }
      return message;
    };
    CHECK(contains(message_of([&] { dp.step("head"); }), "no optimizer yet"));
    CHECK(message_of([&] { dp.update_options<torch::optim::SGDOptions>([](torch::optim::SGDOptions&) {}); }) ==
          "update_options<Options>: no optimizer yet; call make_optimizer first");
    dp.make_optimizer("body", make_body_sgd);
    dp.make_optimizer("head", make_head_adamw);
    // What was asked is named, not the helper that found there was no such optimizer.
    CHECK(message_of([&] { dp.learning_rate(); }) ==
          "learning_rate(): no optimizer was made without a name; the optimizers are: \"body\", \"head\"");
    CHECK(contains(message_of([&] { dp.update_options<torch::optim::AdamOptions>([](torch::optim::AdamOptions&) {}); }),
                   "update_options<Options>: no optimizer has a parameter group whose options are of type Options"));
    {
      auto guard = dp.no_sync();
      CHECK(message_of([&] { dp.step("head"); }) ==
            "step(\"head\") inside no_sync() would step replicas on different gradients; step after the guard is gone");
    }
    CHECK(message_of([&] { dp.step("tail"); }) ==
          "step(name): no optimizer is named \"tail\"; the optimizers are: \"body\", \"head\"");
    CHECK(message_of([&] { dp.zero_grad("tail"); }) ==
          "zero_grad(name): no optimizer is named \"tail\"; the optimizers are: \"body\", \"head\"");
    CHECK(message_of([&] { dp.optimizer(); }) ==
          "optimizer: no optimizer was made without a name; the optimizers are: \"body\", \"head\"");
    CHECK(message_of([&] { dp.make_optimizer("a head", make_head_adamw); }) ==
          "make_optimizer(name, factory): \"a head\" is not a valid name: use letters, digits and underscores");
    // A bad factory for a named optimizer leaves it as it was.
    auto& head = dp.optimizer("head");
    CHECK(contains(message_of([&] { dp.make_optimizer("head", [&](TwoPartImpl&) { return make_head_adamw(*net); }); }),
                   "the previous optimizers are unchanged"));
    CHECK(&dp.optimizer("head") == &head);
    // With a GradScaler, which unscales every gradient once per step, one optimizer of several cannot step alone.
    dp.set_grad_scaler(std::make_shared<multigpu::GradScaler>());
    dp.forward_backward(make_batch(5, 2), mse);
    CHECK(contains(message_of([&] { dp.step("head"); }),
                   "step(\"head\") with a GradScaler: the scaler unscales every gradient and updates its scale once "
                   "per step, so stepping one optimizer of several is not supported yet"));
    dp.zero_grad();
    dp.set_grad_scaler(nullptr);
    // train_step steps every optimizer; nothing was changed by the refusals.
    dp.train_step(make_batch(5, 1), mse);
    dp.check_parity();
    CHECK(dp.steps() == 1);
  }

  TEST_CASE("save_state and load_state cover every optimizer, also on another number of replicas") {
    const std::string path = "multigpu_test_two_optimizers.pt";
    auto [net, plain] = twin_models();
    PlainTwoOptimizers reference(plain);
    DataParallel<TwoPart> dp(net, cpus(2));
    dp.make_optimizer("body", make_body_sgd);
    dp.make_optimizer("head", make_head_adamw);
    for (int step = 0; step < 4; ++step) {
      train_two_optimizers(dp, step, 7);
      reference.train(step, 7);
    }
    dp.save_state(path);

    TwoPart other = twin_models(11).first;
    DataParallel<TwoPart> resumed(other, cpus(3));
    resumed.make_optimizer("body", make_body_sgd);
    resumed.make_optimizer("head", make_head_adamw);
    const auto info = resumed.load_state(path);
    CHECK(info.notes.empty());
    CHECK(resumed.optimizer("head").param_groups()[1].options().get_lr() == doctest::Approx(0.03 * 0.5));
    for (int step = 4; step < 8; ++step) {
      train_two_optimizers(resumed, step, 7);
      reference.train(step, 7);
    }
    CHECK(max_difference(*other, *plain) <= 1e-10);
    resumed.check_parity();

    // A checkpoint with an optimizer this DataParallel lacks is refused, and nothing changes.
    TwoPart third = twin_models(12).first;
    const auto before = std::dynamic_pointer_cast<TwoPartImpl>(third->clone());
    DataParallel<TwoPart> lacking(third, cpus(2));
    lacking.make_optimizer("body", make_body_sgd);
    std::string message;
    try {
      lacking.load_state(path);
    } catch (const multigpu::CheckpointError& e) {
      message = e.what();
    }
    CHECK(contains(message, "holds the state of the optimizer \"head\", and this DataParallel has no such optimizer: "
                            "make it (make_optimizer) before load_state, so that it is restored"));
    CHECK(max_difference(*third, *before) == 0);
    // One this DataParallel has and the checkpoint lacks starts afresh, and says so.
    DataParallel<TwoPart> more(std::dynamic_pointer_cast<TwoPartImpl>(before->clone()), cpus(2));
    more.make_optimizer("body", make_body_sgd);
    more.make_optimizer("head", make_head_adamw);
    more.make_optimizer("extra", [](TwoPartImpl& replica) {
      return std::make_unique<torch::optim::SGD>(replica.fc2->parameters(), torch::optim::SGDOptions(0.1));
    });
    const auto more_info = more.load_state(path);
    REQUIRE(more_info.notes.size() == 1);
    CHECK(more_info.notes[0] == "the checkpoint has no state of the optimizer \"extra\": it starts afresh");
    std::remove(path.c_str());
  }

  TEST_CASE("a frozen teacher in the module is never synchronised nor stepped, and distillation trains like one device (float64)") {
    for (const auto& [k, batch_size] : std::vector<std::pair<std::size_t, std::int64_t>>{{1, 9}, {2, 9}, {3, 9},
                                                                                          {3, 2}}) {
      CAPTURE(k);
      CAPTURE(batch_size);
      torch::manual_seed(21);
      Distill net;
      net->to(torch::kFloat64);
      for (auto& p : net->teacher->parameters()) p.set_requires_grad(false);
      Distill plain = std::dynamic_pointer_cast<DistillImpl>(net->clone());
      const auto teacher_before = std::dynamic_pointer_cast<TwoPartImpl>(net->teacher->clone());
      DataParallel<Distill> dp(net, cpus(k));
      // The optimizer is given every parameter, the teacher's too, as a
      // user would: a parameter without a gradient is never stepped.
      dp.make_optimizer<torch::optim::AdamW>(torch::optim::AdamWOptions(0.01).weight_decay(0.1));
      torch::optim::AdamW reference(plain->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1));
      for (int step = 0; step < 6; ++step) {
        const auto batch = make_batch(batch_size, 70 + step);
        dp.train_step(batch, distill_loss);
        reference.zero_grad();
        distill_loss(*plain, batch).backward();
        reference.step();
      }
      CHECK(max_difference(*net, *plain) <= 1e-10);
      CHECK(max_difference(*net->teacher, *teacher_before) == 0);
      dp.check_parity();
      for (std::size_t r = 0; r < k; ++r) {
        for (const auto& p : dp.replica(r).teacher->parameters()) {
          CHECK_FALSE(p.requires_grad());
          CHECK_FALSE(p.grad().defined());
        }
      }
      // Not synchronised: the gradient buckets hold the student's parameters only.
      if (k > 1) {
        REQUIRE(dp.gradient_buckets() != nullptr);
        std::size_t bucketed = 0;
        for (const auto& bucket : *dp.gradient_buckets()) bucketed += bucket.parameters.size();
        CHECK(bucketed == net->student->parameters().size());
      }
    }
  }

  // See docs/data-parallel.md, "An EMA copy".
  TEST_CASE("an EMA copy updated on every replica after each step matches the one-device EMA (float64)") {
    for (const auto& [k, batch_size] : std::vector<std::pair<std::size_t, std::int64_t>>{{1, 8}, {2, 8}, {3, 8},
                                                                                          {3, 2}}) {
      CAPTURE(k);
      CAPTURE(batch_size);
      torch::manual_seed(35);
      WithEma net;
      net->to(torch::kFloat64);
      {
        const torch::NoGradGuard no_grad;
        for (std::size_t i = 0; i < net->ema->parameters().size(); ++i) {
          net->ema->parameters()[i].copy_(net->student->parameters()[i]);
        }
      }
      for (auto& p : net->ema->parameters()) p.set_requires_grad(false);  // before DataParallel is built
      WithEma plain = std::dynamic_pointer_cast<WithEmaImpl>(net->clone());
      DataParallel<WithEma> dp(net, cpus(k));
      dp.make_optimizer("student", [](WithEmaImpl& m) { return make_body_sgd(*m.student); });
      auto plain_optimizer = make_body_sgd(*plain->student);
      const auto loss = [](WithEmaImpl& m, const torch::data::Example<>& shard) { return mse(*m.student, shard); };
      for (int step = 0; step < 5; ++step) {
        const auto batch = make_batch(batch_size, 60 + step);
        dp.train_step(batch, loss);
        for (std::size_t r = 0; r < k; ++r) update_ema(dp.replica(r), 0.9);

        plain_optimizer->zero_grad();
        loss(*plain, batch).backward();
        plain_optimizer->step();
        update_ema(*plain, 0.9);
      }
      CHECK(max_difference(*net->student, *plain->student) <= 1e-10);
      for (std::size_t r = 0; r < k; ++r) CHECK(max_difference(*dp.replica(r).ema, *plain->ema) <= 1e-10);
      CHECK(max_difference(*net->ema, *net->student) > 1e-6);  // the copy lags the trained weights
      dp.check_parity();
    }
  }

  TEST_CASE("a GAN step in phases (discriminator, then generator) trains like one device (float64)") {
    for (const double cap_mib : {25.0, 1e-6}) {  // one bucket for both parts, or a bucket per parameter
      for (const auto& [k, batch_size] : std::vector<std::pair<std::size_t, std::int64_t>>{{1, 8}, {2, 8}, {3, 8},
                                                                                            {3, 2}}) {
        CAPTURE(cap_mib);
        CAPTURE(k);
        CAPTURE(batch_size);
        GanTwins twins(31, k, &make_adam, cap_mib);
        auto& [net, plain, dp, plain_d, plain_g] = twins;
        for (int step = 0; step < 5; ++step) {
          const auto batch = gan_batch(batch_size, 80 + step);
          // pytorch/examples' DCGAN, step by step.
          dp.zero_grad("d");
          dp.forward_backward(batch, discriminator_loss);
          if (step == 0 && k > 1) {
            // The generator's part was not reached: its gradients stay zero
            // and, in buckets of its own, are not reduced.
            for (std::size_t r = 0; r < k; ++r) CHECK_FALSE(any_gradient(*dp.replica(r).g));
            if (dp.gradient_buckets()->size() > 1) {
              CHECK(dp.last_sync_stats()->buckets < dp.gradient_buckets()->size());
            }
          }
          dp.step("d");
          dp.zero_grad("g");
          dp.forward_backward(batch, generator_loss);
          dp.step("g");

          plain_d->zero_grad();
          discriminator_loss(*plain, batch).backward();
          plain_d->step();
          plain_g->zero_grad();
          generator_loss(*plain, batch).backward();
          plain_g->step();
        }
        CHECK(max_difference(*net, *plain) <= 1e-10);
        dp.check_parity();
      }
    }
  }

  TEST_CASE("gradients accumulated on a part that the synchronising phase does not reach are still averaged") {
    for (const std::size_t k : {2, 3}) {
      CAPTURE(k);
      GanTwins twins(32, k, &make_adam, /*cap_mib=*/1e-6);  // the generator's gradients in buckets of their own
      auto& [net, plain, dp, plain_d, plain_g] = twins;
      for (int step = 0; step < 3; ++step) {
        const auto first = gan_batch(7, 90 + step);
        const auto second = gan_batch(7, 95 + step);
        {
          auto guard = dp.no_sync();
          dp.forward_backward(first, generator_loss);  // the generator's gradients differ between replicas here
        }
        dp.forward_backward(second, discriminator_loss);  // reaches the discriminator only, and syncs
        dp.step();
        dp.zero_grad();

        generator_loss(*plain, first).backward();
        discriminator_loss(*plain, second).backward();
        plain_d->step();
        plain_g->step();
        plain_d->zero_grad();
        plain_g->zero_grad();
      }
      CHECK(max_difference(*net, *plain) <= 1e-10);
      dp.check_parity();
    }
  }

  // See Note [Gradients of parameters no backward reached]: step() after a
  // phase that reached the discriminator only must leave the generator as
  // one device does, which AdamW's weight decay (and its step count) show.
  TEST_CASE("step() after a phase that reached part of the parameters leaves the other part as one device does (float64)") {
    enum class Program { kNeverReached, kReachedOnceThenTrainStep, kReachedOnceThenZeroGradByName };
    for (const Program program :
         {Program::kNeverReached, Program::kReachedOnceThenTrainStep, Program::kReachedOnceThenZeroGradByName}) {
      for (const double cap_mib : {25.0, 1e-6}) {  // one bucket for both parts, or a bucket per parameter
        // One replica has no buckets, and its zero_grad() (unnamed) zeroes in
        // place here: train_step then leaves the generator's zeros, not None.
        const std::vector<std::size_t> replicas = program == Program::kReachedOnceThenTrainStep
                                                      ? std::vector<std::size_t>{2, 3}
                                                      : std::vector<std::size_t>{1, 2, 3};
        for (const std::size_t k : replicas) {
          CAPTURE(static_cast<int>(program));
          CAPTURE(cap_mib);
          CAPTURE(k);
          GanTwins twins(31, k, &make_adamw, cap_mib);
          auto& [net, plain, dp, plain_d, plain_g] = twins;
          if (program != Program::kNeverReached) {
            const auto batch = gan_batch(8, 9);
            dp.train_step(batch, generator_loss);
            generator_loss(*plain, batch).backward();
            plain_d->step();
            plain_g->step();
          }
          for (int step = 0; step < 3; ++step) {
            const auto batch = gan_batch(8, 10 + step);
            plain_d->zero_grad();  // what this LibTorch's zero_grad does: None on 2.x, zeros on 1.13
            plain_g->zero_grad();
            discriminator_loss(*plain, batch).backward();
            if (program == Program::kReachedOnceThenZeroGradByName) {
              dp.zero_grad("d");
              dp.zero_grad("g");
              dp.forward_backward(batch, discriminator_loss);
              for (std::size_t r = 0; r < k; ++r) {
                CHECK(defined_gradients(*dp.replica(r).g) == defined_gradients(*plain->g));
              }
              dp.step();
            } else {
              dp.train_step(batch, discriminator_loss);  // steps both optimizers, then zeroes
            }
            plain_d->step();
            plain_g->step();
          }
          twins.check_like_one_device();
        }
      }
    }
  }

  // See Note [Gradients of parameters no backward reached]: a backward may
  // bring a parameter an undefined gradient, which leaves its .grad() alone
  // (None after zero_grad on LibTorch 2); AdamW's weight decay shows
  // whether it was stepped.
  TEST_CASE("a parameter whose backward brings an undefined gradient is not reached, as on one device (float64)") {
    for (const std::size_t k : {2, 3}) {
      CAPTURE(k);
      GanTwins twins(33, k, &make_adamw);
      auto& [net, plain, dp, plain_d, plain_g] = twins;
      for (int step = 0; step < 3; ++step) {
        const auto batch = gan_batch(8, 40 + step);
        dp.train_step(batch, discriminator_loss_through_nothing);
        plain_d->zero_grad();
        plain_g->zero_grad();
        discriminator_loss_through_nothing(*plain, batch).backward();
        plain_d->step();
        plain_g->step();
        plain_d->zero_grad();
        plain_g->zero_grad();
      }
      twins.check_like_one_device();
    }
  }

  // See Note [Gradients of parameters no backward reached]: a gradient set
  // to None between backward and step() is skipped by the optimizer on one
  // device, and must be here too.
  TEST_CASE("a gradient the user sets to None between backward and step() stays None and is not stepped (float64)") {
    for (const std::size_t k : {2, 3}) {
      CAPTURE(k);
      GanTwins twins(34, k, &make_adamw);
      auto& [net, plain, dp, plain_d, plain_g] = twins;
      for (int step = 0; step < 3; ++step) {
        const auto batch = gan_batch(8, 50 + step);
        dp.zero_grad();
        dp.forward_backward(batch, generator_loss);  // reaches both parts
        for (std::size_t r = 0; r < k; ++r) {
          for (auto& p : dp.replica(r).g->parameters()) p.mutable_grad().reset();
        }
        dp.step();
        for (std::size_t r = 0; r < k; ++r) {
          for (const bool defined : defined_gradients(*dp.replica(r).g)) CHECK_FALSE(defined);
        }
        plain_d->zero_grad();
        plain_g->zero_grad();
        generator_loss(*plain, batch).backward();
        for (auto& p : plain->g->parameters()) p.mutable_grad().reset();
        plain_d->step();
        plain_g->step();
      }
      twins.check_like_one_device();
    }
  }

  // A gradient set to None by hand before the next backward means zero on
  // one device. A replica without samples fires no hook: it must still add
  // zeros (not what its bucket held before) and step the parameter as the
  // others do. See zero_slots_of_none in gradient_reducer.hpp.
  TEST_CASE("a gradient set to None by hand before a step that a replica does not reach trains like one device") {
    for (const bool find_unused : {false, true}) {
      for (const std::size_t k : {2, 3}) {
        CAPTURE(find_unused);
        CAPTURE(k);
        auto [net, plain] = twin_models(36);
        multigpu::DataParallelOptions options;
        options.find_unused_parameters = find_unused;
        DataParallel<TwoPart> dp(net, cpus(k), options);
        dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
        torch::optim::SGD plain_sgd(plain->parameters(), torch::optim::SGDOptions(0.1));
        for (int step = 0; step < 2; ++step) {
          const auto full = make_batch(6, 70 + step);
          dp.forward_backward(full, mse);
          mse(*plain, full).backward();
          dp.step();
          plain_sgd.step();
          for (std::size_t r = 0; r < k; ++r) {
            for (auto& p : dp.replica(r).parameters()) p.mutable_grad().reset();
          }
          for (auto& p : plain->parameters()) p.mutable_grad().reset();
          const auto one = make_batch(1, 80 + step);  // replicas 1.. get no sample
          dp.train_step(one, mse);
          plain_sgd.zero_grad();
          mse(*plain, one).backward();
          plain_sgd.step();
          plain_sgd.zero_grad();
        }
        CHECK(max_difference(*net, *plain) <= 1e-10);
        dp.check_parity();
      }
    }
  }

  TEST_CASE("the reducer keeps which parameters a backward reached only with find_unused_parameters") {
    for (const bool find_unused : {false, true}) {
      CAPTURE(find_unused);
      std::vector<std::vector<torch::Tensor>> params;
      std::vector<multigpu::ReplicaContext> contexts;
      for (int r = 0; r < 2; ++r) {
        params.push_back({torch::zeros({3}, torch::requires_grad())});
        contexts.emplace_back(torch::Device(torch::kCPU));
      }
      multigpu::LocalCommunicator comm(contexts);
      multigpu::detail::ReducerOptions options;
      options.find_unused_parameters = find_unused;
      const multigpu::detail::GradientReducer reducer(params, {"w"}, contexts, comm, options);
      CHECK(reducer.tracks_reached() == find_unused);
    }
  }

  TEST_CASE("a phase that reaches part of the parameters is an error naming them without find_unused_parameters") {
    Gan net;
    net->to(torch::kFloat64);
    DataParallel<Gan> dp(net, cpus(2));
    dp.make_optimizer("d", [](GanImpl& gan) { return make_adam(*gan.d); });
    std::string message;
    try {
      dp.forward_backward(gan_batch(4, 1), discriminator_loss);
    } catch (const multigpu::Error& e) {
      message = e.what();
    }
    CHECK(contains(message, "4 parameter(s) received no gradient in this step: g.0.weight (replica 0), g.0.bias "
                            "(replica 0), g.2.weight (replica 0), g.2.bias (replica 0)"));
    CHECK(contains(message, "find_unused_parameters = true (each then keeps the gradient it has on one device: None "
                            "after zero_grad on LibTorch 2, which no optimizer steps)"));
  }
}
