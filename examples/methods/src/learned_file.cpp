#include "methods/learned_file.hpp"

#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <system_error>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"

namespace methods {
namespace {

constexpr const char* format_name = "specdiff-learned-c3";

nlohmann::json parse(const std::filesystem::path& path) { return sd3::read_json_file(path, "load_learned_c3", "learned C3 weights"); }

}  // namespace

std::optional<specdiff::learned_table> load_learned_c3(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, ec))) return std::nullopt;
  const auto j = parse(path);
  auto fail = [&](const auto&... why) -> void {
    throw std::runtime_error(sd3::message("load_learned_c3: '", sd3::path_excerpt(path.string()), "' ", why...));
  };
  if (!j.is_object()) fail("is not a JSON object");
  if (j.value("format", std::string()) != format_name) fail("has no \"format\": \"", format_name, "\"");
  if (!j.contains("version") || j["version"] != 1) fail("has version ", j.contains("version") ? sd3::json_excerpt(j["version"]) : "(none)", ", this reader knows 1");
  const auto& depth = j.contains("depth") ? j["depth"] : nlohmann::json();
  if (!depth.is_number_integer() || depth.get<long long>() < 1 || depth.get<long long>() > specdiff::cache_shape::max_history)
    fail("has depth ", sd3::json_excerpt(depth), ", allowed: 1 to ", specdiff::cache_shape::max_history);
  const int d = depth.get<int>();
  const auto& ts = j.contains("timesteps") ? j["timesteps"] : nlohmann::json();
  const auto& ws = j.contains("weights") ? j["weights"] : nlohmann::json();
  constexpr std::size_t most_steps = 100000;
  if (!ts.is_array() || ts.empty() || ts.size() > most_steps) fail("needs \"timesteps\": an array of 1 to ", most_steps, " numbers");
  if (!ws.is_array() || ws.size() != ts.size()) fail("needs \"weights\": one entry per timestep (", ts.size(), "), got ", ws.is_array() ? ws.size() : 0);
  std::vector<float> timesteps, weights(ts.size() * static_cast<std::size_t>(d * d), 0.f);
  for (std::size_t k = 0; k < ts.size(); ++k) {
    if (!ts[k].is_number() || !std::isfinite(ts[k].get<float>()))
      fail("has timesteps[", k, "] = ", sd3::json_excerpt(ts[k]), ", expected a finite number");
    timesteps.push_back(ts[k].get<float>());
    if (!ws[k].is_array() || ws[k].size() != static_cast<std::size_t>(d)) fail("needs weights[", k, "]: ", d, " lists (history lengths 1 to ", d, ")");
    for (int n = 1; n <= d; ++n) {
      const auto& row = ws[k][static_cast<std::size_t>(n - 1)];
      float* out = weights.data() + (k * static_cast<std::size_t>(d) + static_cast<std::size_t>(n - 1)) * static_cast<std::size_t>(d);
      if (row.is_null()) {
        out[0] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (!row.is_array() || row.size() != static_cast<std::size_t>(n)) fail("needs weights[", k, "][", n - 1, "]: ", n, " numbers or null");
      for (int i = 0; i < n; ++i) {
        const auto& w = row[static_cast<std::size_t>(i)];
        if (!w.is_number() || !std::isfinite(w.get<double>())) fail("has weights[", k, "][", n - 1, "][", i, "] = ", sd3::json_excerpt(w), ", expected a finite number");
        // A fitted weight is a blend of a few history rows (the shipped ones lie within +-2); anything this large
        // would blow the latents up to inf, found only as "verification inf" after the run.
        if (std::abs(w.get<double>()) > max_learned_weight)
          fail("has weights[", k, "][", n - 1, "][", i, "] = ", sd3::json_excerpt(w), ", outside the allowed [-", max_learned_weight, ", ",
               max_learned_weight, "] (re-run specdiff-calibrate)");
        out[i] = w.get<float>();
      }
    }
  }
  try {
    return specdiff::learned_table(std::move(timesteps), d, std::move(weights));
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  return std::nullopt;  // not reached: fail throws
}

constexpr std::string_view forecast_prefix = "learned_forecast_N";

std::string learned_forecast_file_name(int interval) { return sd3::message(forecast_prefix, interval, ".json"); }

std::optional<int> learned_forecast_interval(std::string_view file_name) {
  if (!file_name.starts_with(forecast_prefix)) return std::nullopt;
  int interval = 0;
  const auto [end, error] = std::from_chars(file_name.data() + forecast_prefix.size(), file_name.data() + file_name.size(), interval);
  // Round trip: no sign, no leading zeros, nothing but ".json" after the digits.
  if (error != std::errc() || interval < 1 || file_name != learned_forecast_file_name(interval)) return std::nullopt;
  return interval;
}

constexpr std::string_view steps_prefix = "learned_forecast_F";

std::string learned_forecast_steps_file_name(int count) { return sd3::message(steps_prefix, count, ".json"); }

std::optional<int> learned_forecast_steps_count(std::string_view file_name) {
  if (!file_name.starts_with(steps_prefix)) return std::nullopt;
  int count = 0;
  const auto [end, error] = std::from_chars(file_name.data() + steps_prefix.size(), file_name.data() + file_name.size(), count);
  if (error != std::errc() || count < 1 || file_name != learned_forecast_steps_file_name(count)) return std::nullopt;
  return count;
}

std::vector<int> learned_forecast_full_steps(const std::filesystem::path& path) {
  const auto j = parse(path);
  if (!j.is_object() || !j.contains("calibration") || !j["calibration"].is_object() || !j["calibration"].contains("full_steps")) return {};
  const auto& list = j["calibration"]["full_steps"];
  auto fail = [&](const auto&... what) -> std::vector<int> {
    throw std::runtime_error(sd3::message("learned weights: ", path.string(), ": calibration.full_steps ", what...));
  };
  if (!list.is_array() || list.empty()) return fail("must be a non-empty list of step indices, got ", sd3::json_excerpt(list));
  std::vector<int> steps;
  for (const auto& v : list) {
    if (!v.is_number_integer() || v.get<long long>() < 0 || v.get<long long>() > 1'000'000) return fail("holds ", sd3::json_excerpt(v), ", not a step index");
    steps.push_back(v.get<int>());
    if (steps.size() == 1 ? steps[0] != 0 : steps.back() <= steps[steps.size() - 2])
      return fail("must start with 0 and strictly increase, got ", sd3::json_excerpt(list));
  }
  return steps;
}

std::string learned_c3_json(const specdiff::learned_table& table, const std::string& calibration) {
  nlohmann::json weights = nlohmann::json::array();
  for (int k = 0; k < table.steps(); ++k) {
    nlohmann::json per_step = nlohmann::json::array();
    for (int n = 1; n <= table.depth(); ++n) {
      const auto w = table.weights(k, n);
      per_step.push_back(std::isnan(w[0]) ? nlohmann::json(nullptr) : nlohmann::json(std::vector<float>(w.begin(), w.end())));
    }
    weights.push_back(per_step);
  }
  const nlohmann::json j{{"format", format_name},
                         {"version", 1},
                         {"depth", table.depth()},
                         {"timesteps", std::vector<float>(table.timesteps().begin(), table.timesteps().end())},
                         {"weights", weights},
                         {"calibration", sd3::parse_json(calibration)}};
  return j.dump(1) + "\n";
}

std::string learned_c3_calibration(const std::filesystem::path& path) {
  const auto j = parse(path);
  return j.is_object() && j.contains("calibration") ? j["calibration"].dump() : "{}";
}

}  // namespace methods
