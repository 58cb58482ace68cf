// multigpu-run: runs a task file over a pool of GPUs (or CPU slots), one task
// per free device, with per-task logs, skip-if-done, retries and a summary.
//
//   multigpu-run --gpus 0,1,2,3 experiments.tasks
//   multigpu-run --gpus cpu --max-per-gpu 4 examples/tasks/noise_grid.tasks
//   multigpu-run --dry-run experiments.tasks
//   multigpu-run status [LOG_DIR] [--watch]     # from any terminal, during or after a run
//   multigpu-run --slurm --partition gpu --time 4:00:00 experiments.tasks   # the same tasks as Slurm array jobs
//   multigpu-run cancel LOG_DIR                 # a --slurm run: cancel what is queued or running
//
// Exit status: 0 every task done or skipped, 1 some failed (also when that
// stopped the run: --fail-fast), 2 bad usage or task file (or the log folder
// is in use by another run), 130 / 143 / 129 stopped by Ctrl-C / SIGTERM /
// SIGHUP (the first Ctrl-C lets running tasks end).

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>
#include <thread>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <multigpu/device_spec.hpp>
#include <multigpu/scheduler.hpp>
#include <multigpu/scheduler/run_status.hpp>
#include <multigpu/scheduler/text.hpp>

#include <multigpu/scheduler/slurm_run.hpp>

namespace {

constexpr const char* kTaskFileHelp = R"(
Task files: one shell command per line; '#' starts a comment; a line ending
in '\' continues on the next. Options in brackets before a command:
  [name=NAME]       the task's name (default task-01, task-02, ...): its log is LOG_DIR/NAME.log
  [done=PATH]       skip the task when PATH exists (the task creates it when it has finished)
  [gpus=N]          devices the task needs at once (default --gpus-per-task)
  [after=A,B]       start only once tasks A and B are done (or skipped); when one of them
                    fails, this task is not run (failed, "not run: ..."); cycles are refused
  [mem=SIZE]        the most GPU memory it uses on one GPU (12G, 800M): with --max-per-gpu
                    auto, it starts where that plus --memory-margin fits; without it, the
                    peak measured in the last run in this log folder is used, and a task
                    never measured gets a GPU to itself
Grids: 'grid NAME = V1 V2 ...' defines {NAME}; a later line using {NAME}
runs once per value, and once per combination with several grids.
{gpu} is the CUDA_VISIBLE_DEVICES value given to the task, {task} its name,
each quoted so that the shell reads back the value, in or outside quotes
(for the name as shell code: eval "$MULTIGPU_TASK"); grid values are pasted
as written; {{ and }} are literal braces. Example:
  grid rate = 0.1 0.2 0.4
  grid kind = sym asym
  [name={kind}-{rate} done=out/{kind}-{rate}/model.pt] ./train --noise {rate} --type {kind} --out out/{kind}-{rate}
  [name=eval-{kind}-{rate} after={kind}-{rate}] ./eval out/{kind}-{rate}
On a Slurm cluster, the same file as array jobs (docs/scheduler.md):
  multigpu-run [options] --slurm [sbatch options...] TASKS
)";

volatile std::sig_atomic_t g_watch_stop = 0;

/// "a,b,,c" -> "a", "b", "", "c".
std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> pieces;
  std::size_t start = 0;
  std::size_t comma = text.find(',');
  while (comma != std::string::npos) {
    pieces.push_back(text.substr(start, comma - start));
    start = comma + 1;
    comma = text.find(',', start);
  }
  pieces.push_back(text.substr(start));
  return pieces;
}

/// A number of tasks written with digits only, 1 to 1000000; nullopt otherwise.
std::optional<int> parse_count(const std::string& text) {
  if (text.empty()) return std::nullopt;
  long value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
    if (value > 1000000) return std::nullopt;
  }
  if (value < 1) return std::nullopt;
  return static_cast<int>(value);
}

