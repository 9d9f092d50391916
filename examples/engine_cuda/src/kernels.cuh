// The element-wise and row-wise stages of the device forward: each the device twin of one helper of the CPU
// engine (examples/engine/src/transformer_impl.hpp), written with the same formulas in the same order, so that an
// fp32 forward agrees with the CPU one to rounding. Every kernel reads fp32 GEMM outputs and writes either the
// fp32 residual stream or the next GEMM's operand in the engine's precision T (float or __nv_bfloat16). Every kernel
// here is a template (`template <int = 0>` where nothing else varies): two translation units include these headers
// (transformer.cu, attention_check.cu), and only a template's definitions may repeat across them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace sd3::gpu::detail {

constexpr float norm_eps = 1e-6f;  // LayerNorm and RMSNorm eps in SD3 (as the CPU engine)

template <class T>
__device__ __forceinline__ float to_float(T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T from_float(float v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return __float2bfloat16_rn(v);
}

enum class activation { none, silu, gelu_tanh };

template <activation A>
__device__ __forceinline__ float activate(float x) {
    if constexpr (A == activation::silu) return x / (1.0f + expf(-x));
    else if constexpr (A == activation::gelu_tanh) {
        constexpr float beta = 0.7978845608028654f;  // sqrt(2/pi), as torch's kernel writes it
        constexpr float kappa = 0.044715f;
        return 0.5f * x * (1.0f + tanhf(beta * (x + kappa * x * x * x)));
    } else return x;
}

// out[r][c] = act(y[r][c] + bias[c]) for rows x cols; y and out may be the same fp32 buffer.
template <activation A, class O>
__global__ void bias_activation_kernel(const float* y, int ldy, const float* bias, O* out, int ldo, int rows, int cols) {
    const std::size_t n = static_cast<std::size_t>(rows) * cols;
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < n; e += std::size_t{gridDim.x} * blockDim.x) {
        const int r = static_cast<int>(e / cols), c = static_cast<int>(e % cols);
        out[static_cast<std::size_t>(r) * ldo + c] = from_float<O>(activate<A>(y[static_cast<std::size_t>(r) * ldy + c] + bias[c]));
    }
}

template <class T>
__global__ void convert_kernel(const float* in, T* out, std::size_t n) {
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < n; e += std::size_t{gridDim.x} * blockDim.x)
        out[e] = from_float<T>(in[e]);
}

// temb = a + b (the timestep and pooled-text MLPs, diffusers' order); out = SiLU(temb), which every AdaLN linear reads.
template <class T>
__global__ void sum_silu_kernel(const float* a, const float* b, T* out, int n) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x)
        out[e] = from_float<T>(activate<activation::silu>(a[e] + b[e]));
}

// Sinusoidal projection [cos, sin] (flip_sin_to_cos) of t, freq_i = exp(-ln(1e4) * i / 128): the exponent formed
// in float like torch, exp in double then rounded, as the CPU engine's timestep_projection.
template <class T>
__global__ void timestep_kernel(float t, T* out, int batch) {
    constexpr int channels = 256, half = channels / 2;
    const float minus_log_period = static_cast<float>(-9.210340371976184);  // -ln(10000)
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < batch * channels; e += gridDim.x * blockDim.x) {
        const int i = e % channels, k = i % half;
        const float exponent = (minus_log_period * static_cast<float>(k)) / static_cast<float>(half);
        const float arg = t * static_cast<float>(exp(static_cast<double>(exponent)));
        out[e] = from_float<T>(i < half ? cosf(arg) : sinf(arg));
    }
}

// Token of model row r (sample r / per): tokens[r] for a subset, else r % per. A listed id outside [0, limit) is
// clamped (the list is the caller's device memory, which the host cannot read without synchronising): a bad list
// gives wrong rows, never an access out of bounds, and check_tokens_kernel reports it.
__device__ __forceinline__ int token_of(const std::int32_t* tokens, int r, int per, int limit) {
    if (!tokens) return r % per;
    const int t = tokens[r];
    return t < 0 ? 0 : (t >= limit ? limit - 1 : t);
}

// Sets bit 0 of *status when a sample's list is not strictly ascending within [0, limit).
template <int = 0>
__global__ void check_tokens_kernel(const std::int32_t* tokens, int per, int rows, int limit, unsigned* status) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const int t = tokens[r];
        const bool bad = t < 0 || t >= limit || (r % per != 0 && tokens[r - 1] >= t);
        if (bad) atomicOr(status, 1u);
    }
}

// The patch embedding's input: row (b, r) = latent sample b % latent_batch, token token_of(b * n + r), as T.
template <class T>
__global__ void gather_patches_kernel(const float* latents, int latent_batch, int tokens, int features, const std::int32_t* ids, int n,
                                      int rows, T* out) {
    const std::size_t total = static_cast<std::size_t>(rows) * features;
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < total; e += std::size_t{gridDim.x} * blockDim.x) {
        const int r = static_cast<int>(e / features), f = static_cast<int>(e % features);
        const int sample = (r / n) % latent_batch, token = token_of(ids, r, n, tokens);
        out[e] = from_float<T>(latents[(static_cast<std::size_t>(sample) * tokens + token) * features + f]);
    }
}

