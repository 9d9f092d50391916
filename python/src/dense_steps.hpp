#pragma once
// Shared by the host (core.cpp) and device (device.cu) method builders of specdiff._core.
#include <vector>

#include <specdiff/common.hpp>

namespace specdiff_python {

// The dense steps of a method's defaults that fit the run (the C++ methods drop the ones past a shorter run).
inline std::vector<specdiff::index_t> within(const std::vector<int>& steps_list, int steps) {
  std::vector<specdiff::index_t> kept;
  for (int r : steps_list)
    if (r < steps) kept.push_back(r);
  return kept;
}

}  // namespace specdiff_python
