// Generators of hostile inputs, shared by the hostile suite and the model-folder generator: everything is
// written from a few lines of code at test time (no stored fixtures), deterministically.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <sys/stat.h>

#include "sd3/safetensors.hpp"

namespace hostile {

namespace fs = std::filesystem;

// `depth` nested JSON arrays around `inner`: "[[[inner]]]".
inline std::string nested_arrays(std::size_t depth, std::string_view inner = "1") {
    return std::string(depth, '[') + std::string(inner) + std::string(depth, ']');
}

// A safetensors file whose header is exactly `header` (no validation), followed by `data_bytes` zero bytes.
inline void write_raw_safetensors(const fs::path& path, std::string_view header, std::size_t data_bytes = 0) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    const std::uint64_t len = header.size();
    f.write(reinterpret_cast<const char*>(&len), 8);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    const std::string zeros(data_bytes, '\0');
    f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
    if (!f) throw std::runtime_error("hostile: cannot write " + path.string());
}

inline void write_text(const fs::path& path, std::string_view text) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    if (!f) throw std::runtime_error("hostile: cannot write " + path.string());
}

inline std::string read_text(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A fresh, empty folder (removed first if present).
inline fs::path fresh_dir(const fs::path& path) {
    fs::remove_all(path);
    fs::create_directories(path);
    return path;
}

// Mirrors the files of `from` into `to` as symbolic links (folders are recreated), so a variant of a model
// folder costs one changed file.
inline void link_tree(const fs::path& from, const fs::path& to) {
    fs::create_directories(to);
    for (const auto& entry : fs::directory_iterator(from)) {
        const auto target = to / entry.path().filename();
        if (entry.is_directory()) link_tree(entry.path(), target);
        else fs::create_symlink(fs::absolute(entry.path()), target);
    }
}

// Replaces a symlink (or file) by a real copy, so it can be changed without touching the original.
inline void make_private_copy(const fs::path& path) {
    const auto source = fs::is_symlink(path) ? fs::read_symlink(path) : path;
    const auto temp = path.string() + ".copy";
    fs::copy_file(source, temp, fs::copy_options::overwrite_existing);
    fs::remove(path);
    fs::rename(temp, path);
}

// Overwrites element `index` of F32 tensor `tensor` in the safetensors file `path` with `value`.
inline void poke_float(const fs::path& path, const std::string& tensor, std::size_t index, float value) {
    std::uint64_t offset = 0;
    {
        const sd3::safetensors_file file(path);
        const auto& info = file.info(tensor);
        if (info.type != sd3::dtype::f32 || index >= static_cast<std::size_t>(info.numel()))
            throw std::runtime_error("hostile: cannot poke " + tensor);
        std::ifstream in(path, std::ios::binary);
        std::uint64_t header = 0;
        in.read(reinterpret_cast<char*>(&header), 8);
        offset = 8 + header + info.begin + 4 * index;
    }
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(reinterpret_cast<const char*>(&value), 4);
    if (!f) throw std::runtime_error("hostile: cannot poke " + path.string());
}

inline void make_fifo(const fs::path& path) {
    fs::remove(path);
    if (::mkfifo(path.c_str(), 0600) != 0) throw std::runtime_error("hostile: mkfifo " + path.string());
}

}  // namespace hostile
