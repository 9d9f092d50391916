// Joint attention in FlashAttention-2's class for bf16 (head size 64 or 128), written for this engine from the
// published algorithm (Dao, "FlashAttention-2", 2023) and the PTX ISA — no code taken from elsewhere:
//
//  - four warps, 16 queries each (64 per block); key tiles of 64 with K and V double-buffered in shared memory by
//    cp.async (the next tile's copies run under this tile's math);
//  - S = Q Kᵀ and O += P V on mma.sync.m16n8k16 (bf16 operands, fp32 accumulators, inline PTX), operands from
//    ldmatrix (.trans for V); Q's fragments stay in registers for the whole sweep;
//  - the online softmax in registers: each thread owns two rows of the warp's 16 (the accumulator layout), row
//    maxima over the four threads of a quad by two shuffles, sums kept per thread and reduced once at the end;
//    exponentials in base 2 with scale · log2(e) folded into the logits; P goes from the S accumulators to the
//    A fragment of P·V without leaving registers (mma_layout.hpp's p_source);
//  - shared-memory tiles swizzled (16-byte chunk c of row r at c ^ (r % 8)): every cp.async store and ldmatrix row
//    read is bank-conflict free (tests/engine_cuda/layout_tests.cpp checks the maps on the host);
//  - the natural-log LSE of each query, as the reference kernels return it;
//  - split over keys (split-KV) for steps with few queries: each split writes its normalised partial output and
//    LSE in fp32, and fa2_merge_kernel combines them by LSE weights;
//  - the attention probe's column sums (lse_column_sums' formula) on tensor cores: fa2_probe_kernel recomputes
//    Kᵀ-major logits a 64-key tile at a time against each query's LSE, one head per block, per-head partials
//    summed over heads in a fixed order by fa2_probe_finish_kernel (deterministic, no atomics).
//
// The reference kernels (attention.cuh) stay: they are what the gpu tests compare this one with, besides an fp64
// host twin of the same bf16 inputs (attention_check.cu). NOTHING HERE HAS RUN ON A GPU: it compiles for sm_90
// with nvcc 13.0 and its index maps are checked on the host; docs/engine_cuda.md says what is and is not known.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "attention.cuh"
#include "mma_layout.hpp"

namespace sd3::gpu::detail::fa2 {

using bf16 = __nv_bfloat16;

constexpr int warps = 4, threads = warps * 32, block_queries = warps * 16, block_keys = 64;
constexpr float log2e = 1.4426950408889634f, ln2 = 0.6931471805599453f;

// Dynamic shared memory of the attention kernel: Q, then K and V twice (double buffer).
template <int HD>
constexpr std::size_t attention_smem_bytes = static_cast<std::size_t>(block_queries + 4 * block_keys) * HD * sizeof(bf16);
// The probe kernel: one K tile and one Q tile.
template <int HD>
constexpr std::size_t probe_smem_bytes = static_cast<std::size_t>(2 * block_keys) * HD * sizeof(bf16);

// Where a split-KV launch puts its partial results: [split][batch][head][query] (x head_dim for the outputs).
struct split_args {
    int splits = 1, batch = 1;
    float* partial_out = nullptr;
    float* partial_lse = nullptr;
};

__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
    return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; `valid` false writes zeros (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}

// d += a · b, m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two bf16, the lower column in the lower half (round to nearest even).
__device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&v);
}

// Copies rows [row0, row0 + 64) of a two-segment operand's head slice into a swizzled tile (rows past `rows`:
// zeros). Every thread of the block takes part; the copies are asynchronous (commit and wait by the caller).
template <int HD>
__device__ __forceinline__ void load_tile(bf16* tile, const attention_segment<bf16> (&s)[2], int b, int row0, int rows, int hidden, int col) {
    constexpr int chunks = HD / 8, steps = 64 * chunks / threads;
#pragma unroll
    for (int step = 0; step < steps; ++step) {
        const coord rc = copy_chunk(static_cast<int>(threadIdx.x), step, chunks, threads);
        const int j = row0 + rc.row;
        const bool valid = j < rows;
        const bf16* src = valid ? segment_row(s, b, j, hidden, col + rc.col * 8) : s[0].data;
        cp_async16(tile + tile_offset(rc.row, rc.col * 8, chunks), src, valid);
    }
}

