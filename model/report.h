// What a training run shows and leaves behind: console tables and lines, log.csv, routing.csv and curves.svg.
// Nothing here knows the model: the trainer hands over plain numbers.
//
//   log.csv      step,kind,loss,val_loss,aux,lr,grad_norm,ms,tok_per_s     (kind: train | eval)
//   routing.csv  step,layer,expert,cluster,tokens,share,reliability        (one row per expert per MoE layer per eval)
//   curves.svg   loss curves (train steps, eval train/val) and expert utilisation, rewritten at each eval
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace cm {

// "1,115,394"
std::string with_commas(int64_t v);
// "4m05s", "1h02m", "12.3s"
std::string format_duration(double seconds);
// A two-column box of settings, one "name value" row each, with an optional title line.
void print_table(std::ostream& os, const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows);

// One MoE layer's routing at one evaluation. Experts are numbered leaf-first within clusters:
// expert e belongs to cluster e / experts_per_cluster.
struct LayerRouting {
  int64_t layer = 0;
  int64_t experts_per_cluster = 1;
  std::vector<double> tokens;       // [N] routed slots since the last evaluation
  std::vector<double> share;        // [N] tokens / total slots
  std::vector<double> reliability;  // [N] in (0, 1]
  double dropped_fraction = 0;      // slots dropped by the capacity limit
  double mean_reliability = 1;

  double max_share() const;
  int64_t dead_experts() const;  // experts that received no slot at all
};

struct StepRecord {
  int64_t step;
  double loss, aux, lr, grad_norm, ms, tok_per_s;
};
struct EvalRecord {
  int64_t step;
  double train_loss, val_loss;
};

// The run's history, mirrored in out_dir/log.csv and out_dir/routing.csv as it grows.
class RunReport {
 public:
  // Opens (creates) out_dir's files. resume_step < 0: a fresh run, files are started anew. resume_step >= 0:
  // the rows up to and including that step are kept (and reloaded for the plot), later ones - written by the
  // interrupted run after its last checkpoint - are dropped, so a resumed log reads like an uninterrupted one.
  RunReport(std::string out_dir, int64_t resume_step);

  void add_step(const StepRecord& r);
  void add_eval(const EvalRecord& r, const std::vector<LayerRouting>& routing);
  // Rewrites curves.svg from the history (atomically: a viewer never sees half a picture).
  void write_svg() const;

  const std::vector<StepRecord>& steps() const { return steps_; }
  const std::vector<EvalRecord>& evals() const { return evals_; }
  std::string svg_path() const;

 private:
  std::string dir_;
  std::vector<StepRecord> steps_;
  std::vector<EvalRecord> evals_;
  std::vector<std::pair<int64_t, std::vector<LayerRouting>>> routing_;  // per eval step
};

// The SVG itself, from plain history (exposed for tests).
std::string render_svg(const std::vector<StepRecord>& steps, const std::vector<EvalRecord>& evals,
                       const std::vector<std::pair<int64_t, std::vector<LayerRouting>>>& routing);

// Console: per-layer routing summary at an evaluation.
void print_routing_summary(std::ostream& os, const std::vector<LayerRouting>& layers);

// ---------------------------------------------------------------- generated text coloured by routing
// `sample --show_routing`: each byte of the text coloured by the expert path it took in an MoE layer, as terminal
// text (ANSI 256-colour escapes) and as an HTML page, each with a legend. The decisions come from the model's
// expert-selection cache (ClusterMoELM::generate's GenerationRouting); this code only draws them.
//
// Colours. A byte's expert is its highest-gate one; its path is the expert's digits in the tree [b1, ..., bD]
// (expert 5 of [2, 4] is path 1.1: cluster 1, its expert 1). The colour is the path cut at the deepest level that
// has at most 12 prefixes, so up to 12 experts get one colour each, and a bigger tree is coloured by cluster (or
// by node of the deepest level that fits). A first level wider than 12 repeats colours: node i gets colour i % 12,
// and the legend lists every node that shares a colour.
struct RoutedLayer {
  int64_t layer = 0;
  std::vector<int64_t> branching;  // the layer's routing tree, product N
  std::vector<int32_t> expert;     // [bytes] highest-gate expert of each byte; -1: not recorded (uncoloured)
};
struct RoutingColours {
  int64_t depth = 1;                  // path levels that decide the colour
  std::vector<int32_t> colour;        // [N] colour of each expert, in [0, 12)
  std::vector<std::string> label;     // [colours used] what each colour stands for: "expert 5 (path 1.1)", ...
};
RoutingColours routing_colours(const std::vector<int64_t>& branching);
constexpr int kRoutingColours = 12;
const char* routing_colour_hex(int c);  // "#1f77b4", ...
int routing_colour_ansi(int c);         // xterm 256-colour index

// text [bytes]; layers: the ones to show (each expert vector as long as text). The terminal form prints, per
// layer, a header, the legend, then the text; a byte without a decision is printed plain. UTF-8 sequences stay
// whole (a continuation byte takes its lead byte's colour).
std::string render_routing_ansi(const std::string& text, const std::vector<RoutedLayer>& layers);
// The same as a standalone HTML page (CSS classes c0 .. c11, a legend list, a <pre> per layer; the title and
// text are escaped).
std::string render_routing_html(const std::string& text, const std::vector<RoutedLayer>& layers,
                                const std::string& title);
// Writes text to path atomically (temporary file, then rename).
void write_text_file(const std::string& path, const std::string& text);

}  // namespace cm
