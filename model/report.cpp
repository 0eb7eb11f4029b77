#include "model/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/check.h"

namespace cm {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- console
std::string with_commas(int64_t v) {
  std::string s = std::to_string(v < 0 ? -v : v), out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return v < 0 ? "-" + out : out;
}

std::string format_duration(double seconds) {
  char buf[32];
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600) {
    int64_t s = (int64_t)std::lround(seconds);
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  } else {
    int64_t m = (int64_t)std::lround(seconds / 60);
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(m / 60), (long long)(m % 60));
  }
  return buf;
}

void print_table(std::ostream& os, const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows) {
  size_t w0 = 0, w1 = 0;
  for (const auto& r : rows) {
    w0 = std::max(w0, r.first.size());
    w1 = std::max(w1, r.second.size());
  }
  w1 = std::max(w1, title.size() > w0 + 3 ? title.size() - w0 - 3 : size_t(0));
  std::string rule = "+" + std::string(w0 + 2, '-') + "+" + std::string(w1 + 2, '-') + "+\n";
  os << rule;
  if (!title.empty()) {
    std::string t = title;
    t.resize(w0 + w1 + 3, ' ');
    os << "| " << t << " |\n" << rule;
  }
  for (const auto& r : rows) {
    std::string a = r.first, b = r.second;
    a.resize(w0, ' ');
    b.resize(w1, ' ');
    os << "| " << a << " | " << b << " |\n";
  }
  os << rule;
}

double LayerRouting::max_share() const {
  double m = 0;
  for (double s : share) m = std::max(m, s);
  return m;
}
int64_t LayerRouting::dead_experts() const {
  int64_t n = 0;
  for (double t : tokens) n += t <= 0;
  return n;
}

void print_routing_summary(std::ostream& os, const std::vector<LayerRouting>& layers) {
  char buf[160];
  for (const auto& l : layers) {
    double n = (double)l.share.size();
    std::snprintf(buf, sizeof buf,
                  "  routing layer %lld | max share %5.1f%% (balanced %4.1f%%) | dead %lld/%lld | dropped %5.2f%% | "
                  "reliability %.3f\n",
                  (long long)l.layer, 100 * l.max_share(), n > 0 ? 100 / n : 0.0, (long long)l.dead_experts(),
                  (long long)l.share.size(), 100 * l.dropped_fraction, l.mean_reliability);
    os << buf;
  }
}

// ---------------------------------------------------------------- csv files
static const char* LOG_HEADER = "step,kind,loss,val_loss,aux,lr,grad_norm,ms,tok_per_s";
static const char* ROUTING_HEADER = "step,layer,expert,cluster,tokens,share,reliability,dropped_fraction";

static std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string f;
  while (std::getline(ss, f, ',')) out.push_back(f);
  return out;
}
static double num(const std::string& s) { return s.empty() ? NAN : std::strtod(s.c_str(), nullptr); }

