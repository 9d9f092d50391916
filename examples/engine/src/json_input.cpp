#include "sd3/json_input.hpp"

#include <stdexcept>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"

namespace sd3 {

nlohmann::json parse_json(std::string_view text) {
    // The callback sees every container as it opens, at its depth; refusing there keeps the parser (which
    // is iterative) from building anything deeper, whatever the input holds.
    const nlohmann::json::parser_callback_t limit_depth = [](int depth, nlohmann::json::parse_event_t event,
                                                             nlohmann::json&) {
        const bool opens = event == nlohmann::json::parse_event_t::object_start ||
                           event == nlohmann::json::parse_event_t::array_start;
        if (opens && depth >= max_json_depth)
            throw std::runtime_error(message("nested deeper than ", max_json_depth, " levels of arrays and objects"));
        return true;
    };
    try {
        return nlohmann::json::parse(text.begin(), text.end(), limit_depth);
    } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(message("not valid JSON: ", excerpt(e.what(), 4 * max_quoted_chars)));
    }
}

nlohmann::json read_json_file(const std::filesystem::path& path, std::string_view who, std::string_view role) {
    const auto text = read_text_file(path, message(who, ": ", role));  // names the path itself
    try {
        return parse_json(text);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(message(who, ": '", path_excerpt(path.string()), "' is ", e.what()));
    }
}

std::string json_excerpt(const nlohmann::json& value) {
    // Replacement of invalid UTF-8 keeps dump() from throwing on strings that arrived as raw bytes.
    return excerpt(value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace sd3
