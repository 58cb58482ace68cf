// The experiment scheduler on scripted GPUs (FakeRuntime): dispatch as
// devices free up, busy devices, failures and retries, skip-if-done, command
// tasks and their CUDA_VISIBLE_DEVICES and logs, Ctrl-C, summaries, task files.

#include "support.hpp"  // first: see its comment

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <dirent.h>
#include <sys/resource.h>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "multigpu/scheduler.hpp"
#include "multigpu/testing/fake_runtime.hpp"
#include "scheduler_support.hpp"


TEST_SUITE("scheduler") {
  TEST_CASE("12 tasks over 4 GPUs: one per GPU at a time, at most 4, all done, no fixed batches") {
    const std::string dir = fresh_dir("twelve");
    FakeScheduler scheduler(fast_options(dir, "0,1,2,3"), FakeRuntime::with_gpus(4));
    std::mutex mutex;
    std::map<int, int> active_on;  // device index -> tasks running there
    int active = 0;
    int most_active = 0;
    int most_on_one_device = 0;
    std::atomic<int> completed{0};
    std::atomic<bool> others_progressed_while_slow_ran{false};
    std::vector<Task> tasks;
    for (int i = 0; i < 12; ++i) {
      tasks.push_back(Task::callable(fmt::format("noise-{}", i), [&, i](TaskContext& context) {
        const int device = context.devices().front().index;
        {
          std::lock_guard<std::mutex> lock(mutex);
          ++active;
          most_active = std::max(most_active, active);
          most_on_one_device = std::max(most_on_one_device, ++active_on[device]);
        }
        if (i == 0) {
          // The slow one: the others must go on without waiting for it.
          others_progressed_while_slow_ran = eventually([&] { return completed.load() >= 8; });
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        {
          std::lock_guard<std::mutex> lock(mutex);
          --active;
          --active_on[device];
        }
        ++completed;
      }));
    }
    const RunSummary summary = scheduler.run(tasks);
    CHECK(summary.count(TaskStatus::kDone) == 12);
    CHECK(summary.exit_code() == 0);
    CHECK(most_on_one_device == 1);
    CHECK(most_active <= 4);
    CHECK(most_active >= 2);
    CHECK(others_progressed_while_slow_ran.load());
  }

  TEST_CASE("several tasks per device, and CPU slots") {
    const std::string dir = fresh_dir("slots");
    auto options = fast_options(dir, "cpu");
    options.max_per_device = 3;
    multigpu::Scheduler scheduler(options);  // the real machine: "cpu" works everywhere
    std::atomic<int> active{0};
    std::atomic<int> most{0};
    std::vector<Task> tasks;
    for (int i = 0; i < 7; ++i) {
      tasks.push_back(Task::callable(fmt::format("t{}", i), [&](TaskContext& context) {
        CHECK(context.device().is_cpu());
        const int now = ++active;
        int seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        eventually([&] { return most.load() >= 3; }, std::chrono::seconds(2));
        --active;
      }));
    }
    tasks.push_back(Task::shell("cvd", "echo \"cvd=[$CUDA_VISIBLE_DEVICES]\""));
    const auto summary = scheduler.run(tasks);
    CHECK(summary.count(TaskStatus::kDone) == 8);
    CHECK(most.load() == 3);
    CHECK(contains(read_file(result_of(summary, "cvd").log_path), "cvd=[]"));  // CPU slots hide every GPU
  }

  TEST_CASE("a task needing k GPUs gets k at once, and CUDA_VISIBLE_DEVICES lists them") {
    const std::string dir = fresh_dir("k");
    FakeScheduler scheduler(fast_options(dir, "auto"), FakeRuntime::with_gpus(4));
    std::vector<Task> tasks;
    for (int i = 0; i < 4; ++i) {
      tasks.push_back(Task::shell(fmt::format("pair{}", i), "echo \"gpus={gpu} env=$CUDA_VISIBLE_DEVICES\"", "", 2));
    }
    const auto summary = scheduler.run(tasks);
    CHECK(summary.count(TaskStatus::kDone) == 4);
    for (const auto& r : summary.tasks) {
      CHECK(r.devices.size() == 2);
      CHECK(contains(read_file(r.log_path), fmt::format("gpus={} env={}", r.visible_devices, r.visible_devices)));
    }
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                         scheduler.run({Task::shell("greedy", "true", "", 5)})),
                   "task \"greedy\" needs 5 device(s), but the pool has 4"));
  }

  TEST_CASE("a command task sees its physical GPU in CUDA_VISIBLE_DEVICES, and its output is in its log") {
    const std::string dir = fresh_dir("cvd");
    auto machine = FakeRuntime::with_gpus(8);
    machine.set_env("CUDA_VISIBLE_DEVICES", "2,5");  // this process sees physical 2 and 5 as cuda:0 and cuda:1
    FakeScheduler scheduler(fast_options(dir, "0,1"), machine);
    const auto summary = scheduler.run({
        Task::shell("first", "echo \"task={task} gpu={gpu} env=$CUDA_VISIBLE_DEVICES name=$MULTIGPU_TASK\"; echo oops >&2"),
        Task::shell("second", "echo \"env=$CUDA_VISIBLE_DEVICES\"; sleep 0.2"),
    });
    REQUIRE(summary.count(TaskStatus::kDone) == 2);
    std::set<std::string> seen;
    for (const auto& r : summary.tasks) {
      seen.insert(r.visible_devices);
      const std::string log = read_file(r.log_path);
      CHECK(contains(log, "env=" + r.visible_devices));
      CHECK(contains(log, "### multigpu: task " + r.name + ", attempt 1, on cuda:"));
    }
    CHECK(seen == std::set<std::string>{"2", "5"});
    const std::string first = read_file(result_of(summary, "first").log_path);
    CHECK(contains(first, "task=first gpu=" + result_of(summary, "first").visible_devices));
    CHECK(contains(first, "name=first"));
    CHECK(contains(first, "oops"));  // stderr too
    CHECK(result_of(summary, "first").log_path == dir + "/logs/first.log");
  }

  TEST_CASE("failures do not stop the others, are reported, and retries work (on another device)") {
    const std::string dir = fresh_dir("fail");
    auto options = fast_options(dir, "0,1");
    options.retries = 1;
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    std::mutex mutex;
    std::vector<int> flaky_devices;
    std::vector<int> oom_devices;
    const auto summary = scheduler.run({
        Task::callable("throws", [](TaskContext&) { throw std::runtime_error("bad hyper-parameters"); }),
        Task::shell("exits", "echo failing; exit 3"),
        Task::shell("segfaults", "kill -SEGV $$"),
        Task::callable("flaky",
                       [&](TaskContext& context) {
                         std::lock_guard<std::mutex> lock(mutex);
                         flaky_devices.push_back(context.devices().front().index);
                         if (context.attempt() == 1) throw std::runtime_error("transient");
                       }),
        Task::callable("oom",
                       [&](TaskContext& context) {
                         std::lock_guard<std::mutex> lock(mutex);
                         oom_devices.push_back(context.devices().front().index);
                         if (context.attempt() == 1) {
                           throw std::runtime_error("CUDA out of memory. Tried to allocate 2.00 GiB");
                         }
                       }),
        Task::shell("fine", "true"),
    });
    CHECK(summary.exit_code() == 1);
    const auto& thrown = result_of(summary, "throws");
    CHECK(thrown.status == TaskStatus::kFailed);
    CHECK(thrown.attempts == 2);
    CHECK(thrown.error == "bad hyper-parameters");
    CHECK(contains(read_file(thrown.log_path), "### exception: bad hyper-parameters"));
    const auto& exited = result_of(summary, "exits");
    CHECK(exited.status == TaskStatus::kFailed);
    CHECK(exited.exit_code == 3);
    CHECK(exited.error == "exit code 3");
    const auto& crashed = result_of(summary, "segfaults");
    CHECK(crashed.status == TaskStatus::kFailed);
    CHECK(crashed.error == "killed by SIGSEGV (signal 11)");
    CHECK(result_of(summary, "flaky").status == TaskStatus::kDone);
    CHECK(result_of(summary, "flaky").attempts == 2);
    REQUIRE(flaky_devices.size() == 2);
    CHECK(flaky_devices[0] != flaky_devices[1]);  // retried elsewhere
    CHECK(result_of(summary, "oom").status == TaskStatus::kDone);
    REQUIRE(oom_devices.size() == 2);
    CHECK(oom_devices[0] != oom_devices[1]);  // not again on the crowded GPU
    CHECK(result_of(summary, "fine").status == TaskStatus::kDone);
  }

  TEST_CASE("a busy device is skipped until it frees up") {
    const std::string dir = fresh_dir("busy");
    auto machine = FakeRuntime::with_gpus(2);
    machine.set_used_mib(1, 9000);  // someone else's job on GPU 1
    CapturedLog log;
    FakeScheduler scheduler(fast_options(dir, "0,1"), machine);
    std::atomic<bool> first_running{false};
    std::atomic<bool> second_done{false};
    std::atomic<int> first_device{-1};
    std::atomic<int> second_device{-1};
    std::thread freer([&] {
      eventually([&] { return first_running.load(); });
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the second task waits meanwhile
      machine.set_used_mib(1, 0);                                  // the other job ends
    });
    const auto summary = scheduler.run({
        Task::callable("first",
                       [&](TaskContext& context) {
                         first_device = context.devices().front().index;
                         first_running = true;
                         eventually([&] { return second_done.load(); });  // holds GPU 0 until the second ran
                       }),
        Task::callable("second",
                       [&](TaskContext& context) {
                         second_device = context.devices().front().index;
                         second_done = true;
                       }),
    });
    freer.join();
    CHECK(summary.count(TaskStatus::kDone) == 2);
    CHECK(first_device.load() == 0);
    CHECK(second_device.load() == 1);  // started on GPU 1 once it was free, while GPU 0 was still taken
    REQUIRE_FALSE(log.warnings().empty());
    CHECK(contains(log.warnings()[0], "tasks wait for busy devices: cuda:1 (physical 1, NVIDIA RTX A5000) (9000 MiB in use)"));
  }

  TEST_CASE("the cache is emptied only when no other in-process task runs, on its GPU or another") {
    // See Note [Emptying the cache between tasks] in scheduler.hpp.
    for (const bool same_gpu : {false, true}) {
      CAPTURE(same_gpu);
      const std::string dir = fresh_dir(same_gpu ? "cache_same" : "cache_other");
      auto machine = FakeRuntime::with_gpus(same_gpu ? 1 : 2);
      auto options = fast_options(dir, same_gpu ? "0" : "0,1");
      options.max_per_device = same_gpu ? 2 : 1;
      options.busy_wait_limit = std::chrono::seconds(10);  // a failure must not hang
      FakeScheduler scheduler(options, machine);
      std::atomic<bool> third_started{false};
      std::atomic<int> released_meanwhile{-1};
      const auto summary = scheduler.run({
          Task::callable("long",
                         [&](TaskContext&) {
                           const int before = machine.cache_releases();
                           // "third" starts once "short" has ended and the scheduler has dealt with it.
                           CHECK(eventually([&] { return third_started.load(); }));
                           released_meanwhile = machine.cache_releases() - before;
                         }),
          Task::callable("short",
                         [&](TaskContext& context) {
                           // What the memory it leaves cached looks like to NVML.
                           machine.set_used_mib(context.devices().front().index, 9000);
                         }),
          Task::callable("third", [&](TaskContext&) { third_started = true; }),
      });
      CHECK(summary.count(TaskStatus::kDone) == 3);
      CHECK(released_meanwhile.load() == 0);
      CHECK(machine.cache_releases() == 1);  // once "long", the last in-process task, had ended
    }
  }

  TEST_CASE("a wait limit fails tasks that find every device busy") {
    const std::string dir = fresh_dir("limit");
    auto machine = FakeRuntime::with_gpus(1);
    machine.set_used_mib(0, 20000);
    auto options = fast_options(dir, "0");
    options.busy_wait_limit = std::chrono::milliseconds(100);
    CapturedLog log;
    FakeScheduler scheduler(options, machine);
    const auto summary = scheduler.run({Task::shell("stuck", "true")});
    const auto& r = result_of(summary, "stuck");
    CHECK(r.status == TaskStatus::kFailed);
    CHECK(r.attempts == 0);
    CHECK(contains(r.error, "no device became free within 0.1 s: cuda:0 (physical 0, NVIDIA RTX A5000) (20000 MiB in use)"));
  }

  TEST_CASE("skip-if-done, rerun after an interrupted run, and force") {
    const std::string dir = fresh_dir("skip");
    auto options = fast_options(dir, "0,1");
    std::atomic<int> runs{0};
    std::vector<Task> tasks;
    for (int i = 0; i < 6; ++i) {
      const std::string marker = fmt::format("{}/out-{}.done", dir, i);
      tasks.push_back(Task::callable(fmt::format("train-{}", i),
                                     [&runs, marker](TaskContext&) {
                                       ++runs;
                                       std::ofstream(marker) << "ok";
                                     },
                                     marker));
    }
    {
      // The first run is stopped after three tasks finished.
      FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
      std::vector<Task> stopping = tasks;
      std::atomic<bool> requested{false};
      for (auto& task : stopping) {
        auto inner = task.function;
        task.function = [&, inner](TaskContext& context) {
          inner(context);
          if (runs.load() >= 3 && !requested.exchange(true)) scheduler.request_stop();
        };
      }
      const auto summary = scheduler.run(stopping);
      CHECK(summary.interrupted);
      CHECK(summary.exit_code() == 130);
      CHECK(summary.count(TaskStatus::kDone) >= 3);
      CHECK(summary.count(TaskStatus::kPending) >= 1);
    }
    const int after_first = runs.load();
    FakeScheduler again(options, FakeRuntime::with_gpus(2));
    const auto rerun = again.run(tasks);
    CHECK(rerun.exit_code() == 0);
    CHECK(rerun.count(TaskStatus::kSkipped) == static_cast<std::size_t>(after_first));
    CHECK(runs.load() == 6);  // each task ran exactly once over the two runs
    const auto third = again.run(tasks);
    CHECK(third.count(TaskStatus::kSkipped) == 6);
    CHECK(runs.load() == 6);
    options.force = true;
    FakeScheduler forced(options, FakeRuntime::with_gpus(2));
    CHECK(forced.run(tasks).count(TaskStatus::kDone) == 6);
    CHECK(runs.load() == 12);
  }

  TEST_CASE("a done marker counts for the command that made it, --force NAME reruns one task, a wrong name is refused") {
    const std::string dir = fresh_dir("done-command");
    auto options = fast_options(dir, "0");
    auto task = [&](const std::string& name, const std::string& value) {
      return Task::shell(name, fmt::format("echo {1} >> {0}/{2}.out; touch {0}/{2}.done", dir, value, name),
                         fmt::format("{}/{}.done", dir, name));
    };
    auto run = [&](const std::vector<Task>& tasks) {
      FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
      return scheduler.run(tasks);
    };
    CHECK(run({task("a", "v1"), task("b", "v1")}).count(TaskStatus::kDone) == 2);
    const auto record = nlohmann::json::parse(read_file(dir + "/logs/.done/a.json"));
    CHECK(record["command"] == fmt::format("echo v1 >> {0}/a.out; touch {0}/a.done", dir));
    CHECK(run({task("a", "v1"), task("b", "v1")}).count(TaskStatus::kSkipped) == 2);

    // a's grid value changed: a runs again, b does not; the dry run and a's log say why.
    {
      FakeScheduler planner(options, FakeRuntime::with_gpus(1));
      const auto planned = planner.plan({task("a", "v2"), task("b", "v1")});
      CHECK_FALSE(planned[0].skipped);
      CHECK(contains(planned[0].note, fmt::format("its done marker {}/a.done was made by another command: echo v1", dir)));
      CHECK(planned[1].skipped);
    }
    auto changed = run({task("a", "v2"), task("b", "v1")});
    CHECK(result_of(changed, "a").status == TaskStatus::kDone);
    CHECK(result_of(changed, "b").status == TaskStatus::kSkipped);
    CHECK(read_file(dir + "/a.out") == "v1\nv2\n");
    CHECK(contains(read_file(dir + "/logs/a.log"), "### running again: its done marker"));
    CHECK(run({task("a", "v2"), task("b", "v1")}).count(TaskStatus::kSkipped) == 2);  // v2 is recorded now

    options.force_tasks = {"b"};
    auto forced = run({task("a", "v2"), task("b", "v1")});
    CHECK(result_of(forced, "a").status == TaskStatus::kSkipped);
    CHECK(result_of(forced, "b").status == TaskStatus::kDone);
    CHECK(read_file(dir + "/b.out") == "v1\nv1\n");

    options.force_tasks = {"b", "nosuch"};
    const std::string refused = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, run({task("a", "v2"), task("b", "v1")}));
    CHECK(contains(refused, "--force names no task: \"nosuch\"; the tasks are a, b"));

    options.force_tasks.clear();
    // A changed command whose task finds its old marker and does not make it
    // again: the new command is not recorded, so the next run tries again.
    {
      CapturedLog log;
      const Task lazy = Task::shell("a", fmt::format("test -e {0}/a.done || touch {0}/a.done; echo v4", dir),
                                    fmt::format("{}/a.done", dir));
      CHECK(result_of(run({lazy, task("b", "v1")}), "a").status == TaskStatus::kDone);
      bool warned = false;
      for (const auto& line : log.warnings()) warned = warned || contains(line, "did not make its done marker");
      CHECK(warned);
      CHECK(result_of(run({lazy, task("b", "v1")}), "a").status == TaskStatus::kDone);  // not skipped
    }

    // A marker with no record (made by hand, or before records) is trusted.
    std::filesystem::remove(dir + "/logs/.done/b.json");
    CHECK(result_of(run({task("a", "v2"), task("b", "v3")}), "b").status == TaskStatus::kSkipped);
  }

  TEST_CASE("a second SIGINT during a run stops the children and writes the summary") {
    const SignalAction sigint(SIGINT, SIG_DFL, /*if_ignored=*/true);  // also when started with SIGINT ignored
    const std::string dir = fresh_dir("sigint");
    auto options = fast_options(dir, "0,1");
    options.handle_signals = true;
    options.grace_period = std::chrono::seconds(3);
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    const std::string token = fmt::format("31.{}", ::getpid());  // a sleep nobody else runs
    std::thread interrupter([&] {
      eventually([&] {
        return multigpu::detail::path_exists(dir + "/started-a") && multigpu::detail::path_exists(dir + "/started-b");
      });
      ::kill(::getpid(), SIGINT);  // drains: a and b go on
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      ::kill(::getpid(), SIGINT);  // stops them
    });
    const auto start = std::chrono::steady_clock::now();
    const auto summary = scheduler.run({
        Task::shell("a", fmt::format("touch {}/started-a; sleep {}", dir, token)),
        Task::shell("b", fmt::format("touch {}/started-b; sleep {}", dir, token)),
        Task::shell("c", fmt::format("sleep {}", token)),
    });
    interrupter.join();
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(20));
    CHECK(summary.interrupted);
    CHECK(summary.exit_code() == 130);
    CHECK(result_of(summary, "a").status == TaskStatus::kInterrupted);
    CHECK(result_of(summary, "b").status == TaskStatus::kInterrupted);
    CHECK(result_of(summary, "c").status == TaskStatus::kPending);
    CHECK(processes_with("sleep " + token) == 0);  // every child and grandchild is gone
    const auto json = nlohmann::json::parse(read_file(summary.json_path));
    CHECK(json["interrupted"] == true);
    CHECK(json["finished"] == true);
    CHECK(json["counts"]["interrupted"] == 2);
    CHECK(json["counts"]["pending"] == 1);
  }

  TEST_CASE("the first SIGINT drains the run: running tasks end on their own, no new one starts, not retried") {
    const SignalAction sigint(SIGINT, SIG_DFL, /*if_ignored=*/true);  // also when started with SIGINT ignored
    const std::string dir = fresh_dir("drain");
    auto options = fast_options(dir, "0,1");
    options.handle_signals = true;
    options.retries = 2;
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    rusage before{};
    rusage after{};
    std::thread interrupter([&] {
      eventually([&] {
        return multigpu::detail::path_exists(dir + "/started-a") && multigpu::detail::path_exists(dir + "/started-b");
      });
      ::kill(::getpid(), SIGINT);
      // The run waits for a and b; let them end only once it has drained.
      // Meanwhile the scheduler idles: measure its CPU time over 0.4 s of that.
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      ::getrusage(RUSAGE_SELF, &before);
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      ::getrusage(RUSAGE_SELF, &after);
      std::ofstream(dir + "/go") << "";
    });
    const auto summary = scheduler.run({
        Task::shell("a", fmt::format("touch {0}/started-a; until [ -e {0}/go ]; do sleep 0.02; done; echo a ok", dir)),
        Task::shell("b", fmt::format("touch {0}/started-b; until [ -e {0}/go ]; do sleep 0.02; done; exit 3", dir)),
        Task::shell("c", "true"),
    });
    interrupter.join();
    const auto cpu_seconds = [](const rusage& r) {
      return static_cast<double>(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
             static_cast<double>(r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
    };
    // A loop that spun while draining would use about 0.4 s.
    CHECK(cpu_seconds(after) - cpu_seconds(before) < 0.2);
    CHECK(summary.interrupted);
    CHECK(summary.exit_code() == 130);
    CHECK(result_of(summary, "a").status == TaskStatus::kDone);
    const auto& b = result_of(summary, "b");
    CHECK(b.status == TaskStatus::kFailed);  // its retries are not used while draining
    CHECK(b.attempts == 1);
    CHECK(contains(b.error, "exit code 3 (not retried: the run was draining after Ctrl-C)"));
    CHECK(result_of(summary, "c").status == TaskStatus::kPending);
    CHECK(contains(read_file(dir + "/logs/a.log"), "a ok"));
  }

  TEST_CASE("request_drain from C++ drains, and interrupt_drains = false makes the first SIGINT stop") {
    const SignalAction sigint(SIGINT, SIG_DFL, /*if_ignored=*/true);  // also when started with SIGINT ignored
    const std::string dir = fresh_dir("drain-api");
    auto options = fast_options(dir, "0");
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
    const auto drained = scheduler.run({
        Task::callable("first", [&](TaskContext& task) {
          scheduler.request_drain();
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          CHECK_FALSE(task.stop_requested());  // draining lets it finish
        }),
        Task::callable("second", [](TaskContext&) {}),
    });
    CHECK(result_of(drained, "first").status == TaskStatus::kDone);
    CHECK(result_of(drained, "second").status == TaskStatus::kPending);
    CHECK(drained.exit_code() == 130);
    // A drain that leaves nothing unstarted cut nothing short: exit status 0.
    FakeScheduler last(options, FakeRuntime::with_gpus(1));
    const auto complete = last.run({Task::callable("only", [&](TaskContext&) { last.request_drain(); })});
    CHECK_FALSE(complete.interrupted);
    CHECK(complete.exit_code() == 0);

    options.handle_signals = true;
    options.interrupt_drains = false;
    options.grace_period = std::chrono::seconds(3);
    FakeScheduler once(options, FakeRuntime::with_gpus(1));
    std::thread interrupter([&] {
      eventually([&] { return multigpu::detail::path_exists(dir + "/started"); });
      ::kill(::getpid(), SIGINT);
    });
    const auto stopped = once.run({Task::shell("sleeper", fmt::format("touch {}/started; sleep 30", dir))});
    interrupter.join();
    CHECK(result_of(stopped, "sleeper").status == TaskStatus::kInterrupted);
    CHECK(stopped.exit_code() == 130);

    // SIGTERM, then at once a Ctrl-C: the SIGTERM is not hidden by it.
    options.interrupt_drains = true;
    std::filesystem::remove(dir + "/started");
    FakeScheduler terminated(options, FakeRuntime::with_gpus(1));
    int sent = -1;
    std::thread terminator([&] {
      eventually([&] { return multigpu::detail::path_exists(dir + "/started"); });
      // From another process, as a terminal or a batch system sends them.
      // (Sent with kill() from this thread instead, the SIGTERM was lost under
      // ThreadSanitizer in 3 runs of 16, never elsewhere; from a shell, 0 in 24.)
      sent = std::system(fmt::format("kill -TERM {0} && kill -INT {0}", ::getpid()).c_str());
    });
    const auto ended = terminated.run({Task::shell("sleeper", fmt::format("touch {}/started; sleep 30", dir))});
    terminator.join();
    CHECK(sent == 0);
    CHECK(result_of(ended, "sleeper").status == TaskStatus::kInterrupted);
    CHECK(ended.exit_code() == 143);
  }

  TEST_CASE("the summary, in JSON and CSV, says what happened to every task") {
    const std::string dir = fresh_dir("summary");
    auto options = fast_options(dir, "0");
    options.summary_path = dir + "/results/run";
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
    const auto summary = scheduler.run({
        Task::shell("good", "true"),
        Task::shell("bad, \"quoted\"", "exit 2"),
    });
    CHECK(summary.json_path == dir + "/results/run.json");
    const auto json = nlohmann::json::parse(read_file(summary.json_path));
    REQUIRE(json["tasks"].size() == 2);
    CHECK(json["tasks"][0]["task"] == "good");
    CHECK(json["tasks"][0]["status"] == "done");
    CHECK(json["tasks"][0]["devices"][0] == "cuda:0 (physical 0, NVIDIA RTX A5000)");
    CHECK(json["tasks"][0]["cuda_visible_devices"] == "0");
    CHECK(json["tasks"][0]["start"].get<std::string>().size() == 20);
    CHECK(json["tasks"][1]["task"] == "bad, \"quoted\"");
    CHECK(json["tasks"][1]["exit_code"] == 2);
    CHECK(json["tasks"][1]["error"] == "exit code 2");
    CHECK(json["tasks"][1]["log"] == dir + "/logs/bad___quoted_.log");
    CHECK(json["counts"]["failed"] == 1);
    const std::string csv = read_file(summary.csv_path);
    CHECK(contains(csv, "task,status,devices,cuda_visible_devices,start,seconds,attempts,exit_code,error,log,peak_gpu_mib,gpu_seconds\n"));
    CHECK(contains(csv, "\"bad, \"\"quoted\"\"\",failed,\"cuda:0 (physical 0, NVIDIA RTX A5000)\",0,"));
    CHECK(contains(csv, ",1,2,exit code 2," + dir + "/logs/bad___quoted_.log,,"));
  }

  TEST_CASE("a bad queue is refused with what is wrong") {
    const std::string dir = fresh_dir("bad");
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                         scheduler.run({Task::shell("x", "true"), Task::shell("x", "false")})),
                   "two tasks are named \"x\""));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, scheduler.run({Task{}})), "has no name"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::DeviceError,
                                         FakeScheduler(fast_options(dir, "0,7"), FakeRuntime::with_gpus(2))),
                   "cuda:7 is not visible"));
    auto zero = fast_options(dir, "0");
    zero.max_per_device = 0;
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, FakeScheduler(zero, FakeRuntime::with_gpus(1))),
                   "max_per_device must be 1 or more"));
  }

  TEST_CASE("a dry run plans without running") {
    const std::string dir = fresh_dir("plan");
    std::ofstream(dir + "/exists") << "x";
    FakeScheduler scheduler(fast_options(dir, "0,1"), FakeRuntime::with_gpus(2));
    const auto plan = scheduler.plan({Task::shell("a", "run --gpu {gpu} --name {task}"),
                                      Task::shell("b", "run --gpu {gpu}", dir + "/exists"),
                                      Task::shell("c", "run --gpu {gpu}"), Task::shell("d", "run --gpu {gpu}")});
    REQUIRE(plan.size() == 4);
    CHECK(plan[0].command == "run --gpu 0 --name a");
    CHECK(plan[1].skipped);
    CHECK(plan[2].command == "run --gpu 1");
    CHECK(plan[3].command == "run --gpu 0");
    CHECK_FALSE(multigpu::detail::path_exists(dir + "/logs/a.log"));
  }

  TEST_CASE("{task} and {gpu} go into a command so that the shell reads back the value: a semicolon or a quote is data") {
    using multigpu::detail::shell_quoted;
    using multigpu::detail::ShellQuoting;
    CHECK(shell_quoted("sym-0.125", ShellQuoting::kNone) == "sym-0.125");
    CHECK(shell_quoted("0,1", ShellQuoting::kNone) == "0,1");
    CHECK(shell_quoted("", ShellQuoting::kNone) == "''");
    CHECK(shell_quoted("a b", ShellQuoting::kNone) == "'a b'");
    CHECK(shell_quoted("it's", ShellQuoting::kNone) == "'it'\\''s'");
    CHECK(shell_quoted("it's", ShellQuoting::kSingle) == "it'\\''s");
    CHECK(shell_quoted("a\"$b`\\", ShellQuoting::kDouble) == "a\\\"\\$b\\`\\\\");
    CHECK(shell_quoted("", ShellQuoting::kDouble).empty());
    const std::string dir = fresh_dir("quoted");
    const auto tasks = multigpu::parse_tasks("[name=lr=0.1;bs=32] echo run-name={task}\n"
                                             "[name=it's] echo run-name={task} gpu={gpu}\n"
                                             "[name=a\"$HOME\"`b`\\c;'d'] printf '%s\\n' \"dq={task} gpu=[{gpu}]\" 'sq={task}'\n"
                                             "[name=x;id] printf '%s\\n' \"cs=$(printf %s {task})\" "
                                             "\"bq=`printf %s \\\"{task}\\\"`\"\n",
                                             "quoted.tasks");
    REQUIRE(tasks.size() == 4);
    multigpu::Scheduler scheduler(fast_options(dir, "cpu"));
    const auto plan = scheduler.plan(tasks);
    CHECK(plan[0].command == "echo run-name='lr=0.1;bs=32'");
    CHECK(plan[1].command == "echo run-name='it'\\''s' gpu=''");
    // Inside "$(...)" and "`...`" the quoting starts afresh: there the name
    // is one word too, not shell code (escaped for "..." it would be).
    CHECK(multigpu::detail::command_for("echo \"$(basename {task})\"", "", "a;b") == "echo \"$(basename 'a;b')\"");
    CHECK(multigpu::detail::command_for("echo \"`basename {task}`\"", "", "a;$b") == "echo \"`basename 'a;\\$b'`\"");
    // ${task} is the shell's parameter expansion, left to the shell: filled
    // in, a name "(id)" would make "$(id)" and run id.
    CHECK(multigpu::detail::command_for("echo \"${task}\" ${gpu} '${task}' \\${task}", "0", "(id)") ==
          "echo \"${task}\" ${gpu} '$(id)' \\$'(id)'");
    const auto summary = scheduler.run(tasks);
    REQUIRE(summary.count(TaskStatus::kDone) == 4);
    const std::string semicolon = read_file(result_of(summary, "lr=0.1;bs=32").log_path);
    INFO(semicolon);
    CHECK(contains(semicolon, "\nrun-name=lr=0.1;bs=32\n"));
    const std::string quote = read_file(result_of(summary, "it's").log_path);
    INFO(quote);
    CHECK(contains(quote, "\nrun-name=it's gpu=\n"));
    const std::string name = "a\"$HOME\"`b`\\c;'d'";
    const std::string quoted = read_file(result_of(summary, name).log_path);
    INFO(quoted);
    CHECK(contains(quoted, "\ndq=" + name + " gpu=[]\nsq=" + name + "\n"));
    const std::string substituted = read_file(result_of(summary, "x;id").log_path);
    INFO(substituted);
    CHECK(contains(substituted, "\ncs=x;id\nbq=x;id\n"));
  }
}

