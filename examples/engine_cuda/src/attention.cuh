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
#include <type_traits>

#include <mma.h>

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

// The bf16 path for head size 64 (every SD3 config): the same online softmax with Q·Kᵀ and P·V on tensor cores
// (WMMA 16 x 16 x 16, bf16 operands, fp32 accumulators). Four warps of 16 queries per block; per tile of 32 keys a
// warp forms its 16 x 32 logits, updates its rows' maximum and sum (two lanes per row, 16 columns each), rescales
// its fp32 output rows in shared memory, rounds P to bf16 (the sum keeps the unrounded values, as FlashAttention
// does) and adds P·V. K and V tiles move in 16-byte vectors.
namespace tc {
constexpr int head_dim = 64, warps = 4, rows = 16, queries = warps * rows, keys = 32;
}  // namespace tc

template <int = 0>
__global__ void __launch_bounds__(tc::warps * 32) attention_tc_kernel(attention_args<__nv_bfloat16> a) {
    using namespace nvcuda;
    using bf16 = __nv_bfloat16;
    constexpr int HD = tc::head_dim, KT = tc::keys, R = tc::rows;
    __shared__ __align__(32) bf16 qs[tc::queries][HD];
    __shared__ __align__(32) bf16 ks[KT][HD];
    __shared__ __align__(32) bf16 vs[KT][HD];
    __shared__ __align__(32) float ss[tc::warps][R][KT];
    __shared__ __align__(32) bf16 ps[tc::warps][R][KT];
    __shared__ __align__(32) float os[tc::warps][R][HD];
    __shared__ float row_max[tc::warps][R], row_sum[tc::warps][R];

    const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int queries = a.q[0].rows + a.q[1].rows, keys = a.k[0].rows + a.k[1].rows;
    const int q0 = blockIdx.x * tc::queries, col = h * HD;
    constexpr int vectors = HD / 8;  // 16-byte vectors per head row

    // Q of the block's 64 queries (zeros past the last), the warp's output rows, maxima and sums.
    for (int e = threadIdx.x; e < tc::queries * vectors; e += blockDim.x) {
        const int r = e / vectors, v = e % vectors, i = q0 + r;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (i < queries) x = *reinterpret_cast<const uint4*>(segment_row(a.q, b, i, a.hidden, col) + v * 8);
        *reinterpret_cast<uint4*>(&qs[r][v * 8]) = x;
    }
    for (int e = lane; e < R * HD; e += 32) os[warp][e / HD][e % HD] = 0.f;
    if (lane < R) {
        row_max[warp][lane] = -INFINITY;
        row_sum[warp][lane] = 0.f;
    }
    const int r = lane / 2, half = lane % 2;  // this lane's row of the warp's 16, and which 16 of the tile's keys

    for (int j0 = 0; j0 < keys; j0 += KT) {
        __syncthreads();  // the previous tile has been read (and, the first time, Q is in place)
        for (int e = threadIdx.x; e < KT * vectors; e += blockDim.x) {
            const int jj = e / vectors, v = e % vectors, j = j0 + jj;
            uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
            if (j < keys) {
                kx = *reinterpret_cast<const uint4*>(segment_row(a.k, b, j, a.hidden, col) + v * 8);
                vx = *reinterpret_cast<const uint4*>(segment_row(a.v, b, j, a.hidden, col) + v * 8);
            }
            *reinterpret_cast<uint4*>(&ks[jj][v * 8]) = kx;
            *reinterpret_cast<uint4*>(&vs[jj][v * 8]) = vx;
        }
        __syncthreads();

        // S = Q Kᵀ for this warp's rows: Kᵀ is K read column-major.
        for (int n = 0; n < KT / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
            wmma::fill_fragment(s, 0.f);
            for (int k = 0; k < HD / 16; ++k) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
                wmma::load_matrix_sync(qf, &qs[warp * R][k * 16], HD);
                wmma::load_matrix_sync(kf, &ks[n * 16][k * 16], HD);
                wmma::mma_sync(s, qf, kf, s);
            }
            wmma::store_matrix_sync(&ss[warp][0][n * 16], s, KT, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax on the warp's rows: two lanes per row, 16 keys each.
        const int in_tile = keys - j0 < KT ? keys - j0 : KT;
        float local_max = -INFINITY;
        for (int c = half * 16; c < half * 16 + 16; ++c) {
            const float x = c < in_tile ? ss[warp][r][c] * a.scale : -INFINITY;
            ss[warp][r][c] = x;
            local_max = fmaxf(local_max, x);
        }
        const float tile_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 1));
        const float old_max = row_max[warp][r], next_max = fmaxf(old_max, tile_max);
        const float rescale = expf(old_max - next_max);  // 0 on the first tile
        float local_sum = 0.f;
        for (int c = half * 16; c < half * 16 + 16; ++c) {
            const float p = expf(ss[warp][r][c] - next_max);  // 0 past the last key
            local_sum += p;
            ps[warp][r][c] = __float2bfloat16_rn(p);
        }
        const float tile_sum = local_sum + __shfl_xor_sync(0xffffffffu, local_sum, 1);
        for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); ++d) os[warp][r][d] *= rescale;
        __syncwarp();  // both lanes of a row have read row_max before it changes
        if (half == 0) {
            row_max[warp][r] = next_max;
            row_sum[warp][r] = row_sum[warp][r] * rescale + tile_sum;
        }
        __syncwarp();

        // O += P V.
        for (int n = 0; n < HD / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, &os[warp][0][n * 16], HD, wmma::mem_row_major);
            for (int k = 0; k < KT / 16; ++k) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, &ps[warp][0][k * 16], KT);
                wmma::load_matrix_sync(vf, &vs[k * 16][n * 16], HD);
                wmma::mma_sync(o, pf, vf, o);
            }
            wmma::store_matrix_sync(&os[warp][0][n * 16], o, HD, wmma::mem_row_major);
        }
        __syncwarp();
    }

    // Out = O / sum, LSE = max + log(sum), for the warp's queries that exist.
    const int i = q0 + warp * R + r;
    if (i >= queries) return;
    const float sum = row_sum[warp][r], inv = 1.0f / sum;
    const int seg = i < a.q[0].rows ? 0 : 1;
    const int row = seg ? i - a.q[0].rows : i;
    bf16* o = a.out[seg] + b * a.q[seg].sample_stride + static_cast<long long>(row) * a.hidden + col;
    for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); ++d) o[d] = __float2bfloat16_rn(os[warp][r][d] * inv);
    if (half == 0) a.lse[(static_cast<std::size_t>(b) * a.heads + h) * queries + i] = row_max[warp][r] + logf(sum);
}

