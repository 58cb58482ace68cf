// multigpu-run --slurm's decisions (multigpu/scheduler/slurm.hpp, issue 28):
// the sbatch options the runner owns, arrays split at MaxArraySize, what a
// task asks of Slurm, the submit limit, and a task's state. The commands
// themselves run against a real Slurm in tests/tools/multigpu_run_slurm_test.sh.
#include "support.hpp"  // first: see its comment

#include <string>
#include <vector>

#include "multigpu/scheduler/slurm.hpp"

namespace slurm = multigpu::slurm;

TEST_CASE("slurm: the sbatch options the runner sets itself are refused, by name and why") {
  CHECK_NOTHROW(slurm::check_sbatch_options({"--partition", "gpu", "--time=4:00:00", "--mem-per-cpu=2G", "-p", "x"}));
  CHECK_THROWS_WITH_AS(slurm::check_sbatch_options({"--array=0-3"}),
                       "--slurm: the sbatch option --array=0-3 is set by multigpu-run itself: the runner makes the "
                       "arrays from the task file (throttle them with --throttle N)",
                       multigpu::SchedulerError);
  CHECK_THROWS_WITH_AS(slurm::check_sbatch_options({"-ologs/%A.out"}),
                       "--slurm: the sbatch option -ologs/%A.out is set by multigpu-run itself: each task's log is "
                       "LOG_DIR/NAME.log (choose the folder with --log-dir)",
                       multigpu::SchedulerError);
  for (const char* owned : {"--output", "-e", "--error=x", "--wrap", "--dependency=afterok:1", "--gres=gpu:1", "--mem=4G",
                            "-a", "--open-mode=truncate"}) {
    CAPTURE(owned);
    CHECK_THROWS_AS(slurm::check_sbatch_options({owned}), multigpu::SchedulerError);
  }
}

TEST_CASE("slurm: MaxArraySize is read from scontrol show config, 1001 when absent") {
  CHECK(slurm::max_array_size("MaxArraySize            = 3\nMaxJobCount = 10000\n") == 3);
  CHECK(slurm::max_array_size("MaxJobCount = 10000\n") == 1001);
  CHECK(slurm::max_array_size("MaxArraySize = nonsense\n") == 1001);
}

TEST_CASE("slurm: arrays are split at MaxArraySize, each with indices from 0") {
  const auto parts = slurm::split_array(2, 7, 3);
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].offset == 2);
  CHECK(parts[0].count == 3);
  CHECK(parts[1].offset == 5);
  CHECK(parts[2].offset == 8);
  CHECK(parts[2].count == 1);
  CHECK(slurm::split_array(0, 0, 3).empty());
  CHECK(slurm::split_array(0, 1001, 1001).size() == 1);
}

TEST_CASE("slurm: [gpus=N] asks for GRES and [mem=] for memory") {
  auto task = multigpu::Task::shell("t", "true", "", 2);
  CHECK(slurm::resource_options(task, false) == std::vector<std::string>{"--gres=gpu:2"});
  CHECK(slurm::resource_options(task, true).empty());
  task.memory_mib = 12 * 1024;
  CHECK(slurm::resource_options(task, false) == std::vector<std::string>{"--gres=gpu:2", "--mem=12288M"});
}

TEST_CASE("slurm: a refusal for the submit limit is told from other refusals") {
  CHECK(slurm::is_submit_limit("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed"));
  CHECK(slurm::is_submit_limit("sbatch: error: AssocGrpSubmitJobsLimit\nsbatch: error: Batch job submission failed"));
  // The same second line follows a time over the QOS's limit, which waiting never cures.
  CHECK_FALSE(slurm::is_submit_limit("sbatch: error: QOSMaxWallDurationPerJobLimit\nsbatch: error: Batch job submission "
                                     "failed: Job violates accounting/QOS policy (job submit limit, user's size and/or "
                                     "time limits)"));
  CHECK_FALSE(slurm::is_submit_limit("sbatch: error: invalid partition specified: gpu"));
}

TEST_CASE("slurm: a task's state from its status file and squeue") {
  CHECK(slurm::task_state("", "PENDING") == "queued");
  CHECK(slurm::task_state("running", "RUNNING") == "running");
  CHECK(slurm::task_state("running", "PENDING") == "requeued");
  CHECK(slurm::task_state("done", "COMPLETING") == "done");
  CHECK(slurm::task_state("failed", "") == "failed");
  CHECK(slurm::task_state("running", "") == "failed");  // killed while it ran
  CHECK(slurm::task_state("", "") == "not run");        // cancelled, or a dependency failed
}
