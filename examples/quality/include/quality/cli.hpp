#pragma once
// CLI11 validators over the checks in quality/options.hpp, shared by the programs (specdiff-demo,
// specdiff-sample). Header-only: include it only from a target that links CLI11 (sd3quality itself does not).

#include <CLI/CLI.hpp>
#include <string>
#include <utility>

#include "quality/options.hpp"
#include "sd3/errors.hpp"

namespace quality::cli {

/// A validator from a check that returns "" for acceptable text, else the reason.
template <class Check>
CLI::Validator checked(Check check, std::string description) {
  return CLI::Validator([check](std::string& text) { return check(text); }, std::move(description));
}
inline CLI::Validator integer_in(long long lo, long long hi) {
  return checked([lo, hi](const std::string& t) { return check_integer(t, lo, hi); }, sd3::message("INT in [", lo, ", ", hi, "]"));
}
inline CLI::Validator real_in(double lo, double hi, interval ends = interval::closed) {
  return checked([=](const std::string& t) { return check_real(t, lo, hi, ends); }, "REAL");
}

}  // namespace quality::cli
