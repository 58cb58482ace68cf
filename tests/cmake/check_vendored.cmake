# The vendored header-only dependencies (scripts/vendor-deps.sh, Note
# [Vendored dependencies] in cmake/multigpuVendored.cmake) work, and change
# nothing where the system has the packages. Configures the small project in
# vendored/ three times:
#   1. without copies: what the system alone has;
#   2. with copies: the same packages from the same places, the copies only
#      for what the system lacks; and with the system's hidden, the copies;
#   3. with MULTIGPU_PREFER_VENDORED=ON: every package from the copies, and a
#      program using all of them builds and runs reading no header from
#      elsewhere (the compiler's -H list).
# The copies are made afresh in WORK_DIR; where this machine has no headers to
# copy (a GPU machine without a registry), the carried VENDORED_DIR is checked.
#
# In: SOURCE_DIR, WORK_DIR, VENDORED_DIR, GENERATOR, CXX_COMPILER.

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(fail)
  string(REPLACE ";" "" text "${ARGN}")
  message(FATAL_ERROR "vendored dependencies: ${text}")
endfunction()

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    fail("failed (${result}): ${command}\n${output}")
  endif()
  set(run_output "${output}" PARENT_SCOPE)
endfunction()

# The copies.
set(vendored "${WORK_DIR}/vendored")
execute_process(COMMAND "${CMAKE_COMMAND}" -E env MULTIGPU_VENDOR_DATASET=0
                        bash "${SOURCE_DIR}/scripts/vendor-deps.sh" "${vendored}"
  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(NOT result EQUAL 0)
  if(EXISTS "${VENDORED_DIR}/MANIFEST.md")
    message(STATUS "scripts/vendor-deps.sh could not copy here (${output}); checking ${VENDORED_DIR}")
    get_filename_component(vendored "${VENDORED_DIR}" ABSOLUTE)
  else()
    fail("scripts/vendor-deps.sh failed: ${output}")
  endif()
endif()

set(packages fmt doctest CLI11 nlohmann_json gloo)

# Configures vendored/ in WORK_DIR/<name> with the given options; sets found_<package>.
macro(configure name)
  run("${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/vendored" -B "${WORK_DIR}/${name}"
    -G "${GENERATOR}" -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release
    -DMULTIGPU_SOURCE_DIR=${SOURCE_DIR} ${ARGN})
  include("${WORK_DIR}/${name}/found.cmake")
endmacro()

function(is_vendored path out)
  string(FIND "${path}" "${vendored}/" at)
  if(at EQUAL 0)
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

# 1. The system alone.
configure(system_only -DCHECK_FIND_ONLY=ON "-DMULTIGPU_VENDORED_DIR=${WORK_DIR}/no-copies")
foreach(package IN LISTS packages)
  if(found_${package} MATCHES "-NOTFOUND$")
    set(found_${package} "")
  endif()
  set(system_${package} "${found_${package}}")
endforeach()

# 2. The copies as a fallback.
configure(fallback -DCHECK_FIND_ONLY=ON "-DMULTIGPU_VENDORED_DIR=${vendored}")
foreach(package IN LISTS packages)
  is_vendored("${found_${package}}" from_copy)
  if(system_${package} AND NOT found_${package} STREQUAL system_${package})
    fail("with the copies beside the system's, ${package} came from '${found_${package}}', "
         "and without them from '${system_${package}}': the system's must stay first")
  elseif(NOT system_${package} AND NOT from_copy)
    fail("the system has no ${package}, and the copy in ${vendored} was not used ('${found_${package}}')")
  endif()
  if(system_${package})
    message(STATUS "${package}: the system's (${system_${package}}), with or without the copies")
  else()
    message(STATUS "${package}: none on the system; the copy (${found_${package}})")
  endif()
endforeach()

# 2b. The copies as a fallback, with the system's packages hidden (CMake 3.23
# can hide a prefix), as on a machine that has none.
if(NOT CMAKE_VERSION VERSION_LESS 3.23)
  configure(system_hidden -DCHECK_FIND_ONLY=ON -DCHECK_HIDE_SYSTEM=ON "-DMULTIGPU_VENDORED_DIR=${vendored}")
  foreach(package IN LISTS packages)
    is_vendored("${found_${package}}" from_copy)
    if(NOT from_copy)
      fail("with the system's packages hidden, ${package} came from '${found_${package}}', not from the copy")
    endif()
  endforeach()
  message(STATUS "with the system's packages hidden: every package from the copies")
endif()

# 3. The copies alone.
configure(preferred -DMULTIGPU_PREFER_VENDORED=ON "-DMULTIGPU_VENDORED_DIR=${vendored}")
foreach(package IN LISTS packages)
  is_vendored("${found_${package}}" from_copy)
  if(NOT from_copy)
    fail("with MULTIGPU_PREFER_VENDORED=ON, ${package} came from '${found_${package}}', not from ${vendored}")
  endif()
endforeach()
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/preferred")
set(headers "${run_output}")
string(REGEX MATCHALL "\n\\.+ [^\n]+" headers "\n${headers}")
set(outside "")
set(read_fmt FALSE)
set(read_doctest FALSE)
set(read_CLI FALSE)
set(read_nlohmann FALSE)
set(read_gloo FALSE)
foreach(line IN LISTS headers)
  string(REGEX REPLACE "^\n\\.+ " "" path "${line}")
  if(path MATCHES "/(fmt|doctest|CLI|nlohmann|gloo)/")
    is_vendored("${path}" from_copy)
    if(from_copy)
      set(read_${CMAKE_MATCH_1} TRUE)
    else()
      list(APPEND outside "${path}")
    endif()
  endif()
endforeach()
if(outside)
  list(REMOVE_DUPLICATES outside)
  string(REPLACE ";" "\n  " outside "${outside}")
  fail("with MULTIGPU_PREFER_VENDORED=ON the program read these headers from outside ${vendored}:\n  ${outside}")
endif()
foreach(folder fmt doctest CLI nlohmann gloo)
  if(NOT read_${folder})
    fail("the compiler's -H list shows no header from ${vendored}'s ${folder}/ (was -H honoured?)")
  endif()
endforeach()
run("${WORK_DIR}/preferred/vendored_check")
message(STATUS "MULTIGPU_PREFER_VENDORED=ON: every package from ${vendored}; the program builds and passes")