static std::string fmt(double v, const char* f = "%.6g") {
  if (std::isnan(v)) return "";
  char buf[32];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

static std::string log_row(const StepRecord& r) {
  return str(r.step, ",train,", fmt(r.loss), ",,", fmt(r.aux), ",", fmt(r.lr), ",", fmt(r.grad_norm), ",",
             fmt(r.ms, "%.2f"), ",", fmt(r.tok_per_s, "%.1f"));
}
static std::string log_row(const EvalRecord& r) {
  return str(r.step, ",eval,", fmt(r.train_loss), ",", fmt(r.val_loss), ",,,,,");
}
static std::vector<std::string> routing_rows(int64_t step, const LayerRouting& l) {
  std::vector<std::string> rows;
  for (size_t e = 0; e < l.share.size(); ++e)
    rows.push_back(str(step, ",", l.layer, ",", e, ",", (int64_t)e / std::max<int64_t>(1, l.experts_per_cluster), ",",
                       fmt(l.tokens[e], "%.0f"), ",", fmt(l.share[e]), ",",
                       fmt(e < l.reliability.size() ? l.reliability[e] : 1.0), ",", fmt(l.dropped_fraction)));
  return rows;
}

static void append_lines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream f(path, std::ios::app);
  CM_REQUIRE(f, "cannot write ", path);
  for (const auto& l : lines) f << l << '\n';
  f.flush();
  CM_REQUIRE(f, "error writing ", path);
}
static void write_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    CM_REQUIRE(f, "cannot write ", tmp);
    f << text;
    f.flush();
    CM_REQUIRE(f, "error writing ", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  CM_REQUIRE(!ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

RunReport::RunReport(std::string out_dir, int64_t resume_step) : dir_(std::move(out_dir)) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  CM_REQUIRE(fs::is_directory(dir_, ec), "cannot create the output directory ", dir_);
  const std::string log_path = (fs::path(dir_) / "log.csv").string();
  const std::string routing_path = (fs::path(dir_) / "routing.csv").string();
  std::vector<std::string> log_keep = {LOG_HEADER}, routing_keep = {ROUTING_HEADER};
  if (resume_step >= 0) {
    std::ifstream lf(log_path);
    std::string line;
    while (std::getline(lf, line)) {
      auto c = split_csv(line);
      if (c.size() < 2 || c[0] == "step" || num(c[0]) > (double)resume_step) continue;
      c.resize(9);
      int64_t step = (int64_t)num(c[0]);
      if (c[1] == "train")
        steps_.push_back({step, num(c[2]), num(c[4]), num(c[5]), num(c[6]), num(c[7]), num(c[8])});
      else if (c[1] == "eval")
        evals_.push_back({step, num(c[2]), num(c[3])});
      else
        continue;
      log_keep.push_back(line);
    }
    std::ifstream rf(routing_path);
    while (std::getline(rf, line)) {
      auto c = split_csv(line);
      if (c.size() < 8 || c[0] == "step" || num(c[0]) > (double)resume_step) continue;
      int64_t step = (int64_t)num(c[0]), layer = (int64_t)num(c[1]), expert = (int64_t)num(c[2]);
      int64_t cluster = (int64_t)num(c[3]);
      if (routing_.empty() || routing_.back().first != step) routing_.push_back({step, {}});
      auto& layers = routing_.back().second;
      if (layers.empty() || layers.back().layer != layer) {
        layers.emplace_back();
        layers.back().layer = layer;
        layers.back().dropped_fraction = num(c[7]);
      }
      LayerRouting& l = layers.back();
      l.tokens.push_back(num(c[4]));
      l.share.push_back(num(c[5]));
      l.reliability.push_back(num(c[6]));
      if (cluster == 0) l.experts_per_cluster = expert + 1;
      routing_keep.push_back(line);
    }
  }
  // Rewrite both files with what is kept (just the headers for a fresh run).
  std::string lt, rt;
  for (const auto& l : log_keep) lt += l + "\n";
  for (const auto& l : routing_keep) rt += l + "\n";
  write_file_atomic(log_path, lt);
  write_file_atomic(routing_path, rt);
}

std::string RunReport::svg_path() const { return (fs::path(dir_) / "curves.svg").string(); }

void RunReport::add_step(const StepRecord& r) {
  steps_.push_back(r);
  append_lines((fs::path(dir_) / "log.csv").string(), {log_row(r)});
}

void RunReport::add_eval(const EvalRecord& r, const std::vector<LayerRouting>& routing) {
  evals_.push_back(r);
  append_lines((fs::path(dir_) / "log.csv").string(), {log_row(r)});
  if (routing.empty()) return;
  routing_.push_back({r.step, routing});
  std::vector<std::string> rows;
  for (const auto& l : routing)
    for (auto& row : routing_rows(r.step, l)) rows.push_back(std::move(row));
  append_lines((fs::path(dir_) / "routing.csv").string(), rows);
}

void RunReport::write_svg() const { write_file_atomic(svg_path(), render_svg(steps_, evals_, routing_)); }

// ---------------------------------------------------------------- svg
namespace {

// Axis ticks at 1, 2 or 5 times a power of ten, about n of them across [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int n) {
  std::vector<double> t;
  if (!(hi > lo)) return {lo};
  double raw = (hi - lo) / n, p = std::pow(10.0, std::floor(std::log10(raw))), step = p;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * p) {
      step = m * p;
      break;
    }
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step)
    t.push_back(std::fabs(v) < 1e-12 ? 0 : v);
  return t;
}