// The head sizes the kernel is built for (every SD3 / SD3.5 config has 64; the test fixtures use 8, 16 and 32).
inline bool attention_head_dim_supported(int hd) { return hd == 8 || hd == 16 || hd == 32 || hd == 64 || hd == 128; }

// Whether the tensor-core kernel's 16-byte loads may be used: every segment's base, sample and row strides on
// 16-byte boundaries (the engine's buffers are; a hand-made view might not be).
template <class T>
bool vector_aligned(const attention_args<T>& a) {
    auto aligned = [&](const attention_segment<T>& s) {
        return reinterpret_cast<std::uintptr_t>(s.data) % 16 == 0 && (s.sample_stride * sizeof(T)) % 16 == 0;
    };
    bool ok = (static_cast<std::size_t>(a.hidden) * sizeof(T)) % 16 == 0;
    for (int s = 0; s < 2; ++s) ok = ok && aligned(a.q[s]) && aligned(a.k[s]) && aligned(a.v[s]);
    return ok;
}

template <class T>
void launch_attention(const attention_args<T>& a, int batch, int head_dim, cudaStream_t stream) {
    const int queries = a.q[0].rows + a.q[1].rows;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        if (head_dim == tc::head_dim && vector_aligned(a)) {
            const dim3 grid((queries + tc::queries - 1) / tc::queries, a.heads, batch);
            attention_tc_kernel<><<<grid, tc::warps * 32, 0, stream>>>(a);
            return;
        }
    }
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
