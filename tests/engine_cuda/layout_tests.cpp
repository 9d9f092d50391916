// Host checks of the FlashAttention-2-class kernel's index maps (examples/engine_cuda/src/mma_layout.hpp), which
// the kernel itself uses: every mma.m16n8k16 fragment covers its tile exactly once, P's accumulators are the next
// product's A fragment, the swizzle is a permutation of each row's chunks, and every 16-byte shared-memory access
// the kernel makes (cp.async stores, ldmatrix rows of Q, K and V) is free of bank conflicts — while the same
// accesses without the swizzle are 8-way conflicted, so the check can fail.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <utility>
#include <vector>

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

// ---------------------------------------------------------------------------------------------------------------
// A lane-by-lane host transliteration of attention_fa2_kernel's warp (and of fa2_merge_kernel), built from the same
// index maps: 32 lanes' registers as arrays, mma.sync as "gather the fragments into tiles, multiply, scatter back",
// shuffles as exchanges between lane arrays. Against direct fp64 attention it checks the kernel's algorithm — the
// masking of ragged key tiles, the base-2 online softmax and its rescales, P's reuse as the A fragment, the
// epilogue's indexing, the split over keys and the LSE merge. (The PTX instructions' own semantics are what the
// maps above encode; only a device can check those.)
namespace {

float round_bf16(float x) {  // round to nearest even at 8 significant bits, as __float2bfloat16_rn for finite x
    std::uint32_t u = 0;
    std::memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    float r = 0;
    std::memcpy(&r, &u, 4);
    return r;
}

// d (16 x 8) += a (16 x 16) b (16 x 8), each given as the 32 lanes' fragment registers.
void mma_lanes(float (&d)[32][4], const float (&a)[32][8], const float (&b)[32][4]) {
    float A[16][16] = {}, B[16][8] = {}, D[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 8; ++i) A[fa2::a_element(l, i).row][fa2::a_element(l, i).col] = a[l][i];
        for (int i = 0; i < 4; ++i) B[fa2::b_element(l, i).row][fa2::b_element(l, i).col] = b[l][i];
        for (int i = 0; i < 4; ++i) D[fa2::c_element(l, i).row][fa2::c_element(l, i).col] = d[l][i];
    }
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 8; ++c)
            for (int k = 0; k < 16; ++k) D[r][c] += A[r][k] * B[k][c];
    for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) d[l][i] = D[fa2::c_element(l, i).row][fa2::c_element(l, i).col];
}

struct emulated {
    std::vector<float> out, lse;  // [queries][hd], [queries]
};