std::string num_label(double v) {
  char buf[32];
  if (std::fabs(v) >= 10000)
    std::snprintf(buf, sizeof buf, "%.0fk", v / 1000);
  else
    std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// A panel: a plot rectangle with data ranges, mapping data to pixels.
struct Panel {
  double x0, y0, w, h;        // pixels
  double xlo, xhi, ylo, yhi;  // data
  double px(double x) const { return x0 + (xhi > xlo ? (x - xlo) / (xhi - xlo) : 0.5) * w; }
  double py(double y) const { return y0 + h - (yhi > ylo ? (y - ylo) / (yhi - ylo) : 0.5) * h; }
};

const char* PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};

void axes(std::ostringstream& o, const Panel& p, const std::string& title, const std::string& xlabel,
          const std::string& ylabel, bool percent_y, int id) {
  char buf[1024];
  o << "<g font-family=\"sans-serif\" font-size=\"11\" fill=\"#333\">\n";
  std::snprintf(buf, sizeof buf,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#fafafa\" stroke=\"#999\"/>\n", p.x0,
                p.y0, p.w, p.h);
  o << buf;
  for (double t : nice_ticks(p.xlo, p.xhi, 5)) {
    std::snprintf(
        buf, sizeof buf,
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/><text x=\"%.1f\" y=\"%.1f\" "
        "text-anchor=\"middle\">%s</text>\n",
        p.px(t), p.y0, p.px(t), p.y0 + p.h, p.px(t), p.y0 + p.h + 14, num_label(t).c_str());
    o << buf;
  }
  for (double t : nice_ticks(p.ylo, p.yhi, 5)) {
    std::string lab = percent_y ? num_label(std::round(t * 1000) / 10) + "%" : num_label(t);
    std::snprintf(
        buf, sizeof buf,
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/><text x=\"%.1f\" y=\"%.1f\" "
        "text-anchor=\"end\">%s</text>\n",
        p.x0, p.py(t), p.x0 + p.w, p.py(t), p.x0 - 4, p.py(t) + 4, lab.c_str());
    o << buf;
  }
  std::snprintf(buf, sizeof buf,
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">%s</text>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 %.1f %.1f)\">%s</text>\n"
                "<clipPath id=\"clip%d\"><rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\"/></clipPath>\n",
                p.x0 + p.w / 2, p.y0 - 10, title.c_str(), p.x0 + p.w / 2, p.y0 + p.h + 30, xlabel.c_str(), p.x0 - 42,
                p.y0 + p.h / 2, p.x0 - 42, p.y0 + p.h / 2, ylabel.c_str(), id, p.x0, p.y0, p.w, p.h);
  o << buf << "</g>\n";
}

void polyline(std::ostringstream& o, const Panel& p, const std::vector<std::pair<double, double>>& pts,
              const char* color, double width, double opacity, int clip, bool dots, const char* dash = nullptr) {
  if (pts.empty()) return;
  char buf[96];
  o << "<polyline clip-path=\"url(#clip" << clip << ")\" fill=\"none\" stroke=\"" << color << "\" stroke-width=\""
    << width << "\" stroke-opacity=\"" << opacity << "\"" << (dash ? str(" stroke-dasharray=\"", dash, "\"") : "")
    << " points=\"";
  for (const auto& q : pts) {
    if (!std::isfinite(q.second)) continue;
    std::snprintf(buf, sizeof buf, "%.1f,%.1f ", p.px(q.first), p.py(q.second));
    o << buf;
  }
  o << "\"/>\n";
  if (dots)
    for (const auto& q : pts) {
      if (!std::isfinite(q.second)) continue;
      std::snprintf(buf, sizeof buf, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", p.px(q.first),
                    p.py(q.second), color);
      o << buf;
    }
}

