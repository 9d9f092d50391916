// Reader (positioned reads of an open file, never a mapping) and small writer for the .safetensors format:
//   [u64 little-endian header length N][N bytes of JSON header][data bytes]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative
// to the start of the data section. Every offset and shape is checked against the file before any byte
// is read, so a damaged file raises std::runtime_error naming the file (and the tensor), never a crash; a file
// truncated while open is reported when a read comes short (a mapping would raise SIGBUS instead). The path
// must be a regular file (a directory, FIFO or device is reported); the JSON header may nest at most
// sd3::max_json_depth levels, hold at most max_safetensors_header_bytes and max_safetensors_header_entries
// entries, and list at most max_safetensors_tensors tensors, all checked in linear time before it is parsed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sd3/json_input.hpp"

namespace sd3 {

// Largest header accepted (the format's reference implementation uses the same bound).
inline constexpr std::uint64_t max_safetensors_header_bytes = 100'000'000;
// Most JSON entries in a header (array elements and object members, at every level) and most tensors: a
// tensor takes 5 to 12 entries; the largest real checkpoints list a few thousand tensors.
inline constexpr std::size_t max_safetensors_header_entries = 16'000'000;
inline constexpr std::size_t max_safetensors_tensors = 1'000'000;
inline constexpr json_limits safetensors_header_limits{static_cast<std::size_t>(max_safetensors_header_bytes), max_json_depth,
                                                       max_safetensors_header_entries};

// Element types this reader understands; a file holding any other (U8, BOOL, F8, ...) is rejected when opened.
// The floating types F32 / F16 / BF16 read as float (the model weights); F64 reads as double and I64 / I32 as
// int64 (test fixtures, class labels). Asking for the wrong kind is an error naming the dtype, never a silent cast.
enum class dtype { f32, f16, bf16, f64, i64, i32 };

std::string_view dtype_name(dtype t) noexcept;
std::size_t dtype_size(dtype t) noexcept;

struct tensor_info {
    std::string name;
    sd3::dtype type = dtype::f32;
    std::vector<std::int64_t> shape;
    std::size_t begin = 0;  // byte offsets into the data section (after the header)
    std::size_t end = 0;
    // Product of the dimensions; 0 when any is 0. Tensors read from a file are bounded by its size; for a
    // hand-built shape whose product does not fit, the result saturates at INT64_MAX (never overflows).
    std::int64_t numel() const noexcept;
};

// One safetensors file, open read-only; tensors are read on request. Movable, not copyable; the file stays
// open as long as the object.
class safetensors_file {
public:
    explicit safetensors_file(const std::filesystem::path& path);
    ~safetensors_file();
    safetensors_file(safetensors_file&& other) noexcept;
    safetensors_file& operator=(safetensors_file&& other) noexcept;
    safetensors_file(const safetensors_file&) = delete;
    safetensors_file& operator=(const safetensors_file&) = delete;

    const std::filesystem::path& path() const noexcept { return path_; }
    bool contains(std::string_view name) const;
    // Throws std::runtime_error naming the file and the tensor when it is absent.
    const tensor_info& info(std::string_view name) const;
    const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }  // sorted by name
    const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

    // An F32 / F16 / BF16 tensor converted to float32 (F64 and the integer types throw: see below).
    std::vector<float> read(std::string_view name) const;
    // read(), then every value checked: a NaN or infinity throws std::runtime_error naming the file, the
    // tensor, the element and its value. Loaders of weights use this, so a damaged weight is found at load.
    std::vector<float> read_finite(std::string_view name) const;
    // Same as read, into caller memory; out.size() must equal the element count.
    void read_into(std::string_view name, std::span<float> out) const;
    // A floating tensor (F64, or F32 / F16 / BF16 widened exactly) as double; integer types throw.
    std::vector<double> read_doubles(std::string_view name) const;
    // An I64 / I32 tensor as int64; floating types throw.
    std::vector<std::int64_t> read_ints(std::string_view name) const;
    // The raw little-endian bytes of the tensor (a copy).
    std::vector<std::byte> raw(std::string_view name) const;

private:
    void parse();
    void close_file() noexcept;
    // Exactly `bytes` bytes at `offset` of the file; a short read (the file shrank) throws.
    void read_at(std::size_t offset, std::byte* out, std::size_t bytes) const;
    std::vector<std::byte> data_bytes(const tensor_info& t) const;

    std::filesystem::path path_;
    int fd_ = -1;
    std::size_t size_ = 0;
    std::size_t data_start_ = 0;
    std::vector<tensor_info> tensors_;
    std::map<std::string, std::string> metadata_;
};

// A float tensor to save. Values are converted to `type` (round to nearest even for f16 / bf16).
struct tensor_to_save {
    std::string name;
    std::vector<std::int64_t> shape;
    std::span<const float> values;
    sd3::dtype type = dtype::f32;
};

// Writes a safetensors file (tensors in the order given, tightly packed). Throws std::invalid_argument when
// a tensor's value count disagrees with its shape, a name repeats or the type is not F32 / F16 / BF16,
// std::runtime_error on I/O failure.
void save_safetensors(const std::filesystem::path& path, std::span<const tensor_to_save> tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Scalar conversions used by the reader and writer (exposed for tests).
float half_to_float(std::uint16_t h) noexcept;
float bfloat16_to_float(std::uint16_t b) noexcept;
std::uint16_t float_to_half(float f) noexcept;
std::uint16_t float_to_bfloat16(float f) noexcept;

}  // namespace sd3
