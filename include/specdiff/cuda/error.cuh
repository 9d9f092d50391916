// CUDA errors become C++ exceptions on the host side. Device code never throws: kernels that meet bad data
// (an index out of range, an empty history) skip the row and raise a bit in a status word instead (status.cuh).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common.hpp"  // its C++20 check: every specdiff header stops below C++20 with the same message

namespace specdiff::gpu {

/// A failed CUDA runtime call: which call, where, and what the runtime said.
class cuda_error : public std::runtime_error {
 public:
  cuda_error(cudaError_t code, const char* call, const char* file, int line)
      : std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")"),
        code_(code),
        line_(line) {}

  cudaError_t code() const noexcept { return code_; }
  int line() const noexcept { return line_; }

 private:
  cudaError_t code_;
  int line_;
};

/// Throws cuda_error unless `code` is cudaSuccess.
inline void check(cudaError_t code, const char* call, const char* file, int line) {
  if (code != cudaSuccess) throw cuda_error(code, call, file, line);
}

}  // namespace specdiff::gpu

/// Checks a CUDA runtime call (or a CUB device algorithm, which returns cudaError_t too).
#define SPECDIFF_CUDA_CHECK(...) ::specdiff::gpu::check((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)

/// Checks the launch just made on this thread (bad configuration, missing kernel image). Asynchronous faults
/// surface at the next checked call that synchronises.
#define SPECDIFF_CUDA_CHECK_LAUNCH(kernel_name) ::specdiff::gpu::check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