void legend(std::ostringstream& o, double x, double y, const std::vector<std::pair<std::string, const char*>>& items) {
  char buf[512];
  for (size_t i = 0; i < items.size(); ++i) {
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" font-family=\"sans-serif\" font-size=\"11\">%s</text>\n",
                  x, y + 14.0 * i, x + 16, y + 14.0 * i, items[i].second, x + 20, y + 14.0 * i + 4,
                  items[i].first.c_str());
    o << buf;
  }
}

}  // namespace

std::string render_svg(const std::vector<StepRecord>& steps, const std::vector<EvalRecord>& evals,
                       const std::vector<std::pair<int64_t, std::vector<LayerRouting>>>& routing) {
  const double W = 1260, H = 400;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";

  // ---- panel 1: loss curves. The y range ignores the first 5% of steps, whose initial loss would squash the rest.
  {
    Panel p{70, 40, 340, 300, 0, 1, 0, 1};
    double xmax = 1, ylo = INFINITY, yhi = -INFINITY;
    size_t skip = steps.size() / 20;
    for (size_t i = 0; i < steps.size(); ++i) {
      xmax = std::max(xmax, (double)steps[i].step);
      if (!std::isfinite(steps[i].loss)) continue;
      ylo = std::min(ylo, steps[i].loss);
      if (i >= skip) yhi = std::max(yhi, steps[i].loss);
    }
    for (const auto& e : evals) {
      xmax = std::max(xmax, (double)e.step);
      for (double v : {e.train_loss, e.val_loss})
        if (std::isfinite(v)) ylo = std::min(ylo, v), yhi = std::max(yhi, v);
    }
    if (!(yhi >= ylo)) ylo = 0, yhi = 1;
    double pad = 0.05 * std::max(yhi - ylo, 1e-3);
    p.xhi = xmax;
    p.ylo = std::max(0.0, ylo - pad);
    p.yhi = yhi + pad;
    axes(o, p, "loss", "step", "cross-entropy (nats)", false, 1);
    std::vector<std::pair<double, double>> tr, ev_tr, ev_val;
    for (const auto& s : steps) tr.emplace_back((double)s.step, s.loss);
    for (const auto& e : evals)
      ev_tr.emplace_back((double)e.step, e.train_loss), ev_val.emplace_back((double)e.step, e.val_loss);
    polyline(o, p, tr, "#9ecae1", 1, 0.8, 1, false);
    polyline(o, p, ev_tr, PALETTE[0], 2, 1, 1, true);
    polyline(o, p, ev_val, PALETTE[1], 2, 1, 1, true);
    std::string last = evals.empty() ? "" : str(" (", fmt(evals.back().val_loss, "%.4f"), ")");
    legend(o, p.x0 + p.w - 140, p.y0 + 14,
           {{"train (step)", "#9ecae1"}, {"train (eval)", PALETTE[0]}, {"val (eval)" + last, PALETTE[1]}});
  }

  // ---- panel 2: the busiest expert's share per layer over evaluations, against the balanced share 1/N.
  {
    Panel p{490, 40, 340, 300, 0, 1, 0, 1};
    double xmax = 1, yhi = 0, balanced = 0;
    for (const auto& r : routing) {
      xmax = std::max(xmax, (double)r.first);
      for (const auto& l : r.second) {
        yhi = std::max(yhi, l.max_share());
        if (!l.share.empty()) balanced = 1.0 / (double)l.share.size();
      }
    }
    p.xhi = xmax;
    p.yhi = yhi > 0 ? std::min(1.0, yhi * 1.1) : 1;
    axes(o, p, "busiest expert's share of routed slots", "step", "share", true, 2);
    size_t nl = routing.empty() ? 0 : routing.back().second.size();
    std::vector<std::pair<std::string, const char*>> items;
    for (size_t li = 0; li < nl; ++li) {
      std::vector<std::pair<double, double>> pts;
      for (const auto& r : routing)
        if (li < r.second.size()) pts.emplace_back((double)r.first, r.second[li].max_share());
      const char* c = PALETTE[li % 8];
      polyline(o, p, pts, c, 2, 1, 2, true);
      items.push_back({str("layer ", routing.back().second[li].layer), c});
    }
    if (balanced > 0) {
      polyline(o, p, {{0, balanced}, {xmax, balanced}}, "#555", 1, 1, 2, false, "4,3");
      items.push_back({"balanced 1/N", "#555"});
    }
    if (routing.empty()) {
      o << "<text x=\"" << p.x0 + p.w / 2 << "\" y=\"" << p.y0 + p.h / 2
        << "\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"12\" fill=\"#777\">no MoE layers or no "
           "evaluation yet</text>\n";
    }
    legend(o, p.x0 + p.w - 110, p.y0 + 14, items);
  }

  // ---- panel 3: heat map of the latest evaluation's shares, layers x experts (white = 0, dark = busiest).
  {
    const double x0 = 910, y0 = 40, w = 320, h = 300;
    o << "<text x=\"" << x0 + w / 2 << "\" y=\"" << y0 - 10
      << "\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"13\" font-weight=\"bold\">expert utilisation"
      << (routing.empty() ? std::string() : str(" at step ", routing.back().first)) << "</text>\n";
    if (!routing.empty() && !routing.back().second.empty()) {
      const auto& layers = routing.back().second;
      size_t ne = 0;
      double smax = 1e-12;
      for (const auto& l : layers) {
        ne = std::max(ne, l.share.size());
        smax = std::max(smax, l.max_share());
      }
      double cw = w / (double)std::max<size_t>(ne, 1), ch = std::min(40.0, h / (double)layers.size());
      char buf[512];
      for (size_t li = 0; li < layers.size(); ++li) {
        const auto& l = layers[li];
        std::snprintf(buf, sizeof buf,
                      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" font-family=\"sans-serif\" "
                      "font-size=\"11\">L%lld</text>\n",
                      x0 - 4, y0 + ch * (li + 0.5) + 4, (long long)l.layer);
        o << buf;
        for (size_t e = 0; e < l.share.size(); ++e) {
          double a = std::isfinite(l.share[e]) ? l.share[e] / smax : 0;
          std::snprintf(
              buf, sizeof buf,
              "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#08519c\" fill-opacity=\"%.3f\" "
              "stroke=\"#ccc\"><title>layer %lld expert %zu: %.1f%%</title></rect>\n",
              x0 + cw * e, y0 + ch * li, cw, ch, std::max(0.0, std::min(1.0, a)), (long long)l.layer, e,
              100 * l.share[e]);
          o << buf;
          if (cw >= 30 && ch >= 14) {  // the share itself, when the cell has room for it
            std::snprintf(buf, sizeof buf,
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-family=\"sans-serif\" "
                          "font-size=\"10\" fill=\"%s\">%.0f%%</text>\n",
                          x0 + cw * (e + 0.5), y0 + ch * (li + 0.5) + 3.5, a > 0.55 ? "white" : "#222",
                          100 * l.share[e]);
            o << buf;
          }
        }
      }
      std::snprintf(
          buf, sizeof buf,
          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"11\">expert "
          "(0..%zu); darkest = %.1f%% of slots</text>\n",
          x0 + w / 2, y0 + ch * layers.size() + 16, ne - 1, 100 * smax);
      o << buf;
    }
  }
  o << "</svg>\n";
  return o.str();
}

