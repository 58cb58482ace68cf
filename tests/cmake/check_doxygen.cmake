# The API reference builds from the public headers without a single Doxygen
# warning (an undocumented public symbol or parameter, a @param naming no
# parameter, a reference that resolves to nothing).
#   cmake -DDOXYGEN=... -DSOURCE_DIR=... -DOUTPUT_DIR=... -P check_doxygen.cmake
# Runs docs/Doxyfile from the source root with its output and warning log
# moved into OUTPUT_DIR (the build folder).
foreach(var DOXYGEN SOURCE_DIR OUTPUT_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_doxygen.cmake needs -D${var}=...")
  endif()
endforeach()

file(REMOVE_RECURSE "${OUTPUT_DIR}")
file(MAKE_DIRECTORY "${OUTPUT_DIR}")
set(log "${OUTPUT_DIR}/warnings.log")
file(WRITE "${OUTPUT_DIR}/Doxyfile"
  "@INCLUDE = \"${SOURCE_DIR}/docs/Doxyfile\"\n"
  "OUTPUT_DIRECTORY = \"${OUTPUT_DIR}\"\n"
  "WARN_LOGFILE = \"${log}\"\n")
execute_process(COMMAND "${DOXYGEN}" "${OUTPUT_DIR}/Doxyfile"
  WORKING_DIRECTORY "${SOURCE_DIR}"
  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "doxygen docs/Doxyfile failed (exit status ${result}):\n${output}")
endif()
if(NOT EXISTS "${log}")
  message(FATAL_ERROR "doxygen docs/Doxyfile wrote no warning log at ${log}:\n${output}")
endif()
file(STRINGS "${log}" lines)
if(lines)
  list(JOIN lines "\n" text)
  set(warnings ${lines})
  list(FILTER warnings INCLUDE REGEX "warning:")
  list(LENGTH warnings count)
  message(FATAL_ERROR "doxygen docs/Doxyfile: ${count} warning(s) on the public headers; "
    "document them with /// (STYLE.md), or, for internals, move them into a detail namespace:\n${text}")
endif()
message(STATUS "API reference: ${OUTPUT_DIR}/html/index.html, no warnings")
