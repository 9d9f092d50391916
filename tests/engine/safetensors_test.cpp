// The safetensors reader: round trips in every float dtype, exact F64 / I64 / I32 reads, conversions against hand-computed bit patterns, and a
// corrupt-file suite where each damaged file must raise std::runtime_error naming the file and the tensor.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "sd3/safetensors.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using sd3::dtype;

namespace {

// Writes [u64 header length][header][data] as given, so tests can build broken files.
fs::path write_raw(const std::string& name, const std::string& header, const std::vector<unsigned char>& data,
                   std::int64_t header_len = -1) {
    const fs::path p = test_util::scratch_dir() / name;
    std::ofstream f(p, std::ios::binary);
    const std::uint64_t len = header_len < 0 ? header.size() : static_cast<std::uint64_t>(header_len);
    f.write(reinterpret_cast<const char*>(&len), 8);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    return p;
}

// Expects the constructor to throw std::runtime_error whose message names the file and contains `fragment`.
void expect_corrupt(const fs::path& p, const std::string& fragment) {
    CAPTURE(p.string());
    CAPTURE(fragment);
    bool threw = false;
    try {
        sd3::safetensors_file f(p);
    } catch (const std::runtime_error& e) {
        threw = true;
        const std::string msg = e.what();
        CAPTURE(msg);
        CHECK(msg.find(p.string()) != std::string::npos);
        CHECK(msg.find(fragment) != std::string::npos);
    }
    CHECK(threw);
}

std::vector<unsigned char> zeros(std::size_t n) { return std::vector<unsigned char>(n, 0); }

// Appends the little-endian bytes of `values` to `data` (the host is little-endian: the reader asserts it).
template <class T>
void append_bytes(std::vector<unsigned char>& data, const std::vector<T>& values) {
    const auto* p = reinterpret_cast<const unsigned char*>(values.data());
    data.insert(data.end(), p, p + values.size() * sizeof(T));
}

// Expects `read` to throw std::runtime_error whose message names the file, the tensor and `fragment`.
template <class F>
void expect_read_error(const fs::path& p, const std::string& tensor, const std::string& fragment, F read) {
    CAPTURE(tensor);
    CAPTURE(fragment);
    bool threw = false;
    try {
        read();
    } catch (const std::runtime_error& e) {
        threw = true;
        const std::string msg = e.what();
        CAPTURE(msg);
        CHECK(msg.find(p.string()) != std::string::npos);
        CHECK(msg.find("'" + tensor + "'") != std::string::npos);
        CHECK(msg.find(fragment) != std::string::npos);
    }
    CHECK(threw);
}

}  // namespace

