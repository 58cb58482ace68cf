// CUDA-only tests: compiled only where LibTorch has CUDA (MULTIGPU_WITH_CUDA),
// and each one reports itself skipped, with the reason, where no GPU is
// visible (ctest shows it as "Skipped"; see MULTIGPU_TEST_NEEDS_GPUS).
// The GPU suite of the GPU proof issue grows here.

#include "support.hpp"  // first: see its comment

#if MULTIGPU_WITH_CUDA

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/cuda/CUDAGraph.h>
#include <ATen/cuda/Sleep.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "multigpu/detail/event_pool.hpp"
#include "multigpu/gloo/communicator.hpp"

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu_test::contains;

namespace {

struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(8, 32));
    fc2 = register_module("fc2", torch::nn::Linear(32, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

/// With buffers (BatchNorm's running statistics), which follow the primary.
struct BnNetImpl : torch::nn::Cloneable<BnNetImpl> {
  BnNetImpl() { reset(); }
  void reset() override {
    fc = register_module("fc", torch::nn::Linear(8, 16));
    bn = register_module("bn", torch::nn::BatchNorm1d(16));
    out = register_module("out", torch::nn::Linear(16, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return out(torch::relu(bn(fc(x)))); }
  torch::nn::Linear fc{nullptr}, out{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(BnNet);

torch::Tensor mse(NetImpl& net, const torch::data::Example<>& shard) {
  return torch::mse_loss(net.forward(shard.data), shard.target);
}

torch::data::Example<> batch_on(const c10::Device& device, std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 8}).to(device), torch::randn({n, 4}).to(device)};
}

/// Trains `steps` plain SGD steps of a copy of `start` on `device`: the reference.
Net reference(const Net& start, const c10::Device& device, int steps) {
  Net net = std::dynamic_pointer_cast<NetImpl>(start->clone(device));
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int s = 0; s < steps; ++s) {
    sgd.zero_grad();
    mse(*net, batch_on(device, 12, 100 + static_cast<std::uint64_t>(s))).backward();
    sgd.step();
  }
  return net;
}

void check_same_parameters(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto pa = a.parameters();
  const auto pb = b.parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CHECK(torch::allclose(pa[i].cpu(), pb[i].cpu(), 1e-4, 1e-5));
  }
}

/// Trains a copy of a new Net with DataParallel on `devices`, and checks that
/// it ends where reference() does, on every replica.
void check_trains_like_reference(const std::vector<c10::Device>& devices, const DataParallelOptions& options = {}) {
  const c10::Device& gpu = devices.front();
  Net start;
  const Net expected = reference(start, gpu, 5);
  Net net = std::dynamic_pointer_cast<NetImpl>(start->clone());
  DataParallel<Net> dp(net, devices, options);
  dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int s = 0; s < 5; ++s) dp.train_step(batch_on(gpu, 12, 100 + static_cast<std::uint64_t>(s)), mse);
  CHECK(net->fc1->weight.device() == gpu);
  check_same_parameters(*net, *expected);
  for (std::size_t r = 1; r < dp.size(); ++r) check_same_parameters(dp.replica(0), dp.replica(r));
}