// ---------------------------------------------------------------- generated text coloured by routing

namespace {
// Tableau's qualitative colours and the nearest xterm 256-colour entries.
const char* ROUTE_HEX[kRoutingColours] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                                         "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#000080", "#00d7af"};
const int ROUTE_ANSI[kRoutingColours] = {31, 160, 34, 208, 97, 94, 170, 37, 142, 244, 18, 43};

std::string path_of(int64_t e, const std::vector<int64_t>& b, size_t depth) {
  std::vector<int64_t> digits(b.size());
  for (size_t l = b.size(); l-- > 0;) {
    digits[l] = e % b[l];
    e /= b[l];
  }
  std::string s;
  for (size_t l = 0; l < depth; ++l) s += (l ? "." : "") + std::to_string(digits[l]);
  return s;
}

// Runs of bytes with one colour; a UTF-8 continuation byte (10xxxxxx) never starts a run. Calls
// emit(colour or -1, begin, end).
template <class Emit>
void colour_runs(const std::string& text, const std::vector<int32_t>& colour_of_byte, Emit emit) {
  size_t i = 0;
  while (i < text.size()) {
    const int32_t c = colour_of_byte[i];
    size_t j = i + 1;
    while (j < text.size() && ((unsigned char)text[j] & 0xC0) == 0x80) ++j;  // rest of this character
    while (j < text.size() && colour_of_byte[j] == c && text[j] != '\n') {
      ++j;
      while (j < text.size() && ((unsigned char)text[j] & 0xC0) == 0x80) ++j;
    }
    if (text[i] == '\n') j = i + 1;  // a newline is its own run: colours never cross lines
    emit(c, i, j);
    i = j;
  }
}

