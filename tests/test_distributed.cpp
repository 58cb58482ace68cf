// Multi-process training: the environment a launcher sets, the rendezvous,
// and P processes x K CPU replicas over loopback against one process and
// one plain model. The processes are real: tests/distributed/worker.cpp,
// started with the variables torchrun would set.

#include "support.hpp"  // first: see its comment

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "multigpu/scheduler/process.hpp"
#include "multigpu/distributed.hpp"

#include "distributed/recipe.hpp"
#include "net_namespaces.hpp"
#include "tiny_file_system.hpp"

using multigpu::DistributedOptions;
using multigpu::read_distributed_env;
using multigpu_test::contains;

namespace {

multigpu::EnvLookup fake_env(std::map<std::string, std::string> values) {
  return [values = std::move(values)](const std::string& name) -> std::optional<std::string> {
    auto found = values.find(name);
    if (found == values.end()) return std::nullopt;
    return found->second;
  };
}

std::string env_error(std::map<std::string, std::string> values, DistributedOptions options = {}) {
  return MULTIGPU_TEST_MESSAGE(multigpu::DistributedError, read_distributed_env(options, fake_env(std::move(values))));
}

/// A TCP socket listening on a free loopback port (closed on destruction),
/// standing for another program on MASTER_PORT: one that never accepts, one
/// that accepts and closes every connection at once, or one that accepts
/// and never answers.
class Listener {
 public:
  enum class Answer { kNothing, kClose, kSilence };

  explicit Listener(Answer answer = Answer::kNothing) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = 0;
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(::listen(fd_, 4) == 0);
    socklen_t length = sizeof(address);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    if (answer == Answer::kNothing) return;
    acceptor_ = std::thread([this, answer] {
      for (int connection; (connection = ::accept(fd_, nullptr, nullptr)) >= 0;) {
        if (answer == Answer::kClose) {
          ::close(connection);
        } else {
          held_.push_back(connection);
        }
      }
    });
  }
  ~Listener() {
    ::shutdown(fd_, SHUT_RDWR);  // ends a blocked accept
    if (acceptor_.joinable()) acceptor_.join();
    for (int connection : held_) ::close(connection);
    ::close(fd_);
  }
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::thread acceptor_;
  std::vector<int> held_;  // the acceptor's until it is joined
};

/// A port nobody listens on right now (the kernel's choice, released).
[[maybe_unused]] int free_port() { return Listener().port(); }

/// Rank `rank` of `world` meeting on 127.0.0.1:`port`, given in code (no environment).
[[maybe_unused]] DistributedOptions loopback(int rank, int world, int port, std::chrono::milliseconds timeout) {
  DistributedOptions options;
  options.rank = rank;
  options.world_size = world;
  options.master_addr = "127.0.0.1";
  options.master_port = port;
  options.timeout = timeout;
  return options;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

TEST_SUITE("distributed environment") {
  TEST_CASE("no launcher: a single process") {
    const auto env = read_distributed_env({}, fake_env({}));
    CHECK(!env.distributed());
    CHECK(env.rank == 0);
    CHECK(env.world_size == 1);
    CHECK(env.launcher == "none");
    CHECK(env.describe() == "a single process");
  }

  TEST_CASE("torchrun's variables") {
    const auto env = read_distributed_env(
        {}, fake_env({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                      {"GROUP_RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}}));
    CHECK(env.launcher == "torchrun");
    CHECK(env.rank == 3);
    CHECK(env.world_size == 4);
    CHECK(env.local_rank == 1);
    CHECK(env.local_world_size == 2);
    CHECK(env.node_rank == 1);
    CHECK(env.nnodes == 2);
    CHECK(env.describe() == "rank 3 of 4 (local 1 of 2, node 1 of 2) from torchrun, rendezvous at 10.0.0.1:29500");
  }

  TEST_CASE("one process per machine: NODE_RANK and NNODES") {
    const auto env = read_distributed_env(
        {}, fake_env({{"NODE_RANK", "1"}, {"NNODES", "3"}, {"MASTER_ADDR", "head"}, {"MASTER_PORT", "1234"}}));
    CHECK(env.launcher == "nodes");
    CHECK(env.rank == 1);
    CHECK(env.world_size == 3);
    CHECK(env.local_world_size == 1);
    CHECK(env.node_rank == 1);
  }

  TEST_CASE("SLURM's and Open MPI's variables, and explicit values over them") {
    const auto slurm = read_distributed_env(
        {}, fake_env({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                      {"SLURM_NTASKS_PER_NODE", "4(x2)"}, {"SLURM_NODEID", "1"}, {"SLURM_NNODES", "2"},
                      {"MASTER_ADDR", "node1"}, {"MASTER_PORT", "29400"}}));
    CHECK(slurm.launcher == "slurm");
    CHECK(slurm.rank == 5);
    CHECK(slurm.local_world_size == 4);
    CHECK(slurm.node_rank == 1);
    const auto mpi = read_distributed_env(
        {}, fake_env({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "3"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                      {"OMPI_COMM_WORLD_LOCAL_SIZE", "1"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}}));
    CHECK(mpi.launcher == "openmpi");
    CHECK(mpi.rank == 2);
    CHECK(mpi.nnodes == 3);
    DistributedOptions explicit_rank;
    explicit_rank.rank = 0;
    explicit_rank.master_port = 4321;
    const auto overridden = read_distributed_env(
        explicit_rank, fake_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}}));
    CHECK(overridden.rank == 0);
    CHECK(overridden.master_port == 4321);
  }

  TEST_CASE("an sbatch script (SLURM_PROCID without SLURM_NTASKS) is a single process") {
    const auto script = read_distributed_env(
        {}, fake_env({{"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "0"}, {"SLURM_NNODES", "1"}}));
    CHECK(script.launcher == "none");
    CHECK(script.world_size == 1);
    CHECK(script.rank == 0);
    const auto mpi = read_distributed_env(
        {}, fake_env({{"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}, {"OMPI_COMM_WORLD_RANK", "1"},
                      {"OMPI_COMM_WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}}));
    CHECK(mpi.launcher == "openmpi");
    CHECK(mpi.rank == 1);
    CHECK(script.note.empty());
  }

  TEST_CASE("an sbatch --ntasks script or an salloc shell (SLURM_NTASKS without SLURM_STEP_ID) runs alone and says so") {
    const auto script = read_distributed_env(
        {}, fake_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "0"}}));
    CHECK(script.launcher == "none");
    CHECK(script.world_size == 1);
    CHECK(script.note ==
          "SLURM_NTASKS=4 is set, but this process is no srun step (SLURM_STEP_ID is unset: a batch script or an "
          "salloc shell), so it runs as a single process; start it with srun to run 4 processes");
    const auto step = read_distributed_env(
        {}, fake_env({{"SLURM_STEPID", "2"}, {"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"}, {"MASTER_ADDR", "a"},
                      {"MASTER_PORT", "1"}}));
    CHECK(step.launcher == "slurm");
    CHECK(step.rank == 3);
    CHECK(step.note.empty());
    const auto one = read_distributed_env({}, fake_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}));
    CHECK(one.note.empty());
  }

  TEST_CASE("a missing or inconsistent variable is an error naming it") {
    CHECK(env_error({{"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}) ==
          "WORLD_SIZE=2 is set but RANK is not: every process needs its own rank, 0..1");
    CHECK(env_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}) ==
          "WORLD_SIZE=0: it must be at least 1 (the number of processes in the job)");
    CHECK(env_error({{"RANK", "1"}}) ==
          "RANK=1 is set but WORLD_SIZE is not: every process needs the number of processes too");
    CHECK(env_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}}) ==
          "RANK=2 is out of range for WORLD_SIZE=2: valid ranks are 0..1");
    CHECK(env_error({{"RANK", "one"}, {"WORLD_SIZE", "2"}}) == "RANK='one' is not a whole number");
    CHECK(env_error({{"LOCAL_RANK", "0"}}) ==
          "LOCAL_RANK=0 is set, but neither the rank nor the world size is (RANK and WORLD_SIZE are unset); a "
          "launcher sets all of them");
    CHECK(env_error({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}) ==
          "LOCAL_RANK=2 is out of range for 2 processes on this machine: valid local ranks are 0..1");
    CHECK(contains(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}}), "MASTER_ADDR is not set"));
    CHECK(contains(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}), "MASTER_PORT is not set"));
    CHECK(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}) ==
          "MASTER_PORT=70000 is not a TCP port; valid ports are 1..65535");
    CHECK(env_error({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}}) ==
          "SLURM_PROCID=4 is out of range for SLURM_NTASKS=4: valid ranks are 0..3");
  }
}

