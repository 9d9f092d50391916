// The candidates for the engine's GEMM side by side, one thread, on the linear-layer shapes the engine runs:
// sd3::gemm (the engine's own: weights packed once, 112-row work units) and Eigen's product (the engine's GEMM
// before, on 512 x 256 output tiles) in every build; and, in the executables CMake builds where the library is
// installed, OpenBLAS (cblas_sgemm), BLIS (bli_sgemm) and oneDNN (dnnl_sgemm), each called on the whole product.
// Each computes C = A W^T (A: rows x depth, W: outputs x depth, row-major) on the same inputs; medians of --reps
// timed calls after a warm-up, GFLOP/s and the fraction of the core's FP32 FMA peak (measured, or --peak).
// bench/gemm/run.sh runs every executable built, alternating, and prints the table docs/engine.md quotes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <Eigen/Core>

#include "bench/timing.hpp"
#include "sd3/gemm.hpp"

#if defined(SD3_GEMM_OPENBLAS)
#include <cblas.h>
#elif defined(SD3_GEMM_BLIS)
#include <blis.h>
#elif defined(SD3_GEMM_DNNL)
#include <oneapi/dnnl/dnnl.h>
#endif

namespace {

struct shape {
    const char* model;
    const char* layer;
    int rows, depth, outputs;
};
// Linear layers of bench/forward's default config (hidden 384, batch 2: 1024 image tokens, 102 at CR 0.9, 77
// context) and of models/mnist-sd3 at the demo's batch of 128 (hidden 128: 256 image tokens, 26 at CR 0.9, 4
// context).
constexpr shape shapes[] = {
    {"bench", "to_qkv/full", 2048, 384, 1152},  {"bench", "to_out/full", 2048, 384, 384},
    {"bench", "ff.0/full", 2048, 384, 1536},    {"bench", "ff.2/full", 2048, 1536, 384},
    {"bench", "to_qkv/cr0.9", 204, 384, 1152}, {"bench", "ff.0/cr0.9", 204, 384, 1536},
    {"bench", "ff.2/cr0.9", 204, 1536, 384},   {"bench", "add_qkv/context", 154, 384, 1152},
    {"mnist", "to_qkv/full", 32768, 128, 384},  {"mnist", "ff.0/full", 32768, 128, 512},
    {"mnist", "ff.2/full", 32768, 512, 128},    {"mnist", "to_qkv/cr0.9", 3328, 128, 384},
    {"mnist", "ff.2/cr0.9", 3328, 512, 128},   {"mnist", "add_qkv/context", 512, 128, 384},
};

using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One warm-up call (first touch, library initialisation), then `reps` timed ones.
template <class F>
std::vector<double> time_ms(int reps, F&& fn) {
    return bench::time_ms(1, reps, fn);
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"GEMM candidates for the SD3 engine, one thread"};
    int reps = 7;
    double peak = 0;
    app.add_option("--reps", reps, "timed calls per shape and candidate")->check(CLI::PositiveNumber);
    app.add_option("--peak", peak, "the core's FP32 FMA peak in GFLOP/s (default: measured)")->check(CLI::PositiveNumber);
    CLI11_PARSE(app, argc, argv);
    if (peak == 0) peak = sd3::gemm::measure_peak_gflops(0.5);
    // The libraries pick their kernels by CPU detection; the name they picked goes into the candidate's name
    // (OpenBLAS 0.3.21 takes an unknown CPU for Prescott, SSE3 only, and BLIS 0.9 picks haswell on this Xeon: their
    // OPENBLAS_CORETYPE and BLIS_ARCH_TYPE environment variables override the choice).
    std::string name = "sd3::gemm";
#if defined(SD3_GEMM_OPENBLAS)
    openblas_set_num_threads(1);
    name = std::string("openblas(") + openblas_get_corename() + ")";
#elif defined(SD3_GEMM_BLIS)
    bli_thread_set_num_threads(1);
    name = std::string("blis(") + bli_arch_string(bli_arch_query_id()) + ")";
#elif defined(SD3_GEMM_DNNL)
    name = "onednn";  // its sgemm runs on its OpenMP team: run.sh sets OMP_NUM_THREADS=1
#endif
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    std::printf("peak %.1f GFLOP/s\n", peak);
    for (const shape& s : shapes) {
        std::vector<float> a(static_cast<std::size_t>(s.rows) * s.depth), w(static_cast<std::size_t>(s.outputs) * s.depth),
            c(static_cast<std::size_t>(s.rows) * s.outputs), zero(s.outputs, 0.0f);
        for (auto* x : {&a, &w})
            for (auto& e : *x) e = normal(rng);
        const double flop = 2.0 * s.rows * s.depth * s.outputs;
        auto report = [&](const char* who, const std::vector<double>& t) {
            const double gf = flop / (t[t.size() / 2] * 1e-3) / 1e9;
            std::printf("RESULT candidate=%s model=%s layer=%s rows=%d depth=%d outputs=%d gflops=%.1f peak_fraction=%.3f "
                        "min_ms=%.3f median_ms=%.3f max_ms=%.3f\n",
                        who, s.model, s.layer, s.rows, s.depth, s.outputs, gf, gf / peak, t.front(), t[t.size() / 2], t.back());
        };
#if defined(SD3_GEMM_OPENBLAS)
        report(name.c_str(), time_ms(reps, [&] {
                   cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.rows, s.outputs, s.depth, 1.0f, a.data(), s.depth,
                               w.data(), s.depth, 0.0f, c.data(), s.outputs);
               }));
#elif defined(SD3_GEMM_BLIS)
        report(name.c_str(), time_ms(reps, [&] {
                   float one = 1.0f, none = 0.0f;
                   bli_sgemm(BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, s.rows, s.outputs, s.depth, &one, a.data(), s.depth, 1, w.data(),
                             s.depth, 1, &none, c.data(), s.outputs, 1);
               }));
#elif defined(SD3_GEMM_DNNL)
        report(name.c_str(), time_ms(reps, [&] {
                   dnnl_sgemm('N', 'T', s.rows, s.outputs, s.depth, 1.0f, a.data(), s.depth, w.data(), s.depth, 0.0f, c.data(),
                              s.outputs);
               }));
#else
        const sd3::gemm::packed_weights packed(w, s.outputs, s.depth);  // once per layer, outside the clock
        sd3::aligned_floats workspace(sd3::gemm::workspace_floats());
        const int unit = sd3::gemm::task_panels * sd3::gemm::register_tile().rows;
        report(name.c_str(), time_ms(reps, [&] {
                   for (int r0 = 0; r0 < s.rows; r0 += unit)
                       sd3::gemm::multiply(a.data() + static_cast<std::ptrdiff_t>(r0) * s.depth, s.depth, std::min(unit, s.rows - r0),
                                           packed, 0, s.outputs, c.data() + static_cast<std::ptrdiff_t>(r0) * s.outputs, s.outputs,
                                           workspace, zero.data());
               }));
        using map = Eigen::Map<row_matrix, 0, Eigen::OuterStride<>>;
        using const_map = Eigen::Map<const row_matrix, 0, Eigen::OuterStride<>>;
        report("eigen", time_ms(reps, [&] {
                   for (int r0 = 0; r0 < s.rows; r0 += 512)
                       for (int c0 = 0; c0 < s.outputs; c0 += 256) {
                           const int nr = std::min(512, s.rows - r0), nc = std::min(256, s.outputs - c0);
                           const const_map x(a.data() + static_cast<std::ptrdiff_t>(r0) * s.depth, nr, s.depth, Eigen::OuterStride<>(s.depth));
                           const const_map wt(w.data() + static_cast<std::ptrdiff_t>(c0) * s.depth, nc, s.depth, Eigen::OuterStride<>(s.depth));
                           map y(c.data() + static_cast<std::ptrdiff_t>(r0) * s.outputs + c0, nr, nc, Eigen::OuterStride<>(s.outputs));
                           y.noalias() = x * wt.transpose();
                       }
               }));
#endif
    }
    return 0;
}
