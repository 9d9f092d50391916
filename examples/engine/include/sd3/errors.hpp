// How the engine and its programs build error messages: one helper joins the parts, and any piece of the
// input quoted in a message (a name, a JSON value, a command-line value) goes through excerpt(), so a
// message never grows with a hostile input.
#pragma once

#include <cstddef>
#include <sstream>
#include <string>
#include <string_view>

namespace sd3 {

// Longest piece of an input quoted in a message; longer text is cut and its full length stated. Paths get
// the operating system's own bound (PATH_MAX), so any path that can be opened is quoted whole.
inline constexpr std::size_t max_quoted_chars = 80;
inline constexpr std::size_t max_quoted_path_chars = 4096;

// `text` as messages quote it: unchanged when short, else its first `limit` bytes (cut at a UTF-8 character
// boundary) followed by "... (N bytes)".
inline std::string excerpt(std::string_view text, std::size_t limit = max_quoted_chars) {
    if (text.size() <= limit) return std::string(text);
    std::size_t cut = limit;
    while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0u) == 0x80u) --cut;  // not inside a character
    return std::string(text.substr(0, cut)) + "... (" + std::to_string(text.size()) + " bytes)";
}

inline std::string path_excerpt(std::string_view path) { return excerpt(path, max_quoted_path_chars); }

// The parts streamed one after another (numbers in the stream's default format).
template <class... Parts>
std::string message(const Parts&... parts) {
    std::ostringstream os;
    (os << ... << parts);
    return os.str();
}

}  // namespace sd3
