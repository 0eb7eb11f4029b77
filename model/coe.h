// ClusterMoELM: the ClusterMoE language model (DESIGN.md 4.1) and its API (DESIGN.md 4.8).
//
//   CoEConfig cfg = make_coe_config(128, 4, 4, 4, vocab);      // or set fields, then cfg.validate()
//   ClusterMoELM model(cfg);
//   AdamW opt(model.named_parameters(), ...);                  // model/optim.h
//   for (...) {
//     CoEOutput out = model.forward(ids, targets);             // ids, targets i32 [B, T]
//     out.total_loss.backward();                               // cross-entropy + aux_loss
//     clip_grad_norm(...); opt.step(lr);
//     model.after_step();       // reliability (reads the gradients: before zero_grad), aux-free bias, pruning, step
//     opt.zero_grad();
//   }
//   model.generate(prompt, 200, 0.8f, 40, seed);               // uses the selection cache when enabled
//
// Letters: B batch, T sequence, C d_model, V vocabulary, N experts per MoE layer, K experts per token.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/ops.h"
#include "model/config.h"
#include "model/stats.h"

namespace cm {

struct CoEOutput {
  Tensor logits;             // [B, T, V]
  Tensor loss;               // scalar mean cross-entropy; undefined without targets
  Tensor aux_loss;           // scalar: load_balance_loss + z_loss + diversity_loss (weights applied)
  Tensor load_balance_loss;  // scalar, mean over MoE layers
  Tensor z_loss;             // scalar
  Tensor diversity_loss;     // scalar
  Tensor total_loss;         // loss + aux_loss (what training backpropagates); undefined without targets
  float model_reliability = 1.f;
  std::vector<LayerRoutingStats> layers;  // [L]
};

struct ModelSummary {
  int64_t total_params = 0;       // every trainable scalar (tied embedding counted once)
  int64_t expert_params = 0;      // all experts of all MoE layers (pruned ones included)
  int64_t active_params_per_token = 0;  // total - expert_params + per MoE layer K * params of one expert
  int64_t num_layers = 0;
  int64_t num_moe_layers = 0;
  int64_t num_clusters = 0;       // children of the routing tree's root (1 for a flat router)
  int64_t experts_per_cluster = 0;
  int64_t num_experts = 0;        // per MoE layer
  int64_t experts_per_token = 0;  // K
  int64_t active_experts = 0;     // summed over MoE layers, pruned ones excluded
  float model_reliability = 1.f;
  int64_t step = 0;
  std::string router;
  std::map<std::string, double> to_map() const;
  std::string str() const;  // a few human-readable lines
};

struct Block;        // model/coe.cpp
struct DecodeCache;  // model/coe.cpp

class ClusterMoELM {
 public:
  explicit ClusterMoELM(const CoEConfig& cfg);  // validates cfg; initialises from cfg.seed
  ~ClusterMoELM();
  ClusterMoELM(const ClusterMoELM&) = delete;
  ClusterMoELM& operator=(const ClusterMoELM&) = delete;

  const CoEConfig& config() const { return cfg_; }

  // Moves the parameters to `device` (they are created on the CPU from the seed, so every device starts from the
  // same weights). Gradients are dropped; build the optimizer after this call (an AdamW built before keeps its
  // moments on the old device and refuses to step). The buffers stay on the CPU: the routing bookkeeping that
  // reads and updates them runs on the host. forward() takes ids and targets on any device and moves them.
  // Throws if the device cannot be used.
  void to(Device device);
  Device device() const { return device_; }

  // ids, targets i32 [B, T] with T <= seq_len. Targets may be undefined (no loss).
  CoEOutput forward(const Tensor& ids, const Tensor& targets = Tensor());

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  // Trainable parameters, stable PyTorch-like names ("tok_emb.weight", "blocks.0.attn.qkv.weight",
  // "blocks.0.moe.router.levels.1.weight", "blocks.0.moe.experts.3.w1", "norm_f.weight", ...).
  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  // Non-gradient state a checkpoint must keep (reliability EMAs, output-norm statistics, usage EMAs, aux-free
  // biases, pruning masks and counters, AC running scales, the step), as CPU tensors updated in place: loading a
  // checkpoint is copy_ into these.
  std::vector<std::pair<std::string, Tensor>> named_buffers() const;
  int64_t num_parameters() const;

  // Call after every optimizer step and before zero_grad: reliability (health of each expert from this step's
  // forwards, weights and gradients; after zero_grad there are no gradients to judge), aux-free bias, pruning
  // bookkeeping, step += 1.
  void after_step();
  int64_t step() const;

  // Dropout's random stream (for checkpoints).
  Generator& rng() { return rng_; }

  // ---- metrics (DESIGN.md 4.8)
  // layer_{l}_cluster_{c}_expert_{e} -> share of the layer's routed slots since reset_metrics().
  std::map<std::string, float> get_expert_utilization() const;
  // model_reliability, training_step, layer_{l}_reliability, layer_{l}_cluster_{c}_reliability,
  // layer_{l}_cluster_{c}_expert_{e}_reliability.
  std::map<std::string, float> get_reliability_stats() const;
  // layer_{l}_specialization (mutual information in nats between expert choice and input token since reset) and
  // layer_{l}_cluster_{c}_expert_{e}_specialization (KL of that expert's token distribution from the layer's).
  std::map<std::string, float> get_expert_specialization() const;
  ModelSummary get_model_summary() const;
  void reset_metrics();  // utilization and specialization counters (not reliability: that is state)

  // ---- experts
  // Remove expert e of layer l from routing and compute (what pruning does on its own after the window).
  void prune_expert(int64_t layer, int64_t expert);
  bool expert_pruned(int64_t layer, int64_t expert) const;
  // The parameters of one expert (for inspection and fault injection). On a CUDA model they live on the device:
  // write them with fill_ or copy_, never through f32(), which is a device pointer there.
  std::vector<std::pair<std::string, Tensor>> expert_parameters(int64_t layer, int64_t expert) const;

  // ---- sampling
  // Continue `prompt` (non-empty) by n tokens. temperature <= 0: greedy; top_k > 0 keeps the k most likely.
  // use_cache (and config.use_expert_selection_cache): incremental decoding with per-layer KV cache and cached
  // routing decisions; the same tokens as without. Runs in eval mode under NoGrad; restores the mode.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, int64_t n, float temperature = 1.0f,
                                int64_t top_k = 0, uint64_t seed = 0, bool use_cache = true);

 private:
  // forward, optionally through a decode cache (positions continue after the cached ones).
  CoEOutput run(const Tensor& ids, const Tensor& targets, DecodeCache* cache);

  CoEConfig cfg_;
  bool training_ = true;
  Device device_ = Device::CPU;
  Generator rng_;
  Tensor tok_emb_;   // [V, C]
  Tensor pos_emb_;   // [seq_len, C]
  Tensor lm_head_;   // [V, C]; undefined when tied
  Tensor norm_f_w_;  // [C]
  Tensor norm_f_b_;  // [C]; LayerNorm only
  Tensor step_;      // i32 [1]
  std::vector<std::unique_ptr<Block>> blocks_;
};

// The seed API: a ClusterMoE model with these sizes (see make_coe_config).
std::unique_ptr<ClusterMoELM> create_coe_model(int64_t d_model, int64_t num_layers, int64_t num_clusters,
                                               int64_t experts_per_cluster, int64_t vocab_size,
                                               int64_t n_heads = 4, int64_t d_ff = 0, int64_t seq_len = 128);
std::unique_ptr<ClusterMoELM> create_coe_model(const CoEConfig& cfg);

}  // namespace cm
