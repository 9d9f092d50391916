#include "quality/metrics.hpp"

#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace quality {
namespace {

std::string shape_of(const image_batch& b) {
  return std::to_string(b.count) + "x" + std::to_string(b.channels) + "x" + std::to_string(b.height) + "x" +
         std::to_string(b.width);
}

void check_pair(const image_batch& a, const image_batch& b, double data_range, const char* metric) {
  validate(a, "a");
  validate(b, "b");
  if (a.count != b.count || a.channels != b.channels || a.height != b.height || a.width != b.width) {
    throw std::invalid_argument(std::string(metric) + ": batches a and b differ in shape: a is " + shape_of(a) +
                                ", b is " + shape_of(b));
  }
  if (!(data_range > 0.0) || !std::isfinite(data_range)) {
    throw std::invalid_argument(std::string(metric) + ": data_range must be finite and > 0, got " +
                                std::to_string(data_range));
  }
}

double mean_of(const std::vector<double>& values) {
  return std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
}

// The normalised 1-D Gaussian; the 2-D window is its outer product, so filtering is separable.
std::vector<double> gaussian_taps() {
  std::vector<double> taps(ssim_window);
  const int half = ssim_window / 2;
  double sum = 0.0;
  for (int i = 0; i < ssim_window; ++i) {
    const double d = i - half;
    taps[static_cast<std::size_t>(i)] = std::exp(-(d * d) / (2.0 * ssim_sigma * ssim_sigma));
    sum += taps[static_cast<std::size_t>(i)];
  }
  for (double& t : taps) t /= sum;
  return taps;
}

// "Valid" separable filtering of an h x w plane: out is (h - 10) x (w - 10).
void filter_valid(const std::vector<double>& plane, std::size_t h, std::size_t w, const std::vector<double>& taps,
                  std::vector<double>& tmp, std::vector<double>& out) {
  const std::size_t k = taps.size();
  const std::size_t ow = w - k + 1, oh = h - k + 1;
  tmp.assign(h * ow, 0.0);
  for (std::size_t y = 0; y < h; ++y)
    for (std::size_t x = 0; x < ow; ++x) {
      double s = 0.0;
      for (std::size_t i = 0; i < k; ++i) s += taps[i] * plane[y * w + x + i];
      tmp[y * ow + x] = s;
    }
  out.assign(oh * ow, 0.0);
  for (std::size_t y = 0; y < oh; ++y)
    for (std::size_t x = 0; x < ow; ++x) {
      double s = 0.0;
      for (std::size_t i = 0; i < k; ++i) s += taps[i] * tmp[(y + i) * ow + x];
      out[y * ow + x] = s;
    }
}

}  // namespace

void validate(const image_batch& batch, const char* name) {
  if (batch.count == 0 || batch.channels == 0 || batch.height == 0 || batch.width == 0) {
    throw std::invalid_argument(std::string(name) + ": every dimension must be > 0, got " + shape_of(batch));
  }
  if (batch.data.size() != batch.count * batch.image_size()) {
    throw std::invalid_argument(std::string(name) + ": data holds " + std::to_string(batch.data.size()) +
                                " floats but shape " + shape_of(batch) + " needs " +
                                std::to_string(batch.count * batch.image_size()));
  }
  for (std::size_t i = 0; i < batch.data.size(); ++i) {
    if (!std::isfinite(batch.data[i])) {
      throw std::invalid_argument(std::string(name) + ": non-finite value " + std::to_string(batch.data[i]) +
                                  " in image " + std::to_string(i / batch.image_size()) + " at element " +
                                  std::to_string(i % batch.image_size()));
    }
  }
}

std::vector<double> psnr_per_image(const image_batch& a, const image_batch& b, double data_range) {
  check_pair(a, b, data_range, "psnr");
  std::vector<double> out(a.count);
  for (std::size_t n = 0; n < a.count; ++n) {
    const auto x = a.image(n), y = b.image(n);
    double sse = 0.0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double d = static_cast<double>(x[i]) - static_cast<double>(y[i]);
      sse += d * d;
    }
    const double mse = sse / static_cast<double>(x.size());
    out[n] = mse == 0.0 ? std::numeric_limits<double>::infinity()
                        : 10.0 * std::log10(data_range * data_range / mse);
  }
  return out;
}

double mean_psnr(const image_batch& a, const image_batch& b, double data_range) {
  return mean_of(psnr_per_image(a, b, data_range));
}

std::vector<double> ssim_per_image(const image_batch& a, const image_batch& b, double data_range) {
  check_pair(a, b, data_range, "ssim");
  const auto window = static_cast<std::size_t>(ssim_window);
  if (a.height < window || a.width < window) {
    throw std::invalid_argument("ssim: images must be at least 11x11 (the Gaussian window), got height " +
                                std::to_string(a.height) + ", width " + std::to_string(a.width));
  }
  const double c1 = (ssim_k1 * data_range) * (ssim_k1 * data_range);
  const double c2 = (ssim_k2 * data_range) * (ssim_k2 * data_range);
  const auto taps = gaussian_taps();
  const std::size_t h = a.height, w = a.width, plane = h * w;
  std::vector<double> x(plane), y(plane), xx(plane), yy(plane), xy(plane), tmp;
  std::vector<double> mx, my, mxx, myy, mxy;
  std::vector<double> out(a.count);
  for (std::size_t n = 0; n < a.count; ++n) {
    double image_sum = 0.0;
    for (std::size_t c = 0; c < a.channels; ++c) {
      const auto pa = a.image(n).subspan(c * plane, plane), pb = b.image(n).subspan(c * plane, plane);
      for (std::size_t i = 0; i < plane; ++i) {
        x[i] = pa[i];
        y[i] = pb[i];
        xx[i] = x[i] * x[i];
        yy[i] = y[i] * y[i];
        xy[i] = x[i] * y[i];
      }
      filter_valid(x, h, w, taps, tmp, mx);
      filter_valid(y, h, w, taps, tmp, my);
      filter_valid(xx, h, w, taps, tmp, mxx);
      filter_valid(yy, h, w, taps, tmp, myy);
      filter_valid(xy, h, w, taps, tmp, mxy);
      double map_sum = 0.0;
      for (std::size_t i = 0; i < mx.size(); ++i) {
        const double vx = mxx[i] - mx[i] * mx[i], vy = myy[i] - my[i] * my[i], cov = mxy[i] - mx[i] * my[i];
        map_sum += ((2.0 * mx[i] * my[i] + c1) * (2.0 * cov + c2)) /
                   ((mx[i] * mx[i] + my[i] * my[i] + c1) * (vx + vy + c2));
      }
      image_sum += map_sum / static_cast<double>(mx.size());
    }
    out[n] = image_sum / static_cast<double>(a.channels);
  }
  return out;
}

double mean_ssim(const image_batch& a, const image_batch& b, double data_range) {
  return mean_of(ssim_per_image(a, b, data_range));
}

}  // namespace quality
