// cuBLAS failures as exceptions: the call, where, and cuBLAS's own name for the status.
#pragma once

#include <cublas_v2.h>

#include <stdexcept>
#include <string>

namespace sd3::gpu::detail {

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " + cublasGetStatusName(status) + " (" +
                                 cublasGetStatusString(status) + ")");
}

}  // namespace sd3::gpu::detail

#define SD3_CUBLAS_CHECK(...) ::sd3::gpu::detail::check_cublas((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
