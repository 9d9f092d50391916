// libFuzzer target: any byte string as a diffusers config.json. The parser must return a config that
// validates, or throw std::invalid_argument; the bounded-JSON layer underneath must parse or throw
// std::runtime_error, and quoting whatever it parsed must stay short.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string_view>

#include "sd3/config.hpp"
#include "sd3/errors.hpp"
#include "sd3/json_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    try {
        const auto config = sd3::parse_transformer_config(text, "fuzz/config.json");
        config.validate();  // what the parser returns must pass the checks the engine applies again
    } catch (const std::invalid_argument&) {
    }
    try {
        const auto value = sd3::parse_json(text);
        if (sd3::json_excerpt(value).size() > sd3::max_quoted_chars + 32) std::abort();  // quoting must stay bounded
    } catch (const std::runtime_error&) {
    }
    return 0;
}
