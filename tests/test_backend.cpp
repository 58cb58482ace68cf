// Choosing a backend (Note [Choosing a backend]): the pure decision as facts,
// for one process and for several, without devices or processes; and the
// table's factories on CPUs.

#include "support.hpp"  // first: see its comment

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

using multigpu_test::contains;

namespace {

std::vector<c10::Device> devices(std::initializer_list<const char*> names) {
  std::vector<c10::Device> result;
  for (const char* name : names) result.emplace_back(name);
  return result;
}

/// One process's facts, with or without NCCL compiled in.
multigpu::BackendFacts one_process(std::vector<c10::Device> devices, bool with_nccl, std::string requested = "auto") {
  multigpu::BackendFacts facts;
  facts.requested = std::move(requested);
  facts.devices = std::move(devices);
  facts.with_nccl = with_nccl;
  facts.with_distributed = false;
  return facts;
}

/// The facts of one of `processes` processes, as their vote agreed on them.
multigpu::BackendFacts several_processes(int processes, bool with_nccl, bool every_process_on_distinct_gpus,
                                         std::string shared_gpu = "", std::string requested = "auto") {
  multigpu::BackendFacts facts;
  facts.requested = std::move(requested);
  facts.devices = devices({"cuda:0"});
  facts.with_nccl = with_nccl;
  facts.with_distributed = true;
  facts.processes = processes;
  facts.every_process_on_distinct_gpus = every_process_on_distinct_gpus;
  facts.shared_gpu = std::move(shared_gpu);
  return facts;
}

std::string refusal(const multigpu::BackendFacts& facts) {
  return MULTIGPU_TEST_MESSAGE(multigpu::CommError, multigpu::choose_backend(facts));
}

/// Two processes that are one: every collective sees "the other" process
/// hold the same values as this one.
class MirroredProcesses : public multigpu::ProcessCollectives {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  void all_reduce_sum(const at::Tensor& tensor) override { tensor.mul_(2); }
  void broadcast(const at::Tensor&, int) override {}
  std::vector<std::string> all_gather_text(const std::string& value) override { return {value, value}; }
};

std::vector<multigpu::ReplicaContext> cpu_replicas(std::size_t n) {
  std::vector<multigpu::ReplicaContext> replicas;
  for (std::size_t i = 0; i < n; ++i) replicas.emplace_back(c10::Device("cpu"));
  return replicas;
}

}  // namespace

