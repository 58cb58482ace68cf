#pragma once
/// @file
/// How a DataParallel trains and synchronises: DataParallelOptions.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "multigpu/comm.hpp"
#include "multigpu/comm_hook.hpp"
#include "multigpu/grad_scaler.hpp"
#include "multigpu/precision.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {

/// How the loss function reduces over its shard's samples.
enum class LossReduction {
  kMean,  ///< The loss is a mean over the shard (LibTorch's default): gradients are weighted by shard size.
  kSum,   ///< The loss is a sum over the shard: gradients are summed.
};

/// How a DataParallel trains and synchronises.
struct DataParallelOptions {
  /// Collective backend: "auto" (NCCL for distinct GPUs when compiled in,
  /// else local), "local" or "nccl".
  std::string backend = "auto";
  /// Copy the primary's buffers (BatchNorm running statistics) to every
  /// replica after each optimizer step.
  bool broadcast_buffers = true;
  /// Gradient bucket size (see Note [Bucket assignment]).
  double bucket_cap_mib = 25.0;
  /// All-reduce each bucket as soon as its gradients are ready, while
  /// backward goes on. Off: one synchronisation after backward.
  bool overlap_sync_with_backward = true;
  /// How each gradient bucket is averaged (null: in the gradients' own
  /// type). bf16_compress_hook() and fp16_compress_hook() send half the
  /// bytes; see Note [Compressed gradients].
  std::shared_ptr<CommHook> comm_hook;
  /// Parameters that get no gradient in a step count as zero (a part that
  /// a phase, such as a GAN's, does not reach costs no collective in one
  /// process: see Note [A backward that reaches part of the parameters]).
  /// Off: such a step is an error naming them (with overlap on), never a hang.
  bool find_unused_parameters = false;
  /// Whether the loss function returns a mean or a sum over its shard.
  LossReduction loss_reduction = LossReduction::kMean;
  /// The loss function runs under autocast to this precision on every
  /// replica (see Note [Autocast on every replica]); backward, the sync and
  /// the step stay in the parameters' types. A precision the devices cannot
  /// compute in is refused at construction.
  Precision precision = Precision::kFloat32;
  /// Loss scaling for fp16 (null: none). Shared, so that you can read its
  /// scale and save it with a checkpoint; one DataParallel per scaler.
  std::shared_ptr<GradScaler> grad_scaler;
  /// Fail the step, naming the replica, when a loss is NaN or infinite.
  bool check_finite_loss = false;
  /// Check every N optimizer steps that all replicas hold identical
  /// parameters and buffers (0: only when check_parity() is called).
  int parity_check_every = 0;
  /// A collective that takes longer fails with CommError instead of hanging.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
  /// Threads that run the local backend's all-reduces (0: up to 2). More
  /// than 1 is refused for backends that need one order of collectives
  /// (NCCL, Gloo across processes).
  std::size_t comm_threads = 0;
  /// Makes the communicator instead of `backend`, from the replicas'
  /// contexts: where multi-process training plugs in a communicator that
  /// also reaches the other processes. Its broadcast from replica 0 is used
  /// at construction, so every replica everywhere starts from rank 0's state.
  std::function<std::unique_ptr<Communicator>(const std::vector<ReplicaContext>&)> make_communicator;
  /// This process's rank and the number of processes training together
  /// (set by ProcessGroup::data_parallel_options): checkpoints are written
  /// by rank 0 and say on how many processes they were made.
  int process_rank = 0;
  /// Number of processes training together (see process_rank).
  int processes = 1;
  /// Across processes: takes this process's reason for failing the current
  /// step ("" when it did not) and returns every process's, by rank. Every
  /// process calls it once per synchronising forward_backward, after the
  /// step's gradient buckets (see Note [A step that fails on one process]).
  /// Set by ProcessGroup::data_parallel_options; null for one process.
  std::function<std::vector<std::string>(const std::string&)> agree_on_step;
  /// Across processes: every process's text, by rank (through the store;
  /// for small facts). Used at construction to check that every process
  /// built the same model. Set by ProcessGroup::data_parallel_options; null
  /// for one process.
  std::function<std::vector<std::string>(const std::string&)> exchange_text;
};

}  // namespace multigpu