// One head of one sample: q [queries][hd], k and v [keys][hd] (bf16 values as floats); the kernel's grid over query
// blocks and splits, then the merge when splits > 1.
template <int HD>
emulated emulate_fa2(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, int queries, int keys, float scale, int splits) {
    constexpr int block_queries = 64, block_keys = 64, ksteps = HD / 16, ntiles = block_keys / 8, dtiles = HD / 8;
    constexpr float log2e = 1.4426950408889634f, ln2 = 0.6931471805599453f;
    const int tiles = (keys + block_keys - 1) / block_keys, per_split = (tiles + splits - 1) / splits;
    std::vector<float> part_out(static_cast<std::size_t>(splits) * queries * HD), part_lse(static_cast<std::size_t>(splits) * queries);
    auto at = [](const std::vector<float>& m, int rows, int r, int c) { return r < rows ? m[static_cast<std::size_t>(r) * HD + c] : 0.f; };  // zero fill
    for (int split = 0; split < splits; ++split)
        for (int q0 = 0; q0 < queries; q0 += block_queries)
            for (int warp = 0; warp < 4; ++warp) {
                const int t_begin = split * per_split, t_end = std::min(tiles, t_begin + per_split);
                static float qf[ksteps][32][8];
                for (int kk = 0; kk < ksteps; ++kk)
                    for (int l = 0; l < 32; ++l)
                        for (int i = 0; i < 8; ++i) {
                            const auto e = fa2::a_element(l, i);
                            qf[kk][l][i] = at(q, queries, q0 + warp * 16 + e.row, kk * 16 + e.col);
                        }
                float o[dtiles][32][4] = {}, m[32][2], lsum[32][2] = {};
                for (int l = 0; l < 32; ++l) m[l][0] = m[l][1] = -INFINITY;
                for (int t = t_begin; t < t_end; ++t) {
                    const int key0 = t * block_keys;
                    float s[ntiles][32][4] = {};
                    for (int kk = 0; kk < ksteps; ++kk)
                        for (int n = 0; n < ntiles; ++n) {
                            float kb[32][4];
                            for (int l = 0; l < 32; ++l)
                                for (int i = 0; i < 4; ++i) {
                                    const auto e = fa2::b_element(l, i);  // B[k = dim][n = key]
                                    kb[l][i] = at(k, keys, key0 + n * 8 + e.col, kk * 16 + e.row);
                                }
                            mma_lanes(s[n], qf[kk], kb);
                        }
                    float tile_max[32][2];
                    for (int l = 0; l < 32; ++l) {
                        tile_max[l][0] = tile_max[l][1] = -INFINITY;
                        for (int n = 0; n < ntiles; ++n)
                            for (int i = 0; i < 4; ++i) {
                                const int key = key0 + n * 8 + fa2::c_element(l, i).col;
                                const float x = key < keys ? s[n][l][i] * (scale * log2e) : -INFINITY;
                                s[n][l][i] = x;
                                tile_max[l][i >> 1] = std::max(tile_max[l][i >> 1], x);
                            }
                    }
                    for (int mask : {1, 2}) {  // __shfl_xor_sync
                        float copy[32][2];
                        std::memcpy(copy, tile_max, sizeof copy);
                        for (int l = 0; l < 32; ++l)
                            for (int r = 0; r < 2; ++r) tile_max[l][r] = std::max(copy[l][r], copy[l ^ mask][r]);
                    }
                    float base[32][2];
                    for (int l = 0; l < 32; ++l)
                        for (int r = 0; r < 2; ++r) {
                            const float next = std::max(m[l][r], tile_max[l][r]);
                            base[l][r] = next == -INFINITY ? 0.f : next;
                            const float rescale = std::exp2(m[l][r] - base[l][r]);
                            lsum[l][r] *= rescale;
                            for (int d = 0; d < dtiles; ++d) {
                                o[d][l][2 * r] *= rescale;
                                o[d][l][2 * r + 1] *= rescale;
                            }
                            m[l][r] = next;
                        }
                    for (int n = 0; n < ntiles; ++n)
                        for (int l = 0; l < 32; ++l)
                            for (int i = 0; i < 4; ++i) {
                                const float p = std::exp2(s[n][l][i] - base[l][i >> 1]);
                                lsum[l][i >> 1] += p;
                                s[n][l][i] = p;
                            }
                    for (int j = 0; j < ntiles / 2; ++j) {
                        float pa[32][8];
                        for (int l = 0; l < 32; ++l)
                            for (int i = 0; i < 8; ++i) {
                                const auto src = fa2::p_source(i);
                                pa[l][i] = round_bf16(s[2 * j + src.tile][l][src.elem]);
                            }
                        for (int d = 0; d < dtiles; ++d) {
                            float vb[32][4];
                            for (int l = 0; l < 32; ++l)
                                for (int i = 0; i < 4; ++i) {
                                    const auto e = fa2::b_element(l, i);  // B[k = key][n = dim]
                                    vb[l][i] = at(v, keys, key0 + j * 16 + e.row, d * 8 + e.col);
                                }
                            mma_lanes(o[d], pa, vb);
                        }
                    }
                }
                for (int mask : {1, 2}) {
                    float copy[32][2];
                    std::memcpy(copy, lsum, sizeof copy);
                    for (int l = 0; l < 32; ++l)
                        for (int r = 0; r < 2; ++r) lsum[l][r] = copy[l][r] + copy[l ^ mask][r];
                }
                for (int l = 0; l < 32; ++l)
                    for (int r = 0; r < 2; ++r) {
                        const int i = q0 + warp * 16 + (l >> 2) + 8 * r;
                        if (i >= queries) continue;
                        const float inv = lsum[l][r] > 0.f ? 1.f / lsum[l][r] : 0.f;
                        const float lse = lsum[l][r] > 0.f ? (m[l][r] + std::log2(lsum[l][r])) * ln2 : -INFINITY;
                        for (int d = 0; d < dtiles; ++d)
                            for (int h = 0; h < 2; ++h)
                                part_out[(static_cast<std::size_t>(split) * queries + i) * HD + d * 8 + (l & 3) * 2 + h] = o[d][l][2 * r + h] * inv;
                        if ((l & 3) == 0) part_lse[static_cast<std::size_t>(split) * queries + i] = lse;
                    }
            }
    emulated r;
    r.out.assign(static_cast<std::size_t>(queries) * HD, 0.f);
    r.lse.assign(static_cast<std::size_t>(queries), 0.f);
    for (int i = 0; i < queries; ++i) {  // fa2_merge_kernel (with one split: the same numbers, as the kernel writes them)
        float top = -INFINITY;
        for (int s = 0; s < splits; ++s) top = std::max(top, part_lse[static_cast<std::size_t>(s) * queries + i]);
        float total = 0;
        std::vector<float> acc(HD, 0.f);
        for (int s = 0; s < splits && top != -INFINITY; ++s) {
            const float w = std::exp(part_lse[static_cast<std::size_t>(s) * queries + i] - top);
            total += w;
            for (int d = 0; d < HD; ++d) acc[static_cast<std::size_t>(d)] += w * part_out[(static_cast<std::size_t>(s) * queries + i) * HD + d];
        }
        for (int d = 0; d < HD; ++d) r.out[static_cast<std::size_t>(i) * HD + d] = splits == 1 ? part_out[static_cast<std::size_t>(i) * HD + d] : acc[static_cast<std::size_t>(d)] / total;
        r.lse[static_cast<std::size_t>(i)] = splits == 1 ? part_lse[static_cast<std::size_t>(i)] : top + std::log(total);
    }
    return r;
}