/// "1:02:03" or "2:03".
std::string clock_text(double seconds) {
  const auto total = static_cast<long>(seconds + 0.5);
  return total >= 3600 ? fmt::format("{}:{:02}:{:02}", total / 3600, (total / 60) % 60, total % 60)
                       : fmt::format("{}:{:02}", total / 60, total % 60);
}

/// `multigpu-run status`: prints the run's table once, or redraws it every
/// `interval` seconds until the run has ended or Ctrl-C.
int show_status(const std::string& log_dir, std::string summary, bool watch, double interval) {
  if (summary.empty()) summary = log_dir + "/summary.json";
  // The run's --summary PATH writes PATH.json: the same value works here.
  if (std::filesystem::path(summary).extension() != ".json") summary += ".json";
  const std::string lock = multigpu::run_lock_path(log_dir);
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::signal(SIGINT, [](int) { g_watch_stop = 1; });
  while (true) {
    const auto run = multigpu::read_run_status(summary, lock);
    const auto table = multigpu::render_run_status(run);
    if (watch && tty) fmt::print("\033[H\033[2J");  // redraw in place
    fmt::print("{}", table);
    std::fflush(stdout);
    const bool over = run.liveness == multigpu::RunLiveness::kFinished ||
                      run.liveness == multigpu::RunLiveness::kEnded;
    if (!watch || over) return 0;
    if (!tty) fmt::print("\n");
    for (double waited = 0; waited < interval && g_watch_stop == 0; waited += 0.1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (g_watch_stop != 0) return 0;
  }
}

// Note [Huge pages for the scheduler's memory]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Each command task starts with a fork of this process (its supervisor: Note
// [The task supervisor]), and a fork copies the page table entries of every
// private page: LibTorch's static data and heap, 75 MB before main() runs,
// and the tasks' own memory. With 4 KiB pages that copy was the largest
// part of a short task's cost, and it grew with the number of tasks. glibc
// asks for transparent huge pages for malloc's memory when its tunable
// glibc.malloc.hugetlb is 1, and a 2 MiB page is one entry to copy: measured
// with 2,000 `true` tasks on 8 slots, 7 to 9 s against 16 to 23 s. Tunables
// are read when a process starts, so the tool runs itself again with it set,
// from a function that the dynamic loader runs before any library's
// initialisers (.preinit_array: LibTorch's have not run yet, so this costs
// only the loading). main() then gives GLIBC_TUNABLES back its old value,
// so the tasks inherit the environment they were given. Where transparent
// huge pages are off, the tunable changes nothing. MULTIGPU_RUN_HUGE_PAGES=0
// skips all of it. Under AddressSanitizer or ThreadSanitizer their runtime's
// own .preinit_array entry (libasan_preinit.o, libtsan_preinit.o) is linked
// before ours and runs first, so the restart runs in an initialised runtime
// (checked: the tool's tests pass under both). Their allocator replaces
// malloc, so the tunable does nothing there; the restart is kept so that a
// sanitizer build runs the same path as a release build.
constexpr const char* kRestartMark = "MULTIGPU_RUN_RESTARTED=";        // then the old GLIBC_TUNABLES, if any
constexpr const char* kNoTunablesMark = "MULTIGPU_RUN_RESTARTED_NO_TUNABLES=1";
constexpr const char* kHugePages = "glibc.malloc.hugetlb=1";

/// Runs this program again with glibc's huge-page tunable (see the Note).
/// Before any library's initialisers: no allocation, only static buffers.
void restart_with_huge_pages(int, char** argv, char** envp) {
  static char* environment[4096];
  static char tunables[8192];
  static char mark[8192];
  const char* old = nullptr;
  std::size_t count = 0;
  for (char** entry = envp; entry != nullptr && *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, "MULTIGPU_RUN_RESTARTED", 22) == 0) return;  // restarted already
    if (std::strcmp(*entry, "MULTIGPU_RUN_HUGE_PAGES=0") == 0) return;
    if (std::strncmp(*entry, "GLIBC_TUNABLES=", 15) == 0) {
      old = *entry + 15;
      if (std::strstr(old, "glibc.malloc.hugetlb") != nullptr) return;  // the user's choice
      continue;
    }
    if (count + 3 >= sizeof(environment) / sizeof(environment[0])) return;
    environment[count++] = *entry;
  }
  if (old != nullptr) {
    if (std::strlen(old) + 64 >= sizeof(tunables)) return;
    std::snprintf(tunables, sizeof(tunables), "GLIBC_TUNABLES=%s:%s", old, kHugePages);
    std::snprintf(mark, sizeof(mark), "%s%s", kRestartMark, old);
  } else {
    std::snprintf(tunables, sizeof(tunables), "GLIBC_TUNABLES=%s", kHugePages);
    std::snprintf(mark, sizeof(mark), "%s", kNoTunablesMark);
  }
  environment[count++] = tunables;
  environment[count++] = mark;
  environment[count] = nullptr;
  ::execve("/proc/self/exe", argv, environment);  // if it fails: on as we are
}

