#include "sd3/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <stdexcept>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/resources.hpp"

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; big-endian hosts unsupported");

namespace sd3 {
namespace {

constexpr std::string_view file_role = "safetensors file";

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& what) {
    throw std::runtime_error(message(file_role, " '", path_excerpt(file.string()), "': ", what));
}
[[noreturn]] void fail(const std::filesystem::path& file, std::string_view tensor, const std::string& what) {
    throw std::runtime_error(message(file_role, " '", path_excerpt(file.string()), "', tensor '", excerpt(tensor), "': ", what));
}

bool parse_dtype(std::string_view s, dtype& out) {
    if (s == "F32") { out = dtype::f32; return true; }
    if (s == "F16") { out = dtype::f16; return true; }
    if (s == "BF16") { out = dtype::bf16; return true; }
    if (s == "F64") { out = dtype::f64; return true; }
    if (s == "I64") { out = dtype::i64; return true; }
    if (s == "I32") { out = dtype::i32; return true; }
    return false;
}

bool is_float(dtype t) noexcept { return t == dtype::f32 || t == dtype::f16 || t == dtype::bf16; }
bool is_integer(dtype t) noexcept { return t == dtype::i64 || t == dtype::i32; }

template <class T>
T load_le(const std::byte* p) noexcept {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

}  // namespace

std::string_view dtype_name(dtype t) noexcept {
    switch (t) {
        case dtype::f32: return "F32";
        case dtype::f16: return "F16";
        case dtype::bf16: return "BF16";
        case dtype::f64: return "F64";
        case dtype::i64: return "I64";
        case dtype::i32: return "I32";
    }
    return "?";
}

std::size_t dtype_size(dtype t) noexcept {
    switch (t) {
        case dtype::f16:
        case dtype::bf16: return 2;
        case dtype::f32:
        case dtype::i32: return 4;
        case dtype::f64:
        case dtype::i64: return 8;
    }
    return 0;
}

std::int64_t tensor_info::numel() const noexcept {
    // In unsigned arithmetic with saturation: a shape may hold huge dimensions next to a zero (a legal empty
    // tensor), and for a tensor read from a file parse() has already bounded the product by the file size.
    for (auto d : shape)
        if (d <= 0) return 0;
    std::size_t n = 1;
    for (auto d : shape) n = saturating_mul(n, static_cast<std::size_t>(d));
    constexpr auto most = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
    return static_cast<std::int64_t>(std::min(n, most));
}

float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = (h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / nan
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24, exact in float
        const float v = static_cast<float>(mant) * 0x1p-24f;
        return sign ? -v : v;
    }
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

float bfloat16_to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t{b} << 16); }

std::uint16_t float_to_bfloat16(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet nan
    const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<std::uint16_t>((u + rounding) >> 16);
}

std::uint16_t float_to_half(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;                 // nan
    if (a >= 0x477ff000u) return sign | 0x7c00u;                // overflow (>= 65520) -> inf
    if (a < 0x38800000u) {                                       // below the smallest normal half
        // subnormal: value / 2^-24 rounded to nearest even; float arithmetic does the rounding exactly
        const float scaled = std::bit_cast<float>(a) * 0x1p24f;
        return sign | static_cast<std::uint16_t>(std::nearbyint(scaled));
    }
    const std::uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<std::uint16_t>((rounded - (112u << 23)) >> 13);
}

safetensors_file::safetensors_file(const std::filesystem::path& path) : path_(path) {
    // Read, not mapped: a file truncated while open then gives a short read, reported by read_at, where a
    // mapping would give SIGBUS (issue 28).
    const auto file = open_regular_file(path, file_role);  // a directory, FIFO or device is refused here
    fd_ = file.fd;
    size_ = file.size;
    try {
        if (size_ < 8) fail(path_, message("truncated: ", size_, " bytes, shorter than the 8-byte header length"));
        parse();
    } catch (...) {
        close_file();
        throw;
    }
}