TEST_CASE("half and bfloat16 conversions match hand-computed bit patterns") {
    CHECK(sd3::half_to_float(0x3c00) == 1.0f);
    CHECK(sd3::half_to_float(0xc000) == -2.0f);
    CHECK(sd3::half_to_float(0x7bff) == 65504.0f);
    CHECK(sd3::half_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
    CHECK(sd3::half_to_float(0x03ff) == 1023.0f * std::ldexp(1.0f, -24));
    CHECK(sd3::half_to_float(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
    CHECK(sd3::half_to_float(0x3555) == 0x1.554p-2f);            // 0.333251953125
    CHECK(std::isinf(sd3::half_to_float(0x7c00)));
    CHECK(std::isnan(sd3::half_to_float(0x7e00)));
    CHECK(std::signbit(sd3::half_to_float(0x8000)));
    CHECK(sd3::bfloat16_to_float(0x3f80) == 1.0f);
    CHECK(sd3::bfloat16_to_float(0xc0a0) == -5.0f);
    CHECK(sd3::bfloat16_to_float(0x3eab) == 0x1.56p-2f);

    CHECK(sd3::float_to_half(1.0f) == 0x3c00);
    CHECK(sd3::float_to_half(65504.0f) == 0x7bff);
    CHECK(sd3::float_to_half(65520.0f) == 0x7c00);               // rounds to infinity
    CHECK(sd3::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
    CHECK(sd3::float_to_half(std::ldexp(1.0f, -26)) == 0x0000);  // below half the smallest subnormal
    CHECK(sd3::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie -> even
    CHECK(sd3::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie -> even (up)
    CHECK(sd3::float_to_bfloat16(1.0f) == 0x3f80);
    CHECK(sd3::float_to_bfloat16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);  // tie -> even
    CHECK(sd3::float_to_bfloat16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);

    // Fresh random values: every half / bfloat16 pattern round-trips, and rounding error stays within half an ulp.
    std::mt19937 rng(test_util::fresh_seed());
    for (std::uint32_t h = 0; h < 0x10000; ++h) {
        const float f = sd3::half_to_float(static_cast<std::uint16_t>(h));
        if (!std::isnan(f)) REQUIRE(sd3::float_to_half(f) == h);
        const float g = sd3::bfloat16_to_float(static_cast<std::uint16_t>(h));
        if (!std::isnan(g)) REQUIRE(sd3::float_to_bfloat16(g) == h);
    }
    std::normal_distribution<float> normal(0.0f, 10.0f);
    for (int i = 0; i < 10000; ++i) {
        const float x = normal(rng);
        CHECK(std::fabs(sd3::half_to_float(sd3::float_to_half(x)) - x) <= std::ldexp(std::fabs(x), -11) + 0x1p-25f);
        CHECK(std::fabs(sd3::bfloat16_to_float(sd3::float_to_bfloat16(x)) - x) <= std::ldexp(std::fabs(x), -8));
    }
}

TEST_CASE("safetensors round trip in F32, F16 and BF16 with metadata") {
    std::mt19937 rng(test_util::fresh_seed());
    std::normal_distribution<float> normal;
    std::vector<float> a(2 * 3 * 4), b(7), c(5);
    for (auto* v : {&a, &b, &c})
        for (auto& x : *v) x = normal(rng);
    const std::vector<float> empty;
    const std::vector<sd3::tensor_to_save> tensors = {
        {"block.a", {2, 3, 4}, a, dtype::f32},
        {"b16", {7}, b, dtype::bf16},
        {"h", {5, 1}, c, dtype::f16},
        {"empty", {0, 3}, empty, dtype::f32},
    };
    const auto path = test_util::scratch_dir() / "roundtrip.safetensors";
    sd3::save_safetensors(path, tensors, {{"format", "pt"}});

    const sd3::safetensors_file f(path);
    CHECK(f.tensors().size() == 4);
    CHECK(f.metadata().at("format") == "pt");
    CHECK(f.info("block.a").shape == std::vector<std::int64_t>{2, 3, 4});
    CHECK(f.info("b16").type == dtype::bf16);
    CHECK(f.read("block.a") == a);  // F32 is exact
    const auto rb = f.read("b16");
    for (std::size_t i = 0; i < b.size(); ++i) CHECK(rb[i] == sd3::bfloat16_to_float(sd3::float_to_bfloat16(b[i])));
    const auto rh = f.read("h");
    for (std::size_t i = 0; i < c.size(); ++i) CHECK(rh[i] == sd3::half_to_float(sd3::float_to_half(c[i])));
    CHECK(f.read("empty").empty());
    CHECK(f.raw("h").size() == 10);

    std::vector<float> wrong(3);
    CHECK_THROWS_WITH_AS(f.read_into("h", wrong), doctest::Contains("'h'"), std::runtime_error);
    CHECK_THROWS_WITH_AS(f.info("nope"), doctest::Contains("'nope'"), std::runtime_error);
    CHECK_FALSE(f.contains("nope"));

    // Moving keeps the mapping valid.
    sd3::safetensors_file moved = sd3::safetensors_file(path);
    CHECK(moved.read("block.a") == a);

    CHECK_THROWS_AS(sd3::save_safetensors(path, std::vector<sd3::tensor_to_save>{{"x", {4}, b, dtype::f32}}), std::invalid_argument);
    CHECK_THROWS_AS(sd3::save_safetensors(path, std::vector<sd3::tensor_to_save>{{"x", {7}, b}, {"x", {7}, b}}), std::invalid_argument);
}

TEST_CASE("F64, I64 and I32 tensors read exactly, asking for the wrong kind is an error naming the dtype") {
    // Fixed edge cases, then fresh random bit patterns (so the check covers every byte of each element).
    std::vector<double> f64{0.1, -1e300, 5e-324, -0.0, std::numeric_limits<double>::infinity()};
    std::vector<std::int64_t> i64{-3, 0, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::min(),
                                  std::numeric_limits<std::int64_t>::max()};
    std::vector<std::int32_t> i32{-1, 7, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()};
    std::mt19937_64 rng(test_util::fresh_seed());
    for (int i = 0; i < 11; ++i) {
        double d;
        do d = std::bit_cast<double>(rng()); while (std::isnan(d));  // NaN != NaN would make == useless
        f64.push_back(d);
        i64.push_back(static_cast<std::int64_t>(rng()));
        i32.push_back(static_cast<std::int32_t>(static_cast<std::uint32_t>(rng())));
    }
    const std::vector<float> f32{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
    const std::vector<std::uint16_t> f16{0x3C00, 0xC000, 0x7BFF, 0x0001};  // 1, -2, 65504, 2^-24
    const std::vector<std::uint16_t> bf16{0x3F80, 0xC0A0};                  // 1, -5

    std::vector<unsigned char> data;
    std::string header = "{";
    auto add = [&](const std::string& name, const std::string& type, const auto& values) {
        const std::size_t begin = data.size();
        append_bytes(data, values);
        if (header.size() > 1) header += ",";
        header += "\"" + name + "\":{\"dtype\":\"" + type + "\",\"shape\":[" + std::to_string(values.size()) +
                  "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(data.size()) + "]}";
    };
    add("d", "F64", f64);
    add("ids", "I64", i64);
    add("small", "I32", i32);
    add("weights", "F32", f32);
    add("half", "F16", f16);
    add("brain", "BF16", bf16);
    add("no_ids", "I64", std::vector<std::int64_t>{});
    header += "}";
    const auto path = write_raw("kinds.safetensors", header, data);

    const sd3::safetensors_file f(path);
    CHECK(f.info("d").type == dtype::f64);
    CHECK(f.info("ids").type == dtype::i64);
    CHECK(f.info("small").type == dtype::i32);
    CHECK(sd3::dtype_size(dtype::f64) == 8);
    CHECK(sd3::dtype_size(dtype::i64) == 8);
    CHECK(sd3::dtype_size(dtype::i32) == 4);
    CHECK(sd3::dtype_name(dtype::i32) == "I32");

    const auto d = f.read_doubles("d");
    REQUIRE(d.size() == f64.size());
    for (std::size_t i = 0; i < d.size(); ++i) {
        CAPTURE(i);
        CHECK(std::bit_cast<std::uint64_t>(d[i]) == std::bit_cast<std::uint64_t>(f64[i]));  // -0.0 keeps its sign
    }
    CHECK(f.read_ints("ids") == i64);
    CHECK(f.read_ints("small") == std::vector<std::int64_t>(i32.begin(), i32.end()));  // sign-extended
    CHECK(f.read_ints("no_ids").empty());
    // The floating types widen exactly to double; half values against hand-computed ones.
    CHECK(f.read_doubles("weights") == std::vector<double>(f32.begin(), f32.end()));
    CHECK(f.read("half") == std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)});
    CHECK(f.read_doubles("half") == std::vector<double>{1.0, -2.0, 65504.0, std::ldexp(1.0, -24)});
    CHECK(f.read_doubles("brain") == std::vector<double>{1.0, -5.0});

    std::vector<float> out(i64.size());
    expect_read_error(path, "ids", "dtype I64", [&] { (void)f.read("ids"); });
    expect_read_error(path, "ids", "dtype I64", [&] { f.read_into("ids", out); });
    expect_read_error(path, "small", "dtype I32", [&] { (void)f.read("small"); });
    expect_read_error(path, "d", "dtype F64", [&] { (void)f.read("d"); });  // no silent narrowing to float
    expect_read_error(path, "ids", "dtype I64", [&] { (void)f.read_doubles("ids"); });
    expect_read_error(path, "weights", "dtype F32", [&] { (void)f.read_ints("weights"); });
    expect_read_error(path, "half", "dtype F16", [&] { (void)f.read_ints("half"); });
    expect_read_error(path, "d", "dtype F64", [&] { (void)f.read_ints("d"); });
    expect_read_error(path, "gone", "no such tensor", [&] { (void)f.read_ints("gone"); });
    expect_read_error(path, "gone", "no such tensor", [&] { (void)f.read_doubles("gone"); });

    // The writer stores float tensors only.
    const std::vector<float> three(3);
    CHECK_THROWS_WITH_AS(sd3::save_safetensors(test_util::scratch_dir() / "w.safetensors",
                                               std::vector<sd3::tensor_to_save>{{"x", {3}, three, dtype::i64}}),
                         doctest::Contains("tensor 'x' has dtype I64"), std::invalid_argument);
}

TEST_CASE("corrupt safetensors files raise errors naming the file and tensor") {
    const std::string good_entry = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";

    SUBCASE("missing file") {
        expect_corrupt(test_util::scratch_dir() / "does_not_exist.safetensors", "cannot open");
    }
    SUBCASE("empty file") {
        const auto p = test_util::scratch_dir() / "empty.safetensors";
        std::ofstream(p, std::ios::binary).close();
        expect_corrupt(p, "truncated");
    }
    SUBCASE("truncated inside the length field") {
        const auto p = test_util::scratch_dir() / "short.safetensors";
        std::ofstream(p, std::ios::binary).write("\x10\x00\x00", 3);
        expect_corrupt(p, "truncated");
    }
    SUBCASE("header length past the end") {
        expect_corrupt(write_raw("hlen.safetensors", "{" + good_entry + "}", zeros(16), 1000), "header length 1000");
    }
    SUBCASE("header length of 2^62 does not overflow") {
        expect_corrupt(write_raw("hlen2.safetensors", "{}", {}, std::int64_t{1} << 62), "header length");
    }
    SUBCASE("header not JSON") {
        expect_corrupt(write_raw("json.safetensors", "{\"w\": [", zeros(16)), "not valid JSON");
    }
    SUBCASE("header not an object") {
        expect_corrupt(write_raw("arr.safetensors", "[1,2]", {}), "not a JSON object");
    }
    SUBCASE("truncated data: offsets beyond the file") {
        expect_corrupt(write_raw("trunc.safetensors", "{" + good_entry + "}", zeros(12)), "'w'");
        expect_corrupt(write_raw("trunc.safetensors", "{" + good_entry + "}", zeros(12)), "outside the data section");
    }
    SUBCASE("offsets outside the data") {
        const std::string h = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[20,24]}})";
        expect_corrupt(write_raw("outside.safetensors", h, zeros(16)), "'w'");
    }
    SUBCASE("reversed offsets") {
        const std::string h = R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})";
        expect_corrupt(write_raw("reversed.safetensors", h, zeros(16)), "reversed");
    }
    SUBCASE("overlapping tensors") {
        const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                              R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
        expect_corrupt(write_raw("overlap.safetensors", h, zeros(16)), "overlaps tensor 'a'");
    }
    SUBCASE("unsupported dtype") {
        const std::string h = R"({"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
        expect_corrupt(write_raw("u8.safetensors", h, zeros(3)), "unsupported dtype 'U8'");
        expect_corrupt(write_raw("u8.safetensors", h, zeros(3)), "'w'");
        const std::string hb = R"({"mask":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})";
        expect_corrupt(write_raw("bool.safetensors", hb, zeros(2)), "unsupported dtype 'BOOL'");
        const std::string h2 = R"({"q":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})";
        expect_corrupt(write_raw("i8.safetensors", h2, zeros(2)), "'q'");
    }
    SUBCASE("dtype not a string") {
        const std::string h = R"({"w":{"dtype":3,"shape":[2],"data_offsets":[0,8]}})";
        expect_corrupt(write_raw("dtype3.safetensors", h, zeros(8)), "'w'");
    }
    SUBCASE("shape disagreeing with the bytes") {
        const std::string h = R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})";
        expect_corrupt(write_raw("shape.safetensors", h, zeros(16)), "needs 12 bytes but data_offsets span 16");
        const std::string h16 = R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})";
        expect_corrupt(write_raw("shape16.safetensors", h16, zeros(16)), "needs 8 bytes");
        const std::string h64 = R"({"ids":{"dtype":"I64","shape":[3],"data_offsets":[0,16]}})";
        expect_corrupt(write_raw("shape64.safetensors", h64, zeros(16)), "with dtype I64 needs 24 bytes");
        const std::string hd = R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,4]}})";
        expect_corrupt(write_raw("shapef64.safetensors", hd, zeros(4)), "with dtype F64 needs 8 bytes");
        const std::string h32 = R"({"n":{"dtype":"I32","shape":[2,2],"data_offsets":[0,8]}})";
        expect_corrupt(write_raw("shape32.safetensors", h32, zeros(16)), "with dtype I32 needs 16 bytes but data_offsets span 8");
    }
    SUBCASE("shape with a huge dimension") {
        const std::string h = R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}})";
        expect_corrupt(write_raw("huge.safetensors", h, zeros(16)), "'w'");
    }
    SUBCASE("negative or fractional shape entries") {
        const std::string h = R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})";
        expect_corrupt(write_raw("neg.safetensors", h, zeros(4)), "non-negative integer");
        const std::string h2 = R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})";
        expect_corrupt(write_raw("frac.safetensors", h2, zeros(4)), "non-negative integer");
    }
    SUBCASE("missing or malformed fields") {
        expect_corrupt(write_raw("noshape.safetensors", R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", zeros(4)), "'shape'");
        expect_corrupt(write_raw("nooff.safetensors", R"({"w":{"dtype":"F32","shape":[1]}})", zeros(4)), "data_offsets");
        expect_corrupt(write_raw("off3.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", zeros(8)),
                       "data_offsets");
        expect_corrupt(write_raw("entry.safetensors", R"({"w":5})", {}), "'w'");
        expect_corrupt(write_raw("meta.safetensors", R"({"__metadata__":{"a":1}})", {}), "__metadata__");
    }
}
