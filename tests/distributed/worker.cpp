// One process of a multi-process test job: reads its place from the
// environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), trains the
// recipe with DataParallel over --replicas replicas on --device (default
// cpu; cuda:0 puts every replica on that GPU), and writes its final
// parameters to --out. Faults on request: --die-at-step N makes rank
// --fault-rank exit in the middle of step N (inside its loss function),
// --hang-at-step N makes it stop there without exiting, --kill-at-step N
// makes every rank SIGKILL itself there; --mark-at-step N makes rank
// --fault-rank create the file --mark there and wait 500 ms (a test then
// cuts its link, kills or stops it). --steps-pause-ms M waits M ms before
// each step (a job that lasts long enough for a fault to land mid-run). Checkpoints: --checkpoint PATH
// with --save-at-step N saves the training after step N (dp.save_state);
// --resume PATH loads one before training and goes on from its step.
// --scaler 1 trains
// with a GradScaler (forward_backward, step, zero_grad), and --inf-at-step N
// then puts an infinity into rank --fault-rank's gradients after step N's
// sync; the final scale goes to --out's name + ".scale". --comm-hook bf16
// or fp16 sends the gradient buckets compressed.
// A step that fails on one process: --fail-at-step N with --fail-kind
// throw (the loss function throws), nan (a NaN loss under
// check_finite_loss), empty (an empty batch) or unused (fc1 gets no
// gradient) fails step N on rank --fault-rank only; every rank then
// catches that step's multigpu::Error, appends "step N: message" to --out's
// name + ".errors" and goes on. --skip-step N leaves batch N out on every
// rank (the run the failed one must equal). --fail-kind split gives rank
// --fault-rank a pair batch whose fields disagree (it fails in splitting);
// zero multiplies that rank's losses of step N by 0 (no error: the
// reference for a failed micro-step). --accumulate M trains each step as M
// micro-steps inside no_sync() (each on a part of the batch) and then
// step(): the last micro-step of step N is the one that fails, the ranks
// that see its error go on to step(). --double 1 trains in float64;
// --bucket-cap-mib X sets the bucket cap; --report-time 1 prints the
// training loop's time per step. --sync-bn 1 trains
// recipe_bn_model, converted to SyncBatchNorm, in float64, and writes its
// parameters and buffers (flat_state) to --out. --phases 1 trains with
// find_unused_parameters and recipe_phase_optimizer (weight decay), the
// whole model at step 0 and fc2 alone after (recipe_phase_loss).
// --other-shape 1 gives this process a model whose fc2 has 3 outputs (a
// model that differs from the others'). --dump-trace 1 prints the
// process's collective trace to stderr at the end, and after an error.
// --trace-size N keeps N collectives in the trace (0: off; the benchmark
// benchmarks/trace_overhead.sh compares them).
//
// Exit codes: 0 trained; 2 a multigpu error (message on stderr and in --out).

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include <multigpu/multigpu.hpp>
#include <multigpu/distributed.hpp>

#include "recipe.hpp"

namespace {

struct Args {
  int replicas = 2;
  int steps = 4;
  std::string out;
  int die_at_step = -1;
  int hang_at_step = -1;
  int fault_rank = 1;
  int timeout_ms = 300000;
  bool summed = false;  // the loss is a sum over the samples (LossReduction::kSum)
  bool scaler = false;
  int inf_at_step = -1;
  std::string comm_hook;  // "", "bf16" or "fp16": compressed gradient buckets
  std::string device = "cpu";
  int kill_at_step = -1;
  int save_at_step = -1;
  std::string checkpoint;
  std::string resume;
  int fail_at_step = -1;
  std::string fail_kind;  // throw, nan, empty or unused
  int skip_step = -1;
  bool double_precision = false;
  double bucket_cap_mib = 0;  // 0: the default
  bool report_time = false;
  bool sync_bn = false;
  int accumulate = 0;  // 0: train_step; M: M micro-steps in no_sync(), then step()
  bool phases = false;
  int mark_at_step = -1;
  std::string mark;
  int steps_pause_ms = 0;
  bool other_shape = false;
  bool dump_trace = false;
  int trace_size = 2000;
};

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    const std::string value = argv[i + 1];
    if (name == "--replicas") args.replicas = std::stoi(value);
    else if (name == "--steps") args.steps = std::stoi(value);
    else if (name == "--out") args.out = value;
    else if (name == "--die-at-step") args.die_at_step = std::stoi(value);
    else if (name == "--hang-at-step") args.hang_at_step = std::stoi(value);
    else if (name == "--fault-rank") args.fault_rank = std::stoi(value);
    else if (name == "--timeout-ms") args.timeout_ms = std::stoi(value);
    else if (name == "--summed") args.summed = value == "1";
    else if (name == "--scaler") args.scaler = value == "1";
    else if (name == "--inf-at-step") args.inf_at_step = std::stoi(value);
    else if (name == "--comm-hook") args.comm_hook = value;
    else if (name == "--device") args.device = value;
    else if (name == "--kill-at-step") args.kill_at_step = std::stoi(value);
    else if (name == "--save-at-step") args.save_at_step = std::stoi(value);
    else if (name == "--checkpoint") args.checkpoint = value;
    else if (name == "--resume") args.resume = value;
    else if (name == "--fail-at-step") args.fail_at_step = std::stoi(value);
    else if (name == "--fail-kind") args.fail_kind = value;
    else if (name == "--skip-step") args.skip_step = std::stoi(value);
    else if (name == "--double") args.double_precision = value == "1";
    else if (name == "--bucket-cap-mib") args.bucket_cap_mib = std::stod(value);
    else if (name == "--report-time") args.report_time = value == "1";
    else if (name == "--sync-bn") args.sync_bn = value == "1";
    else if (name == "--accumulate") args.accumulate = std::stoi(value);
    else if (name == "--phases") args.phases = value == "1";
    else if (name == "--mark-at-step") args.mark_at_step = std::stoi(value);
    else if (name == "--mark") args.mark = value;
    else if (name == "--steps-pause-ms") args.steps_pause_ms = std::stoi(value);
    else if (name == "--other-shape") args.other_shape = value == "1";
    else if (name == "--dump-trace") args.dump_trace = value == "1";
    else if (name == "--trace-size") args.trace_size = std::stoi(value);
    else {
      std::cerr << "distributed_worker: unknown option " << name << "\n";
      std::exit(64);
    }
  }
  return args;
}

