// Compiled with -fsyntax-only, MULTIGPU_WITH_CUDA=1 and MULTIGPU_WITH_NCCL=1
// against the CUDA toolkit's headers, on machines whose LibTorch is
// CPU-only: the CUDA and NCCL code paths (and the templates instantiated
// with them) must at least compile where they cannot run.
#include <multigpu/multigpu.hpp>
#include <multigpu/detail/cuda.hpp>
#include <multigpu/nccl/communicator.hpp>
#include <multigpu/distributed.hpp>

#include <torch/torch.h>

#if !MULTIGPU_WITH_CUDA || !MULTIGPU_WITH_NCCL
#error "this check is meant to be compiled with the CUDA and NCCL paths on"
#endif

namespace {
struct Net : torch::nn::Module {
  Net() { fc = register_module("fc", torch::nn::Linear(4, 2)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc{nullptr};
};
}  // namespace

void instantiate_the_cuda_paths() {
  multigpu::DeviceManager devices;
  auto chosen = devices.select("auto");
  multigpu::DataParallel<Net> dp(std::make_shared<Net>(), chosen);
  dp.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.1));
  dp.train_step(torch::randn({8, 4}), [](Net& net, const torch::Tensor& x) { return net.forward(x).sum(); });
  multigpu::NcclCommunicator nccl({multigpu::ReplicaContext(c10::Device("cuda:0"))});
  nccl.all_reduce({torch::ones({4})}, multigpu::ReduceOp::kAverage);
  nccl.wait(std::chrono::seconds(1));
  std::lock_guard<std::mutex> lock(multigpu::detail::cuda_free_mutex());
}

void instantiate_the_multi_process_nccl_path() {
  multigpu::NcclWorld world;
  multigpu::NcclCommunicator across({multigpu::ReplicaContext(c10::Device("cuda:0"))}, world);
  auto group = multigpu::ProcessGroup::from_environment();
  auto comm = group->make_communicator({multigpu::ReplicaContext(c10::Device("cuda:0"))});
  comm->all_reduce({torch::ones({4})}, multigpu::ReduceOp::kAverage);
}
