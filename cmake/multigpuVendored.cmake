# Lets find_package and find_path fall back on the copies of the header-only
# dependencies that scripts/vendor-deps.sh makes. Included by
# multigpuDependencies.cmake for multigpu's own build (not by an installed
# multigpu's config file: a consumer brings its own dependencies).
#
# In:  MULTIGPU_VENDORED_DIR (cache; default third_party/vendored beside cmake/),
#      MULTIGPU_PREFER_VENDORED (option, OFF)
# Out: CMAKE_SYSTEM_PREFIX_PATH extended (or the packages' *_DIR set);
#      MULTIGPU_VENDORED_GLOO_INCLUDE_DIR (Gloo's vendored headers, or empty);
#      MULTIGPU_VENDORED_GLOO_FIRST (TRUE when they are to be preferred).

# Note [Vendored dependencies]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# fmt, doctest, CLI11, nlohmann-json and Gloo's headers come from the system
# (Debian's packages; scripts/setup.sh installs them). A machine with no
# package registry, such as a lent GPU machine, gets copies made elsewhere by
# scripts/vendor-deps.sh, one prefix per package under MULTIGPU_VENDORED_DIR
# (<dir>/CLI11/include/CLI, <dir>/CLI11/lib/cmake/CLI11, ...): a shared include
# folder would put the vendored fmt on the include path of every target that
# uses CLI11, ahead of the fmt LibTorch brings (see Note [Which fmt]).
#
# The prefixes are appended to CMAKE_SYSTEM_PREFIX_PATH, which find_package and
# find_path search after every other place (CMAKE_PREFIX_PATH, the PATH's
# prefixes, /usr/local, /usr): where the system has a package, it is still
# the one used, and the project's find_package calls (tests, examples, tools,
# benchmarks) need no change. MULTIGPU_PREFER_VENDORED=ON points each
# package's <Package>_DIR at its copy instead: the check that the copies
# suffice on their own (test vendored_dependencies).

set(MULTIGPU_VENDORED_DIR "${CMAKE_CURRENT_LIST_DIR}/../third_party/vendored" CACHE PATH
  "Header-only dependencies copied by scripts/vendor-deps.sh, used when the system has none")
option(MULTIGPU_PREFER_VENDORED "Use the copies in MULTIGPU_VENDORED_DIR even where the system has the package" OFF)

get_filename_component(_multigpu_vendored "${MULTIGPU_VENDORED_DIR}" ABSOLUTE)
set(MULTIGPU_VENDORED_GLOO_INCLUDE_DIR "")
set(MULTIGPU_VENDORED_GLOO_FIRST FALSE)

if(MULTIGPU_PREFER_VENDORED AND NOT EXISTS "${_multigpu_vendored}/MANIFEST.md")
  message(FATAL_ERROR
    "multigpu: MULTIGPU_PREFER_VENDORED=ON, but MULTIGPU_VENDORED_DIR ('${_multigpu_vendored}') holds no "
    "vendored dependencies: run scripts/vendor-deps.sh (on a machine that has them) first")
endif()

foreach(_package fmt doctest CLI11 nlohmann_json)
  set(_prefix "${_multigpu_vendored}/${_package}")
  # A <Package>_DIR cached into the copies by an earlier MULTIGPU_PREFER_VENDORED
  # run is forgotten, so that the system's is searched for again.
  if(NOT MULTIGPU_PREFER_VENDORED AND ${_package}_DIR)
    string(FIND "${${_package}_DIR}" "${_multigpu_vendored}/" _at)
    if(_at EQUAL 0)
      unset(${_package}_DIR CACHE)
    endif()
  endif()
  if(NOT EXISTS "${_prefix}/lib/cmake/${_package}")
    continue()
  endif()
  if(MULTIGPU_PREFER_VENDORED)
    set(${_package}_DIR "${_prefix}/lib/cmake/${_package}" CACHE PATH "The ${_package} package" FORCE)
  elseif(NOT _prefix IN_LIST CMAKE_SYSTEM_PREFIX_PATH)
    list(APPEND CMAKE_SYSTEM_PREFIX_PATH "${_prefix}")
  endif()
endforeach()
if(EXISTS "${_multigpu_vendored}/gloo/include/gloo/algorithm.h")
  set(MULTIGPU_VENDORED_GLOO_INCLUDE_DIR "${_multigpu_vendored}/gloo/include")
  set(MULTIGPU_VENDORED_GLOO_FIRST ${MULTIGPU_PREFER_VENDORED})
endif()

if(EXISTS "${_multigpu_vendored}/MANIFEST.md")
  if(MULTIGPU_PREFER_VENDORED)
    message(STATUS "multigpu: header-only dependencies from ${_multigpu_vendored} (MULTIGPU_PREFER_VENDORED)")
  else()
    message(STATUS "multigpu: vendored header-only dependencies in ${_multigpu_vendored}, used where the system has none")
  endif()
endif()
unset(_multigpu_vendored)
unset(_prefix)
unset(_at)