// grid: (query blocks, heads, batch x splits); block: threads; dynamic shared memory attention_smem_bytes<HD>.
template <int HD>
__global__ void __launch_bounds__(threads) attention_fa2_kernel(attention_args<bf16> a, split_args sp) {
    static_assert(HD == 64 || HD == 128, "head sizes 64 and 128");
    constexpr int chunks = HD / 8, ksteps = HD / 16, ntiles = block_keys / 8, dtiles = HD / 8;
    extern __shared__ __align__(128) unsigned char shared_bytes[];
    bf16* qs = reinterpret_cast<bf16*>(shared_bytes);
    bf16* ks = qs + block_queries * HD;       // [2][block_keys][HD]
    bf16* vs = ks + 2 * block_keys * HD;      // [2][block_keys][HD]

    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    const int h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z) / sp.splits, split = static_cast<int>(blockIdx.z) % sp.splits;
    const int queries = a.q[0].rows + a.q[1].rows, keys = a.k[0].rows + a.k[1].rows;
    const int q0 = static_cast<int>(blockIdx.x) * block_queries, col = h * HD;
    const int tiles = (keys + block_keys - 1) / block_keys, per_split = (tiles + sp.splits - 1) / sp.splits;
    const int t_begin = split * per_split, t_end = min(tiles, t_begin + per_split);
    const float scale_log2 = a.scale * log2e;

    load_tile<HD>(qs, a.q, b, q0, queries, a.hidden, col);
    if (t_begin < t_end) {
        load_tile<HD>(ks, a.k, b, t_begin * block_keys, keys, a.hidden, col);
        load_tile<HD>(vs, a.v, b, t_begin * block_keys, keys, a.hidden, col);
    }
    cp_async_commit();

    std::uint32_t qf[ksteps][4];
    float o[dtiles][4];
#pragma unroll
    for (int d = 0; d < dtiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows lane / 4 and lane / 4 + 8 of the warp's 16

    for (int t = t_begin; t < t_end; ++t) {
        const int buffer = (t - t_begin) & 1;
        if (t + 1 < t_end) {  // the next tile into the other buffer, under this tile's math
            load_tile<HD>(ks + (buffer ^ 1) * block_keys * HD, a.k, b, (t + 1) * block_keys, keys, a.hidden, col);
            load_tile<HD>(vs + (buffer ^ 1) * block_keys * HD, a.v, b, (t + 1) * block_keys, keys, a.hidden, col);
        }
        cp_async_commit();  // (an empty group on the last tile keeps the count uniform)
        cp_async_wait<1>();  // everything but the newest group: Q and tile t have landed
        __syncthreads();
        if (t == t_begin) {
#pragma unroll
            for (int kk = 0; kk < ksteps; ++kk) {
                const coord r = ldmatrix_a_row(lane, warp * 16, kk * 16);
                ldmatrix_x4(qf[kk], qs + tile_offset(r.row, r.col, chunks));
            }
        }
        const bf16* kt = ks + buffer * block_keys * HD;
        const bf16* vt = vs + buffer * block_keys * HD;

        // S = Q Kᵀ: 16 queries x 64 keys per warp, eight 8-key accumulator tiles.
        float s[ntiles][4];
#pragma unroll
        for (int n = 0; n < ntiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < ksteps; ++kk) {
#pragma unroll
            for (int np = 0; np < ntiles / 2; ++np) {
                std::uint32_t kb[4];
                const coord r = ldmatrix_k_row(lane, np * 16, kk * 16);
                ldmatrix_x4(kb, kt + tile_offset(r.row, r.col, chunks));
                mma(s[2 * np], qf[kk], kb[0], kb[1]);
                mma(s[2 * np + 1], qf[kk], kb[2], kb[3]);
            }
        }

        // Online softmax: logits in base-2 units, keys past the last masked.
        const int key0 = t * block_keys;
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < ntiles; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = key0 + n * 8 + c_element(lane, i).col;
                const float x = key < keys ? s[n][i] * scale_log2 : -INFINITY;
                s[n][i] = x;
                tile_max[i >> 1] = fmaxf(tile_max[i >> 1], x);
            }
        }
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float next = fmaxf(m[r], tile_max[r]);
            base[r] = next == -INFINITY ? 0.f : next;  // a row with no key yet: no NaN from -inf - -inf
            const float rescale = exp2f(m[r] - base[r]);  // 0 on the first tile
            l[r] *= rescale;
