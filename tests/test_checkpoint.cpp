// Checkpoints of a whole training: save_state / load_state (Note
// [Checkpoints]), and dp.load refusing another model without damage.

#include "support.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "distributed/recipe.hpp"
#include "tiny_file_system.hpp"

namespace {

using multigpu_test::contains;
using multigpu_test::RecipeNet;
using multigpu_test::RecipeNetImpl;
using multigpu_test::TinyFileSystem;

/// A data set of `size` samples of the recipe's shapes, the same every time.
class Samples : public torch::data::datasets::Dataset<Samples> {
 public:
  explicit Samples(std::int64_t size) {
    auto generator = at::detail::createCPUGenerator(77);
    x_ = torch::randn({size, 8}, generator, torch::kFloat);
    y_ = torch::randn({size, 2}, generator, torch::kFloat);
  }
  torch::data::Example<> get(std::size_t index) override {
    const auto i = static_cast<std::int64_t>(index);
    return {x_[i], y_[i]};
  }
  c10::optional<std::size_t> size() const override { return static_cast<std::size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

constexpr std::int64_t kSamples = 40;  // 5 batches of 8 per epoch
constexpr std::size_t kBatch = 8;
constexpr int kEpochs = 3;

torch::Tensor loss_of(RecipeNetImpl& net, const torch::data::Example<>& shard) {
  return multigpu_test::recipe_loss(net, shard.data, shard.target);
}

/// A folder of its own for each test, removed afterwards.
struct Scratch {
  Scratch() : path(std::filesystem::temp_directory_path() / ("multigpu-ckpt-" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path);
  }
  ~Scratch() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::filesystem::path path;
};

/// Trains the recipe model on `replicas` CPU replicas with Adam over
/// kEpochs epochs of the shuffled data set. With `resume_from`, starts from
/// that checkpoint (the model built from another seed, to show that it is
/// all restored). With `stop_after` > 0, saves to `save_to` after that many
/// steps and stops. Returns the trained parameters.
torch::Tensor train(std::size_t replicas, const std::string& resume_from, int stop_after, const std::string& save_to,
                    multigpu::ResumeInfo* info = nullptr) {
  auto net = multigpu_test::recipe_model(resume_from.empty() ? multigpu_test::kRecipeSeed : 99);
  multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(replicas, c10::Device("cpu")));
  dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
  multigpu::DistributedSampler sampler(kSamples, 1, 0, /*shuffle=*/true, /*seed=*/5);
  auto loader = torch::data::make_data_loader(Samples(kSamples).map(torch::data::transforms::Stack<>()), sampler,
                                              torch::data::DataLoaderOptions().batch_size(kBatch));
  dp.attach(sampler);
  if (!resume_from.empty()) {
    const multigpu::ResumeInfo resumed = dp.load_state(resume_from);
    if (info != nullptr) *info = resumed;
  }
  for (auto epoch = sampler.epoch(); epoch < static_cast<std::size_t>(kEpochs); ++epoch) {
    for (auto& batch : *loader) {
      dp.train_step(batch, loss_of);
      if (stop_after > 0 && dp.steps() == stop_after) {
        dp.save_state(save_to);
        return multigpu_test::flat_parameters(*net).clone();
      }
    }
  }
  dp.check_parity();
  return multigpu_test::flat_parameters(*net).clone();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

/// A model like the recipe's with fc2 of `outputs` outputs (the recipe has 2).
struct OtherNetImpl : torch::nn::Cloneable<OtherNetImpl> {
  explicit OtherNetImpl(std::int64_t outputs = 3, bool extra = false) : outputs_(outputs), extra_(extra) { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, outputs_));
    if (extra_) fc3 = register_module("fc3", torch::nn::Linear(2, 2));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  std::int64_t outputs_;
  bool extra_;
};
TORCH_MODULE(OtherNet);

/// An object of the user's with its own state (as a GradScaler has).
struct Schedule {
  double scale = 1.0;
  std::int64_t good_steps = 0;
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("scale", c10::IValue(scale));
    archive.write("good_steps", c10::IValue(good_steps));
  }
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue value;
    archive.read("scale", value);
    scale = value.toDouble();
    archive.read("good_steps", value);
    good_steps = value.toInt();
  }
};

