#include "quality/options.hpp"

#include <charconv>
#include <cmath>
#include <stdexcept>

#include "sd3/errors.hpp"

namespace quality {
namespace {

std::string quoted(std::string_view text) { return sd3::message("'", sd3::excerpt(text), "'"); }

// The whole text parsed as T by from_chars, or false.
template <class T>
bool parse_all(std::string_view text, T& out) {
    if (text.empty()) return false;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), out);
    return error == std::errc() && end == text.data() + text.size();
}

}  // namespace

std::string check_integer(std::string_view text, long long lo, long long hi) {
    const auto allowed = sd3::message("; allowed: ", lo, " to ", hi);
    long long v = 0;
    if (!parse_all(text, v)) {
        // Distinguish a number too large for the type from text that is not an integer at all.
        bool digits = !text.empty();
        for (std::size_t i = 0; i < text.size(); ++i)
            digits = digits && ((text[i] >= '0' && text[i] <= '9') || (i == 0 && text[i] == '-' && text.size() > 1));
        return sd3::message(quoted(text), digits ? " is out of range" : " is not an integer", allowed);
    }
    if (v < lo || v > hi) return sd3::message(quoted(text), " is out of range", allowed);
    return {};
}

std::string check_real(std::string_view text, double lo, double hi, interval ends) {
    const auto allowed = sd3::message("; allowed: ", ends == interval::open_below ? "(" : "[", lo, ", ", hi,
                                      ends == interval::open_above ? ")" : "]");
    double v = 0;
    if (!parse_all(text, v) || !std::isfinite(v)) return sd3::message(quoted(text), " is not a finite number", allowed);
    const bool below = ends == interval::open_below ? v <= lo : v < lo;
    const bool above = ends == interval::open_above ? v >= hi : v > hi;
    if (below || above) return sd3::message(quoted(text), " is out of range", allowed);
    return {};
}

std::string check_seed(std::string_view text) {
    std::uint64_t v = 0;
    if (parse_all(text, v)) return {};
    bool digits = !text.empty();
    for (const char c : text) digits = digits && c >= '0' && c <= '9';
    return sd3::message(quoted(text), digits ? " is out of range" : " is not a non-negative integer",
                        "; allowed: 0 to 18446744073709551615 (2^64 - 1)");
}

std::uint64_t parse_seed(std::string_view text) {
    if (auto why = check_seed(text); !why.empty()) throw std::invalid_argument(sd3::message("seed: ", why));
    std::uint64_t v = 0;
    parse_all(text, v);
    return v;
}

}  // namespace quality
