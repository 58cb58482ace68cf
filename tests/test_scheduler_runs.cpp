// The experiment scheduler, continued (see test_scheduler.cpp): a task is
// never killed or lost because of the scheduler, files go where they should, a
// failure says what is true, dependencies between tasks, and --fail-fast.

#include "support.hpp"  // first: see its comment

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/resource.h>

#include <nlohmann/json.hpp>

#include "multigpu/scheduler.hpp"
#include "multigpu/testing/fake_runtime.hpp"
#include "scheduler_support.hpp"


// Issue 17: a task is never killed or lost because of the scheduler, files
// go where they should, and a failure says what is true.
TEST_SUITE("scheduler: never kill or lose a task") {
  TEST_CASE("a task that sends SIGUSR1 to its own process group is not taken for the scheduler's death") {
    // SIGUSR1 is the supervisor's parent-death signal (Note [The task supervisor]).
    const std::string dir = fresh_dir("usr1");
    FakeScheduler scheduler(fast_options(dir, "cpu"), FakeRuntime{});
    const auto summary = scheduler.run({Task::shell("usr1", "trap '' USR1; kill -USR1 0; sleep 0.3; echo survived")});
    const auto& task = result_of(summary, "usr1");
    CHECK(task.status == TaskStatus::kDone);
    CHECK(task.error == "");
    CHECK(contains(read_file(task.log_path), "survived"));
  }

  TEST_CASE("a task under sh gets its whole grace period (dash does not exec, the program saves on SIGTERM)") {
    const std::string dir = fresh_dir("grace");
    std::ofstream(dir + "/saves.sh") << "trap 'sleep 2; echo saved > " << dir << "/saved; exit 0' TERM\n"
                                     << "touch " << dir << "/started\n"
                                     << "while :; do sleep 0.1; done\n";
    auto options = fast_options(dir, "0");
    options.grace_period = std::chrono::seconds(10);
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
    std::thread stopper([&] {
      if (eventually([&] { return multigpu::detail::path_exists(dir + "/started"); })) scheduler.request_stop();
    });
    const auto start = std::chrono::steady_clock::now();
    // `; echo after`: the shell cannot exec the script and stays its parent.
    const auto summary = scheduler.run({Task::shell("saver", fmt::format("sh {}/saves.sh; echo after", dir))});
    stopper.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK(read_file(dir + "/saved") == "saved\n");
    CHECK(seconds >= 2);
    CHECK(seconds < 9);  // it ended when the task had, not at the end of the period
    CHECK(result_of(summary, "saver").status == TaskStatus::kInterrupted);
    CHECK(processes_with(dir + "/saves.sh") == 0);
  }

  TEST_CASE("a task that cannot start fails alone: a command over the argument limit, a deleted log folder") {
    const std::string dir = fresh_dir("nostart");
    CapturedLog log;
    auto options = fast_options(dir, "0");
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
    const auto summary = scheduler.run({
        Task::shell("huge", "echo " + std::string(200 * 1024, 'x')),
        Task::shell("fine", "true"),
        // (again while the scheduler's summary writes race with rm)
        Task::shell("remover", fmt::format("until rm -rf {}/logs 2>/dev/null; do sleep 0.01; done", dir)),
        Task::shell("after", "true"),
    });
    const auto& huge = result_of(summary, "huge");
    CHECK(huge.status == TaskStatus::kFailed);
    CHECK(contains(huge.error, "the command is 204805 bytes, over the kernel's limit for one argument (128 KiB)"));
    CHECK(result_of(summary, "fine").status == TaskStatus::kDone);
    CHECK(result_of(summary, "remover").status == TaskStatus::kDone);
    const auto& after = result_of(summary, "after");
    CHECK(after.status == TaskStatus::kFailed);
    CHECK(contains(after.error, "with its output to " + dir + "/logs/after.log: No such file or directory"));
    // The summary's folder went too: said, not thrown.
    CHECK(contains(summary.summary_error, dir + "/logs/summary.json"));
    CHECK(summary.exit_code() == 1);
  }

  TEST_CASE("a log folder is locked by the run using it, a second run says who holds it") {
    const std::string dir = fresh_dir("lock");
    FakeScheduler first(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    FakeScheduler second(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    std::string refused;
    const auto summary = first.run({Task::callable("holder", [&](TaskContext&) {
      refused = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, second.run({Task::shell("twin", "true")}));
    })});
    CHECK(summary.count(TaskStatus::kDone) == 1);
    CHECK(contains(refused, fmt::format("the log folder {}/logs is in use by another run (pid {} on host ", dir,
                                        static_cast<long>(::getpid()))));
    CHECK(contains(refused, ", started 20"));
    CHECK_FALSE(multigpu::detail::path_exists(dir + "/logs/twin.log"));
    CHECK(second.run({Task::shell("twin", "true")}).count(TaskStatus::kDone) == 1);  // free once the first ended
  }

  TEST_CASE("while a task runs, the summary shows it pending with its attempt") {
    const std::string dir = fresh_dir("crash");
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    nlohmann::json seen;
    scheduler.run({Task::callable("long", [&](TaskContext&) {
      eventually([&] {
        try {
          seen = nlohmann::json::parse(read_file(dir + "/logs/summary.json"));
          return seen["tasks"][0]["attempts"] == 1;
        } catch (const std::exception&) {
          return false;
        }
      });
    })});
    CHECK(seen["tasks"][0]["status"] == "pending");
    CHECK(seen["tasks"][0]["attempts"] == 1);
    CHECK(seen["finished"] == false);
  }
}

TEST_SUITE("scheduler: where files go") {
  TEST_CASE("an empty log folder, a symbolic link as a log, and names that map to one log are refused") {
    const std::string dir = fresh_dir("files");
    auto empty = fast_options(dir, "0");
    empty.log_dir = "";
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, FakeScheduler(empty, FakeRuntime::with_gpus(1))),
                   "the log folder is \"\"; name a folder"));
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                scheduler.run({Task::shell("a/b", "true"), Task::shell("a_b", "true")})) ==
          "tasks \"a/b\" and \"a_b\" would share the log a_b.log; rename one (a name keeps letters, digits, '.', '_' "
          "and '-' in its log's name, and every other character becomes '_')");
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, scheduler.run({Task::shell("bad\xff", "true")})),
                   "task 1 has a name that is not UTF-8 (byte 4)"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                         scheduler.run({Task::shell("nul", std::string("echo a\0b", 8))})),
                   "task \"nul\": its command holds a NUL byte at byte 7"));
    multigpu::detail::make_directories(dir + "/logs");
    REQUIRE(::symlink("../target", (dir + "/logs/planted.log").c_str()) == 0);
    const auto summary = scheduler.run({Task::shell("planted", "echo written")});
    CHECK(result_of(summary, "planted").status == TaskStatus::kFailed);
    CHECK(contains(result_of(summary, "planted").error, "is a symbolic link, and logs are never written through one"));
    CHECK_FALSE(multigpu::detail::path_exists(dir + "/target"));
  }

  TEST_CASE("the summary stays valid JSON whatever bytes a text holds") {
    CHECK(nlohmann::json::parse(multigpu::detail::json_string("a\xff\xc3(b\xe2\x82\xac")) ==
          "a\xef\xbf\xbd\xef\xbf\xbd(b\xe2\x82\xac");
  }
}