std::vector<int32_t> byte_colours(const std::string& text, const RoutedLayer& l, const RoutingColours& rc) {
  CM_REQUIRE(l.expert.size() == text.size(), "routing of layer ", l.layer, ": ", l.expert.size(), " decisions for ",
             text.size(), " bytes");
  std::vector<int32_t> c(text.size(), -1);
  for (size_t i = 0; i < text.size(); ++i) {
    const int32_t e = l.expert[i];
    CM_REQUIRE(e >= -1 && e < (int32_t)rc.colour.size(), "routing of layer ", l.layer, ": expert ", e,
               " outside [0, ", rc.colour.size(), ")");
    if (e >= 0) c[i] = rc.colour[e];
  }
  return c;
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    switch (ch) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += ch;
    }
  }
  return o;
}
}  // namespace

const char* routing_colour_hex(int c) { return ROUTE_HEX[((c % kRoutingColours) + kRoutingColours) % kRoutingColours]; }
int routing_colour_ansi(int c) { return ROUTE_ANSI[((c % kRoutingColours) + kRoutingColours) % kRoutingColours]; }

RoutingColours routing_colours(const std::vector<int64_t>& branching) {
  CM_REQUIRE(!branching.empty(), "routing colours: empty tree");
  RoutingColours rc;
  int64_t N = 1, nodes = 1;
  for (int64_t b : branching) N *= b;
  // Deepest level whose prefixes fit in the palette (at least one level).
  rc.depth = 1;
  nodes = branching[0];
  for (size_t d = 1; d < branching.size() && nodes * branching[d] <= kRoutingColours; ++d) {
    nodes *= branching[d];
    rc.depth = (int64_t)d + 1;
  }
  const int64_t per_node = N / nodes, used = std::min<int64_t>(nodes, kRoutingColours);
  rc.colour.resize((size_t)N);
  for (int64_t e = 0; e < N; ++e) rc.colour[(size_t)e] = (int32_t)((e / per_node) % kRoutingColours);
  rc.label.assign((size_t)used, "");
  const bool leaves = rc.depth == (int64_t)branching.size();
  for (int64_t n = 0; n < nodes; ++n) {
    std::string& lab = rc.label[(size_t)(n % kRoutingColours)];
    const std::string path = path_of(n * per_node, branching, (size_t)rc.depth);
    if (!lab.empty()) lab += ", ";
    if (leaves)
      lab += "expert " + std::to_string(n) + (branching.size() > 1 ? " (path " + path + ")" : "");
    else
      lab += "experts " + std::to_string(n * per_node) + "-" + std::to_string((n + 1) * per_node - 1) + " (path " +
             path + ".*)";
  }
  return rc;
}