TEST_SUITE("distributed sampler") {
  TEST_CASE("resuming: save and load keep the epoch and the place in it, set_epoch replays an epoch") {
    multigpu::DistributedSampler sampler(20, 2, 1, true, 3);
    sampler.reset();
    sampler.reset();  // epoch 1
    const std::vector<std::size_t> epoch_one = sampler.indices();
    const auto first = sampler.next(4);
    REQUIRE(first);
    torch::serialize::OutputArchive out;
    sampler.save(out);
    std::stringstream bytes;
    out.save_to(bytes);

    multigpu::DistributedSampler resumed(20, 2, 1, true, 3);
    torch::serialize::InputArchive in;
    in.load_from(bytes);
    resumed.load(in);
    CHECK(resumed.epoch() == 1);
    const auto rest = resumed.next(100);
    REQUIRE(rest);
    CHECK(*rest == std::vector<std::size_t>(epoch_one.begin() + 4, epoch_one.end()));

    multigpu::DistributedSampler replay(20, 2, 1, true, 3);
    replay.set_epoch(1);
    CHECK(replay.indices() == epoch_one);
    replay.set_epoch(0);
    CHECK(replay.indices() != epoch_one);
  }

  TEST_CASE("the parts are disjoint, cover the set, and change every epoch") {
    const std::size_t size = 10;
    std::vector<multigpu::DistributedSampler> samplers;
    for (int rank = 0; rank < 3; ++rank) samplers.emplace_back(size, 3, rank, true, 7);
    std::vector<std::size_t> first_epoch;
    for (int epoch = 0; epoch < 2; ++epoch) {
      std::vector<int> seen(size, 0);
      std::vector<std::size_t> all;
      for (auto& sampler : samplers) {
        sampler.reset();
        CHECK(sampler.epoch() == static_cast<std::size_t>(epoch));
        std::size_t count = 0;
        while (auto batch = sampler.next(2)) {
          for (auto index : *batch) {
            REQUIRE(index < size);
            ++seen[index];
            all.push_back(index);
          }
          count += batch->size();
        }
        CHECK(count == 4);  // ceil(10 / 3): two samples repeat as padding
      }
      int total = 0;
      for (int n : seen) {
        CHECK(n >= 1);
        total += n;
      }
      CHECK(total == 12);
      if (epoch == 0) first_epoch = all;
      if (epoch == 1) CHECK(all != first_epoch);
    }
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::DistributedSampler(10, 0, 0)) ==
          "DistributedSampler: 0 processes; it needs at least 1");
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::DistributedSampler(10, 2, 2)) ==
          "DistributedSampler: rank 2 is out of range for 2 processes: valid ranks are 0..1");
  }
}

#if MULTIGPU_WITH_DISTRIBUTED

namespace {

/// Under ThreadSanitizer, the workers run with its reports off. They drive
/// c10d's Gloo process group, whose threads and reference counts live in an
/// uninstrumented libtorch_cpu while c10::intrusive_ptr and the locks inlined
/// from LibTorch's headers are instrumented in the worker: TSan then sees
/// half of every hand-off and reports races and "unlock of an unlocked
/// mutex" inside LibTorch that it cannot judge. This process (the test,
/// rendezvous errors, the environment) stays fully checked.
std::string worker_tsan_options() {
  const char* options = std::getenv("TSAN_OPTIONS");
  if (options == nullptr) return "";
  return fmt::format("{}:report_bugs=0", options);
}

/// The environment of rank `rank` of `world` (torchrun's variables) meeting
/// at `master_addr`:`port`, with `extra` variables.
std::vector<std::string> rank_environment(int rank, int world, const std::string& master_addr, int port,
                                          std::vector<std::pair<std::string, std::string>> extra = {}) {
  std::vector<std::pair<std::string, std::string>> values{{"RANK", std::to_string(rank)},
                                                          {"WORLD_SIZE", std::to_string(world)},
                                                          {"LOCAL_RANK", std::to_string(rank)},
                                                          {"LOCAL_WORLD_SIZE", std::to_string(world)},
                                                          {"MASTER_ADDR", master_addr},
                                                          {"MASTER_PORT", std::to_string(port)},
                                                          {"OMP_NUM_THREADS", "1"},
                                                          {"TSAN_OPTIONS", worker_tsan_options()}};
  values.insert(values.end(), extra.begin(), extra.end());
  return multigpu::detail::environment_with(values);
}

/// Starts the worker as rank `rank` of `world` (torchrun's variables) with `arguments`.
std::unique_ptr<multigpu::detail::ChildProcess> start_rank(int rank, int world, int port, const std::string& arguments,
                                                           const std::string& log) {
  const auto environment = rank_environment(rank, world, "127.0.0.1", port);
  std::remove(log.c_str());
  return std::make_unique<multigpu::detail::ChildProcess>(
      fmt::format("exec '{}' {}", multigpu_test::distributed_worker(), arguments), environment, log);
}

/// Waits for `child` at most `limit`; kills it after that.
multigpu::detail::ProcessExit finish(multigpu::detail::ChildProcess& child, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!child.poll() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!child.poll()) child.kill_group(SIGKILL);
  return child.wait_blocking();
}

std::string scratch(const std::string& name) {
  return fmt::format("{}/multigpu_distributed_{}_{}", std::filesystem::temp_directory_path().string(), ::getpid(),
                     name);
}

/// What rank 0 of a two-process job with a fault in rank 1 saw.
struct FaultyJob {
  multigpu::detail::ProcessExit survivor;  // rank 0
  multigpu::detail::ProcessExit peer;      // rank 1 (killed after rank 0 ended, if still there)
  std::string report;                      // rank 0's --out: "failed after S s: message"
  std::string log;                         // rank 0's output
};

/// The seconds in a worker's --out after a failure ("failed after S s: message").
double seconds_in(const std::string& report) {
  const std::string prefix = "failed after ";
  if (report.rfind(prefix, 0) != 0) return 1e9;
  return std::stod(report.substr(prefix.size()));
}

/// What from_environment threw in this process, and after how long.
struct RendezvousFailure {
  std::string message;  // "" when it did not throw a DistributedError
  double seconds = 0;
};

RendezvousFailure rendezvous_failure(const DistributedOptions& options,
                                     const multigpu::EnvLookup& lookup = fake_env({})) {
  const auto start = std::chrono::steady_clock::now();
  RendezvousFailure failure;
  failure.message = MULTIGPU_TEST_MESSAGE(multigpu::DistributedError,
                                          multigpu::ProcessGroup::from_environment(options, lookup));
  failure.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return failure;
}

FaultyJob run_faulty_job(const std::string& name, const std::string& arguments, int timeout_ms) {
  const int port = free_port();
  std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> ranks;
  for (int rank = 0; rank < 2; ++rank) {
    ranks.push_back(start_rank(rank, 2, port,
                               fmt::format("{} --out {} --timeout-ms {}", arguments,
                                           scratch(fmt::format("{}{}", name, rank)), timeout_ms),
                               scratch(fmt::format("{}log{}", name, rank))));
  }
  FaultyJob job;
  job.survivor = finish(*ranks[0], std::chrono::seconds(60));
  job.peer = finish(*ranks[1], std::chrono::seconds(5));
  job.report = read_text(scratch(name + "0"));
  job.log = read_text(scratch(name + "log0"));
  for (int rank = 0; rank < 2; ++rank) {
    std::remove(scratch(fmt::format("{}{}", name, rank)).c_str());
    std::remove(scratch(fmt::format("{}log{}", name, rank)).c_str());
  }
  return job;
}

}  // namespace

/// Trains the recipe as one plain model, as 1 process x 4 replicas and as 2
/// processes x `replicas` replicas on `device` (each starting from its own
/// random model), and checks that all end with the same parameters.
/// `summed`: a summed loss.
void check_two_processes_train_like_one_model(bool summed, const std::string& device = "cpu", int replicas = 2,
                                              const std::string& comm_hook = "") {
  // A GPU's float sums differ from the CPU's in the last bits; bf16 buckets keep 8 bits of mantissa.
  const double rtol = !comm_hook.empty() ? 2e-2 : device == "cpu" ? 1e-5 : 1e-4;
  const double atol = comm_hook.empty() ? 1e-6 : 1e-3;
  const int steps = 4;
  auto loss = [summed](multigpu_test::RecipeNetImpl& m, const std::pair<torch::Tensor, torch::Tensor>& s) {
    return multigpu_test::recipe_loss(m, s.first, s.second, summed);
  };
  // One plain model on the whole batch.
  auto plain = multigpu_test::recipe_model(multigpu_test::kRecipeSeed);
  torch::optim::SGD plain_optimizer(plain->parameters(), multigpu_test::recipe_optimizer(summed));
  // One process, four replicas.
  auto single = multigpu_test::recipe_model(multigpu_test::kRecipeSeed);
  multigpu::DataParallelOptions options;
  if (summed) options.loss_reduction = multigpu::LossReduction::kSum;
  multigpu::DataParallel<multigpu_test::RecipeNet> dp(single, std::vector<c10::Device>(4, c10::Device("cpu")), options);
  dp.make_optimizer<torch::optim::SGD>(multigpu_test::recipe_optimizer(summed));
  for (int step = 0; step < steps; ++step) {
    auto [x, y] = multigpu_test::recipe_batch(step);
    plain_optimizer.zero_grad();
    multigpu_test::recipe_loss(*plain, x, y, summed).backward();
    plain_optimizer.step();
    dp.train_step(std::make_pair(x, y), loss);
  }
  // Two processes, two replicas each; each starts from its own random model.
  const int port = free_port();
  std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> ranks;
  for (int rank = 0; rank < 2; ++rank) {
    ranks.push_back(start_rank(rank, 2, port,
                               fmt::format("--replicas {} --device {} --steps {} --summed {} --out {} --timeout-ms 60000{}",
                                           replicas, device, steps, summed ? 1 : 0,
                                           scratch(fmt::format("params{}", rank)),
                                           comm_hook.empty() ? "" : " --comm-hook " + comm_hook),
                               scratch(fmt::format("log{}", rank))));
  }
  for (int rank = 0; rank < 2; ++rank) {
    const auto exit = finish(*ranks[static_cast<std::size_t>(rank)], std::chrono::seconds(120));
    INFO("rank ", rank, ": ", exit.describe(), "\n", read_text(scratch(fmt::format("log{}", rank))));
    REQUIRE(exit.success());
  }
  const auto expected = multigpu_test::flat_parameters(*plain);
  CHECK(torch::allclose(multigpu_test::flat_parameters(*single), expected, 1e-5, 1e-6));
  for (int rank = 0; rank < 2; ++rank) {
    torch::Tensor trained;
    torch::load(trained, scratch(fmt::format("params{}", rank)));
    INFO("rank ", rank, ": largest difference from the plain model ", (trained - expected).abs().max().item<double>());
    CHECK(torch::allclose(trained, expected, rtol, atol));
    std::remove(scratch(fmt::format("params{}", rank)).c_str());
    std::remove(scratch(fmt::format("log{}", rank)).c_str());
  }
}