safetensors_file::~safetensors_file() { close_file(); }

void safetensors_file::close_file() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

void safetensors_file::read_at(std::size_t offset, std::byte* out, std::size_t bytes) const {
    std::size_t done = 0;
    while (done < bytes) {
        const ssize_t got = ::pread(fd_, out + done, bytes - done, static_cast<off_t>(offset + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) fail(path_, message("cannot read ", bytes, " bytes at offset ", offset, ": ", std::strerror(errno)));
        if (got == 0)
            fail(path_, message("truncated while open: it ends before byte ", offset + bytes, " (it had ", size_,
                                " bytes when opened)"));
        done += static_cast<std::size_t>(got);
    }
}

std::vector<std::byte> safetensors_file::data_bytes(const tensor_info& t) const {
    std::vector<std::byte> bytes(t.end - t.begin);
    if (!bytes.empty()) read_at(data_start_ + t.begin, bytes.data(), bytes.size());
    return bytes;
}

safetensors_file::safetensors_file(safetensors_file&& o) noexcept
    : path_(std::move(o.path_)), fd_(std::exchange(o.fd_, -1)), size_(o.size_), data_start_(o.data_start_),
      tensors_(std::move(o.tensors_)), metadata_(std::move(o.metadata_)) {}

safetensors_file& safetensors_file::operator=(safetensors_file&& o) noexcept {
    if (this != &o) {
        close_file();
        path_ = std::move(o.path_);
        fd_ = std::exchange(o.fd_, -1);
        size_ = o.size_;
        data_start_ = o.data_start_;
        tensors_ = std::move(o.tensors_);
        metadata_ = std::move(o.metadata_);
    }
    return *this;
}

void safetensors_file::parse() {
    std::uint64_t header_len = 0;
    read_at(0, reinterpret_cast<std::byte*>(&header_len), 8);
    if (header_len > size_ - 8)
        fail(path_, message("header length ", header_len, " runs past the end of the file (", size_, " bytes)"));
    if (header_len > max_safetensors_header_bytes)
        fail(path_, message("header length ", header_len, " exceeds the limit of ", max_safetensors_header_bytes, " bytes"));
    data_start_ = 8 + static_cast<std::size_t>(header_len);
    const std::size_t data_size = size_ - data_start_;

    std::string text(static_cast<std::size_t>(header_len), '\0');
    read_at(8, reinterpret_cast<std::byte*>(text.data()), text.size());
    nlohmann::json header;
    try {
        header = parse_json(text, safetensors_header_limits);
    } catch (const std::runtime_error& e) {
        fail(path_, message("header is ", e.what()));
    }
    if (!header.is_object()) fail(path_, "header is not a JSON object");
    if (header.size() > max_safetensors_tensors + 1)  // + __metadata__
        fail(path_, message("header lists ", header.size(), " entries, more than the limit of ", max_safetensors_tensors, " tensors"));
    tensors_.reserve(header.size());

    for (auto it = header.begin(); it != header.end(); ++it) {
        const std::string& name = it.key();
        const auto& entry = it.value();
        if (name == "__metadata__") {
            if (!entry.is_object()) fail(path_, "__metadata__ is not an object");
            for (auto m = entry.begin(); m != entry.end(); ++m) {
                if (!m.value().is_string()) fail(path_, message("__metadata__ value for '", excerpt(m.key()), "' is not a string"));
                metadata_[m.key()] = m.value().get<std::string>();
            }
            continue;
        }
        if (!entry.is_object()) fail(path_, name, "entry is not an object");
        tensor_info t;
        t.name = name;

        const auto dt = entry.find("dtype");
        if (dt == entry.end() || !dt->is_string()) fail(path_, name, "missing or non-string 'dtype'");
        if (!parse_dtype(dt->get<std::string>(), t.type))
            fail(path_, name, message("unsupported dtype '", excerpt(dt->get<std::string>()), "' (supported: F32, F16, BF16, F64, I64, I32)"));

        const auto sh = entry.find("shape");
        if (sh == entry.end() || !sh->is_array()) fail(path_, name, "missing or non-array 'shape'");
        std::uint64_t numel = 1;
        bool overflow = false;
        for (const auto& d : *sh) {
            if (!d.is_number_unsigned()) fail(path_, name, message("shape entry ", json_excerpt(d), " is not a non-negative integer"));
            const std::uint64_t v = d.get<std::uint64_t>();
            if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) overflow = true;
            else if (v != 0 && numel > std::numeric_limits<std::uint64_t>::max() / v) overflow = true;
            else numel *= v;
            t.shape.push_back(static_cast<std::int64_t>(v));
        }
        if (overflow || numel > data_size / dtype_size(t.type) + 1)
            fail(path_, name, message("shape ", json_excerpt(*sh), " describes more elements than the file can hold"));

        const auto off = entry.find("data_offsets");
        if (off == entry.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
            !(*off)[1].is_number_unsigned())
            fail(path_, name, "missing or malformed 'data_offsets' (want [begin, end])");
        const std::uint64_t begin = (*off)[0].get<std::uint64_t>();
        const std::uint64_t end = (*off)[1].get<std::uint64_t>();
        if (begin > end)
            fail(path_, name, message("data_offsets [", begin, ", ", end, "] are reversed"));
        if (end > data_size)
            fail(path_, name, message("data_offsets [", begin, ", ", end, "] lie outside the data section (", data_size, " bytes)"));
        const std::uint64_t want = numel * dtype_size(t.type);
        if (end - begin != want)
            fail(path_, name, message("shape ", json_excerpt(*sh), " with dtype ", dtype_name(t.type), " needs ", want,
                                      " bytes but data_offsets span ", end - begin));
        t.begin = static_cast<std::size_t>(begin);
        t.end = static_cast<std::size_t>(end);
        tensors_.push_back(std::move(t));
    }

    // Overlap check: sort by start offset; every non-empty tensor must start at or after the previous end.
    std::vector<const tensor_info*> by_offset;
    for (const auto& t : tensors_)
        if (t.end > t.begin) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
        if (by_offset[i]->begin < by_offset[i - 1]->end)
            fail(path_, by_offset[i]->name, message("data overlaps tensor '", excerpt(by_offset[i - 1]->name), "'"));

    std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
}

