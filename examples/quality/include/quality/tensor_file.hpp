#pragma once
// A small reader for the .safetensors format (8-byte little-endian header length, JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian data). Used for the classifier weights
// and the test fixtures; it converts on request instead of exposing raw bytes.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace quality {

struct stored_tensor {
  std::string dtype;                // "F32", "F16", "BF16", "F64", "I64", "I32"
  std::vector<std::int64_t> shape;  // empty for a scalar
  std::vector<std::byte> bytes;     // little-endian element data

  [[nodiscard]] std::size_t elements() const;
};

class tensor_file {
 public:
  /// Reads the whole file. Throws std::runtime_error naming the path for a missing, truncated or malformed file.
  static tensor_file load(const std::filesystem::path& path);

  [[nodiscard]] bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// Throws std::runtime_error naming the tensor and the file when absent.
  [[nodiscard]] const stored_tensor& at(const std::string& name) const;
  [[nodiscard]] std::vector<std::string> names() const;
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Element values converted from F32 / F16 / BF16 / F64. Throws for integer dtypes.
  [[nodiscard]] std::vector<float> floats(const std::string& name) const;
  [[nodiscard]] std::vector<double> doubles(const std::string& name) const;
  /// Element values of an I64 / I32 tensor. Throws for floating dtypes.
  [[nodiscard]] std::vector<std::int64_t> ints(const std::string& name) const;
  /// The tensor's shape, after checking it equals `expected` (throws std::runtime_error naming both otherwise).
  const std::vector<std::int64_t>& expect_shape(const std::string& name, const std::vector<std::int64_t>& expected) const;

 private:
  std::filesystem::path path_;
  std::map<std::string, stored_tensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Decodes an IEEE half / bfloat16 bit pattern.
float half_to_float(std::uint16_t bits);
float bfloat16_to_float(std::uint16_t bits);

}  // namespace quality