TEST_SUITE("distributed training") {
  TEST_CASE("2 processes x 2 CPU replicas train like 1 process x 4 replicas and like one plain model") {
    check_two_processes_train_like_one_model(/*summed=*/false);
  }

  TEST_CASE("the same with a summed loss (LossReduction::kSum): gradients are the sum over every process") {
    check_two_processes_train_like_one_model(/*summed=*/true);
  }

  TEST_CASE("SyncBatchNorm: 2 processes x 2 CPU replicas give one plain BatchNorm model's parameters and statistics") {
    // One plain model, with BatchNorm1d, on the whole batch.
    auto plain = multigpu_test::recipe_bn_model(multigpu_test::kRecipeSeed);
    torch::optim::SGD optimizer(plain->parameters(), multigpu_test::recipe_optimizer());
    const int steps = 3;
    for (int step = 0; step < steps; ++step) {
      auto [x, y] = multigpu_test::recipe_batch(step);
      optimizer.zero_grad();
      torch::mse_loss(plain->forward(x.to(torch::kDouble)), y.to(torch::kDouble)).backward();
      optimizer.step();
    }
    const int port = free_port();
    std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> ranks;
    for (int rank = 0; rank < 2; ++rank) {
      ranks.push_back(start_rank(rank, 2, port,
                                 fmt::format("--sync-bn 1 --replicas 2 --steps {} --out {} --timeout-ms 60000", steps,
                                             scratch(fmt::format("syncbn{}", rank))),
                                 scratch(fmt::format("syncbnlog{}", rank))));
    }
    for (int rank = 0; rank < 2; ++rank) {
      const auto exit = finish(*ranks[static_cast<std::size_t>(rank)], std::chrono::seconds(120));
      INFO("rank ", rank, ": ", exit.describe(), "\n", read_text(scratch(fmt::format("syncbnlog{}", rank))));
      REQUIRE(exit.success());
    }
    const auto expected = multigpu_test::flat_state(*plain);
    for (int rank = 0; rank < 2; ++rank) {
      torch::Tensor trained;
      torch::load(trained, scratch(fmt::format("syncbn{}", rank)));
      REQUIRE(trained.sizes() == expected.sizes());
      INFO("rank ", rank, ": largest difference from the plain model ",
           (trained - expected).abs().max().item<double>());
      CHECK(torch::allclose(trained, expected, 0, 1e-10));
      std::remove(scratch(fmt::format("syncbn{}", rank)).c_str());
      std::remove(scratch(fmt::format("syncbnlog{}", rank)).c_str());
    }
  }

  TEST_CASE("bf16 gradient buckets through Gloo: 2 processes x 2 replicas train like one plain model, within bf16") {
    check_two_processes_train_like_one_model(/*summed=*/false, "cpu", 2, "bf16");
  }

  TEST_CASE("GradScaler: an infinity in one process's gradients makes every process skip that step") {
    const int steps = 4;
    const int bad_step = 1;
    auto plain = multigpu_test::recipe_model(multigpu_test::kRecipeSeed);
    torch::optim::SGD plain_optimizer(plain->parameters(), multigpu_test::recipe_optimizer());
    for (int step = 0; step < steps; ++step) {
      if (step == bad_step) continue;  // skipped everywhere
      auto [x, y] = multigpu_test::recipe_batch(step);
      plain_optimizer.zero_grad();
      multigpu_test::recipe_loss(*plain, x, y, false).backward();
      plain_optimizer.step();
    }
    const int port = free_port();
    std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> ranks;
    for (int rank = 0; rank < 2; ++rank) {
      ranks.push_back(start_rank(rank, 2, port,
                                 fmt::format("--replicas 2 --steps {} --scaler 1 --inf-at-step {} --fault-rank 1 "
                                             "--out {} --timeout-ms 60000",
                                             steps, bad_step, scratch(fmt::format("scaled{}", rank))),
                                 scratch(fmt::format("scaledlog{}", rank))));
    }
    for (int rank = 0; rank < 2; ++rank) {
      const auto exit = finish(*ranks[static_cast<std::size_t>(rank)], std::chrono::seconds(120));
      INFO("rank ", rank, ": ", exit.describe(), "\n", read_text(scratch(fmt::format("scaledlog{}", rank))));
      REQUIRE(exit.success());
    }
    const auto expected = multigpu_test::flat_parameters(*plain);
    for (int rank = 0; rank < 2; ++rank) {
      const std::string out = scratch(fmt::format("scaled{}", rank));
      torch::Tensor trained;
      torch::Tensor scale;
      torch::load(trained, out);
      torch::load(scale, out + ".scale");
      INFO("rank ", rank, ": largest difference from the plain model ", (trained - expected).abs().max().item<double>());
      CHECK(torch::allclose(trained, expected, 1e-5, 1e-6));
      CHECK(scale.item<double>() == 32768.0);  // backed off once from 65536
      std::remove(out.c_str());
      std::remove((out + ".scale").c_str());
      std::remove(scratch(fmt::format("scaledlog{}", rank)).c_str());
    }
  }

  TEST_CASE("a peer that exits in the middle of a step: the other gets an error naming it, within the time-out") {
    const auto job = run_faulty_job("dead", "--replicas 2 --steps 5 --die-at-step 2 --fault-rank 1", 3000);
    INFO(job.report, job.log);
    CHECK(job.peer.exit_code == 7);
    CHECK(job.survivor.exit_code == 2);
    CHECK(contains(job.report, "rank 1 ("));
    CHECK(contains(job.report, "stopped responding"));
    CHECK(contains(job.report, "rank 1 did not answer with a trace (gone or stuck)"));  // See Note [The collective trace]
    CHECK(seconds_in(job.report) < 20.0);  // start-up, rendezvous, two steps, the failure and its diagnosis
  }

  TEST_CASE("a peer stuck in the middle of a step: a time-out error, not a hang") {
    const auto job = run_faulty_job("stuck", "--replicas 1 --steps 5 --hang-at-step 1 --fault-rank 1", 2000);
    INFO(job.report, job.log);
    CHECK(job.survivor.exit_code == 2);
    CHECK(contains(job.report, "time-out 2000 ms"));
    CHECK(contains(job.report, "every other rank is still alive"));
    // Stuck outside any collective (in its loss function): it posts no trace.
    CHECK(contains(job.report, "rank 0 waits in all_reduce #"));
    CHECK(contains(job.report, "rank 1 did not answer with a trace (gone or stuck)"));
  }
}

/// Runs the worker as `world` processes (`arguments` for all, `per_rank`
/// added to each) and returns each rank's exit; rank k's output is in
/// scratch(name + "log" + k), its parameters (or error) in scratch(name + k).
/// A rank still running after `limit` is killed.
std::vector<multigpu::detail::ProcessExit> run_job(const std::string& name, int world, const std::string& arguments,
                                                   const std::vector<std::string>& per_rank = {},
                                                   int timeout_ms = 60000,
                                                   std::chrono::seconds limit = std::chrono::seconds(120)) {
  const int port = free_port();
  std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> ranks;
  for (int rank = 0; rank < world; ++rank) {
    const auto k = static_cast<std::size_t>(rank);
    ranks.push_back(start_rank(rank, world, port,
                               fmt::format("{} {} --out {} --timeout-ms {}", arguments,
                                           k < per_rank.size() ? per_rank[k] : "", scratch(fmt::format("{}{}", name, rank)),
                                           timeout_ms),
                               scratch(fmt::format("{}log{}", name, rank))));
  }
  std::vector<multigpu::detail::ProcessExit> exits;
  for (auto& rank : ranks) exits.push_back(finish(*rank, limit));
  return exits;
}

