#pragma once
// Autocast around the loss function on every replica's thread.
//
// Note [Autocast on every replica]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Autocast is thread-local state (which ops run in a lower precision, and
// the cache of weights already cast), and every replica runs its loss
// function on its own thread. So DataParallelOptions::precision is applied
// by each replica to itself, around the loss function only, as Python's
// `with torch.autocast(...)` would be: backward runs outside it (autograd
// gives every gradient the type of its parameter, float32), and so do the
// gradient sync and the optimizer step. On leaving, the previous switch and
// type come back and, when the outermost autocast scope of the thread ends,
// its cast cache is cleared: the next step casts the updated weights again.
//
// A precision the replicas cannot compute in (float16 on the CPU of a
// LibTorch without CPU float16 autocast, such as 1.13) must not train
// silently in float32 or fail deep inside a step: DataParallel's constructor
// runs one tiny matrix product under the requested autocast on each device
// and refuses, saying why, when it throws or does not come out in the
// requested type. The switches themselves differ between LibTorch versions:
// see Note [Autocast APIs] in compat.hpp.

#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <torch/version.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"
#include "multigpu/precision.hpp"

namespace multigpu {
namespace detail {

/// Autocast to `precision` for replicas of `type` while it lives, on the
/// calling thread (nothing for Precision::kFloat32). See Note [Autocast on
/// every replica].
class AutocastScope {
 public:
  AutocastScope(Precision precision, c10::DeviceType type);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_ = false;
  c10::DeviceType type_ = c10::DeviceType::CPU;
  bool was_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kFloat;
};

/// Throws Error, saying why, when a replica on one of `devices` cannot run
/// its loss function under `precision` (see Note [Autocast on every replica]).
void check_precision_supported(Precision precision, const std::vector<c10::Device>& devices);

// ---------------------------------------------------------------------------
// Definitions

inline AutocastScope::AutocastScope(Precision precision, c10::DeviceType type) {
  if (precision == Precision::kFloat32) return;
  if (type != c10::DeviceType::CPU && type != c10::DeviceType::CUDA) {
    throw Error(fmt::format("autocast to {}: replicas on {} are not supported; only CPU and CUDA replicas are",
                            precision_name(precision), c10::DeviceTypeName(type)));
  }
  type_ = type;
  was_enabled_ = compat::autocast_enabled(type);
  previous_dtype_ = compat::autocast_dtype(type);
  compat::set_autocast_enabled(type, true);
  compat::set_autocast_dtype(type, precision_dtype(precision));
  at::autocast::increment_nesting();
  active_ = true;
}

inline AutocastScope::~AutocastScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  compat::set_autocast_enabled(type_, was_enabled_);
  compat::set_autocast_dtype(type_, previous_dtype_);
}

inline void check_precision_supported(Precision precision, const std::vector<c10::Device>& devices) {
  if (precision == Precision::kFloat32) return;
  const at::ScalarType wanted = precision_dtype(precision);
  std::vector<c10::Device> probed;
  for (const auto& device : devices) {
    bool seen = false;
    for (const auto& other : probed) seen = seen || other == device;
    if (seen) continue;
    probed.push_back(device);
    std::string why;
    try {
      const c10::DeviceGuard on_device(device);
      const compat::NoGradGuard no_grad;
      const AutocastScope autocast(precision, device.type());
      const at::Tensor ones = at::ones({2, 2}, at::TensorOptions().device(device).dtype(at::kFloat));
      const at::Tensor product = at::mm(ones, ones);
      if (product.scalar_type() != wanted) {
        why = fmt::format("a matrix product under autocast came out in {}", c10::toString(product.scalar_type()));
      }
    } catch (const c10::Error& e) {
      why = e.what_without_backtrace();
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty()) {
      throw Error(fmt::format("DataParallelOptions::precision is {}, but LibTorch {} cannot autocast to {} on {}: {}. "
                              "Use {} instead",
                              precision_name(precision), TORCH_VERSION, c10::toString(wanted), device.str(), why,
                              precision == Precision::kFloat16 ? "bf16 or fp32" : "fp16 or fp32"));
    }
  }
}

}  // namespace detail
}  // namespace multigpu
