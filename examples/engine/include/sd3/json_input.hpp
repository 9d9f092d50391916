// JSON from files the engine does not control (safetensors headers, config.json, the quality tools'
// descriptions): nesting is bounded while parsing, so nothing that walks the value later (dump(), a
// message quoting it) can recurse deeper than max_json_depth.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace sd3 {

// Deepest nesting of arrays and objects accepted; real headers and configs use 3 levels.
inline constexpr int max_json_depth = 64;

// Parses `text`. Throws std::runtime_error "not valid JSON: ..." or "nested deeper than 64 levels ...";
// callers prefix the file they read.
nlohmann::json parse_json(std::string_view text);

// The JSON in a file: read_text_file (anything but a regular file is refused, the size bounded; its errors name
// "who: role" and the path) and parse_json, whose errors become "who: 'path' is not valid JSON: ..." (or "is
// nested deeper ...").
nlohmann::json read_json_file(const std::filesystem::path& path, std::string_view who, std::string_view role);

// A parsed value as messages quote it: its compact JSON text through excerpt().
std::string json_excerpt(const nlohmann::json& value);

}  // namespace sd3