bool safetensors_file::contains(std::string_view name) const {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const tensor_info& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name;
}

const tensor_info& safetensors_file::info(std::string_view name) const {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const tensor_info& t, std::string_view n) { return t.name < n; });
    if (it == tensors_.end() || it->name != name) fail(path_, name, "no such tensor");
    return *it;
}

std::vector<std::byte> safetensors_file::raw(std::string_view name) const { return data_bytes(info(name)); }

std::vector<float> safetensors_file::read(std::string_view name) const {
    std::vector<float> out(static_cast<std::size_t>(info(name).numel()));
    read_into(name, out);
    return out;
}

void safetensors_file::read_into(std::string_view name, std::span<float> out) const {
    const auto& t = info(name);
    if (!is_float(t.type))
        fail(path_, name, message("dtype ", dtype_name(t.type), " cannot be read as float (",
                                  is_integer(t.type) ? "use read_ints" : "use read_doubles", ")"));
    const auto n = static_cast<std::size_t>(t.numel());
    if (out.size() != n)
        fail(path_, name, message("destination holds ", out.size(), " floats, tensor has ", n));
    if (n == 0) return;  // empty tensors: nothing to read
    if (t.type == dtype::f32) {
        read_at(data_start_ + t.begin, reinterpret_cast<std::byte*>(out.data()), n * 4);
        return;
    }
    const auto bytes = data_bytes(t);
    const std::byte* src = bytes.data();
    switch (t.type) {
        case dtype::f32:
            break;  // read above
        case dtype::f16:
            for (std::size_t i = 0; i < n; ++i) {
                std::uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                out[i] = half_to_float(h);
            }
            break;
        case dtype::bf16:
            for (std::size_t i = 0; i < n; ++i) {
                std::uint16_t b;
                std::memcpy(&b, src + 2 * i, 2);
                out[i] = bfloat16_to_float(b);
            }
            break;
        case dtype::f64:
        case dtype::i64:
        case dtype::i32:
            break;  // rejected above
    }
}

