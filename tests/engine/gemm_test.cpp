// sd3::gemm against a double-precision reference on fresh random shapes around every blocking boundary
// (register tile, k_block, row_block), the packing layouts by hand, the bit-for-bit promises (a row's result does
// not depend on the rows computed with it; an edge tile computes what a full tile does) and the refusals.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "sd3/gemm.hpp"
#include "test_util.hpp"

namespace {

using sd3::gemm::k_block;
using sd3::gemm::row_block;

std::vector<float> random_vector(std::size_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
}

// C[r][j - c0] vs bias[j] (or C0) + sum_k A[r][k] W[j][k] in double; the bound scales with sum_k |A||W|.
void check_product(int rows, int depth, int outputs, int c0, int c1, bool with_bias, std::mt19937& rng) {
    CAPTURE(rows);
    CAPTURE(depth);
    CAPTURE(outputs);
    CAPTURE(c0);
    CAPTURE(c1);
    CAPTURE(with_bias);
    const int lda = depth + 3, ldc = (c1 - c0) + 5;  // leading dimensions wider than the data
    const auto a = random_vector(static_cast<std::size_t>(rows) * lda, rng);
    const auto w = random_vector(static_cast<std::size_t>(outputs) * depth, rng);
    const auto bias = random_vector(outputs, rng);
    auto c = random_vector(static_cast<std::size_t>(rows) * ldc, rng);
    const auto c_before = c;
    const sd3::gemm::packed_weights packed(w, outputs, depth);
    sd3::aligned_floats workspace(sd3::gemm::workspace_floats());
    sd3::gemm::multiply(a.data(), lda, rows, packed, c0, c1, c.data(), ldc, workspace, with_bias ? bias.data() + c0 : nullptr);
    int bad = 0;
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < ldc; ++j) {
            const std::size_t at = static_cast<std::size_t>(r) * ldc + j;
            if (j >= c1 - c0) {  // past the computed columns: untouched
                if (c[at] != c_before[at]) ++bad;
                continue;
            }
            double want = with_bias ? bias[c0 + j] : c_before[at], scale = std::abs(want);
            for (int k = 0; k < depth; ++k) {
                const double p = double(a[static_cast<std::size_t>(r) * lda + k]) * w[static_cast<std::size_t>(c0 + j) * depth + k];
                want += p;
                scale += std::abs(p);
            }
            if (std::abs(c[at] - want) > 1e-6 * scale * std::sqrt(double(depth) + 1)) ++bad;
        }
    CHECK(bad == 0);
}

}  // namespace

TEST_CASE("gemm: products against a double reference across the blocking boundaries (fresh random inputs)") {
    std::mt19937 rng(test_util::fresh_seed());
    const auto tile = sd3::gemm::register_tile();
    for (const int rows : {1, tile.rows - 1, tile.rows, tile.rows + 1, 45, row_block + 3})
        for (const int depth : {1, 7, 64, k_block + 44}) {
            for (const int outputs : {1, tile.cols - 1, tile.cols + 3, 3 * tile.cols})
                check_product(rows, depth, outputs, 0, outputs, rows % 2 == 0, rng);
        }
    // A column range starting at a panel boundary and ending inside a panel; accumulate and bias forms.
    for (const bool with_bias : {false, true}) check_product(30, 2 * k_block + 1, 4 * tile.cols + 5, tile.cols, 3 * tile.cols + 7, with_bias, rng);
    std::uniform_int_distribution<int> r(1, 300), d(1, 600), o(1, 200);
    for (int i = 0; i < 6; ++i) check_product(r(rng), d(rng), o(rng), 0, 0, false, rng);  // empty column range
    for (int i = 0; i < 6; ++i) {
        const int outputs = o(rng);
        check_product(r(rng), d(rng), outputs, 0, outputs, i % 2 == 0, rng);
    }
}

