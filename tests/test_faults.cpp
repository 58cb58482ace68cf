// Fault injection: a replica that throws in forward or backward, a
// communicator that throws or never completes. After each the caller gets a
// clear error, no thread is left behind, and the next step works (or the
// object says plainly that it cannot go on).

#include "support.hpp"  // first: see its comment

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <dirent.h>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu_test::contains;

namespace {

std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

/// Threads of this process right now.
int thread_count() {
  int count = 0;
  if (DIR* dir = opendir("/proc/self/task")) {
    while (dirent* entry = readdir(dir)) count += entry->d_name[0] != '.' ? 1 : 0;
    closedir(dir);
  }
  return count;
}

struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(4, 2)); }
  torch::Tensor forward(const torch::Tensor& x) {
    if (fail_forward) throw std::runtime_error("forward exploded");
    return fc(x);
  }
  torch::nn::Linear fc{nullptr};
  bool fail_forward = false;
  bool fail_backward = false;
};
TORCH_MODULE(Net);

/// A hook on one tensor's gradient that throws: an error inside backward.
torch::Tensor loss_of(NetImpl& net, const torch::Tensor& x) {
  auto out = net.forward(x);
  if (net.fail_backward) {
    out.register_hook([](const torch::Tensor&) -> torch::Tensor { throw std::runtime_error("backward exploded"); });
  }
  return out.pow(2).mean();
}

/// The local backend, with a fault on chosen all-reduce calls.
class FaultyCommunicator : public multigpu::Communicator {
 public:
  enum class Fault { kNone, kThrow, kHang };
  FaultyCommunicator(std::vector<multigpu::ReplicaContext> replicas, std::shared_ptr<std::atomic<int>> fault)
      : inner_(std::move(replicas)), fault_(std::move(fault)) {}
  std::string name() const override { return "faulty-local"; }
  std::size_t size() const override { return inner_.size(); }
  void all_reduce(const std::vector<at::Tensor>& tensors, multigpu::ReduceOp op) override {
    const auto fault = static_cast<Fault>(fault_->load());
    if (fault == Fault::kThrow) throw multigpu::CommError("injected: the link to replica 1 broke");
    if (fault == Fault::kHang) {
      std::unique_lock<std::mutex> lock(release_mutex());
      release_cv().wait_for(lock, std::chrono::seconds(60), [] { return released(); });  // bounded even if the test fails
    }
    inner_.all_reduce(tensors, op);
  }
  void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override { inner_.broadcast(tensors, root); }

  static std::mutex& release_mutex() {
    static std::mutex m;
    return m;
  }
  static std::condition_variable& release_cv() {
    static std::condition_variable cv;
    return cv;
  }
  static bool& released() {
    static bool flag = false;
    return flag;
  }
  static void release() {
    {
      std::lock_guard<std::mutex> lock(release_mutex());
      released() = true;
    }
    release_cv().notify_all();
  }

 private:
  multigpu::LocalCommunicator inner_;
  std::shared_ptr<std::atomic<int>> fault_;
};

DataParallelOptions with_faulty_comm(const std::shared_ptr<std::atomic<int>>& fault) {
  DataParallelOptions options;
  options.make_communicator = [fault](const std::vector<multigpu::ReplicaContext>& replicas) {
    return std::make_unique<FaultyCommunicator>(replicas, fault);
  };
  return options;
}

/// Threads of this process once LibTorch's own pools are running: LibTorch
/// starts them (OpenMP, intra-op) on first use and keeps them, so a
/// throwaway DataParallel trains one step first and only our threads are
/// left to count.
int threads_after_warm_up() {
  static const bool warmed_up = [] {
    Net net;
    DataParallel<Net> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    dp.train_step(torch::randn({6, 4}), loss_of);
    dp.predict(torch::randn({6, 4}), [](NetImpl& model, const torch::Tensor& x) { return model.forward(x); });
    return true;
  }();
  (void)warmed_up;
  return thread_count();
}

}  // namespace

