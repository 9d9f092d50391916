#include "quality/tensor_file.hpp"

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace quality {
namespace {

static_assert(std::endian::native == std::endian::little, "the safetensors reader assumes a little-endian host");

std::size_t dtype_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64") return 8;
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "F16" || dtype == "BF16") return 2;
  return 0;
}

template <class T>
T read_as(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void read_entries(const nlohmann::json& json, const std::vector<std::byte>& data, const std::filesystem::path& path,
                  std::map<std::string, stored_tensor>& tensors, std::map<std::string, std::string>& metadata);

}  // namespace

std::size_t stored_tensor::elements() const {
  std::size_t n = 1;
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

float half_to_float(std::uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

float bfloat16_to_float(std::uint16_t bits) { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }

tensor_file tensor_file::load(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("tensor_file: cannot open '" + path.string() + "'");
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<std::uint64_t>(in.tellg());
  in.seekg(0);
  std::uint64_t header_size = 0;
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(&header_size), 8) || header_size > file_size - 8) {
    throw std::runtime_error("tensor_file: '" + path.string() + "' is too short for its header (file size " +
                             std::to_string(file_size) + ", header length " + std::to_string(header_size) + ")");
  }
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  const std::uint64_t data_size = file_size - 8 - header_size;
  std::vector<std::byte> data(data_size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data_size));
  if (!in) throw std::runtime_error("tensor_file: failed reading '" + path.string() + "'");

  tensor_file file;
  file.path_ = path;
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("tensor_file: '" + path.string() + "' has a malformed JSON header: " + e.what());
  }
  try {
    read_entries(json, data, path, file.tensors_, file.metadata_);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("tensor_file: '" + path.string() + "' has a malformed header entry: " + e.what());
  }
  return file;
}

namespace {

void read_entries(const nlohmann::json& json, const std::vector<std::byte>& data, const std::filesystem::path& path,
                  std::map<std::string, stored_tensor>& tensors_, std::map<std::string, std::string>& metadata_) {
  const std::uint64_t data_size = data.size();
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, v] : entry.items()) metadata_[k] = v.get<std::string>();
      continue;
    }
    stored_tensor t;
    t.dtype = entry.at("dtype").get<std::string>();
    t.shape = entry.at("shape").get<std::vector<std::int64_t>>();
    const auto offsets = entry.at("data_offsets").get<std::vector<std::uint64_t>>();
    const std::size_t element = dtype_size(t.dtype);
    if (element == 0) throw std::runtime_error("tensor_file: '" + path.string() + "' tensor '" + name +
                                               "' has unsupported dtype " + t.dtype);
    for (auto d : t.shape)
      if (d < 0) throw std::runtime_error("tensor_file: tensor '" + name + "' has negative shape " + shape_text(t.shape));
    if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size ||
        offsets[1] - offsets[0] != t.elements() * element) {
      throw std::runtime_error("tensor_file: '" + path.string() + "' tensor '" + name +
                               "' has byte range inconsistent with dtype " + t.dtype + " shape " +
                               shape_text(t.shape) + " (data size " + std::to_string(data_size) + ")");
    }
    t.bytes.assign(data.begin() + static_cast<std::ptrdiff_t>(offsets[0]),
                   data.begin() + static_cast<std::ptrdiff_t>(offsets[1]));
    tensors_.emplace(name, std::move(t));
  }
}

}  // namespace

const stored_tensor& tensor_file::at(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::runtime_error("tensor_file: no tensor '" + name + "' in '" + path_.string() + "'");
  return it->second;
}

std::vector<std::string> tensor_file::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : tensors_) out.push_back(name);
  return out;
}

std::vector<double> tensor_file::doubles(const std::string& name) const {
  const auto& t = at(name);
  std::vector<double> out(t.elements());
  const std::byte* p = t.bytes.data();
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (t.dtype == "F32") out[i] = read_as<float>(p + 4 * i);
    else if (t.dtype == "F64") out[i] = read_as<double>(p + 8 * i);
    else if (t.dtype == "F16") out[i] = half_to_float(read_as<std::uint16_t>(p + 2 * i));
    else if (t.dtype == "BF16") out[i] = bfloat16_to_float(read_as<std::uint16_t>(p + 2 * i));
    else throw std::runtime_error("tensor_file: tensor '" + name + "' has integer dtype " + t.dtype +
                                  ", asked for floating values");
  }
  return out;
}

std::vector<float> tensor_file::floats(const std::string& name) const {
  const auto d = doubles(name);
  return {d.begin(), d.end()};
}

std::vector<std::int64_t> tensor_file::ints(const std::string& name) const {
  const auto& t = at(name);
  std::vector<std::int64_t> out(t.elements());
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (t.dtype == "I64") out[i] = read_as<std::int64_t>(t.bytes.data() + 8 * i);
    else if (t.dtype == "I32") out[i] = read_as<std::int32_t>(t.bytes.data() + 4 * i);
    else throw std::runtime_error("tensor_file: tensor '" + name + "' has floating dtype " + t.dtype +
                                  ", asked for integer values");
  }
  return out;
}

const std::vector<std::int64_t>& tensor_file::expect_shape(const std::string& name,
                                                           const std::vector<std::int64_t>& expected) const {
  const auto& t = at(name);
  if (t.shape != expected) {
    throw std::runtime_error("tensor_file: tensor '" + name + "' in '" + path_.string() + "' has shape " +
                             shape_text(t.shape) + ", expected " + shape_text(expected));
  }
  return t.shape;
}

}  // namespace quality