/// Keeps the current stream of cuda:0 busy for about half a second (a spin
/// kernel): work queued after it on that stream runs late, which is what
/// makes a missing stream dependency show up as a wrong value.
void hold_current_stream() { at::cuda::sleep(1'000'000'000); }

/// The same on `device`'s current stream (inside a replica: its own stream).
void hold_current_stream_of(const c10::Device& device) {
  const c10::DeviceGuard on(device);
  at::cuda::sleep(1'000'000'000);
}

bool current_stream_busy() {
  return cudaStreamQuery(c10::cuda::getCurrentCUDAStream(0).stream()) == cudaErrorNotReady;
}

/// Whether `stream` (of a GPU) still has work to do.
bool stream_busy(const c10::Stream& stream) {
  return cudaStreamQuery(c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, stream).stream()) ==
         cudaErrorNotReady;
}

/// The collectives of a job of one process, for CrossProcessCommunicator
/// without c10d: every collective over one process leaves the values as
/// they are.
class OneProcess : public multigpu::ProcessCollectives {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(const at::Tensor& tensor) override { CHECK(tensor.is_cpu()); }
  void broadcast(const at::Tensor& tensor, int) override { CHECK(tensor.is_cpu()); }
  std::vector<std::string> all_gather_text(const std::string& value) override { return {value}; }
};

/// Two replicas on one GPU (the local backend): replica streams, the
/// communication stream and every fence, with the one GPU a machine has.
DataParallel<Net> two_on_one_gpu(const Net& net, DataParallelOptions options = {}) {
  options.backend = "local";
  const c10::Device gpu("cuda:0");
  return DataParallel<Net>(net, std::vector<c10::Device>{gpu, gpu}, options);
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(bool adam, std::vector<torch::Tensor> parameters) {
  if (adam) return std::make_unique<torch::optim::Adam>(parameters, torch::optim::AdamOptions(1e-2));
  return std::make_unique<torch::optim::SGD>(parameters, torch::optim::SGDOptions(0.05).momentum(0.9));
}

}  // namespace

TEST_SUITE("CUDA") {
  TEST_CASE("CUDA: a training step does not wait for the GPU, and its loss is right when read") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(4);
    Net net;
    Net copy = std::dynamic_pointer_cast<NetImpl>(net->clone(gpu));
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    for (int s = 0; s < 2; ++s) dp.train_step(batch_on(gpu, 12, 300 + static_cast<std::uint64_t>(s)), mse).item();
    const auto batch = batch_on(gpu, 12, 302);
    torch::cuda::synchronize(0);
    hold_current_stream();
    const auto start = std::chrono::steady_clock::now();
    const multigpu::StepLoss loss = dp.train_step(batch, mse);
    const auto host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    CHECK_MESSAGE(current_stream_busy(), "train_step waited for the GPU (" << host_ms << " ms on the host)");
    CHECK_FALSE(loss.read());
    // The loss, read now, is the one of the parameters before this step.
    copy->to(gpu);
    for (int s = 0; s < 2; ++s) {
      torch::optim::SGD sgd(copy->parameters(), torch::optim::SGDOptions(0.05));
      sgd.zero_grad();
      mse(*copy, batch_on(gpu, 12, 300 + static_cast<std::uint64_t>(s))).backward();
      sgd.step();
    }
    CHECK(loss.item() == doctest::Approx(mse(*copy, batch).item<double>()).epsilon(1e-4));
  }

  TEST_CASE("CUDA: the replicas read a batch the caller wrote on its own stream just before the step") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(5);
    Net net;
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    auto batch = batch_on(gpu, 12, 400);
    const auto fresh = batch_on(gpu, 12, 401);
    const double expected = mse(*net, fresh).item<double>();
    hold_current_stream();
    batch.data.copy_(fresh.data);  // lands late, after the spin, on the caller's stream
    batch.target.copy_(fresh.target);
    const double loss = dp.train_step(batch, mse);
    CHECK(loss == doctest::Approx(expected).epsilon(1e-4));
  }

  TEST_CASE("CUDA: a batch copied from pinned memory with non_blocking just before the step is what the replicas read") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(10);
    Net net;
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto x = torch::randn({12, 8}).pin_memory();
    const auto y = torch::randn({12, 4}).pin_memory();
    const double expected = mse(*net, torch::data::Example<>(x.to(gpu), y.to(gpu))).item<double>();
    hold_current_stream();
    const torch::data::Example<> batch(x.to(gpu, /*non_blocking=*/true), y.to(gpu, /*non_blocking=*/true));
    const double loss = dp.train_step(batch, mse);  // the copies land after the spin
    CHECK(loss == doctest::Approx(expected).epsilon(1e-4));
  }

  TEST_CASE("CUDA: predict's outputs are complete when the caller's stream reads them") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(6);
    Net net;
    auto dp = two_on_one_gpu(net);
    const auto x = torch::randn({10, 8}).to(gpu);
    const auto expected = net->forward(x).cpu();
    const auto out = dp.predict(x, [](NetImpl& m, const torch::Tensor& shard) {
      hold_current_stream_of(shard.device());
      return m.forward(shard);
    });
    CHECK(out.device() == gpu);
    CHECK(torch::allclose(out.cpu(), expected, 1e-5, 1e-6));
  }

  TEST_CASE("CUDA: gradients zeroed in place by the caller's own optimizer are zero for the next step") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(7);
    Net net;
    Net copy = std::dynamic_pointer_cast<NetImpl>(net->clone(gpu));
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto batch = batch_on(gpu, 12, 500);
    dp.forward_backward(batch, mse);
    hold_current_stream();
    // Zero kernels on the caller's stream, late; every replica's optimizer
    // (zeroing only the primary's would leave the others' gradients in).
    for (auto* optimizer : dp.optimizers()) optimizer->zero_grad(/*set_to_none=*/false);
    dp.forward_backward(batch, mse);
    mse(*copy, batch).backward();
    const auto ours = net->fc1->weight.grad().cpu();
    CHECK(torch::allclose(ours, copy->fc1->weight.grad().cpu(), 1e-4, 1e-6));
  }

  TEST_CASE("CUDA: DataParallel on one GPU trains like a plain model") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    torch::manual_seed(1);
    check_trains_like_reference({c10::Device("cuda:0")});
  }

  TEST_CASE("CUDA: two replicas on one GPU (local backend) train like one model on the whole batch") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    torch::manual_seed(2);
    DataParallelOptions options;
    options.backend = "local";
    check_trains_like_reference({c10::Device("cuda:0"), c10::Device("cuda:0")}, options);
  }

  TEST_CASE("CUDA: BatchNorm buffers follow the primary on two replicas of one GPU") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(3);
    BnNet net;
    DataParallelOptions options;
    options.backend = "local";
    DataParallel<BnNet> dp(net, std::vector<c10::Device>{gpu, gpu}, options);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    for (int s = 0; s < 3; ++s) {
      dp.train_step(batch_on(gpu, 12, 200 + static_cast<std::uint64_t>(s)),
                    [](BnNetImpl& m, const torch::data::Example<>& shard) {
                      return torch::mse_loss(m.forward(shard.data), shard.target);
                    });
    }
    dp.check_parity();  // parameters and buffers identical on both replicas
    CHECK(torch::equal(dp.replica(1).bn->running_mean.cpu(), net->bn->running_mean.cpu()));
    CHECK(dp.replica(1).bn->num_batches_tracked.item<std::int64_t>() == 3);
  }

  TEST_CASE("CUDA: two replicas train like one GPU: SGD and Adam, overlap on and off, uneven and empty shards, no_sync") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    for (const bool adam : {false, true}) {
      for (const bool overlap : {true, false}) {
        for (const std::int64_t batch_size : {7, 1}) {  // shards of 4 and 3; of 1 and 0 (replica 1 sits out)
          CAPTURE(adam);
          CAPTURE(overlap);
          CAPTURE(batch_size);
          torch::manual_seed(8);
          Net start;
          Net expected = std::dynamic_pointer_cast<NetImpl>(start->clone(gpu));
          auto expected_optimizer = make_optimizer(adam, expected->parameters());
          Net net = std::dynamic_pointer_cast<NetImpl>(start->clone());
          DataParallelOptions options;
          options.overlap_sync_with_backward = overlap;
          auto dp = two_on_one_gpu(net, options);
          if (adam) {
            dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(1e-2));
          } else {
            dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05).momentum(0.9));
          }
          for (int s = 0; s < 4; ++s) {
            const auto a = batch_on(gpu, batch_size, 600 + static_cast<std::uint64_t>(s));
            expected_optimizer->zero_grad();
            mse(*expected, a).backward();
            if (s == 2) {  // gradient accumulation: two micro-batches, one step
              const auto b = batch_on(gpu, batch_size, 700);
              mse(*expected, b).backward();
              {
                auto guard = dp.no_sync();
                dp.forward_backward(a, mse);
              }
              dp.forward_backward(b, mse);
              dp.step();
              dp.zero_grad();
            } else {
              dp.train_step(a, mse);
            }
            expected_optimizer->step();
          }
          check_same_parameters(*net, *expected);
          dp.check_parity();
        }
      }
    }
  }

  TEST_CASE("CUDA: the caller reads the parameters a step wrote, without synchronising") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(9);
    Net start;
    Net expected = std::dynamic_pointer_cast<NetImpl>(start->clone(gpu));
    Net net = std::dynamic_pointer_cast<NetImpl>(start->clone());
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    const auto batch = batch_on(gpu, 12, 800);
    dp.train_step(batch, [](NetImpl& m, const torch::data::Example<>& shard) {
      hold_current_stream_of(shard.data.device());  // the replicas' work ends late
      return mse(m, shard);
    });
    const auto read = net->fc1->weight.clone();  // on the caller's stream, at once
    torch::optim::SGD sgd(expected->parameters(), torch::optim::SGDOptions(0.05));
    mse(*expected, batch).backward();
    sgd.step();
    CHECK(torch::allclose(read.cpu(), expected->fc1->weight.cpu(), 1e-4, 1e-5));
  }

  TEST_CASE("CUDA: every replica works on its own shard, and a failing one is named with its message") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    Net net;
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    std::mutex mutex;
    std::vector<std::pair<const NetImpl*, c10::Device>> calls;
    dp.train_step(batch_on(gpu, 6, 900), [&](NetImpl& m, const torch::data::Example<>& shard) {
      const std::lock_guard<std::mutex> lock(mutex);
      calls.emplace_back(&m, shard.data.device());
      return mse(m, shard);
    });
    REQUIRE(calls.size() == 2);
    CHECK(calls[0].first != calls[1].first);
    for (const auto& call : calls) CHECK(call.second == gpu);
    const NetImpl* second = &dp.replica(1);
    const std::string message = MULTIGPU_TEST_MESSAGE(
        multigpu::ReplicaError, dp.train_step(batch_on(gpu, 6, 901), [&](NetImpl& m, const torch::data::Example<>& s) {
          if (&m == second) throw std::runtime_error("boom on the GPU");
          return mse(m, s);
        }));
    CHECK(contains(message, "replica 1 of 2 (cuda:0) failed in the loss function (forward): boom on the GPU"));
    CHECK(std::isfinite(dp.train_step(batch_on(gpu, 6, 902), mse)));  // and the next step works
    dp.check_parity();
  }

  TEST_CASE("CUDA: the device report names the GPU, auto takes an idle one, an allocation makes it busy") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    multigpu::DeviceManager manager;
    const multigpu::DeviceReport report = manager.report("auto");
    MESSAGE(report.text());
    const auto& before = manager.devices();
    REQUIRE_FALSE(before.empty());
    const multigpu::DeviceInfo& gpu = before.front();
    CHECK(gpu.is_cuda());
    CHECK_FALSE(gpu.name.empty());
    CHECK(gpu.cc_major >= 5);
    CHECK(gpu.total_bytes > (std::int64_t{1} << 30));
    if (gpu.busy) {
      MESSAGE("cuda:0 is in use by another process: the idle-GPU check is left out");
    } else {
      CHECK(manager.select("auto").torch_devices().front() == c10::Device("cuda:0"));
    }
    const std::int64_t hog_bytes = (manager.options().busy_threshold_mib + 1024) << 20;
    const auto hog = torch::ones({hog_bytes}, torch::TensorOptions().dtype(torch::kByte).device("cuda:0"));
    torch::cuda::synchronize(0);
    multigpu::DeviceManager after;
    const multigpu::DeviceInfo& used = after.devices().front();
    CHECK(used.used_bytes >= hog_bytes);
    CHECK(used.busy);
    MESSAGE("memory figures from " << used.memory_query << ": " << (used.used_bytes >> 20) << " MiB in use of "
                                   << (used.total_bytes >> 20) << " MiB");
  }

  TEST_CASE("CUDA: a replica is built straight on its GPU: nothing of it passes through the first") {
    MULTIGPU_TEST_NEEDS_GPUS(2);
    namespace allocator = c10::cuda::CUDACachingAllocator;
    auto allocated = [](c10::DeviceIndex device) { return allocator::getDeviceStats(device).allocated_bytes[0]; };
    torch::nn::Linear big(2048, 2048);  // 16 MiB of parameters, on the CPU
    const std::int64_t bytes = (2048 * 2048 + 2048) * 4;
    torch::cuda::synchronize();
    allocator::resetPeakStats(0);
    allocator::resetPeakStats(1);
    const std::int64_t before0 = allocated(0).current;
    const std::int64_t before1 = allocated(1).current;
    DataParallelOptions options;
    options.backend = "local";  // NCCL's own buffers stay out of the figures
    DataParallel<torch::nn::Linear> dp(big, std::vector<c10::Device>{c10::Device("cuda:0"), c10::Device("cuda:1")},
                                       options);
    torch::cuda::synchronize();
    // Each GPU holds its replica's parameters and one gradient bucket of the
    // same size; cuda:0 never held a second copy on the way to cuda:1.
    const std::int64_t slack = std::int64_t{1} << 20;
    CHECK(allocated(0).peak - before0 <= 2 * bytes + slack);
    CHECK(allocated(1).current - before1 >= 2 * bytes);
    CHECK(allocated(1).current - before1 <= 2 * bytes + slack);
    CHECK(big->weight.device() == c10::Device("cuda:0"));
    CHECK(dp.replica(1).weight.device() == c10::Device("cuda:1"));
  }

  TEST_CASE("CUDA: fp16 autocast, a GradScaler and bf16 buckets on two replicas of one GPU, an overflow skips everywhere") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    torch::manual_seed(6);
    Net net;
    DataParallelOptions options;
    options.backend = "local";
    options.precision = multigpu::Precision::kFloat16;
    options.grad_scaler = std::make_shared<multigpu::GradScaler>();
    options.comm_hook = multigpu::bf16_compress_hook();
    const c10::Device gpu("cuda:0");
    DataParallel<Net> dp(net, std::vector<c10::Device>{gpu, gpu}, options);
    dp.make_optimizer<torch::optim::Adam>(torch::optim::AdamOptions(0.01));
    const auto x = torch::randn({64, 8}, torch::TensorOptions().device(gpu));
    const auto y = torch::randn({64, 4}, torch::TensorOptions().device(gpu));
    std::mutex mutex;
    std::vector<c10::ScalarType> seen;
    auto loss_fn = [&](NetImpl& m, const torch::Tensor& shard) {
      const auto out = m.forward(shard.narrow(1, 0, 8));
      {
        const std::lock_guard<std::mutex> lock(mutex);
        seen.push_back(out.scalar_type());
      }
      return torch::mse_loss(out.to(torch::kFloat), shard.narrow(1, 8, 4));
    };
    const auto batch = torch::cat({x, y}, 1);
    const double first = dp.train_step(batch, loss_fn);
    double last = first;
    for (int step = 0; step < 40; ++step) last = dp.train_step(batch, loss_fn);
    CHECK(last < first);
    for (const auto type : seen) CHECK((type == torch::kHalf));
    dp.check_parity();

    std::vector<torch::Tensor> before;
    for (const auto& p : dp.module().parameters()) before.push_back(p.detach().clone());
    const double scale = dp.grad_scaler()->scale();
    dp.forward_backward(batch, loss_fn);
    {
      const torch::NoGradGuard no_grad;
      dp.replica(1).fc1->weight.grad().view({-1})[0].fill_(std::numeric_limits<float>::infinity());
    }
    // The norm is the primary's (finite here); the flags were taken when clipping unscaled.
    CHECK(std::isfinite(dp.clip_grad_norm(1.0).item<double>()));
    dp.step();
    dp.zero_grad();
    CHECK(dp.grad_scaler()->last_step_skipped());
    CHECK(dp.grad_scaler()->scale() == scale / 2);
    const auto after = dp.module().parameters();
    for (std::size_t i = 0; i < after.size(); ++i) CHECK(torch::equal(after[i], before[i]));
    dp.check_parity();
  }

  TEST_CASE("CUDA: reading a step's loss does not wait for the next step") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    torch::manual_seed(14);
    Net net;
    auto dp = two_on_one_gpu(net);
    dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
    // The first steps (buckets rebuilt in ready order) may wait for the GPU.
    // Their losses live until both are read, so that LibTorch's pinned host
    // allocator has two blocks to hand to the next two steps: no pinned
    // allocation (cudaHostAlloc) then happens while the GPU is held.
    std::vector<multigpu::StepLoss> warm_up;
    for (int s = 0; s < 2; ++s) {
      warm_up.push_back(dp.train_step(batch_on(gpu, 12, 142 + static_cast<std::uint64_t>(s)), mse));
    }
    for (const auto& loss : warm_up) loss.item();
    warm_up.clear();
    const multigpu::StepLoss first = dp.train_step(batch_on(gpu, 12, 140), mse);
    hold_current_stream();  // the next step's replicas start after it (entry fence)
    const multigpu::StepLoss second = dp.train_step(batch_on(gpu, 12, 141), mse);
    const double value = first.item();  // See Note [Reading a step's loss]
    CHECK_MESSAGE(current_stream_busy(), "reading step 1's loss waited for step 2");
    CHECK(value == doctest::Approx(first.tensor().item<double>()));
    CHECK(std::isfinite(second.item()));
  }

  TEST_CASE("CUDA: an accumulator made before DataParallel is named once, with what to do") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    const std::string made_before = "was made before DataParallel";
    for (const bool keep_graph : {false, true}) {
      CAPTURE(keep_graph);
      torch::manual_seed(15);
      Net net;
      net->to(gpu);
      torch::Tensor kept;  // holds an autograd graph of the module: its accumulators, on this thread's stream
      if (keep_graph) kept = mse(*net, batch_on(gpu, 12, 150));
      multigpu_test::CapturedLog log;
      auto dp = two_on_one_gpu(net);
      dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
      for (int s = 0; s < 2; ++s) dp.train_step(batch_on(gpu, 12, 151 + static_cast<std::uint64_t>(s)), mse).item();
      std::size_t found = 0;
      for (const auto& line : log.warnings()) {
        if (!contains(line, made_before)) continue;
        ++found;
        CHECK(contains(line, "replica 0 (cuda:0)"));
        CHECK(contains(line, "Build DataParallel before running the module"));
      }
      CHECK(found == (keep_graph ? 1U : 0U));
    }
  }

  TEST_CASE("CUDA: Gloo's host staging of a bucket does not wait for the replica's stream") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    const multigpu::ReplicaContext replica(gpu);
    multigpu::CrossProcessCommunicator comm({replica}, std::make_shared<OneProcess>());
    auto t = torch::arange(6, torch::TensorOptions().dtype(torch::kFloat).device(gpu));
    torch::cuda::synchronize(0);
    {
      const multigpu::ReplicaContext::Scope on_replica(replica);
      hold_current_stream_of(gpu);  // the rest of the replica's backward
    }
    // The gradient sync runs with a communication stream current, after the
    // bucket's ready event only. See Note [Staging a GPU tensor for Gloo].
    const c10::cuda::CUDAStreamGuard on_comm(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, 0));
    comm.all_reduce({t}, multigpu::ReduceOp::kAverage);
    CHECK_MESSAGE(stream_busy(*replica.stream()), "the staging waited for the replica's stream");
    CHECK(torch::equal(t.cpu(), torch::arange(6, torch::kFloat)));
  }

