#pragma once
/// @file
/// What a DataParallel reports about its gradient synchronisation: how the
/// gradients are bucketed (BucketInfo) and the timings of the last sync
/// (SyncStats).

#include <cstddef>
#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

namespace multigpu {

/// One gradient bucket, all-reduced as one collective (see Note [Bucket
/// assignment]), described for tests, benchmarks and messages.
struct BucketInfo {
  /// Its parameters, as laid out in the bucket: indices among the trainable
  /// parameters, counted in registration order.
  std::vector<std::size_t> parameters;
  std::int64_t numel = 0;  ///< Values in the bucket.
  std::int64_t bytes = 0;  ///< Size of the bucket in bytes.
  c10::ScalarType dtype = c10::ScalarType::Float;  ///< The dtype of every gradient in it.
};

/// Timings of the last gradient synchronisation (milliseconds, on the host:
/// on GPUs, where nothing waits for the device, the time to enqueue the work).
struct SyncStats {
  /// Buckets synchronised.
  std::size_t buckets = 0;
  /// All-reduces launched while backward was still running somewhere.
  std::size_t overlapped_buckets = 0;
  /// From the end of the last replica's backward until every bucket was reduced.
  double exposed_ms = 0;
  /// The all-reduce of the bucket that finished last.
  double last_bucket_ms = 0;
  /// Sum of every bucket's all-reduce time.
  double total_ms = 0;
};

}  // namespace multigpu
