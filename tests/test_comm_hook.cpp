// Communication hooks: bf16 and fp16 compressed gradient sync on CPU replicas.

#include "support.hpp"  // first: see its comment

#include "small_net.hpp"

#include <memory>
#include <string>
#include <vector>

using multigpu::DataParallel;
using multigpu::DataParallelOptions;
using multigpu_test::contains;

namespace {

using namespace multigpu_test::small_net;

}  // namespace

TEST_SUITE("communication hooks") {
  TEST_CASE("bf16 and fp16 buckets give the fp32 average within the format's precision, the same on every replica") {
    for (const auto& hook : {multigpu::bf16_compress_hook(), multigpu::fp16_compress_hook()}) {
      CAPTURE(hook->name());
      const double rtol = hook->name() == "bf16_compress" ? 1e-2 : 2e-3;
      torch::manual_seed(4);
      Net plain_net;
      Net compressed_net;
      copy_parameters(*plain_net, *compressed_net);
      DataParallelOptions tiny;
      tiny.bucket_cap_mib = 0.0005;  // several buckets
      DataParallel<Net> plain(plain_net, cpus(3), tiny);
      DataParallelOptions options = tiny;
      options.comm_hook = hook;
      DataParallel<Net> compressed(compressed_net, cpus(3), options);
      REQUIRE(compressed.gradient_buckets()->size() > 1);
      torch::manual_seed(5);
      const torch::data::Example<> batch{torch::randn({12, 6}) * 3, torch::randn({12, 3})};
      plain.forward_backward(batch, mse);
      compressed.forward_backward(batch, mse);
      const auto expected = plain.module().parameters();
      for (std::size_t r = 0; r < compressed.size(); ++r) {
        const auto got = compressed.replica(r).parameters();
        for (std::size_t i = 0; i < got.size(); ++i) {
          const auto& want = expected[i].grad();
          CHECK(torch::allclose(got[i].grad(), want, rtol, rtol * want.abs().max().item<double>()));
          CHECK(torch::equal(got[i].grad(), compressed.module().parameters()[i].grad()));
          CHECK((got[i].grad().scalar_type() == torch::kFloat));
        }
      }
      // And it trains: the replicas stay identical.
      compressed.make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.05));
      compressed.zero_grad();
      const double first = compressed.train_step(batch, mse);
      double last = first;
      for (int step = 0; step < 30; ++step) last = compressed.train_step(batch, mse);
      CHECK(last < first);
      compressed.check_parity();
    }
  }

  TEST_CASE("values are divided before the cast: large fp16 gradients do not overflow") {
    std::vector<multigpu::ReplicaContext> replicas;
    for (int r = 0; r < 3; ++r) replicas.emplace_back(c10::Device("cpu"));
    multigpu::LocalCommunicator comm(replicas);
    std::vector<at::Tensor> buffers;
    for (int r = 0; r < 3; ++r) buffers.push_back(torch::full({5}, 60000.0 + 100.0 * r));  // the sum is above 65504
    multigpu::fp16_compress_hook()->all_reduce_average(comm, buffers);
    for (const auto& buffer : buffers) {
      CHECK((buffer.scalar_type() == torch::kFloat));
      CHECK(torch::allclose(buffer, torch::full({5}, 60100.0), 1e-3));
    }
  }

  TEST_CASE("a format that does not compress is refused, naming the valid ones") {
    const std::string message = MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::CompressedCommHook(torch::kDouble));
    CHECK(contains(message, "CompressedCommHook: Double is not a compressed format; use BFloat16 or Half"));
  }
}
