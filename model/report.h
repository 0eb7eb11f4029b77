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

}  // namespace cm
