// A picture of where a method's images differ from full compute's: per pixel |method - full|, channels averaged,
// as a colour (black = equal, red, yellow, white = `scale` or more), so that a person sees at a glance where and how
// much two methods lose. Used by specdiff-compare (the side-by-side of SpecDiff and the recommended composition).
#pragma once

#include <array>
#include <cstddef>
#include <span>
#include <vector>

namespace demo {

/// The colour of a difference d >= 0 on the map, as RGB in [0, 1]: v = min(d / scale, 1); black at 0, pure red at
/// 1/3, yellow at 2/3, white at 1, linear in between. Throws std::invalid_argument for scale <= 0 or non-finite.
std::array<float, 3> heat_colour(float d, float scale);

/// RGB images [count][3][height][width] in [-1, 1] (the PNG grid's range) of |a - b| averaged over the `channels` of
/// each pixel; a and b are [count][channels][height][width]. Throws std::invalid_argument when the sizes disagree.
std::vector<float> difference_heatmap(std::span<const float> a, std::span<const float> b, std::size_t count, std::size_t channels,
                                      std::size_t height, std::size_t width, float scale);

/// Grey images [count][channels][height][width] (channels 1) as RGB [count][3][height][width], for one grid with maps.
std::vector<float> grey_to_rgb(std::span<const float> images, std::size_t count, std::size_t height, std::size_t width);

}  // namespace demo
