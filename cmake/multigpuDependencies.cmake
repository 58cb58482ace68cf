# Finds what multigpu needs and decides its feature switches.
#
# Used twice: by the project's own CMakeLists.txt and, after installation, by
# multigpuConfig.cmake in the consumer's project, so that the switches follow
# the LibTorch the consumer builds against, not the one multigpu was installed
# with.
#
# In:  MULTIGPU_ENABLE_CUDA, MULTIGPU_ENABLE_NCCL, MULTIGPU_ENABLE_DISTRIBUTED
#      (AUTO, ON or OFF; default AUTO)
# Out: Torch, fmt and Threads found;
#      MULTIGPU_HAS_CUDA, MULTIGPU_HAS_NCCL, MULTIGPU_HAS_DISTRIBUTED (TRUE/FALSE);
#      MULTIGPU_DEPENDENCY_TARGETS (what the multigpu target links).

include_guard(GLOBAL)

if(NOT DEFINED MULTIGPU_ENABLE_CUDA)
  set(MULTIGPU_ENABLE_CUDA AUTO)
endif()
if(NOT DEFINED MULTIGPU_ENABLE_NCCL)
  set(MULTIGPU_ENABLE_NCCL AUTO)
endif()
if(NOT DEFINED MULTIGPU_ENABLE_DISTRIBUTED)
  set(MULTIGPU_ENABLE_DISTRIBUTED AUTO)
endif()

find_package(Threads REQUIRED)
if(NOT TARGET torch)
  find_package(Torch REQUIRED)
endif()
if(NOT TARGET fmt::fmt AND NOT TARGET fmt::fmt-header-only)
  find_package(fmt REQUIRED)
endif()

# Imported targets are visible only in the directory that found them. When
# multigpu is a subdirectory (add_subdirectory, FetchContent), the consumer's
# targets link ours from a parent directory, so what we found must be global.
get_property(_multigpu_imported DIRECTORY PROPERTY IMPORTED_TARGETS)
foreach(_target IN LISTS _multigpu_imported)
  get_target_property(_global ${_target} IMPORTED_GLOBAL)
  if(NOT _global)
    set_target_properties(${_target} PROPERTIES IMPORTED_GLOBAL TRUE)
  endif()
endforeach()

# A CUDA build of LibTorch exports torch_cuda (1.x and 2.x) and sets
# CAFFE2_USE_CUDA; a CPU-only build has neither.
set(_multigpu_torch_has_cuda FALSE)
if(TARGET torch_cuda OR CAFFE2_USE_CUDA)
  set(_multigpu_torch_has_cuda TRUE)
endif()

set(MULTIGPU_HAS_CUDA FALSE)
if(MULTIGPU_ENABLE_CUDA STREQUAL "ON")
  if(NOT _multigpu_torch_has_cuda)
    message(FATAL_ERROR
      "multigpu: MULTIGPU_ENABLE_CUDA=ON, but the LibTorch found at "
      "'${Torch_DIR}' was built without CUDA. Point Torch_DIR (or "
      "CMAKE_PREFIX_PATH) at a CUDA build of LibTorch, or use AUTO/OFF.")
  endif()
  set(MULTIGPU_HAS_CUDA TRUE)
elseif(MULTIGPU_ENABLE_CUDA STREQUAL "AUTO")
  set(MULTIGPU_HAS_CUDA ${_multigpu_torch_has_cuda})
elseif(NOT MULTIGPU_ENABLE_CUDA STREQUAL "OFF")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_ENABLE_CUDA='${MULTIGPU_ENABLE_CUDA}'; valid: AUTO, ON, OFF")
endif()

