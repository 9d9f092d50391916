#include "sd3/files.hpp"

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sd3/errors.hpp"

namespace sd3 {
namespace {

[[noreturn]] void fail(std::string_view role, const std::filesystem::path& path, const std::string& what) {
    throw std::runtime_error(message(role, " '", path_excerpt(path.string()), "': ", what));
}

std::string type_of_mode(mode_t mode) {
    if (S_ISREG(mode)) return "a regular file";
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

// Closes fd on scope exit unless released.
struct fd_guard {
    int fd;
    ~fd_guard() {
        if (fd >= 0) ::close(fd);
    }
    int release() { return std::exchange(fd, -1); }
};

}  // namespace

std::string describe_file_type(const std::filesystem::path& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return errno == ENOENT ? "missing" : std::strerror(errno);
    return type_of_mode(st.st_mode);
}

regular_file open_regular_file(const std::filesystem::path& path, std::string_view role) {
    fd_guard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)};
    if (fd.fd < 0) fail(role, path, message("cannot open: ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd.fd, &st) != 0) fail(role, path, message("cannot stat: ", std::strerror(errno)));
    if (!S_ISREG(st.st_mode)) fail(role, path, message("is ", type_of_mode(st.st_mode), ", expected a regular file"));
    // Reads of a regular file ignore O_NONBLOCK; it only kept the open from waiting on a FIFO's writer.
    return {fd.release(), static_cast<std::size_t>(st.st_size)};
}

std::string read_text_file(const std::filesystem::path& path, std::string_view role, std::size_t max_bytes) {
    const auto file = open_regular_file(path, role);
    fd_guard fd{file.fd};
    if (file.size > max_bytes)
        fail(role, path, message("is ", file.size, " bytes, more than the ", max_bytes, " bytes a text input may have"));
    if (file.size == 0) fail(role, path, "is empty");
    std::string text(file.size, '\0');
    std::size_t done = 0;
    while (done < text.size()) {
        const ssize_t got = ::read(fd.fd, text.data() + done, text.size() - done);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) fail(role, path, message("cannot read: ", std::strerror(errno)));
        if (got == 0) break;  // the file shrank while being read
        done += static_cast<std::size_t>(got);
    }
    text.resize(done);
    return text;
}

void require_writable_file(const std::filesystem::path& path, std::string_view role) {
    if (path.empty()) fail(role, path, "is empty, expected a file name");
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0) {
        if (!S_ISREG(st.st_mode)) fail(role, path, message("is ", type_of_mode(st.st_mode), ", expected a regular file"));
        if (::access(path.c_str(), W_OK) != 0) fail(role, path, message("cannot be written: ", std::strerror(errno)));
        return;
    }
    if (errno != ENOENT && errno != ENOTDIR) fail(role, path, message("cannot stat: ", std::strerror(errno)));
    const auto folder = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
    if (::stat(folder.c_str(), &st) != 0)
        fail(role, path, message("its folder '", path_excerpt(folder.string()), "' does not exist"));
    if (!S_ISDIR(st.st_mode)) fail(role, path, message("its parent '", path_excerpt(folder.string()), "' is ", type_of_mode(st.st_mode)));
    if (::access(folder.c_str(), W_OK | X_OK) != 0)
        fail(role, path, message("its folder '", path_excerpt(folder.string()), "' is not writable: ", std::strerror(errno)));
}

void prepare_output_folder(const std::filesystem::path& path, std::string_view role) {
    if (path.empty()) fail(role, path, "is empty, expected a folder");
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        std::error_code ec;
        std::filesystem::create_directories(path, ec);
        if (ec) fail(role, path, message("cannot create the folder: ", ec.message()));
        if (::stat(path.c_str(), &st) != 0) fail(role, path, message("cannot stat: ", std::strerror(errno)));
    }
    if (!S_ISDIR(st.st_mode)) fail(role, path, message("is ", type_of_mode(st.st_mode), ", expected a folder"));
    if (::access(path.c_str(), W_OK | X_OK) != 0) fail(role, path, message("folder is not writable: ", std::strerror(errno)));
}

void write_file(const std::filesystem::path& path, std::span<const char> bytes, std::string_view role) {
    fd_guard fd{::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0644)};
    if (fd.fd < 0) fail(role, path, message("cannot open for writing: ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd.fd, &st) != 0) fail(role, path, message("cannot stat: ", std::strerror(errno)));
    // Checked on the open descriptor (not the name) and before truncating, so a device is never written.
    if (!S_ISREG(st.st_mode)) fail(role, path, message("is ", type_of_mode(st.st_mode), ", expected a regular file"));
    if (::ftruncate(fd.fd, 0) != 0) fail(role, path, message("cannot truncate: ", std::strerror(errno)));
    std::size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t put = ::write(fd.fd, bytes.data() + done, bytes.size() - done);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) fail(role, path, message("write failed after ", done, " of ", bytes.size(), " bytes: ", std::strerror(errno)));
        done += static_cast<std::size_t>(put);
    }
    if (::close(fd.release()) != 0) fail(role, path, message("close failed: ", std::strerror(errno)));
}

}  // namespace sd3