std::string render_routing_ansi(const std::string& text, const std::vector<RoutedLayer>& layers) {
  std::ostringstream o;
  const std::string reset = "\x1b[0m";
  auto esc = [](int c) { return "\x1b[38;5;" + std::to_string(routing_colour_ansi(c)) + "m"; };
  for (const RoutedLayer& l : layers) {
    RoutingColours rc = routing_colours(l.branching);
    std::vector<int32_t> bc = byte_colours(text, l, rc);
    o << "routing of layer " << l.layer << " (each byte coloured by its highest-gate expert"
      << (rc.depth < (int64_t)l.branching.size() ? "'s path to level " + std::to_string(rc.depth) : "") << "):\n";
    for (size_t c = 0; c < rc.label.size(); ++c)
      o << "  " << esc((int)c) << "\u2588\u2588" << reset << " " << rc.label[c] << "\n";
    colour_runs(text, bc, [&](int32_t c, size_t a, size_t b) {
      const bool paint = c >= 0 && text[a] != '\n';  // a coloured newline shows nothing and can tint the margin
      if (paint) o << esc(c);
      o.write(text.data() + a, (std::streamsize)(b - a));
      if (paint) o << reset;
    });
    o << "\n";
  }
  return o.str();
}

std::string render_routing_html(const std::string& text, const std::vector<RoutedLayer>& layers,
                                const std::string& title) {
  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" << html_escape(title) << "</title>\n<style>\n"
    << "body { font-family: sans-serif; margin: 2em; }\n"
    << "pre { font-size: 15px; line-height: 1.4; white-space: pre-wrap; border: 1px solid #ddd; padding: 1em; }\n"
    << "ul.legend { list-style: none; padding: 0; } ul.legend li { display: inline-block; margin-right: 1.5em; }\n"
    << ".sw { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin-right: 0.3em; }\n";
  for (int c = 0; c < kRoutingColours; ++c)
    o << ".c" << c << " { color: " << routing_colour_hex(c) << "; } .sw.c" << c << " { background: "
      << routing_colour_hex(c) << "; }\n";
  o << "</style></head><body>\n<h1>" << html_escape(title) << "</h1>\n";
  for (const RoutedLayer& l : layers) {
    RoutingColours rc = routing_colours(l.branching);
    std::vector<int32_t> bc = byte_colours(text, l, rc);
    o << "<h2>layer " << l.layer << "</h2>\n<p>Each byte is coloured by the highest-gate expert it took"
      << (rc.depth < (int64_t)l.branching.size() ? " (its path to level " + std::to_string(rc.depth) + ")" : "")
      << "; uncoloured bytes were not read by the model.</p>\n<ul class=\"legend\">\n";
    for (size_t c = 0; c < rc.label.size(); ++c)
      o << "<li><span class=\"sw c" << c << "\"></span>" << html_escape(rc.label[c]) << "</li>\n";
    o << "</ul>\n<pre>";
    colour_runs(text, bc, [&](int32_t c, size_t a, size_t b) {
      const std::string part = html_escape(text.substr(a, b - a));
      if (c < 0)
        o << part;
      else
        o << "<span class=\"c" << c << "\">" << part << "</span>";
    });
    o << "</pre>\n";
  }
  o << "</body></html>\n";
  return o.str();
}

void write_text_file(const std::string& path, const std::string& text) { write_file_atomic(path, text); }

}  // namespace cm