#if MULTIGPU_WITH_NCCL
  TEST_CASE("CUDA: a CUDA graph is captured on another thread while the NCCL watchdog watches a collective") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    multigpu::NcclCommunicator nccl({multigpu::ReplicaContext(gpu)});
    auto t = torch::ones({4}, torch::TensorOptions().device(gpu));
    {
      // Unfinished for about half a second: the watchdog queries its event
      // every 10 ms meanwhile. See Note [NCCL watchdog and CUDA graphs].
      const c10::cuda::CUDAStreamGuard busy(c10::cuda::getStreamFromPool(false, 0));
      hold_current_stream();
      nccl.all_reduce({t}, multigpu::ReduceOp::kSum);
    }
    // A query refused during the capture throws in the watchdog, which warns
    // and goes on: whether or not CUDA also invalidates the capture, the
    // warning shows the bug.
    multigpu_test::CapturedLog log;
    std::string failure;
    double doubled = 0;
    std::thread capturing([&] {
      try {
        const c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool(false, 0));
        const auto x = torch::full({16}, 3.0f, torch::TensorOptions().device(gpu));
        (void)(x * 2);  // the kernel loaded before the capture
        c10::cuda::getCurrentCUDAStream(0).synchronize();  // this stream only: the collective stays unfinished
        at::cuda::CUDAGraph graph;
        graph.capture_begin();  // global capture mode, the default
        const auto y = x * 2;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        graph.capture_end();
        graph.replay();
        doubled = y.sum().item<double>();
      } catch (const std::exception& e) {
        failure = e.what();
      }
    });
    capturing.join();
    CHECK_MESSAGE(failure.empty(), failure);
    CHECK(doubled == 96.0);
    nccl.wait(std::chrono::seconds(30));
    CHECK(nccl.failure().empty());
    for (const auto& line : log.warnings()) CHECK_MESSAGE(!contains(line, "NCCL watchdog"), line);
  }

  TEST_CASE("CUDA: NCCL collectives take their events from the pool and give them back") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    multigpu::NcclCommunicator nccl({multigpu::ReplicaContext(gpu)});
    auto t = torch::ones({4}, torch::TensorOptions().device(gpu));
    auto& pool = multigpu::detail::EventPool::instance();
    const std::size_t before = pool.free_events(gpu);
    CHECK(before >= 1);  // the warm-up's, given back
    for (int i = 0; i < 10; ++i) {
      nccl.all_reduce({t}, multigpu::ReduceOp::kSum);
      nccl.wait(std::chrono::seconds(30));
    }
    CHECK(pool.free_events(gpu) == before);  // reused, not made anew
  }

  TEST_CASE("CUDA: NCCL calls on fresh threads create no context on GPU 0 when only GPU 1 is used") {
    // A fresh thread reports device 0 without having a context there; putting
    // that device "back" with cudaSetDevice, or querying an event while it is
    // current, would create one. See Note [Restoring the current device]
    // (detail/cuda.hpp). With one GPU, the GPU used is GPU 0: nothing to tell.
    MULTIGPU_TEST_NEEDS_GPUS(2);
    if (at::detail::getCUDAHooks().hasPrimaryContext(0)) {
      std::cout << "multigpu test skipped: GPU 0 already has a context in this process (an earlier test, or "
                   "cudaMemGetInfo without NVML); run this case on its own, as ctest does"
                << std::endl;
      return;
    }
    const c10::Device gpu("cuda:1");
    auto nccl = std::make_unique<multigpu::NcclCommunicator>(std::vector<multigpu::ReplicaContext>{
        multigpu::ReplicaContext(gpu)});  // set-up and warm-up on this thread, whose device is 0 too
    const bool after_setup = at::detail::getCUDAHooks().hasPrimaryContext(0);
    auto t = torch::ones({4}, torch::TensorOptions().device(gpu));
    std::string failure;
    int device_after = -1;
    std::thread launching([&] {
      try {
        nccl->all_reduce({t}, multigpu::ReduceOp::kSum);
        if (cudaGetDevice(&device_after) != cudaSuccess) device_after = -2;
      } catch (const std::exception& e) {
        failure = e.what();
      }
    });
    launching.join();
    const bool after_collective = at::detail::getCUDAHooks().hasPrimaryContext(0);
    std::thread waiting([&] {
      try {
        nccl->wait(std::chrono::seconds(30));
      } catch (const std::exception& e) {
        failure = e.what();
      }
    });
    waiting.join();
    const bool after_wait = at::detail::getCUDAHooks().hasPrimaryContext(0);
    std::thread destroying([&] { nccl.reset(); });  // waits, finalizes: on a fresh thread
    destroying.join();
    CHECK_MESSAGE(failure.empty(), failure);
    CHECK(torch::equal(t.cpu(), torch::ones({4})));
    CHECK(device_after == 1);  // left on the GPU it used, not put on GPU 0
    CHECK_FALSE(after_setup);
    CHECK_FALSE(after_collective);
    CHECK_FALSE(after_wait);
    CHECK_FALSE(at::detail::getCUDAHooks().hasPrimaryContext(0));
  }
