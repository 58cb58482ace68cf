#pragma once
// Tensors described in messages: "[2, 3]".

#include <string>

#include <c10/util/ArrayRef.h>
#include <fmt/core.h>

namespace multigpu {
namespace detail {

/// "[2, 3]": a shape for messages.
inline std::string shape_text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) out += fmt::format("{}{}", i == 0 ? "" : ", ", sizes[i]);
  return out + "]";
}

}  // namespace detail
}  // namespace multigpu