template <int HD>
void check_emulation(int queries, int keys, int splits, float sharpness, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    auto draw = [&](int rows) {
        std::vector<float> m(static_cast<std::size_t>(rows) * HD);
        for (auto& x : m) x = round_bf16(normal(rng));
        return m;
    };
    const auto q = draw(queries), k = draw(keys), v = draw(keys);
    const float scale = sharpness / std::sqrt(static_cast<float>(HD));
    const auto got = emulate_fa2<HD>(q, k, v, queries, keys, scale, splits);
    double worst_out = 0, worst_lse = 0, top = 0;
    for (int i = 0; i < queries; ++i) {
        std::vector<double> logit(static_cast<std::size_t>(keys));
        double mx = -INFINITY;
        for (int j = 0; j < keys; ++j) {
            double dot = 0;
            for (int d = 0; d < HD; ++d) dot += static_cast<double>(q[static_cast<std::size_t>(i) * HD + d]) * k[static_cast<std::size_t>(j) * HD + d];
            logit[static_cast<std::size_t>(j)] = dot * scale;
            mx = std::max(mx, logit[static_cast<std::size_t>(j)]);
        }
        double sum = 0;
        for (double x : logit) sum += std::exp(x - mx);
        const double lse = mx + std::log(sum);
        worst_lse = std::max(worst_lse, std::abs(lse - got.lse[static_cast<std::size_t>(i)]));
        for (int d = 0; d < HD; ++d) {
            double o = 0;
            for (int j = 0; j < keys; ++j) o += std::exp(logit[static_cast<std::size_t>(j)] - lse) * v[static_cast<std::size_t>(j) * HD + d];
            worst_out = std::max(worst_out, std::abs(o - got.out[static_cast<std::size_t>(i) * HD + d]));
            top = std::max(top, std::abs(o));
        }
    }
    INFO("queries ", queries, " keys ", keys, " splits ", splits, " head ", HD, ": out error ", worst_out / top, " of the largest output, LSE error ", worst_lse);
    CHECK(worst_out / top <= 1e-2);  // P rounded to bf16 before P·V (2^-9 per weight), nothing else rounded
    CHECK(worst_lse <= 1e-4);       // fp32 throughout
}

}  // namespace

TEST_SUITE("engine_layout") {
    TEST_CASE("a lane-by-lane transliteration of the fa2 kernel's warps and merge equals fp64 attention, ragged tiles, split or not") {
        check_emulation<64>(70, 150, 1, 1.f, 1);   // a part-filled query block, a part-filled last key tile
        check_emulation<64>(70, 150, 3, 1.f, 2);   // three splits of one tile each
        check_emulation<64>(5, 64, 1, 1.f, 3);     // exactly one key tile
        check_emulation<64>(17, 1, 1, 1.f, 4);     // one key
        check_emulation<64>(33, 200, 8, 1.f, 5);   // more splits than tiles: empty splits merge as weight 0
        check_emulation<64>(64, 130, 2, 5.f, 6);   // sharp softmax: the maximum moves between tiles
        check_emulation<128>(20, 97, 2, 1.f, 7);
    }
}