torch::Tensor parameters_of(const std::string& name, int rank) {
  torch::Tensor trained;
  torch::load(trained, scratch(fmt::format("{}{}", name, rank)));
  return trained;
}

/// Removes the files of the 2-process jobs `names`.
void remove_job_files(const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    for (int rank = 0; rank < 2; ++rank) {
      std::remove(scratch(fmt::format("{}{}", name, rank)).c_str());
      std::remove((scratch(fmt::format("{}{}", name, rank)) + ".errors").c_str());
      std::remove(scratch(fmt::format("{}log{}", name, rank)).c_str());
    }
  }
}

/// Two processes x 2 replicas train 4 float64 steps in small buckets (one
/// per parameter), with step `fail_step` failing on rank `fault_rank` only
/// as `kind` says (see worker.cpp): both ranks must get an error for that
/// step (the failing one its own, containing `reason`; the other one naming
/// the failing rank and that reason), nothing may hang, and both must end
/// bit for bit where a run that never saw that batch ends. Step 0 is the
/// one that records the order of the gradient buckets. `phases`: trains
/// with find_unused_parameters, fc2 alone after step 0 (worker.cpp's
/// --phases), so that the step also agrees on which parameters any rank
/// reached (Note [Gradients of parameters no backward reached]).
void check_one_rank_failure(const std::string& kind, int fault_rank, const std::string& reason, int fail_step = 1,
                            bool phases = false) {
  const std::string common =
      fmt::format("--replicas 2 --steps 4 --double 1 --bucket-cap-mib 0.0001{}", phases ? " --phases 1" : "");
  const std::string name = fmt::format("{}at{}{}", kind, fail_step, phases ? "phases" : "");
  const auto skipped = run_job("skip" + name, 2, fmt::format("{} --skip-step {}", common, fail_step));
  for (const auto& exit : skipped) REQUIRE(exit.success());
  const auto start = std::chrono::steady_clock::now();
  const auto failed = run_job(name, 2, fmt::format("{} --fail-at-step {} --fail-kind {} --fault-rank {}", common,
                                                   fail_step, kind, fault_rank),
                              {}, /*timeout_ms=*/10000, std::chrono::seconds(40));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string errors = read_text(scratch(fmt::format("{}{}", name, rank)) + ".errors");
    INFO("rank ", rank, ": ", failed[static_cast<std::size_t>(rank)].describe(), "; the failed step's error: ", errors,
         "\n", read_text(scratch(fmt::format("{}log{}", name, rank))));
    REQUIRE(failed[static_cast<std::size_t>(rank)].success());
    CHECK(contains(errors, fmt::format("step {}: ", fail_step)));
    CHECK(contains(errors, reason));
    if (rank != fault_rank) {
      CHECK(contains(errors, fmt::format("rank {} failed this step", fault_rank)));
      CHECK(contains(errors, "every process discarded this step's gradients"));
    }
    CHECK(torch::equal(parameters_of(name, rank), parameters_of("skip" + name, 0)));
  }
  CHECK(seconds < 30);  // no time-out waited for (10 s each)
  remove_job_files({name, "skip" + name});
}

/// Two processes x 2 replicas train 4 float64 steps, each as `micro_steps`
/// micro-steps inside no_sync() and then step(); the last micro-step of
/// step 1 fails on rank 1 only as `kind` says. Inside no_sync() nothing is
/// agreed: rank 1 alone gets an error (containing `reason`), both go on to
/// step(), nothing may hang, and both must end bit for bit where a run ends
/// whose rank 1 contributed zero gradients to step 1 (see Note [A failed
/// micro-step across processes]).
void check_failed_micro_step(const std::string& kind, int micro_steps, const std::string& reason) {
  const std::string common =
      fmt::format("--replicas 2 --steps 4 --double 1 --bucket-cap-mib 0.0001 --accumulate {} --fail-at-step 1 "
                  "--fault-rank 1",
                  micro_steps);
  const std::string name = fmt::format("{}in{}", kind, micro_steps);
  const auto reference = run_job("zero" + name, 2, common + " --fail-kind zero", {}, 10000, std::chrono::seconds(40));
  for (const auto& exit : reference) REQUIRE(exit.success());
  const auto start = std::chrono::steady_clock::now();
  const auto failed = run_job(name, 2, fmt::format("{} --fail-kind {}", common, kind), {}, /*timeout_ms=*/10000,
                              std::chrono::seconds(40));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string errors = read_text(scratch(fmt::format("{}{}", name, rank)) + ".errors");
    INFO("rank ", rank, ": ", failed[static_cast<std::size_t>(rank)].describe(), "; errors: ", errors, "\n",
         read_text(scratch(fmt::format("{}log{}", name, rank))));
    REQUIRE(failed[static_cast<std::size_t>(rank)].success());
    if (rank == 1) {
      CHECK(contains(errors, "step 1: "));
      CHECK(contains(errors, reason));
    } else {
      CHECK(errors.empty());
    }
    CHECK(torch::equal(parameters_of(name, rank), parameters_of("zero" + name, 0)));
    CHECK(torch::equal(parameters_of(name, rank), parameters_of("zero" + name, 1)));
  }
  CHECK(seconds < 30);  // no time-out waited for (10 s each)
  remove_job_files({name, "zero" + name});
}

// See Note [Gradients of parameters no backward reached].
TEST_SUITE("distributed training") {
  TEST_CASE("a part that no rank reached since zero_grad keeps the one-device gradient: 2 processes x 2 replicas (float64)") {
    const int steps = 4;
    auto plain = multigpu_test::recipe_model(multigpu_test::kRecipeSeed);
    plain->to(torch::kDouble);
    torch::optim::SGD optimizer(plain->parameters(), multigpu_test::recipe_phase_optimizer());
    for (int step = 0; step < steps; ++step) {
      auto [x, y] = multigpu_test::recipe_batch(step);
      optimizer.zero_grad();  // None on LibTorch 2, zeros on 1.13
      multigpu_test::recipe_phase_loss(*plain, x.to(torch::kDouble), y.to(torch::kDouble), step).backward();
      optimizer.step();
    }
    const auto exits = run_job("phases", 2, fmt::format("--replicas 2 --steps {} --double 1 --phases 1", steps));
    for (int rank = 0; rank < 2; ++rank) {
      INFO("rank ", rank, ": ", exits[static_cast<std::size_t>(rank)].describe(), "\n",
           read_text(scratch(fmt::format("phaseslog{}", rank))));
      REQUIRE(exits[static_cast<std::size_t>(rank)].success());
      CHECK((parameters_of("phases", rank) - multigpu_test::flat_parameters(*plain)).abs().max().item<double>() <=
            1e-10);
    }
    remove_job_files({"phases"});
  }

  // See Note [Checking the model across processes].
  TEST_CASE("find_unused_parameters set on one rank only: every rank stops at construction, naming the ranks") {
    const auto exits = run_job("unusedmix", 2, "--replicas 2 --steps 2 --double 1", {"--phases 1", ""},
                               /*timeout_ms=*/10000, std::chrono::seconds(40));
    for (int rank = 0; rank < 2; ++rank) {
      const std::string report = read_text(scratch(fmt::format("unusedmix{}", rank)));
      INFO("rank ", rank, ": ", report, "\n", read_text(scratch(fmt::format("unusedmixlog{}", rank))));
      CHECK(exits[static_cast<std::size_t>(rank)].exit_code == 2);
      CHECK(contains(report, "rank 1's setting DataParallelOptions::find_unused_parameters false, rank 0's setting "
                             "DataParallelOptions::find_unused_parameters true"));
    }
    remove_job_files({"unusedmix"});
  }
}

// See Note [A step that fails on one process].
TEST_SUITE("a step that fails on one process") {
  TEST_CASE("the loss function throws on rank 1 only: both skip the step, the next ones train as without that batch") {
    check_one_rank_failure("throw", 1, "deliberate failure at step 1");
  }

  TEST_CASE("in phases with find_unused_parameters, a step failing on one rank: both skip it, as without that batch") {
    check_one_rank_failure("throw", 1, "deliberate failure at step 2", 2, /*phases=*/true);
    check_one_rank_failure("empty", 1, "forward_backward: the batch has no samples", 2, /*phases=*/true);
    // On LibTorch 1.13 (whose zero_grad zeroes in place) this needs the
    // discarded step's reached flags put back: its backward on rank 1 marked
    // what it reached, which would then hold zeros rather than None, and
    // weight decay would move them where the program without that batch
    // skips them.
    check_one_rank_failure("nan", 0, "the loss is nan (DataParallelOptions::check_finite_loss)", 0, /*phases=*/true);
  }

  TEST_CASE("check_finite_loss sees a NaN on rank 0 only: both skip the step, the next ones train as without it") {
    check_one_rank_failure("nan", 0, "the loss is nan (DataParallelOptions::check_finite_loss)");
  }

  TEST_CASE("an empty batch on rank 1 only: both skip the step, the next ones train as without it") {
    check_one_rank_failure("empty", 1, "forward_backward: the batch has no samples");
  }

  TEST_CASE("a parameter without a gradient on rank 1 only: both skip the step, the next ones train as without it") {
    check_one_rank_failure("unused", 1, "parameter(s) received no gradient in this step: fc1.weight (replica 0)");
  }

  TEST_CASE("a batch that fails in splitting on rank 1 only: both skip the step, the next ones train as without it") {
    check_one_rank_failure("split", 1, "the fields of a std::pair batch disagree on the number of samples");
  }

  TEST_CASE("each kind of failure on one rank at the step that records the bucket order: both rebuild alike") {
    check_one_rank_failure("throw", 1, "deliberate failure at step 0", 0);
    check_one_rank_failure("nan", 0, "the loss is nan (DataParallelOptions::check_finite_loss)", 0);
    check_one_rank_failure("empty", 1, "forward_backward: the batch has no samples", 0);
    check_one_rank_failure("unused", 1, "parameter(s) received no gradient in this step: fc1.weight (replica 0)", 0);
  }
}

