#include "sd3/files.hpp"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <mutex>
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
    } else if (errno != ENOENT && errno != ENOTDIR) {
        fail(role, path, message("cannot stat: ", std::strerror(errno)));
    }
    // The file is replaced by a rename from its folder (write_file), so the folder must be writable too.
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

namespace {

// Temporary files being written, for the signal handler: a fixed table of C strings published atomically,
// so the handler (async-signal-safe: it only reads the table, calls unlink and raise) can remove them.
constexpr int max_pending = 16;
std::atomic<const char*> pending[max_pending];
std::atomic<int> writers{0};
struct sigaction previous[3];
constexpr int cleanup_signals[3] = {SIGINT, SIGTERM, SIGHUP};
std::mutex handler_mutex;
bool handler_installed[3] = {false, false, false};

extern "C" void remove_pending_and_die(int signal) {
    for (auto& p : pending)
        if (const char* name = p.load()) ::unlink(name);
    ::signal(signal, SIG_DFL);
    ::raise(signal);
}

// Registers a temporary file for the lifetime of the object; installs the handler while any is registered,
// for each signal whose action is the default one (a program that handles a signal itself keeps its handler).
class pending_file {
public:
    explicit pending_file(const std::string& name) : name_(name) {
        {
            const std::lock_guard lock(handler_mutex);
            if (writers++ == 0)
                for (int i = 0; i < 3; ++i) {
                    struct sigaction now {};
                    if (::sigaction(cleanup_signals[i], nullptr, &now) != 0 || now.sa_handler != SIG_DFL) continue;
                    struct sigaction act {};
                    act.sa_handler = remove_pending_and_die;
                    sigemptyset(&act.sa_mask);
                    handler_installed[i] = ::sigaction(cleanup_signals[i], &act, &previous[i]) == 0;
                }
        }
        for (auto& p : pending) {
            const char* expected = nullptr;
            if (p.compare_exchange_strong(expected, name_.c_str())) {
                slot_ = &p;
                break;
            }
        }
    }
    ~pending_file() {
        if (slot_) slot_->store(nullptr);
        const std::lock_guard lock(handler_mutex);
        if (--writers == 0)
            for (int i = 0; i < 3; ++i)
                if (std::exchange(handler_installed[i], false)) ::sigaction(cleanup_signals[i], &previous[i], nullptr);
    }
    pending_file(const pending_file&) = delete;
    pending_file& operator=(const pending_file&) = delete;

private:
    std::string name_;
    std::atomic<const char*>* slot_ = nullptr;
};

std::atomic<unsigned> temp_counter{0};

}  // namespace

void write_file(const std::filesystem::path& requested, std::span<const char> bytes, std::string_view role) {
    if (requested.empty()) fail(role, requested, "is empty, expected a file name");
    // A symbolic link is followed: its target is the file replaced.
    std::filesystem::path path = requested;
    std::error_code ec;
    if (std::filesystem::is_symlink(requested, ec)) {
        const auto target = std::filesystem::weakly_canonical(requested, ec);
        if (ec) fail(role, requested, message("cannot resolve the link: ", ec.message()));
        path = target;
    }
    struct stat st {};
    mode_t mode = 0644;
    bool existed = false;
    if (::stat(path.c_str(), &st) == 0) {
        // Checked before anything is created: a device or FIFO is never replaced by a file.
        if (!S_ISREG(st.st_mode)) fail(role, requested, message("is ", type_of_mode(st.st_mode), ", expected a regular file"));
        mode = st.st_mode & 07777;
        existed = true;
    } else if (errno != ENOENT) {
        fail(role, requested, message("cannot stat: ", std::strerror(errno)));
    }
    const auto folder = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
    const std::string temp =
        (folder / message(".", path.filename().string(), ".partial-", ::getpid(), "-", temp_counter++)).string();
    const pending_file guard(temp);
    fd_guard fd{::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0600)};
    if (fd.fd < 0) fail(role, requested, message("cannot open for writing (a temporary file in its folder): ", std::strerror(errno)));
    bool done_ok = false;
    struct remove_unless_done {
        const std::string& name;
        const bool& ok;
        ~remove_unless_done() {
            if (!ok) ::unlink(name.c_str());
        }
    } cleanup{temp, done_ok};
    // The new file gets the old one's permission bits, else the usual 0644 under the umask.
    if (!existed) {
        const mode_t mask = ::umask(0);
        ::umask(mask);
        mode = 0644 & ~mask;
    }
    if (::fchmod(fd.fd, mode) != 0) fail(role, requested, message("cannot set permissions: ", std::strerror(errno)));
    std::size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t put = ::write(fd.fd, bytes.data() + done, bytes.size() - done);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0)
            fail(role, requested, message("write failed after ", done, " of ", bytes.size(), " bytes: ", std::strerror(errno),
                                          "; the previous file is unchanged"));
        done += static_cast<std::size_t>(put);
    }
    if (::fsync(fd.fd) != 0 && errno != EINVAL && errno != EROFS)  // EINVAL: a file system without fsync
        fail(role, requested, message("fsync failed: ", std::strerror(errno), "; the previous file is unchanged"));
    if (::close(fd.release()) != 0) fail(role, requested, message("close failed: ", std::strerror(errno), "; the previous file is unchanged"));
    if (::rename(temp.c_str(), path.c_str()) != 0) fail(role, requested, message("cannot rename the written file into place: ", std::strerror(errno)));
    done_ok = true;
    // The rename itself is made durable by syncing the folder (best effort: some file systems refuse it).
    if (const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
        (void)::fsync(dir);
        ::close(dir);
    }
}

namespace {

std::string file_identity(const std::filesystem::path& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0) return message(st.st_dev, ":", st.st_ino);
    std::error_code ec;
    const auto folder = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
    auto canonical = std::filesystem::weakly_canonical(folder, ec);
    if (ec) canonical = std::filesystem::absolute(folder, ec);
    return "new:" + (canonical / path.filename()).lexically_normal().string();
}

}  // namespace

void file_plan::output(const std::filesystem::path& path, std::string_view role) {
    require_writable_file(path, role);
    outputs_.push_back({path, std::string(role), file_identity(path)});
}

void file_plan::input(const std::filesystem::path& path, std::string_view role) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
        std::size_t n = 0;
        for (auto it = std::filesystem::recursive_directory_iterator(path, std::filesystem::directory_options::skip_permission_denied, ec);
             !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
            if (!it->is_regular_file(ec)) continue;
            if (++n > max_folder_files)
                fail(role, path, message("holds more than ", max_folder_files, " files"));
            inputs_.push_back({it->path(), std::string(role), file_identity(it->path())});
        }
        return;
    }
    if (std::filesystem::exists(path, ec)) inputs_.push_back({path, std::string(role), file_identity(path)});
}

void file_plan::check() const {
    for (std::size_t i = 0; i < outputs_.size(); ++i) {
        for (std::size_t j = 0; j < i; ++j)
            if (outputs_[i].identity == outputs_[j].identity)
                fail(outputs_[i].role, outputs_[i].path,
                     message("is the same file as ", outputs_[j].role, " '", path_excerpt(outputs_[j].path.string()),
                             "': each output needs its own file"));
        for (const auto& in : inputs_)
            if (outputs_[i].identity == in.identity)
                fail(outputs_[i].role, outputs_[i].path,
                     message("is an input (", in.role, " '", path_excerpt(in.path.string()), "'): writing it would destroy what the run reads"));
    }
}


}  // namespace sd3
