// The scheduler and GPU memory, on scripted GPUs (FakeRuntime) with real
// processes: each task's peak memory over its process tree, packing tasks by
// memory, GPUs promised to tasks across runs, and retrying a task that ran
// out of memory where it will have more. Also NVML's process list, the
// process tree and size texts.

#include "support.hpp"  // first: see its comment

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "multigpu/scheduler.hpp"
#include "multigpu/testing/fake_runtime.hpp"
#include "scheduler_support.hpp"


namespace {

/// Stands in for the GPU driver: a task "allocates" by writing MiB into
/// USES/<nvidia-smi number>.<pid> (`echo 3000 > $USES/$CUDA_VISIBLE_DEVICES.$$`);
/// while that process lives, the scripted GPU lists it with that memory.
class FakeDriver {
 public:
  FakeDriver(FakeRuntime machine, std::string uses) : machine_(std::move(machine)), uses_(std::move(uses)) {
    std::filesystem::create_directories(uses_);
    thread_ = std::thread([this] {
      while (!stop_) {
        scan();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  ~FakeDriver() {
    stop_ = true;
    thread_.join();
  }
  FakeDriver(const FakeDriver&) = delete;
  FakeDriver& operator=(const FakeDriver&) = delete;

 private:
  void scan() {
    std::error_code error;
    for (std::filesystem::directory_iterator it(uses_, error), end; !error && it != end; it.increment(error)) {
      const std::string name = it->path().filename().string();
      const auto dot = name.find('.');
      if (dot == std::string::npos) continue;
      const int gpu = std::stoi(name.substr(0, dot));
      const long pid = std::stol(name.substr(dot + 1));
      std::ifstream file(it->path());
      std::int64_t mib = -2;
      if (!(file >> mib)) continue;  // being written
      if (::kill(static_cast<pid_t>(pid), 0) == 0) {
        machine_.set_process_mib(gpu, pid, mib);
      } else {
        machine_.set_process_mib(gpu, pid, std::nullopt);  // the process is gone, and its memory with it
        std::filesystem::remove(it->path(), error);
      }
    }
  }

  FakeRuntime machine_;
  std::string uses_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

/// The most tasks that ran at once, from their start and duration.
int most_at_once(const RunSummary& summary) {
  int most = 0;
  for (const auto& a : summary.tasks) {
    int together = 0;
    for (const auto& b : summary.tasks) {
      const auto b_end = b.start + std::chrono::milliseconds(static_cast<long>(b.seconds * 1000));
      if (b.start <= a.start && a.start < b_end) ++together;
    }
    most = std::max(most, together);
  }
  return most;
}

/// Fast options for one scripted GPU, packing tasks by memory (as `--max-per-gpu auto`).
SchedulerOptions packing_options(const std::string& dir) {
  auto options = fast_options(dir, "0");
  options.pack_by_memory = true;
  options.max_per_device = 64;
  return options;
}

double seconds_between(std::chrono::system_clock::time_point from, std::chrono::system_clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

TEST_SUITE("scheduler GPU memory") {
  TEST_CASE("each task's peak GPU memory is measured over its process tree, with its GPU-seconds") {
    const std::string dir = fresh_dir("peak");
    auto machine = FakeRuntime::with_gpus(2);
    machine.set_process_mib(0, static_cast<long>(::getpid()), 1000);  // someone else's process: not a task's
    const std::string uses = dir + "/uses";
    FakeDriver driver(machine, uses);
    auto options = fast_options(dir, "0,1");
    options.memory_threshold_mib = 2000;
    FakeScheduler scheduler(options, machine);
    const auto use = [&](int mib) { return fmt::format("echo {} > {}/$CUDA_VISIBLE_DEVICES.$$", mib, uses); };
    const auto summary = scheduler.run({
        // A grandchild does the allocating: the whole tree counts.
        Task::shell("child", "sh -c '" + use(3000) + "; sleep 0.8'"),
        // Grows, then shrinks: the peak stays.
        Task::shell("grows", use(5000) + "; sleep 0.5; " + use(7000) + "; sleep 0.5; " +
                                 use(2000) + "; sleep 0.5"),
        Task::shell("none", "sleep 0.2"),
    });
    REQUIRE(summary.exit_code() == 0);
    CHECK(result_of(summary, "child").peak_gpu_bytes == std::int64_t{3000} << 20);
    CHECK(result_of(summary, "grows").peak_gpu_bytes == std::int64_t{7000} << 20);
    CHECK(result_of(summary, "none").peak_gpu_bytes == -1);  // never on its GPU: not measured
    for (const auto& r : summary.tasks) {
      CHECK(r.gpu_seconds == doctest::Approx(r.seconds).epsilon(0.001));
      CHECK(r.memory_note.empty());
    }
    const auto json = nlohmann::json::parse(read_file(summary.json_path));
    CHECK(json["tasks"][1]["peak_gpu_mib"] == 7000);
    CHECK(json["tasks"][2]["peak_gpu_mib"].is_null());
    const double gpu_seconds = json["tasks"][0]["gpu_seconds"];
    CHECK(gpu_seconds > 0.7);
    CHECK(contains(read_file(summary.csv_path), ",7000,"));
  }

  TEST_CASE("packing by memory: tasks share a GPU as far as their sizes and the margin fit") {
    const std::string dir = fresh_dir("pack");
    auto machine = FakeRuntime::with_gpus(1);  // 24564 MiB
    auto options = packing_options(dir);
    options.memory_margin_mib = 1024;
    FakeScheduler scheduler(options, machine);
    std::vector<Task> tasks;
    for (int i = 0; i < 4; ++i) {
      tasks.push_back(Task::shell(fmt::format("sized-{}", i), "sleep 0.4"));
      tasks.back().memory_mib = 8000;  // two fit with their margins (18048), three do not (27072)
    }
    Task huge = Task::shell("huge", "true");
    huge.memory_mib = 30000;
    tasks.push_back(huge);
    const auto summary = scheduler.run(tasks);
    CHECK(most_at_once(summary) == 2);
    for (int i = 0; i < 4; ++i) CHECK(result_of(summary, fmt::format("sized-{}", i)).status == TaskStatus::kDone);
    const auto& refused = result_of(summary, "huge");
    CHECK(refused.status == TaskStatus::kFailed);
    CHECK(refused.attempts == 0);
    CHECK(contains(refused.error, "not run: it needs 29.3 GiB (declared) and a margin of 1.0 GiB, but the largest GPU "
                                  "of the pool (cuda:0"));
  }

  TEST_CASE("packing by memory: a task of unknown size has its GPU to itself until a run has measured it") {
    const std::string dir = fresh_dir("measured");
    auto machine = FakeRuntime::with_gpus(1);
    const std::string uses = dir + "/uses";
    FakeDriver driver(machine, uses);
    auto options = packing_options(dir);
    const std::string command = "echo 3000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 0.8";
    const std::vector<Task> tasks = {Task::shell("a", command), Task::shell("b", command), Task::shell("c", command)};
    {
      FakeScheduler first(options, machine);
      const auto summary = first.run(tasks);
      REQUIRE(summary.exit_code() == 0);
      CHECK(most_at_once(summary) == 1);  // unknown sizes: one at a time
      CHECK(result_of(summary, "a").peak_gpu_bytes == std::int64_t{3000} << 20);
    }
    options.force = true;  // the same tasks again: now their sizes are known from the last summary
    FakeScheduler second(options, machine);
    const auto summary = second.run(tasks);
    REQUIRE(summary.exit_code() == 0);
    CHECK(most_at_once(summary) == 3);
  }

  TEST_CASE("packing by memory: a peak measured once is kept by the runs that skip the task") {
    const std::string dir = fresh_dir("carried");
    auto machine = FakeRuntime::with_gpus(1);
    const std::string uses = dir + "/uses";
    FakeDriver driver(machine, uses);
    auto options = packing_options(dir);
    std::vector<Task> tasks;
    for (const std::string name : {"a", "b"}) {
      tasks.push_back(Task::shell(name, "echo 3000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 0.8; touch " + dir +
                                            "/done-" + name,
                                  dir + "/done-" + name));
    }
    {
      FakeScheduler measuring(options, machine);
      CHECK(most_at_once(measuring.run(tasks)) == 1);  // sizes unknown: one at a time
    }
    {
      FakeScheduler skipping(options, machine);
      const auto skipped = skipping.run(tasks);
      CHECK(skipped.count(TaskStatus::kSkipped) == 2);
      const auto json = nlohmann::json::parse(read_file(skipped.json_path));
      CHECK(json["tasks"][0]["peak_gpu_mib"] == 3000);  // carried over, not lost
    }
    options.force = true;
    FakeScheduler packing(options, machine);
    CHECK(most_at_once(packing.run(tasks)) == 2);
  }

  TEST_CASE("packing by memory: waiting for room only others can free says so and counts towards the wait limit") {
    const std::string dir = fresh_dir("room_wait");
    auto machine = FakeRuntime::with_gpus(1);  // 24564 MiB
    machine.set_used_mib(0, 400);              // someone's small process: not "busy", but it takes room
    auto options = packing_options(dir);
    options.busy_wait_limit = std::chrono::milliseconds(300);
    FakeScheduler scheduler(options, machine);
    Task tight = Task::shell("tight", "true");
    tight.memory_mib = 23200;  // fits the GPU (24564 with the margin), not beside the 400 MiB
    CapturedLog log;
    const auto summary = scheduler.run({tight});
    const auto& result = result_of(summary, "tight");
    CHECK(result.status == TaskStatus::kFailed);
    CHECK(result.error == "no device became free within 0.3 s: room for 1.0 GiB more than 22.7 GiB (the most is "
                          "23.6 GiB on cuda:0 (physical 0, NVIDIA RTX A5000))");
    bool said = false;
    for (const auto& warning : log.warnings()) said = said || contains(warning, "task tight waits for room for");
    CHECK(said);
  }

  TEST_CASE("packing by memory: a task measured larger than any GPU can pack is run on a GPU of its own") {
    const std::string dir = fresh_dir("measured_large");
    auto machine = FakeRuntime::with_gpus(1);
    auto options = packing_options(dir);
    multigpu::detail::make_directories(options.log_dir);
    std::ofstream(options.log_dir + "/summary.json")
        << nlohmann::json{{"tasks", {{{"task", "large"}, {"peak_gpu_mib", 24000}}, {{"task", "small"}, {"peak_gpu_mib", 100}}}}};
    FakeScheduler scheduler(options, machine);
    const auto summary = scheduler.run({Task::shell("large", "sleep 0.3"), Task::shell("small", "sleep 0.3")});
    CHECK(result_of(summary, "large").status == TaskStatus::kDone);  // not refused: it was measured, not declared
    CHECK(most_at_once(summary) == 1);  // and nothing joined it
  }

  TEST_CASE("packing by memory needs GPUs, and a negative margin is refused") {
    const std::string dir = fresh_dir("pack_cpu");
    auto options = fast_options(dir, "cpu");
    options.pack_by_memory = true;
    CHECK_THROWS_WITH_AS(FakeScheduler(options, FakeRuntime::with_gpus(1)),
                         doctest::Contains("needs GPUs, but the pool is the CPU"), multigpu::SchedulerError);
    options.devices = "0";
    options.memory_margin_mib = -1;
    CHECK_THROWS_WITH_AS(FakeScheduler(options, FakeRuntime::with_gpus(1)), doctest::Contains("the memory margin must be 0 to 2^30 MiB, got -1"),
                         multigpu::SchedulerError);
  }

  TEST_CASE("a GPU promised to a task of one run is not given by another until the task appears or time runs out") {
    const std::string dir = fresh_dir("promise");
    auto machine = FakeRuntime::with_gpus(1);
    const std::string uses = dir + "/uses";
    FakeDriver driver(machine, uses);
    auto options = fast_options(dir, "0");
    options.reservation_timeout = std::chrono::seconds(30);
    auto other_options = options;
    other_options.log_dir = dir + "/other-logs";
    // The promise files of a task, in the folder both runs share.
    const auto promises_of = [&](const std::string& task) {
      std::error_code error;
      int count = 0;
      for (std::filesystem::directory_iterator it(options.reservation_dir, error), end; !error && it != end;
           it.increment(error)) {
        count += contains(it->path().filename().string(), "@" + task + ".json") ? 1 : 0;
      }
      return count;
    };

    SUBCASE("until the first task ends, when it never appears on the GPU") {
      FakeScheduler first(options, machine);
      RunSummary first_summary;
      std::thread first_run([&] { first_summary = first.run({Task::shell("slow-start", "sleep 1")}); });
      CHECK(eventually([&] { return promises_of("slow-start") == 1; }));
      FakeScheduler second(other_options, machine);
      CapturedLog log;
      const auto second_summary = second.run({Task::shell("second", "true")});
      first_run.join();
      const auto& slow = result_of(first_summary, "slow-start");
      const auto& waited = result_of(second_summary, "second");
      CHECK(seconds_between(slow.start, waited.start) >= 0.9);  // the task sleeps 1 s
      bool said = false;
      for (const auto& warning : log.warnings()) said = said || contains(warning, "promised to task slow-start of another run");
      CHECK(said);
    }
    SUBCASE("until its process appears there: then the promise is withdrawn, and its memory speaks for it") {
      FakeScheduler first(options, machine);
      std::atomic<bool> ended{false};
      RunSummary first_summary;
      std::thread first_run([&] {
        first_summary = first.run({Task::shell("appears", "sleep 0.4; echo 9000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 0.8")});
        ended = true;
      });
      CHECK(eventually([&] { return promises_of("appears") == 1; }));
      CHECK(eventually([&] { return promises_of("appears") == 0; }));
      CHECK_FALSE(ended.load());  // withdrawn while the task runs: it appeared
      FakeScheduler second(other_options, machine);
      const auto second_summary = second.run({Task::shell("second", "true")});
      first_run.join();
      CHECK(second_summary.exit_code() == 0);
      // 9000 MiB in use: the GPU was busy until the task ended.
      const auto& first_task = result_of(first_summary, "appears");
      // (The GPU is free the moment the task's process has gone, before its scheduler has seen it end.)
      CHECK(seconds_between(first_task.start, result_of(second_summary, "second").start) >= 1.1);
    }
    SUBCASE("a promise whose time ran out counts for nothing") {
      options.reservation_timeout = std::chrono::seconds(1);
      FakeScheduler first(options, machine);
      RunSummary first_summary;
      std::thread first_run([&] { first_summary = first.run({Task::shell("never-appears", "sleep 5")}); });
      CHECK(eventually([&] { return promises_of("never-appears") == 1; }));
      FakeScheduler second(other_options, machine);
      const auto second_summary = second.run({Task::shell("second", "true")});
      const auto second_end = std::chrono::system_clock::now();
      first_run.join();
      const auto& first_task = result_of(first_summary, "never-appears");
      CHECK(seconds_between(first_task.start, second_end) < first_task.seconds - 2.5);
    }
    SUBCASE("a promise folder that is a symbolic link is not used; a FIFO or junk in it is passed over") {
      std::filesystem::create_directories(dir + "/real");
      std::filesystem::create_directory_symlink("real", dir + "/link");
      options.reservation_dir = dir + "/link";
      CapturedLog log;
      FakeScheduler linked(options, machine);
      CHECK(linked.run({Task::shell("linked", "true")}).exit_code() == 0);
      bool said = false;
      for (const auto& warning : log.warnings()) said = said || contains(warning, "is not a folder (a symbolic link?)");
      CHECK(said);
      CHECK(std::filesystem::is_empty(dir + "/real"));
      // Nor is anything removed through it: a promise of a process that is gone stays.
      const std::string dead = dir + "/real/" + machine.visible_gpus().front().uuid + "@dead@task.json";
      std::ofstream(dead) << nlohmann::json{{"pid", 999999999}, {"host", multigpu::detail::host_name()},
                                            {"task", "ghost"}, {"bytes", -1}, {"expires_unix", 1.0}};
      CHECK(linked.run({Task::shell("linked", "true")}).exit_code() == 0);
      CHECK(std::filesystem::exists(dead));

      std::filesystem::create_directories(other_options.reservation_dir);
      const auto uuid = machine.visible_gpus().front().uuid;
      REQUIRE(::mkfifo((other_options.reservation_dir + "/" + uuid + "@fifo@task.json").c_str(), 0644) == 0);
      std::ofstream(other_options.reservation_dir + "/" + uuid + "@junk@task.json") << "{not json";
      FakeScheduler second(other_options, machine);
      CHECK(second.run({Task::shell("second", "true")}).exit_code() == 0);  // neither blocks nor counts
    }
    SUBCASE("a promise of a process that is gone counts for nothing, and is removed") {
      std::filesystem::create_directories(options.reservation_dir);
      const auto uuid = machine.visible_gpus().front().uuid;
      const std::string stale = options.reservation_dir + "/" + uuid + "@dead-run@task.json";
      const double in_a_minute =
          std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count() + 60;
      std::ofstream(stale) << nlohmann::json{{"pid", 999999999}, {"host", multigpu::detail::host_name()},
                                             {"task", "ghost"}, {"bytes", -1}, {"expires_unix", in_a_minute}};
      FakeScheduler second(other_options, machine);
      const auto started = std::chrono::steady_clock::now();
      CHECK(second.run({Task::shell("second", "true")}).exit_code() == 0);
      CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
      CHECK_FALSE(std::filesystem::exists(stale));
    }
  }

  TEST_CASE("a task out of GPU memory is retried where it will have more room, or not at all where none has") {
    const std::string dir = fresh_dir("oom");
    const std::string oom = "if [ \"$MULTIGPU_TASK_ATTEMPT\" = 1 ]; then echo 'CUDA out of memory. Tried to allocate "
                            "2.00 GiB'; exit 1; fi; echo fine";
    SUBCASE("it waits for a GPU with more room than it had") {
      auto machine = FakeRuntime::with_gpus(2);  // 24564 MiB each
      machine.set_used_mib(0, 10000);            // someone's process under the threshold: 14564 MiB left on cuda:0
      const std::string uses = dir + "/uses";
      FakeDriver driver(machine, uses);
      auto options = fast_options(dir, "0,1");
      options.memory_threshold_mib = 12000;
      options.retries = 2;
      FakeScheduler scheduler(options, machine);
      const auto summary = scheduler.run({
          Task::shell("big", "sleep 0.3; " + oom),  // on cuda:0
          // On cuda:1, holding 20000 MiB for a second: the retry waits for it.
          Task::shell("holder", "echo 20000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 1.2"),
      });
      const auto& big = result_of(summary, "big");
      const auto& holder = result_of(summary, "holder");
      CHECK(big.status == TaskStatus::kDone);
      CHECK(big.attempts == 2);
      CHECK(big.out_of_memory);
      REQUIRE(big.devices.size() == 1);
      CHECK(contains(big.devices.front(), "cuda:1"));
      CHECK(seconds_between(holder.start, big.start) >= holder.seconds - 0.05);  // it waited for cuda:1 to have room
      CHECK(big.memory_note == "attempt 1 ran out of GPU memory on cuda:0 (physical 0, NVIDIA RTX A5000) with 14.2 "
                               "GiB free; attempt 2 on cuda:1 (physical 1, NVIDIA RTX A5000) with 24.0 GiB free");
      CHECK(contains(read_file(summary.json_path), "attempt 2 on cuda:1"));
    }
    SUBCASE("where no GPU can offer more than it had, it is retried as any failed task is, and the note says so") {
      auto machine = FakeRuntime::with_gpus(1);
      auto options = fast_options(dir, "0");
      options.retries = 1;
      FakeScheduler scheduler(options, machine);
      const auto summary = scheduler.run({Task::shell("big", oom)});
      const auto& big = result_of(summary, "big");
      CHECK(big.status == TaskStatus::kDone);
      CHECK(big.attempts == 2);
      CHECK(big.memory_note == "attempt 1 ran out of GPU memory on cuda:0 (physical 0, NVIDIA RTX A5000) with 24.0 "
                               "GiB free, and no GPU of the pool can offer 1.0 GiB more (the most, on cuda:0 "
                               "(physical 0, NVIDIA RTX A5000), is 24.0 GiB)");
    }
    SUBCASE("the room it had is the smallest seen while it ran: a neighbour that grew took it") {
      auto machine = FakeRuntime::with_gpus(2);
      const std::string uses = dir + "/uses";
      FakeDriver driver(machine, uses);
      auto options = fast_options(dir, "0,1");
      options.max_per_device = 2;
      options.retries = 1;
      FakeScheduler scheduler(options, machine);
      const auto summary = scheduler.run({
          Task::shell("grows", "echo 20000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 2.5"),
          Task::shell("squeezed", "echo 3000 > " + uses + "/$CUDA_VISIBLE_DEVICES.$$; sleep 0.8; " + oom),
      });
      const auto& squeezed = result_of(summary, "squeezed");
      CHECK(squeezed.status == TaskStatus::kDone);
      INFO(squeezed.memory_note, " on ", squeezed.devices.front());
      CHECK(squeezed.attempts == 2);
      // It had its 3000 MiB and the 1564 MiB nobody held on cuda:0 (4564 MiB); cuda:1 offers 24.0 GiB.
      CHECK(contains(squeezed.memory_note, "attempt 1 ran out of GPU memory on cuda:0 (physical 0, NVIDIA RTX A5000) "
                                           "with 4.5 GiB free; attempt 2 on cuda:1"));
    }
  }
}

TEST_SUITE("GPU memory texts and queries") {
  TEST_CASE("sizes are read with their unit, and a bare number is refused") {
    using multigpu::parse_memory_mib;
    CHECK(parse_memory_mib("12G") == 12288);
    CHECK(parse_memory_mib("12GiB") == 12288);
    CHECK(parse_memory_mib("12gb") == 12288);
    CHECK(parse_memory_mib("1.5G") == 1536);
    CHECK(parse_memory_mib("800M") == 800);
    CHECK(parse_memory_mib("800MiB") == 800);
    CHECK(parse_memory_mib("0.5M") == 1);  // parts of a MiB round up
    CHECK(parse_memory_mib("0M") == 0);
    for (const char* bad : {"12", "G", "", "1.2.3G", ".5G", "12T", "-1G", "12 G", "2000000G"}) {
      CHECK_MESSAGE(!parse_memory_mib(bad), bad);
    }
    CHECK(multigpu::memory_text(std::int64_t{1536} << 20) == "1.5 GiB");
    CHECK(multigpu::memory_text(std::int64_t{900} << 20) == "900 MiB");
  }

  TEST_CASE("a task file's mem= is its declared size, and a size without a unit is refused with the line") {
    const auto tasks = multigpu::parse_tasks("[mem=12G] ./train\n./eval\n", "t.tasks");
    CHECK(tasks[0].memory_mib == 12288);
    CHECK(tasks[1].memory_mib == -1);
    CHECK_THROWS_WITH_AS(multigpu::parse_tasks("./a\n[mem=12] ./train\n", "t.tasks"),
                         doctest::Contains("t.tasks:2: mem=12 is not a size of GPU memory; write more than 0 with a unit"),
                         multigpu::SchedulerError);
  }

  TEST_CASE("NVML's process list: a larger buffer when asked, unknown memory kept unknown, the first version last") {
    using multigpu::detail::NvmlProcessInfoV1;
    using multigpu::detail::NvmlProcessInfoV2;
    int calls = 0;
    const auto processes = multigpu::detail::read_nvml_processes(
        [&](unsigned int& count, NvmlProcessInfoV2* infos) {
          ++calls;
          if (count < 40) {
            count = 40;
            return 7;  // NVML_ERROR_INSUFFICIENT_SIZE: 40 processes now
          }
          count = 2;
          infos[0].pid = 11;
          infos[0].used_gpu_memory = 1ULL << 30;
          infos[1].pid = 12;
          infos[1].used_gpu_memory = multigpu::detail::kNvmlValueNotAvailable;
          return 0;
        },
        {});
    REQUIRE(processes);
    CHECK(calls == 2);
    REQUIRE(processes->size() == 2);
    CHECK((*processes)[0].pid == 11);
    CHECK((*processes)[0].used_bytes == std::int64_t{1} << 30);
    CHECK((*processes)[1].used_bytes == -1);
    const auto from_v1 = multigpu::detail::read_nvml_processes(
        [](unsigned int&, NvmlProcessInfoV2*) { return 3; },  // NOT_SUPPORTED
        [](unsigned int& count, NvmlProcessInfoV1* infos) {
          count = 1;
          infos[0].pid = 5;
          infos[0].used_gpu_memory = 1ULL << 20;
          return 0;
        });
    REQUIRE(from_v1);
    CHECK(from_v1->front().used_bytes == std::int64_t{1} << 20);
    CHECK_FALSE(multigpu::detail::read_nvml_processes({}, {}));
    auto machine = FakeRuntime::with_gpus(1);
    machine.set_process_query(3);
    CHECK_FALSE(machine.visible_gpus().front().processes);
  }

  TEST_CASE("a process's parent is read after its name, whatever the name holds, and a tree holds every descendant") {
    CHECK(multigpu::detail::parent_from_stat("123 (sh) S 45 123 123 0") == 45);
    CHECK(multigpu::detail::parent_from_stat("123 (a) b) (c) R 7 1 1") == 7);
    CHECK(multigpu::detail::parent_from_stat("garbage") == -1);
    const std::map<long, long> parents = {{2, 1}, {3, 2}, {4, 3}, {5, 1}, {6, 5}};
    CHECK(multigpu::detail::process_tree(multigpu::detail::process_children(parents), 2) == std::set<long>{2, 3, 4});
    const auto here = multigpu::detail::process_parents();
    REQUIRE(here.count(::getpid()) == 1);
    CHECK(here.at(::getpid()) == ::getppid());
  }
}