// See Note [A failed micro-step across processes].
TEST_SUITE("a micro-step inside no_sync() that fails on one process") {
  TEST_CASE("the loss function throws in rank 1's second micro-step: step() reduces on both, rank 1 adds zeros") {
    check_failed_micro_step("throw", 2, "deliberate failure at step 1");
  }

  TEST_CASE("a NaN loss in rank 1's second micro-step: step() reduces on both, rank 1 adds zeros") {
    check_failed_micro_step("nan", 2, "the loss is nan (DataParallelOptions::check_finite_loss)");
  }

  TEST_CASE("rank 1's only micro-step has an empty batch: step() reduces on both, rank 1 adds zeros") {
    check_failed_micro_step("empty", 1, "forward_backward: the batch has no samples");
  }
}

TEST_SUITE("distributed checkpoints") {
  TEST_CASE("2 processes killed after a checkpoint resume bit for bit, 1 process x 3 replicas resumes it too") {
    const std::string checkpoint = scratch("state.pt");
    const auto straight = run_job("straight", 2, "--replicas 2 --steps 6");
    for (const auto& exit : straight) REQUIRE(exit.success());
    const auto killed = run_job("killed", 2, fmt::format("--replicas 2 --steps 6 --save-at-step 3 --checkpoint {} "
                                                         "--kill-at-step 4", checkpoint));
    for (const auto& exit : killed) CHECK(exit.signal == SIGKILL);
    REQUIRE(std::filesystem::exists(checkpoint));
    const auto resumed = run_job("resumed", 2, fmt::format("--replicas 2 --steps 6 --resume {}", checkpoint));
    for (int rank = 0; rank < 2; ++rank) {
      INFO("rank ", rank, ": ", read_text(scratch(fmt::format("resumedlog{}", rank))));
      REQUIRE(resumed[static_cast<std::size_t>(rank)].success());
      CHECK(contains(read_text(scratch(fmt::format("resumedlog{}", rank))), "at step 3"));
      CHECK(torch::equal(parameters_of("resumed", rank), parameters_of("straight", 0)));
    }
    const auto alone = run_job("alone", 1, fmt::format("--replicas 3 --steps 6 --resume {}", checkpoint));
    const std::string log = read_text(scratch("alonelog0"));
    INFO(log);
    REQUIRE(alone[0].success());
    CHECK(contains(log, "saved on 2 replicas x 2 processes, resuming on 3 x 1; 6 -> 8 samples per replica"));
    CHECK(torch::allclose(parameters_of("alone", 0), parameters_of("straight", 0), 1e-5, 1e-6));
    for (const std::string name : {"straight", "killed", "resumed", "alone"}) {
      for (int rank = 0; rank < 2; ++rank) {
        std::remove(scratch(fmt::format("{}{}", name, rank)).c_str());
        std::remove(scratch(fmt::format("{}log{}", name, rank)).c_str());
      }
    }
    std::remove(checkpoint.c_str());
  }

  TEST_CASE("ranks given different checkpoints all stop before changing anything, naming the rank") {
    const std::string early = scratch("early.pt");
    const std::string late = scratch("late.pt");
    REQUIRE(run_job("early", 1, fmt::format("--replicas 1 --steps 2 --save-at-step 1 --checkpoint {}", early))[0].success());
    REQUIRE(run_job("late", 1, fmt::format("--replicas 1 --steps 2 --save-at-step 2 --checkpoint {}", late))[0].success());
    const auto exits = run_job("mixed", 2, "--replicas 1 --steps 4",
                               {fmt::format("--resume {}", early), fmt::format("--resume {}", late)});
    for (int rank = 0; rank < 2; ++rank) {
      const std::string report = read_text(scratch(fmt::format("mixed{}", rank)));
      INFO("rank ", rank, ": ", report);
      CHECK(exits[static_cast<std::size_t>(rank)].exit_code == 2);
      CHECK(contains(report, "rank(s) 1 read another file there than rank 0 (another checksum); every rank stopped "
                             "before changing anything"));
    }
    for (const std::string name : {"early", "late", "mixed"}) {
      for (int rank = 0; rank < 2; ++rank) {
        std::remove(scratch(fmt::format("{}{}", name, rank)).c_str());
        std::remove(scratch(fmt::format("{}log{}", name, rank)).c_str());
      }
    }
    std::remove(early.c_str());
    std::remove(late.c_str());
  }

  TEST_CASE("a full disk under rank 0's save_state: every rank gets a CheckpointError from that call, at once") {
    multigpu_test::TinyFileSystem disk(scratch("full"), "256k");
    if (!disk.mounted()) {
      MESSAGE("skipped: mounting a tmpfs on " << disk.path.string() << " is not permitted here (" << disk.why << ")");
      return;
    }
    disk.fill();
    const auto start = std::chrono::steady_clock::now();
    const auto exits = run_job("full", 2, fmt::format("--replicas 1 --steps 3 --save-at-step 1 --checkpoint {}",
                                                      disk.file("state.pt")),
                               {}, /*timeout_ms=*/30000);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK(seconds < 20);  // agreed in the save, not found out at the next collective's time-out
    const std::string rank0 = read_text(scratch("full0"));
    const std::string rank1 = read_text(scratch("full1"));
    INFO("rank 0: ", rank0, "\nrank 1: ", rank1);
    CHECK(exits[0].exit_code == 2);
    CHECK(exits[1].exit_code == 2);
    CHECK(contains(rank0, "save_state: cannot write " + disk.file("state.pt") + ": writing "));
    CHECK(contains(rank0, std::strerror(ENOSPC)));
    CHECK(contains(rank1, "save_state: rank 0 could not write the checkpoint " + disk.file("state.pt")));
    CHECK(std::filesystem::exists(disk.file("filler")));
    CHECK_FALSE(std::filesystem::exists(disk.file("state.pt")));
    for (int rank = 0; rank < 2; ++rank) {
      std::remove(scratch(fmt::format("full{}", rank)).c_str());
      std::remove(scratch(fmt::format("fulllog{}", rank)).c_str());
    }
  }
}

