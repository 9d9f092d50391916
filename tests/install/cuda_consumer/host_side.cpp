// The host half of the CUDA consumer, compiled by the host C++ compiler, not nvcc: nvcc finds the toolkit's
// headers and CCCL (include/cccl since CUDA 13) by itself, a host compiler only through specdiff::cuda's
// include directories. So this file is what checks that specdiff::cuda carries them, and that host sources
// get C++20 from it too.
#include <cuda_runtime.h>
#include <thrust/version.h>

#include <specdiff/specdiff.hpp>

#include <cstdio>

void print_versions() {
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  std::printf("CUDA runtime %d, Thrust %d.%d.%d, specdiff C1 count at 256 tokens and CR 0.9: %d\n", runtime,
              THRUST_MAJOR_VERSION, THRUST_MINOR_VERSION, THRUST_SUBMINOR_VERSION,
              static_cast<int>(specdiff::math::compute_count(0.9, 256)));
}
