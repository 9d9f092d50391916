// Reading diffusers config.json fields, shared by the SD3 and FLUX config parsers: absent keys keep the
// caller's default (diffusers' own), wrong types and out-of-range values are refused naming file, key and value.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string_view>

#include <nlohmann/json.hpp>

#include "sd3/config.hpp"
#include "sd3/errors.hpp"
#include "sd3/json_input.hpp"

namespace sd3::detail {

template <class... Parts>
[[noreturn]] void bad_config(std::string_view source, const Parts&... what) {
    throw std::invalid_argument(message(path_excerpt(source), ": ", what...));
}

// validate()'s checks: a size field in [1, most], and a product of fields (formed in 64 bits) within a limit.
// `type` names the struct in the message ("transformer_config").
inline void check_field(const char* type, const char* name, int v, int most) {
    if (v < 1 || v > most) throw std::invalid_argument(message(type, ".", name, " = ", v, " is out of range [1, ", most, "]"));
}
inline void check_product(const char* type, const char* what, std::int64_t product, int most) {
    if (product > most) throw std::invalid_argument(message(type, ": ", what, " = ", product, " exceeds the limit ", most));
}

// An integer field in [1, max_config_field].
inline void read_config_int(const nlohmann::json& j, const char* key, int& out, std::string_view source) {
    const auto it = j.find(key);
    if (it == j.end()) return;  // diffusers' default applies
    if (!it->is_number_integer()) bad_config(source, key, " must be an integer, got ", json_excerpt(*it));
    // Unsigned values above INT64_MAX read as such (not wrapped negative) so the message shows the real value.
    if (it->is_number_unsigned() && it->get<std::uint64_t>() > static_cast<std::uint64_t>(max_config_field))
        bad_config(source, key, " = ", it->get<std::uint64_t>(), " is out of range [1, ", max_config_field, "]");
    const auto v = it->get<std::int64_t>();
    if (v < 1 || v > max_config_field) bad_config(source, key, " = ", v, " is out of range [1, ", max_config_field, "]");
    out = static_cast<int>(v);
}

// An array element that must be an integer in [0, most]: its value, or nothing (bounded before the
// conversion, so any JSON number reads without overflow).
inline std::optional<int> config_element(const nlohmann::json& e, int most) {
    if (!e.is_number_integer()) return std::nullopt;
    if (e.is_number_unsigned()) {
        if (e.get<std::uint64_t>() > static_cast<std::uint64_t>(most)) return std::nullopt;
    } else if (e.get<std::int64_t>() < 0 || e.get<std::int64_t>() > most) {
        return std::nullopt;
    }
    return static_cast<int>(e.get<std::int64_t>());
}

// A JSON object's text, parsed and checked to be an object of class `class_name` (when it names one).
inline nlohmann::json parse_config_object(std::string_view json_text, std::string_view source, std::string_view class_name) {
    nlohmann::json j;
    try {
        j = parse_json(json_text);
    } catch (const std::runtime_error& e) {
        bad_config(source, e.what());
    }
    if (!j.is_object()) bad_config(source, "top level is not a JSON object");
    // Any _class_name that is not this class, a string or not (a number there is no class at all).
    if (auto it = j.find("_class_name"); it != j.end() && (!it->is_string() || *it != class_name))
        bad_config(source, "_class_name = ", json_excerpt(*it), ", expected \"", class_name, "\"",
                   it->is_string() ? "" : " (a string naming the model class)");
    return j;
}

}  // namespace sd3::detail
