// The training loop of train_lm, as a library function so that tests can run short trainings in-process.
//
// One step (llm.c's loop, nanoGPT's schedule):
//   lr = lr_at(step)                                      warmup, then cosine to min_lr (model/optim.h)
//   grad_accum times: x, y = random windows [B, T]; out = model.forward(x, y);
//                     backward(out.total_loss / grad_accum)  (cross-entropy + the model's aux loss)
//   norm = clip_grad_norm(params, grad_clip); AdamW step; model.after_step(); zero_grad
// Around the steps: evaluation on fixed batches of both splits (and the routing summary, log rows, curves.svg),
// a text sample, a checkpoint (atomic, keep_last newest kept).
//
// Reproducibility: everything random is a counter-based stream whose position is saved - the data windows
// (data RNG), dropout (the model's generator), initialisation (seed) - so a run resumed from a checkpoint
// computes the same losses, bit for bit, as the uninterrupted run.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "model/cli.h"
#include "model/report.h"

namespace cm {

struct TrainResult {
  int64_t start_step = 0;           // 0, or the checkpoint's step when resumed
  int64_t final_step = 0;           // optimizer steps done when train() returned
  std::vector<double> step_losses;  // cross-entropy of each step this call ran, in order
  std::vector<EvalRecord> evals;    // evaluations this call ran
  std::string last_checkpoint;      // "" when none was written
  std::string device;               // "cpu" or "cuda"
  // Host synchronisations (engine/host_sync.h: stream waits, real on CUDA, would-be on the CPU) of the steps that
  // neither logged nor reached an eval/sample/save boundary, and how many such steps there were.
  int64_t quiet_steps = 0;
  int64_t quiet_step_syncs = 0;
  double host_syncs_per_step() const { return quiet_steps ? (double)quiet_step_syncs / (double)quiet_steps : 0.0; }
};

// From argv (without the program name) to options: flag syntax, the device's default preset, a resumed run's
// stored settings, explicit flags last. *help is set when --help was given (options are then defaults).
// Throws UsageError for bad flags and cm::Error for an unreadable checkpoint named by --resume. The usage text
// (for --help and flag errors) is formatted only when `usage` is not null.
TrainOptions resolve_train_args(const std::vector<std::string>& args, bool* help, std::string* usage);

// Runs (or, with o.resume set, continues) a training run. Console output goes to `out`.
// Throws cm::Error for bad data, configs, checkpoints and for a non-finite loss (naming the step).
TrainResult train(const TrainOptions& o, std::ostream& out);

// The programs' whole behaviour, in-process (train_lm.cpp and sample.cpp only call these, so tests can check
// exit codes and messages): 0 on success (and for --help), 2 for any cm::Error (bad flags, data, configs,
// checkpoints, a non-finite loss) after printing it to `err` (with the usage for flag errors), 1 for other
// exceptions.
int run_train_lm(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_sample(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// On a machine whose cores are shared (this project's 2-core machines run builds and benches beside training),
// OpenMP threads that spin at barriers starve the thread they wait for: 100 steps of the cpu preset took 29 to
// 190 s with spinning and 13 to 32 s with sleeping waits under the same load. libgomp reads its wait policy from
// the environment before main() runs, so the programs restart themselves once with OMP_WAIT_POLICY=passive,
// unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT. Returns only when no restart happened.
void reexec_with_passive_openmp(char** argv);

// Model FLOPs per token for one training step (forward + backward): 6 x active parameters per token plus the
// attention scores and values, 12 x layers x T x C (the PaLM appendix's count, as llm.c uses).
double train_flops_per_token(int64_t active_params, int64_t n_layers, int64_t seq_len, int64_t d_model);

}  // namespace cm
