// The engine's one GEMM: C += A * W^T for a linear layer's weight W, by a register-tiled micro-kernel on
// packed operands (the structure of BLIS/GotoBLAS: A packed per call into row panels, W packed once into
// column panels). Every element of C is one fused multiply-add chain over k in order, started from C's value,
// whatever the shape of the call and wherever the row sits in it: a row's result does not depend on which other
// rows are computed with it (a partial forward's rows equal the full forward's bit for bit) or on the thread.
// The micro-kernel and the packing are exposed for fused kernels (attention) built on the same tile.
#pragma once

#include <cstddef>
#include <new>
#include <span>
#include <vector>

namespace sd3 {

// 64-byte aligned storage for workspaces and packed operands: vector loads never split a cache line, and
// Eigen's vectorised reductions (which peel a scalar head whose length depends on alignment) give results
// independent of which buffer slot or thread computed them.
template <class T>
struct aligned_allocator {
    using value_type = T;
    aligned_allocator() = default;
    template <class U>
    aligned_allocator(const aligned_allocator<U>&) noexcept {}
    T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
    void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
    template <class U>
    bool operator==(const aligned_allocator<U>&) const noexcept { return true; }
};
using aligned_floats = std::vector<float, aligned_allocator<float>>;

namespace gemm {

// The register tile: rows x cols of C held in vector registers through a k loop, chosen per instruction set
// at compile time (AVX-512: 14 x 32 in 28 of the 32 zmm registers; AVX2+FMA: 6 x 16 in 12 of 16 ymm; otherwise
// SSE, 6 x 8 without FMA).
struct tile_shape {
    int rows;
    int cols;
};
tile_shape register_tile() noexcept;

// Depth of one packed slab of A: a W micro-panel (k_block x cols) stays in L1 while it meets every row panel.
inline constexpr int k_block = 256;
// Rows of A packed at a time (a k_block-deep slab of them stays in L2).
inline constexpr int row_block = 512;
// Register panels of rows in one parallel work unit of a layer's GEMM (112 rows with AVX-512): small enough that
// a unit's C rows and A slab stay in L2 while every weight panel passes, large enough to reuse each panel.
inline constexpr int task_panels = 8;

// W [outputs][depth] (row-major, y = x W^T + b) repacked once into panels of register_tile().cols outputs,
// depth-major and zero-padded past `outputs`: the right operand of every product with this layer.
class packed_weights {
public:
    packed_weights() = default;
    packed_weights(std::span<const float> w, int outputs, int depth);
    int outputs() const noexcept { return outputs_; }
    int depth() const noexcept { return depth_; }
    // Panel p: outputs [p * cols, (p + 1) * cols), depth() rows of cols floats.
    const float* panel(int p) const noexcept { return data_.data() + static_cast<std::size_t>(p) * panel_floats(); }

private:
    std::size_t panel_floats() const noexcept;
    int outputs_ = 0, depth_ = 0;
    aligned_floats data_;
};

// Floats of workspace multiply() needs (one packed slab of A).
std::size_t workspace_floats() noexcept;

// C[rows, c0:c1) = bias[c0:c1) + A[rows, 0:depth) * W[c0:c1, :]^T, or C += A * W^T without a bias; A and C are
// row-major (leading dimensions lda, ldc) and c points at C's column c0, bias (if any) at bias[c0]. c0 must be
// a multiple of register_tile().cols. `workspace` holds workspace_floats() floats; nothing allocates.
void multiply(const float* a, std::ptrdiff_t lda, int rows, const packed_weights& w, int c0, int c1, float* c,
              std::ptrdiff_t ldc, std::span<float> workspace, const float* bias = nullptr);

// The core's measured FP32 fused multiply-add throughput with the micro-kernel's vectors, in GFLOP/s (one FMA =
// 2 FLOP), over about `seconds`: the peak that benchmarks state their GEMMs' efficiency against.
double measure_peak_gflops(double seconds = 0.2);

// ----- building blocks for fused kernels -----

// Packs A[rows, 0:depth) (row-major, lda; depth <= k_block) into ceil(rows / tile.rows) row panels of
// tile.rows x k_block floats (row-major with the constant stride k_block, so the micro-kernel addresses a row by
// a fixed offset and the pack is a plain copy), zero rows past `rows`; out holds packed_rows_floats(rows).
void pack_rows(const float* a, std::ptrdiff_t lda, int rows, int depth, float* out);
std::size_t packed_rows_floats(int rows) noexcept;
// Packs B[0:depth, cols) given as rows of B^T: bt[j * ldb + k] = B[k][j] (a weight, or keys for Q K^T), into
// column panels of depth x tile.cols floats, zero columns past `cols`.
void pack_transposed(const float* bt, std::ptrdiff_t ldb, int cols, int depth, float* out);
// Packs B[0:depth, 0:cols) row-major (values for P V) into column panels, zero columns past `cols`.
void pack_columns(const float* b, std::ptrdiff_t ldb, int depth, int cols, float* out);
// What a tile's sum starts from: zero, C itself, or one row (a bias) repeated down the tile.
enum class start { zero, c, row };
// C tile [tile.rows x tile.cols] (row-major, ldc) = start + A panel * B panel over `depth` (<= k_block), the
// product summed from zero by fused multiply-adds in k order and added to the start value once at the end. The B
// panel's k-th row of tile.cols floats is at b_panel + k * ldb: ldb = tile.cols for a packed panel, or a matrix's
// own leading dimension when its rows can be read in place (values in P V).
void micro_kernel(int depth, const float* a_panel, const float* b_panel, std::ptrdiff_t ldb, float* c, std::ptrdiff_t ldc,
                  start from, const float* row = nullptr);
// The same on a partial tile, bit for bit: only C[0:rows, 0:cols) (and row[0:cols)) is read, only it is written;
// the B panel is read whole.
void micro_kernel_edge(int depth, const float* a_panel, const float* b_panel, std::ptrdiff_t ldb, float* c,
                       std::ptrdiff_t ldc, int rows, int cols, start from, const float* row = nullptr);

}  // namespace gemm
}  // namespace sd3
