// The collective trace (multigpu/collective_trace.hpp): the ring, the
// purposes, the dumps, and the comparison of the processes' summaries that
// a failed collective's error quotes. Across real processes:
// test_distributed.cpp.

#include "support.hpp"  // first: see its comment

#include <chrono>
#include <csignal>
#include <functional>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include "multigpu/collective_trace.hpp"
#include "multigpu/distributed.hpp"

#include "distributed/recipe.hpp"

using multigpu::CollectivePurpose;
using multigpu::CollectiveTrace;
using multigpu_test::contains;

namespace {

/// `count` all-reduces of gradient buckets 0.. of 4 MiB of float, then a broadcast of buffers.
void issue_step(CollectiveTrace& trace, int buckets) {
  for (int b = 0; b < buckets; ++b) {
    const CollectivePurpose purpose("gradient bucket", b);
    trace.finish(trace.start("all_reduce", 4 << 20, "float"), true);
  }
  const CollectivePurpose purpose("buffers");
  trace.finish(trace.start("broadcast", 64, "float"), true);
}

/// The error of a DataParallel over 2 CPU replicas whose exchange_text
/// stands for a second process: the fingerprints differ, and that
/// process's description is this one's, changed by `edit`. "" when none.
std::string model_check_error(const std::function<std::string(std::string)>& edit) {
  multigpu::DataParallelOptions options;
  int calls = 0;
  options.exchange_text = [&](const std::string& mine) -> std::vector<std::string> {
    ++calls;
    if (calls == 1) return {mine, mine + " on another process"};
    return {mine, edit(mine)};
  };
  try {
    multigpu::DataParallel<multigpu_test::RecipeNet> dp(multigpu_test::recipe_model(1),
                                                        std::vector<c10::Device>(2, c10::Device("cpu")), options);
  } catch (const multigpu::DistributedError& e) {
    return e.what();
  }
  return "";
}

/// `text` with the first `from` replaced by `to`.
std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

}  // namespace

