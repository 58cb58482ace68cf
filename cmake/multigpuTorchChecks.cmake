# Checks the LibTorch that find_package(Torch) found, before anything is
# compiled against it, and turns what would otherwise be a page of compiler
# or linker errors into one message. Included by multigpuDependencies.cmake.
#
# Out: MULTIGPU_TORCH_VERSION ("2.13.0"), MULTIGPU_TORCH_CXX_STANDARD (the C++
#      standard LibTorch asks for, at least 17), TORCH_LIBRARIES mended (below).

include_guard(GLOBAL)

set(MULTIGPU_TORCH_VERSION "${Torch_VERSION}")
if(NOT MULTIGPU_TORCH_VERSION)
  set(MULTIGPU_TORCH_VERSION "(unknown version)")
endif()

# Note [Libraries of another LibTorch]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# TorchConfig.cmake finds some of its libraries (c10, kineto) with
# find_library(... PATHS <prefix>/lib), and CMake searches the system's
# folders before PATHS. With Debian's libtorch-dev installed, a pip or archive
# LibTorch 2.x is therefore linked against Debian's libc10.so 1.13: the
# program builds and then crashes or fails to resolve symbols. Every library
# named by path that lies outside the LibTorch found, and that this LibTorch
# has itself, is replaced by its own copy.
#
# A CUDA LibTorch from pip also lists the CUDA toolkit's NVRTC, which a
# toolkit without it (a minimal one, or pip's own CUDA libraries only) leaves
# as CUDA_nvrtc_LIBRARY-NOTFOUND, and the link fails. LibTorch loads NVRTC
# itself when it compiles a kernel at run time; a program built on multigpu
# never links it directly, so such an entry is left out.
if(TORCH_INSTALL_PREFIX)
  get_filename_component(_multigpu_torch_prefix "${TORCH_INSTALL_PREFIX}" REALPATH)
  set(_multigpu_mended "")
  set(_multigpu_libraries "")
  foreach(_library IN LISTS TORCH_LIBRARIES)
    if(_library MATCHES "nvrtc.*-NOTFOUND$")
      list(APPEND _multigpu_mended "${_library}")
      continue()
    elseif(_library MATCHES "-NOTFOUND$")
      message(FATAL_ERROR "multigpu: the LibTorch at '${TORCH_INSTALL_PREFIX}' names a library that was not "
        "found: ${_library}. Is that LibTorch complete (for a CUDA LibTorch: is the CUDA toolkit installed, "
        "CUDA_HOME set)?")
    endif()
    if(IS_ABSOLUTE "${_library}" AND EXISTS "${_library}")
      get_filename_component(_real "${_library}" REALPATH)
      get_filename_component(_name "${_library}" NAME)
      string(FIND "${_real}" "${_multigpu_torch_prefix}/" _inside)
      if(NOT _inside EQUAL 0 AND EXISTS "${_multigpu_torch_prefix}/lib/${_name}")
        list(APPEND _multigpu_mended "${_library}")
        set(_library "${_multigpu_torch_prefix}/lib/${_name}")
      endif()
    endif()
    list(APPEND _multigpu_libraries "${_library}")
  endforeach()
  if(NOT _multigpu_mended STREQUAL "")  # (a plain if() is false for a value ending in -NOTFOUND)
    set(TORCH_LIBRARIES "${_multigpu_libraries}")
    message(STATUS "multigpu: TorchConfig.cmake listed ${_multigpu_mended}, from another LibTorch or not "
      "found; linking ${_multigpu_torch_prefix}/lib's own libraries instead")
  endif()
endif()

# Both halves of LibTorch's CMake package must come from one LibTorch (see
# multigpuDependencies.cmake for how Caffe2_DIR goes astray).
if(Torch_DIR AND Caffe2_DIR)
  get_filename_component(_multigpu_expected "${Torch_DIR}/../Caffe2" REALPATH)
  get_filename_component(_multigpu_caffe2 "${Caffe2_DIR}" REALPATH)
  if(EXISTS "${_multigpu_expected}/Caffe2Config.cmake" AND NOT _multigpu_caffe2 STREQUAL _multigpu_expected)
    message(FATAL_ERROR
      "multigpu: Torch_DIR is '${Torch_DIR}', but Caffe2_DIR is '${Caffe2_DIR}', from another LibTorch: "
      "the program would link two LibTorch versions. Configure with -DCaffe2_DIR=${_multigpu_expected} "
      "(or from an empty build folder).")
  endif()
endif()

# Note [The C++ ABI]
# ~~~~~~~~~~~~~~~~~~
# LibTorch archives before 2.7 came in two builds, the pre-C++11 ABI
# (_GLIBCXX_USE_CXX11_ABI=0: std::string is the old copy-on-write one) and the
# C++11 ABI. The system's C++ libraries (libfmt, and every library a program
# links besides LibTorch) use the C++11 ABI, so a program mixing the two fails
# to link with undefined references to std::__cxx11 names, or crashes. Such a
# LibTorch is refused unless the user says every other library was built the
# same way.
option(MULTIGPU_ALLOW_PRE_CXX11_ABI
  "Accept a LibTorch built with the pre-C++11 ABI (every other C++ library must be built so too)" OFF)
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=0" AND NOT MULTIGPU_ALLOW_PRE_CXX11_ABI)
  message(FATAL_ERROR
    "multigpu: the LibTorch at '${TORCH_INSTALL_PREFIX}' (${MULTIGPU_TORCH_VERSION}) was built with the "
    "pre-C++11 ABI (TORCH_CXX_FLAGS: ${TORCH_CXX_FLAGS}), while this system's C++ libraries use the C++11 "
    "ABI; linking them together fails with undefined references to std::__cxx11 symbols. Use a C++11-ABI "
    "LibTorch: the archive named libtorch-cxx11-abi-shared-with-deps-<version>.zip, or pip's torch 2.7 or "
    "newer (scripts/configure.sh installs one). If every library of your program was built with the old "
    "ABI, configure with -DMULTIGPU_ALLOW_PRE_CXX11_ABI=ON.")
endif()

# The C++ standard LibTorch asks for (its target's CXX_STANDARD: 14 in 1.13,
# 17 in 2.0 to 2.11, 20 later), and never less than multigpu's 17.
set(MULTIGPU_TORCH_CXX_STANDARD 17)
if(TARGET torch)
  get_target_property(_multigpu_torch_std torch CXX_STANDARD)
  if(_multigpu_torch_std AND _multigpu_torch_std GREATER 17)
    set(MULTIGPU_TORCH_CXX_STANDARD ${_multigpu_torch_std})
  endif()
endif()
