#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <stdexcept>

#include "quality/tensor_file.hpp"
#include "test_support.hpp"

using test_support::make_tensor;

TEST_CASE("tensor_file reads what a hand-written safetensors file holds") {
  test_support::temp_dir dir;
  const auto path = dir.path() / "t.safetensors";
  const std::vector<float> f32{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  const std::vector<std::uint16_t> f16{0x3C00, 0xC000, 0x7BFF, 0x0001};  // 1, -2, 65504, 2^-24
  const std::vector<std::int64_t> i64{-3, 0, 1LL << 40};
  test_support::write_safetensors(path, {make_tensor("weights", "F32", {2, 3}, f32), make_tensor("half", "F16", {4}, f16),
                                         make_tensor("ids", "I64", {3}, i64)});
  const auto file = quality::tensor_file::load(path);
  CHECK(file.names() == std::vector<std::string>{"half", "ids", "weights"});
  CHECK(file.floats("weights") == f32);
  CHECK(file.at("weights").shape == std::vector<std::int64_t>{2, 3});
  CHECK(file.floats("half") == std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)});
  CHECK(file.ints("ids") == i64);
  CHECK_NOTHROW(file.expect_shape("weights", {2, 3}));
  CHECK_THROWS_WITH_AS(file.expect_shape("weights", {3, 2}), doctest::Contains("has shape [2, 3], expected [3, 2]"),
                       std::runtime_error);
  CHECK_THROWS_WITH_AS((void)file.at("missing"), doctest::Contains("no tensor 'missing'"), std::runtime_error);
  CHECK_THROWS_WITH_AS((void)file.ints("weights"), doctest::Contains("floating dtype F32"), std::runtime_error);
  CHECK_THROWS_WITH_AS((void)file.floats("ids"), doctest::Contains("integer dtype I64"), std::runtime_error);
}

TEST_CASE("half and bfloat16 decoding") {
  CHECK(quality::half_to_float(0x3555) == doctest::Approx(0.333251953125).epsilon(1e-12));
  CHECK(quality::half_to_float(0x8000) == 0.0f);
  CHECK(std::signbit(quality::half_to_float(0x8000)));
  CHECK(std::isinf(quality::half_to_float(0x7C00)));
  CHECK(std::isnan(quality::half_to_float(0x7E00)));
  CHECK(quality::bfloat16_to_float(0x3F80) == 1.0f);
  CHECK(quality::bfloat16_to_float(0xC0A0) == -5.0f);
}

TEST_CASE("tensor_file rejects missing, truncated and inconsistent files") {
  test_support::temp_dir dir;
  CHECK_THROWS_WITH_AS(quality::tensor_file::load(dir.path() / "none.safetensors"), doctest::Contains("cannot open"),
                       std::runtime_error);
  {
    std::ofstream(dir.path() / "short.safetensors", std::ios::binary) << "abc";
  }
  CHECK_THROWS_WITH_AS(quality::tensor_file::load(dir.path() / "short.safetensors"), doctest::Contains("too short"),
                       std::runtime_error);
  // A shape that claims more bytes than the data range holds.
  auto t = make_tensor("w", "F32", {4}, std::vector<float>{1, 2, 3});
  test_support::write_safetensors(dir.path() / "bad.safetensors", {t});
  CHECK_THROWS_WITH_AS(quality::tensor_file::load(dir.path() / "bad.safetensors"),
                       doctest::Contains("tensor 'w' has byte range inconsistent with dtype F32 shape [4]"), std::runtime_error);
  auto u = make_tensor("w", "U8", {3}, std::vector<unsigned char>{1, 2, 3});
  test_support::write_safetensors(dir.path() / "u8.safetensors", {u});
  CHECK_THROWS_WITH_AS(quality::tensor_file::load(dir.path() / "u8.safetensors"), doctest::Contains("unsupported dtype U8"),
                       std::runtime_error);
  {
    std::ofstream out(dir.path() / "json.safetensors", std::ios::binary);
    const std::uint64_t n = 5;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{oops";
  }
  CHECK_THROWS_WITH_AS(quality::tensor_file::load(dir.path() / "json.safetensors"), doctest::Contains("malformed JSON"),
                       std::runtime_error);
}