#pragma unroll
            for (int d = 0; d < dtiles; ++d) {
                o[d][2 * r] *= rescale;
                o[d][2 * r + 1] *= rescale;
            }
            m[r] = next;
        }
#pragma unroll
        for (int n = 0; n < ntiles; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = exp2f(s[n][i] - base[i >> 1]);  // 0 for masked keys
                l[i >> 1] += p;  // the sum keeps the unrounded probabilities
                s[n][i] = p;
            }
        }

        // O += P V: P's accumulators are the A fragments of the 16-key k-steps.
#pragma unroll
        for (int j = 0; j < ntiles / 2; ++j) {
            std::uint32_t pa[4];
#pragma unroll
            for (int reg = 0; reg < 4; ++reg) {
                const p_slot lo = p_source(2 * reg), hi = p_source(2 * reg + 1);
                pa[reg] = pack(s[2 * j + lo.tile][lo.elem], s[2 * j + hi.tile][hi.elem]);
            }
#pragma unroll
            for (int dp = 0; dp < dtiles / 2; ++dp) {
                std::uint32_t vb[4];
                const coord r = ldmatrix_v_row(lane, j * 16, dp * 16);
                ldmatrix_x4_trans(vb, vt + tile_offset(r.row, r.col, chunks));
                mma(o[2 * dp], pa, vb[0], vb[1]);
                mma(o[2 * dp + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with `buffer` before the next iteration's copies refill it
    }
    cp_async_wait<0>();  // (an empty split issued copies it never waited for)

    const int group = lane >> 2, thread = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int i = q0 + warp * 16 + group + 8 * r;
        if (i >= queries) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const float lse = l[r] > 0.f ? (m[r] + log2f(l[r])) * ln2 : -INFINITY;  // natural log
        if (sp.splits == 1) {
            const int seg = i < a.q[0].rows ? 0 : 1;
            const int row = seg ? i - a.q[0].rows : i;
            bf16* out = a.out[seg] + b * a.q[seg].sample_stride + static_cast<long long>(row) * a.hidden + col;
#pragma unroll
            for (int d = 0; d < dtiles; ++d)
                *reinterpret_cast<__nv_bfloat162*>(out + d * 8 + thread * 2) = __floats2bfloat162_rn(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
            if (thread == 0) a.lse[(static_cast<std::size_t>(b) * a.heads + h) * queries + i] = lse;
        } else {
            const std::size_t at = ((static_cast<std::size_t>(split) * sp.batch + b) * a.heads + h) * queries + i;
            float* po = sp.partial_out + at * HD;
#pragma unroll
            for (int d = 0; d < dtiles; ++d)
                *reinterpret_cast<float2*>(po + d * 8 + thread * 2) = make_float2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
            if (thread == 0) sp.partial_lse[at] = lse;
        }
    }
}

// Split-KV merge: one warp per (sample, head, query): LSE = log sum_s exp(lse_s), out = sum_s exp(lse_s - LSE) out_s.
template <int HD>
__global__ void __launch_bounds__(256) fa2_merge_kernel(attention_args<bf16> a, split_args sp) {
    constexpr int per_lane = HD / 32;
    const int queries = a.q[0].rows + a.q[1].rows;
    const long long warp = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    if (warp >= static_cast<long long>(sp.batch) * a.heads * queries) return;
    const int i = static_cast<int>(warp % queries), h = static_cast<int>((warp / queries) % a.heads), b = static_cast<int>(warp / queries / a.heads);
    auto at = [&](int s) { return ((static_cast<std::size_t>(s) * sp.batch + b) * a.heads + h) * queries + i; };
    float top = -INFINITY;
    for (int s = 0; s < sp.splits; ++s) top = fmaxf(top, sp.partial_lse[at(s)]);
    float acc[per_lane] = {}, total = 0.f;
    if (top != -INFINITY) {
        for (int s = 0; s < sp.splits; ++s) {
            const float w = expf(sp.partial_lse[at(s)] - top);  // 0 for an empty split
            total += w;
            const float* po = sp.partial_out + at(s) * HD + lane * per_lane;
#pragma unroll
            for (int e = 0; e < per_lane; ++e) acc[e] = fmaf(w, po[e], acc[e]);
        }
    }
    const int seg = i < a.q[0].rows ? 0 : 1;
    const int row = seg ? i - a.q[0].rows : i;
    bf16* out = a.out[seg] + b * a.q[seg].sample_stride + static_cast<long long>(row) * a.hidden + h * HD + lane * per_lane;
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) out[e] = __float2bfloat16_rn(acc[e] * inv);
    if (lane == 0) a.lse[(static_cast<std::size_t>(b) * a.heads + h) * queries + i] = total > 0.f ? top + logf(total) : -INFINITY;
}

// The probe on tensor cores: per (key tile of 64 image keys, head, sample), sum over the image queries i < n of
// exp(scale q_i·k_j - lse_i), written to partial[(b * heads + h) * keys + j]. Kᵀ-major: the block's four warps
// hold 16 keys each as the A operand (registers, loaded once), each query tile is the B operand, so each thread's
// accumulator rows are its keys and the row sums need no shuffles until the end.
struct probe_args {
    const bf16* q = nullptr;   // image queries [batch][n][hidden]
    const bf16* k = nullptr;   // image keys [batch][keys][hidden]
    const float* lse = nullptr;  // [batch][heads][lse_queries], natural log; the image queries first
    float* partial = nullptr;  // [batch][heads][keys]
    int n = 0, keys = 0, heads = 0, hidden = 0, lse_queries = 0;
    long long q_sample_stride = 0, k_sample_stride = 0;
    float scale = 0.f;
};

template <int HD>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* base, long long row_stride, int row0, int rows, int col) {
    constexpr int chunks = HD / 8, steps = 64 * chunks / threads;
#pragma unroll
    for (int step = 0; step < steps; ++step) {
        const coord rc = copy_chunk(static_cast<int>(threadIdx.x), step, chunks, threads);
        const int j = row0 + rc.row;
        const bool valid = j < rows;
        const bf16* src = valid ? base + static_cast<long long>(j) * row_stride + col + rc.col * 8 : base;
        cp_async16(tile + tile_offset(rc.row, rc.col * 8, chunks), src, valid);
    }
}