// x = (y + bias) + the position table's row for the token's cell of the crop (the CPU engine: GEMM with bias, then
// += table row (top + i, left + j)).
template <int = 0>
__global__ void patch_position_kernel(const float* y, const float* bias, const float* table, int table_side, int top, int left, int grid_width,
                                      int tokens, const std::int32_t* ids, int n, int rows, int D, float* x) {
    const std::size_t total = static_cast<std::size_t>(rows) * D;
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < total; e += std::size_t{gridDim.x} * blockDim.x) {
        const int r = static_cast<int>(e / D), d = static_cast<int>(e % D);
        const int t = token_of(ids, r, n, tokens), i = t / grid_width, j = t % grid_width;
        x[e] = (y[e] + bias[d]) + table[(static_cast<std::size_t>(top + i) * table_side + left + j) * D + d];
    }
}

// Sum over a block of 256 threads (the result in every thread).
__device__ __forceinline__ float block_sum(float v, float* scratch /* [32] */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[r] = LayerNorm(x[r]) * (1 + scale) + shift (no affine, eps 1e-6), the modulation row of sample r / per:
// shift and scale at mod + sample * stride + shift_at / scale_at. One block of 256 threads per row.
template <class T>
__global__ void __launch_bounds__(256) norm_modulate_kernel(const float* x, int D, int per, const float* mod, int stride, int shift_at,
                                                           int scale_at, T* out) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const float* row = x + static_cast<std::size_t>(r) * D;
    float s = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += row[d];
    const float mean = block_sum(s, scratch) / static_cast<float>(D);
    float v = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float c = row[d] - mean;
        v += c * c;
    }
    const float rstd = 1.0f / sqrtf(block_sum(v, scratch) / static_cast<float>(D) + norm_eps);
    const float* m = mod + static_cast<std::size_t>(r / per) * stride;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        out[static_cast<std::size_t>(r) * D + d] = from_float<T>(((row[d] - mean) * rstd) * (1.0f + m[scale_at + d]) + m[shift_at + d]);
}

// Where the q, k, v rows of one stream's projection go: q compact ([rows][D]); k and v to row
// (r / per) * kv_tokens + token_of(ids, r, per) of their buffers (the K/V cache slot, indexed by token id, for the
// image stream; compact for the context).
template <class T>
struct qkv_destination {
    T* q = nullptr;
    T* k = nullptr;
    T* v = nullptr;
    const std::int32_t* ids = nullptr;
    int per = 1;
    int kv_tokens = 1;
};

// The q | k | v projection's epilogue for row r, head h, on one warp: + bias, then RMSNorm of q and k with their
// weights (qk_norm; null: none), as the CPU engine's qk_norm.
template <class T>
__device__ void qkv_row_head(const float* y, const float* bias, const float* norm_q, const float* norm_k, int r, int h, int heads, int hd,
                             const qkv_destination<T>& to) {
    const int lane = threadIdx.x % 32, D = heads * hd;
    const float* row = y + static_cast<std::size_t>(r) * 3 * D;
    float q_ss = 0.f, k_ss = 0.f;
    if (norm_q) {
        for (int d = lane; d < hd; d += 32) {
            const int c = h * hd + d;
            const float q = row[c] + bias[c], k = row[D + c] + bias[D + c];
            q_ss += q * q;
            k_ss += k * k;
        }
        for (int o = 16; o > 0; o >>= 1) {
            q_ss += __shfl_xor_sync(0xffffffffu, q_ss, o);
            k_ss += __shfl_xor_sync(0xffffffffu, k_ss, o);
        }
    }
    const float q_r = norm_q ? 1.0f / sqrtf(q_ss / static_cast<float>(hd) + norm_eps) : 1.f;
    const float k_r = norm_q ? 1.0f / sqrtf(k_ss / static_cast<float>(hd) + norm_eps) : 1.f;
    const std::size_t kv_row = static_cast<std::size_t>(r / to.per) * to.kv_tokens + token_of(to.ids, r, to.per, to.kv_tokens);
    for (int d = lane; d < hd; d += 32) {
        const int c = h * hd + d;
        float q = row[c] + bias[c], k = row[D + c] + bias[D + c];
        const float v = row[2 * D + c] + bias[2 * D + c];
        if (norm_q) {
            q = (q * q_r) * norm_q[d];
            k = (k * k_r) * norm_k[d];
        }
        to.q[static_cast<std::size_t>(r) * D + c] = from_float<T>(q);
        to.k[kv_row * D + c] = from_float<T>(k);
        to.v[kv_row * D + c] = from_float<T>(v);
    }
}

// One warp per (row, head), grid-stride over them (a warp's lanes always share their item, so the shuffles are
// convergent).
template <class T>
__global__ void qkv_kernel(const float* y, const float* bias, const float* norm_q, const float* norm_k, int rows, int heads, int hd,
                           qkv_destination<T> to) {
    const long long warps = blockDim.x / 32, items = static_cast<long long>(rows) * heads;
    for (long long item = blockIdx.x * warps + threadIdx.x / 32; item < items; item += gridDim.x * warps)
        qkv_row_head(y, bias, norm_q, norm_k, static_cast<int>(item / heads), static_cast<int>(item % heads), heads, hd, to);
}

// x[r] += gate * (y[r] + bias), the gate of sample r / per at mod + sample * stride + gate_at (the CPU engine's
// apply_module, with the output projection's bias added first as its GEMM does).
template <int = 0>
__global__ void gated_residual_kernel(float* x, const float* y, const float* bias, const float* mod, int stride, int gate_at, int per, int rows,
                                      int D) {
    const std::size_t total = static_cast<std::size_t>(rows) * D;
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < total; e += std::size_t{gridDim.x} * blockDim.x) {
        const int r = static_cast<int>(e / D), d = static_cast<int>(e % D);
        x[e] += mod[static_cast<std::size_t>(r / per) * stride + gate_at + d] * (y[e] + bias[d]);
    }
}

}  // namespace sd3::gpu::detail