#endif

#if MULTIGPU_WITH_NCCL
  TEST_CASE("CUDA: the NCCL backend over two GPUs sums, averages and broadcasts values") {
    MULTIGPU_TEST_NEEDS_GPUS(2);
    const c10::Device first("cuda:0");
    const c10::Device second("cuda:1");
    multigpu::NcclCommunicator nccl({multigpu::ReplicaContext(first), multigpu::ReplicaContext(second)});
    // Collectives run on the current (here default) streams, after the
    // writes queued there: no synchronisation is needed around them.
    const auto base = torch::arange(6, torch::kFloat);
    auto a = base.to(first);
    auto b = (base * 10).to(second);
    nccl.all_reduce({a, b}, multigpu::ReduceOp::kSum);
    nccl.wait(std::chrono::seconds(30));
    CHECK(torch::equal(a.cpu(), base * 11));
    CHECK(torch::equal(b.cpu(), base * 11));
    b.copy_((base * 3).to(second));
    nccl.all_reduce({a, b}, multigpu::ReduceOp::kAverage);  // (11 + 3) / 2
    nccl.wait(std::chrono::seconds(30));
    CHECK(torch::allclose(a.cpu(), base * 7));
    b.fill_(5);
    nccl.broadcast({a, b}, 1);
    nccl.wait(std::chrono::seconds(30));
    CHECK(torch::equal(a.cpu(), torch::full({6}, 5.0f)));
  }

  TEST_CASE("CUDA: the NCCL backend with one rank all-reduces and broadcasts values") {
    MULTIGPU_TEST_NEEDS_GPUS(1);
    const c10::Device gpu("cuda:0");
    multigpu::NcclCommunicator nccl({multigpu::ReplicaContext(gpu)});
    auto t = torch::arange(6, torch::TensorOptions().dtype(torch::kFloat).device(gpu));
    nccl.all_reduce({t}, multigpu::ReduceOp::kSum);
    nccl.wait(std::chrono::seconds(30));
    CHECK(torch::equal(t.cpu(), torch::arange(6, torch::kFloat)));
    nccl.all_reduce({t}, multigpu::ReduceOp::kAverage);
    nccl.broadcast({t}, 0);
    nccl.wait(std::chrono::seconds(30));
    CHECK(torch::equal(t.cpu(), torch::arange(6, torch::kFloat)));
  }
#endif
}

#endif  // MULTIGPU_WITH_CUDA
