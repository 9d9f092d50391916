// Host checks of the FlashAttention-2-class kernel's index maps (examples/engine_cuda/src/mma_layout.hpp), which
// the kernel itself uses: every mma.m16n8k16 fragment covers its tile exactly once, P's accumulators are the next
// product's A fragment, the swizzle is a permutation of each row's chunks, and every 16-byte shared-memory access
// the kernel makes (cp.async stores, ldmatrix rows of Q, K and V) is free of bank conflicts — while the same
// accesses without the swizzle are 8-way conflicted, so the check can fail.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <set>
#include <utility>

#include "../../examples/engine_cuda/src/mma_layout.hpp"

namespace fa2 = sd3::gpu::detail::fa2;

namespace {

// Each of rows x cols cells hit exactly once by (lane, element) over 32 lanes x `elements`.
template <class F>
bool covers_once(int rows, int cols, int elements, F at) {
    std::set<std::pair<int, int>> seen;
    for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < elements; ++i) {
            const fa2::coord c = at(lane, i);
            if (c.row < 0 || c.row >= rows || c.col < 0 || c.col >= cols) return false;
            if (!seen.insert({c.row, c.col}).second) return false;
        }
    return static_cast<int>(seen.size()) == rows * cols;
}

// The largest number of lanes of one quarter-warp that share a 16-byte bank group (1: conflict-free) when each lane
// accesses 16 bytes at element offset offset(lane).
template <class F>
int worst_conflict(F offset) {
    int worst = 0;
    for (int quarter = 0; quarter < 4; ++quarter) {
        std::array<int, 8> count{};
        for (int l = quarter * 8; l < quarter * 8 + 8; ++l) {
            const int o = offset(l);
            if (o % 8 != 0) return 99;  // not a 16-byte access
            ++count[static_cast<std::size_t>(fa2::bank_group(o))];
        }
        for (int c : count) worst = std::max(worst, c);
    }
    return worst;
}

int plain_offset(int row, int col, int chunks) { return row * chunks * 8 + col; }

}  // namespace

TEST_SUITE("engine_layout") {
    TEST_CASE("mma.m16n8k16 fragments cover their tiles exactly once") {
        CHECK(covers_once(16, 16, 8, [](int l, int i) { return fa2::a_element(l, i); }));
        CHECK(covers_once(16, 8, 4, [](int l, int i) { return fa2::b_element(l, i); }));
        CHECK(covers_once(16, 8, 4, [](int l, int i) { return fa2::c_element(l, i); }));
        // Registers hold pairs of adjacent columns (A, C) or rows (B): the pairs are what a 32-bit register packs.
        for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 8; i += 2) {
                CHECK(fa2::a_element(l, i + 1) == fa2::coord{fa2::a_element(l, i).row, fa2::a_element(l, i).col + 1});
                if (i < 4) {
                    CHECK(fa2::b_element(l, i + 1) == fa2::coord{fa2::b_element(l, i).row + 1, fa2::b_element(l, i).col});
                    CHECK(fa2::c_element(l, i + 1) == fa2::coord{fa2::c_element(l, i).row, fa2::c_element(l, i).col + 1});
                }
            }
    }

    TEST_CASE("S's accumulators of two adjacent 8-key tiles are P·V's A fragment, lane by lane") {
        for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 8; ++i) {
                const auto src = fa2::p_source(i);
                const fa2::coord c = fa2::c_element(l, src.elem);
                const fa2::coord from_s{c.row, c.col + 8 * src.tile};  // the key within the 16-key k-step
                CHECK(from_s == fa2::a_element(l, i));
            }
    }

    TEST_CASE("ldmatrix.x4 hands every lane the fragment elements the maps say") {
        // ldmatrix: register m of lane l holds row l / 4, columns 2 (l % 4) and +1 of matrix m (.trans: of its
        // transpose). Compose with the row each lane hands over and compare with the fragment maps.
        for (int l = 0; l < 32; ++l)
            for (int m = 0; m < 4; ++m)
                for (int half = 0; half < 2; ++half) {
                    const int r = l / 4, c = 2 * (l % 4) + half;
                    // Q as A: the row that lane 8m + r handed over, column c within its 8.
                    const fa2::coord q = fa2::ldmatrix_a_row(8 * m + r, 0, 0);
                    CHECK(fa2::coord{q.row, q.col + c} == fa2::a_element(l, 2 * m + half));
                    // K as B: matrix m is register m % 2 of n-tile m / 2; the element is K[key][dim] = B[dim][key].
                    const fa2::coord k = fa2::ldmatrix_k_row(8 * m + r, 0, 0);
                    const fa2::coord kb = fa2::b_element(l, 2 * (m % 2) + half);
                    CHECK(kb.col + 8 * (m / 2) == k.row);   // key = n
                    CHECK(kb.row == k.col + c);             // dim = k
                    // V as B with .trans: lane l receives row c, column r of matrix m (transposed).
                    const fa2::coord v = fa2::ldmatrix_v_row(8 * m + c, 0, 0);
                    const fa2::coord vb = fa2::b_element(l, 2 * (m % 2) + half);
                    CHECK(vb.row == v.row);                    // key = k
                    CHECK(v.row == c + 8 * (m % 2));
                    CHECK(vb.col + 8 * (m / 2) == v.col + r);  // dim = n
                }
    }

    TEST_CASE("the swizzle permutes each row's chunks and makes every 16-byte access conflict-free") {
        for (const int chunks : {8, 16}) {  // head_dim 64 and 128
            INFO("chunks per row ", chunks);
            for (int row = 0; row < 64; ++row) {
                std::set<int> physical;
                for (int c = 0; c < chunks; ++c) physical.insert(fa2::swizzled_chunk(row, c));
                CHECK(static_cast<int>(physical.size()) == chunks);
                CHECK(*physical.rbegin() == chunks - 1);
            }
            // cp.async stores of a 64-row tile by 128 threads, every step.
            for (int step = 0; step < 64 * chunks / 128; ++step) {
                CHECK(worst_conflict([&](int l) {
                          const auto rc = fa2::copy_chunk(l, step, chunks, 128);
                          return fa2::tile_offset(rc.row, rc.col * 8, chunks);
                      }) == 1);
            }
            // ldmatrix rows of Q (A), K (B) and V (B, .trans) at every 16-row block and 16-column k-step.
            for (int r0 = 0; r0 < 64; r0 += 16)
                for (int c0 = 0; c0 < chunks * 8; c0 += 16) {
                    INFO("block (", r0, ", ", c0, ")");
                    auto swz = [&](fa2::coord (*row_of)(int, int, int)) {
                        return worst_conflict([&](int l) { const auto x = row_of(l, r0, c0); return fa2::tile_offset(x.row, x.col, chunks); });
                    };
                    auto plain = [&](fa2::coord (*row_of)(int, int, int)) {
                        return worst_conflict([&](int l) { const auto x = row_of(l, r0, c0); return plain_offset(x.row, x.col, chunks); });
                    };
                    CHECK(swz(fa2::ldmatrix_a_row) == 1);
                    CHECK(swz(fa2::ldmatrix_k_row) == 1);
                    CHECK(swz(fa2::ldmatrix_v_row) == 1);
                    // Without the swizzle, eight consecutive rows share a bank group: the check is not vacuous.
                    CHECK(plain(fa2::ldmatrix_a_row) == 8);
                    CHECK(plain(fa2::ldmatrix_k_row) == 8);
                    CHECK(plain(fa2::ldmatrix_v_row) == 8);
                }
        }
    }
}
