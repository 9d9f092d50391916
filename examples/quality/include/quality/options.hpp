#pragma once
// Command-line values the programs share, checked strictly: the whole text must be a number of the right kind
// inside the allowed range. Each check returns an empty string when the text is acceptable, else the reason,
// quoting the value and stating what is allowed (CLI11 validators print it after the option's name, e.g.
// "--steps: 'abc' is not an integer; allowed: 1 to 1000").

#include <cstdint>
#include <string>
#include <string_view>

namespace quality {

/// An integer in [lo, hi] (decimal, optional leading '-', nothing else).
std::string check_integer(std::string_view text, long long lo, long long hi);

/// Which ends of a real interval belong to it.
enum class interval { closed, open_above, open_below };
/// A finite real number in [lo, hi] (or with the open end excluded). NaN and infinities are refused.
std::string check_real(std::string_view text, double lo, double hi, interval ends = interval::closed);

/// A noise seed: a decimal integer in [0, 2^64 - 1]; a sign or a larger value is refused, never wrapped.
std::string check_seed(std::string_view text);
/// The seed `text` names; throws std::invalid_argument with check_seed's reason.
std::uint64_t parse_seed(std::string_view text);

}  // namespace quality
