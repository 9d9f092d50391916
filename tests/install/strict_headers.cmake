# package/strict_headers: every public host header compiles on its own (nothing it needs left to an
# earlier include) and without a warning under a strict set, as a user's -Werror build would see it.
cmake_policy(SET CMP0054 NEW)
file(GLOB headers RELATIVE ${INCLUDE_DIR} ${INCLUDE_DIR}/specdiff/*.hpp)
list(LENGTH headers count)
if(count EQUAL 0)
  message(FATAL_ERROR "no headers found under ${INCLUDE_DIR}/specdiff")
endif()
file(MAKE_DIRECTORY ${WORK_DIR})
set(failed "")
# Each header alone, then INSTANTIATE: every template instantiated with the shipped policies (a header
# alone instantiates nothing, and template bodies warn only when instantiated).
foreach(header IN LISTS headers ITEMS "(instantiate)")
  if(header STREQUAL "(instantiate)")
    set(source ${INSTANTIATE})
  else()
    string(MAKE_C_IDENTIFIER ${header} name)
    set(source ${WORK_DIR}/${name}.cpp)
    file(WRITE ${source} "#include <${header}>\n")
  endif()
  execute_process(
    COMMAND ${CXX} -std=c++20 -fsyntax-only -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow -Werror
            -I${INCLUDE_DIR} ${source}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message("${header}: FAILED\n${out}${err}")
    list(APPEND failed ${header})
  else()
    message("${header}: ok")
  endif()
endforeach()
if(failed)
  message(FATAL_ERROR "headers that do not compile alone or warn: ${failed}")
endif()