TEST_SUITE("distributed rendezvous") {
  TEST_CASE("the rendezvous port in use: rank 0 says so") {
    Listener taken;
    const DistributedOptions options = loopback(0, 2, taken.port(), std::chrono::seconds(2));
    const std::string message = MULTIGPU_TEST_MESSAGE(
        multigpu::DistributedError, multigpu::ProcessGroup::from_environment(options, fake_env({})));
    CHECK(contains(message, fmt::format("rank 0 could not serve the rendezvous store on port {} (MASTER_PORT)",
                                        taken.port())));
    CHECK(contains(message, "Choose a free MASTER_PORT"));
  }

  TEST_CASE("a peer that never comes: the rendezvous names it after the time-out") {
    const auto failure = rendezvous_failure(loopback(0, 3, free_port(), std::chrono::milliseconds(1500)));
    CHECK(contains(failure.message, "2 of 3 processes did not join the rendezvous"));
    CHECK(contains(failure.message, "(missing ranks 1, 2)"));
    CHECK(failure.seconds < 10);
  }

  TEST_CASE("rank 0 that never comes: the others say whom they waited for") {
    const DistributedOptions options = loopback(1, 2, free_port(), std::chrono::milliseconds(1500));
    const auto failure = rendezvous_failure(options);
    CHECK(contains(failure.message, fmt::format("rank 1 could not reach the rendezvous store of rank 0 at 127.0.0.1:{}",
                                                *options.master_port)));
    CHECK(failure.seconds < 10);
  }

  TEST_CASE("another program on MASTER_PORT that accepts and closes: a DistributedError at once, not an abort") {
    Listener other(Listener::Answer::kClose);
    const auto failure = rendezvous_failure(loopback(1, 2, other.port(), std::chrono::seconds(30)));
    CHECK(failure.message ==
          fmt::format("rank 1: what listens at 127.0.0.1:{0} (MASTER_ADDR:MASTER_PORT) is not rank 0's rendezvous "
                      "store: it accepted the connection and closed it at once. Another program uses port {0} on "
                      "127.0.0.1: start every process with the same free MASTER_PORT",
                      other.port()));
    CHECK(failure.seconds < 10);
  }

  TEST_CASE("another program on MASTER_PORT that accepts and never answers: an error after the time-out, not a hang") {
    Listener other(Listener::Answer::kSilence);
    const auto failure = rendezvous_failure(loopback(1, 2, other.port(), std::chrono::milliseconds(1000)));
    CHECK(contains(failure.message,
                   fmt::format("rank 1: what listens at 127.0.0.1:{} (MASTER_ADDR:MASTER_PORT) accepted the "
                               "connection but did not answer as rank 0's rendezvous store within 2000 ms",
                               other.port())));
    CHECK(failure.seconds < 10);
  }

  TEST_CASE("an unresolvable MASTER_ADDR: said at once on every rank, naming the variable and its value") {
    for (int rank = 0; rank < 2; ++rank) {
      CAPTURE(rank);
      DistributedOptions options;
      options.timeout = std::chrono::seconds(30);
      const auto failure = rendezvous_failure(
          options, fake_env({{"RANK", std::to_string(rank)}, {"WORLD_SIZE", "2"},
                             {"MASTER_ADDR", "no-such-host.invalid"}, {"MASTER_PORT", std::to_string(free_port())}}));
      CHECK(contains(failure.message, fmt::format("rank {}: MASTER_ADDR='no-such-host.invalid' is not a host name this "
                                                  "machine can resolve (",
                                                  rank)));
      CHECK(contains(failure.message, "set it to the host name or IP address of rank 0's machine"));
      CHECK(failure.seconds < 10);
    }
    DistributedOptions in_code = loopback(1, 2, free_port(), std::chrono::seconds(30));
    in_code.master_addr = "no-such-host.invalid";
    CHECK(contains(rendezvous_failure(in_code).message,
                   "rank 1: DistributedOptions::master_addr='no-such-host.invalid' is not a host name"));
  }

  TEST_CASE("ranks started with different WORLD_SIZE: both are told at once what each said") {
    for (const auto& [world0, world1] : {std::pair<int, int>{2, 3}, std::pair<int, int>{3, 2}}) {
      CAPTURE(world0);
      CAPTURE(world1);
      const int port = free_port();
      auto rank1 = start_rank(1, world1, port, fmt::format("--out {} --timeout-ms 30000", scratch("world1")),
                              scratch("worldlog1"));
      DistributedOptions options;
      options.timeout = std::chrono::seconds(30);
      const auto rank0 = rendezvous_failure(
          options, fake_env({{"RANK", "0"}, {"WORLD_SIZE", std::to_string(world0)}, {"MASTER_ADDR", "127.0.0.1"},
                             {"MASTER_PORT", std::to_string(port)}}));
      const auto exit = finish(*rank1, std::chrono::seconds(20));
      const std::string report = read_text(scratch("world1"));
      INFO("rank 0: ", rank0.message, "\nrank 1 (", exit.describe(), "): ", report, read_text(scratch("worldlog1")));
      // Who came first is stated first; each rank is named with what it said.
      const std::string said0 =
          fmt::format("rank 0 ({} (pid {})) with WORLD_SIZE={}", multigpu::detail::this_host(), ::getpid(), world0);
      const std::string said1 = fmt::format("rank 1 ({} (pid {})) with WORLD_SIZE={}", multigpu::detail::this_host(),
                                            rank1->command_pid(), world1);
      for (const std::string& message : {rank0.message, report}) {
        CHECK(contains(message, "the processes were started with different numbers of processes: "));
        CHECK(contains(message, said0));
        CHECK(contains(message, said1));
        CHECK(contains(message, "start every process with the same WORLD_SIZE"));
      }
      CHECK(contains(rank0.message, "rank 0: "));
      CHECK(rank0.seconds < 10);
      CHECK(exit.exit_code == 2);
      CHECK(seconds_in(report) < 10);
      std::remove(scratch("world1").c_str());
      std::remove(scratch("worldlog1").c_str());
    }
  }
}

TEST_SUITE("distributed network interface") {
  TEST_CASE("without GLOO_SOCKET_IFNAME Gloo listens on the address that reaches MASTER_ADDR, and says so") {
    const auto env = read_distributed_env({}, fake_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"},
                                                        {"MASTER_PORT", "29500"}}));
    const auto master = multigpu::detail::resolve_master(env);
    const auto choice = multigpu::detail::choose_network(env, master.get(), nullptr, nullptr);
    CHECK(choice.address == "127.0.0.1");
    CHECK(choice.interfaces.empty());
    CHECK(choice.description == "rank 1: Gloo uses 127.0.0.1 on lo (the address this host reaches MASTER_ADDR=127.0.0.1 "
                                "from; GLOO_SOCKET_IFNAME chooses another)");
    // An empty GLOO_SOCKET_IFNAME is no choice; NCCL_SOCKET_IFNAME is passed through, and said.
    CHECK(multigpu::detail::choose_network(env, master.get(), "", "ib0").description ==
          "rank 1: Gloo uses 127.0.0.1 on lo (the address this host reaches MASTER_ADDR=127.0.0.1 from; "
          "GLOO_SOCKET_IFNAME chooses another); NCCL_SOCKET_IFNAME=ib0 for NCCL");
  }

  TEST_CASE("GLOO_SOCKET_IFNAME: its interfaces and nothing else, and one that does not exist is named") {
    const auto env = read_distributed_env({}, fake_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"},
                                                        {"MASTER_PORT", "29500"}}));
    const auto master = multigpu::detail::resolve_master(env);
    const auto choice = multigpu::detail::choose_network(env, master.get(), "lo,lo", nullptr);
    CHECK(choice.interfaces == std::vector<std::string>{"lo", "lo"});
    CHECK(choice.description == "rank 0: Gloo uses interface lo, lo (GLOO_SOCKET_IFNAME)");
    const std::string message = MULTIGPU_TEST_MESSAGE(
        multigpu::DistributedError, multigpu::detail::choose_network(env, master.get(), "lo,nosuch0", nullptr));
    CHECK(contains(message, "rank 0: GLOO_SOCKET_IFNAME='lo,nosuch0' names an interface this host does not have "
                            "('nosuch0'); its interfaces are lo (127.0.0.1)"));
    CHECK(contains(message, "or unset it to use the one that reaches MASTER_ADDR=127.0.0.1"));
  }
}

/// The port every namespaced job meets on: each host is a namespace of its own, where nothing else listens.
constexpr int kNamespacedPort = 29500;

/// Runs the worker as `world` processes, rank k on host k of `net` (rank 0,
/// the master, on host 0: MASTER_ADDR is another host's address for every
/// other rank), with `extra` variables; like run_job otherwise.
std::vector<multigpu::detail::ProcessExit> run_job_on_hosts(
    multigpu_test::NetNamespaces& net, const std::string& name, int world, const std::string& arguments,
    const std::vector<std::pair<std::string, std::string>>& extra = {}, int timeout_ms = 60000,
    std::chrono::seconds limit = std::chrono::seconds(120)) {
  std::vector<multigpu::detail::ChildProcess*> ranks;
  for (int rank = 0; rank < world; ++rank) {
    const std::string log = scratch(fmt::format("{}log{}", name, rank));
    std::remove(log.c_str());
    ranks.push_back(&net.start(rank,
                               fmt::format("'{}' {} --out {} --timeout-ms {}", multigpu_test::distributed_worker(),
                                           arguments, scratch(fmt::format("{}{}", name, rank)), timeout_ms),
                               rank_environment(rank, world, multigpu_test::NetNamespaces::address(0),
                                                kNamespacedPort, extra),
                               log));
  }
  std::vector<multigpu::detail::ProcessExit> exits;
  for (auto* rank : ranks) exits.push_back(finish(*rank, limit));
  return exits;
}

/// Removes the files of the `world`-process job `name`.
void remove_files_of(const std::string& name, int world) {
  for (int rank = 0; rank < world; ++rank) {
    std::remove(scratch(fmt::format("{}{}", name, rank)).c_str());
    std::remove(scratch(fmt::format("{}log{}", name, rank)).c_str());
  }
}