std::vector<float> safetensors_file::read_finite(std::string_view name) const {
    auto values = read(name);
    const auto bad = std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
    if (bad != values.end())
        fail(path_, name, message("element ", bad - values.begin(), " of ", values.size(), " is ", *bad,
                                  " (weights must be finite)"));
    return values;
}

std::vector<double> safetensors_file::read_doubles(std::string_view name) const {
    const auto& t = info(name);
    if (is_integer(t.type))
        fail(path_, name, message("dtype ", dtype_name(t.type), " is an integer type, asked for floating values"));
    if (t.type != dtype::f64) {
        const auto f = read(name);  // every float, half and bfloat16 value is exact in double
        return {f.begin(), f.end()};
    }
    std::vector<double> out(static_cast<std::size_t>(t.numel()));
    const auto bytes = data_bytes(t);
    const std::byte* src = bytes.data();
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = load_le<double>(src + 8 * i);
    return out;
}

std::vector<std::int64_t> safetensors_file::read_ints(std::string_view name) const {
    const auto& t = info(name);
    if (!is_integer(t.type))
        fail(path_, name, message("dtype ", dtype_name(t.type), " is a floating type, asked for integer values"));
    std::vector<std::int64_t> out(static_cast<std::size_t>(t.numel()));
    const auto bytes = data_bytes(t);
    const std::byte* src = bytes.data();
    for (std::size_t i = 0; i < out.size(); ++i)
        out[i] = t.type == dtype::i64 ? load_le<std::int64_t>(src + 8 * i) : load_le<std::int32_t>(src + 4 * i);
    return out;
}

void save_safetensors(const std::filesystem::path& path, std::span<const tensor_to_save> tensors,
                      const std::map<std::string, std::string>& metadata) {
    auto bad = [](const tensor_to_save& t, const auto&... what) {
        throw std::invalid_argument(message("save_safetensors: tensor '", excerpt(t.name), "' ", what...));
    };
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::set<std::string> seen;
    std::size_t offset = 0;
    for (const auto& t : tensors) {
        if (!is_float(t.type)) bad(t, "has dtype ", dtype_name(t.type), "; the writer stores F32, F16 or BF16 only");
        if (t.name == "__metadata__" || !seen.insert(t.name).second) bad(t, "has a reserved or repeated name");
        std::size_t numel = 1;
        for (auto d : t.shape) {
            if (d < 0) bad(t, "has negative dimension ", d);
            numel = saturating_mul(numel, static_cast<std::size_t>(d));
        }
        if (numel != t.values.size()) bad(t, "shape holds ", numel == size_overflow ? std::string("more than 2^64") : std::to_string(numel),
                                          " values but ", t.values.size(), " were given");
        const std::size_t bytes = t.values.size() * dtype_size(t.type);
        header[t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
        offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned, as the reference writer does
    std::vector<char> file(8 + text.size() + offset);
    const std::uint64_t len = text.size();
    std::memcpy(file.data(), &len, 8);
    std::memcpy(file.data() + 8, text.data(), text.size());
    char* out = file.data() + 8 + text.size();
    for (const auto& t : tensors) {
        if (t.type == dtype::f32) {
            if (!t.values.empty()) std::memcpy(out, t.values.data(), t.values.size() * 4);
            out += t.values.size() * 4;
            continue;
        }
        for (const float v : t.values) {
            const std::uint16_t h = t.type == dtype::f16 ? float_to_half(v) : float_to_bfloat16(v);
            std::memcpy(out, &h, 2);
            out += 2;
        }
    }
    write_file(path, file, "save_safetensors: output file");
}

}  // namespace sd3