TEST_SUITE("scheduler: what a failure says") {
  TEST_CASE("out of memory in any attempt's output, however long the output after it") {
    const std::string dir = fresh_dir("oom");
    auto options = fast_options(dir, "0,1");
    options.retries = 1;
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    const auto summary = scheduler.run({
        Task::shell("first-attempt", "if [ $MULTIGPU_TASK_ATTEMPT = 1 ]; then echo 'CUDA out of memory'; exit 1; fi; "
                                     "head -c 100000 /dev/zero | tr '\\0' x; exit 2"),
        Task::shell("long-after", "echo 'torch.OutOfMemoryError: CUDA out of memory'; "
                                  "head -c 200000 /dev/zero | tr '\\0' y; exit 1"),
        Task::shell("plain", "exit 1"),
    });
    CHECK(result_of(summary, "first-attempt").attempts == 2);
    CHECK(result_of(summary, "first-attempt").error == "exit code 2");
    CHECK(result_of(summary, "first-attempt").out_of_memory);
    CHECK(result_of(summary, "long-after").out_of_memory);
    CHECK_FALSE(result_of(summary, "plain").out_of_memory);
  }

  TEST_CASE("exit code 128+N under sh: killed by a signal only when the shell said so") {
    const std::string dir = fresh_dir("signals");
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    const auto summary = scheduler.run({
        Task::shell("crashes", "sh -c 'kill -SEGV $$'; exit $?"),
        Task::shell("says-139", "exit 139"),
    });
    CHECK(result_of(summary, "crashes").exit_code == 139);
    CHECK(result_of(summary, "crashes").error == "killed by SIGSEGV (signal 11; /bin/sh reported exit code 139)");
    CHECK(result_of(summary, "says-139").error == "exit code 139 (a command under sh killed by SIGSEGV?)");
  }
}

