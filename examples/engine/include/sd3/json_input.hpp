// JSON from files the engine does not control (safetensors headers, config.json, sampling.json, the quality
// tools' descriptions, the learned weights): every text is bounded before it is parsed, in one linear pass
// over its bytes (its size, its nesting depth and its entry count), then parsed by nlohmann's plain parser,
// which is linear too. No per-node parser callback is used: with one, nlohmann 3.11 rescans the parent
// container after each nested value, which makes 100,000 sibling objects take minutes (issue 28).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace sd3 {

// Deepest nesting of arrays and objects accepted; real headers and configs use 3 levels.
inline constexpr int max_json_depth = 64;
// Most entries (array elements plus object members, at every level) in one JSON text by default: the
// largest shipped config holds a few hundred; a safetensors header has its own, larger bound.
inline constexpr std::size_t max_json_entries = 1'000'000;
// Largest JSON text by default (the same bound as read_text_file's).
inline constexpr std::size_t max_json_bytes = std::size_t{16} << 20;

// What one reader accepts. The pre-scan checks all three in one pass before any value is built, so the
// parse that follows costs at most linear time and memory in max_bytes.
struct json_limits {
    std::size_t max_bytes = max_json_bytes;
    int max_depth = max_json_depth;
    std::size_t max_entries = max_json_entries;
};

// Parses `text`. Throws std::runtime_error "not valid JSON: ...", "nested deeper than 64 levels ...",
// "N bytes, more than the limit of M" or "holds more than N entries ..."; callers prefix the file they read.
nlohmann::json parse_json(std::string_view text, const json_limits& limits = {});

// The JSON in a file: read_text_file (anything but a regular file is refused, the size bounded; its errors name
// "who: role" and the path) and parse_json, whose errors become "who: 'path' is not valid JSON: ..." (or "is
// nested deeper ...", "holds more than ...").
nlohmann::json read_json_file(const std::filesystem::path& path, std::string_view who, std::string_view role,
                              const json_limits& limits = {});

// A parsed value as messages quote it: its compact JSON text through excerpt().
std::string json_excerpt(const nlohmann::json& value);

}  // namespace sd3