/// The names in `folder`, sorted.
std::vector<std::string> names_in(const std::filesystem::path& folder) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_SUITE("checkpoints") {
  TEST_CASE("a training stopped mid-epoch and resumed from its checkpoint ends bit for bit where a straight one does") {
    Scratch scratch;
    const torch::Tensor straight = train(2, "", 0, "");
    const std::string checkpoint = scratch.file("state.pt");
    train(2, "", 7, checkpoint);  // step 7: the second epoch's third batch
    multigpu::ResumeInfo info;
    const torch::Tensor resumed = train(2, checkpoint, 0, "", &info);
    CHECK(info.step == 7);
    CHECK(info.has_data_position);
    CHECK(info.epoch == 1);
    CHECK(info.epoch_samples == 16);
    CHECK_FALSE(info.layout_changed());
    INFO("largest difference ", (resumed - straight).abs().max().item<double>());
    CHECK(torch::equal(resumed, straight));

    SUBCASE("saved at the end of an epoch, it resumes at the next one's start") {
      train(2, "", 5, checkpoint);
      CHECK(torch::equal(train(2, checkpoint, 0, "", &info), straight));
      CHECK(info.epoch == 1);
      CHECK(info.epoch_samples == 0);
    }
  }

  TEST_CASE("a batch whose step failed counts as read: a resumed training does not train on it again") {
    Scratch scratch;
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(1, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    multigpu::DistributedSampler sampler(kSamples, 1, 0, true, 5);
    auto loader = torch::data::make_data_loader(Samples(kSamples).map(torch::data::transforms::Stack<>()), sampler,
                                                torch::data::DataLoaderOptions().batch_size(kBatch));
    dp.attach(sampler);
    int batch_number = 0;
    for (auto& batch : *loader) {
      if (++batch_number > 3) break;
      try {
        dp.train_step(batch, [&](RecipeNetImpl& m, const torch::data::Example<>& shard) {
          if (batch_number == 2) throw std::runtime_error("a bad batch");
          return loss_of(m, shard);
        });
      } catch (const multigpu::ReplicaError&) {
        CHECK(batch_number == 2);
      }
    }
    dp.save_state(scratch.file("state.pt"));
    auto other = multigpu_test::recipe_model(2);
    multigpu::DataParallel<RecipeNet> resumed(other, std::vector<c10::Device>(1, c10::Device("cpu")));
    resumed.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    const auto info = resumed.load_state(scratch.file("state.pt"));
    CHECK(info.step == 2);
    CHECK(info.epoch_samples == 24);  // three batches read, one of them failed
  }

  TEST_CASE("resumed on another number of replicas: the same training, and ResumeInfo says what changed") {
    Scratch scratch;
    const torch::Tensor straight = train(2, "", 0, "");
    train(2, "", 7, scratch.file("state.pt"));
    multigpu::ResumeInfo info;
    const torch::Tensor resumed = train(4, scratch.file("state.pt"), 0, "", &info);
    CHECK(info.layout_changed());
    CHECK(info.batch == 8);
    CHECK(info.batch_per_process() == 8);
    CHECK(contains(info.describe(), "saved on 2 replicas x 1 processes, resuming on 4 x 1; 4 -> 2 samples per replica"));
    INFO(info.describe(), "\nlargest difference ", (resumed - straight).abs().max().item<double>());
    CHECK(torch::allclose(resumed, straight, 1e-4, 1e-6));
  }

  TEST_CASE("the step count, the user's values and the random state come back") {
    Scratch scratch;
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    for (int step = 0; step < 3; ++step) {
      auto [x, y] = multigpu_test::recipe_batch(step);
      dp.train_step(std::make_pair(x, y), [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
        return multigpu_test::recipe_loss(m, s.first, s.second);
      });
    }
    dp.values().set("best_accuracy", 91.5);
    dp.values().set("patience", 4);
    dp.values().set("ema", torch::arange(3, torch::kFloat));
    Schedule schedule{0.25, 17};
    dp.attach("schedule", schedule);
    torch::manual_seed(1234);
    dp.save_state(scratch.file("state.pt"));
    const torch::Tensor expected_draw = torch::rand({5});

    torch::manual_seed(1);
    auto other = multigpu_test::recipe_model(2);
    multigpu::DataParallel<RecipeNet> restored(other, std::vector<c10::Device>(3, c10::Device("cpu")));
    restored.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    Schedule restored_schedule;
    restored.attach("schedule", restored_schedule);
    const auto info = restored.load_state(scratch.file("state.pt"));
    CHECK(restored_schedule.scale == 0.25);
    CHECK(restored_schedule.good_steps == 17);
    CHECK(torch::equal(torch::rand({5}), expected_draw));
    CHECK(restored.steps() == 3);
    CHECK(info.step == 3);
    CHECK_FALSE(info.has_data_position);
    CHECK(restored.values().number("best_accuracy") == 91.5);
    CHECK(restored.values().integer("patience") == 4);
    CHECK(torch::equal(restored.values().tensor("ema"), torch::arange(3, torch::kFloat)));
    CHECK(torch::equal(multigpu_test::flat_parameters(*other), multigpu_test::flat_parameters(*net)));
    restored.check_parity();
    // Momentum buffers came back too: the next step is the same on both.
    auto [x, y] = multigpu_test::recipe_batch(3);
    auto loss = [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
      return multigpu_test::recipe_loss(m, s.first, s.second);
    };
    dp.train_step(std::make_pair(x, y), loss);
    restored.train_step(std::make_pair(x, y), loss);
    CHECK(torch::allclose(multigpu_test::flat_parameters(*other), multigpu_test::flat_parameters(*net), 1e-5, 1e-7));
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, restored.values().number("nothing")) ==
          "CheckpointValues: no value \"nothing\"; there are: best_accuracy, ema, patience");
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, restored.values().set("a.b", 1)) ==
          "CheckpointValues: \"a.b\" is not a valid name: use letters, digits and underscores");
    // Nothing attached under a saved name: said, not silently dropped.
    auto third = multigpu_test::recipe_model(3);
    multigpu::DataParallel<RecipeNet> unattached(third, std::vector<c10::Device>(1, c10::Device("cpu")));
    unattached.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    CHECK(contains(unattached.load_state(scratch.file("state.pt")).describe(),
                   "the checkpoint holds the state of \"schedule\", and nothing is attached under that name"));
  }

  TEST_CASE("CUDA: a checkpoint of GPU replicas restores each GPU's random state, and resumes on the CPU too") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    Scratch scratch;
    const std::vector<c10::Device> gpu(2, c10::Device("cuda:0"));
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, gpu);
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    auto loss = [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
      return multigpu_test::recipe_loss(m, s.first, s.second);
    };
    for (int step = 0; step < 3; ++step) dp.train_step(multigpu_test::recipe_batch(step), loss);
    torch::manual_seed(7);  // every generator, the GPUs' too
    dp.save_state(scratch.file("gpu.pt"));
    const torch::Tensor expected_draw = torch::rand({5}, torch::Device("cuda:0")).cpu();
    const torch::Tensor trained = multigpu_test::flat_parameters(*net).cpu();

    torch::manual_seed(8);
    auto again = multigpu_test::recipe_model(2);
    multigpu::DataParallel<RecipeNet> on_gpu(again, gpu);
    on_gpu.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    on_gpu.load_state(scratch.file("gpu.pt"));
    CHECK(torch::equal(torch::rand({5}, torch::Device("cuda:0")).cpu(), expected_draw));
    CHECK(torch::equal(multigpu_test::flat_parameters(*again).cpu(), trained));
    on_gpu.check_parity();

    auto cpu_net = multigpu_test::recipe_model(3);
    multigpu::DataParallel<RecipeNet> on_cpu(cpu_net, std::vector<c10::Device>(3, c10::Device("cpu")));
    on_cpu.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    const auto info = on_cpu.load_state(scratch.file("gpu.pt"));
    CHECK(contains(info.describe(), "saved on 2 replicas x 1 processes, resuming on 3 x 1"));
    CHECK(torch::equal(multigpu_test::flat_parameters(*cpu_net), trained));
    // The momentum came back to the CPU: the next step agrees with the GPU's.
    dp.train_step(multigpu_test::recipe_batch(3), loss);
    on_cpu.train_step(multigpu_test::recipe_batch(3), loss);
    CHECK(torch::allclose(multigpu_test::flat_parameters(*cpu_net), multigpu_test::flat_parameters(*net).cpu(), 1e-5,
                          1e-6));
  }

  TEST_CASE("the DataParallel's GradScaler comes back with the training") {
    Scratch scratch;
    multigpu::GradScalerOptions scaling;
    scaling.init_scale = 1024.0;
    scaling.growth_interval = 2;
    multigpu::DataParallelOptions options;
    options.grad_scaler = std::make_shared<multigpu::GradScaler>(scaling);
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")), options);
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    auto loss = [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
      return multigpu_test::recipe_loss(m, s.first, s.second);
    };
    for (int step = 0; step < 5; ++step) dp.train_step(multigpu_test::recipe_batch(step), loss);
    REQUIRE(options.grad_scaler->scale() == 4096.0);  // grown twice
    REQUIRE(options.grad_scaler->growth_tracker() == 1);
    dp.save_state(scratch.file("scaled.pt"));

    multigpu::DataParallelOptions fresh;
    fresh.grad_scaler = std::make_shared<multigpu::GradScaler>(scaling);
    auto other = multigpu_test::recipe_model(2);
    multigpu::DataParallel<RecipeNet> resumed(other, std::vector<c10::Device>(2, c10::Device("cpu")), fresh);
    resumed.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    const auto info = resumed.load_state(scratch.file("scaled.pt"));
    INFO(info.describe());
    CHECK(fresh.grad_scaler->scale() == 4096.0);
    CHECK(fresh.grad_scaler->growth_tracker() == 1);
    dp.train_step(multigpu_test::recipe_batch(5), loss);
    resumed.train_step(multigpu_test::recipe_batch(5), loss);
    CHECK(fresh.grad_scaler->scale() == options.grad_scaler->scale());
    CHECK(torch::equal(multigpu_test::flat_parameters(*other), multigpu_test::flat_parameters(*net)));
  }

  TEST_CASE("a checkpoint of another model is refused, naming the first difference, and nothing changes") {
    Scratch scratch;
    torch::manual_seed(3);
    OtherNet other(3);
    torch::save(other, scratch.file("other.pt"));
    OtherNet extra(2, /*extra=*/true);
    torch::save(extra, scratch.file("extra.pt"));
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    dp.save_state(scratch.file("good.pt"));
    const torch::Tensor before = multigpu_test::flat_parameters(*net).clone();

    const std::string shape = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load(scratch.file("other.pt")));
    CHECK(contains(shape, "parameter fc2.weight is float [3, 16] in the checkpoint and float [2, 16] in your module"));
    const std::string more = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load(scratch.file("extra.pt")));
    CHECK(contains(more, "has a submodule fc3 (with fc3.weight) that your module lacks"));
    auto bigger = std::make_shared<OtherNetImpl>(2, /*extra=*/true);
    multigpu::DataParallel<OtherNetImpl> dp_bigger(bigger, std::vector<c10::Device>(2, c10::Device("cpu")));
    const std::string missing = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp_bigger.load(scratch.file("good.pt")));
    CHECK(contains(missing, "has no parameter fc3.weight, which your module has (float [2, 2])"));
    torch::manual_seed(3);
    auto doubled = multigpu_test::recipe_model(1);
    doubled->to(torch::kDouble);
    torch::save(doubled, scratch.file("double.pt"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load_state(scratch.file("double.pt"))),
                   "is not a training checkpoint of multigpu"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load(scratch.file("double.pt"))),
                   "parameter fc1.weight is double [16, 8] in the checkpoint and float [16, 8] in your module"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load(scratch.file("absent.pt"))), "there is no file"));
    CHECK(torch::equal(multigpu_test::flat_parameters(*net), before));
    dp.check_parity();

    // A module checkpoint (dp.save, torch::save) still loads, and the module
    // part of a training checkpoint loads into a plain module.
    dp.load(scratch.file("good.pt"));
    auto plain = multigpu_test::recipe_model(8);
    torch::load(plain, scratch.file("good.pt"));
    CHECK(torch::equal(multigpu_test::flat_parameters(*plain), before));
  }

  TEST_CASE("an optimizer state of another kind is refused and every optimizer stays as it was") {
    Scratch scratch;
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
    auto step = [&] {
      auto [x, y] = multigpu_test::recipe_batch(0);
      dp.train_step(std::make_pair(x, y), [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
        return multigpu_test::recipe_loss(m, s.first, s.second);
      });
    };
    step();
    dp.save_state(scratch.file("adam.pt"));
    auto other = multigpu_test::recipe_model(2);
    multigpu::DataParallel<RecipeNet> sgd(other, std::vector<c10::Device>(2, c10::Device("cpu")));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, sgd.load_state(scratch.file("adam.pt"))),
                   "call make_optimizer<Opt>(options) before load_state"));
    sgd.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    const torch::Tensor before = multigpu_test::flat_parameters(*other).clone();
    const std::string refused = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, sgd.load_state(scratch.file("adam.pt")));
    CHECK(contains(refused, "the optimizers are unchanged"));
    CHECK(torch::equal(multigpu_test::flat_parameters(*other), before));
    sgd.check_parity();
    step();  // dp goes on
  }

  TEST_CASE("a damaged checkpoint is detected, not loaded") {
    Scratch scratch;
    auto net = multigpu_test::recipe_model(1);
    {
      torch::NoGradGuard no_grad;
      net->fc1->weight.fill_(0.25);  // bytes 00 00 80 3e, easy to find in the file
    }
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.save_state(scratch.file("state.pt"));
    std::string bytes = read_file(scratch.file("state.pt"));
    const std::string quarter("\x00\x00\x80\x3e\x00\x00\x80\x3e\x00\x00\x80\x3e", 12);
    const auto at = bytes.find(quarter);
    REQUIRE(at != std::string::npos);
    bytes[at + 6] = '\x81';  // one weight becomes 0.2519...
    write_file(scratch.file("state.pt"), bytes);
    {
      torch::NoGradGuard no_grad;
      net->fc1->weight.fill_(0.5);
    }
    dp.resync_from_primary();
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load_state(scratch.file("state.pt")));
    INFO(message);
    CHECK((contains(message, "is damaged") || contains(message, "cannot read")));
    CHECK(torch::all(net->fc1->weight == 0.5).item<bool>());
    dp.check_parity();
  }

  TEST_CASE("paths: a missing folder or a folder is said at once, naming the path and why") {
    Scratch scratch;
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, multigpu::check_checkpoint_path(scratch.file("no/such/x.pt"))) ==
          "cannot write the checkpoint " + scratch.file("no/such/x.pt") + ": the folder " + scratch.file("no/such") +
              " does not exist");
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, multigpu::check_checkpoint_path(scratch.path.string())),
                   "is a folder; name a file in it"));
    multigpu::check_checkpoint_path(scratch.file("fine.pt"));
    CHECK_FALSE(std::filesystem::exists(scratch.file("fine.pt")));
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(1, c10::Device("cpu")));
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_state(scratch.file("no/x.pt"))) ==
          "save_state: cannot write the checkpoint " + scratch.file("no/x.pt") + ": the folder " + scratch.file("no") +
              " does not exist");
    CHECK(std::filesystem::is_empty(scratch.path));  // no temporary file left behind
  }

  TEST_CASE("what cannot be saved or attached is refused with a reason") {
    Scratch scratch;
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    auto [x, y] = multigpu_test::recipe_batch(0);
    dp.forward_backward(std::make_pair(x, y), [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
      return multigpu_test::recipe_loss(m, s.first, s.second);
    });
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_state(scratch.file("x.pt"))),
                   "the accumulated gradients are not part of a checkpoint; save after the step"));
    dp.step();
    dp.save_state(scratch.file("x.pt"));
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.attach(multigpu::DistributedSampler(10, 2, 1))) ==
          "attach: the sampler is rank 1's part for 2 processes, and this DataParallel trains as rank 0 of 1: make it "
          "DistributedSampler(size, group->size(), group->rank())");
    // The place in the data is only meaningful for the same data.
    multigpu::DistributedSampler sampler(kSamples, 1, 0, true, 5);
    dp.attach(sampler);
    dp.save_state(scratch.file("data.pt"));
    dp.attach(multigpu::DistributedSampler(kSamples, 1, 0, true, 6));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.load_state(scratch.file("data.pt"))),
                   "was saved for a data set of 40 samples, shuffled, seed 5; the attached sampler has 40 samples, "
                   "shuffled, seed 6"));
  }

  TEST_CASE("a checkpoint's failures are CheckpointError: a caller tells them from a failing step") {
    static_assert(std::is_base_of<multigpu::Error, multigpu::CheckpointError>::value,
                  "one catch of multigpu::Error still covers checkpoints");
    Scratch scratch;
    torch::save(OtherNet(3), scratch.file("other.pt"));
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    CHECK_THROWS_AS(dp.load(scratch.file("other.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.load_state(scratch.file("other.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.load_state(scratch.file("absent.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.load_optimizer(scratch.file("absent.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.save(scratch.file("no/x.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.save_state(scratch.file("no/x.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.save_optimizer(scratch.file("no/x.pt")), multigpu::CheckpointError);
    CHECK_THROWS_AS(dp.values().integer("absent"), multigpu::CheckpointError);
    // A file-system failure of the atomic write (here: renaming over a
    // folder) is one too, with its message.
    std::filesystem::create_directories(scratch.file("taken") + "/inside");
    const std::string renamed =
        MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_optimizer(scratch.file("taken")));
    CHECK(contains(renamed, "cannot write " + scratch.file("taken") + ": renaming "));
    // A failing step is not a checkpoint's failure.
    bool caught_as_checkpoint = false;
    try {
      dp.train_step(multigpu_test::recipe_batch(0),
                    [](RecipeNetImpl&, const std::pair<torch::Tensor, torch::Tensor>&) -> torch::Tensor {
                      throw std::runtime_error("a failing step");
                    });
    } catch (const multigpu::CheckpointError&) {
      caught_as_checkpoint = true;
    } catch (const multigpu::ReplicaError&) {
    }
    CHECK_FALSE(caught_as_checkpoint);
  }

  TEST_CASE("a checkpoint to a full disk is one CheckpointError: no temporary left, the last one intact, training goes on") {
    Scratch scratch;
    TinyFileSystem disk(scratch.path / "disk", "256k");
    if (!disk.mounted()) {
      MESSAGE("skipped: mounting a tmpfs on " << disk.path.string() << " is not permitted here (" << disk.why << ")");
      return;
    }
    const std::string last = disk.file("last.pt");
    auto net = multigpu_test::recipe_model(1);
    multigpu::DataParallel<RecipeNet> dp(net, std::vector<c10::Device>(2, c10::Device("cpu")));
    dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
    auto loss = [](RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
      return multigpu_test::recipe_loss(m, s.first, s.second);
    };
    dp.train_step(multigpu_test::recipe_batch(0), loss);
    dp.save_state(last);
    const std::string saved = read_file(last);
    disk.fill();
    dp.train_step(multigpu_test::recipe_batch(1), loss);
    const std::string full = std::strerror(ENOSPC);
    for (const auto& [what, message] :
         {std::pair<std::string, std::string>{"save_state",
                                              MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_state(last))},
          {"save", MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save(last))},
          {"save_optimizer", MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_optimizer(last))}}) {
      INFO(what << ": " << message);
      CHECK(contains(message, "cannot write " + last + ": writing " + last + ".tmp-"));
      CHECK(contains(message, full));
      CHECK(names_in(disk.path) == std::vector<std::string>{"filler", "last.pt"});  // the temporary removed
      CHECK(read_file(last) == saved);                                               // the last one intact
    }
    CHECK(dp.load_state(last).step == 1);
    dp.train_step(multigpu_test::recipe_batch(1), loss);  // and it goes on
    std::filesystem::remove(disk.file("filler"));
    disk.read_only(true);  // a read-only remount: the same, with its reason
    const std::string read_only = MULTIGPU_TEST_MESSAGE(multigpu::CheckpointError, dp.save_state(last));
    CHECK(contains(read_only, last));
    CHECK(contains(read_only, std::strerror(EROFS)));
    CHECK(read_file(last) == saved);
    disk.read_only(false);
    dp.save_state(last);
    CHECK(dp.load_state(last).step == 2);
  }

  TEST_CASE("FileSink keeps the first failed write and tells the serialiser every byte was taken") {
    const int fd = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
      MESSAGE("skipped: /dev/full cannot be opened here");
      return;
    }
    multigpu::detail::FileSink sink(fd);
    CHECK(sink.write("bytes", 5) == 5);
    CHECK(sink.error() == ENOSPC);
    CHECK(sink.write("more", 4) == 4);
    CHECK(sink.error() == ENOSPC);
    ::close(fd);
  }
}