TEST_SUITE("task files") {
  TEST_CASE("a NUL byte in a task file is an error naming the line") {
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                multigpu::parse_tasks(std::string("true\necho a\0b\n", 14), "my.tasks")) ==
          "my.tasks:2: a NUL byte at column 7; a task file is text, and the shell would cut the command there");
  }
}

// Issue 17: dependencies between tasks ([after=NAME], Task::after).
namespace {

/// `task`, started only after the tasks named.
Task after(Task task, std::vector<std::string> names) {
  task.after = std::move(names);
  return task;
}

}  // namespace

TEST_SUITE("scheduler: dependencies") {
  TEST_CASE("after= in a task file: several names, grid placeholders, defaults, and what the dry run shows") {
    const auto tasks = multigpu::parse_tasks(
        "grid rate = 0.1 0.2\n"
        "[name=train-{rate}] train {rate}\n"
        "[name=eval-{rate} after=train-{rate}] eval {rate}\n"
        "[name=report after=eval-0.1,eval-0.2 after=train-0.1] report\n"
        "prepare\n"
        "[after=task-06] uses the default name\n",
        "deps.tasks");
    REQUIRE(tasks.size() == 7);
    CHECK(tasks[0].after.empty());
    CHECK(tasks[2].name == "eval-0.1");
    CHECK(tasks[2].after == std::vector<std::string>{"train-0.1"});
    CHECK(tasks[3].after == std::vector<std::string>{"train-0.2"});
    CHECK(tasks[4].after == std::vector<std::string>{"eval-0.1", "eval-0.2", "train-0.1"});
    CHECK(tasks[6].after == std::vector<std::string>{"task-06"});
    const std::string dir = fresh_dir("deps_plan");
    FakeScheduler scheduler(fast_options(dir, "0,1"), FakeRuntime::with_gpus(2));
    const auto plan = scheduler.plan(tasks);
    CHECK(plan[4].after == std::vector<std::string>{"eval-0.1", "eval-0.2", "train-0.1"});
  }

  TEST_CASE("after= mistakes name the file and line: an unknown name, a task after itself, a cycle, an empty name") {
    auto message = [](const std::string& text) {
      return MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::parse_tasks(text, "my.tasks"));
    };
    CHECK(message("[name=a] x\n[name=b after=trian] y\n") ==
          "my.tasks:2: task \"b\" runs after \"trian\", but no task has that name");
    CHECK(message("[name=a after=a] x\n") == "my.tasks:1: task \"a\" runs after itself; after= names other tasks");
    CHECK(message("[name=a after=b] x\n[name=b after=a] y\n") ==
          "my.tasks:1: the tasks' after= form a cycle: a -> b -> a; none of them could ever start");
    CHECK(contains(message("[name=z] w\n[name=a after=c] x\n[name=b after=a] y\n[name=c after=b,z] y\n"),
                   "my.tasks:2: the tasks' after= form a cycle: a -> c -> b -> a"));
    CHECK(message("[name=a] x\n[name=b after=a,] y\n") ==
          "my.tasks:2: after=a, has an empty name; write after=NAME or after=NAME,NAME");
    CHECK(contains(message("[name=b after=train-{rte}] y\n"), "my.tasks:1: unknown placeholder {rte}"));
    CHECK(message("[name=a after] x\n") ==
          "my.tasks:1: option \"after\" needs a value: name=..., done=..., gpus=N, after=NAME,..., mem=SIZE");
  }

  TEST_CASE("a queue from C++ is checked the same way before anything runs") {
    const std::string dir = fresh_dir("deps_check");
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    std::atomic<int> ran{0};
    auto count = [&](TaskContext&) { ++ran; };
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                scheduler.run({after(Task::callable("a", count), {"nobody"})})) ==
          "task \"a\" runs after \"nobody\", but no task has that name");
    CHECK(MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError,
                                scheduler.run({Task::callable("x", count), after(Task::callable("a", count), {"b"}),
                                               after(Task::callable("b", count), {"a"})})) ==
          "the tasks' after= form a cycle: a -> b -> a; none of them could ever start");
    CHECK(ran.load() == 0);
  }

  TEST_CASE("a task starts only after its dependencies are done or skipped, and waits without holding a device") {
    const std::string dir = fresh_dir("deps_order");
    std::ofstream(dir + "/skipped-done") << "x";
    // One device, one slot: a waiting task that held it would block forever.
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    std::mutex mutex;
    std::vector<std::string> order;
    auto record = [&](TaskContext& context) {
      std::lock_guard<std::mutex> lock(mutex);
      order.push_back(context.name());
    };
    const auto summary = scheduler.run({
        after(Task::callable("report", record), {"eval", "train"}),
        after(Task::callable("eval", record), {"train", "old"}),
        Task::callable("train", record),
        Task::callable("old", record, dir + "/skipped-done"),
    });
    CHECK(summary.exit_code() == 0);
    CHECK(order == std::vector<std::string>{"train", "eval", "report"});
    CHECK(result_of(summary, "old").status == TaskStatus::kSkipped);
    CHECK(summary.count(TaskStatus::kDone) == 3);
  }

  TEST_CASE("when a dependency fails after its retries, the tasks after it are not run, transitively") {
    const std::string dir = fresh_dir("deps_fail");
    auto options = fast_options(dir, "0,1");
    options.retries = 1;
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    std::atomic<int> train_attempts{0};
    std::atomic<bool> dependent_ran{false};
    const auto summary = scheduler.run({
        Task::callable("train",
                       [&](TaskContext&) {
                         ++train_attempts;
                         throw std::runtime_error("diverged");
                       }),
        after(Task::callable("eval", [&](TaskContext&) { dependent_ran = true; }), {"train"}),
        after(Task::callable("report", [&](TaskContext&) { dependent_ran = true; }), {"eval", "other"}),
        Task::callable("other", [](TaskContext&) {}),
    });
    CHECK(summary.exit_code() == 1);
    CHECK(train_attempts.load() == 2);
    CHECK_FALSE(dependent_ran.load());
    CHECK(result_of(summary, "train").status == TaskStatus::kFailed);
    const auto& eval = result_of(summary, "eval");
    CHECK(eval.status == TaskStatus::kFailed);
    CHECK(eval.attempts == 0);
    CHECK(eval.error == "not run: task train, which it runs after, failed");
    CHECK(contains(read_file(eval.log_path),
                   "### multigpu: task eval not run: task train, which it runs after, failed"));
    const auto& report = result_of(summary, "report");
    CHECK(report.status == TaskStatus::kFailed);
    CHECK(report.attempts == 0);
    CHECK(report.error == "not run: task eval, which it runs after, was not run (task train failed)");
    CHECK(result_of(summary, "other").status == TaskStatus::kDone);
    const auto json = nlohmann::json::parse(read_file(summary.json_path));
    CHECK(json["counts"]["failed"] == 3);
    CHECK(json["tasks"][1]["error"] == "not run: task train, which it runs after, failed");
  }

  TEST_CASE("a failure ends only the waiting tasks reachable from it, as a scan of every task would") {
    // See Note [Dependencies at scale]. t0 failed, t6 is done; t1..t5 and t7 wait.
    const std::vector<std::vector<std::size_t>> after_lists = {{}, {0}, {1}, {4, 2}, {}, {4}, {}, {6}};
    std::vector<multigpu::TaskResult> results(after_lists.size());
    std::vector<const multigpu::TaskResult*> pointers;
    for (std::size_t i = 0; i < results.size(); ++i) {
      results[i].name = "t" + std::to_string(i);
      pointers.push_back(&results[i]);
    }
    results[0].status = TaskStatus::kFailed;
    results[6].status = TaskStatus::kDone;
    const auto waiting = [](std::size_t i) { return i != 0 && i != 6; };
    const auto dependents = multigpu::detail::dependents_of(after_lists);
    CHECK(dependents[4] == std::vector<std::size_t>{3, 5});
    const auto candidates = multigpu::detail::waiting_dependents(dependents, {0}, waiting);
    CHECK(candidates == std::vector<std::size_t>{1, 2, 3});
    const auto not_run = multigpu::detail::tasks_not_run(after_lists, pointers, candidates, waiting);
    REQUIRE(not_run.size() == 3);
    CHECK(not_run[0] == std::pair<std::size_t, std::string>{1, "not run: task t0, which it runs after, failed"});
    CHECK(not_run[1] == std::pair<std::size_t, std::string>{
                            2, "not run: task t1, which it runs after, was not run (task t0 failed)"});
    CHECK(not_run[2] == std::pair<std::size_t, std::string>{
                            3, "not run: task t2, which it runs after, was not run (task t0 failed)"});
    CHECK(multigpu::detail::waiting_dependents(dependents, {6}, waiting) == std::vector<std::size_t>{7});
  }

  TEST_CASE("real sh tasks on CPU slots: a grid of train and eval, the eval of a failed train not run") {
    const std::string dir = fresh_dir("deps_sh");
    std::ofstream(dir + "/deps.tasks") << "grid rate = 1 2 3\n"
                                       << "[name=eval-{rate} after=train-{rate}] test -f " << dir << "/model-{rate}\n"
                                       << "[name=train-{rate}] sleep 0.2; test {rate} != 2 && touch " << dir
                                       << "/model-{rate}\n";
    const auto tasks = multigpu::read_task_file(dir + "/deps.tasks");
    auto options = fast_options(dir, "cpu");
    options.max_per_device = 2;
    multigpu::Scheduler scheduler(options);
    const auto summary = scheduler.run(tasks);
    CHECK(summary.exit_code() == 1);
    CHECK(result_of(summary, "train-1").status == TaskStatus::kDone);
    CHECK(result_of(summary, "eval-1").status == TaskStatus::kDone);  // the model was there
    CHECK(result_of(summary, "eval-3").status == TaskStatus::kDone);
    CHECK(result_of(summary, "train-2").status == TaskStatus::kFailed);
    CHECK(result_of(summary, "eval-2").status == TaskStatus::kFailed);
    CHECK(result_of(summary, "eval-2").error == "not run: task train-2, which it runs after, failed");
  }
}

