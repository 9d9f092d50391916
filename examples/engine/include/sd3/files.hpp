// Paths the engine and its programs open, checked for what they are before use: an input must be a regular
// file (a directory, FIFO or device gets a message saying so, and nothing blocks), an output must be a
// regular file or a new name in an existing, writable folder, and every write is checked to the last byte.
// Errors are std::runtime_error "<role> '<path>': <what is wrong>", role naming the option or file kind.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace sd3 {

// Largest text file (JSON config or description) read whole.
inline constexpr std::size_t max_text_file_bytes = std::size_t{16} << 20;

// An open, regular, readable file: the descriptor (close-on-exec) and its size. Opening never blocks
// (O_NONBLOCK), so a FIFO is reported, not waited on. The caller owns and closes the descriptor.
struct regular_file {
    int fd = -1;
    std::size_t size = 0;
};
regular_file open_regular_file(const std::filesystem::path& path, std::string_view role);

// The whole content of a regular file of at most max_bytes.
std::string read_text_file(const std::filesystem::path& path, std::string_view role,
                           std::size_t max_bytes = max_text_file_bytes);

// A file the program will write later, checked before any work: it is a regular file that may be written,
// or it does not exist and its folder does and is writable.
void require_writable_file(const std::filesystem::path& path, std::string_view role);

// A folder the program will write into: created (with its parents) when absent; must be a writable folder.
void prepare_output_folder(const std::filesystem::path& path, std::string_view role);

// Replaces `path` with `bytes`. Any failure (not a regular file, no space, a short write, close) throws.
void write_file(const std::filesystem::path& path, std::span<const char> bytes, std::string_view role);

// What a path is, in words ("a directory", "a FIFO", ...), for messages; "missing" when it does not exist.
std::string describe_file_type(const std::filesystem::path& path);

}  // namespace sd3