/// Trains the recipe as `world` processes x `replicas` replicas over
/// loopback, then on `world` namespaced hosts with `extra` variables, and
/// checks that every rank ends bit for bit alike, and that each rank said
/// which interface Gloo uses (`said(rank)`, in its output).
void check_hosts_train_like_loopback(int world, int replicas,
                                     const std::vector<std::pair<std::string, std::string>>& extra,
                                     const std::function<std::string(int)>& said) {
  multigpu_test::NetNamespaces net(world);
  const std::string arguments = fmt::format("--replicas {} --steps 3", replicas);
  const std::string loop = fmt::format("loop{}", world);
  const std::string hosts = fmt::format("hosts{}", world);
  const auto looped = run_job(loop, world, arguments);
  const auto start = std::chrono::steady_clock::now();
  const auto networked = run_job_on_hosts(net, hosts, world, arguments, extra);
  MESSAGE(world, " namespaced hosts trained 3 steps in ",
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s");
  for (int rank = 0; rank < world; ++rank) {
    const auto k = static_cast<std::size_t>(rank);
    const std::string log = read_text(scratch(fmt::format("{}log{}", hosts, rank)));
    INFO("rank ", rank, " over loopback: ", looped[k].describe(), "\n",
         read_text(scratch(fmt::format("{}log{}", loop, rank))), "\non host ", net.host(rank), ": ",
         networked[k].describe(), "\n", log);
    REQUIRE(looped[k].success());
    REQUIRE(networked[k].success());
    CHECK(contains(log, said(rank)));
    CHECK(torch::equal(parameters_of(hosts, rank), parameters_of(loop, rank)));
  }
  remove_files_of(loop, world);
  remove_files_of(hosts, world);
}

TEST_SUITE("distributed over a network of namespaces") {
  TEST_CASE("2 hosts train bit for bit as 2 processes over loopback, each choosing the interface that reaches the master") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    check_hosts_train_like_loopback(2, 2, {{"GLOO_SOCKET_IFNAME", ""}}, [](int rank) {
      return fmt::format("multigpu: rank {0}: Gloo uses 198.51.100.{1} on wire (the address this host reaches "
                         "MASTER_ADDR=198.51.100.1 from; GLOO_SOCKET_IFNAME chooses another)",
                         rank, rank + 1);
    });
  }

  TEST_CASE("3 hosts train bit for bit as 3 processes over loopback") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    check_hosts_train_like_loopback(3, 1, {{"GLOO_SOCKET_IFNAME", ""}}, [](int rank) {
      return fmt::format("multigpu: rank {}: Gloo uses 198.51.100.{} on wire", rank, rank + 1);
    });
  }

  TEST_CASE("GLOO_SOCKET_IFNAME is honoured and NCCL_SOCKET_IFNAME passed through: 2 hosts train as over loopback") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    check_hosts_train_like_loopback(2, 1, {{"GLOO_SOCKET_IFNAME", "wire"}, {"NCCL_SOCKET_IFNAME", "wire"}},
                                    [](int rank) {
                                      return fmt::format("multigpu: rank {}: Gloo uses interface wire "
                                                         "(GLOO_SOCKET_IFNAME); NCCL_SOCKET_IFNAME=wire for NCCL",
                                                         rank);
                                    });
  }

  TEST_CASE("the namespaces, their links and their processes are gone when the helper is, also after a throw") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    std::string bridge;
    pid_t sleeper = 0;
    CHECK_THROWS_AS(([&] {
                      multigpu_test::NetNamespaces net(2);
                      bridge = net.bridge();
                      sleeper = net.start(1, "sleep 600", multigpu::detail::environment_with({}), "/dev/null").pid();
                      CHECK(multigpu_test::run_command("ip netns list").output.find(net.host(1)) != std::string::npos);
                      throw std::runtime_error("a failing test");
                    }()),
                    std::runtime_error);
    const std::string left = multigpu_test::run_command("ip netns list").output;
    CHECK(left.find(bridge.substr(0, bridge.size() - 2)) == std::string::npos);
    CHECK(::kill(sleeper, 0) != 0);  // killed and reaped
  }

  TEST_CASE("the namespaces left by a test process that was killed are removed by the next helper made") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    // A pid that no longer runs: a child that ended and was reaped.
    const pid_t dead = ::fork();
    if (dead == 0) ::_exit(0);
    REQUIRE(dead > 0);
    ::waitpid(dead, nullptr, 0);
    const std::string left = fmt::format("multigpu-test-{}-h0", dead);
    multigpu_test::NetNamespaces::must("ip netns add " + left);
    multigpu::detail::ChildProcess sleeper(fmt::format("exec ip netns exec {} sleep 600", left),
                                           multigpu::detail::environment_with({}), "/dev/null");
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (multigpu_test::run_command("ip netns pids " + left).output.empty() &&
           std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    {
      multigpu_test::NetNamespaces net(2);
      CHECK(multigpu_test::run_command("ip netns list").output.find(left) == std::string::npos);
    }
    // What ran inside it was killed.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!sleeper.poll().has_value() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const bool ended = sleeper.poll().has_value();
    if (!ended) {
      sleeper.kill_group(SIGKILL);
      multigpu_test::run_command("ip netns del " + left);
    }
    REQUIRE(ended);
    CHECK(sleeper.wait_blocking().signal == SIGKILL);
  }
}

/// A fault on 2 namespaced hosts: when each rank ended, after the fault, and what it said.
struct NetworkFault {
  std::vector<multigpu::detail::ProcessExit> exits;
  std::vector<std::string> reports;  // each rank's --out ("failed after S s: message")
  std::vector<std::string> logs;
  std::vector<double> seconds;       // from the fault to the rank's end
};

