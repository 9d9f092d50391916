// libFuzzer target: any byte string as a safetensors file. The reader must either open it and read every
// tensor it lists, or throw std::runtime_error; anything else (a crash, a sanitizer report, another
// exception type, a hang) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include "sd3/safetensors.hpp"

namespace {

// The input as a file the reader can open by path and map: an anonymous memory file, named through /proc.
struct memory_file {
    int fd;
    explicit memory_file(const std::uint8_t* data, std::size_t size) : fd(::memfd_create("fuzz.safetensors", MFD_CLOEXEC)) {
        if (fd < 0) std::perror("memfd_create"), std::abort();
        for (std::size_t done = 0; done < size;) {
            const ssize_t put = ::write(fd, data + done, size - done);
            if (put <= 0) std::perror("write"), std::abort();
            done += static_cast<std::size_t>(put);
        }
    }
    ~memory_file() { ::close(fd); }
    std::string path() const { return "/proc/self/fd/" + std::to_string(fd); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const memory_file file(data, size);
    try {
        const sd3::safetensors_file reader(file.path());
        for (const auto& t : reader.tensors()) {
            switch (t.type) {
                case sd3::dtype::f32:
                case sd3::dtype::f16:
                case sd3::dtype::bf16:
                    try {
                        (void)reader.read_finite(t.name);
                    } catch (const std::runtime_error&) {  // a non-finite value: reported, as it must be
                    }
                    break;
                case sd3::dtype::f64: (void)reader.read_doubles(t.name); break;
                case sd3::dtype::i64:
                case sd3::dtype::i32: (void)reader.read_ints(t.name); break;
            }
            (void)reader.raw(t.name);
        }
    } catch (const std::runtime_error&) {  // a refused file: the expected outcome for most inputs
    }
    return 0;
}