// Issue 17: --fail-fast.
TEST_SUITE("scheduler: fail fast") {
  TEST_CASE("fail_fast: the first failure for good stops the run, running tasks the orderly way, exit code 1") {
    const std::string dir = fresh_dir("fail_fast");
    auto options = fast_options(dir, "0");
    options.max_per_device = 2;  // slow and broken at once; broken's retry before later
    options.fail_fast = true;
    options.retries = 1;
    options.grace_period = std::chrono::seconds(3);
    FakeScheduler scheduler(options, FakeRuntime::with_gpus(2));
    const std::string token = fmt::format("37.{}", ::getpid());  // a sleep nobody else runs
    std::atomic<int> attempts{0};
    const auto start = std::chrono::steady_clock::now();
    const auto summary = scheduler.run({
        Task::shell("slow", fmt::format("sleep {}", token)),
        Task::callable("broken",
                       [&](TaskContext&) {
                         ++attempts;
                         std::this_thread::sleep_for(std::chrono::milliseconds(100));
                         throw std::runtime_error("diverged");
                       }),
        Task::shell("later", "true"),
        after(Task::shell("after-broken", "true"), {"broken"}),
    });
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(20));
    CHECK(attempts.load() == 2);  // its retry first: failed for good only then
    CHECK(summary.exit_code() == 1);
    CHECK(summary.interrupted);
    CHECK(summary.stop_signal == 0);
    CHECK(summary.fail_fast_task == "broken");
    CHECK(result_of(summary, "broken").status == TaskStatus::kFailed);
    CHECK(result_of(summary, "slow").status == TaskStatus::kInterrupted);
    CHECK(result_of(summary, "later").status == TaskStatus::kPending);
    CHECK(result_of(summary, "later").attempts == 0);
    CHECK(result_of(summary, "after-broken").status == TaskStatus::kPending);  // never started
    CHECK(processes_with("sleep " + token) == 0);
    const auto json = nlohmann::json::parse(read_file(summary.json_path));
    CHECK(json["fail_fast_task"] == "broken");
    CHECK(json["interrupted"] == true);
    CHECK(json["counts"]["pending"] == 2);
  }

  TEST_CASE("without fail_fast a failure stops nothing, and the summary names no task") {
    const std::string dir = fresh_dir("no_fail_fast");
    FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
    const auto summary = scheduler.run({Task::shell("broken", "exit 3"), Task::shell("later", "true")});
    CHECK(summary.exit_code() == 1);
    CHECK_FALSE(summary.interrupted);
    CHECK(summary.fail_fast_task.empty());
    CHECK(result_of(summary, "later").status == TaskStatus::kDone);
    CHECK(nlohmann::json::parse(read_file(summary.json_path))["fail_fast_task"].is_null());
  }
}

