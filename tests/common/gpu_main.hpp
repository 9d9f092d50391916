// The runner of the CUDA test executables (tests/cuda, tests/engine_cuda): `--gpu` marks a run of device suites;
// without a usable CUDA device it exits with 77 (CTest's SKIP_RETURN_CODE for them), so a machine without a GPU
// reports them skipped, never passed. Include after defining DOCTEST_CONFIG_IMPLEMENT.
#pragma once

#include <doctest/doctest.h>

#include <cstdio>
#include <string_view>
#include <vector>

#include <cuda_runtime_api.h>

#include "testing.hpp"

namespace testing {

inline int gpu_test_main(int argc, char** argv) {
  std::vector<char*> args;
  bool needs_gpu = false;
  for (int i = 0; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--gpu") needs_gpu = true;
    else args.push_back(argv[i]);
  }
  if (needs_gpu) {
    int devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0) {
      std::printf("SKIPPED: no usable CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
      return 77;
    }
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) std::printf("device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  }
  std::printf("seed %llu (set SPECDIFF_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(fresh_seed()));
  doctest::Context context(static_cast<int>(args.size()), args.data());
  return context.run();
}

}  // namespace testing
