// Paths the engine and its programs open, checked for what they are before use: an input must be a regular
// file (a directory, FIFO or device gets a message saying so, and nothing blocks), an output must be a
// regular file or a new name in an existing, writable folder, and every write is checked to the last byte
// and lands atomically (a temporary file in the same folder, flushed, closed and renamed into place: an
// interruption or a full disk leaves the previous file or none, never a short one).
// Errors are std::runtime_error "<role> '<path>': <what is wrong>", role naming the option or file kind.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

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
// or it does not exist; either way its folder exists and is writable (write_file renames a new file into it).
void require_writable_file(const std::filesystem::path& path, std::string_view role);

// A folder the program will write into: created (with its parents) when absent; must be a writable folder.
void prepare_output_folder(const std::filesystem::path& path, std::string_view role);

// Replaces `path` with `bytes`, atomically: the bytes go to a new temporary file "<folder>/.<name>.partial-<pid>-<n>",
// which is written to the last byte, fsync'd and closed (each step checked) and then renamed over `path`; a
// symbolic link is followed (its target is replaced). An existing file's permission bits are kept. Any failure
// (not a regular file, no space, a short write, fsync, close, rename) throws and removes the temporary file,
// leaving the previous `path` untouched. SIGINT, SIGTERM and SIGHUP during the write remove the temporary
// file too (the handler is installed for the write only, where the signal's action is the default one).
void write_file(const std::filesystem::path& path, std::span<const char> bytes, std::string_view role);

// The files a program reads and writes, checked together before any work (every program's outputs are
// declared to one of these): each output passes require_writable_file, and two outputs naming the same file,
// or an output naming one of the inputs, are refused with both roles in the message. Paths are compared as
// files, not as text: an existing file by device and inode (so links and "a/../b" are caught), a new one by
// its folder's canonical path and its name.
class file_plan {
public:
    // A file the program will write (role: the option, e.g. "--json").
    void output(const std::filesystem::path& path, std::string_view role);
    // A file the program reads; a folder adds every regular file below it (at most max_folder_files).
    void input(const std::filesystem::path& path, std::string_view role);
    // Throws std::runtime_error for the first collision.
    void check() const;

    static constexpr std::size_t max_folder_files = 100'000;

private:
    struct entry {
        std::filesystem::path path;
        std::string role;
        std::string identity;  // "dev:ino" of an existing file, else "new:<canonical folder>/<name>"
    };
    std::vector<entry> outputs_, inputs_;
};

// What a path is, in words ("a directory", "a FIFO", ...), for messages; "missing" when it does not exist.
std::string describe_file_type(const std::filesystem::path& path);

}  // namespace sd3