// Issue 29: nothing a task started outlives it, an inherited "ignore" is
// kept, and a task file cannot expand past a limit.
namespace {

/// Whether the process `pid` has ended (gone, or a zombie).
bool process_gone(long pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return true;
  multigpu::detail::ProcessEntry entry;
  const std::string stat = read_file(fmt::format("/proc/{}/stat", pid));
  return multigpu::detail::parse_stat(stat.data(), stat.size(), entry) && entry.zombie;
}

/// The pid a task wrote to `path`, once it has.
long pid_written_to(const std::string& path) {
  long pid = -1;
  eventually([&] {
    pid = std::atol(read_file(path).c_str());
    return pid > 0;
  });
  return pid;
}

/// Ends the processes a test started and removes its folder, also when a check failed.
struct Leftovers {
  std::string dir;
  std::vector<long> pids;
  ~Leftovers() {
    for (long pid : pids) {
      if (!process_gone(pid)) ::kill(static_cast<pid_t>(pid), SIGKILL);
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
};

bool ignored(int signal) {
  struct sigaction now {};
  ::sigaction(signal, nullptr, &now);
  return now.sa_handler == SIG_IGN;
}

}  // namespace

TEST_SUITE("scheduler: nothing outlives its task") {
  TEST_CASE("a process a task started in a session of its own ends with the task: on its own, at a stop, at SIGKILL") {
    // As torchrun starts its workers (start_new_session=True): not in the
    // task's process group. See Note [Every process a task started].
    Leftovers left{fresh_dir("sessions"), {}};
    const std::string& dir = left.dir;
    const auto environment = multigpu::detail::environment_with({});
    using multigpu::detail::ChildProcess;
    const auto setsid = [&](const std::string& name, const std::string& before) {
      return fmt::format("setsid -f sh -c '{}echo $$ > {}/{}; exec sleep 61'", before, dir, name);
    };
    SUBCASE("the command ends on its own: what it left in another session is killed before the task ends") {
      ChildProcess child(setsid("own", "") + fmt::format("; until [ -s {0}/own ]; do sleep 0.02; done", dir),
                         environment, dir + "/own.log");
      const long pid = pid_written_to(dir + "/own");
      left.pids.push_back(pid);
      REQUIRE(eventually([&] { return child.poll().has_value(); }, std::chrono::seconds(10)));
      CHECK(child.poll()->success());
      CHECK(process_gone(pid));
    }
    SUBCASE("a stop: SIGTERM reaches it, and the task ends when it is gone") {
      ChildProcess child(setsid("stopped", "") + "; sleep 62", environment, dir + "/stopped.log");
      const long pid = pid_written_to(dir + "/stopped");
      left.pids.push_back(pid);
      child.kill_group(SIGTERM);
      // Without the forwarded SIGTERM the supervisor waits for it forever.
      CHECK(eventually([&] { return child.poll().has_value(); }, std::chrono::seconds(10)));
      CHECK(process_gone(pid));
    }
    SUBCASE("one that ignores SIGTERM is SIGKILLed at the end of the grace period") {
      ChildProcess child(setsid("stubborn", "trap \"\" TERM; ") + "; sleep 63", environment, dir + "/stubborn.log");
      const long pid = pid_written_to(dir + "/stubborn");
      left.pids.push_back(pid);
      child.kill_group(SIGTERM);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      CHECK_FALSE(process_gone(pid));  // it ignores SIGTERM: the grace period is not over
      CHECK_FALSE(child.poll().has_value());
      child.kill_group(SIGKILL);
      CHECK(eventually([&] { return child.poll().has_value(); }, std::chrono::seconds(10)));
      CHECK(eventually([&] { return process_gone(pid); }, std::chrono::seconds(5)));
    }
  }

  TEST_CASE("the process table: parents, groups and zombies from /proc, without the heap") {
    multigpu::detail::ProcessEntry entry;
    const std::string stat = "123 (a) b) (c) Z 7 99 1 0";
    REQUIRE(multigpu::detail::parse_stat(stat.data(), stat.size(), entry));
    CHECK(entry.parent == 7);
    CHECK(entry.group == 99);
    CHECK(entry.zombie);
    const std::string cut = "123 (sh) S 45";
    CHECK_FALSE(multigpu::detail::parse_stat(cut.data(), cut.size(), entry));
    // This process's own children: a sleep started here is found below it, and nothing else is.
    const std::string token = fmt::format("sleep 64.{}", ::getpid());
    const pid_t child = ::fork();
    if (child == 0) {
      ::execlp("sleep", "sleep", token.substr(6).c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    std::vector<long> below;
    eventually([&] {
      below.clear();
      multigpu::detail::for_each_descendant(::getpid(), [&](const multigpu::detail::ProcessEntry& e) {
        if (!e.zombie) below.push_back(e.pid);
      });
      return std::find(below.begin(), below.end(), static_cast<long>(child)) != below.end();
    });
    CHECK(std::find(below.begin(), below.end(), static_cast<long>(child)) != below.end());
    CHECK(std::find(below.begin(), below.end(), static_cast<long>(::getpid())) == below.end());
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
  }

  TEST_CASE("SIGHUP and SIGINT inherited as ignored stay ignored during a run (nohup, a script's background job)") {
    Leftovers left{fresh_dir("nohup"), {}};
    const std::string& dir = left.dir;
    auto options = fast_options(dir, "0");
    options.handle_signals = true;
    options.interrupt_drains = false;  // a Ctrl-C that was not ignored would stop the task
    for (const int signal : {SIGHUP, SIGINT}) {
      CAPTURE(signal);
      std::filesystem::remove(dir + "/go");
      std::filesystem::remove(dir + "/started");
      const SignalAction ignore(signal, SIG_IGN);
      FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
      std::thread sender([&] {
        eventually([&] { return multigpu::detail::path_exists(dir + "/started"); });
        ::kill(::getpid(), signal);
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::ofstream(dir + "/go") << "";
      });
      const auto summary = scheduler.run({Task::shell(
          "gated", fmt::format("touch {0}/started; until [ -e {0}/go ]; do sleep 0.02; done; echo went on", dir))});
      sender.join();
      CHECK_FALSE(summary.interrupted);
      CHECK(result_of(summary, "gated").status == TaskStatus::kDone);
      CHECK(contains(read_file(dir + "/logs/gated.log"), "went on"));
      CHECK(ignored(signal));  // still ignored after the run
    }
  }

  TEST_CASE("a task file over the limit of tasks is refused before it is expanded, naming the line and the count") {
    std::string huge = "# three grids\n";
    for (const char* name : {"a", "b", "c"}) {
      huge += fmt::format("grid {} =", name);
      for (int v = 0; v < 1000; ++v) huge += fmt::format(" {}", v);
      huge += "\n";
    }
    huge += "echo {a} {b} {c}\n";
    const auto start = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH_AS(multigpu::parse_tasks(huge, "huge.tasks"),
                         "huge.tasks:5: this line expands to 1000000000 tasks (grids a 1000 x b 1000 x c 1000), more "
                         "than the limit of 100000; give a larger --max-tasks (max_tasks in C++) to run that many",
                         multigpu::SchedulerError);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));  // counted, not expanded
    const std::string small = "grid a = 1 2 3\necho {a}\necho once\n";
    CHECK_THROWS_WITH_AS(multigpu::parse_tasks(small, "small.tasks", 1, 3),
                         "small.tasks:3: with this line the file has 4 tasks, more than the limit of 3; give a larger "
                         "--max-tasks (max_tasks in C++) to run that many",
                         multigpu::SchedulerError);
    CHECK(multigpu::parse_tasks(small, "small.tasks", 1, 4).size() == 4);
    CHECK(multigpu::kDefaultMaxTasks == 100000);
  }
}

TEST_SUITE("scheduler: its files") {
  TEST_CASE("a symbolic link planted at a temporary's name is never followed: the file outside is untouched") {
    // See Note [Temporary files are made, never found].
    Leftovers left{fresh_dir("planted"), {}};
    const std::string& dir = left.dir;
    const std::string outside = dir + "/outside.txt";
    std::ofstream(outside) << "precious\n";
    // The names the next temporaries beside `target` would take: the pid and a counter.
    const auto plant = [&](const std::string& target, int count) {
      const std::string next = multigpu::detail::temporary_path_for(target);  // uses one number
      const std::string stem = next.substr(0, next.rfind('-') + 1);
      const long number = std::atol(next.c_str() + stem.size());
      std::vector<std::string> links;
      for (long n = number + 1; n <= number + count; ++n) {
        links.push_back(stem + std::to_string(n));
        std::filesystem::create_symlink(std::filesystem::absolute(outside), links.back());
      }
      return links;
    };
    const auto all_links = [](const std::vector<std::string>& links) {
      return std::all_of(links.begin(), links.end(), [](const std::string& link) {
        return std::filesystem::is_symlink(std::filesystem::symlink_status(link));
      });
    };
    SUBCASE("write_file_atomically") {
      const std::string target = dir + "/record.json";
      const auto links = plant(target, 5);
      multigpu::detail::write_file_atomically(target, "new\n");
      CHECK(read_file(target) == "new\n");
      CHECK_FALSE(std::filesystem::is_symlink(std::filesystem::symlink_status(target)));
      CHECK(all_links(links));  // left alone: not ours
    }
    SUBCASE("write_file_atomically_with, whose writer streams into the temporary (checkpoints)") {
      const std::string target = dir + "/model.pt";
      const auto links = plant(target, 5);
      multigpu::detail::write_file_atomically_with(target, [](multigpu::detail::FileSink& sink) {
        sink.write("weights\n", 8);
      });
      CHECK(read_file(target) == "weights\n");
      CHECK(all_links(links));
    }
    SUBCASE("a run's summary and done records") {
      auto options = fast_options(dir, "0");
      multigpu::detail::make_directories(options.log_dir + "/.done");
      // The next 300 names, each planted for one of the three files in turn:
      // every write of the run meets links, and none runs out of names
      // (kTemporaryAttempts), however often the summary is written (Note
      // [How often the summary is written]).
      const std::vector<std::string> targets = {options.log_dir + "/summary.json", options.log_dir + "/summary.csv",
                                                options.log_dir + "/.done/made.json"};
      const std::string next = multigpu::detail::temporary_path_for(targets[0]);
      const std::string middle = next.substr(targets[0].size(), next.rfind('-') + 1 - targets[0].size());
      const long number = std::atol(next.c_str() + next.rfind('-') + 1);
      std::vector<std::string> links;
      for (long n = number + 1; n <= number + 300; ++n) {
        links.push_back(targets[static_cast<std::size_t>(n % 3)] + middle + std::to_string(n));
        std::filesystem::create_symlink(std::filesystem::absolute(outside), links.back());
      }
      FakeScheduler scheduler(options, FakeRuntime::with_gpus(1));
      const auto summary = scheduler.run(
          {Task::shell("made", fmt::format("touch {}/made.marker", dir), fmt::format("{}/made.marker", dir))});
      CHECK(result_of(summary, "made").status == TaskStatus::kDone);
      CHECK(contains(read_file(summary.json_path), "\"made\""));
      CHECK(contains(read_file(options.log_dir + "/.done/made.json"), "made.marker"));
      CHECK(all_links(links));
    }
    CHECK(read_file(outside) == "precious\n");
  }

  TEST_CASE("the summary written task by task has the layout of one JSON document written at once") {
    // See summary_json: its tasks are appended as text, one object at a time.
    std::vector<multigpu::TaskResult> results(2);
    results[0].name = "first";
    results[0].status = TaskStatus::kDone;
    results[0].devices = {"cuda:0", "cuda:1"};
    results[0].exit_code = 0;
    results[0].error = "two\nlines";
    results[1].name = "second";
    for (std::size_t count : {0, 1, 2}) {
      std::vector<const multigpu::TaskResult*> pointers;
      for (std::size_t i = 0; i < count; ++i) pointers.push_back(&results[i]);
      const std::string text = multigpu::detail::summary_json(pointers, true, false, 1.5);
      CHECK(text == nlohmann::ordered_json::parse(text).dump(2) + "\n");
      CHECK(nlohmann::json::parse(text)["tasks"].size() == count);
    }
  }

  TEST_CASE("a command with bytes that are not UTF-8 is recorded byte for byte: the next run skips it") {
    Leftovers left{fresh_dir("latin1"), {}};
    const std::string& dir = left.dir;
    const std::string marker = dir + "/caf\xe9.done";  // a Latin-1 file name
    const auto run = [&] {
      FakeScheduler scheduler(fast_options(dir, "0"), FakeRuntime::with_gpus(1));
      return result_of(scheduler.run({Task::shell("latin", fmt::format("touch '{}'", marker), marker)}), "latin");
    };
    CHECK(run().status == TaskStatus::kDone);
    const auto record = nlohmann::json::parse(read_file(dir + "/logs/.done/latin.json"));
    CHECK(record.value("command_hex", "") == multigpu::detail::hex_of(fmt::format("touch '{}'", marker)));
    CHECK(run().status == TaskStatus::kSkipped);  // the same command, not another one
    CHECK(multigpu::detail::bytes_from_hex("00ff41") == std::string("\0\xff" "A", 3));
    CHECK_FALSE(multigpu::detail::bytes_from_hex("0g").has_value());
  }
}
