// Workers, scatter/gather and the local communicator.

#include "support.hpp"  // first: see its comment

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using multigpu_test::contains;

namespace {
std::vector<c10::Device> cpus(std::size_t n) { return std::vector<c10::Device>(n, c10::Device("cpu")); }

/// A user batch type with its own traits.
struct Pair3 {
  torch::Tensor images;
  std::vector<std::string> captions;
};
}  // namespace

template <>
struct multigpu::BatchTraits<Pair3> {
  static std::int64_t size(const Pair3& b) {
    return multigpu::detail::agree_on_size(
        {b.images.size(0), static_cast<std::int64_t>(b.captions.size())}, "Pair3");
  }
  static Pair3 slice(const Pair3& b, std::int64_t begin, std::int64_t end) {
    return {b.images.narrow(0, begin, end - begin),
            std::vector<std::string>(b.captions.begin() + begin, b.captions.begin() + end)};
  }
  static Pair3 to(const Pair3& b, const c10::Device& device) { return {b.images.to(device), b.captions}; }
};

TEST_SUITE("workers") {
  TEST_CASE("every replica runs its job once, replica 0 on the calling thread, the others in parallel") {
    multigpu::ReplicaWorkers workers(cpus(4));
    std::vector<std::thread::id> threads(4);
    std::atomic<int> inside{0};
    std::atomic<int> most_inside{0};
    workers.run(
        [&](std::size_t r) {
          threads[r] = std::this_thread::get_id();
          const int now = ++inside;
          int seen = most_inside.load();
          while (now > seen && !most_inside.compare_exchange_weak(seen, now)) {
          }
          // Wait (bounded) for the others, so the test shows real concurrency.
          for (int spin = 0; spin < 2000 && inside.load() < 4; ++spin) {
            std::this_thread::sleep_for(std::chrono::microseconds(500));
          }
          --inside;
        },
        "test");
    CHECK(threads[0] == std::this_thread::get_id());
    for (std::size_t r = 1; r < 4; ++r) CHECK(threads[r] != threads[0]);
    CHECK(most_inside.load() == 4);
    // Persistent: the same threads serve the next job.
    std::vector<std::thread::id> again(4);
    workers.run([&](std::size_t r) { again[r] = std::this_thread::get_id(); }, "test");
    CHECK(again == threads);
  }

  TEST_CASE("the caller's grad mode and inference mode reach the workers") {
    multigpu::ReplicaWorkers workers(cpus(3));
    std::vector<int> grad(3, -1);
    {
      const torch::NoGradGuard no_grad;
      workers.run([&](std::size_t r) { grad[r] = at::GradMode::is_enabled() ? 1 : 0; }, "test");
    }
    CHECK(grad == std::vector<int>{0, 0, 0});
    workers.run([&](std::size_t r) { grad[r] = at::GradMode::is_enabled() ? 1 : 0; }, "test");
    CHECK(grad == std::vector<int>{1, 1, 1});
    std::vector<int> inference(3, -1);
    {
      const c10::InferenceMode guard;
      workers.run([&](std::size_t r) { inference[r] = c10::InferenceMode::is_enabled() ? 1 : 0; }, "test");
    }
    CHECK(inference == std::vector<int>{1, 1, 1});
  }

  TEST_CASE("failures are reported after every replica finished, lowest replica first, others listed") {
    multigpu::ReplicaWorkers workers(cpus(4));
    std::atomic<int> finished{0};
    try {
      workers.run(
          [&](std::size_t r) {
            if (r == 3) throw std::runtime_error("three is broken");
            if (r == 1) throw std::runtime_error("one is broken");
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            ++finished;
          },
          "the test job");
      FAIL("no exception");
    } catch (const multigpu::ReplicaError& e) {
      CHECK(e.replica() == 1);
      CHECK(e.device() == "cpu");
      CHECK(std::string(e.what()) ==
            "replica 1 of 4 (cpu) failed in the test job: one is broken; replica 3 (cpu) failed too, in the test "
            "job: three is broken");
      REQUIRE(e.cause() != nullptr);
      CHECK_THROWS_WITH_AS(std::rethrow_exception(e.cause()), "one is broken", std::runtime_error);
    }
    CHECK(finished.load() == 2);
    int ran = 0;
    workers.run([&](std::size_t) { ++ran; }, "test", {true, false, false, false});
    CHECK(ran == 1);
  }

  TEST_CASE("LibTorch errors are shown without their C++ backtrace") {
    multigpu::ReplicaWorkers workers(cpus(2));
    const std::string message = MULTIGPU_TEST_MESSAGE(
        multigpu::ReplicaError,
        workers.run([&](std::size_t r) { if (r == 1) (void)torch::ones({2}).view({3}); }, "test"));
    CHECK(contains(message, "replica 1 of 2 (cpu) failed in test: shape '[3]' is invalid"));
    CHECK_FALSE(contains(message, "frame #"));
  }
}

