// What programs found in a header before the floor plan of issue 23 moved it
// is still found there. This file includes only those headers (not
// support.hpp, which brings in the umbrella), so a header that stops
// providing a name fails to compile here.
#include <vector>

#include <doctest/doctest.h>
#include <torch/torch.h>

#include "multigpu/comm.hpp"    // LocalCommunicator moved to local/communicator.hpp
#include "multigpu/device.hpp"  // split_batch, plan_batch moved to batch_plan.hpp

TEST_CASE("old include paths: comm.hpp still gives LocalCommunicator, device.hpp still gives batch planning") {
  multigpu::LocalCommunicator comm({multigpu::ReplicaContext(torch::kCPU), multigpu::ReplicaContext(torch::kCPU)});
  std::vector<at::Tensor> tensors = {torch::full({2}, 1.0), torch::full({2}, 3.0)};
  comm.all_reduce(tensors, multigpu::ReduceOp::kAverage);
  CHECK(tensors[1].equal(torch::full({2}, 2.0)));
  CHECK((multigpu::split_batch(10, 4) == std::vector<std::int64_t>{3, 3, 2, 2}));
  CHECK(multigpu::plan_batch(16, 4, 2).accumulation_steps == 2);
}
