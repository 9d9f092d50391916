#include "sd3/json_input.hpp"

#include <stdexcept>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"

namespace sd3 {
namespace {

// One pass over the bytes: the deepest nesting and the number of entries, counted as the parser will see
// them (brackets and commas outside strings). Up to the first syntax error the parser and this scan agree on
// where strings begin and end, and the parser builds nothing past that error, so the bounds hold for
// whatever it builds. Entries: every comma outside strings plus one for each non-empty array or object.
void prescan(std::string_view text, const json_limits& limits) {
    if (text.size() > limits.max_bytes)
        throw std::runtime_error(message(text.size(), " bytes, more than the limit of ", limits.max_bytes, " bytes"));
    int depth = 0;
    std::size_t entries = 0;
    bool in_string = false, escaped = false, opened = false;
    for (const char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
            continue;
        }
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
        if (opened && c != ']' && c != '}') ++entries;  // the first entry of a container
        opened = false;
        switch (c) {
            case '"': in_string = true; break;
            case '[':
            case '{':
                if (++depth > limits.max_depth)
                    throw std::runtime_error(message("nested deeper than ", limits.max_depth, " levels of arrays and objects"));
                opened = true;
                break;
            case ']':
            case '}':
                if (depth > 0) --depth;
                break;
            case ',': ++entries; break;
            default: break;
        }
        if (entries > limits.max_entries)
            throw std::runtime_error(message("holding more than ", limits.max_entries, " entries (array elements and object members)"));
    }
}

}  // namespace

nlohmann::json parse_json(std::string_view text, const json_limits& limits) {
    prescan(text, limits);
    try {
        return nlohmann::json::parse(text.begin(), text.end());
    } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(message("not valid JSON: ", excerpt(e.what(), 4 * max_quoted_chars)));
    }
}

nlohmann::json read_json_file(const std::filesystem::path& path, std::string_view who, std::string_view role,
                              const json_limits& limits) {
    const auto text = read_text_file(path, message(who, ": ", role), limits.max_bytes);  // names the path itself
    try {
        return parse_json(text, limits);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(message(who, ": '", path_excerpt(path.string()), "' is ", e.what()));
    }
}

std::string json_excerpt(const nlohmann::json& value) {
    // Replacement of invalid UTF-8 keeps dump() from throwing on strings that arrived as raw bytes.
    return excerpt(value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace sd3