TEST_SUITE("task files") {
  TEST_CASE("commands, options, comments, continued lines and a 6 x 2 grid") {
    const auto tasks = multigpu::parse_tasks(
        "# the seed's grid\n"
        "grid noise_rate = 0.125 0.25 0.375 0.5 0.625 0.75\n"
        "grid noise_type = sym asym\n"
        "[name={noise_type}-{noise_rate} done=out/{noise_type}_{noise_rate}/model.pt] \\\n"
        "  python train.py --noise-rate {noise_rate} --noise-type {noise_type} --gpu {gpu}\n"
        "\n"
        "echo plain; awk '{print $1}' file   # braces that are not placeholders stay\n"
        "[gpus=2] echo {{literal}}\n",
        "grid.tasks");
    REQUIRE(tasks.size() == 14);
    CHECK(tasks[0].name == "sym-0.125");
    CHECK(tasks[1].name == "asym-0.125");
    CHECK(tasks[11].name == "asym-0.75");
    CHECK(tasks[0].command == "python train.py --noise-rate 0.125 --noise-type sym --gpu {gpu}");
    CHECK(tasks[0].done_marker == "out/sym_0.125/model.pt");
    CHECK(tasks[12].name == "task-13");
    CHECK(tasks[12].command == "echo plain; awk '{print $1}' file   # braces that are not placeholders stay");
    CHECK(tasks[13].command == "echo {literal}");
    CHECK(tasks[13].devices == 2);
  }

  TEST_CASE("mistakes name the file, the line and what is valid") {
    auto message = [](const std::string& text) {
      return MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::parse_tasks(text, "my.tasks"));
    };
    CHECK(message("grid rate 0.1 0.2\n") ==
          "my.tasks:1: a grid line reads `grid NAME = VALUE VALUE ...` (NAME: letters, digits, _)");
    CHECK(message("\ngrid rate =\n") == "my.tasks:2: grid rate has no values");
    CHECK(contains(message("grid rate = 1 2\ntrain --lr {rte}\n"),
                   "my.tasks:2: unknown placeholder {rte}; known: {rate}, {gpu} and {task}"));
    CHECK(message("[name=x gpu=2] run\n") == "my.tasks:1: unknown option \"gpu\"; valid: name, done, gpus, after, mem");
    CHECK(message("[gpus=0] run\n") == "my.tasks:1: gpus=0 is not a number of devices (1 or more)");
    CHECK(message("[name=x run\n") == "my.tasks:1: an option list `[` has no closing `]`");
    CHECK(message("[name=x]\n") == "my.tasks:1: the line has options but no command");
    CHECK(contains(message("[name=same] a\n[name=same] b\n"), "my.tasks:2: task name \"same\" is already used on line 1"));
    CHECK(message("grid gpu = 0 1\n") == "my.tasks:1: {gpu} is filled in at run time; choose another grid name");
    CHECK(message("run \\\n") == "my.tasks:1: the last line ends with `\\` but nothing follows");
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::read_task_file("/no/such.tasks")),
                   "cannot read the task file /no/such.tasks: No such file or directory"));
  }

  TEST_CASE("the example task file is the 12-task grid") {
    const auto tasks = multigpu::read_task_file(std::string(multigpu_test::source_dir()) + "/examples/tasks/noise_grid.tasks");
    CHECK(tasks.size() == 12);
    std::set<std::string> names;
    for (const auto& task : tasks) names.insert(task.name);
    CHECK(names.size() == 12);
  }
}
