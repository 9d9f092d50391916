// libFuzzer target: any byte string as one of a model folder's JSON files, read by its own loader from a file
// (the loaders take paths). The first byte picks the file: sampling.json (quality::load_guidance_scale),
// scheduler_config.json (quality::load_schedule), classifier.json (quality::digit_classifier::load, with the
// shipped classifier.safetensors beside it) or learned_c3.json (methods::load_learned_c3). Each must return or
// throw std::runtime_error / std::invalid_argument with a bounded message; anything else (another exception, a
// crash, a sanitizer report, a hang past libFuzzer's -timeout) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "methods/learned_file.hpp"
#include "quality/classifier.hpp"
#include "quality/default_model.hpp"
#include "sd3/transformer.hpp"

// sampler.cpp is linked for sd3::flux_mu (load_schedule's dynamic shift); its samplers call into the transformer,
// which this target neither builds nor runs. These definitions satisfy the linker and are never reached.
namespace sd3 {
architecture transformer::arch() const noexcept { std::abort(); }
const transformer_config& transformer::config() const { std::abort(); }
const sd3::flux_config& transformer::flux() const { std::abort(); }
const engine_limits& transformer::limits() const noexcept { std::abort(); }
void transformer::forward(const forward_inputs&, std::span<float>) { std::abort(); }
}  // namespace sd3

namespace {

namespace fs = std::filesystem;

// A private folder on a RAM file system where there is one; the shipped classifier weights linked in.
const fs::path& folder() {
    static const fs::path dir = [] {
        const fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
        auto d = base / ("specdiff_fuzz_" + std::to_string(::getpid()));
        fs::create_directories(d);
        std::error_code ec;
        fs::create_symlink(fs::path(SPECDIFF_MODEL_DIR) / "classifier.safetensors", d / "classifier.safetensors", ec);
        return d;
    }();
    return dir;
}

void bounded(const std::exception& e) {
    if (std::string(e.what()).size() > 8192) std::abort();  // messages quote inputs through excerpt()
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    static const char* const names[] = {"sampling.json", "scheduler_config.json", "classifier.json", "learned_c3.json"};
    const int which = data[0] % 4;
    const auto path = folder() / names[which];
    // Registered once the folder exists (so it runs before the folder's name is destroyed); libFuzzer leaves via exit().
    static const bool cleanup = (std::atexit([] {
                                     std::error_code ignored;
                                     fs::remove_all(folder(), ignored);
                                 }),
                                 true);
    (void)cleanup;
    {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(data + 1), static_cast<std::streamsize>(size - 1));
    }
    try {
        switch (which) {
            case 0: (void)quality::load_guidance_scale(folder()); break;
            case 1: (void)quality::load_schedule(folder(), 256); break;
            case 2: (void)quality::digit_classifier::load(folder()); break;
            case 3: (void)methods::load_learned_c3(path); break;
        }
    } catch (const std::runtime_error& e) {
        bounded(e);
    } catch (const std::invalid_argument& e) {
        bounded(e);
    }
    return 0;
}