TEST_SUITE("scatter") {
  TEST_CASE("tensors split along dim 0, remainders to the first shards, empty shards allowed") {
    const auto batch = torch::arange(10).view({10, 1});
    const auto shards = multigpu::split_shards(batch, multigpu::split_batch(10, 4));
    REQUIRE(shards.size() == 4);
    CHECK(shards[0].size(0) == 3);
    CHECK(shards[3].size(0) == 2);
    CHECK(shards[1][0].item<int64_t>() == 3);
    const auto small = multigpu::split_shards(torch::ones({2, 3}), multigpu::split_batch(2, 4));
    CHECK(small[2].size(0) == 0);
    CHECK(small[2].size(1) == 3);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::split_shards(batch, {4, 4})),
                   "shard sizes add up to 8, but the batch has 10 samples"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::batch_size(torch::tensor(3.0))),
                   "batch tensor is a scalar"));
  }

  TEST_CASE("examples, lists, tuples, pairs and user types") {
    const torch::data::Example<> example(torch::randn({5, 2}), torch::arange(5));
    const auto parts = multigpu::split_shards(example, {3, 2});
    CHECK(parts[1].target[0].item<int64_t>() == 3);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error,
                                         multigpu::batch_size(torch::data::Example<>(torch::ones({4}),
                                                                                     torch::ones({3})))),
                   "disagree on the number of samples (4, 3)"));

    const torch::data::TensorExample unlabeled(torch::ones({6, 2}));
    CHECK(multigpu::batch_size(unlabeled) == 6);
    CHECK(multigpu::split_shards(unlabeled, {1, 5})[1].data.size(0) == 5);

    std::vector<torch::data::Example<>> samples;
    for (int i = 0; i < 7; ++i) samples.emplace_back(torch::full({2}, i), torch::tensor(i));
    const auto lists = multigpu::split_shards(samples, multigpu::split_batch(7, 3));
    CHECK(lists[0].size() == 3);
    CHECK(lists[2].back().target.item<int64_t>() == 6);

    const auto tuple = std::make_tuple(torch::ones({4, 2}), torch::zeros({4}), std::vector<int>{1, 2, 3, 4});
    const auto tuples = multigpu::split_shards(tuple, {2, 2});
    CHECK(std::get<2>(tuples[1]) == std::vector<int>{3, 4});

    const Pair3 mine{torch::ones({3, 8}), {"a", "b", "c"}};
    const auto mines = multigpu::split_shards(mine, {1, 2});
    CHECK(mines[1].captions == std::vector<std::string>{"b", "c"});
    CHECK(multigpu::shard_to(mines[1], c10::Device("cpu")).images.size(0) == 2);
  }

  TEST_CASE("gather joins outputs in replica order") {
    const auto joined = multigpu::gather_outputs(std::vector<torch::Tensor>{torch::zeros({2, 3}), torch::ones({1, 3})},
                                                 c10::Device("cpu"));
    CHECK(joined.size(0) == 3);
    CHECK(joined[2][0].item<float>() == 1.0f);
    const auto tuples = multigpu::gather_outputs(
        std::vector<std::tuple<torch::Tensor, torch::Tensor>>{{torch::ones({1}), torch::zeros({1, 2})},
                                                             {torch::ones({2}), torch::zeros({2, 2})}},
        c10::Device("cpu"));
    CHECK(std::get<0>(tuples).size(0) == 3);
    CHECK(std::get<1>(tuples).size(0) == 3);
  }
}

