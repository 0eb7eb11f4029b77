// A small SVG line chart for the experiments report: several series of (x, mean) with an optional band
// (mean - std .. mean + std over seeds), linear axes with round ticks, a legend. No dependencies.
//
//   Chart c{"val loss vs step", "step", "val loss"};
//   c.series.push_back({"flat", xs, mean, lo, hi});   // lo/hi empty: no band
//   write_file(path, c.svg());
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace cm::bench {

struct Series {
  std::string name;
  std::vector<double> x, y;   // the line
  std::vector<double> lo, hi; // the band (same length as x), or empty
  bool dashed = false;
};

struct Chart {
  Chart(std::string t, std::string x, std::string y) : title(std::move(t)), xlabel(std::move(x)), ylabel(std::move(y)) {}
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
  bool log_x = false, log_y = false;
  int width = 720, height = 420;

  std::string svg() const {
    const double L = 70, R = 190, Tm = 36, B = 48;  // margins: the legend sits on the right
    const double pw = width - L - R, ph = height - Tm - B;
    auto tx = [&](double v) { return log_x ? std::log10(v) : v; };
    auto ty = [&](double v) { return log_y ? std::log10(v) : v; };
    double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
    for (const Series& s : series)
      for (size_t i = 0; i < s.x.size(); ++i) {
        if (!std::isfinite(s.y[i])) continue;
        x0 = std::min(x0, tx(s.x[i]));
        x1 = std::max(x1, tx(s.x[i]));
        const double lo = s.lo.empty() ? s.y[i] : s.lo[i], hi = s.hi.empty() ? s.y[i] : s.hi[i];
        y0 = std::min(y0, ty(std::isfinite(lo) ? lo : s.y[i]));
        y1 = std::max(y1, ty(std::isfinite(hi) ? hi : s.y[i]));
      }
    if (x0 > x1) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
    if (x1 == x0) x1 = x0 + 1;
    if (y1 == y0) y1 = y0 + 1;
    const double pad = 0.04 * (y1 - y0);
    y0 -= pad;
    y1 += pad;
    auto px = [&](double v) { return L + (tx(v) - x0) / (x1 - x0) * pw; };
    auto py = [&](double v) { return Tm + (1.0 - (ty(v) - y0) / (y1 - y0)) * ph; };
    static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
    std::ostringstream o;
    o.precision(5);
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    o << "<text x=\"" << width / 2 << "\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">" << esc(title)
      << "</text>\n";
    // Axes and ticks: about 6 round steps per axis (log axes: decades).
    o << "<rect x=\"" << L << "\" y=\"" << Tm << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"#444\"/>\n";
    for (double v : ticks(x0, x1, log_x)) {
      const double X = L + (v - x0) / (x1 - x0) * pw;
      o << "<line x1=\"" << X << "\" y1=\"" << Tm << "\" x2=\"" << X << "\" y2=\"" << Tm + ph
        << "\" stroke=\"#eee\"/><text x=\"" << X << "\" y=\"" << Tm + ph + 16 << "\" text-anchor=\"middle\">"
        << label(log_x ? std::pow(10.0, v) : v) << "</text>\n";
    }
    for (double v : ticks(y0, y1, log_y)) {
      const double Y = Tm + (1.0 - (v - y0) / (y1 - y0)) * ph;
      o << "<line x1=\"" << L << "\" y1=\"" << Y << "\" x2=\"" << L + pw << "\" y2=\"" << Y
        << "\" stroke=\"#eee\"/><text x=\"" << L - 6 << "\" y=\"" << Y + 4 << "\" text-anchor=\"end\">"
        << label(log_y ? std::pow(10.0, v) : v) << "</text>\n";
    }
    o << "<text x=\"" << L + pw / 2 << "\" y=\"" << height - 10 << "\" text-anchor=\"middle\">" << esc(xlabel)
      << "</text>\n<text transform=\"translate(16," << Tm + ph / 2 << ") rotate(-90)\" text-anchor=\"middle\">"
      << esc(ylabel) << "</text>\n";
    for (size_t k = 0; k < series.size(); ++k) {
      const Series& s = series[k];
      const char* col = colors[k % 10];
      if (!s.lo.empty() && s.x.size() > 1) {  // band: the upper edge left to right, the lower edge back
        o << "<polygon fill=\"" << col << "\" fill-opacity=\"0.15\" stroke=\"none\" points=\"";
        for (size_t i = 0; i < s.x.size(); ++i) o << px(s.x[i]) << "," << py(s.hi[i]) << " ";
        for (size_t i = s.x.size(); i-- > 0;) o << px(s.x[i]) << "," << py(s.lo[i]) << " ";
        o << "\"/>\n";
      }
      o << "<polyline fill=\"none\" stroke=\"" << col << "\" stroke-width=\"1.8\""
        << (s.dashed ? " stroke-dasharray=\"5,3\"" : "") << " points=\"";
      for (size_t i = 0; i < s.x.size(); ++i)
        if (std::isfinite(s.y[i])) o << px(s.x[i]) << "," << py(s.y[i]) << " ";
      o << "\"/>\n";
      for (size_t i = 0; i < s.x.size(); ++i)
        if (std::isfinite(s.y[i]))
          o << "<circle cx=\"" << px(s.x[i]) << "\" cy=\"" << py(s.y[i]) << "\" r=\"2.2\" fill=\"" << col << "\"/>";
      const double ly = Tm + 10 + 18.0 * (double)k;
      o << "\n<line x1=\"" << L + pw + 12 << "\" y1=\"" << ly << "\" x2=\"" << L + pw + 36 << "\" y2=\"" << ly
        << "\" stroke=\"" << col << "\" stroke-width=\"2\"" << (s.dashed ? " stroke-dasharray=\"5,3\"" : "")
        << "/><text x=\"" << L + pw + 42 << "\" y=\"" << ly + 4 << "\">" << esc(s.name) << "</text>\n";
    }
    o << "</svg>\n";
    return o.str();
  }

 private:
  static std::string esc(const std::string& s) {
    std::string r;
    for (char c : s) r += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
    return r;
  }
  static std::string label(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", std::fabs(v) < 1e-12 ? 0.0 : v);
    return b;
  }
  // Round ticks in [a, b]: steps of 1, 2 or 5 x 10^k, about 6 of them; on a log axis, whole decades.
  static std::vector<double> ticks(double a, double b, bool log_axis) {
    std::vector<double> t;
    if (log_axis) {
      for (double v = std::ceil(a); v <= b + 1e-9; v += 1.0) t.push_back(v);
      return t;
    }
    const double raw = (b - a) / 6.0, mag = std::pow(10.0, std::floor(std::log10(raw)));
    const double step = raw / mag < 1.5 ? mag : raw / mag < 3.5 ? 2 * mag : raw / mag < 7.5 ? 5 * mag : 10 * mag;
    for (double v = std::ceil(a / step) * step; v <= b + 1e-9 * step; v += step) t.push_back(v);
    return t;
  }
};

}  // namespace cm::bench
