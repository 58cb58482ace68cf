# Builds and runs the consumer project in tests/cmake/consumer, which uses
# multigpu the way CONSUMER says: find_package (after installing this build
# tree), add_subdirectory or FetchContent.

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "consumer ${CONSUMER}: failed (${result}): ${command}")
  endif()
endfunction()

set(prefix_path "")
if(CONSUMER STREQUAL "find_package")
  run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix")
  set(prefix_path "${WORK_DIR}/prefix")
endif()

# The test's compiler launcher (ccache), | for ;, through the environment
# variable that CMake takes it from (a list would not survive run()).
if(CXX_COMPILER_LAUNCHER)
  string(REPLACE "|" ";" launcher "${CXX_COMPILER_LAUNCHER}")
  set(ENV{CMAKE_CXX_COMPILER_LAUNCHER} "${launcher}")
endif()
run("${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/consumer" -B "${WORK_DIR}/build"
  -G "${GENERATOR}"
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DCMAKE_BUILD_TYPE=Release
  "-DCMAKE_PREFIX_PATH=${prefix_path}"
  "-DTorch_DIR=${TORCH_DIR}"
  -DCONSUMER=${CONSUMER}
  -DMULTIGPU_SOURCE_DIR=${SOURCE_DIR})
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
