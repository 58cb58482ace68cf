# FindNCCL
# --------
# NCCL ships no CMake package, so this finds its header and library.
#
# Looks in NCCL_ROOT (variable or environment), NCCL_HOME, then beside the
# LibTorch found (pip's torch loads the NCCL of the nvidia-nccl wheel, in
# site-packages/nvidia/nccl: the headers must be that NCCL's), then CUDA_HOME /
# CUDA_PATH and the CUDA toolkit.
#
# Result: NCCL_FOUND, NCCL_INCLUDE_DIRS, NCCL_LIBRARIES, NCCL_VERSION, and the
# imported target NCCL::NCCL.

# Appends the value of each named variable, and of the environment variable
# of the same name, to _nccl_hints.
macro(_nccl_hints_from)
  foreach(_var ${ARGN})
    if(DEFINED ${_var})
      list(APPEND _nccl_hints "${${_var}}")
    endif()
    if(DEFINED ENV{${_var}})
      list(APPEND _nccl_hints "$ENV{${_var}}")
    endif()
  endforeach()
endmacro()

set(_nccl_hints)
_nccl_hints_from(NCCL_ROOT NCCL_HOME)
if(TORCH_INSTALL_PREFIX)
  list(APPEND _nccl_hints "${TORCH_INSTALL_PREFIX}/../nvidia/nccl")
endif()
_nccl_hints_from(CUDA_HOME CUDA_PATH CUDAToolkit_ROOT)
list(APPEND _nccl_hints /usr/local/cuda /usr)

find_path(NCCL_INCLUDE_DIR nccl.h
  HINTS ${_nccl_hints}
  PATH_SUFFIXES include)
find_library(NCCL_LIBRARY
  NAMES nccl libnccl.so.2
  HINTS ${_nccl_hints}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)

if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_version_lines
    REGEX "^#define NCCL_(MAJOR|MINOR|PATCH)[ \t]+[0-9]+")
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX REPLACE ".*#define NCCL_${_part}[ \t]+([0-9]+).*" "\\1"
      _nccl_${_part} "${_nccl_version_lines}")
  endforeach()
  set(NCCL_VERSION "${_nccl_MAJOR}.${_nccl_MINOR}.${_nccl_PATCH}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL
  REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
  VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND)
  set(NCCL_INCLUDE_DIRS "${NCCL_INCLUDE_DIR}")
  set(NCCL_LIBRARIES "${NCCL_LIBRARY}")
  if(NOT TARGET NCCL::NCCL)
    add_library(NCCL::NCCL UNKNOWN IMPORTED)
    set_target_properties(NCCL::NCCL PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
  endif()
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
