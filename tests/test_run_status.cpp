// multigpu-run status: reading a run's summary, telling whether the run is
// alive, and the table it prints (issue 17, "See it from anywhere").
#include "support.hpp"  // first: see its comment

#include <filesystem>
#include <fstream>
#include <string>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "multigpu/scheduler.hpp"
#include "multigpu/scheduler/run_status.hpp"

using multigpu::RunLiveness;
using multigpu_test::contains;

namespace {

std::string status_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("multigpu-status-{}-{}", name, ::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

std::string this_host() { return multigpu::detail::host_name(); }

nlohmann::json task_json(const std::string& name, const std::string& status, bool running, double start_unix,
                         double seconds, int attempts, const std::string& log, const std::string& error = "") {
  return {{"task", name},        {"status", status},   {"running", running},
          {"devices", {"cuda:0 (physical 3, H100)"}},  {"start_unix", start_unix},
          {"seconds", seconds},  {"attempts", attempts}, {"error", error},
          {"out_of_memory", false}, {"log", log}};
}

void write_json(const std::string& path, const nlohmann::json& json) { std::ofstream(path) << json.dump(2); }

/// Holds an flock on `path` while in scope, as a running scheduler does.
struct HeldLock {
  explicit HeldLock(const std::string& path) : fd(::open(path.c_str(), O_RDWR | O_CREAT, 0644)) {
    REQUIRE(fd >= 0);
    REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
  }
  ~HeldLock() { ::close(fd); }
  int fd;
};

}  // namespace

TEST_SUITE("multigpu-run status") {
  TEST_CASE("a live run: running tasks with device, time and last log line, failures with why, an ETA") {
    const std::string dir = status_dir("live");
    const double now = 1'800'000'000.0;
    std::ofstream(dir + "/b.log") << "epoch 1\nstep 5/10\rstep 6/10\r\n";
    std::ofstream(dir + "/a.log") << "### multigpu: task a, attempt 1\nfinal loss 0.1\n### done in 10.0 s\n";
    nlohmann::json json = {{"finished", false}, {"interrupted", false}, {"seconds", 20.0},
                           {"updated_unix", now - 3}, {"pid", static_cast<long>(::getpid())},
                           {"host", this_host()}, {"slots", 2}};
    json["tasks"] = {task_json("a", "done", false, now - 20, 10, 1, dir + "/a.log"),
                     task_json("b", "pending", true, now - 4, 0, 2, dir + "/b.log"),
                     task_json("c", "pending", false, 0, 0, 0, dir + "/c.log"),
                     task_json("d", "failed", false, now - 15, 1, 1, dir + "/d.log", "exit code 3")};
    write_json(dir + "/summary.json", json);
    HeldLock lock(multigpu::run_lock_path(dir));

    const auto run = multigpu::read_run_status(dir + "/summary.json", multigpu::run_lock_path(dir));
    CHECK(run.liveness == RunLiveness::kRunning);
    CHECK(run.tasks.size() == 4);
    // mean of the done tasks 10 s: c waits (10 s), b has 10 - 4 = 6 s left, over 2 slots.
    CHECK(multigpu::run_eta_seconds(run, now) == doctest::Approx(8.0));
    const std::string table = multigpu::render_run_status(run, now);
    INFO(table);
    CHECK(contains(table, fmt::format("running (pid {} on {})", ::getpid(), this_host())));
    CHECK(contains(table, "4 tasks: 1 running, 1 done, 1 failed, 0 skipped, 0 interrupted, 1 pending"));
    CHECK(contains(table, "written 3s ago; ETA ~8s"));
    CHECK(contains(table, "b     running      cuda:0         4s      2  step 6/10\n"));
    CHECK(contains(table, "a     done         cuda:0        10s      1  final loss 0.1\n"));
    CHECK(contains(table, "c     pending      -               -      0  \n"));
    CHECK(contains(table, "d     failed       cuda:0         1s      1  exit code 3\n"));
    CHECK_FALSE(contains(table, "PEAK MEM"));  // nothing measured: no column for it

    json["tasks"][0]["peak_gpu_mib"] = 7000;  // a measured GPU task: each line says its peak
    write_json(dir + "/summary.json", json);
    const std::string with_peaks = multigpu::render_run_status(
        multigpu::read_run_status(dir + "/summary.json", multigpu::run_lock_path(dir)), now);
    INFO(with_peaks);
    CHECK(contains(with_peaks, "TRIES   PEAK MEM  LAST LOG LINE\n"));
    CHECK(contains(with_peaks, "a     done         cuda:0        10s      1    6.8 GiB  final loss 0.1\n"));
    CHECK(contains(with_peaks, "c     pending      -               -      0          -  \n"));
  }

  TEST_CASE("a run that was killed, one whose scheduler died before its tasks, a finished one, another host's") {
    const std::string dir = status_dir("ended");
    const std::string summary = dir + "/summary.json";
    const std::string lock_path = multigpu::run_lock_path(dir);
    nlohmann::json json = {{"finished", false}, {"pid", static_cast<long>(::getpid())}, {"host", this_host()},
                           {"slots", 1}};
    json["tasks"] = {task_json("a", "pending", true, 1.0, 0, 1, dir + "/a.log")};
    write_json(summary, json);
    std::ofstream(lock_path) << "pid 1 on host x\n";  // the file stays; nobody holds the lock

    auto run = multigpu::read_run_status(summary, lock_path);
    CHECK(run.liveness == RunLiveness::kEnded);
    const std::string table = multigpu::render_run_status(run, 100.0);
    CHECK(contains(table, "ended without finishing"));
    CHECK(contains(table, "1 tasks: 0 running, 0 done, 0 failed, 0 skipped, 1 interrupted, 0 pending"));
    CHECK(contains(table, "a     cut off"));

    // The lock is held (by a task's supervisor), the scheduler's pid is gone.
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    int status = 0;
    ::waitpid(child, &status, 0);
    json["pid"] = static_cast<long>(child);
    write_json(summary, json);
    {
      HeldLock lock(lock_path);
      run = multigpu::read_run_status(summary, lock_path);
      CHECK(run.liveness == RunLiveness::kOrphaned);
      CHECK(contains(multigpu::render_run_status(run, 100.0), "is gone; its tasks are being stopped"));
    }

    json["host"] = "some-other-host.example";
    write_json(summary, json);
    CHECK(multigpu::read_run_status(summary, lock_path).liveness == RunLiveness::kElsewhere);

    // A summary kept elsewhere names its log folder: that lock counts, not the caller's guess.
    json["host"] = this_host();
    json["pid"] = static_cast<long>(::getpid());
    json["log_dir"] = dir;
    write_json(summary, json);
    {
      HeldLock lock(lock_path);
      CHECK(multigpu::read_run_status(summary, dir + "/elsewhere/.multigpu-run.lock").liveness ==
            RunLiveness::kRunning);
    }

    json["finished"] = true;
    json["tasks"] = {task_json("a", "done", false, 1.0, 5, 1, dir + "/a.log")};
    write_json(summary, json);
    run = multigpu::read_run_status(summary, lock_path);
    CHECK(run.liveness == RunLiveness::kFinished);
    CHECK(contains(multigpu::render_run_status(run, 100.0), "finished - 1 tasks: 0 running, 1 done"));
    json["error"] = "cannot write summary.json: No space left on device";
    write_json(summary, json);
    CHECK(contains(multigpu::render_run_status(multigpu::read_run_status(summary, lock_path), 100.0),
                   "the scheduler failed: cannot write summary.json: No space left on device - 1 tasks"));
  }

  TEST_CASE("no summary, or a file that is not one, is an error naming the file") {
    const std::string dir = status_dir("errors");
    const std::string lock_path = multigpu::run_lock_path(dir);
    std::string message = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::read_run_status(dir + "/none.json", lock_path));
    CHECK(contains(message, "no run summary at " + dir + "/none.json: no such file"));
    CHECK(contains(message, "give the run's --log-dir"));
    std::ofstream(dir + "/broken.json") << "{\"tasks\": [";
    message = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::read_run_status(dir + "/broken.json", lock_path));
    CHECK(contains(message, dir + "/broken.json is not a multigpu-run summary: "));
    std::ofstream(dir + "/other.json") << "{\"loss\": 3}";
    message = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::read_run_status(dir + "/other.json", lock_path));
    CHECK(contains(message, "is not a multigpu-run summary: it has no \"tasks\" list"));
    std::ofstream(dir + "/typed.json") << "{\"tasks\": [{\"task\": 3}]}";
    message = MULTIGPU_TEST_MESSAGE(multigpu::SchedulerError, multigpu::read_run_status(dir + "/typed.json", lock_path));
    CHECK(contains(message, "is not a multigpu-run summary: "));
  }

  TEST_CASE("the last log line is what a terminal shows: after the last carriage return, no escapes, cut to width") {
    const std::string dir = status_dir("lines");
    std::ofstream(dir + "/log") << "first\n\x1b[31mred\x1b[0m 10%\r 50%\r 90%\n\n";
    CHECK(multigpu::detail::last_log_line(dir + "/log", 80) == " 90%");
    std::ofstream(dir + "/long") << std::string(100, 'x') << "\n";
    CHECK(multigpu::detail::last_log_line(dir + "/long", 10) == "xxxxxxx...");
    std::ofstream(dir + "/ours") << "### multigpu: task t\n### done in 1.0 s\n";
    CHECK(multigpu::detail::last_log_line(dir + "/ours", 80).empty());
    std::ofstream(dir + "/color") << "\x1b[31mred\n";
    CHECK(multigpu::detail::last_log_line(dir + "/color", 80) == " [31mred");
    CHECK(multigpu::detail::last_log_line(dir + "/missing", 80).empty());
    CHECK(multigpu::detail::short_duration(3725) == "1h02m");
    CHECK(multigpu::detail::short_duration(65) == "1m05s");
  }
}
