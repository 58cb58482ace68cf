// Trains a small CNN on Fashion-MNIST over every usable GPU of this machine
// (or the CPU, with a warning, when there is none):
//
//   quickstart                              # --devices auto
//   quickstart --devices 0,1 --epochs 3
//   quickstart --devices cpu,cpu --allow-duplicates   # two CPU replicas, to try it anywhere
//   quickstart --timeout 300                # wait longer for the other processes (default 60 s)
//   quickstart --save-every 200 --resume auto   # checkpoints in checkpoints/; a rerun goes on
//                                               # from the newest one (after Ctrl-C, a crash, a kill)
//   quickstart --precision bf16             # autocast on every replica (fp16 adds a GradScaler)
//
// The training loop is plain LibTorch; multigpu adds three lines: choose the
// devices, wrap the model, and train_step instead of forward/backward/step.
//
// Started by a launcher (torchrun-style variables, srun, mpirun; see
// docs/distributed.md), the same program trains as one of several processes: each takes
// its part of every epoch and of the test set, and gradients are averaged
// over all of them. --batch-size stays the batch over all processes.

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <iostream>
#include <regex>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <torch/torch.h>
#include <unistd.h>

#include <multigpu/multigpu.hpp>
#include <multigpu/distributed.hpp>

#ifndef MULTIGPU_FASHION_MNIST_DIR
#define MULTIGPU_FASHION_MNIST_DIR "fashion-mnist"
#endif

namespace {

/// Two convolutions and two linear layers: about 90% test accuracy on Fashion-MNIST after a few epochs.
struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)));
    fc1 = register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128));
    fc2 = register_module("fc2", torch::nn::Linear(128, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);  // 32 x 14 x 14
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);  // 64 x 7 x 7
    x = torch::relu(fc1(x.flatten(1)));
    return torch::log_softmax(fc2(x), 1);
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

/// One line that redraws itself on a terminal, or an occasional plain line in a log.
class Progress {
 public:
  Progress() : tty_(isatty(fileno(stdout)) != 0) {}
  /// `loss()` is called only when a line is printed: reading the loss waits
  /// for the GPU, which a step otherwise never does.
  template <class Loss>
  void update(int epoch, std::int64_t done, std::int64_t total, const Loss& loss, double samples_per_second) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = done >= total;
    if (!last && now - last_print_ < (tty_ ? std::chrono::milliseconds(100) : std::chrono::seconds(5))) return;
    last_print_ = now;
    const int width = 30;
    const int filled = static_cast<int>(width * done / std::max<std::int64_t>(total, 1));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    fmt::print("{}epoch {} [{}] {:>5}/{} loss {:.4f} {:>8.0f} samples/s{}", tty_ ? "\r" : "", epoch, bar, done, total,
               loss(), samples_per_second, tty_ && !last ? "" : "\n");
    std::fflush(stdout);
  }

 private:
  bool tty_;
  std::chrono::steady_clock::time_point last_print_{};
};

/// The signal that asked the training to stop (0: none yet).
volatile std::sig_atomic_t stop_signal = 0;
/// The first SIGINT/SIGTERM asks the training to save and stop after its
/// step; a second one ends the program at once.
extern "C" void request_stop(int signal) {
  if (stop_signal != 0) {
    std::signal(signal, SIG_DFL);
    std::raise(signal);
    return;
  }
  stop_signal = signal;
}

/// The training checkpoint with the highest step in `folder` ("" if none):
/// the ones --save-every writes, step-<N>.pt.
std::string newest_checkpoint(const std::string& folder) {
  std::error_code error;
  std::string newest;
  long long newest_step = -1;
  const std::regex name(R"(step-(\d+)\.pt)");
  for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
    std::smatch match;
    const std::string file = entry.path().filename().string();
    if (!std::regex_match(file, match, name)) continue;
    const long long step = std::stoll(match[1].str());
    if (step > newest_step) {
      newest_step = step;
      newest = entry.path().string();
    }
  }
  return newest;
}

