# Finds what multigpu needs and decides its feature switches.
#
# Used twice: by the project's own CMakeLists.txt and, after installation, by
# multigpuConfig.cmake in the consumer's project, so that the switches follow
# the LibTorch the consumer builds against, not the one multigpu was installed
# with.
#
# In:  MULTIGPU_ENABLE_CUDA, MULTIGPU_ENABLE_NCCL, MULTIGPU_ENABLE_DISTRIBUTED
#      (AUTO, ON or OFF; default AUTO)
# Out: Torch, fmt and Threads found; nlohmann-json where present;
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

# The header-only dependencies' vendored copies, where the system has none.
# See Note [Vendored dependencies] in multigpuVendored.cmake.
if(NOT MULTIGPU_FIND_AS_PACKAGE)
  include("${CMAKE_CURRENT_LIST_DIR}/multigpuVendored.cmake")
endif()

find_package(Threads REQUIRED)
if(NOT TARGET torch)
  # A Torch_DIR that points nowhere would otherwise end in CMake's page about
  # package configuration files.
  if(Torch_DIR AND NOT Torch_DIR MATCHES "-NOTFOUND$"
     AND NOT EXISTS "${Torch_DIR}/TorchConfig.cmake" AND NOT EXISTS "${Torch_DIR}/torch-config.cmake")
    message(FATAL_ERROR
      "multigpu: Torch_DIR is '${Torch_DIR}', which holds no TorchConfig.cmake. Torch_DIR must be the "
      "folder with that file: <libtorch>/share/cmake/Torch for the LibTorch archive, or "
      "$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')/Torch for pip's torch. "
      "Or leave it unset: scripts/configure.sh finds a LibTorch by itself.")
  endif()
  # TorchConfig.cmake looks for its sibling Caffe2Config.cmake with PATHS,
  # which CMake searches after the system's folders: with Debian's
  # libtorch-dev installed, a pip LibTorch named by Torch_DIR alone gets
  # Debian's Caffe2 (LibTorch 1.13) libraries. Name the sibling first.
  if(Torch_DIR AND NOT Caffe2_DIR AND EXISTS "${Torch_DIR}/../Caffe2/Caffe2Config.cmake")
    get_filename_component(Caffe2_DIR "${Torch_DIR}/../Caffe2" ABSOLUTE)
    set(Caffe2_DIR "${Caffe2_DIR}" CACHE PATH "Caffe2's CMake folder, beside Torch_DIR")
  endif()
  # A CUDA LibTorch's config finds the CUDA toolkit with FindCUDA, which
  # looks beside the nvcc on PATH: a wrapper script in /usr/local/bin leads
  # it astray. Name the toolkit where one is known.
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    foreach(_multigpu_cuda "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
      if(_multigpu_cuda AND EXISTS "${_multigpu_cuda}/include/cuda_runtime_api.h")
        set(CUDA_TOOLKIT_ROOT_DIR "${_multigpu_cuda}" CACHE PATH "The CUDA toolkit (for a CUDA LibTorch)")
        break()
      endif()
    endforeach()
  endif()
  find_package(Torch QUIET)
  if(NOT Torch_FOUND AND MULTIGPU_FIND_AS_PACKAGE)
    # In an installed multigpu's config file, which then fails the way its
    # caller asked for (QUIET, REQUIRED or optional).
    set(MULTIGPU_TORCH_MISSING TRUE)
    return()
  elseif(NOT Torch_FOUND)
    message(FATAL_ERROR
      "multigpu: no LibTorch found (Torch_DIR: '${Torch_DIR}', CMAKE_PREFIX_PATH: '${CMAKE_PREFIX_PATH}'). "
      "Point CMake at one: -DTorch_DIR=<libtorch>/share/cmake/Torch, or "
      "-DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)') for pip's "
      "torch; scripts/configure.sh finds or installs one by itself.")
  endif()
endif()
include("${CMAKE_CURRENT_LIST_DIR}/multigpuTorchChecks.cmake")

# Note [Which fmt]
# ~~~~~~~~~~~~~~~~
# pip's LibTorch (2.x) ships fmt's headers (fmt 11/12) in its own include
# folder and uses them header-only; its headers include them. The compiler
# searches that folder before the system's, so `#include <fmt/core.h>` finds
# LibTorch's copy whatever fmt we ask CMake for, and linking the system's
# libfmt (another major version, another inline namespace) then fails. So
# where LibTorch brings fmt, multigpu uses that copy, header-only; elsewhere
# (Debian's LibTorch 1.13) the fmt package found on the system.
set(MULTIGPU_FMT_TARGET "")
if(TORCH_INSTALL_PREFIX AND EXISTS "${TORCH_INSTALL_PREFIX}/include/fmt/format.h")
  get_filename_component(_multigpu_torch_include "${TORCH_INSTALL_PREFIX}/include" REALPATH)
  set(_multigpu_fmt_shadowed TRUE)
  foreach(_dir IN LISTS CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES)
    get_filename_component(_dir "${_dir}" REALPATH)
    if(_dir STREQUAL _multigpu_torch_include)
      set(_multigpu_fmt_shadowed FALSE)  # a system folder: searched last, like any system fmt
    endif()
  endforeach()
  if(_multigpu_fmt_shadowed)
    if(NOT TARGET multigpu::detail_fmt_from_torch)
      add_library(multigpu::detail_fmt_from_torch INTERFACE IMPORTED GLOBAL)
      set_target_properties(multigpu::detail_fmt_from_torch PROPERTIES
        INTERFACE_COMPILE_DEFINITIONS FMT_HEADER_ONLY=1)
    endif()
    set(MULTIGPU_FMT_TARGET multigpu::detail_fmt_from_torch)
    set(_multigpu_fmt_text "fmt from LibTorch (header-only)")
  endif()
endif()
if(NOT MULTIGPU_FMT_TARGET)
  if(NOT TARGET fmt::fmt AND NOT TARGET fmt::fmt-header-only)
    find_package(fmt REQUIRED)
  endif()
  if(TARGET fmt::fmt)
    set(MULTIGPU_FMT_TARGET fmt::fmt)
  else()
    set(MULTIGPU_FMT_TARGET fmt::fmt-header-only)
  endif()
  set(_multigpu_fmt_text "fmt ${fmt_VERSION}")
  if(MULTIGPU_VENDORED_DIR AND fmt_DIR)
    get_filename_component(_multigpu_vendored "${MULTIGPU_VENDORED_DIR}" ABSOLUTE)
    string(FIND "${fmt_DIR}" "${_multigpu_vendored}/" _at)
    if(_at EQUAL 0)
      string(APPEND _multigpu_fmt_text " (vendored, header-only)")
    endif()
  endif()
endif()

# Note [nlohmann-json, for the scheduler]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The scheduler's headers (multigpu/scheduler.hpp) write their summary with
# nlohmann-json; the training headers do not use it. So it is looked for,
# and linked where found, but not required: a training program builds
# without it, and one that includes the scheduler without it gets an #error
# that says what to install.
set(MULTIGPU_JSON_TARGET "")
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_package(nlohmann_json 3 QUIET)
endif()
if(TARGET nlohmann_json::nlohmann_json)
  set(MULTIGPU_JSON_TARGET nlohmann_json::nlohmann_json)
  set(_multigpu_json_text "nlohmann-json (for the scheduler)")
  if(nlohmann_json_VERSION)
    set(_multigpu_json_text "nlohmann-json ${nlohmann_json_VERSION} (for the scheduler)")
  endif()
else()
  set(_multigpu_json_text "no nlohmann-json (multigpu/scheduler.hpp needs it)")
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
set(_multigpu_gloo_target "")
if(NOT MULTIGPU_ENABLE_DISTRIBUTED MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_ENABLE_DISTRIBUTED='${MULTIGPU_ENABLE_DISTRIBUTED}'; valid: AUTO, ON, OFF")
endif()
if(NOT MULTIGPU_ENABLE_DISTRIBUTED STREQUAL "OFF")
  find_path(MULTIGPU_C10D_GLOO_INCLUDE_DIR torch/csrc/distributed/c10d/ProcessGroupGloo.hpp
    HINTS ${TORCH_INCLUDE_DIRS} NO_CACHE)
  # Gloo's headers: the system's (or LibTorch's), else the vendored copy;
  # the copy first with MULTIGPU_PREFER_VENDORED (Note [Vendored dependencies]).
  if(MULTIGPU_VENDORED_GLOO_FIRST)
    set(_multigpu_gloo_hints "${MULTIGPU_VENDORED_GLOO_INCLUDE_DIR}")
  else()
    set(_multigpu_gloo_hints ${TORCH_INCLUDE_DIRS})
  endif()
  find_path(MULTIGPU_GLOO_INCLUDE_DIR gloo/algorithm.h HINTS ${_multigpu_gloo_hints}
    PATHS ${MULTIGPU_VENDORED_GLOO_INCLUDE_DIR} NO_CACHE)
  if(MULTIGPU_C10D_GLOO_INCLUDE_DIR AND MULTIGPU_GLOO_INCLUDE_DIR)
    set(MULTIGPU_HAS_DISTRIBUTED TRUE)
    # Gloo's headers outside the compiler's and LibTorch's include folders
    # (the vendored copy) go on the include path of multigpu's users.
    get_filename_component(_multigpu_gloo_dir "${MULTIGPU_GLOO_INCLUDE_DIR}" REALPATH)
    set(_multigpu_gloo_on_path FALSE)
    foreach(_dir IN LISTS CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES TORCH_INCLUDE_DIRS)
      get_filename_component(_dir "${_dir}" REALPATH)
      if(_dir STREQUAL _multigpu_gloo_dir)
        set(_multigpu_gloo_on_path TRUE)
      endif()
    endforeach()
    if(NOT _multigpu_gloo_on_path)
      if(NOT TARGET multigpu::detail_gloo_headers)
        add_library(multigpu::detail_gloo_headers INTERFACE IMPORTED GLOBAL)
        set_target_properties(multigpu::detail_gloo_headers PROPERTIES
          INTERFACE_INCLUDE_DIRECTORIES "${_multigpu_gloo_dir}")
      endif()
      set(_multigpu_gloo_target multigpu::detail_gloo_headers)
    endif()
  elseif(MULTIGPU_ENABLE_DISTRIBUTED STREQUAL "ON")
    message(FATAL_ERROR
      "multigpu: MULTIGPU_ENABLE_DISTRIBUTED=ON, but c10d's ProcessGroupGloo.hpp "
      "(${MULTIGPU_C10D_GLOO_INCLUDE_DIR}) or Gloo's headers (${MULTIGPU_GLOO_INCLUDE_DIR}) "
      "were not found; on Debian install libgloo-dev")
  endif()
endif()

set(MULTIGPU_DEPENDENCY_TARGETS ${TORCH_LIBRARIES} Threads::Threads ${CMAKE_DL_LIBS} ${MULTIGPU_FMT_TARGET}
  ${MULTIGPU_JSON_TARGET})
if(MULTIGPU_HAS_NCCL)
  list(APPEND MULTIGPU_DEPENDENCY_TARGETS NCCL::NCCL)
endif()
if(MULTIGPU_HAS_DISTRIBUTED AND _multigpu_gloo_target)
  list(APPEND MULTIGPU_DEPENDENCY_TARGETS ${_multigpu_gloo_target})
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
  get_filename_component(_multigpu_gloo_dir "${MULTIGPU_GLOO_INCLUDE_DIR}" ABSOLUTE)
  set(_multigpu_distributed_text "ON (c10d + Gloo, Gloo's headers in ${_multigpu_gloo_dir})")
else()
  set(_multigpu_distributed_text "OFF")
endif()
message(STATUS "multigpu: LibTorch ${MULTIGPU_TORCH_VERSION} at ${TORCH_INSTALL_PREFIX}, "
  "C++${MULTIGPU_TORCH_CXX_STANDARD}, CUDA ${_multigpu_cuda_text}, NCCL ${_multigpu_nccl_text}, "
  "multi-process ${_multigpu_distributed_text}, ${_multigpu_fmt_text}, ${_multigpu_json_text}")
