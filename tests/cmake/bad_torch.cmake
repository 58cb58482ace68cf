# Configures multigpu against LibTorch set-ups that are wrong the way users'
# are, and checks that each ends in one message naming what was found and the
# remedy (not in CMake's or the linker's pages). Run by ctest (bad_libtorch_*).
#
# In: SOURCE_DIR (multigpu), WORK_DIR (scratch), CASE (below), GENERATOR.

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# A stand-in LibTorch package: just enough of TorchConfig.cmake for
# multigpu's checks to look at it.
function(fake_torch dir cxx_flags)
  file(WRITE "${dir}/TorchConfig.cmake" "
set(Torch_FOUND TRUE)
set(TORCH_INSTALL_PREFIX \"${dir}\")
set(TORCH_INCLUDE_DIRS \"${dir}/include\")
set(TORCH_CXX_FLAGS \"${cxx_flags}\")
if(NOT TARGET torch)
  add_library(torch INTERFACE IMPORTED)
endif()
set(TORCH_LIBRARIES torch)
")
  file(WRITE "${dir}/TorchConfigVersion.cmake" "set(PACKAGE_VERSION \"2.3.0\")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n")
endfunction()

set(extra "")
if(CASE STREQUAL "missing_dir")
  set(torch_dir "${WORK_DIR}/no/such/folder")
  set(expected "holds no TorchConfig.cmake")
elseif(CASE STREQUAL "old_abi")
  set(torch_dir "${WORK_DIR}/torch")
  fake_torch("${torch_dir}" "-D_GLIBCXX_USE_CXX11_ABI=0")
  set(expected "was built with the pre-C\\+\\+11 ABI.*libtorch-cxx11-abi-shared-with-deps")
elseif(CASE STREQUAL "cpu_asked_for_cuda")
  set(torch_dir "${WORK_DIR}/torch")
  fake_torch("${torch_dir}" "-D_GLIBCXX_USE_CXX11_ABI=1")
  set(extra -DMULTIGPU_ENABLE_CUDA=ON)
  set(expected "MULTIGPU_ENABLE_CUDA=ON, but the LibTorch found at .* was built without CUDA")
else()
  message(FATAL_ERROR "CASE must be missing_dir, old_abi or cpu_asked_for_cuda, not '${CASE}'")
endif()

execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
          "-DTorch_DIR=${torch_dir}" -DMULTIGPU_BUILD_TESTS=OFF -DMULTIGPU_BUILD_EXAMPLES=OFF
          -DMULTIGPU_BUILD_BENCHMARKS=OFF -DMULTIGPU_BUILD_TOOLS=OFF ${extra}
  RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(REGEX REPLACE "[ \t\r\n]+" " " text "${out} ${err}")  # CMake wraps long messages
if(result EQUAL 0)
  message(FATAL_ERROR "bad LibTorch '${CASE}': configuring succeeded, but it must fail:\n${out}${err}")
endif()
if(NOT text MATCHES "${expected}")
  message(FATAL_ERROR "bad LibTorch '${CASE}': the error does not say '${expected}':\n${err}")
endif()
string(REGEX MATCHALL "CMake Error" errors "${err}")
list(LENGTH errors count)
if(NOT count EQUAL 1)
  message(FATAL_ERROR "bad LibTorch '${CASE}': ${count} errors instead of one message:\n${err}")
endif()
string(REGEX REPLACE "[ \t\r\n]+" " " said "${err}")
message(STATUS "bad LibTorch '${CASE}': refused with: ${said}")
