#pragma once
/// @file
/// Precision: the number format a DataParallel's loss function computes in
/// (autocast on every replica), and its names on a command line.
///
///   multigpu::DataParallelOptions options;
///   options.precision = multigpu::parse_precision("bf16");  // fp32, bf16 or fp16
///
/// See Note [Autocast on every replica] in data_parallel/autocast.hpp.

#include <string>
#include <string_view>

#include <c10/core/ScalarType.h>
#include <fmt/core.h>

#include "multigpu/error.hpp"

namespace multigpu {

/// The number format of the forward pass (the loss function).
enum class Precision {
  kFloat32,   ///< No autocast: everything in the module's own types.
  kBFloat16,  ///< Autocast to bfloat16 (CPUs, and GPUs from Ampere on).
  kFloat16,   ///< Autocast to float16; pair it with a GradScaler (grad_scaler.hpp).
};

/// "fp32", "bf16", "fp16".
inline const char* precision_name(Precision precision) {
  switch (precision) {
    case Precision::kBFloat16:
      return "bf16";
    case Precision::kFloat16:
      return "fp16";
    case Precision::kFloat32:
      break;
  }
  return "fp32";
}

/// The tensor type autocast computes in for `precision` (kFloat for kFloat32).
inline c10::ScalarType precision_dtype(Precision precision) {
  switch (precision) {
    case Precision::kBFloat16:
      return c10::ScalarType::BFloat16;
    case Precision::kFloat16:
      return c10::ScalarType::Half;
    case Precision::kFloat32:
      break;
  }
  return c10::ScalarType::Float;
}

/// Reads "fp32", "bf16" or "fp16" (also "float32", "bfloat16", "float16").
/// Throws Error naming the valid names otherwise.
inline Precision parse_precision(std::string_view text) {
  if (text == "fp32" || text == "float32") return Precision::kFloat32;
  if (text == "bf16" || text == "bfloat16") return Precision::kBFloat16;
  if (text == "fp16" || text == "float16") return Precision::kFloat16;
  throw Error(fmt::format("precision \"{}\" is not one of fp32, bf16, fp16", text));
}

}  // namespace multigpu
