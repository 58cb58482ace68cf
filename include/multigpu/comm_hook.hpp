#pragma once
/// @file
/// Communication hooks: how a bucket of gradients is averaged over the
/// replicas (DDP's comm hooks), and the compressed ones that send bf16 or
/// fp16 instead of fp32.
///
///   multigpu::DataParallelOptions options;
///   options.comm_hook = multigpu::bf16_compress_hook();  // half the bytes per bucket
///
// Note [Compressed gradients]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The reducer hands each bucket (one flat fp32 buffer per replica) to the
// hook instead of all-reducing it itself. The compressing hook divides each
// replica's buffer by the number of replicas over every process first, so
// that the sum of K values cannot overflow the small format (fp16 stops at
// 65504) where the fp32 average would not; then casts it to bf16 or fp16,
// all-reduces that (a sum) with the same communicator (local, NCCL or Gloo
// across processes: each moves half the bytes), and copies the result back
// into the fp32 buffer, which the gradients alias. The result is the fp32
// average to within the small format's precision (bf16: 8 bits of
// mantissa, fp16: 11). Every replica receives the same bits, so replicas
// stay identical. It runs where the all-reduce would: on the reducer's
// threads, with the communication streams current (Note [Streams], rule 3),
// so a hook must not keep state between calls (buckets may be reduced
// concurrently by the local backend).

#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <fmt/core.h>

#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"

namespace multigpu {

/// Averages one bucket over every replica (see Note [Compressed gradients]).
class CommHook {
 public:
  virtual ~CommHook() = default;
  /// For messages and statistics: "bf16_compress", ...
  virtual std::string name() const = 0;
  /// Makes every buffers[r] (replica r's bucket, on its device) the average
  /// of all of them over comm.world_size() replicas, with `comm`'s
  /// collectives. Called concurrently for different buckets.
  virtual void all_reduce_average(Communicator& comm, const std::vector<at::Tensor>& buffers) = 0;
};

/// Sends each bucket as bf16 or fp16 (see Note [Compressed gradients]).
class CompressedCommHook : public CommHook {
 public:
  /// `dtype`: at::kBFloat16 or at::kHalf; anything else is an Error.
  explicit CompressedCommHook(at::ScalarType dtype);
  inline std::string name() const override;
  inline void all_reduce_average(Communicator& comm, const std::vector<at::Tensor>& buffers) override;
  /// The format buckets are sent in (at::kBFloat16 or at::kHalf).
  at::ScalarType dtype() const { return dtype_; }

 private:
  at::ScalarType dtype_;
};

/// Buckets travel as bfloat16 (fp32's range, 8 bits of mantissa).
inline std::shared_ptr<CommHook> bf16_compress_hook() { return std::make_shared<CompressedCommHook>(at::kBFloat16); }
/// Buckets travel as float16 (11 bits of mantissa; values below 6e-5 lose precision).
inline std::shared_ptr<CommHook> fp16_compress_hook() { return std::make_shared<CompressedCommHook>(at::kHalf); }

// ---------------------------------------------------------------------------
// Definitions

inline CompressedCommHook::CompressedCommHook(at::ScalarType dtype) : dtype_(dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    throw Error(fmt::format("CompressedCommHook: {} is not a compressed format; use BFloat16 or Half",
                            c10::toString(dtype)));
  }
}

inline std::string CompressedCommHook::name() const {
  return dtype_ == at::kBFloat16 ? "bf16_compress" : "fp16_compress";
}

inline void CompressedCommHook::all_reduce_average(Communicator& comm, const std::vector<at::Tensor>& buffers) {
  const compat::NoGradGuard no_grad;
  const double replicas = static_cast<double>(comm.world_size());
  std::vector<at::Tensor> small;
  small.reserve(buffers.size());
  for (const auto& buffer : buffers) small.push_back(buffer.div(replicas).to(dtype_));  // divide, then cast
  comm.all_reduce(small, ReduceOp::kSum);
  for (std::size_t r = 0; r < buffers.size(); ++r) buffers[r].copy_(small[r]);
}

}  // namespace multigpu
