// Index maps of the FlashAttention-2-class kernel (attention_fa2.cuh), as constexpr functions that the kernel uses
// and host tests check (tests/engine_cuda/layout_tests.cpp): which tile element each lane's registers hold in
// mma.sync.m16n8k16 (bf16 operands, fp32 accumulators; PTX ISA, "Matrix fragments for mma.m16n8k16"), which shared
// memory row each lane hands to ldmatrix, and the XOR swizzle of 16-byte chunks that makes every one of those
// accesses (and the cp.async stores that fill the tiles) free of bank conflicts without padding.
//
// Shared memory has 32 banks of 4 bytes. A 16-byte access (cp.async 16, an ldmatrix row) is served a quarter-warp at
// a time; it is conflict-free when the eight addresses of a quarter fall in eight different 16-byte bank groups,
// (address / 16) % 8. A tile row of head_dim bf16 is 128 bytes (64) or 256 bytes (128): unswizzled, the same chunk of
// eight consecutive rows is one bank group, an 8-way conflict (the old WMMA kernel's loads). Swizzled, chunk c of
// row r is stored at chunk c ^ (r % 8): eight consecutive rows spread over all eight groups.
#pragma once

#if defined(__CUDACC__)
#define SD3_HOST_DEVICE __host__ __device__
#else
#define SD3_HOST_DEVICE
#endif

namespace sd3::gpu::detail::fa2 {

struct coord {
    int row = 0, col = 0;
    friend constexpr bool operator==(coord, coord) = default;
};

// A (16 x 16, row-major): four 32-bit registers of two bf16 each; element i in [0, 8) is register i / 2, half i % 2.
SD3_HOST_DEVICE constexpr coord a_element(int lane, int i) {
    const int group = lane >> 2, thread = lane & 3, reg = i >> 1, half = i & 1;
    return {group + 8 * (reg & 1), thread * 2 + half + 8 * (reg >> 1)};
}
// B (16 x 8, "col": k rows, n columns): two registers; element i in [0, 4): row k, column n.
SD3_HOST_DEVICE constexpr coord b_element(int lane, int i) {
    const int group = lane >> 2, thread = lane & 3, reg = i >> 1, half = i & 1;
    return {thread * 2 + half + 8 * reg, group};
}
// C / D (16 x 8, fp32): four registers; element i in [0, 4).
SD3_HOST_DEVICE constexpr coord c_element(int lane, int i) {
    const int group = lane >> 2, thread = lane & 3;
    return {group + 8 * (i >> 1), thread * 2 + (i & 1)};
}

// The softmax's P reaches P·V without leaving registers: the accumulators of two adjacent 8-key n-tiles of S (keys
// 16j..16j+7 and 16j+8..16j+15) are, packed in pairs, the A fragment of the 16-key k-step j. Element i of the A
// fragment comes from accumulator element p_source(i).elem of n-tile 2j + p_source(i).tile.
struct p_slot {
    int tile = 0, elem = 0;
};
SD3_HOST_DEVICE constexpr p_slot p_source(int i) {
    const int reg = i >> 1, half = i & 1;
    return {reg >> 1, 2 * (reg & 1) + half};
}

// Swizzled shared-memory tiles: rows of `chunks` 16-byte chunks (head_dim / 8), chunk c of row r at c ^ (r % 8).
// Offsets in bf16 elements from the tile's start; `chunks` must be a multiple of 8.
SD3_HOST_DEVICE constexpr int swizzled_chunk(int row, int chunk) { return chunk ^ (row & 7); }
SD3_HOST_DEVICE constexpr int tile_offset(int row, int col, int chunks) {
    return row * chunks * 8 + swizzled_chunk(row, col >> 3) * 8 + (col & 7);
}

// ldmatrix.x4: lane l gives the row address of matrix l / 8, row l % 8; register m of every lane receives matrix m.
// The rows (tile row, tile column of the row's first element) each operand's lanes hand over:
//  Q as A, the 16 x 16 block at (row0, col0): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//    (rows 8-15, k 8-15) = registers a0..a3.
SD3_HOST_DEVICE constexpr coord ldmatrix_a_row(int lane, int row0, int col0) {
    const int m = lane >> 3;
    return {row0 + (lane & 7) + 8 * (m & 1), col0 + 8 * (m >> 1)};
}
//  K as B of S = Q Kᵀ (K rows are keys = n, columns head dims = k; no transpose): keys n0..n0+15, dims k0..k0+15:
//    matrices (n 0-7, k 0-7) = b0 and (n 0-7, k 8-15) = b1 of n-tile n0, then b0, b1 of n-tile n0 + 8.
SD3_HOST_DEVICE constexpr coord ldmatrix_k_row(int lane, int n0, int k0) {
    const int m = lane >> 3;
    return {n0 + (lane & 7) + 8 * (m >> 1), k0 + 8 * (m & 1)};
}
//  V as B of O = P V (V rows are keys = k, columns head dims = n; ldmatrix .trans): keys k0..k0+15, dims n0..n0+15:
//    matrices (k 0-7, n 0-7) = b0 and (k 8-15, n 0-7) = b1 of d-tile n0, then b0, b1 of d-tile n0 + 8.
SD3_HOST_DEVICE constexpr coord ldmatrix_v_row(int lane, int k0, int n0) {
    const int m = lane >> 3;
    return {k0 + (lane & 7) + 8 * (m & 1), n0 + 8 * (m >> 1)};
}

// The 16-byte bank group of an element offset (bf16 elements from a 128-byte aligned tile start).
SD3_HOST_DEVICE constexpr int bank_group(int element_offset) { return (element_offset * 2 / 16) % 8; }

// cp.async fill of a tile of `rows` x (chunks x 8) bf16 by `threads` threads: thread t copies chunk t % chunks of
// row t / chunks, then strides by threads / chunks rows. This gives (row, chunk) of the copy `step` of thread `t`.
SD3_HOST_DEVICE constexpr coord copy_chunk(int t, int step, int chunks, int threads) {
    const int per_step = threads / chunks;
    return {t / chunks + step * per_step, t % chunks};
}

}  // namespace sd3::gpu::detail::fa2
