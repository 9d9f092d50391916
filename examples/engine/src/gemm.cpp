#include "sd3/gemm.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "sd3/errors.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace sd3::gemm {
namespace {

// One vector of floats and the four operations the micro-kernel needs, per instruction set. The fused
// multiply-add is explicit where the hardware has one, so results do not depend on the compiler's contraction.
#if defined(__AVX512F__)
using vfloat = __m512;
constexpr int lanes = 16, mr = 14;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vbroadcast(float x) { return _mm512_set1_ps(x); }
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
using vfloat = __m256;
constexpr int lanes = 8, mr = 6;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vbroadcast(float x) { return _mm256_set1_ps(x); }
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
#else
typedef float vfloat __attribute__((vector_size(16)));
constexpr int lanes = 4, mr = 6;
inline vfloat vload(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vfloat vbroadcast(float x) { return vfloat{x, x, x, x}; }
inline vfloat vzero() { return vfloat{}; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
#endif
constexpr int vectors = 2;  // vectors per tile row
constexpr int nr = vectors * lanes;
constexpr std::ptrdiff_t panel_stride = std::ptrdiff_t{mr} * k_block;  // floats per packed row panel

std::size_t round_up(std::size_t a, std::size_t b) { return (a + b - 1) / b * b; }

[[noreturn]] void bad(const auto&... what) { throw std::invalid_argument(message("gemm::", what...)); }

}  // namespace

tile_shape register_tile() noexcept { return {mr, nr}; }

std::size_t workspace_floats() noexcept { return round_up(row_block, mr) * k_block; }
std::size_t packed_rows_floats(int rows) noexcept { return round_up(static_cast<std::size_t>(rows), mr) * k_block; }

std::size_t packed_weights::panel_floats() const noexcept { return static_cast<std::size_t>(depth_) * nr; }

packed_weights::packed_weights(std::span<const float> w, int outputs, int depth) : outputs_(outputs), depth_(depth) {
    if (outputs < 1) bad("packed_weights: outputs = ", outputs, " must be >= 1");
    if (depth < 1) bad("packed_weights: depth = ", depth, " must be >= 1");
    if (w.size() != static_cast<std::size_t>(outputs) * static_cast<std::size_t>(depth))
        bad("packed_weights: weight has ", w.size(), " values, outputs x depth = ", outputs, " x ", depth, " needs ",
            static_cast<std::size_t>(outputs) * static_cast<std::size_t>(depth));
    data_.assign(round_up(static_cast<std::size_t>(outputs), nr) * static_cast<std::size_t>(depth), 0.0f);
    pack_transposed(w.data(), depth, outputs, depth, data_.data());
}

void pack_rows(const float* a, std::ptrdiff_t lda, int rows, int depth, float* out) {
    if (depth > k_block) bad("pack_rows: depth = ", depth, " exceeds k_block = ", k_block);
    for (int r0 = 0; r0 < rows; r0 += mr, out += panel_stride) {
        const int n = std::min(mr, rows - r0);
        for (int i = 0; i < n; ++i) std::copy_n(a + (r0 + i) * lda, depth, out + i * k_block);
        for (int i = n; i < mr; ++i) std::fill_n(out + i * k_block, depth, 0.0f);
    }
}

#if defined(__AVX512F__)
// r[i] <- column i of the 16 x 16 matrix whose rows are r[0..15]: 32-bit, 64-bit and 128-bit interleaves.
inline void transpose16(vfloat r[16]) {
    vfloat t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    auto lo = [](vfloat a, vfloat b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    auto hi = [](vfloat a, vfloat b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    for (int g = 0; g < 4; ++g) {
        r[4 * g] = lo(t[4 * g], t[4 * g + 2]);
        r[4 * g + 1] = hi(t[4 * g], t[4 * g + 2]);
        r[4 * g + 2] = lo(t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = hi(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}
#endif

void pack_transposed(const float* bt, std::ptrdiff_t ldb, int cols, int depth, float* out) {
    for (int j0 = 0; j0 < cols; j0 += nr, out += static_cast<std::ptrdiff_t>(depth) * nr) {
        const int n = std::min(nr, cols - j0);
        int k0 = 0;
#if defined(__AVX512F__)
        // Whole panels by 16 x 16 blocks transposed in registers: the keys of every forward pass through here,
        // and a scalar transpose cost as much as a tenth of a partial forward.
        if (n == nr)
            for (; k0 + lanes <= depth; k0 += lanes)
                for (int half = 0; half < vectors; ++half) {
                    vfloat r[lanes];
                    for (int j = 0; j < lanes; ++j) r[j] = vload(bt + (j0 + half * lanes + j) * ldb + k0);
                    transpose16(r);
                    for (int k = 0; k < lanes; ++k) vstore(out + (k0 + k) * nr + half * lanes, r[k]);
                }
#endif
        // k outer: each packed row of nr floats is written whole, from nr source rows read in step.
        for (int k = k0; k < depth; ++k) {
            float* dst = out + k * nr;
            for (int j = 0; j < n; ++j) dst[j] = bt[(j0 + j) * ldb + k];
            for (int j = n; j < nr; ++j) dst[j] = 0.0f;
        }
    }
}

void pack_columns(const float* b, std::ptrdiff_t ldb, int depth, int cols, float* out) {
    for (int j0 = 0; j0 < cols; j0 += nr, out += static_cast<std::ptrdiff_t>(depth) * nr) {
        const int n = std::min(nr, cols - j0);
        for (int k = 0; k < depth; ++k) {
            std::copy_n(b + k * ldb + j0, n, out + k * nr);
            std::fill_n(out + k * nr + n, nr - n, 0.0f);
        }
    }
}

void micro_kernel(int depth, const float* __restrict a_panel, const float* __restrict b_panel, std::ptrdiff_t ldb,
                  float* __restrict c, std::ptrdiff_t ldc, start from, const float* __restrict row) {
    // The sum over k starts from zero and what C starts from is added at the end: C's rows (often out of cache: a
    // tile of C is touched once per k slab, and a large output never fits) are prefetched for writing now and
    // arrive while the k loop runs, instead of stalling the stores.
    for (int i = 0; i < mr; ++i)
        for (int v = 0; v < vectors; ++v) __builtin_prefetch(c + i * ldc + v * lanes, 1, 3);
    vfloat acc[mr][vectors];
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i)
#pragma GCC unroll 2
        for (int v = 0; v < vectors; ++v) acc[i][v] = vzero();
    for (int k = 0; k < depth; ++k, ++a_panel, b_panel += ldb) {
        vfloat b[vectors];
#pragma GCC unroll 2
        for (int v = 0; v < vectors; ++v) b[v] = vload(b_panel + v * lanes);
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            const vfloat ai = vbroadcast(a_panel[i * k_block]);  // a constant offset: no address arithmetic
#pragma GCC unroll 2
            for (int v = 0; v < vectors; ++v) acc[i][v] = vfma(ai, b[v], acc[i][v]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i)
#pragma GCC unroll 2
        for (int v = 0; v < vectors; ++v) {
            float* dst = c + i * ldc + v * lanes;
            if (from == start::c)
                vstore(dst, vload(dst) + acc[i][v]);
            else if (from == start::row)
                vstore(dst, vload(row + v * lanes) + acc[i][v]);
            else
                vstore(dst, acc[i][v]);
        }
}

void micro_kernel_edge(int depth, const float* a_panel, const float* b_panel, std::ptrdiff_t ldb, float* c,
                       std::ptrdiff_t ldc, int rows, int cols, start from, const float* row) {
    // The same arithmetic as a full tile: the start values go to a full-size tile, which then starts from itself.
    alignas(64) float tile[mr * nr];
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) {
            const bool inside = i < rows && j < cols;
            tile[i * nr + j] = !inside ? 0.0f : from == start::c ? c[i * ldc + j] : from == start::row ? row[j] : 0.0f;
        }
    micro_kernel(depth, a_panel, b_panel, ldb, tile, nr, from == start::zero ? start::zero : start::c, nullptr);
    for (int i = 0; i < rows; ++i) std::copy_n(tile + i * nr, cols, c + i * ldc);
}

void multiply(const float* a, std::ptrdiff_t lda, int rows, const packed_weights& w, int c0, int c1, float* c,
              std::ptrdiff_t ldc, std::span<float> workspace, const float* bias) {
    if (c0 < 0 || c0 % nr != 0 || c1 < c0 || c1 > w.outputs())
        bad("multiply: columns [", c0, ", ", c1, ") must start at a multiple of ", nr, " and lie in [0, ", w.outputs(), "]");
    if (workspace.size() < workspace_floats())
        bad("multiply: workspace has ", workspace.size(), " floats, needs ", workspace_floats());
    const int depth = w.depth();
    float* packed = workspace.data();
    for (int r0 = 0; r0 < rows; r0 += row_block) {
        const int nrows = std::min(row_block, rows - r0);
        for (int k0 = 0; k0 < depth; k0 += k_block) {
            const int kc = std::min(k_block, depth - k0);
            pack_rows(a + r0 * lda + k0, lda, nrows, kc, packed);
            const start from = k0 == 0 && bias ? start::row : start::c;
            for (int j = c0; j < c1; j += nr) {
                const float* bp = w.panel(j / nr) + static_cast<std::ptrdiff_t>(k0) * nr;
                const int ncols = std::min(nr, c1 - j);
                for (int i = 0; i < nrows; i += mr) {
                    const float* ap = packed + (i / mr) * panel_stride;
                    float* ct = c + (r0 + i) * ldc + (j - c0);
                    const int prows = std::min(mr, nrows - i);
                    const float* row = bias ? bias + (j - c0) : nullptr;
                    if (prows == mr && ncols == nr)
                        micro_kernel(kc, ap, bp, nr, ct, ldc, from, row);
                    else
                        micro_kernel_edge(kc, ap, bp, nr, ct, ldc, prows, ncols, from, row);
                }
            }
        }
    }
}

double measure_peak_gflops(double seconds) {
    // Independent multiply-add chains on as many registers as the micro-kernel's accumulators: the core's
    // throughput, not its latency. The multiplier is 1 and the addend tiny, so no value overflows or denormalises.
    // The best of ten windows: a window that another process or a frequency change slowed says nothing of the core.
    constexpr int chains = mr * vectors;
    vfloat acc[chains];
    for (int i = 0; i < chains; ++i) acc[i] = vbroadcast(static_cast<float>(i));
    const vfloat one = vbroadcast(1.0f), tiny = vbroadcast(1e-30f);
    double best = 0;
    for (int window = 0; window < 10; ++window) {
        const auto t0 = std::chrono::steady_clock::now();
        double elapsed = 0;
        long rounds = 0;
        do {
            for (int r = 0; r < 1000; ++r)
#pragma GCC unroll 32
                for (int i = 0; i < chains; ++i) acc[i] = vfma(acc[i], one, tiny);
            rounds += 1000;
            elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        } while (elapsed < seconds / 10);
        best = std::max(best, static_cast<double>(rounds) * chains * lanes * 2.0 / elapsed / 1e9);
    }
    float sink = 0;
    for (int i = 0; i < chains; ++i) {
        alignas(64) float out[lanes];
        vstore(out, acc[i]);
        sink += out[0];
    }
    volatile float keep = sink;  // the chains must be computed
    (void)keep;
    return best;
}

}  // namespace sd3::gemm