TEST_CASE("gemm: a row's result does not depend on the rows computed with it, bit for bit") {
    std::mt19937 rng(test_util::fresh_seed());
    const int rows = 77, depth = k_block + 9, outputs = 70;
    const auto a = random_vector(static_cast<std::size_t>(rows) * depth, rng);
    const auto w = random_vector(static_cast<std::size_t>(outputs) * depth, rng);
    const auto bias = random_vector(outputs, rng);
    const sd3::gemm::packed_weights packed(w, outputs, depth);
    sd3::aligned_floats workspace(sd3::gemm::workspace_floats());
    std::vector<float> all(static_cast<std::size_t>(rows) * outputs);
    sd3::gemm::multiply(a.data(), depth, rows, packed, 0, outputs, all.data(), outputs, workspace, bias.data());
    for (const int first : {0, 5, 13, 40, 76})
        for (const int count : {1, 2, 15}) {
            const int n = std::min(count, rows - first);
            std::vector<float> part(static_cast<std::size_t>(n) * outputs);
            sd3::gemm::multiply(a.data() + static_cast<std::size_t>(first) * depth, depth, n, packed, 0, outputs, part.data(), outputs,
                                workspace, bias.data());
            CAPTURE(first);
            CAPTURE(n);
            CHECK(std::equal(part.begin(), part.end(), all.begin() + static_cast<std::ptrdiff_t>(first) * outputs));
        }
}

TEST_CASE("gemm: packing layouts, by hand") {
    const auto tile = sd3::gemm::register_tile();
    // A 2 x 3 matrix with lda 4: panel 0 holds row i at i * k_block, zero rows after.
    const float a[] = {1, 2, 3, -1, 4, 5, 6, -1};
    std::vector<float> rows(sd3::gemm::packed_rows_floats(2), -7.0f);
    sd3::gemm::pack_rows(a, 4, 2, 3, rows.data());
    CHECK(rows[0] == 1);
    CHECK(rows[2] == 3);
    CHECK(rows[k_block] == 4);
    CHECK(rows[k_block + 2] == 6);
    for (int i = 2; i < tile.rows; ++i) CHECK(rows[static_cast<std::size_t>(i) * k_block + 1] == 0.0f);
    // B^T rows (2 outputs x 3 depth) -> one panel: k-th row holds output j at j, zero past 2.
    std::vector<float> cols(static_cast<std::size_t>(3) * tile.cols, -7.0f);
    sd3::gemm::pack_transposed(a, 4, 2, 3, cols.data());
    CHECK(cols[0] == 1);
    CHECK(cols[1] == 4);
    CHECK(cols[static_cast<std::size_t>(2) * tile.cols] == 3);
    CHECK(cols[static_cast<std::size_t>(2) * tile.cols + 1] == 6);
    CHECK(cols[2] == 0.0f);
    // B row-major (2 depth x 3 cols, ldb 4) -> one panel: k-th row holds B[k][0:3], zero after.
    std::vector<float> vals(static_cast<std::size_t>(2) * tile.cols, -7.0f);
    sd3::gemm::pack_columns(a, 4, 2, 3, vals.data());
    CHECK(vals[2] == 3);
    CHECK(vals[static_cast<std::size_t>(tile.cols)] == 4);
    CHECK(vals[3] == 0.0f);
    // packed_weights is pack_transposed of the weight, panel by panel.
    const sd3::gemm::packed_weights pw(std::vector<float>{1, 2, 3, 4, 5, 6}, 2, 3);
    CHECK(pw.panel(0)[0] == 1);
    CHECK(pw.panel(0)[1] == 4);
    CHECK(pw.panel(0)[tile.cols] == 2);
}

