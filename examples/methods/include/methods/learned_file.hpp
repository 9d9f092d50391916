// The learned C3 weights' file (learned_c3.json next to a model, written by specdiff-calibrate): JSON, so that
// a person can read what was fitted and how.
//
//   {"format": "specdiff-learned-c3", "version": 1, "depth": 3,
//    "timesteps": [t_0, ..., t_{K-1}],                 // the main grid the weights were fitted on, falling
//    "weights": [[[w], [w, w], [w, w, w]], ...],         // per step, per history length n: n weights, newest row
//                                                        // first; null for an (step, n) with too few pairs
//    "calibration": {...}}                                // how it was made (free-form, copied into results)
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <specdiff/learned.hpp>

namespace methods {

/// The calibrations a model folder may hold, all in this format: SpecDiff-adaptive's C3 rule (self-calibrated), and
/// the output forecast's for each full-step interval N (run_forecast, calibrated on full trajectories: the weights
/// of step k depend on which steps were full, so each N has its own).
inline constexpr const char* learned_c3_file_name = "learned_c3.json";
std::string learned_forecast_file_name(int interval);  ///< "learned_forecast_N<interval>.json"
/// The interval a file name of that form names (a positive int, exactly as learned_forecast_file_name writes it);
/// empty for any other name.
std::optional<int> learned_forecast_interval(std::string_view file_name);
/// The forecast's calibration for `count` full steps placed by specdiff::rank_full_steps (specdiff-calibrate
/// --full-steps): "learned_forecast_F<count>.json"; its `calibration` object lists the steps ("full_steps").
std::string learned_forecast_steps_file_name(int count);
/// The count a file name of that form names; empty for any other name.
std::optional<int> learned_forecast_steps_count(std::string_view file_name);
/// The "full_steps" of a learned file's `calibration` object (strictly increasing, step 0 first; empty when absent).
/// Throws naming the file when present but not such a list.
std::vector<int> learned_forecast_full_steps(const std::filesystem::path& path);

/// Largest magnitude of a learned weight accepted at load (the shipped files' lie within 2; specdiff-calibrate's ridge
/// keeps them small): a larger one is refused naming the file and the entry.
inline constexpr double max_learned_weight = 1000.0;
/// Reads a learned table; std::nullopt when `path` does not exist. Throws std::runtime_error naming the file
/// and the field for anything else that is not a valid table (not a regular file, not JSON, wrong format or
/// version, sizes that disagree, weights that are not finite numbers or exceed max_learned_weight).
std::optional<specdiff::learned_table> load_learned_c3(const std::filesystem::path& path);
/// The table and its provenance (`calibration`, a JSON object's text) as the file's text.
std::string learned_c3_json(const specdiff::learned_table& table, const std::string& calibration);
/// The `calibration` object of a file read by load_learned_c3, as JSON text ("{}" when absent).
std::string learned_c3_calibration(const std::filesystem::path& path);

}  // namespace methods