TEST_SUITE("choosing a backend") {
  TEST_CASE("one process: nccl for two or more distinct GPUs when compiled in, local otherwise, with the reason") {
    using multigpu::choose_backend;
    auto choice = choose_backend(one_process(devices({"cuda:0", "cuda:1"}), true));
    CHECK(choice.name == "nccl");
    CHECK(choice.reason == "2 replicas on distinct GPUs");
    CHECK_FALSE(choice.notable);

    choice = choose_backend(one_process(devices({"cuda:0", "cuda:1"}), false));
    CHECK(choice.name == "local");
    CHECK(contains(choice.reason, "this build has no NCCL"));
    CHECK(choice.notable);

    choice = choose_backend(one_process(devices({"cpu", "cpu", "cpu"}), true));
    CHECK(choice.name == "local");
    CHECK(choice.reason == "CPU replicas: reduced on the host");
    CHECK(choose_backend(one_process(devices({"cuda:0", "cuda:0"}), true)).reason ==
          "several replicas share a GPU, and NCCL refuses two ranks on one GPU");
    CHECK(choose_backend(one_process(devices({"cuda:0"}), true)).name == "local");
    CHECK(choose_backend(one_process(devices({"cuda:0", "cpu"}), true)).name == "local");
    CHECK(choose_backend(one_process({}, true)).name == "local");
    // By name: local always; nccl also for a single GPU.
    CHECK(choose_backend(one_process(devices({"cuda:0", "cuda:1"}), true, "local")).name == "local");
    CHECK(choose_backend(one_process(devices({"cuda:0"}), true, "nccl")).name == "nccl");
  }

  TEST_CASE("one process: a request that cannot be served says why and what is valid") {
    CHECK(refusal(one_process(devices({"cpu", "cpu"}), true, "mpi")) ==
          "backend \"mpi\" is unknown; valid: auto, local, nccl");
    CHECK(refusal(one_process(devices({"cuda:0", "cuda:1"}), false, "nccl")) ==
          "backend \"nccl\" was asked for, but this build has no NCCL (MULTIGPU_WITH_NCCL=0); use \"local\" or "
          "\"auto\"");
    CHECK(refusal(one_process(devices({"cpu", "cpu"}), true, "nccl")) ==
          "backend \"nccl\" needs GPU replicas; use \"local\" for CPU replicas");
    CHECK(refusal(one_process(devices({"cuda:0", "cuda:0"}), true, "nccl")) ==
          "backend \"nccl\" needs distinct GPUs (NCCL refuses two ranks on one GPU); use \"local\" for several "
          "replicas on one GPU");
    CHECK(refusal(one_process(devices({"cpu"}), true, "gloo")) ==
          "backend \"gloo\" serves several processes, and this job has 1 process(es); valid: auto, local, nccl");
  }

  TEST_CASE("the in-process overload agrees with the facts of this build") {
    const auto two_gpus = devices({"cuda:0", "cuda:1"});
    CHECK(multigpu::choose_backend(two_gpus, "auto") ==
          multigpu::choose_backend(one_process(two_gpus, MULTIGPU_WITH_NCCL != 0)).name);
    const auto facts = multigpu::BackendFacts::of_this_build(two_gpus, "auto");
    CHECK(facts.with_nccl == (MULTIGPU_WITH_NCCL != 0));
    CHECK(facts.with_distributed == (MULTIGPU_WITH_DISTRIBUTED != 0));
    CHECK(facts.processes == 1);
  }

  TEST_CASE("several processes: NCCL over every GPU when each replica of each process has its own") {
    const auto choice = multigpu::choose_backend(several_processes(4, true, true));
    CHECK(choice.name == "nccl");
    CHECK(contains(choice.reason, "one NCCL communicator over all"));
    CHECK_FALSE(choice.notable);
    // One GPU replica per process is enough (one process needs two).
    CHECK(multigpu::choose_backend(several_processes(2, true, true)).name == "nccl");
  }

  TEST_CASE("several processes: Gloo without NCCL, for CPU or shared replicas, and for a GPU two processes share") {
    auto choice = multigpu::choose_backend(several_processes(2, false, true));
    CHECK(choice.name == "gloo");
    CHECK(contains(choice.reason, "this build has no NCCL"));
    CHECK_FALSE(choice.notable);

    choice = multigpu::choose_backend(several_processes(2, true, false));
    CHECK(choice.name == "gloo");
    CHECK(contains(choice.reason, "not every process has its replicas on GPUs of their own"));
    CHECK_FALSE(choice.notable);

    // Several processes on a one-GPU machine: told, since one process per
    // GPU would get NCCL. The text is ProcessGroup's log line.
    choice = multigpu::choose_backend(several_processes(2, true, true, "node1/0000:01:00.0"));
    CHECK(choice.name == "gloo");
    CHECK(choice.reason == "the processes share the GPU node1/0000:01:00.0 and NCCL refuses two ranks on one GPU: "
                           "the gradients go through Gloo (slower; one process per GPU uses NCCL)");
    CHECK(choice.notable);
  }

  TEST_CASE("several processes: a request that cannot be served says why and what is valid") {
    CHECK(refusal(several_processes(2, true, true, "", "mpi")) == "backend \"mpi\" is unknown; valid: auto, gloo, nccl");
    CHECK(refusal(several_processes(2, true, true, "", "local")) ==
          "backend \"local\" serves one process, and this job has 2 process(es); valid: auto, gloo, nccl");
    CHECK(refusal(several_processes(2, false, true, "", "nccl")) ==
          "backend \"nccl\" was asked for, but this build has no NCCL (MULTIGPU_WITH_NCCL=0); use \"gloo\" or "
          "\"auto\"");
    CHECK(refusal(several_processes(2, true, false, "", "nccl")) ==
          "backend \"nccl\" needs every process's replicas on GPUs of their own; use \"gloo\" or \"auto\"");
    CHECK(contains(refusal(several_processes(2, true, true, "node1/0000:01:00.0", "nccl")),
                   "the processes share the GPU node1/0000:01:00.0 (NCCL refuses two ranks on one GPU)"));
    CHECK(multigpu::choose_backend(several_processes(2, true, true, "", "gloo")).name == "gloo");

    auto without_distributed = several_processes(2, false, false);
    without_distributed.with_distributed = false;
    CHECK(refusal(without_distributed) ==
          "no backend serves a job of 2 process(es): nccl: backend \"nccl\" was asked for, but this build has no "
          "NCCL (MULTIGPU_WITH_NCCL=0); use \"gloo\" or \"auto\"; gloo: backend \"gloo\" needs multi-process "
          "support, and this build has none (MULTIGPU_WITH_DISTRIBUTED=0)");
  }

  TEST_CASE("the table: one entry per name, and auto always finds a backend for a job of this build") {
    const auto& table = multigpu::backend_table();
    std::vector<std::string> names;
    for (const auto& entry : table) {
      CAPTURE(entry.name);
      CHECK(std::find(names.begin(), names.end(), entry.name) == names.end());
      names.emplace_back(entry.name);
      const bool complete = entry.serves != nullptr && entry.make != nullptr;
      CHECK(complete);
    }
    for (const bool nccl : {false, true}) {
      for (const auto& job : {devices({}), devices({"cpu"}), devices({"cuda:0", "cuda:0"}), devices({"cuda:0", "cuda:1"})}) {
        CHECK_NOTHROW(multigpu::choose_backend(one_process(job, nccl)));
      }
      for (const bool distinct : {false, true}) {
        CHECK_NOTHROW(multigpu::choose_backend(several_processes(3, nccl, distinct)));
        CHECK_NOTHROW(multigpu::choose_backend(several_processes(3, nccl, distinct, "h/gpu0")));
      }
    }
  }

  TEST_CASE("the factories make what was chosen") {
    multigpu::CommunicatorRequest request;
    request.replicas = cpu_replicas(2);
    CHECK(multigpu::make_communicator(multigpu::BackendChoice{"local", "", false}, request)->name() == "local");
    CHECK(multigpu::make_communicator(request.replicas)->name() == "local");
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::CommError,
                                multigpu::make_communicator(multigpu::BackendChoice{"mpi", "", false}, request)) ==
          "backend \"mpi\" is unknown; valid: auto, local, nccl");
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::CommError, multigpu::make_communicator(
                                                                  multigpu::BackendChoice{"gloo", "", false}, request)),
                   "backend \"gloo\" needs the other processes"));

    // gloo over processes that only need ProcessCollectives: 2 local replicas
    // here, and 2 more in the mirrored process.
    request.processes = std::make_shared<MirroredProcesses>();
    auto comm = multigpu::make_communicator(multigpu::BackendChoice{"gloo", "", false}, request);
    CHECK(comm->name() == "local+gloo");
    CHECK(comm->size() == 2);
    CHECK(comm->world_size() == 4);
    std::vector<at::Tensor> tensors = {torch::full({3}, 1.0), torch::full({3}, 3.0)};
    comm->all_reduce(tensors, multigpu::ReduceOp::kAverage);
    CHECK(torch::equal(tensors[0], torch::full({3}, 2.0)));
    CHECK(torch::equal(tensors[1], torch::full({3}, 2.0)));
  }
}