/// Starts rank k of 2 on host k of `net` with `arguments` (rank 1 with
/// `--mark`: it marks the step the fault lands in) and a time-out of
/// `timeout_ms`, applies `fault` once rank 1 marked it (at once when
/// `arguments` has no --mark-at-step), and waits for each rank to end
/// (`continue_after` is called once rank 0 has, with the ranks, to let a
/// stopped peer go on). `first`: the first rank started (1: rank 0, the
/// master, never comes up).
NetworkFault run_fault_on_hosts(
    multigpu_test::NetNamespaces& net, const std::string& name, const std::string& arguments, int timeout_ms,
    const std::function<void(std::vector<multigpu::detail::ChildProcess*>&)>& fault,
    const std::function<void(std::vector<multigpu::detail::ChildProcess*>&)>& continue_after = {}, int first = 0) {
  const std::string mark = scratch(name + "mark");
  std::remove(mark.c_str());
  std::vector<multigpu::detail::ChildProcess*> ranks(2, nullptr);
  for (int rank = first; rank < 2; ++rank) {
    const std::string log = scratch(fmt::format("{}log{}", name, rank));
    std::remove(log.c_str());
    ranks[static_cast<std::size_t>(rank)] = &net.start(
        rank,
        fmt::format("'{}' {} --mark {} --out {} --timeout-ms {}", multigpu_test::distributed_worker(), arguments, mark,
                    scratch(fmt::format("{}{}", name, rank)), timeout_ms),
        rank_environment(rank, 2, multigpu_test::NetNamespaces::address(0), kNamespacedPort), log);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  if (contains(arguments, "--mark-at-step")) {
    while (!std::filesystem::exists(mark) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  const auto fault_time = std::chrono::steady_clock::now();
  fault(ranks);
  NetworkFault result;
  result.exits.resize(2);
  result.seconds.assign(2, -1);
  bool continued = !continue_after;
  for (bool running = true; running && std::chrono::steady_clock::now() < deadline;) {
    running = false;
    for (std::size_t k = 0; k < 2; ++k) {
      if (ranks[k] == nullptr || result.seconds[k] >= 0) continue;
      if (ranks[k]->poll()) {
        result.seconds[k] = std::chrono::duration<double>(std::chrono::steady_clock::now() - fault_time).count();
      } else {
        running = true;
      }
    }
    if (!continued && (ranks[0] == nullptr || result.seconds[0] >= 0)) {
      continue_after(ranks);
      continued = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (int rank = 0; rank < 2; ++rank) {
    const auto k = static_cast<std::size_t>(rank);
    if (ranks[k] != nullptr) {
      if (!ranks[k]->poll()) ranks[k]->kill_group(SIGKILL);
      result.exits[k] = ranks[k]->wait_blocking();
    }
    result.reports.push_back(read_text(scratch(fmt::format("{}{}", name, rank))));
    result.logs.push_back(read_text(scratch(fmt::format("{}log{}", name, rank))));
    if (ranks[k] != nullptr) {
      MESSAGE(name, ": rank ", rank, " ended ", result.seconds[k], " s after the fault (time-out ", timeout_ms / 1000.0,
              " s): ", result.reports[k]);
    }
  }
  remove_files_of(name, 2);
  std::remove(mark.c_str());
  return result;
}

/// Checks that rank `rank` of `fault` failed with a DistributedError
/// (exit 2) containing each of `said`, within `limit` seconds of the fault.
void check_named(const NetworkFault& fault, int rank, const std::vector<std::string>& said, double limit) {
  const auto k = static_cast<std::size_t>(rank);
  INFO("rank ", rank, ": ", fault.exits[k].describe(), "\n", fault.reports[k], "\n", fault.logs[k]);
  CHECK(fault.exits[k].exit_code == 2);
  for (const auto& text : said) CHECK(contains(fault.reports[k], text));
  CHECK(fault.seconds[k] >= 0);
  CHECK(fault.seconds[k] < limit);
}

constexpr int kFaultTimeoutMs = 3000;
const std::string kMidStep = "--replicas 1 --steps 8 --mark-at-step 2 --fault-rank 1";

TEST_SUITE("faults on a network of namespaces") {
  TEST_CASE("a link cut mid-step: both ranks name the other, host and rank, and the collective, within seconds") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    const auto fault = run_fault_on_hosts(net, "cut", kMidStep, kFaultTimeoutMs,
                                          [&](auto&) { net.set_link(1, false); });
    // Rank 1 waits out the time-out, then for the store it cannot reach (Note [Rendezvous failures]).
    check_named(fault, 0, {"all_reduce #", "(gradient bucket 0, 712 B Float)", "rank 1 (198.51.100.2 on ", "stopped responding"}, 12);
    // c10d's store client of LibTorch 2 waits for its answer without a time-out, 1.13's gives up after it.
    check_named(fault, 1, {"all_reduce #", "(gradient bucket 0, 712 B Float)", "rank 0 (198.51.100.1 on ",
                           "which serves the rendezvous store, did not answer"}, 15);
  }

  TEST_CASE("a peer SIGKILLed mid-step: the other names it, host and rank, and the collective") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    const auto fault = run_fault_on_hosts(net, "killed", kMidStep, kFaultTimeoutMs,
                                          [](auto& ranks) { ::kill(ranks[1]->command_pid(), SIGKILL); });
    check_named(fault, 0, {"all_reduce #", "(gradient bucket 0, 712 B Float)", "rank 1 (198.51.100.2 on ", "stopped responding"}, 10);
  }

  TEST_CASE("a peer SIGSTOPped mid-step: the other names it after the time-out, and it names the other once it goes on") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    const auto fault = run_fault_on_hosts(
        net, "stopped", kMidStep, kFaultTimeoutMs, [](auto& ranks) { ::kill(ranks[1]->command_pid(), SIGSTOP); },
        [](auto& ranks) { ::kill(ranks[1]->command_pid(), SIGCONT); });
    check_named(fault, 0, {"all_reduce #", "(gradient bucket 0, 712 B Float)", "rank 1 (198.51.100.2 on ", "stopped responding"}, 12);
    check_named(fault, 1, {"all_reduce #", "(gradient bucket 0, 712 B Float)", "rank 0 (198.51.100.1 on ", "did not answer"}, 20);
  }

  TEST_CASE("a partition during the rendezvous: each rank names whom it could not reach, within seconds") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    net.set_link(1, false);
    const auto fault = run_fault_on_hosts(net, "partition", "--replicas 1 --steps 2", kFaultTimeoutMs, [](auto&) {});
    check_named(fault, 0, {"missing rank 1"}, 12);
    check_named(fault, 1, {"rank 0 at 198.51.100.1:29500"}, 12);
  }

  TEST_CASE("a master that never comes up: the rank names rank 0 and its address, within seconds") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    const auto fault = run_fault_on_hosts(net, "nomaster", "--replicas 1 --steps 2", kFaultTimeoutMs, [](auto&) {},
                                          {}, /*first=*/1);
    check_named(fault, 1, {"rank 0 at 198.51.100.1:29500"}, 12);
  }

  TEST_CASE("a slow link (netem: 200 ms delay, 5 percent loss) still trains, bit for bit") {
    MULTIGPU_TEST_NEEDS_NET_NAMESPACES();
    multigpu_test::NetNamespaces net(2);
    const auto netem = multigpu_test::run_command(
        fmt::format("tc -n {} qdisc add dev {} root netem delay 200ms loss 5%", net.bridge(),
                    multigpu_test::NetNamespaces::port(1)));
    if (netem.status != 0) {
      MESSAGE("skipped: tc netem is not available here: " << netem.output);
      std::cout << "multigpu test skipped: tc netem is not available here: " << netem.output << std::endl;
      return;
    }
    const auto looped = run_job("slowloop", 2, "--replicas 1 --steps 3");
    const auto start = std::chrono::steady_clock::now();
    const auto slow = run_job_on_hosts(net, "slow", 2, "--replicas 1 --steps 3", {}, 5000);
    MESSAGE("2 hosts on a slow link trained 3 steps in ",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s");
    for (int rank = 0; rank < 2; ++rank) {
      const auto k = static_cast<std::size_t>(rank);
      INFO("rank ", rank, ": ", slow[k].describe(), "\n", read_text(scratch(fmt::format("slowlog{}", rank))));
      REQUIRE(looped[k].success());
      REQUIRE(slow[k].success());
      CHECK(torch::equal(parameters_of("slow", rank), parameters_of("slowloop", rank)));
    }
    remove_files_of("slowloop", 2);
    remove_files_of("slow", 2);
  }
}

/// Runs the worker as 2 processes with `per_rank` arguments and a short
/// time-out, both of which must fail within seconds; returns each rank's
/// report ("failed after S s: message") and checks that both contain
/// every one of `expected`.
std::vector<std::string> check_desync_named(const std::string& name, const std::string& arguments,
                                            const std::vector<std::string>& per_rank,
                                            const std::vector<std::string>& expected) {
  const auto exits = run_job(name, 2, arguments + " --dump-trace 1", per_rank, /*timeout_ms=*/2000, std::chrono::seconds(40));
  std::vector<std::string> reports;
  for (int rank = 0; rank < 2; ++rank) {
    const auto k = static_cast<std::size_t>(rank);
    reports.push_back(read_text(scratch(fmt::format("{}{}", name, rank))));
    INFO("rank ", rank, ": ", exits[k].describe(), "\n", reports[k], "\n",
         read_text(scratch(fmt::format("{}log{}", name, rank))));
    CHECK(exits[k].exit_code == 2);
    for (const auto& text : expected) CHECK(contains(reports[k], text));
    CHECK(seconds_in(reports[k]) < 15.0);  // start-up, rendezvous, a few steps, the 2 s time-out and the diagnosis
  }
  remove_job_files({name});
  return reports;
}

/// Runs the worker as 2 processes, rank 1 with `rank1` arguments; both must
/// fail at once, at construction, with the error naming `difference`.
void check_differs_at_construction(const std::string& name, const std::string& rank1, const std::string& difference) {
  const auto exits = run_job(name, 2, "--replicas 1 --steps 3", {"", rank1}, 2000, std::chrono::seconds(40));
  for (int rank = 0; rank < 2; ++rank) {
    const auto k = static_cast<std::size_t>(rank);
    const std::string report = read_text(scratch(fmt::format("{}{}", name, rank)));
    INFO("rank ", rank, ": ", exits[k].describe(), "\n", report);
    CHECK(exits[k].exit_code == 2);
    CHECK(contains(report, "DataParallel: the processes built different models or options (found at construction, "
                           "before any step): " + difference + "; every process must"));
    CHECK(seconds_in(report) < 5.0);
  }
  remove_job_files({name});
}

// See Note [The collective trace] and Note [Checking the model across processes].
TEST_SUITE("collective trace across processes") {
  TEST_CASE("a process that skips a step: the error names where the processes' collectives first differ") {
    // Rank 1 leaves batch 1 out: it runs out of steps first and waits in the
    // final barrier while rank 0 all-reduces its last step's first bucket.
    check_desync_named("skipper", "--replicas 1 --steps 3", {"", "--skip-step 1"},
                       {"the processes' collectives first differ at #", "rank 0 waits in all_reduce #",
                        "(gradient bucket 0, ", "rank 1 waits in barrier #"});
  }

  TEST_CASE("a process whose model has another parameter shape: named at construction, before any step") {
    check_differs_at_construction("shape", "--other-shape 1",
                                  "rank 1's parameter fc2.weight Float[3, 16], rank 0's parameter fc2.weight "
                                  "Float[2, 16]");
  }

  TEST_CASE("a process whose gradient buckets differ: named at construction, before any step") {
    // Rank 1 buckets each parameter alone, rank 0 all in one bucket: the
    // first all-reduce would have another size, which Gloo answers with
    // std::terminate (Note [Checking the model across processes]).
    check_differs_at_construction("buckets", "--bucket-cap-mib 0.0001",
                                  "rank 1's setting DataParallelOptions::bucket_cap_mib 0.0001, rank 0's setting "
                                  "DataParallelOptions::bucket_cap_mib 25");
  }

  TEST_CASE("a process that calls save_state alone: the error names save_state against the other's step") {
    check_desync_named("savealone", "--replicas 1 --steps 4", {"", fmt::format("--save-at-step 1 --checkpoint {}",
                                                                              scratch("savealone.ckpt"))},
                       {"the processes' collectives first differ at #", "rank 1 waits in all_reduce #",
                        "(save_state, 8 B Double)", "rank 0 waits in broadcast #", "(bucket order, "});
    std::remove(scratch("savealone.ckpt").c_str());
  }
}

#if MULTIGPU_WITH_CUDA
TEST_SUITE("CUDA") {
  // Two processes on one GPU: NCCL refuses two ranks on one GPU, so the
  // processes must see that they share it and go through Gloo, with the
  // replicas' CUDA tensors staged through the host.
  TEST_CASE("CUDA: 2 processes sharing one GPU (Gloo with CUDA tensors) train like one plain model") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    check_two_processes_train_like_one_model(/*summed=*/false, "cuda:0", 1);
  }
}
#endif  // MULTIGPU_WITH_CUDA

#endif  // MULTIGPU_WITH_DISTRIBUTED