namespace {

// fa2_probe_kernel's warps, transliterated as above: per 64-key tile, K as the A operand (rows = keys), each 64-query
// tile of Q as B, exp2(scale log2e s - lse log2e) summed per key over the valid queries, the quad's sums combined.
template <int HD>
std::vector<float> emulate_probe(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& lse, int n, int keys, float scale) {
    constexpr int ksteps = HD / 16, ntiles = 64 / 8;
    constexpr float log2e = 1.4426950408889634f;
    auto at = [](const std::vector<float>& m, int rows, int r, int c) { return r < rows ? m[static_cast<std::size_t>(r) * HD + c] : 0.f; };
    std::vector<float> partial(static_cast<std::size_t>(keys), 0.f);
    for (int j0 = 0; j0 < keys; j0 += 64)
        for (int warp = 0; warp < 4; ++warp) {
            static float kf[ksteps][32][8];
            for (int kk = 0; kk < ksteps; ++kk)
                for (int l = 0; l < 32; ++l)
                    for (int i = 0; i < 8; ++i) {
                        const auto e = fa2::a_element(l, i);
                        kf[kk][l][i] = at(k, keys, j0 + warp * 16 + e.row, kk * 16 + e.col);
                    }
            float sum[32][2] = {};
            for (int i0 = 0; i0 < n; i0 += 64) {
                float s[ntiles][32][4] = {};
                for (int kk = 0; kk < ksteps; ++kk)
                    for (int t = 0; t < ntiles; ++t) {
                        float qb[32][4];
                        for (int l = 0; l < 32; ++l)
                            for (int i = 0; i < 4; ++i) {
                                const auto e = fa2::b_element(l, i);  // B[k = dim][n = query]
                                qb[l][i] = at(q, n, i0 + t * 8 + e.col, kk * 16 + e.row);
                            }
                        mma_lanes(s[t], kf[kk], qb);
                    }
                for (int t = 0; t < ntiles; ++t)
                    for (int l = 0; l < 32; ++l)
                        for (int e = 0; e < 4; ++e) {
                            const int i = i0 + t * 8 + fa2::c_element(l, e).col;
                            if (i < n) sum[l][e >> 1] += std::exp2(s[t][l][e] * (scale * log2e) - lse[static_cast<std::size_t>(i)] * log2e);
                        }
            }
            for (int mask : {1, 2}) {
                float copy[32][2];
                std::memcpy(copy, sum, sizeof copy);
                for (int l = 0; l < 32; ++l)
                    for (int r = 0; r < 2; ++r) sum[l][r] = copy[l][r] + copy[l ^ mask][r];
            }
            for (int l = 0; l < 32; ++l)
                for (int r = 0; r < 2; ++r) {
                    const int j = j0 + warp * 16 + (l >> 2) + 8 * r;
                    if ((l & 3) == 0 && j < keys) partial[static_cast<std::size_t>(j)] = sum[l][r];
                }
        }
    return partial;
}

template <int HD>
void check_probe_emulation(int n, int keys, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    auto draw = [&](int rows) {
        std::vector<float> m(static_cast<std::size_t>(rows) * HD);
        for (auto& x : m) x = round_bf16(normal(rng));
        return m;
    };
    const auto q = draw(n), k = draw(keys);
    const float scale = 1.f / std::sqrt(static_cast<float>(HD));
    // Each query's LSE over these keys (as the attention would return it over its keys; any LSE serves the check).
    std::vector<double> logits(static_cast<std::size_t>(n) * keys);
    std::vector<float> lse(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < keys; ++j) {
            double dot = 0;
            for (int d = 0; d < HD; ++d) dot += static_cast<double>(q[static_cast<std::size_t>(i) * HD + d]) * k[static_cast<std::size_t>(j) * HD + d];
            logits[static_cast<std::size_t>(i) * keys + j] = dot * scale;
            mx = std::max(mx, dot * scale);
        }
        for (int j = 0; j < keys; ++j) sum += std::exp(logits[static_cast<std::size_t>(i) * keys + j] - mx);
        lse[static_cast<std::size_t>(i)] = static_cast<float>(mx + std::log(sum));
    }
    const auto got = emulate_probe<HD>(q, k, lse, n, keys, scale);
    double diff = 0, norm = 0;
    for (int j = 0; j < keys; ++j) {
        double want = 0;
        for (int i = 0; i < n; ++i) want += std::exp(logits[static_cast<std::size_t>(i) * keys + j] - lse[static_cast<std::size_t>(i)]);
        diff += (got[static_cast<std::size_t>(j)] - want) * (got[static_cast<std::size_t>(j)] - want);
        norm += want * want;
    }
    INFO("queries ", n, " keys ", keys, " head ", HD, ": relative L2 ", std::sqrt(diff / norm));
    CHECK(std::sqrt(diff / norm) <= 1e-4);
}

}  // namespace

TEST_SUITE("engine_layout") {
    TEST_CASE("a lane-by-lane transliteration of the fa2 probe sweep equals the fp64 column sums, ragged tiles") {
        check_probe_emulation<64>(70, 150, 11);
        check_probe_emulation<64>(1, 64, 12);
        check_probe_emulation<64>(130, 17, 13);
        check_probe_emulation<128>(40, 90, 14);
    }
}