// grid: (key tiles, heads, batch); block: threads; dynamic shared memory probe_smem_bytes<HD>.
template <int HD>
__global__ void __launch_bounds__(threads) fa2_probe_kernel(probe_args p) {
    constexpr int chunks = HD / 8, ksteps = HD / 16, ntiles = block_queries / 8;
    extern __shared__ __align__(128) unsigned char shared_bytes[];
    bf16* kt = reinterpret_cast<bf16*>(shared_bytes);
    bf16* qt = kt + block_keys * HD;
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    const int j0 = static_cast<int>(blockIdx.x) * block_keys, h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
    const int col = h * HD;
    const float scale_log2 = p.scale * log2e;
    const bf16* kb = p.k + b * p.k_sample_stride;
    const bf16* qb = p.q + b * p.q_sample_stride;
    const float* lse = p.lse + (static_cast<std::size_t>(b) * p.heads + h) * p.lse_queries;

    load_rows<HD>(kt, kb, p.hidden, j0, p.keys, col);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    std::uint32_t kf[ksteps][4];
#pragma unroll
    for (int kk = 0; kk < ksteps; ++kk) {
        const coord r = ldmatrix_a_row(lane, warp * 16, kk * 16);
        ldmatrix_x4(kf[kk], kt + tile_offset(r.row, r.col, chunks));
    }
    float sum[2] = {0.f, 0.f};  // keys lane / 4 and lane / 4 + 8 of the warp's 16
    for (int i0 = 0; i0 < p.n; i0 += block_queries) {
        __syncthreads();  // the previous query tile has been read
        load_rows<HD>(qt, qb, p.hidden, i0, p.n, col);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        float s[ntiles][4];
#pragma unroll
        for (int n = 0; n < ntiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < ksteps; ++kk) {
#pragma unroll
            for (int np = 0; np < ntiles / 2; ++np) {
                std::uint32_t qf[4];
                const coord r = ldmatrix_k_row(lane, np * 16, kk * 16);  // query rows as B, as K rows in S = Q Kᵀ
                ldmatrix_x4(qf, qt + tile_offset(r.row, r.col, chunks));
                mma(s[2 * np], kf[kk], qf[0], qf[1]);
                mma(s[2 * np + 1], kf[kk], qf[2], qf[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < ntiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = i0 + n * 8 + c_element(lane, e).col;
                if (i < p.n) sum[e >> 1] += exp2f(s[n][e] * scale_log2 - lse[i] * log2e);
            }
        }
    }
    const int group = lane >> 2, thread = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        const int j = j0 + warp * 16 + group + 8 * r;
        if (thread == 0 && j < p.keys) p.partial[(static_cast<std::size_t>(b) * p.heads + h) * p.keys + j] = sum[r];
    }
}

// out[b][j] = (or +=) (1 / heads) sum_h partial[b][h][j], heads in order: deterministic.
template <int = 0>
__global__ void __launch_bounds__(256) fa2_probe_finish_kernel(const float* partial, int batch, int heads, int keys, bool accumulate, float* out) {
    const long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= static_cast<long long>(batch) * keys) return;
    const int b = static_cast<int>(e / keys), j = static_cast<int>(e % keys);
    float total = 0.f;
    for (int h = 0; h < heads; ++h) total += partial[(static_cast<std::size_t>(b) * heads + h) * keys + j];
    total /= static_cast<float>(heads);
    out[e] = accumulate ? out[e] + total : total;
}