/// Gives GLIBC_TUNABLES back the value it had before the restart.
void undo_restart_environment() {
  if (std::getenv("MULTIGPU_RUN_RESTARTED_NO_TUNABLES") != nullptr) {
    ::unsetenv("GLIBC_TUNABLES");
    ::unsetenv("MULTIGPU_RUN_RESTARTED_NO_TUNABLES");
  } else if (const char* old = std::getenv("MULTIGPU_RUN_RESTARTED")) {
    ::setenv("GLIBC_TUNABLES", std::string(old).c_str(), 1);
    ::unsetenv("MULTIGPU_RUN_RESTARTED");
  }
}

__attribute__((section(".preinit_array"), used)) void (*const restart_at_start)(int, char**, char**) =
    &restart_with_huge_pages;

}  // namespace

int main(int argc, char** argv) {
  undo_restart_environment();  // see Note [Huge pages for the scheduler's memory]
  // `--slurm [sbatch options...] TASKS`: what follows --slurm, but the last
  // argument (the task file), goes to sbatch as it is.
  std::vector<std::string> sbatch_options;
  bool slurm = false;
  std::vector<char*> own_arguments;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--slurm") == 0 && !slurm) {
      slurm = true;
      for (int j = i + 1; j + 1 < argc; ++j) sbatch_options.emplace_back(argv[j]);
      if (i + 1 < argc) own_arguments.push_back(argv[argc - 1]);
      break;
    }
    own_arguments.push_back(argv[i]);
  }
  if (slurm) {
    argc = static_cast<int>(own_arguments.size());
    own_arguments.push_back(nullptr);
    argv = own_arguments.data();
  }
  CLI::App app{"Runs a file of tasks over a pool of GPUs: each task starts as soon as a GPU is free."};
  app.footer(kTaskFileHelp);
  std::string task_file;
  multigpu::SchedulerOptions options;
  options.status_line = true;
  int gpus_per_task = 1;
  double grace_seconds = 10;
  double busy_wait_seconds = 0;
  bool skip_existing = true;
  bool dry_run = false;
  bool quiet = false;
  app.add_option("task-file", task_file, "The task file (see below)")->check(CLI::ExistingFile);
  auto* status = app.add_subcommand("status", "Show a run's tasks (running or ended) from its log folder");
  std::string status_dir = "multigpu-logs";
  std::string status_summary;
  bool watch = false;
  double watch_interval = 2;
  status->add_option("log-dir", status_dir, "The run's --log-dir")->capture_default_str();
  status->add_option("--summary", status_summary, "The run's summary file, when it was not LOG_DIR/summary.json");
  status->add_flag("-w,--watch", watch, "Redraw until the run ends (Ctrl-C to leave)");
  status->add_option("--interval", watch_interval, "Seconds between redraws with --watch")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));
  auto* cancel = app.add_subcommand("cancel", "A --slurm run: cancel its tasks still queued or running");
  std::string cancel_dir = "multigpu-logs";
  cancel->add_option("log-dir", cancel_dir, "The run's --log-dir")->capture_default_str();
  auto* slurm_task = app.add_subcommand("slurm-task", "")->group("");  // what each array task runs
  std::string slurm_task_dir;
  std::string slurm_task_offset;
  slurm_task->add_option("log-dir", slurm_task_dir)->required();
  slurm_task->add_option("offset", slurm_task_offset)->required();
  int throttle = 0;
  bool no_follow = false;
  app.add_option("--throttle", throttle, "With --slurm: at most N tasks of each array at once (sbatch --array=...%N)")
      ->check(CLI::Range(1, 1000000));
  double poll_seconds = 10;
  app.add_option("--poll", poll_seconds, "With --slurm: seconds between looks at squeue while following")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));
  app.add_flag("--no-follow", no_follow, "With --slurm: submit and return (see the run with `multigpu-run status`)");
  app.add_option("--gpus", options.devices, "Device pool: 0,1,2,3 | auto | all | cpu")->capture_default_str();
  std::string max_per_gpu = "1";
  std::string memory_margin = "1G";
  app.add_option("--max-per-gpu", max_per_gpu,
                 "Tasks at once on one device (or CPU slots); auto: as many as fit in GPU memory, by each task's "
                 "[mem=SIZE] or its peak in the last run")
      ->capture_default_str();
  app.add_option("--memory-margin", memory_margin, "With --max-per-gpu auto: kept free beside each task's size")
      ->capture_default_str();
  app.add_option("--gpus-per-task", gpus_per_task, "Devices each task needs (a line's [gpus=N] wins)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--memory-threshold", options.memory_threshold_mib,
                 "MiB in use by others above which a GPU is busy and waited for")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000000));
  app.add_option("--log-dir", options.log_dir, "Per-task logs (and the summary) go here")->capture_default_str();
  app.add_option("--summary", options.summary_path, "Write the summary to PATH.json and PATH.csv (default LOG_DIR/summary)");
  std::vector<std::string> force_values;
  auto* force = app.add_option("--force", force_values,
                               "Run tasks whose done file exists: all of them, or those named (--force a,b)")
                    ->expected(0, 1)
                    ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_flag("--skip-existing", skip_existing, "Skip tasks whose done file exists (the default)");
  app.add_option("--retries", options.retries, "Extra attempts for a failed task, on another GPU when one is free")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000000));
  app.add_option("--grace-period", grace_seconds, "Seconds tasks get to end after a second Ctrl-C (or SIGTERM) before they are killed; the first Ctrl-C "
                 "only stops new tasks from starting")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e9));
  app.add_option("--busy-wait-limit", busy_wait_seconds,
                 "Fail a task that waited this many seconds for a busy GPU (0: wait forever)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e9));
  app.add_flag("--fail-fast", options.fail_fast,
               "After the first task that fails (retries used up), start nothing new, stop the running tasks as "
               "Ctrl-C does, and exit 1");
  std::size_t max_tasks = multigpu::kDefaultMaxTasks;
  app.add_option("--max-tasks", max_tasks, "Refuse a task file that expands to more tasks than this (grids multiply)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_flag("--dry-run", dry_run, "Print what would run where, run nothing");
  app.add_flag("-q,--quiet", quiet, "No live status line");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  if (slurm_task->parsed()) return multigpu::slurm::run_task(slurm_task_dir, slurm_task_offset);
  if (cancel->parsed()) return multigpu::slurm::cancel(cancel_dir);
  if (status->parsed()) {
    // `multigpu-run --log-dir DIR status`: the main command's folder, unless status names one.
    if (status->get_option("log-dir")->count() == 0 && app.get_option("--log-dir")->count() > 0) {
      status_dir = options.log_dir;
    }
    try {
      if (multigpu::slurm::is_submission(status_dir)) return multigpu::slurm::print_status(status_dir);
      return show_status(status_dir, status_summary, watch, watch_interval);
    } catch (const std::exception& e) {
      fmt::print(stderr, "multigpu-run status: {}\n", e.what());
      return 2;
    }
  }
  // `--force FILE` with no task file: CLI11 took the task file for a name.
  if (task_file.empty() && !force_values.empty() && std::filesystem::is_regular_file(force_values.back())) {
    task_file = force_values.back();
    force_values.pop_back();
  }
  for (const auto& value : force_values) {
    for (const auto& name : split_commas(value)) {
      if (!name.empty()) options.force_tasks.emplace_back(name);
    }
  }
  // Only a bare --force reruns everything: `--force "$TASKS"` with TASKS empty must not.
  if (!force_values.empty() && options.force_tasks.empty()) {
    fmt::print(stderr, "multigpu-run: --force was given no task name (\"{}\"); give names (--force a,b), or "
                       "--force alone to rerun every task\n", force_values.front());
    return 2;
  }
  options.force = force->count() > 0 && options.force_tasks.empty();
  if (force->count() > 0 && app.get_option("--skip-existing")->count() > 0) {
    fmt::print(stderr, "multigpu-run: --skip-existing and --force contradict each other; give one\n");
    return 2;
  }
  if (task_file.empty()) {
    fmt::print(stderr, "multigpu-run: give a task file (multigpu-run TASKS), or `multigpu-run status [LOG_DIR]`; "
                       "--help says more\n");
    return 2;
  }
  if (max_per_gpu == "auto") {
    options.pack_by_memory = true;
    options.max_per_device = 64;  // a bound on processes per GPU; memory decides below it
  } else {
    const auto parsed = parse_count(max_per_gpu);
    if (!parsed) {
      fmt::print(stderr, "multigpu-run: --max-per-gpu {} is neither a number of tasks (1 or more) nor auto\n",
                 max_per_gpu);
      return 2;
    }
    options.max_per_device = *parsed;
  }
  if (const auto margin = multigpu::parse_memory_mib(memory_margin)) {
    options.memory_margin_mib = *margin;
  } else if (memory_margin == "0") {  // no unit needed for nothing
    options.memory_margin_mib = 0;
  } else {
    fmt::print(stderr, "multigpu-run: --memory-margin {} is not a size; write it with a unit: 1G, 512M (G: GiB, M: "
                       "MiB), or 0\n",
               memory_margin);
    return 2;
  }
  if (app.get_option("--memory-margin")->count() > 0 && !options.pack_by_memory) {
    fmt::print(stderr, "multigpu-run: --memory-margin is for --max-per-gpu auto, which was not given\n");
    return 2;
  }
  options.grace_period = std::chrono::milliseconds(static_cast<long>(grace_seconds * 1000));
  options.busy_wait_limit = std::chrono::milliseconds(static_cast<long>(busy_wait_seconds * 1000));
  options.handle_signals = true;
  options.status_line = !quiet;
  // A closed terminal or pipe (ssh dropped, `| tee` ended) must not end the
  // run on a write: SIGHUP stops it the orderly way instead.
  std::signal(SIGPIPE, SIG_IGN);

  if (!slurm && (throttle > 0 || no_follow || app.get_option("--poll")->count() > 0)) {
    fmt::print(stderr, "multigpu-run: --throttle, --poll and --no-follow are for --slurm, which was not given\n");
    return 2;
  }
  if (slurm) {  // the local pool's options, which Slurm's placement would silently ignore
    for (const char* name : {"--max-per-gpu", "--memory-margin", "--memory-threshold", "--busy-wait-limit",
                             "--grace-period", "--fail-fast", "--summary"}) {
      if (app.get_option(name)->count() > 0) {
        fmt::print(stderr, "multigpu-run: {} is for a run on this machine's GPUs, not for --slurm (Slurm places the "
                           "tasks; the summary is LOG_DIR/summary.json)\n", name);
        return 2;
      }
    }
    if (app.get_option("--gpus")->count() > 0 && options.devices != "cpu") {
      fmt::print(stderr, "multigpu-run: --gpus {} chooses this machine's GPUs; with --slurm, Slurm gives each task "
                         "its GPUs ([gpus=N] in the task file, --gpus-per-task N): give no --gpus, or --gpus cpu for "
                         "tasks without GPUs\n", options.devices);
      return 2;
    }
  }
  try {
    const auto tasks = multigpu::read_task_file(task_file, gpus_per_task, max_tasks);
    if (slurm) {
      multigpu::slurm::SubmitOptions submit;
      submit.sbatch = sbatch_options;
      submit.log_dir = options.log_dir;
      submit.retries = options.retries;
      submit.cpu_only = options.devices == "cpu";
      submit.force = options.force;
      submit.force_tasks = options.force_tasks;
      submit.throttle = throttle;
      submit.follow = !no_follow;
      submit.dry_run = dry_run;
      submit.poll_seconds = poll_seconds;
      submit.quiet = quiet;
      return multigpu::slurm::submit(tasks, task_file, submit);
    }
    // A local run in a folder that held a --slurm submission: `status` shows this run.
    multigpu::slurm::forget_submission(options.log_dir);
    multigpu::Scheduler scheduler(options);
    std::string pool;
    for (const auto& device : scheduler.pool()) pool += (pool.empty() ? "" : ", ") + (device.is_cpu() ? std::string("cpu") : device.label());
    fmt::print("{} task(s) from {} over {} ({}); logs in {}\n", tasks.size(), task_file, pool,
               options.pack_by_memory ? fmt::format("as many per GPU as fit, {} kept free beside each",
                                                    multigpu::memory_text(options.memory_margin_mib << 20))
                                      : fmt::format("{} per device", options.max_per_device),
               options.log_dir);
    if (dry_run) {
      for (const auto& planned : scheduler.plan(tasks)) {
        if (planned.skipped) {
          fmt::print("  skip {} (its done file exists)\n", planned.name);
        } else {
          if (!planned.note.empty()) fmt::print("  again {}: {}\n", planned.name, planned.note);
          std::string after;
          for (const auto& name : planned.after) after += (after.empty() ? " (after " : ", ") + name;
          const std::string size =
              planned.memory_mib < 0 ? "" : fmt::format(" [mem={}]", multigpu::memory_text(planned.memory_mib << 20));
          fmt::print("  run  {}{}{} on {} with CUDA_VISIBLE_DEVICES={}: {}\n", planned.name,
                     after.empty() ? "" : after + ")", size, planned.devices.front(), planned.visible_devices,
                     planned.command);
        }
      }
      return 0;
    }
    const auto summary = scheduler.run(tasks);
    fmt::print("{} task(s) in {}: {} done, {} failed, {} skipped, {} interrupted, {} not started{}\n",
               summary.tasks.size(), clock_text(summary.seconds),
               summary.count(multigpu::TaskStatus::kDone), summary.count(multigpu::TaskStatus::kFailed),
               summary.count(multigpu::TaskStatus::kSkipped), summary.count(multigpu::TaskStatus::kInterrupted),
               summary.count(multigpu::TaskStatus::kPending),
               summary.fail_fast_task.empty()
                   ? ""
                   : fmt::format("; stopped early: task {} failed (--fail-fast)", summary.fail_fast_task));
    for (const auto& r : summary.tasks) {
      if (r.status == multigpu::TaskStatus::kFailed) {
        fmt::print("  failed: {} ({}{}), log {}\n", r.name, r.error, r.out_of_memory ? ", out of GPU memory" : "",
                   r.log_path);
      }
      if (!r.memory_note.empty()) fmt::print("  memory: {}: {}\n", r.name, r.memory_note);
    }
    if (summary.summary_error.empty()) {
      fmt::print("summary: {} and {}\n", summary.json_path, summary.csv_path);
    } else {
      fmt::print(stderr, "multigpu-run: the summary could not be written: {}\n", summary.summary_error);
    }
    return summary.exit_code();
  } catch (const multigpu::Error& e) {
    fmt::print(stderr, "multigpu-run: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "multigpu-run: {}\n", e.what());
    return 2;
  }
}
