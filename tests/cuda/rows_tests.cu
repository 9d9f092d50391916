// Row element types (rows.cuh): float, __half and __nv_bfloat16 rows in and out of the device store and the
// device accelerator, whatever the storage.
//
// `host` cases (run anywhere): the library's bfloat16 rounds exactly as CUDA's __float2bfloat16_rn (hand-computed
// cases, then a sweep over every bf16 prefix), the test's own float -> half reference agrees with
// __float2half_rn (so the device suite's half expectations come from code that is not the device's), and the
// overflow rule of convert_checked. `rows_bf16` (a GPU): the store against host_cache_store with the
// conversions done on the host, edge values (largest finite, values that round to infinity, NaN, infinity,
// denormals, negative zero) with the status bits they raise, and whole accelerator runs with half / bf16 rows
// against the float-row accelerator rounded on the host.
#include "support.cuh"

#include <specdiff/cuda/accelerator.cuh>
#include <specdiff/cuda/rows.cuh>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace gpu = specdiff::gpu;
using namespace cudatest;
using specdiff::bfloat16;
using specdiff::index_t;
using specdiff::level;

namespace {

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> IEEE half, round to nearest even, written from the format's definition (not from CUDA's code):
// 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits; 2^-24 is the smallest denormal, 65504 the
// largest finite value, and everything from 65520 (the tie above it, whose even neighbour is infinity) up
// becomes infinity.
std::uint16_t half_reference(float f) {
  const std::uint32_t u = bits_of(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // a quiet NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);                          // >= 65520, or infinity
  if (a >= 0x38800000u) {  // a normal half: rebias the exponent (127 -> 15), round away 13 mantissa bits
    std::uint32_t m = a - 0x38000000u;
    m += 0xfffu + ((m >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (m >> 13));
  }
  const int e = static_cast<int>(a >> 23);
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  // A denormal half counts units of 2^-24: the float's significand (implicit bit included) shifted right.
  const std::uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const int shift = 126 - e;  // 14 .. 24
  std::uint32_t q = mant >> shift;
  const std::uint32_t rem = mant & ((1u << shift) - 1u), half_way = 1u << (shift - 1);
  if (rem > half_way || (rem == half_way && (q & 1u))) ++q;  // may carry into the smallest normal: its encoding
  return static_cast<std::uint16_t>(sign | q);
}

float half_to_float_reference(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
  if (e == 0) return sign ? -std::ldexp(static_cast<float>(m), -24) : std::ldexp(static_cast<float>(m), -24);
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

std::uint16_t raw_bits(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }
std::uint16_t raw_bits(__half x) { return static_cast<__half_raw>(x).x; }

// Per row type, the host side of the test: the reference conversion as bits, the exact value of bits, the
// bits of a device value, and a row value from bits.
template <class Row>
struct host_row;

template <>
struct host_row<float> {
  static std::uint32_t ref_bits(float x) { return bits_of(x); }
  static float value(std::uint32_t b) { return float_of(b); }
  static std::uint32_t bits(float x) { return bits_of(x); }
  static float make(std::uint32_t b) { return float_of(b); }
  static constexpr double rel_ulp = 0.0;
  static constexpr float max_finite = std::numeric_limits<float>::max();
  static constexpr std::uint32_t min_denormal = 1u;
};

template <>
struct host_row<__nv_bfloat16> {
  static std::uint32_t ref_bits(float x) { return specdiff::storage_traits<bfloat16>::store(x).bits; }  // the library's rounding
  static float value(std::uint32_t b) { return specdiff::storage_traits<bfloat16>::load(bfloat16{static_cast<std::uint16_t>(b)}); }
  static std::uint32_t bits(__nv_bfloat16 x) { return raw_bits(x); }
  static __nv_bfloat16 make(std::uint32_t b) {
    __nv_bfloat16_raw r;
    r.x = static_cast<unsigned short>(b);
    return __nv_bfloat16(r);
  }
  static constexpr double rel_ulp = 1.0 / 256;
  static constexpr float max_finite = 3.38953139e38f;  // 0x7f7f
  static constexpr std::uint32_t min_denormal = 1u;
};

template <>
struct host_row<__half> {
  static std::uint32_t ref_bits(float x) { return half_reference(x); }
  static float value(std::uint32_t b) { return half_to_float_reference(static_cast<std::uint16_t>(b)); }
  static std::uint32_t bits(__half x) { return raw_bits(x); }
  static __half make(std::uint32_t b) {
    __half_raw r;
    r.x = static_cast<unsigned short>(b);
    return __half(r);
  }
  static constexpr double rel_ulp = 1.0 / 2048;
  static constexpr float max_finite = 65504.f;
  static constexpr std::uint32_t min_denormal = 1u;
};

template <class Row>
const char* row_name() {
  if constexpr (std::is_same_v<Row, float>) return "float";
  else if constexpr (std::is_same_v<Row, __half>) return "__half";
  else return "__nv_bfloat16";
}

// Floats whose bit patterns cover every bf16 prefix with the low halves that decide rounding: exact, just
// above zero, just below the tie, the tie, just above it, the top, and one random.
template <class F>
void for_sweep(F&& f) {
  auto g = rng(900);
  std::uniform_int_distribution<std::uint32_t> low(0, 0xffffu);
  const std::uint32_t lows[] = {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu};
  for (std::uint32_t hi = 0; hi <= 0xffffu; ++hi) {
    for (std::uint32_t l : lows) f(float_of((hi << 16) | l));
    f(float_of((hi << 16) | low(g)));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("host") {
  TEST_CASE("rows: the library's bfloat16 rounds as __float2bfloat16_rn, bit for bit") {
    // Hand-computed: float bits -> bf16 bits (round to nearest, ties to even, on the low 16 bits).
    const struct {
      std::uint32_t in;
      std::uint16_t out;
      const char* what;
    } cases[] = {
        {0x3f800000u, 0x3f80u, "1"},
        {0x3f808000u, 0x3f80u, "1 + 2^-8: a tie, even neighbour below"},
        {0x3f818000u, 0x3f82u, "1 + 3 * 2^-8: a tie, even neighbour above"},
        {0x3f808001u, 0x3f81u, "just above a tie"},
        {0x3f807fffu, 0x3f80u, "just below a tie"},
        {0x7f7f7fffu, 0x7f7fu, "the largest float that stays finite"},
        {0x7f7f8000u, 0x7f80u, "the tie above bf16's largest finite value: to infinity"},
        {0x7f7fffffu, 0x7f80u, "FLT_MAX: to infinity"},
        {0xff7f8000u, 0xff80u, "negative overflow"},
        {0x80000000u, 0x8000u, "negative zero"},
        {0x00000001u, 0x0000u, "the smallest denormal"},
        {0x00008000u, 0x0000u, "a denormal tie, even below"},
        {0x00018000u, 0x0002u, "a denormal tie, even above"},
        {0x007fffffu, 0x0080u, "the largest denormal: up to the smallest normal"},
        {0xff800000u, 0xff80u, "-infinity"},
    };
    for (const auto& c : cases) {
      INFO(c.what);
      CHECK(specdiff::storage_traits<bfloat16>::store(float_of(c.in)).bits == c.out);
      CHECK(raw_bits(__float2bfloat16_rn(float_of(c.in))) == c.out);
    }
    // Every bf16 prefix: equal bits for every non-NaN float; both NaN for a NaN (CUDA returns its canonical
    // NaN, the library keeps the payload: the one documented difference).
    long long checked = 0, mismatched = 0;
    for_sweep([&](float f) {
      const std::uint16_t mine = specdiff::storage_traits<bfloat16>::store(f).bits, cuda = raw_bits(__float2bfloat16_rn(f));
      ++checked;
      if (std::isnan(f)) {
        if (!std::isnan(specdiff::storage_traits<bfloat16>::load({mine})) || !std::isnan(__bfloat162float(__float2bfloat16_rn(f)))) ++mismatched;
      } else if (mine != cuda && mismatched++ < 5) {
        FAIL_CHECK("float ", bits_of(f), ": library ", mine, ", CUDA ", cuda);
      }
    });
    CHECK(checked == 7 * 65536);
    CHECK(mismatched == 0);
    // Loads, and the two types as each other.
    for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
      const bfloat16 x{static_cast<std::uint16_t>(b)};
      const __nv_bfloat16 y = gpu::to_nv_bfloat16(x);
      REQUIRE(raw_bits(y) == b);
      REQUIRE(gpu::from_nv_bfloat16(y).bits == b);
      const float a = specdiff::storage_traits<bfloat16>::load(x), c = __bfloat162float(y);
      REQUIRE((bits_of(a) == bits_of(c) || (std::isnan(a) && std::isnan(c))));
    }
  }

  TEST_CASE("rows: the test's float -> half reference rounds as __float2half_rn") {
    const struct {
      std::uint32_t in;
      std::uint16_t out;
      const char* what;
    } cases[] = {
        {0x3f800000u, 0x3c00u, "1"},
        {0x477fe000u, 0x7bffu, "65504, the largest finite half"},
        {0x477fefffu, 0x7bffu, "just below the tie above 65504"},
        {0x477ff000u, 0x7c00u, "65520: the tie above 65504, to infinity"},
        {0xc77ff000u, 0xfc00u, "-65520"},
        {0x7f7fffffu, 0x7c00u, "FLT_MAX"},
        {0x38800000u, 0x0400u, "2^-14, the smallest normal"},
        {0x387fe000u, 0x0400u, "the tie between the largest denormal and the smallest normal"},
        {0x33800000u, 0x0001u, "2^-24, the smallest denormal"},
        {0x33000000u, 0x0000u, "2^-25: a tie, to zero"},
        {0x33000001u, 0x0001u, "just above 2^-25"},
        {0x33c00000u, 0x0002u, "1.5 * 2^-24: a tie, even neighbour above"},
        {0x80000000u, 0x8000u, "negative zero"},
        {0x00000001u, 0x0000u, "a float denormal"},
    };
    for (const auto& c : cases) {
      INFO(c.what);
      CHECK(half_reference(float_of(c.in)) == c.out);
      CHECK(raw_bits(__float2half_rn(float_of(c.in))) == c.out);
    }
    long long mismatched = 0;
    for_sweep([&](float f) {
      const std::uint16_t mine = half_reference(f), cuda = raw_bits(__float2half_rn(f));
      if (std::isnan(f)) {
        if ((mine & 0x7c00u) != 0x7c00u || (mine & 0x3ffu) == 0 || !std::isnan(__half2float(__float2half_rn(f)))) ++mismatched;
      } else if (mine != cuda && mismatched++ < 5) {
        FAIL_CHECK("float ", bits_of(f), ": reference ", mine, ", CUDA ", cuda);
      }
    });
    CHECK(mismatched == 0);
    for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
      const float mine = half_to_float_reference(static_cast<std::uint16_t>(b)), cuda = __half2float(host_row<__half>::make(b));
      REQUIRE((bits_of(mine) == bits_of(cuda) || (std::isnan(mine) && std::isnan(cuda))));
    }
  }

  TEST_CASE("rows: convert_checked flags a finite float that becomes infinite, and nothing else") {
    auto overflows = [](auto tag, float x) {
      bool o = false;
      (void)gpu::detail::convert_checked<decltype(tag)>(x, o);
      return o;
    };
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    CHECK_FALSE(overflows(__half{}, 65504.f));
    CHECK_FALSE(overflows(__half{}, 65519.99f));
    CHECK(overflows(__half{}, 65520.f));
    CHECK(overflows(__half{}, -1e5f));
    CHECK_FALSE(overflows(__half{}, inf));
    CHECK_FALSE(overflows(__half{}, nan));
    CHECK_FALSE(overflows(__half{}, 1e-30f));  // underflow to zero is rounding, not overflow
    for (float big : {float_of(0x7f7f8000u), std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()}) {
      CHECK(overflows(__nv_bfloat16{}, big));
      CHECK(overflows(bfloat16{}, big));
    }
    CHECK_FALSE(overflows(__nv_bfloat16{}, float_of(0x7f7f7fffu)));
    CHECK_FALSE(overflows(bfloat16{}, float_of(0x7f7f7fffu)));
    CHECK_FALSE(overflows(__nv_bfloat16{}, -inf));
    CHECK_FALSE(overflows(float{}, std::numeric_limits<float>::max()));
  }

  TEST_CASE("rows: the overflow status bit is new; the earlier bits keep their values") {
    static_assert(gpu::status_nonfinite_score == 1u && gpu::status_nonfinite_feature == 2u && gpu::status_empty_history == 4u &&
                  gpu::status_rejected_tags == 8u && gpu::status_index_out_of_range == 16u && gpu::status_count_over_capacity == 32u);
    static_assert(gpu::status_conversion_overflow == 64u);
    CHECK(gpu::describe_status(gpu::status_conversion_overflow) == "conversion overflowed to infinity");
    CHECK(gpu::describe_status(gpu::status_conversion_overflow | gpu::status_nonfinite_feature) == "non-finite feature, conversion overflowed to infinity");
    CHECK(gpu::describe_status(gpu::status_negative_attention) == "negative attention");
    CHECK(gpu::describe_status(256u) == "unknown bits 256");
  }

  TEST_CASE("rows: the accelerator takes half and bf16 rows with the same memory and the same checks") {
    static_assert(gpu::row_element<float> && gpu::row_element<__half> && gpu::row_element<__nv_bfloat16>);
    static_assert(gpu::row_element<bfloat16> && !gpu::row_element<double>);  // API 0.3: one bfloat16, either spelling
    // all_compute_classifier: a device classifier whose construction makes no CUDA call.
    using C = gpu::all_compute_classifier;
    using base = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, C, specdiff::step_schedule>;
    using bf16 = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, C, specdiff::step_schedule, specdiff::specdiff_weighted,
                                  gpu::device_cache_store<float>, __nv_bfloat16>;
    using half = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, C, specdiff::step_schedule, specdiff::specdiff_weighted,
                                  gpu::device_cache_store<bfloat16>, __half>;
    static_assert(std::is_same_v<base::row_type, float> && std::is_same_v<bf16::row_type, __nv_bfloat16> && std::is_same_v<half::row_type, __half>);
    const specdiff::accelerator_config cfg{256, 2, 10, 64};
    const specdiff::step_schedule schedule{2, 0, 2, {6}};
    const C classifier(256, 2);
    // The rows are the engine's memory, not the accelerator's: the same bytes whatever the row type.
    CHECK(bf16::memory_bytes(cfg, classifier, schedule) == base::memory_bytes(cfg, classifier, schedule));
    CHECK(half::memory_bytes(cfg, classifier, schedule) < base::memory_bytes(cfg, classifier, schedule));  // a bfloat16 store
    specdiff::accelerator_config bad = cfg;
    bad.feature_dim = 0;
    expect_error<std::invalid_argument>([&] { (void)bf16::memory_bytes(bad, classifier, schedule); }, {"feature_dim", "0"});
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("rows_bf16") {
  // Values of Row (as bits) for a random matrix: normal values at a few scales, with the type's edge values
  // planted (largest finite and its negative, the smallest denormal, a denormal, negative zero) wherever
  // they stay finite in Storage too (the host store refuses infinity, and overflow is tested apart).
  template <class Row, class Storage>
  std::vector<std::uint32_t> random_row_bits(std::mt19937_64& g, std::size_t n) {
    using H = host_row<Row>;
    std::normal_distribution<float> d(0.f, 1.f);
    std::uniform_int_distribution<int> scale(-6, 6), plant(0, 15);
    const float edges[] = {H::max_finite, -H::max_finite, H::value(H::min_denormal), -H::value(7u), -0.f, H::value(H::ref_bits(1e-3f))};
    std::vector<std::uint32_t> v(n);
    for (auto& b : v) {
      float x = std::ldexp(d(g), scale(g));
      if (plant(g) == 0) {
        const float e = edges[std::uniform_int_distribution<std::size_t>(0, std::size(edges) - 1)(g)];
        if (std::isfinite(specdiff::storage_traits<Storage>::load(specdiff::storage_traits<Storage>::store(e)))) x = e;
      }
      b = H::ref_bits(x);
    }
    return v;
  }

  template <class Row>
  std::vector<Row> rows_of_bits(const std::vector<std::uint32_t>& bits) {
    std::vector<Row> v(bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) v[i] = host_row<Row>::make(bits[i]);
    return v;
  }
  template <class Row>
  std::vector<float> values_of_bits(const std::vector<std::uint32_t>& bits) {
    std::vector<float> v(bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) v[i] = host_row<Row>::value(bits[i]);
    return v;
  }

  // Whether rounding `want` to Row takes a finite value to infinity: where the device must raise
  // status_conversion_overflow (a mix can leave the range, and a half row's 65504 is 65536 in a bfloat16 store).
  template <class Row>
  bool overflows_to(const std::vector<float>& want) {
    return std::any_of(want.begin(), want.end(),
                       [](float x) { return std::isfinite(x) && std::isinf(host_row<Row>::value(host_row<Row>::ref_bits(x))); });
  }

  // The device's Row output against the host store's float fill rounded on the host. Exact bits, or for C3
  // (the device's weights may differ from the host's in the last float bit) within float rounding of the
  // terms plus one rounding of Row.
  template <class Row, class Storage, class A>
  void compare_filled(const specdiff::host_cache_store<Storage>& host, const std::vector<Row>& got, const std::vector<float>& want, index_t rows,
                      index_t dim, const A& a, float t, bool exact) {
    using H = host_row<Row>;
    int bad = 0;
    for (index_t r = 0; r < rows && bad < 5; ++r) {
      float tags[8], w[8];
      const int held = std::min<int>(A::depth, host.entries(0, 0, r));
      for (int k = 0; k < held; ++k) tags[k] = host.history_tag(0, 0, r, k);
      a.weights(tags, held, t, w);
      for (index_t c = 0; c < dim; ++c) {
        const std::size_t i = static_cast<std::size_t>(r) * static_cast<std::size_t>(dim) + static_cast<std::size_t>(c);
        const std::uint32_t g_bits = H::bits(got[i]), w_bits = H::ref_bits(want[i]);
        if (g_bits == w_bits) continue;
        // A mix of planted extremes can make inf - inf: NaN on both sides, with different payloads.
        if (std::isnan(H::value(g_bits)) && std::isnan(want[i])) continue;
        if (!exact) {
          double m = 0.0;
          for (int k = 0; k < held; ++k)
            m += std::abs(static_cast<double>(w[k]) * specdiff::storage_traits<Storage>::load(host.history(0, 0, r, k)[static_cast<std::size_t>(c)]));
          const double diff = std::abs(static_cast<double>(H::value(g_bits)) - static_cast<double>(want[i]));
          if (diff <= m * 1e-6 + std::abs(static_cast<double>(want[i])) * H::rel_ulp + 6e-8) continue;
        }
        FAIL_CHECK(row_name<Row>(), " row ", r, " column ", c, ": device bits ", g_bits, " (", H::value(g_bits), "), host ", w_bits, " (", want[i], ")");
        ++bad;
        break;
      }
    }
    CHECK(bad == 0);
  }

  // One store, three pushes (every row; a compact scatter of a random subset; a subset in place), then C2 and
  // C3 fills of every row into Row output, all against host_cache_store fed the exact values of the Row bits.
  template <class Row, class Storage>
  void check_store_rows(index_t tokens, index_t dim, std::mt19937_64& g, const stream& s) {
    INFO(row_name<Row>(), " rows, storage bytes ", sizeof(Storage), ", tokens ", tokens, ", dim ", dim);
    const specdiff::cache_shape shape{1, 1, tokens, dim, 3};
    specdiff::host_cache_store<Storage> host(shape);
    buffer<unsigned char> memory(gpu::device_cache_store<Storage>::memory_bytes(shape));
    gpu::device_cache_store<Storage> device(shape, memory.get(), memory.size(), s);
    const auto cells = static_cast<std::size_t>(tokens) * static_cast<std::size_t>(dim);

    const auto b0 = random_row_bits<Row, Storage>(g, cells);
    const auto v0 = values_of_bits<Row>(b0);
    buffer<Row> d0(rows_of_bits<Row>(b0));
    host.write(0, 0, 900.f, specdiff::matrix_view<const float>(v0.data(), tokens, dim));
    device.write(0, 0, 900.f, gpu::device_matrix<const Row>(d0.get(), tokens, dim), s);

    std::vector<index_t> subset;
    std::bernoulli_distribution pick(0.5);
    for (index_t i = 0; i < tokens; ++i)
      if (pick(g)) subset.push_back(i);
    const auto n = static_cast<index_t>(subset.size());
    buffer<index_t> d_subset(subset.empty() ? std::vector<index_t>{0} : subset);
    const gpu::index_list list{d_subset.get(), n, tokens};
    const auto b1 = random_row_bits<Row, Storage>(g, static_cast<std::size_t>(n) * static_cast<std::size_t>(dim) + 1);
    const auto v1 = values_of_bits<Row>(b1);
    buffer<Row> d1(rows_of_bits<Row>(b1));
    host.scatter(0, 0, 800.f, subset, specdiff::matrix_view<const float>(v1.data(), n, dim));
    device.scatter(0, 0, 800.f, list, gpu::device_matrix<Row>(d1.get(), n, dim), s);  // non-const rows: deduced as well

    const auto b2 = random_row_bits<Row, Storage>(g, cells);
    const auto v2 = values_of_bits<Row>(b2);
    buffer<Row> d2(rows_of_bits<Row>(b2));
    host.write_rows(0, 0, 700.f, subset, specdiff::matrix_view<const float>(v2.data(), tokens, dim));
    device.write_rows(0, 0, 700.f, list, gpu::device_matrix<const Row>(d2.get(), tokens, dim), s);

    std::vector<index_t> all(static_cast<std::size_t>(tokens));
    for (index_t i = 0; i < tokens; ++i) all[static_cast<std::size_t>(i)] = i;
    const float t = 600.f;
    buffer<Row> out(cells);
    bool overflow = false;
    {
      std::vector<float> want(cells);
      host.fill(0, 0, t, all, specdiff::matrix_view<float>(want.data(), tokens, dim));
      device.fill(0, 0, t, gpu::all_rows{tokens}, gpu::device_matrix<Row>(out.get(), tokens, dim), s);
      compare_filled<Row>(host, out.download(), want, tokens, dim, specdiff::latest{}, t, true);
      overflow |= overflows_to<Row>(want);
    }
    {
      std::vector<float> want(cells);
      host.fill(0, 0, t, all, specdiff::specdiff_weighted{}, specdiff::matrix_view<float>(want.data(), tokens, dim));
      device.fill(0, 0, t, gpu::all_rows{tokens}, specdiff::specdiff_weighted{}, gpu::device_matrix<Row>(out.get(), tokens, dim), s);
      compare_filled<Row>(host, out.download(), want, tokens, dim, specdiff::specdiff_weighted{}, t, false);
      overflow |= overflows_to<Row>(want);
    }
    CHECK(device.read_status(s) == (overflow ? gpu::status_conversion_overflow : 0u));
  }

  template <class Row>
  void check_store_rows_all_storages(std::mt19937_64& g, const stream& s) {
    // dim 64: 16-byte units for every pair of types; 37: element by element.
    for (index_t tokens : {1, 31, 256})
      for (index_t dim : {64, 37}) {
        check_store_rows<Row, float>(tokens, dim, g, s);
        check_store_rows<Row, bfloat16>(tokens, dim, g, s);
      }
  }

  TEST_CASE("bf16 rows in and out of the store match the host store with host-side bfloat16 conversion") {
    auto g = rng(910);
    const stream s;
    check_store_rows_all_storages<__nv_bfloat16>(g, s);
  }

  TEST_CASE("half rows in and out of the store match the host store with the host half reference") {
    auto g = rng(911);
    const stream s;
    check_store_rows_all_storages<__half>(g, s);
  }

  TEST_CASE("float rows are unchanged by the row policy (the float path against the same host twin)") {
    auto g = rng(912);
    const stream s;
    check_store_rows_all_storages<float>(g, s);
  }

  // One row of `dim` values pushed and read back through C2, with the status word it leaves.
  template <class In, class Storage, class Out>
  std::pair<std::vector<Out>, std::uint32_t> round_trip(const std::vector<In>& row, const stream& s) {
    const auto dim = static_cast<index_t>(row.size());
    const specdiff::cache_shape shape{1, 1, 1, dim, 2};
    buffer<unsigned char> memory(gpu::device_cache_store<Storage>::memory_bytes(shape));
    gpu::device_cache_store<Storage> store(shape, memory.get(), memory.size(), s);
    buffer<In> in(row);
    buffer<Out> out(row.size());
    store.write(0, 0, 10.f, gpu::device_matrix<const In>(in.get(), 1, dim), s);
    store.fill(0, 0, 5.f, gpu::all_rows{1}, gpu::device_matrix<Out>(out.get(), 1, dim), s);
    const std::uint32_t status = store.read_status(s);
    return {out.download(), status};
  }

  TEST_CASE("bf16 and half edge values: overflow raises status_conversion_overflow, never a silent infinity") {
    const stream s;
    using HB = host_row<__nv_bfloat16>;
    using HH = host_row<__half>;
    const float inf = std::numeric_limits<float>::infinity();
    for (index_t dim : {64, 37}) {  // the 16-byte path and the element path
      INFO("dim ", dim);
      auto padded = [&](std::vector<float> v) {
        v.resize(static_cast<std::size_t>(dim), 0.5f);
        return v;
      };
      {  // float rows into a bfloat16 store: values past bf16's range overflow on the push; back out as float
        const auto in = padded({3.3e38f, -std::numeric_limits<float>::max(), HB::max_finite, float_of(0x7f7f7fffu), -0.f, float_of(1u)});
        const auto [out, status] = round_trip<float, bfloat16, float>(in, s);
        CHECK(status == gpu::status_conversion_overflow);
        CHECK(out[0] == inf);
        CHECK(out[1] == -inf);
        CHECK(out[2] == HB::max_finite);
        CHECK(out[3] == HB::max_finite);
        CHECK(bits_of(out[4]) == 0x80000000u);  // negative zero kept
        CHECK(bits_of(out[5]) == 0u);           // a float denormal rounds to bf16's zero, as on the host
      }
      {  // bf16 rows into a bfloat16 store and back: bit for bit, denormals and -0 included, no status
        std::vector<std::uint32_t> bits = {0x7f7fu, 0xff7fu, 0x0001u, 0x8001u, 0x8000u, 0x007fu, 0x3f81u};
        bits.resize(static_cast<std::size_t>(dim), 0x3f80u);
        const auto [out, status] = round_trip<__nv_bfloat16, bfloat16, __nv_bfloat16>(rows_of_bits<__nv_bfloat16>(bits), s);
        CHECK(status == 0);
        for (std::size_t i = 0; i < bits.size(); ++i) CHECK(HB::bits(out[i]) == bits[i]);
      }
      {  // float rows through a float store into half rows: the fill's conversion overflows past 65519.99...
        const auto in = padded({70000.f, -70000.f, 65520.f, 65504.f, 65519.99f, std::ldexp(1.f, -24), std::ldexp(1.f, -26), -0.f, 1e-3f});
        const auto [out, status] = round_trip<float, float, __half>(in, s);
        CHECK(status == gpu::status_conversion_overflow);
        const std::uint32_t want[] = {0x7c00u, 0xfc00u, 0x7c00u, 0x7bffu, 0x7bffu, 0x0001u, 0x0000u, 0x8000u, half_reference(1e-3f)};
        for (std::size_t i = 0; i < std::size(want); ++i) CHECK(HH::bits(out[i]) == want[i]);
        for (std::size_t i = std::size(want); i < out.size(); ++i) CHECK(HH::bits(out[i]) == 0x3800u);
      }
      {  // ... and without an overflowing value, no bit
        const auto [out, status] = round_trip<float, float, __half>(padded({65504.f, -65504.f, 1e-7f}), s);
        CHECK(status == 0);
        CHECK(HH::bits(out[0]) == 0x7bffu);
        CHECK(HH::bits(out[2]) == half_reference(1e-7f));  // a half denormal, not flushed
      }
      {  // infinity and NaN in a half row are non-finite features, not overflow; they come back as they were
        std::vector<std::uint32_t> bits = {0x7c00u, 0xfc00u, 0x7e00u, 0x0001u};
        bits.resize(static_cast<std::size_t>(dim), 0x3c00u);
        const auto [out, status] = round_trip<__half, float, __half>(rows_of_bits<__half>(bits), s);
        CHECK(status == gpu::status_nonfinite_feature);
        CHECK(HH::bits(out[0]) == 0x7c00u);
        CHECK(HH::bits(out[1]) == 0xfc00u);
        CHECK(std::isnan(__half2float(out[2])));
        CHECK(HH::bits(out[3]) == 0x0001u);
      }
      {  // half rows into a bfloat16 store: half's whole range fits (65504 -> 65536), so no overflow
        std::vector<std::uint32_t> bits = {0x7bffu, 0xfbffu, 0x0001u};
        bits.resize(static_cast<std::size_t>(dim), 0x3c00u);
        const auto [out, status] = round_trip<__half, bfloat16, float>(rows_of_bits<__half>(bits), s);
        CHECK(status == 0);
        CHECK(out[0] == 65536.f);
        CHECK(out[1] == -65536.f);
        CHECK(out[2] == HB::value(HB::ref_bits(std::ldexp(1.f, -24))));
      }
    }
  }

  // A whole run of the accelerator with Row rows against the same run with float rows holding the same
  // values: same plans, and every output element the float output rounded on the host (the device does the
  // same float arithmetic, then one conversion), bit for bit.
  template <class Row, class Storage>
  void check_accelerator_rows(index_t dim, std::mt19937_64& g, const stream& s) {
    INFO(row_name<Row>(), " rows, storage bytes ", sizeof(Storage), ", dim ", dim);
    using H = host_row<Row>;
    using float_acc = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule,
                                       specdiff::specdiff_weighted, gpu::device_cache_store<Storage>>;
    using row_acc = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule,
                                     specdiff::specdiff_weighted, gpu::device_cache_store<Storage>, Row>;
    const index_t tokens = 256, batch = 2, steps = 8;
    const specdiff::accelerator_config cfg{tokens, batch, steps, dim};
    const specdiff::step_schedule schedule{2, 0, 2, {5}};
    const gpu::three_level_classifier<> classifier(tokens, batch, 0.7);
    buffer<unsigned char> m_float(float_acc::memory_bytes(cfg, classifier, schedule)), m_row(row_acc::memory_bytes(cfg, classifier, schedule));
    float_acc a(cfg, {}, {}, classifier, schedule, m_float.get(), m_float.size(), s);
    row_acc b(cfg, {}, {}, classifier, schedule, m_row.get(), m_row.size(), s);

    const auto n = static_cast<std::size_t>(cfg.rows());
    const auto cells = n * static_cast<std::size_t>(dim);
    std::vector<float> t(static_cast<std::size_t>(steps));
    for (index_t k = 0; k < steps; ++k) t[static_cast<std::size_t>(k)] = 1000.f - 110.f * static_cast<float>(k);
    const auto spec_t = specdiff::aligned_speculative_timesteps(t, 2, schedule);
    a.begin_speculation(spec_t);
    b.begin_speculation(spec_t);
    for (std::size_t k = 0; k < spec_t.size(); ++k) {
      buffer<float> record(lognormal(g, n, 0.01));
      a.record_speculation(static_cast<index_t>(k), record.cspan());
      b.record_speculation(static_cast<index_t>(k), record.cspan());
      s.sync();
    }
    buffer<float> out_a(cells);
    buffer<Row> out_b(cells);
    bool overflow = false;
    for (index_t k = 0; k < steps; ++k) {
      auto sa = a.plan_step(k, t[static_cast<std::size_t>(k)]);
      auto sb = b.plan_step(k, t[static_cast<std::size_t>(k)]);
      REQUIRE(sa.compute_count() == sb.compute_count());
      const index_t count = batch * sa.compute_count();
      const auto bits = random_row_bits<Row, Storage>(g, static_cast<std::size_t>(count) * static_cast<std::size_t>(dim));
      buffer<float> computed_a(values_of_bits<Row>(bits));
      buffer<Row> computed_b(rows_of_bits<Row>(bits));
      buffer<float> attention(lognormal(g, n, 0.01));
      a.complete_step(std::move(sa), gpu::device_matrix<const float>(computed_a.get(), count, dim), gpu::device_matrix<float>(out_a.get(), cfg.rows(), dim),
                      attention.cspan());
      b.complete_step(std::move(sb), gpu::device_matrix<const Row>(computed_b.get(), count, dim), gpu::device_matrix<Row>(out_b.get(), cfg.rows(), dim),
                      attention.cspan());
      const auto fa = out_a.download();
      const auto fb = out_b.download();
      int bad = 0;
      for (std::size_t i = 0; i < cells && bad < 5; ++i)
        if (H::bits(fb[i]) != H::ref_bits(fa[i]) && !(std::isnan(fa[i]) && std::isnan(H::value(H::bits(fb[i]))))) {
          FAIL_CHECK("step ", k, " element ", i, ": ", row_name<Row>(), " bits ", H::bits(fb[i]), ", float output ", fa[i], " rounds to ", H::ref_bits(fa[i]));
          ++bad;
        }
      CHECK(bad == 0);
      overflow |= overflows_to<Row>(fa);
    }
    CHECK(a.read_status() == 0);
    CHECK(b.read_status() == (overflow ? gpu::status_conversion_overflow : 0u));
  }

  TEST_CASE("accelerator with bf16 and half rows: the float-row run rounded on the host, bit for bit") {
    auto g = rng(920);
    const stream s;
    for (index_t dim : {64, 36}) {
      check_accelerator_rows<__nv_bfloat16, float>(dim, g, s);
      check_accelerator_rows<__nv_bfloat16, bfloat16>(dim, g, s);
      check_accelerator_rows<__half, float>(dim, g, s);
      check_accelerator_rows<__half, bfloat16>(dim, g, s);
    }
  }
}
