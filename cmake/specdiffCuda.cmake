# specdiff::cuda, the target for CUDA sources that include <specdiff/cuda/*.cuh>. Its usage requirements
# depend on the *consumer's* CMake (whether it knows nvcc's C++20 flag) and CUDA toolkit (where CCCL lives),
# not on the machine that built or installed specdiff, so this file is installed next to specdiffConfig.cmake
# and run at the consumer's configure time; the source tree runs the same function for add_subdirectory users
# and for its own CUDA tests and benchmarks.
#
# Expects find_package(CUDAToolkit) to have succeeded in the calling scope (CUDA::toolkit and
# CUDAToolkit_INCLUDE_DIRS).
function(specdiff_cuda_usage_requirements target host_target)
  # Everything the host library needs (headers, C++20 for .cpp sources) comes with it.
  target_link_libraries(${target} INTERFACE ${host_target})

  # C++20 for CUDA sources: the headers use concepts, requires-clauses and std::span.
  if(CMAKE_VERSION VERSION_LESS 3.26)
    # CMake 3.25 lists cuda_std_20 but has no nvcc flag for it (a target asking for the feature fails to
    # generate), so the flag is passed directly, to CUDA sources only.
    target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  else()
    target_compile_features(${target} INTERFACE cuda_std_20)
  endif()

  # The toolkit's headers: cuda_runtime.h, and CCCL (CUB, Thrust, libcu++), which CUDA 13 moved into
  # include/cccl. nvcc searches include/cccl itself, but a host compiler does not, and CMake 3.25's
  # CUDA::toolkit leaves it out (later releases add it; the same directory twice is harmless).
  # CUDA::toolkit rather than CUDA::cudart: it carries headers only, so the runtime library stays the
  # consumer's choice (CMAKE_CUDA_RUNTIME_LIBRARY, static by default) and is not linked twice.
  target_link_libraries(${target} INTERFACE CUDA::toolkit)
  foreach(include_dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
    if(IS_DIRECTORY "${include_dir}/cccl")
      target_include_directories(${target} SYSTEM INTERFACE "${include_dir}/cccl")
    endif()
  endforeach()
endfunction()
