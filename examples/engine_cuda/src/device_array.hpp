// Device memory the engine owns (the library never allocates; an engine does, once, at setup): n values of T from
// one cudaMalloc, freed by detail::device_free, move-only. The transformer's weights and workspaces, the sampler's
// buffers and the K/V cache all hold their memory this way.
#pragma once

#include <cstddef>
#include <memory>
#include <span>

#include <cuda_runtime_api.h>

#include <specdiff/cuda/error.cuh>

#include "sd3/cuda/transformer.hpp"

namespace sd3::gpu::detail {

template <class T>
struct device_array {
    std::unique_ptr<T, device_free> memory;
    std::size_t n = 0;

    device_array() = default;
    explicit device_array(std::size_t count) : memory(static_cast<T*>(allocate_device(count * sizeof(T)))), n(count) {}
    T* get() const noexcept { return memory.get(); }
    std::size_t bytes() const noexcept { return n * sizeof(T); }
};

template <class T>
device_array<T> upload(std::span<const T> host) {
    device_array<T> d(host.size());
    SPECDIFF_CUDA_CHECK(cudaMemcpy(d.get(), host.data(), host.size_bytes(), cudaMemcpyHostToDevice));
    return d;
}

}  // namespace sd3::gpu::detail