// Splits over keys for a launch of `blocks` (query blocks x heads x batch) blocks on `sms` multiprocessors: enough
// to give about four blocks per multiprocessor, at most `max_splits` and at most one key tile each.
inline int choose_splits(long long blocks, int sms, int key_tiles, int max_splits) {
    const long long target = 4LL * sms;
    int s = 1;
    while (s < max_splits && blocks * s < target && s < key_tiles) ++s;
    return s;
}

template <int HD>
void launch(const attention_args<bf16>& a, int batch, split_args sp, cudaStream_t stream) {
    const int queries = a.q[0].rows + a.q[1].rows;
    sp.batch = batch;
    const dim3 grid((queries + block_queries - 1) / block_queries, a.heads, batch * sp.splits);
    attention_fa2_kernel<HD><<<grid, threads, attention_smem_bytes<HD>, stream>>>(a, sp);
    if (sp.splits > 1) {
        const long long warps_needed = static_cast<long long>(batch) * a.heads * queries;
        fa2_merge_kernel<HD><<<static_cast<unsigned>((warps_needed * 32 + 255) / 256), 256, 0, stream>>>(a, sp);
    }
}

// Opts the attention kernel into its dynamic shared memory above 48 KiB (head size 128: 80 KiB); a host call, made
// where the engine is built, never inside a forward (so never during a capture).
inline cudaError_t prepare(int head_dim) {
    if (head_dim == 128)
        return cudaFuncSetAttribute(attention_fa2_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(attention_smem_bytes<128>));
    return cudaSuccess;
}

template <int HD>
void launch_probe(const probe_args& p, int batch, bool accumulate, float* out, cudaStream_t stream) {
    const dim3 grid((p.keys + block_keys - 1) / block_keys, p.heads, batch);
    fa2_probe_kernel<HD><<<grid, threads, probe_smem_bytes<HD>, stream>>>(p);
    const long long total = static_cast<long long>(batch) * p.keys;
    fa2_probe_finish_kernel<><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(p.partial, batch, p.heads, p.keys, accumulate, out);
}

}  // namespace sd3::gpu::detail::fa2