TEST_SUITE("faults") {
  TEST_CASE("an exception in one replica's forward: named, and the next step works") {
    const int threads_before = threads_after_warm_up();
    {
      Net net;
      DataParallel<Net> dp(net, cpus(3));
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
      const auto x = torch::randn({6, 4});
      dp.replica(1).fail_forward = true;
      const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, dp.train_step(x, loss_of));
      CHECK(message == "replica 1 of 3 (cpu) failed in the loss function (forward): forward exploded");
      dp.replica(1).fail_forward = false;
      CHECK(std::isfinite(dp.train_step(x, loss_of)));
      dp.check_parity();
    }
    CHECK(thread_count() == threads_before);
  }

  TEST_CASE("an exception in one replica's backward: named, nothing left half-synced, the next step works") {
    Net net;
    DataParallel<Net> dp(net, cpus(3));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto x = torch::randn({6, 4});
    const auto before = net->fc->weight.clone();
    dp.replica(2).fail_backward = true;
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::ReplicaError, dp.train_step(x, loss_of));
    CHECK(contains(message, "replica 2 of 3 (cpu) failed in backward: backward exploded"));
    CHECK(torch::equal(net->fc->weight, before));  // no optimizer step happened
    for (std::size_t r = 0; r < 3; ++r) CHECK(dp.replica(r).fc->weight.grad().abs().sum().item<double>() == 0);
    dp.replica(2).fail_backward = false;
    CHECK(std::isfinite(dp.train_step(x, loss_of)));
    dp.check_parity();
  }

  TEST_CASE("a communicator that throws: a CommError naming the backend, and the next step works") {
    auto fault = std::make_shared<std::atomic<int>>(static_cast<int>(FaultyCommunicator::Fault::kNone));
    Net net;
    DataParallel<Net> dp(net, cpus(2), with_faulty_comm(fault));
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
    const auto x = torch::randn({4, 4});
    dp.train_step(x, loss_of);
    fault->store(static_cast<int>(FaultyCommunicator::Fault::kThrow));
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::CommError, dp.train_step(x, loss_of));
    CHECK(contains(message, "gradient sync: all-reduce on the faulty-local backend failed: injected: the link to "
                            "replica 1 broke"));
    fault->store(static_cast<int>(FaultyCommunicator::Fault::kNone));
    CHECK(std::isfinite(dp.train_step(x, loss_of)));
    dp.check_parity();
  }

  TEST_CASE("a communicator that never completes: a time-out error instead of a hang, then a clear refusal") {
    const int threads_before = threads_after_warm_up();
    auto fault = std::make_shared<std::atomic<int>>(static_cast<int>(FaultyCommunicator::Fault::kNone));
    {
      auto options = with_faulty_comm(fault);
      options.collective_timeout = std::chrono::milliseconds(300);
      Net net;
      DataParallel<Net> dp(net, cpus(3), options);
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
      const auto x = torch::randn({6, 4});
      dp.train_step(x, loss_of);
      fault->store(static_cast<int>(FaultyCommunicator::Fault::kHang));
      const auto start = std::chrono::steady_clock::now();
      const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::CommError, dp.train_step(x, loss_of));
      const auto waited = std::chrono::steady_clock::now() - start;
      CHECK(contains(message, "gradient sync: the all-reduce of bucket 0 (2 parameters"));
      CHECK(contains(message, "over replicas 0..2 on the faulty-local backend did not finish within 300 ms"));
      CHECK(waited < std::chrono::seconds(20));
      // The stuck all-reduce may still write into the buckets: the object says it cannot go on.
      const std::string refusal = MULTIGPU_TEST_MESSAGE(multigpu::Error, dp.train_step(x, loss_of));
      CHECK(contains(refusal, "unusable after an earlier failure"));
      CHECK(contains(refusal, "build a new DataParallel"));
      FaultyCommunicator::release();  // the stuck call returns; destroying dp joins every thread
    }
    CHECK(thread_count() == threads_before);
  }
}