// --sync-bn 1: the BatchNorm recipe, its statistics over every process.
void train_sync_bn(const Args& args, multigpu::ProcessGroup& group) {
  auto net = multigpu_test::recipe_bn_model(multigpu_test::kRecipeSeed + static_cast<std::uint64_t>(group.rank()));
  multigpu::convert_sync_batchnorm(*net);
  multigpu::DataParallel<torch::nn::Sequential> dp(
      net, std::vector<c10::Device>(static_cast<std::size_t>(args.replicas), c10::Device(args.device)),
      group.data_parallel_options());
  dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer());
  for (int step = 0; step < args.steps; ++step) {
    auto [x, y] = multigpu_test::recipe_batch(step);
    const auto batch = std::make_pair(multigpu_test::part_of(x, group.size(), group.rank()).to(torch::kDouble),
                                      multigpu_test::part_of(y, group.size(), group.rank()).to(torch::kDouble));
    dp.train_step(batch, [](torch::nn::SequentialImpl& model, const std::pair<torch::Tensor, torch::Tensor>& shard) {
      return torch::mse_loss(model.forward(shard.first), shard.second);
    });
  }
  group.barrier();
  torch::save(multigpu_test::flat_state(*net), args.out);
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  const auto start = std::chrono::steady_clock::now();
  std::shared_ptr<multigpu::ProcessGroup> group;
  try {
    multigpu::DistributedOptions options;
    options.timeout = std::chrono::milliseconds(args.timeout_ms);
    options.trace_size = static_cast<std::size_t>(args.trace_size);
    group = multigpu::ProcessGroup::from_environment(options);
    const int rank = group->rank();
    if (args.sync_bn) {
      train_sync_bn(args, *group);
      return 0;
    }

    // Each rank starts from its own random model: the broadcast from rank 0
    // must make them one.
    auto net = multigpu_test::recipe_model(multigpu_test::kRecipeSeed + static_cast<std::uint64_t>(rank));
    const auto dtype = args.double_precision ? torch::kDouble : torch::kFloat;
    if (args.other_shape) net->fc2 = net->replace_module("fc2", torch::nn::Linear(16, 3));
    net->to(dtype);
    multigpu::DataParallelOptions dp_options = group->data_parallel_options();
    if (args.summed) dp_options.loss_reduction = multigpu::LossReduction::kSum;
    if (args.comm_hook == "bf16") dp_options.comm_hook = multigpu::bf16_compress_hook();
    if (args.comm_hook == "fp16") dp_options.comm_hook = multigpu::fp16_compress_hook();
    if (args.scaler) dp_options.grad_scaler = std::make_shared<multigpu::GradScaler>();
    if (args.bucket_cap_mib > 0) dp_options.bucket_cap_mib = args.bucket_cap_mib;
    if (args.fail_kind == "nan") dp_options.check_finite_loss = true;
    if (args.phases) dp_options.find_unused_parameters = true;
    multigpu::DataParallel<multigpu_test::RecipeNet> dp(
        net, std::vector<c10::Device>(static_cast<std::size_t>(args.replicas), c10::Device(args.device)), dp_options);
    dp.make_optimizer<torch::optim::SGD>(args.phases ? multigpu_test::recipe_phase_optimizer()
                                                     : multigpu_test::recipe_optimizer(args.summed));

    if (!args.resume.empty()) {
      const multigpu::ResumeInfo info = dp.load_state(args.resume);
      std::cerr << "distributed_worker: " << info.describe() << "\n";
    }
    const auto loop_start = std::chrono::steady_clock::now();
    int trained_steps = 0;
    for (int step = static_cast<int>(dp.steps()); step < args.steps; ++step) {
      if (step == args.skip_step) continue;
      std::this_thread::sleep_for(std::chrono::milliseconds(args.steps_pause_ms));
      auto [x, y] = multigpu_test::recipe_batch(step);
      auto batch = std::make_pair(multigpu_test::part_of(x, group->size(), rank).to(dtype),
                                  multigpu_test::part_of(y, group->size(), rank).to(dtype));
      const bool fail_here = rank == args.fault_rank && step == args.fail_at_step;
      if (fail_here && args.fail_kind == "empty" && args.accumulate == 0) {
        batch = std::make_pair(batch.first.narrow(0, 0, 0), batch.second.narrow(0, 0, 0));
      }
      if (fail_here && args.fail_kind == "split") {
        batch = std::make_pair(batch.first, batch.second.narrow(0, 0, batch.second.size(0) - 1));
      }
      bool fail_now = fail_here;  // with --accumulate, the last micro-step only
      auto loss = [&](multigpu_test::RecipeNetImpl& model, const std::pair<torch::Tensor, torch::Tensor>& shard) {
        if (rank == args.fault_rank && step == args.die_at_step) std::_Exit(7);  // killed mid-step
        if (step == args.kill_at_step) std::raise(SIGKILL);
        if (rank == args.fault_rank && step == args.mark_at_step) {
          std::ofstream(args.mark) << "step " << step << "\n";
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
        }
        if (rank == args.fault_rank && step == args.hang_at_step) {
          std::this_thread::sleep_for(std::chrono::hours(1));  // stuck mid-step
        }
        if (fail_now && args.fail_kind == "throw") {
          throw std::runtime_error("deliberate failure at step " + std::to_string(step));
        }
        if (fail_now && args.fail_kind == "nan") {
          return multigpu_test::recipe_loss(model, shard.first, shard.second, args.summed) *
                 std::numeric_limits<double>::quiet_NaN();
        }
        if (fail_now && args.fail_kind == "unused") {  // fc1's parameters get no gradient
          return torch::mse_loss(model.fc2(torch::tanh(model.fc1(shard.first).detach())), shard.second);
        }
        if (args.phases) return multigpu_test::recipe_phase_loss(model, shard.first, shard.second, step);
        if (fail_now && args.fail_kind == "zero") {
          return multigpu_test::recipe_loss(model, shard.first, shard.second, args.summed) * 0.0;
        }
        return multigpu_test::recipe_loss(model, shard.first, shard.second, args.summed);
      };
      if (args.accumulate > 0) {
        const std::int64_t n = batch.first.size(0);
        {
          auto guard = dp.no_sync();
          for (int m = 0; m < args.accumulate; ++m) {
            const std::int64_t begin = n * m / args.accumulate;
            const std::int64_t end = n * (m + 1) / args.accumulate;
            auto part = std::make_pair(batch.first.slice(0, begin, end), batch.second.slice(0, begin, end));
            const bool last = m + 1 == args.accumulate;
            fail_now = fail_here && (last || args.fail_kind == "zero");
            if (fail_now && args.fail_kind == "empty") {
              part = std::make_pair(part.first.narrow(0, 0, 0), part.second.narrow(0, 0, 0));
            }
            try {
              dp.forward_backward(part, loss);
            } catch (const multigpu::Error& e) {
              if (!fail_now) throw;
              std::ofstream(args.out + ".errors", std::ios::app) << "step " << step << ": " << e.what() << "\n";
            }
          }
        }
        dp.step();
        dp.zero_grad();
        ++trained_steps;
        continue;
      }
      if (step == args.fail_at_step) {
        try {
          dp.train_step(batch, loss);
        } catch (const multigpu::Error& e) {
          std::ofstream(args.out + ".errors", std::ios::app) << "step " << step << ": " << e.what() << "\n";
        }
        continue;
      }
      ++trained_steps;
      if (args.scaler) {
        dp.forward_backward(batch, loss);
        if (rank == args.fault_rank && step == args.inf_at_step) {
          const torch::NoGradGuard no_grad;
          dp.module().parameters()[0].grad().view({-1})[0].fill_(std::numeric_limits<float>::infinity());
        }
        dp.step();
        dp.zero_grad();
      } else {
        dp.train_step(batch, loss);
      }
      if (step + 1 == args.save_at_step) dp.save_state(args.checkpoint);
    }
    if (args.report_time) {
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - loop_start).count();
      std::cerr << "distributed_worker: " << trained_steps << " steps, " << ms / std::max(trained_steps, 1)
                << " ms per step\n";
    }
    group->barrier();  // every rank finished training (exercised by the tests)
    if (args.dump_trace) std::cerr << "distributed_worker: trace\n" << group->trace().text();
    torch::save(multigpu_test::flat_parameters(*net).cpu(), args.out);
    if (args.scaler) torch::save(torch::tensor({dp.grad_scaler()->scale()}, torch::kDouble), args.out + ".scale");
    return 0;
  } catch (const multigpu::Error& e) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cerr << "distributed_worker: " << e.what() << "\n";
    if (args.dump_trace && group) std::cerr << "distributed_worker: trace\n" << group->trace().text();
    std::ofstream(args.out) << "failed after " << seconds << " s: " << e.what() << "\n";
    return 2;
  }
}