// See Note [Checking the model across processes]; with real processes: test_distributed.cpp.
TEST_SUITE("collective trace") {
  TEST_CASE("model check: a parameter of another shape, a missing or extra one, another option, each named") {
    CHECK(model_check_error([](std::string d) { return replaced(d, "fc1.bias Float[16]", "fc1.bias Float[17]"); }) ==
          "DataParallel: the processes built different models or options (found at construction, before any step): "
          "rank 1's parameter fc1.bias Float[17], rank 0's parameter fc1.bias Float[16]; every process must build the "
          "same model (parameters and buffers in the same order, with the same shapes and dtypes) with the same "
          "DataParallelOptions");
    CHECK(contains(model_check_error([](std::string d) { return replaced(d, "parameter fc2.bias Float[2]\n", ""); }),
                   "rank 0's parameter fc2.bias Float[2] is not in rank 1's model (rank 1 has 3 parameters and "
                   "buffers, rank 0 4);"));
    CHECK(contains(model_check_error([](std::string d) {
                     return replaced(d, "parameter fc2.bias Float[2]\n", "parameter fc2.bias Float[2]\nbuffer n Long[]\n");
                   }),
                   "rank 1's buffer n Long[] is not in rank 0's model (rank 1 has 5 parameters and buffers, rank 0 4);"));
    CHECK(contains(model_check_error([](std::string d) { return replaced(d, "comm_hook none", "comm_hook bf16"); }),
                   "rank 1's setting DataParallelOptions::comm_hook bf16, rank 0's setting "
                   "DataParallelOptions::comm_hook none;"));
    // Fingerprints that differ (another build's hash) over the same descriptions: no error.
    CHECK(model_check_error([](std::string d) { return d; }).empty());
  }

  TEST_CASE("records what was issued, with the purpose of the issuing thread, and keeps the last N") {
    CollectiveTrace trace(5);
    issue_step(trace, 3);  // #0..#3
    {
      const CollectivePurpose purpose("scaler flag");
      trace.start("all_reduce", 4, "float");  // #4, still running
    }
    trace.finish(trace.start("barrier", 0, "-"), true);  // #5, no purpose: the guard ended
    CHECK(trace.issued() == 6);
    const auto records = trace.records();
    REQUIRE(records.size() == 5);  // #1..#5
    CHECK(records.front().sequence == 1);
    CHECK(records[0].describe() == "all_reduce #1 (gradient bucket 1, 4.0 MiB float)");
    CHECK(records[2].describe() == "broadcast #3 (buffers, 64 B float)");
    CHECK(records[3].state == multigpu::CollectiveState::kStarted);
    CHECK(records[4].describe() == "barrier #5 (0 B -)");
    CHECK(trace.records(2).front().sequence == 4);
    const std::string text = trace.text();
    CHECK(contains(text, "all_reduce #4 (scaler flag, 4 B float) started at "));
    CHECK(contains(text, "broadcast #3 (buffers, 64 B float) done at "));
    const auto json = nlohmann::json::parse(trace.json());
    REQUIRE(json.size() == 5);
    CHECK(json[3]["purpose"] == "scaler flag");
    CHECK(json[3]["state"] == "started");
    CHECK(json[3]["ended_us"] == -1);
    CHECK(json[0]["bytes"] == 4 << 20);
  }

  TEST_CASE("a trace of size 0 counts but keeps nothing, and a purpose longer than a record is cut") {
    CollectiveTrace off(0);
    issue_step(off, 2);
    CHECK(off.issued() == 3);
    CHECK(off.records().empty());
    CHECK(off.json() == "[]");
    CollectiveTrace trace(4);
    const std::string long_name(200, 'x');
    const CollectivePurpose purpose("sync-bn", -1, long_name.c_str());
    trace.start("all_reduce", 8, "double");
    CHECK(std::string(trace.records()[0].purpose).size() == sizeof(multigpu::CollectiveRecord{}.purpose) - 1);
  }

  TEST_CASE("purposes are per thread and nest") {
    CollectiveTrace trace(8);
    const CollectivePurpose outer("save_state");
    std::thread other([&] {
      const CollectivePurpose inner("gradient bucket", 0);
      trace.start("all_reduce", 4, "float");
    });
    other.join();
    {
      const CollectivePurpose inner("step agreement");
      trace.start("all_reduce", 4, "int");
    }
    trace.start("all_reduce", 8, "double");
    const auto records = trace.records();
    CHECK(std::string(records[0].purpose) == "gradient bucket 0");
    CHECK(std::string(records[1].purpose) == "step agreement");
    CHECK(std::string(records[2].purpose) == "save_state");
  }

  TEST_CASE("summaries: a rank that skipped a step differs at its first missing collective") {
    CollectiveTrace zero(100);
    CollectiveTrace one(100);
    issue_step(zero, 2);
    issue_step(one, 2);
    issue_step(zero, 2);  // rank 1 skipped this step
    {
      const CollectivePurpose purpose("gradient bucket", 0);
      zero.start("all_reduce", 4 << 20, "float");  // #6, waits
    }
    one.start("barrier", 0, "-");  // #3 on rank 1, waits
    const std::string found = CollectiveTrace::first_difference({zero.summary(), one.summary()});
    CHECK(found == "the processes' collectives first differ at #3: rank 0 finished all_reduce #3 (gradient bucket 0, "
                   "4.0 MiB float); rank 1 waits in barrier #3 (0 B -)");
  }

  TEST_CASE("summaries: another bucket size, a rank behind, a rank that did not answer") {
    CollectiveTrace zero(100);
    CollectiveTrace one(100);
    issue_step(zero, 1);
    issue_step(one, 1);
    {
      const CollectivePurpose purpose("gradient bucket", 0);
      zero.start("all_reduce", 1024, "float");
      one.start("all_reduce", 2048, "float");
    }
    CHECK(CollectiveTrace::first_difference({zero.summary(), one.summary()}) ==
          "the processes' collectives first differ at #2: rank 0 waits in all_reduce #2 (gradient bucket 0, 1.0 KiB "
          "float); rank 1 waits in all_reduce #2 (gradient bucket 0, 2.0 KiB float)");
    CollectiveTrace behind(100);
    issue_step(behind, 1);
    CHECK(CollectiveTrace::first_difference({zero.summary(), behind.summary()}) ==
          "the processes' collectives first differ at #2: rank 0 waits in all_reduce #2 (gradient bucket 0, 1.0 KiB "
          "float); rank 1 issued no collective #2: its last is broadcast #1 (buffers, 64 B float) (done)");
    CHECK(CollectiveTrace::first_difference({zero.summary(), ""}) ==
          "the answering processes' traces agree up to #2: rank 0 waits in all_reduce #2 (gradient bucket 0, 1.0 KiB "
          "float); rank 1 did not answer with a trace (gone or stuck)");
    // Texts exchanged through the store differ in length and still pair.
    CollectiveTrace a(4);
    CollectiveTrace b(4);
    a.finish(a.start("all_gather", 10, "text"), true);
    b.finish(b.start("all_gather", 12, "text"), true);
    CHECK(contains(CollectiveTrace::first_difference({a.summary(), b.summary()}), "traces agree up to #0"));
  }

  TEST_CASE("summaries: ranks further apart than a summary holds differ where the one behind stopped") {
    // A summary keeps 32 records: rank 0's are #8..#39, rank 1's #68..#99.
    CollectiveTrace zero(100);
    CollectiveTrace one(100);
    for (int k = 0; k < 20; ++k) issue_step(zero, 1);
    for (int k = 0; k < 50; ++k) issue_step(one, 1);
    CHECK(CollectiveTrace::first_difference({zero.summary(), one.summary()}) ==
          "the processes' collectives first differ at #40: rank 0 issued no collective #40: its last is broadcast #39 "
          "(buffers, 64 B float) (done); rank 1's record of #40 is no longer kept");
  }

  TEST_CASE("a summary reads back as it was written") {
    CollectiveTrace trace(100);
    for (int k = 0; k < 50; ++k) issue_step(trace, 1);
    std::int64_t issued = 0;
    const auto records = CollectiveTrace::parse_summary(trace.summary(), &issued);
    CHECK(issued == 100);
    REQUIRE(records.size() == CollectiveTrace::kSummaryRecords);
    CHECK(records.back().describe() == "broadcast #99 (buffers, 64 B float)");
    CHECK(records.back().same_call(trace.records().back()));
  }

  TEST_CASE("dump_trace_on_signal: SIGUSR2 writes the trace to the given descriptor, once set up, and no more after") {
    int pipe_fds[2];
    REQUIRE(::pipe(pipe_fds) == 0);
    {
      auto group = multigpu::ProcessGroup::create(multigpu::DistributedEnv{});
      group->dump_trace_on_signal(SIGUSR2, pipe_fds[1]);
      CHECK(MULTIGPU_TEST_MESSAGE(multigpu::DistributedError, group->dump_trace_on_signal()) ==
            "dump_trace_on_signal: this process group dumps on a signal already");
      REQUIRE(std::raise(SIGUSR2) == 0);
      std::string text;
      char buffer[256];
      while (text.find("kept):\n") == std::string::npos) {
        const ssize_t n = ::read(pipe_fds[0], buffer, sizeof(buffer));
        REQUIRE(n > 0);
        text.append(buffer, static_cast<std::size_t>(n));
      }
      CHECK(text == "multigpu: rank 0's collective trace (0 issued, the last 2000 kept):\n");
    }
    // The group ended: its handler is gone, the signal's former disposition is back.
    struct sigaction now {};
    REQUIRE(::sigaction(SIGUSR2, nullptr, &now) == 0);
    const bool default_disposition = now.sa_handler == SIG_DFL;
    CHECK(default_disposition);
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
  }

  TEST_CASE("dump_trace_on_signal: a flood of signals while the dump waits never blocks the handler") {
    // In a child, which the test kills if it hangs: the dump goes to a pipe
    // nobody reads yet, so the dumping thread soon waits, and the requests
    // pile up in the handler's pipe until it is full; a handler that then
    // blocked would never return from raise (Note [The collective trace], 4).
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      int out[2];
      if (::pipe(out) != 0) ::_exit(3);
      {
        auto group = multigpu::ProcessGroup::create(multigpu::DistributedEnv{});
        group->dump_trace_on_signal(SIGUSR2, out[1]);
        for (int k = 0; k < 100000; ++k) std::raise(SIGUSR2);
        std::thread drain([&] {
          char buffer[4096];
          while (::read(out[0], buffer, sizeof(buffer)) > 0) {
          }
        });
        group.reset();  // ends the dumping thread after the requests it still holds
        ::close(out[1]);
        drain.join();
      }
      ::_exit(0);
    }
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (::waitpid(child, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(child, SIGKILL);
        ::waitpid(child, &status, 0);
        FAIL("the child still raised SIGUSR2 after 30 s: the signal handler blocked");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
}