TEST_SUITE("local communicator") {
  namespace {
  std::vector<multigpu::ReplicaContext> cpu_contexts(std::size_t n) {
    std::vector<multigpu::ReplicaContext> contexts;
    for (std::size_t i = 0; i < n; ++i) contexts.emplace_back(c10::Device("cpu"));
    return contexts;
  }
  }  // namespace

  TEST_CASE("all-reduce sums and averages in place, for every dtype and size, identical on every replica") {
    for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kLong, torch::kHalf}) {
      for (const std::int64_t numel : {std::int64_t{1}, std::int64_t{4095}, std::int64_t{4097}, std::int64_t{100000}}) {
        for (const std::size_t k : {std::size_t{2}, std::size_t{3}, std::size_t{5}}) {
          CAPTURE(dtype);
          CAPTURE(numel);
          CAPTURE(k);
          multigpu::LocalCommunicator comm(cpu_contexts(k));
          std::vector<torch::Tensor> tensors;
          auto expected = torch::zeros({numel}, torch::kDouble);
          for (std::size_t r = 0; r < k; ++r) {
            auto values = torch::arange(numel, torch::kDouble).remainder(7).add(static_cast<double>(r));
            expected += values;
            tensors.push_back(values.to(dtype));
          }
          comm.all_reduce(tensors, multigpu::ReduceOp::kSum);
          for (std::size_t r = 0; r < k; ++r) {
            CHECK(torch::equal(tensors[r], tensors[0]));
          }
          CHECK(torch::allclose(tensors[0].to(torch::kDouble), expected));
          if (dtype == torch::kFloat || dtype == torch::kDouble) {
            comm.all_reduce(tensors, multigpu::ReduceOp::kAverage);  // average of equal values: unchanged
            CHECK(torch::allclose(tensors[k - 1].to(torch::kDouble), expected));
          }
        }
      }
    }
  }

  TEST_CASE("broadcast copies the root to every replica") {
    multigpu::LocalCommunicator comm(cpu_contexts(3));
    std::vector<torch::Tensor> tensors{torch::zeros({5}), torch::arange(5).to(torch::kFloat), torch::ones({5})};
    comm.broadcast(tensors, 1);
    CHECK(torch::equal(tensors[0], tensors[1]));
    CHECK(torch::equal(tensors[2], tensors[1]));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError, comm.broadcast(tensors, 3)), "root 3 is not a replica"));
  }

  TEST_CASE("mismatched tensors are refused with what is wrong") {
    multigpu::LocalCommunicator comm(cpu_contexts(2));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError,
                                         comm.all_reduce({torch::ones({3}), torch::ones({4})}, multigpu::ReduceOp::kSum)),
                   "replica 1's tensor is Float[4], replica 0's Float[3]"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError, comm.all_reduce({torch::ones({3})}, multigpu::ReduceOp::kSum)),
                   "1 tensors for 2 replicas"));
  }

  TEST_CASE("choosing a backend") {
    using multigpu::choose_backend;
    CHECK(choose_backend(cpus(3), "auto") == "local");
    CHECK(choose_backend({c10::Device("cuda:0"), c10::Device("cuda:0")}, "auto") == "local");
    CHECK(choose_backend({c10::Device("cuda:0"), c10::Device("cuda:1")}, "auto") ==
          (MULTIGPU_WITH_NCCL ? "nccl" : "local"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError, choose_backend(cpus(2), "mpi")),
                   "backend \"mpi\" is unknown; valid: auto, local, nccl"));
#if !MULTIGPU_WITH_NCCL
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError, choose_backend(cpus(2), "nccl")), "no NCCL"));
#else
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError,
                                         choose_backend({c10::Device("cuda:0"), c10::Device("cuda:0")}, "nccl")),
                   "NCCL refuses two ranks on one GPU"));
#endif
  }
}