TEST_CASE("gemm: an edge tile computes what a full tile does, bit for bit, in every start mode") {
    std::mt19937 rng(test_util::fresh_seed());
    const auto tile = sd3::gemm::register_tile();
    const int depth = 50;
    std::vector<float> a(sd3::gemm::packed_rows_floats(tile.rows));
    const auto filled = random_vector(static_cast<std::size_t>(tile.rows) * depth, rng);
    sd3::gemm::pack_rows(filled.data(), depth, tile.rows, depth, a.data());
    const auto b = random_vector(static_cast<std::size_t>(depth) * tile.cols, rng);
    const auto row = random_vector(tile.cols, rng);
    const auto start = random_vector(static_cast<std::size_t>(tile.rows) * tile.cols, rng);
    for (const auto from : {sd3::gemm::start::zero, sd3::gemm::start::c, sd3::gemm::start::row}) {
        auto full = start, edge = start;
        sd3::gemm::micro_kernel(depth, a.data(), b.data(), tile.cols, full.data(), tile.cols, from, row.data());
        sd3::gemm::micro_kernel_edge(depth, a.data(), b.data(), tile.cols, edge.data(), tile.cols, tile.rows - 1, tile.cols - 1,
                                     from, row.data());
        int differ = 0;
        for (int i = 0; i < tile.rows; ++i)
            for (int j = 0; j < tile.cols; ++j) {
                const std::size_t at = static_cast<std::size_t>(i) * tile.cols + j;
                const bool inside = i < tile.rows - 1 && j < tile.cols - 1;
                if (edge[at] != (inside ? full[at] : start[at])) ++differ;
            }
        CHECK(differ == 0);
    }
}

TEST_CASE("gemm: bad arguments are refused with the parameter and its value") {
    const auto tile = sd3::gemm::register_tile();
    std::vector<float> w(12, 1.0f);
    CHECK_THROWS_WITH_AS(sd3::gemm::packed_weights(w, 5, 3), doctest::Contains("weight has 12 values"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::gemm::packed_weights(w, 0, 3), doctest::Contains("outputs = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::gemm::packed_weights(w, 4, -3), doctest::Contains("depth = -3"), std::invalid_argument);
    const sd3::gemm::packed_weights pw(w, 4, 3);
    sd3::aligned_floats workspace(sd3::gemm::workspace_floats());
    std::vector<float> a(3), c(4);
    CHECK_THROWS_WITH_AS(sd3::gemm::multiply(a.data(), 3, 1, pw, 1, 4, c.data(), 4, workspace), doctest::Contains("columns [1, 4)"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::gemm::multiply(a.data(), 3, 1, pw, 0, 5, c.data(), 4, workspace), doctest::Contains("columns [0, 5)"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::gemm::multiply(a.data(), 3, 1, pw, 0, 4, c.data(), 4, std::span<float>(workspace).first(10)),
                         doctest::Contains("workspace has 10 floats"), std::invalid_argument);
    std::vector<float> out(sd3::gemm::packed_rows_floats(1));
    std::vector<float> wide(k_block + 1);
    CHECK_THROWS_WITH_AS(sd3::gemm::pack_rows(wide.data(), k_block + 1, 1, k_block + 1, out.data()),
                         doctest::Contains(("depth = " + std::to_string(k_block + 1)).c_str()), std::invalid_argument);
    CHECK(tile.cols % 8 == 0);
}

TEST_CASE("gemm: pack_transposed equals the transpose on fresh random shapes (vector and scalar paths)") {
    std::mt19937 rng(test_util::fresh_seed());
    const auto tile = sd3::gemm::register_tile();
    std::uniform_int_distribution<int> cols_d(1, 5 * tile.cols), depth_d(1, 100);
    for (int trial = 0; trial < 20; ++trial) {
        const int cols = trial == 0 ? 2 * tile.cols : cols_d(rng), depth = trial == 0 ? 64 : depth_d(rng), ldb = depth + trial % 3;
        const auto bt = random_vector(static_cast<std::size_t>(cols) * ldb, rng);
        const int panels = (cols + tile.cols - 1) / tile.cols;
        std::vector<float> out(static_cast<std::size_t>(panels) * depth * tile.cols, -1.0f);
        sd3::gemm::pack_transposed(bt.data(), ldb, cols, depth, out.data());
        int bad = 0;
        for (int p = 0; p < panels; ++p)
            for (int k = 0; k < depth; ++k)
                for (int j = 0; j < tile.cols; ++j) {
                    const int col = p * tile.cols + j;
                    const float want = col < cols ? bt[static_cast<std::size_t>(col) * ldb + k] : 0.0f;
                    if (out[(static_cast<std::size_t>(p) * depth + k) * tile.cols + j] != want) ++bad;
                }
        CAPTURE(cols);
        CAPTURE(depth);
        CHECK(bad == 0);
    }
}
