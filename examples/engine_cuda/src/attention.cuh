// Joint attention on the device: softmax(scale · Q Kᵀ) V per head, flash-style (an online softmax over key tiles,
// no queries × keys buffer), returning each query's log-sum-exp so that SpecDiff's attention column sums come from
// specdiff::gpu::lse_column_sums without the probabilities ever being stored.
//
// Queries and keys are each two segments, as MMDiT's joint attention concatenates them: [image rows; context rows].
// The image keys and values are the layer's K/V cache slot (every image token, fresh or cached), the context ones
// this forward's projection. One thread per query, 64 queries per block, key tiles staged through shared memory in
// fp32 and read by every thread at once (broadcast); per tile, the logits first, then one rescale of the running
// output: fp32 throughout, CUDA cores (docs/engine_cuda.md says why not tensor cores yet, and what that costs).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.cuh"

namespace sd3::gpu::detail {

template <class T>
struct attention_segment {
    const T* data = nullptr;
    int rows = 0;                  // per sample
    long long sample_stride = 0;   // elements between samples
};

template <class T>
struct attention_args {
    int heads = 0;
    int hidden = 0;                // row stride of every segment: heads * head_dim, heads contiguous
    float scale = 0.f;
    attention_segment<T> q[2], k[2], v[2];
    T* out[2] = {};                // same layout as q[s]
    float* lse = nullptr;          // [sample][head][q[0].rows + q[1].rows], natural log
};

constexpr int attention_queries = 64;  // threads (queries) per block

template <class T>
__device__ __forceinline__ const T* segment_row(const attention_segment<T> (&s)[2], int b, int i, int hidden, int col) {
    const int seg = i < s[0].rows ? 0 : 1;
    const int row = seg ? i - s[0].rows : i;
    return s[seg].data + b * s[seg].sample_stride + static_cast<long long>(row) * hidden + col;
}

// Keys per shared-memory tile: registers hold a query, its output and a tile of logits.
template <int HeadDim>
constexpr int key_tile = HeadDim <= 64 ? 32 : 16;

template <class T, int HeadDim>
__global__ void __launch_bounds__(attention_queries) attention_kernel(attention_args<T> a) {
    constexpr int KT = key_tile<HeadDim>;
    __shared__ float ks[KT][HeadDim];
    __shared__ float vs[KT][HeadDim];
    const int b = blockIdx.z, h = blockIdx.y;
    const int queries = a.q[0].rows + a.q[1].rows, keys = a.k[0].rows + a.k[1].rows;
    const int qi = blockIdx.x * attention_queries + threadIdx.x;
    const bool active = qi < queries;
    const int col = h * HeadDim;

    float q[HeadDim], acc[HeadDim];
    if (active) {
        const T* qp = segment_row(a.q, b, qi, a.hidden, col);
#pragma unroll
        for (int d = 0; d < HeadDim; ++d) q[d] = to_float(qp[d]);
    }
#pragma unroll
    for (int d = 0; d < HeadDim; ++d) acc[d] = 0.f;
    float running_max = -INFINITY, sum = 0.f;

    for (int j0 = 0; j0 < keys; j0 += KT) {
        __syncthreads();  // the previous tile has been read
        for (int e = threadIdx.x; e < KT * HeadDim; e += attention_queries) {
            const int jj = e / HeadDim, d = e % HeadDim, j = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (j < keys) {
                kv = to_float(*segment_row(a.k, b, j, a.hidden, col + d));
                vv = to_float(*segment_row(a.v, b, j, a.hidden, col + d));
            }
            ks[jj][d] = kv;
            vs[jj][d] = vv;
        }
        __syncthreads();
        if (!active) continue;
        const int in_tile = keys - j0 < KT ? keys - j0 : KT;
        float s[KT];
        float tile_max = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < KT; ++jj) {
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < HeadDim; ++d) dot = fmaf(q[d], ks[jj][d], dot);
            s[jj] = jj < in_tile ? dot * a.scale : -INFINITY;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        const float next_max = fmaxf(running_max, tile_max);
        const float rescale = expf(running_max - next_max);  // 0 on the first tile (running_max = -inf)
        sum *= rescale;
#pragma unroll
        for (int d = 0; d < HeadDim; ++d) acc[d] *= rescale;
#pragma unroll
        for (int jj = 0; jj < KT; ++jj) {
            const float p = expf(s[jj] - next_max);  // 0 past the last key
            sum += p;
#pragma unroll
            for (int d = 0; d < HeadDim; ++d) acc[d] = fmaf(p, vs[jj][d], acc[d]);
        }
        running_max = next_max;
    }
    if (!active) return;
    const int seg = qi < a.q[0].rows ? 0 : 1;
    const int row = seg ? qi - a.q[0].rows : qi;
    T* o = a.out[seg] + b * a.q[seg].sample_stride + static_cast<long long>(row) * a.hidden + col;
    const float inv = 1.0f / sum;
#pragma unroll
    for (int d = 0; d < HeadDim; ++d) o[d] = from_float<T>(acc[d] * inv);
    a.lse[(static_cast<std::size_t>(b) * a.heads + h) * queries + qi] = running_max + logf(sum);
}

// The head sizes the kernel is built for (every SD3 / SD3.5 config has 64; the test fixtures use 8, 16 and 32).
inline bool attention_head_dim_supported(int hd) { return hd == 8 || hd == 16 || hd == 32 || hd == 64 || hd == 128; }

template <class T>
void launch_attention(const attention_args<T>& a, int batch, int head_dim, cudaStream_t stream) {
    const int queries = a.q[0].rows + a.q[1].rows;
    const dim3 grid((queries + attention_queries - 1) / attention_queries, a.heads, batch);
    switch (head_dim) {
        case 8: attention_kernel<T, 8><<<grid, attention_queries, 0, stream>>>(a); break;
        case 16: attention_kernel<T, 16><<<grid, attention_queries, 0, stream>>>(a); break;
        case 32: attention_kernel<T, 32><<<grid, attention_queries, 0, stream>>>(a); break;
        case 64: attention_kernel<T, 64><<<grid, attention_queries, 0, stream>>>(a); break;
        default: attention_kernel<T, 128><<<grid, attention_queries, 0, stream>>>(a); break;
    }
}

}  // namespace sd3::gpu::detail