set(MULTIGPU_HAS_NCCL FALSE)
if(NOT MULTIGPU_ENABLE_NCCL MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_ENABLE_NCCL='${MULTIGPU_ENABLE_NCCL}'; valid: AUTO, ON, OFF")
endif()
if(MULTIGPU_HAS_CUDA AND NOT MULTIGPU_ENABLE_NCCL STREQUAL "OFF")
  if(MULTIGPU_ENABLE_NCCL STREQUAL "ON")
    find_package(NCCL REQUIRED)
  else()
    find_package(NCCL QUIET)
  endif()
  if(NCCL_FOUND)
    set(MULTIGPU_HAS_NCCL TRUE)
  endif()
elseif(MULTIGPU_ENABLE_NCCL STREQUAL "ON")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_ENABLE_NCCL=ON needs CUDA, and CUDA is off "
    "(LibTorch without CUDA, or MULTIGPU_ENABLE_CUDA=OFF)")
endif()

# Multi-process training (multigpu/distributed.hpp) uses c10d's TCPStore and
# ProcessGroupGloo, whose header needs Gloo's headers: LibTorch ships the
# former, Gloo's may be apart (Debian: libgloo-dev).
set(MULTIGPU_HAS_DISTRIBUTED FALSE)
if(NOT MULTIGPU_ENABLE_DISTRIBUTED MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_ENABLE_DISTRIBUTED='${MULTIGPU_ENABLE_DISTRIBUTED}'; valid: AUTO, ON, OFF")
endif()
if(NOT MULTIGPU_ENABLE_DISTRIBUTED STREQUAL "OFF")
  find_path(MULTIGPU_C10D_GLOO_INCLUDE_DIR torch/csrc/distributed/c10d/ProcessGroupGloo.hpp
    HINTS ${TORCH_INCLUDE_DIRS} NO_CACHE)
  find_path(MULTIGPU_GLOO_INCLUDE_DIR gloo/algorithm.h HINTS ${TORCH_INCLUDE_DIRS} NO_CACHE)
  if(MULTIGPU_C10D_GLOO_INCLUDE_DIR AND MULTIGPU_GLOO_INCLUDE_DIR)
    set(MULTIGPU_HAS_DISTRIBUTED TRUE)
  elseif(MULTIGPU_ENABLE_DISTRIBUTED STREQUAL "ON")
    message(FATAL_ERROR
      "multigpu: MULTIGPU_ENABLE_DISTRIBUTED=ON, but c10d's ProcessGroupGloo.hpp "
      "(${MULTIGPU_C10D_GLOO_INCLUDE_DIR}) or Gloo's headers (${MULTIGPU_GLOO_INCLUDE_DIR}) "
      "were not found; on Debian install libgloo-dev")
  endif()
endif()

set(MULTIGPU_DEPENDENCY_TARGETS ${TORCH_LIBRARIES} Threads::Threads ${CMAKE_DL_LIBS})
if(TARGET fmt::fmt)
  list(APPEND MULTIGPU_DEPENDENCY_TARGETS fmt::fmt)
else()
  list(APPEND MULTIGPU_DEPENDENCY_TARGETS fmt::fmt-header-only)
endif()
if(MULTIGPU_HAS_NCCL)
  list(APPEND MULTIGPU_DEPENDENCY_TARGETS NCCL::NCCL)
endif()

if(MULTIGPU_HAS_CUDA)
  set(_multigpu_cuda_text "ON")
else()
  set(_multigpu_cuda_text "OFF (LibTorch without CUDA or disabled)")
endif()
if(MULTIGPU_HAS_NCCL)
  set(_multigpu_nccl_text "ON (${NCCL_LIBRARIES})")
else()
  set(_multigpu_nccl_text "OFF")
endif()
if(MULTIGPU_HAS_DISTRIBUTED)
  set(_multigpu_distributed_text "ON (c10d + Gloo)")
else()
  set(_multigpu_distributed_text "OFF")
endif()
message(STATUS "multigpu: LibTorch ${Torch_VERSION}${TORCH_VERSION}, CUDA ${_multigpu_cuda_text}, "
  "NCCL ${_multigpu_nccl_text}, multi-process ${_multigpu_distributed_text}")
