#pragma once
// Helpers shared by the quality tests: a minimal safetensors writer (so tests can build files by hand)
// and a unique temporary directory.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace test_support {

struct raw_tensor {
  std::string name, dtype;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};

template <class T>
raw_tensor make_tensor(std::string name, std::string dtype, std::vector<std::int64_t> shape, const std::vector<T>& values) {
  raw_tensor t{std::move(name), std::move(dtype), std::move(shape), std::vector<unsigned char>(values.size() * sizeof(T))};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

inline void write_safetensors(const std::filesystem::path& path, const std::vector<raw_tensor>& tensors) {
  std::string header = "{";
  std::size_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    std::string shape;
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (d) shape += ",";
      shape += std::to_string(t.shape[d]);
    }
    if (i) header += ",";
    header += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[" + shape +
              "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.bytes.size()) + "]}";
    offset += t.bytes.size();
  }
  header += "}";
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
}

/// A fresh directory under the system temp dir, removed when the object dies.
class temp_dir {
 public:
  temp_dir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("specdiff-quality-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// Fresh random values each run (the seed is printed by the caller on failure via doctest's INFO).
inline unsigned fresh_seed() { return std::random_device{}(); }

}  // namespace test_support
