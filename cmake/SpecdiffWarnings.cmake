# Warnings for this project's own targets (never imposed on users of specdiff::specdiff).
function(specdiff_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
    if(SPECDIFF_WERROR)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
    endif()
  endif()
  if(CMAKE_CUDA_COMPILER)
    specdiff_cuda_warning_flags(_cuda_flags "${SPECDIFF_WERROR}")
    foreach(_flag IN LISTS _cuda_flags)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${_flag}>)
    endforeach()
  endif()
endfunction()

# The nvcc flags of specdiff_warnings: warnings on (host compiler and nvcc), and errors only when `werror` is true
# (SPECDIFF_WERROR: CI holds the tree to -Werror; scripts/gpu-check.sh turns it off, so a device machine's other
# toolkit, with one new diagnostic, cannot cost a device session its only build). Usable in script mode (cmake -P),
# where tests/engine_cuda/warnings_policy.cmake checks it.
function(specdiff_cuda_warning_flags out werror)
  set(_flags -Xcompiler=-Wall,-Wextra)
  if(werror)
    list(APPEND _flags --Werror=all-warnings)
  endif()
  set(${out} ${_flags} PARENT_SCOPE)
endfunction()

# GCC 12 reports false (maybe-)uninitialized warnings inside its own AVX/AVX-512 intrinsic headers when their
# functions are inlined under -march=native (GCC bug 105593): Eigen's packet math, and the engine's own
# intrinsics (the GEMM's register transposes). These sources keep every other warning.
function(specdiff_avx512_intrinsics_sources)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    set_property(SOURCE ${ARGN} APPEND PROPERTY COMPILE_OPTIONS -Wno-maybe-uninitialized -Wno-uninitialized)
  endif()
endfunction()

# Adds every immediate subfolder of the current source dir that has a CMakeLists.txt.
# Components live in their own folders; this keeps the parent lists free of per-component edits.
function(specdiff_add_component_dirs)
  file(GLOB _children LIST_DIRECTORIES true RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR}/*)
  list(SORT _children)
  foreach(_child IN LISTS _children)
    if(IS_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/${_child} AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_child}/CMakeLists.txt)
      add_subdirectory(${_child})
    endif()
  endforeach()
endfunction()
