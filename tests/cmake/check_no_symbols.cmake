# Fails when an object file compiled from a header that is only included
# defines code of multigpu's: see Note [Virtual functions in a header-only
# library] in include/multigpu/comm.hpp. OBJECTS is a ;-list of files.
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" -C --defined-only "${object}" OUTPUT_VARIABLE symbols RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "nm failed on ${object}")
  endif()
  string(REGEX MATCHALL "[^\n]*multigpu::[^\n]*" found "${symbols}")
  if(found)
    string(REPLACE ";" "\n  " found "${found}")
    message(FATAL_ERROR "${object} defines multigpu code although nothing uses it (every includer pays for it "
                        "in compile time):\n  ${found}")
  endif()
endforeach()
message(STATUS "checked: no multigpu code emitted by including the headers")