/// Keeps the `keep` newest step-<N>.pt checkpoints in `folder`.
void remove_old_checkpoints(const std::string& folder, std::size_t keep) {
  std::vector<std::pair<long long, std::filesystem::path>> found;
  std::error_code error;
  const std::regex name(R"(step-(\d+)\.pt)");
  for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
    std::smatch match;
    const std::string file = entry.path().filename().string();
    if (std::regex_match(file, match, name)) found.emplace_back(std::stoll(match[1].str()), entry.path());
  }
  std::sort(found.begin(), found.end());
  for (std::size_t i = 0; i + keep < found.size(); ++i) std::filesystem::remove(found[i].second, error);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains a small CNN on Fashion-MNIST with multigpu::DataParallel."};
  std::string spec = "auto";
  std::string data_dir = MULTIGPU_FASHION_MNIST_DIR;
  std::string checkpoint;
  int epochs = 1;
  std::int64_t batch_size = 64;
  double lr = 0.05;
  std::int64_t max_batches = 0;
  double min_accuracy = 0;
  bool allow_duplicates = false;
  int timeout_seconds = 60;
  std::int64_t save_every = 0;
  std::string state_dir = "checkpoints";
  std::string resume;
  std::string precision = "fp32";
  app.add_option("-d,--devices", spec, "auto, auto:N, all, cpu, cuda, or GPU numbers like 0,1")->capture_default_str();
  app.add_option("--epochs", epochs, "Passes over the training set")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--batch-size", batch_size, "Samples per step, over all devices")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--lr", lr, "Learning rate (SGD with momentum 0.9)")->capture_default_str()->check(CLI::Range(1e-9, 1e3));
  app.add_option("--data", data_dir, "Folder with the uncompressed Fashion-MNIST files")->capture_default_str();
  app.add_option("--checkpoint", checkpoint, "Save the trained model here (a plain LibTorch checkpoint)");
  app.add_option("--save-every", save_every,
                 "Save the whole training (model, optimizer, place in the data, random state) every N steps "
                 "into --state-dir as step-<N>.pt, keeping the 3 newest (0: never)")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40));
  app.add_option("--state-dir", state_dir, "Folder of the --save-every checkpoints (made if missing)")
      ->capture_default_str();
  app.add_option("--resume", resume,
                 "Go on with the training saved in this checkpoint, or 'auto': the newest in --state-dir (none: "
                 "start afresh)");
  app.add_option("--max-batches", max_batches, "Stop each epoch after this many batches (0: the whole set)")
      ->check(CLI::Range(0, 1000000000));
  app.add_option("--min-accuracy", min_accuracy, "Exit with status 3 if the final test accuracy (%) is below this")
      ->check(CLI::Range(0.0, 100.0));
  app.add_option("--precision", precision,
                 "Number format of the forward pass: fp32, bf16 (CPUs, GPUs from Ampere on) or fp16 (GPUs; with a "
                 "GradScaler)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_flag("--allow-duplicates", allow_duplicates, "Allow a device more than once (e.g. cpu,cpu)");
  app.add_option("--timeout", timeout_seconds,
                 "Seconds before waiting for another process or device becomes an error naming the one that "
                 "stopped answering (crashed, hung, stopped). Every process must start within it; a step of this "
                 "model takes a small fraction of it. Raise it for slow starts across machines")
      ->capture_default_str()
      ->check(CLI::Range(1, 86400));
  CLI11_PARSE(app, argc, argv);
  const bool batch_size_given = app.count("--batch-size") > 0;

  try {
    // A single process unless a launcher says otherwise.
    multigpu::DistributedOptions distributed_options;
    distributed_options.timeout = std::chrono::seconds(timeout_seconds);
    const auto group = multigpu::ProcessGroup::from_environment(distributed_options);
    const bool primary = group->is_primary();
    const std::string who = group->distributed() ? fmt::format("rank {}: ", group->rank()) : "";
    multigpu::DeviceManagerOptions device_options;
    device_options.allow_duplicates = allow_duplicates;
    multigpu::DeviceManager device_manager(device_options);
    const multigpu::DeviceSelection devices = device_manager.select(group->local_device_spec(spec));
    fmt::print("{}training on {}{}\n", who, devices.describe(),
               group->distributed() ? fmt::format(", as {}", group->env().describe()) : "");

    // Where checkpoints go is made and checked now, not after an hour of
    // training. Rank 0 writes them all.
    if (primary) {
      std::error_code error;
      if (!checkpoint.empty()) {
        const auto folder = std::filesystem::path(checkpoint).parent_path();
        if (!folder.empty()) std::filesystem::create_directories(folder, error);
        multigpu::check_checkpoint_path(checkpoint);
      }
      if (save_every > 0) {
        std::filesystem::create_directories(state_dir, error);
        multigpu::check_checkpoint_path((std::filesystem::path(state_dir) / "step-0.pt").string());
      }
    }

    torch::manual_seed(0);
    Net net;
    multigpu::DataParallelOptions dp_options;
    dp_options.collective_timeout = std::chrono::seconds(timeout_seconds);
    dp_options.precision = multigpu::parse_precision(precision);
    if (dp_options.precision == multigpu::Precision::kFloat16) {
      dp_options.grad_scaler = std::make_shared<multigpu::GradScaler>();  // fp16 needs loss scaling
    }
    multigpu::DataParallel<Net> dp(net, devices, group->data_parallel_options(dp_options));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(lr).momentum(0.9));

    using torch::data::datasets::MNIST;
    auto train_set = MNIST(data_dir, MNIST::Mode::kTrain)
                         .map(torch::data::transforms::Normalize<>(0.2860, 0.3530))
                         .map(torch::data::transforms::Stack<>());
    auto test_set = MNIST(data_dir, MNIST::Mode::kTest)
                        .map(torch::data::transforms::Normalize<>(0.2860, 0.3530))
                        .map(torch::data::transforms::Stack<>());
    // Each process its own part of the data, reshuffled every epoch. The
    // sampler is a handle: the loader's copy and this one share one state,
    // and checkpoints record (and restore) the place in the data.
    const std::int64_t processes = group->size();
    const multigpu::DistributedSampler train_sampler(train_set.size().value(), group->size(), group->rank());
    dp.attach(train_sampler);
    if (resume == "auto") {
      // Rank 0 chooses; every rank reads that file (load_state checks that
      // they all read the same).
      resume = primary ? newest_checkpoint(state_dir) : std::string();
      if (group->distributed()) resume = group->all_gather_text(resume).at(0);
      if (resume.empty() && primary) fmt::print("no checkpoint in {} yet: starting afresh\n", state_dir);
    }
    std::int64_t resumed_samples = 0;  // of this process, in the epoch it goes on with
    if (!resume.empty()) {
      const multigpu::ResumeInfo resumed = dp.load_state(resume);
      resumed_samples = resumed.epoch_samples / processes;
      if (primary) fmt::print("{}\n", resumed.describe());
      // The same effective batch as before, unless --batch-size says otherwise.
      if (!batch_size_given && resumed.batch > 0) batch_size = resumed.batch;
    }
    const std::int64_t local_batch = (batch_size + processes - 1) / processes;
    const std::int64_t train_size = static_cast<std::int64_t>(train_sampler.local_size());
    auto train_loader = torch::data::make_data_loader(
        std::move(train_set), train_sampler,
        torch::data::DataLoaderOptions().batch_size(static_cast<std::size_t>(local_batch)));
    const multigpu::DistributedSampler test_sampler(test_set.size().value(), group->size(), group->rank(),
                                                    /*shuffle=*/false);
    auto test_loader = torch::data::make_data_loader(std::move(test_set), test_sampler,
                                                     torch::data::DataLoaderOptions().batch_size(1000));

    auto nll = [](NetImpl& model, const torch::data::Example<>& shard) {
      return torch::nll_loss(model.forward(shard.data), shard.target);
    };
    const std::int64_t batches_per_epoch = max_batches > 0
                                               ? std::min(max_batches, (train_size + local_batch - 1) / local_batch)
                                               : (train_size + local_batch - 1) / local_batch;
    // The test accuracy over every process's part of the test set.
    auto evaluate = [&](int epoch) {
      dp.eval();
      std::int64_t correct = 0;
      std::int64_t total = 0;
      for (const auto& batch : *test_loader) {
        const auto output = dp.predict(batch.data, [](NetImpl& model, const torch::Tensor& x) { return model.forward(x); });
        correct += output.argmax(1).eq(batch.target.to(output.device())).sum().item<std::int64_t>();
        total += batch.data.size(0);
      }
      const auto counts = torch::tensor({correct, total});
      group->all_reduce_sum(counts);
      correct = counts[0].item<std::int64_t>();
      total = counts[1].item<std::int64_t>();
      const double percent = 100.0 * static_cast<double>(correct) / static_cast<double>(total);
      if (primary) fmt::print("epoch {}: test accuracy {:.2f}% ({} / {})\n", epoch, percent, correct, total);
      return percent;
    };
    double accuracy = 0;
    // A resumed training goes on in the epoch it stopped in, after the
    // samples it already trained on (the sampler skips them).
    const auto first_epoch = static_cast<int>(train_sampler.epoch()) + 1;
    std::int64_t resumed_batches = resumed_samples / local_batch;
    if (first_epoch > epochs) accuracy = evaluate(epochs);  // resumed after the last epoch: nothing to train
    if (save_every > 0) {
      std::signal(SIGINT, request_stop);
      std::signal(SIGTERM, request_stop);
    }
    for (int epoch = first_epoch; epoch <= epochs; ++epoch) {
      dp.train();
      Progress progress;
      const auto start = std::chrono::steady_clock::now();
      std::int64_t seen = 0;
      std::int64_t batches = resumed_batches;  // of this epoch
      std::int64_t trained = 0;                // of them, by this run
      resumed_batches = 0;
      torch::Tensor loss_sum;  // on the device: summed without waiting for it
      for (auto& batch : *train_loader) {
        if (max_batches > 0 && batches >= batches_per_epoch) break;
        const multigpu::StepLoss loss = dp.train_step(batch, nll);
        loss_sum = loss_sum.defined() ? loss_sum + loss.tensor() : loss.tensor();
        seen += batch.data.size(0);
        ++batches;
        ++trained;
        // Checkpoints every --save-every steps, and at once when asked to
        // stop (Ctrl-C, SIGTERM from a scheduler or a preemption): then it
        // exits after saving. Several processes must all save at the same
        // step: they agree after each step whether one was asked to stop.
        if (save_every > 0) {
          const bool regular = dp.steps() % save_every == 0;
          bool stopping = stop_signal != 0;
          if (processes > 1) {
            const auto asked = torch::tensor({static_cast<std::int64_t>(stopping)});
            group->all_reduce_sum(asked);
            stopping = asked.item<std::int64_t>() > 0;
          }
          if (regular || stopping) {
            const std::string path =
                (std::filesystem::path(state_dir) / fmt::format("step-{}.pt", dp.steps())).string();
            dp.save_state(path);  // every process calls it; rank 0 writes
            if (primary) remove_old_checkpoints(state_dir, 3);
            if (stopping) {
              if (primary) {
                fmt::print("\nstopped at step {}: saved {}; run again with --resume auto to go on\n", dp.steps(),
                           path);
              }
              return 128 + (stop_signal != 0 ? static_cast<int>(stop_signal) : SIGTERM);
            }
          }
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (primary) {  // the other processes' progress is the same
          progress.update(
              epoch, batches, batches_per_epoch,
              [&] { return loss_sum.item<double>() / static_cast<double>(trained); },
              static_cast<double>(seen * processes) / std::max(seconds, 1e-9));
        }
      }

      accuracy = evaluate(epoch);
    }
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
    if (!checkpoint.empty() && primary) {  // every process holds the same model
      dp.save(checkpoint);
      fmt::print("saved {} (load it with torch::load into a plain Net; state checksum {:016x})\n", checkpoint,
                 multigpu::state_checksum(dp.module()));
    }
    if (accuracy < min_accuracy) {
      fmt::print(stderr, "{}test accuracy {:.2f}% is below --min-accuracy {:.2f}%\n", who, accuracy, min_accuracy);
      return 3;
    }
    return 0;
  } catch (const multigpu::Error& e) {
    fmt::print(stderr, "quickstart: {}\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    fmt::print(stderr, "quickstart: {}\n", e.what_without_backtrace());
    if (std::string(e.what()).find("Error opening") != std::string::npos) {
      fmt::print(stderr, "Fashion-MNIST was not found in {}: install Debian's dataset-fashion-mnist (README command 1 "
                         "does), or pass --data with a folder of the uncompressed files\n", data_dir);
    }
    return 1;
  }
}
