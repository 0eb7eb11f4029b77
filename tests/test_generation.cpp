// Generation: rotary positions (forward against a hand rotation, relative-position property, gradchecks), the
// sliding-window attention and the rolling KV cache past seq_len (layer and model level), cached against uncached
// generation for both position kinds, the position kind in config and checkpoints.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/json.h"
#include "model/layers.h"
#include "model/report.h"
#include "model/trainer.h"
#include "tests/files.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {

CoEConfig rope_lm(int64_t seq_len = 8) {
  CoEConfig c;
  c.d_model = 16;
  c.n_layers = 3;
  c.n_heads = 2;
  c.d_ff = 24;
  c.vocab_size = 11;
  c.seq_len = seq_len;
  c.num_clusters = 2;
  c.experts_per_cluster = 2;
  c.top_k_clusters = 2;
  c.top_k_experts = 1;
  c.moe_every = 2;
  c.pos = PosKind::Rope;
  c.init_std = 0.3f;  // logits spread widely at initialisation: greedy choices are far from ties
  c.validate();
  return c;
}

// A 2-step train_lm run on a generated corpus (no download needed); returns the checkpoint's path.
std::string train_tiny(const cm::test::TempDir& dir, const std::vector<std::string>& extra) {
  std::string text;
  for (int i = 0; i < 400; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  cm::test::write_bytes(dir.file("data.txt"), text);
  std::vector<std::string> args = {"--data", dir.file("data.txt"), "--device", "cpu", "--out_dir", dir.file("out"),
                                   "--d_model", "16", "--n_layers", "2", "--n_heads", "2", "--d_ff", "16",
                                   "--num_clusters", "2", "--experts_per_cluster", "2", "--top_k_clusters", "1",
                                   "--top_k_experts", "1", "--seq_len", "16", "--batch_size", "2", "--max_steps",
                                   "2", "--eval_every", "0", "--sample_every", "0", "--log_every", "0"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::ostringstream out, err;
  int rc = run_train_lm(args, out, err);
  REQUIRE_MESSAGE(rc == 0, err.str());
  return checkpoint_path(dir.file("out"), 2);
}

struct Ran {
  int rc;
  std::string out, err;
};
Ran sample(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  int rc = run_sample(args, out, err);
  return {rc, out.str(), err.str()};
}

// Per byte of the terminal text after the legend: the 256-colour index it was printed in (-1: plain).
std::vector<std::pair<char, int>> ansi_bytes(const std::string& s) {
  std::vector<std::pair<char, int>> r;
  int cur = -1;
  for (size_t i = 0; i < s.size();) {
    if (s.compare(i, 7, "\x1b[38;5;") == 0) {
      size_t m = s.find('m', i);
      cur = std::stoi(s.substr(i + 7, m - i - 7));
      i = m + 1;
    } else if (s.compare(i, 4, "\x1b[0m") == 0) {
      cur = -1;
      i += 4;
    } else {
      r.emplace_back(s[i], cur);
      ++i;
    }
  }
  return r;
}

std::vector<int32_t> seq_ids(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> v((size_t)n);
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)(philox_uniform(seed, 0, i) * (float)V);
  return v;
}

}  // namespace

TEST_SUITE("generation") {
  TEST_CASE("rope: equals the rotation written out; scores depend only on the position difference") {
    const int64_t T = 5, D = 6, p0 = 3;
    const float base = 100.f;
    Tensor x = uniform({2, T, D}, 1);
    RopeRows r = rope_rows(p0, T, D, base, Device::CPU);
    std::vector<float> got = rope(x, r).to_f32_vector(), xv = x.to_f32_vector();
    std::vector<float> ref(got.size());
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double a = (double)(p0 + t) * std::pow((double)base, -2.0 * (double)i / (double)D);
          const size_t o = (size_t)((b * T + t) * D);
          const double x1 = xv[o + i], x2 = xv[o + D / 2 + i];
          ref[o + i] = (float)(x1 * std::cos(a) - x2 * std::sin(a));
          ref[o + D / 2 + i] = (float)(x2 * std::cos(a) + x1 * std::sin(a));
        }
    CHECK_CLOSE(rope(x, r), ref, 1e-6f, 1e-5f);

    // q at position m, k at position n: q.k depends on m - n only (shift both by 40).
    Tensor q = uniform({1, D}, 2), k = uniform({1, D}, 3);
    auto dot = [&](int64_t m, int64_t n) {
      std::vector<float> a = rope(q, rope_rows(m, 1, D, base, Device::CPU)).to_f32_vector();
      std::vector<float> b = rope(k, rope_rows(n, 1, D, base, Device::CPU)).to_f32_vector();
      double s = 0;
      for (int64_t i = 0; i < D; ++i) s += (double)a[i] * b[i];
      return s;
    };
    CHECK(dot(7, 2) == doctest::Approx(dot(47, 42)).epsilon(1e-5));
    CHECK(dot(7, 2) != doctest::Approx(dot(7, 3)).epsilon(1e-3));
  }

  TEST_CASE("rope and windowed attention: gradcheck") {
    RopeRows r = rope_rows(2, 4, 4, 10000.f, Device::CPU);
    GradcheckResult g = gradcheck([&](const std::vector<Tensor>& in) { return rope(in[0], r); },
                                  {cm::test::param({2, 4, 4}, 5)});
    CHECK_MESSAGE(g.ok, g.message);
    // Window 2 over 5 positions: the band mask is active.
    GradcheckResult w = gradcheck(
        [&](const std::vector<Tensor>& in) { return windowed_causal_attention(in[0], in[1], in[2], 2); },
        {cm::test::param({1, 2, 5, 4}, 6), cm::test::param({1, 2, 5, 4}, 7), cm::test::param({1, 2, 5, 4}, 8)});
    CHECK_MESSAGE(w.ok, w.message);
  }

  TEST_CASE("windowed attention: each query sees exactly its last `window` keys") {
    const int64_t T = 7, D = 3, W = 3;
    Tensor q = uniform({1, 1, T, D}, 11), k = uniform({1, 1, T, D}, 12), v = uniform({1, 1, T, D}, 13);
    std::vector<float> qv = q.to_f32_vector(), kv = k.to_f32_vector(), vv = v.to_f32_vector(), ref;
    for (int64_t i = 0; i < T; ++i) {
      std::vector<double> s;
      for (int64_t j = std::max<int64_t>(0, i - W + 1); j <= i; ++j) {
        double d = 0;
        for (int64_t c = 0; c < D; ++c) d += (double)qv[i * D + c] * kv[j * D + c];
        s.push_back(d / std::sqrt((double)D));
      }
      double mx = *std::max_element(s.begin(), s.end()), z = 0;
      for (double& e : s) z += (e = std::exp(e - mx));
      for (int64_t c = 0; c < D; ++c) {
        double y = 0;
        for (size_t j = 0; j < s.size(); ++j) y += s[j] / z * vv[(std::max<int64_t>(0, i - W + 1) + j) * D + c];
        ref.push_back((float)y);
      }
    }
    CHECK_CLOSE(windowed_causal_attention(q, k, v, W), ref, 1e-6f, 1e-5f);
  }

  TEST_CASE("rolling KV cache: an attention layer decoding past the window equals the sliding-window forward") {
    CoEConfig c = rope_lm(6);
    Generator gen(3);
    Attention att(c, gen);
    const int64_t N = 20, C = c.d_model, D = c.head_dim(), W = c.seq_len;
    Tensor x = uniform({1, N, C}, 21);
    NoGrad ng;
    std::vector<float> ref = att.forward(x, 0, rope_rows(0, N, D, c.rope_base, Device::CPU)).to_f32_vector();
    // Prefills shorter and longer than the window, then one position at a time, around the ring several times.
    for (int64_t P : {int64_t(1), int64_t(4), W + 3}) {
      CAPTURE(P);
      KVCache kv;
      kv.k = Tensor::zeros({1, c.n_heads, W, D});
      kv.v = Tensor::zeros({1, c.n_heads, W, D});
      std::vector<float> got =
          att.forward(x.slice(1, 0, P), 0, rope_rows(0, P, D, c.rope_base, Device::CPU), &kv).to_f32_vector();
      for (int64_t p = P; p < N; ++p) {
        std::vector<float> y =
            att.forward(x.slice(1, p, p + 1), p, rope_rows(p, 1, D, c.rope_base, Device::CPU), &kv).to_f32_vector();
        got.insert(got.end(), y.begin(), y.end());
      }
      CHECK(kv.len == W);
      CHECK(kv.next == N);
      REQUIRE(got.size() == ref.size());
      CHECK(cm::test::first_mismatch(got, ref, 1e-5f, 1e-4f) == -1);
    }
  }

  TEST_CASE("rope model: cached and uncached generation agree, within and past the window") {
    for (RouterKind rk : {RouterKind::Cluster, RouterKind::AC}) {
      CoEConfig c = rope_lm(8);
      c.router = rk;
      c.moe_every = 1;
      ClusterMoELM m(c);
      std::vector<int32_t> prompt = seq_ids(3, c.vocab_size, 4);
      for (float temp : {0.f, 0.9f}) {
        CAPTURE(temp);
        // 4 new bytes stay inside the window of 8; 30 go around the ring several times. Uncached past the window
        // recomputes the last L * (W - 1) + 1 = 22 bytes at their absolute positions.
        CHECK(m.generate(prompt, 4, temp, 0, 7, true) == m.generate(prompt, 4, temp, 0, 7, false));
        std::vector<int32_t> a = m.generate(prompt, 30, temp, 0, 7, true);
        CHECK(a == m.generate(prompt, 30, temp, 0, 7, false));
        // A prompt longer than the reach: the prefill keeps its last W keys.
        std::vector<int32_t> longp = seq_ids(40, c.vocab_size, 9);
        CHECK(m.generate(longp, 12, temp, 0, 7, true) == m.generate(longp, 12, temp, 0, 7, false));
      }
    }
  }

  TEST_CASE("rope model: the rolling cache's greedy tokens are the argmax of the sliding-window forward") {
    CoEConfig c = rope_lm(8);
    ClusterMoELM m(c);
    m.eval();
    std::vector<int32_t> prompt = seq_ids(5, c.vocab_size, 14);
    std::vector<int32_t> gen = m.generate(prompt, 40, 0.f, 0, 0, true);
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), gen.begin(), gen.end());
    NoGrad ng;
    // One forward of all 45 bytes (T > seq_len: every position attends to its last 8).
    Tensor logits = m.forward(Tensor::from_vector(all, {1, (int64_t)all.size()})).logits;
    std::vector<float> lv = logits.to_f32_vector();
    const int64_t V = c.vocab_size;
    int64_t agree = 0;
    for (size_t i = 0; i < gen.size(); ++i) {
      const float* row = lv.data() + (prompt.size() - 1 + i) * V;
      agree += (int64_t)(std::max_element(row, row + V) - row) == gen[i];
    }
    CHECK(agree == (int64_t)gen.size());
    // Learned positions refuse a sequence past seq_len.
    CoEConfig l = c;
    l.pos = PosKind::Learned;
    ClusterMoELM ml(l);
    CHECK_THROWS_AS(ml.forward(Tensor::from_vector(all, {1, (int64_t)all.size()})), Error);
  }

  TEST_CASE("rope model: the uncached path's reach is exactly what the last position sees") {
    // Window 2 over 3 layers: the last position sees L * (W - 1) + 1 = 4 bytes, each with a weight large enough to
    // tell rounding from dependence.
    ClusterMoELM m(rope_lm(2));
    m.eval();
    const int64_t V = 11, n = 12, reach = m.generation_reach();
    CHECK(reach == 4);
    std::vector<int32_t> all = seq_ids(n, V, 17);
    NoGrad ng;
    auto last_row = [&](int64_t from) {  // forward() of all[from ..] at positions 0 ..: rope sees differences only
      Tensor part = Tensor::from_vector(std::vector<int32_t>(all.begin() + from, all.end()), {1, n - from});
      std::vector<float> v = m.forward(part).logits.to_f32_vector();
      return std::vector<float>(v.end() - V, v.end());
    };
    auto maxdiff = [&](const std::vector<float>& a, const std::vector<float>& b) {
      float d = 0;
      for (int64_t i = 0; i < V; ++i) d = std::max(d, std::fabs(a[i] - b[i]));
      return d;
    };
    const std::vector<float> full = last_row(0);
    CHECK(maxdiff(last_row(n - reach), full) < 1e-5f);      // the reach recompute: rounding only
    CHECK(maxdiff(last_row(n - reach - 3), full) < 1e-5f);  // more bytes add nothing
    CHECK(maxdiff(last_row(n - reach + 1), full) > 1e-3f);  // one byte fewer changes the logits
  }

  TEST_CASE("learned positions past the window: cached and uncached generation agree") {
    CoEConfig c = rope_lm(8);
    c.pos = PosKind::Learned;
    ClusterMoELM m(c);
    std::vector<int32_t> prompt = seq_ids(3, c.vocab_size, 4);
    CHECK(m.generate(prompt, 20, 0.f, 0, 7, true) == m.generate(prompt, 20, 0.f, 0, 7, false));
  }

  TEST_CASE("position kind: config validation, map round trip, parameters, checkpoint") {
    CoEConfig c = rope_lm(8);
    CHECK(c.to_map().at("pos") == "rope");
    CHECK(CoEConfig::from_map(c.to_map()).pos == PosKind::Rope);
    CHECK(CoEConfig().pos == PosKind::Learned);  // the default
    auto msg = [](CoEConfig x) -> std::string {
      try {
        x.validate();
      } catch (const Error& e) {
        return e.what();
      }
      return "";
    };
    CoEConfig odd = c;
    odd.d_model = 18;
    odd.n_heads = 2;  // head size 9
    CHECK(msg(odd).find("CoEConfig.pos = rope") != std::string::npos);
    odd.pos = PosKind::Learned;
    CHECK(msg(odd) == "");
    CoEConfig base = c;
    base.rope_base = 1.f;
    CHECK(msg(base).find("CoEConfig.rope_base") != std::string::npos);
    CHECK_THROWS_WITH_AS(c.set("pos", "alibi"), doctest::Contains("expected learned or rope"), Error);

    // rope has no position table.
    ClusterMoELM m(c);
    for (const auto& kv : m.named_parameters()) CHECK(kv.first != "pos_emb.weight");
    CoEConfig l = c;
    l.pos = PosKind::Learned;
    CHECK(ClusterMoELM(l).num_parameters() == m.num_parameters() + c.seq_len * c.d_model);

    // train_lm --pos rope writes the kind into the checkpoint; sample reads it back and decodes past the window.
    cm::test::TempDir dir("rope_ckpt");
    std::string text;
    for (int i = 0; i < 400; ++i) text += "the quick brown fox jumps over the lazy dog. ";
    cm::test::write_bytes(dir.file("data.txt"), text);
    std::ostringstream out, err;
    int rc = run_train_lm({"--data", dir.file("data.txt"), "--device", "cpu", "--out_dir", dir.file("out"),
                           "--d_model", "16", "--n_layers", "2", "--n_heads", "2", "--d_ff", "16",
                           "--num_clusters", "2", "--experts_per_cluster", "2", "--top_k_clusters", "1",
                           "--top_k_experts", "1", "--seq_len", "16", "--batch_size", "2", "--max_steps", "2",
                           "--eval_every", "0", "--sample_every", "0", "--log_every", "0", "--pos", "rope"},
                          out, err);
    REQUIRE_MESSAGE(rc == 0, err.str());
    std::string ck = checkpoint_path(dir.file("out"), 2);
    SafeTensors st = load_safetensors(ck);
    std::string stored_pos;
    for (const auto& kv : json_parse(st.require_meta("config")).obj)
      if (kv.first == "pos") stored_pos = kv.second.as_string("pos");
    CHECK(stored_pos == "rope");
    CHECK(st.find("pos_emb.weight") == nullptr);
    std::ostringstream so, se;
    REQUIRE_MESSAGE(run_sample({"--ckpt", ck, "--prompt", "the", "--max_new_tokens", "40", "--seed", "1"}, so, se) == 0,
                    se.str());
    CHECK(so.str().size() == 3 + 40 + 1);
  }

  TEST_CASE("show_routing: terminal and HTML colours are the routing decisions recorded during generation") {
    CoEConfig c = rope_lm(8);
    c.pos = PosKind::Learned;
    c.n_layers = 2;
    c.moe_every = 1;
    c.num_clusters = 2;
    c.experts_per_cluster = 3;
    c.top_k_clusters = 2;  // K = 2, one expert from each cluster: the router gives them in cluster order, which
    c.top_k_experts = 1;   // need not be gate order; the colour is the highest-gate expert
    c.validate();
    ClusterMoELM m(c);
    std::vector<int32_t> prompt = seq_ids(4, c.vocab_size, 31);
    GenerationRouting r;
    std::vector<int32_t> gen = m.generate(prompt, 20, 1.0f, 0, 3, true, &r);
    // The window slides (learned positions, W = 8): bytes keep the decision of their first read.
    REQUIRE(r.first == 0);
    REQUIRE(r.bytes() == (int64_t)(prompt.size() + gen.size()));
    CHECK(r.k == std::vector<int64_t>({2, 2}));
    // Each byte's two experts are distinct, with gates in (0, 1], highest gate first.
    int64_t unordered = 0;
    for (size_t l = 0; l < 2; ++l) {
      REQUIRE(r.gates[l].size() == r.experts[l].size());
      for (int64_t i = 0; i < r.bytes(); ++i) {
        const float g0 = r.gates[l][(size_t)(2 * i)], g1 = r.gates[l][(size_t)(2 * i + 1)];
        CHECK(r.experts[l][(size_t)(2 * i)] != r.experts[l][(size_t)(2 * i + 1)]);
        CHECK((g1 > 0.f && g0 <= 1.f));
        unordered += g0 < g1;
      }
    }
    CHECK(unordered == 0);
    {
      // Inside the window the recorded decisions are the ones a forward of the whole text makes: per layer, the
      // same rows per expert (K = 2 slots per byte, so both recorded experts of each byte count).
      CoEConfig w = c;
      w.seq_len = 32;
      ClusterMoELM mw(w);
      GenerationRouting rw;
      std::vector<int32_t> gw = mw.generate(prompt, 20, 1.0f, 0, 3, true, &rw);
      std::vector<int32_t> all = prompt;
      all.insert(all.end(), gw.begin(), gw.end());
      REQUIRE(rw.bytes() == (int64_t)all.size());
      mw.eval();
      NoGrad ng;
      CoEOutput o = mw.forward(Tensor::from_vector(all, {1, (int64_t)all.size()}));
      for (size_t l = 0; l < 2; ++l) {
        std::vector<int64_t> rows(6, 0);
        for (int32_t e : rw.experts[l]) ++rows[(size_t)e];
        CHECK(rows == o.layers[l].expert_rows);
      }
    }
    // Without the cache there is nothing to read: an error, not a silent second forward.
    CHECK_THROWS_WITH_AS(m.generate(prompt, 3, 1.0f, 0, 3, false, &r), doctest::Contains("expert-selection cache"),
                         Error);

    std::string text;
    for (int32_t t : prompt) text += (char)('a' + t);
    for (int32_t t : gen) text += (char)('a' + t);
    std::vector<RoutedLayer> layers;
    for (int64_t l : {int64_t(1), int64_t(0)}) {
      RoutedLayer rl{l, c.branching(), {}};
      for (int64_t i = 0; i < r.bytes(); ++i) rl.expert.push_back(r.experts[(size_t)l][(size_t)(i * 2)]);
      std::set<int32_t> distinct(rl.expert.begin(), rl.expert.end());
      CHECK(distinct.size() >= 2);  // the check below can tell experts apart
      layers.push_back(rl);
    }
    layers[0].expert[3] = -1;  // a byte without a decision is plain

    // Terminal: per layer, a legend "<colour>██ expert e (path c.j)" then the text.
    std::string ansi = render_routing_ansi(text, layers);
    size_t at = 0;
    for (const RoutedLayer& l : layers) {
      at = ansi.find("routing of layer " + std::to_string(l.layer), at);
      REQUIRE(at != std::string::npos);
      std::map<int, int> code_of_expert;  // from the printed legend
      for (int e = 0; e < 6; ++e) {
        std::string lab = "expert " + std::to_string(e) + " (path " + std::to_string(e / 3) + "." +
                          std::to_string(e % 3) + ")";
        size_t p = ansi.find(lab, at);
        REQUIRE(p != std::string::npos);
        size_t q = ansi.rfind("\x1b[38;5;", p);
        code_of_expert[e] = std::stoi(ansi.substr(q + 7));
      }
      CHECK(std::set<int>({code_of_expert[0], code_of_expert[1], code_of_expert[2], code_of_expert[3],
                           code_of_expert[4], code_of_expert[5]})
                .size() == 6);
      size_t body = ansi.find("(path 1.2)", at);
      body = ansi.find('\n', body) + 1;
      std::vector<std::pair<char, int>> bytes = ansi_bytes(ansi.substr(body, text.size() * 16));
      REQUIRE(bytes.size() >= text.size());
      for (size_t i = 0; i < text.size(); ++i) {
        CAPTURE(i);
        CHECK(bytes[i].first == text[i]);
        CHECK(bytes[i].second == (l.expert[i] < 0 ? -1 : code_of_expert[l.expert[i]]));
      }
      at = body;
    }

    // HTML: the legend's classes and the text's spans, byte by byte.
    RoutedLayer l0 = layers[0];  // two more bytes that HTML escapes
    l0.expert.push_back(l0.expert[0]);
    l0.expert.push_back(l0.expert[1]);
    std::string html = render_routing_html(text + "<&", {l0}, "t <x>");
    CHECK(html.find("<title>t &lt;x&gt;</title>") != std::string::npos);
    std::map<int, int> class_of_expert;
    for (int e = 0; e < 6; ++e) {
      size_t p = html.find("</span>expert " + std::to_string(e) + " ");
      REQUIRE(p != std::string::npos);
      size_t q = html.rfind("class=\"sw c", p);
      class_of_expert[e] = std::stoi(html.substr(q + 11));
    }
    std::string pre = html.substr(html.find("<pre>") + 5);
    pre = pre.substr(0, pre.find("</pre>"));
    std::vector<std::pair<std::string, int>> got;  // each character (entities whole) with its class
    int cur = -1;
    for (size_t i = 0; i < pre.size();) {
      if (pre.compare(i, 14, "<span class=\"c") == 0) {
        cur = std::stoi(pre.substr(i + 14));
        i = pre.find('>', i) + 1;
      } else if (pre.compare(i, 7, "</span>") == 0) {
        cur = -1;
        i += 7;
      } else {
        size_t n = pre[i] == '&' ? pre.find(';', i) + 1 - i : 1;
        got.emplace_back(pre.substr(i, n), cur);
        i += n;
      }
    }
    const std::string full = text + "<&";
    REQUIRE(got.size() == full.size());
    for (size_t i = 0; i < full.size(); ++i) {
      CAPTURE(i);
      CHECK(got[i].first == (full[i] == '<' ? "&lt;" : full[i] == '&' ? "&amp;" : std::string(1, full[i])));
      CHECK(got[i].second == (l0.expert[i] < 0 ? -1 : class_of_expert[l0.expert[i]]));
    }
  }

  TEST_CASE("routing colours: one per expert up to 12, then by cluster; shared colours listed") {
    RoutingColours a = routing_colours({2, 3});
    CHECK(a.depth == 2);
    CHECK(a.colour == std::vector<int32_t>({0, 1, 2, 3, 4, 5}));
    RoutingColours b = routing_colours({4, 4, 4});  // 64 experts: by cluster (level 1), 16 experts each
    CHECK(b.depth == 1);
    CHECK(b.colour[15] == 0);
    CHECK(b.colour[16] == 1);
    CHECK(b.label[1] == "experts 16-31 (path 1.*)");
    RoutingColours f = routing_colours({14});  // flat, wider than the palette: 12 and 13 share 0 and 1
    CHECK(f.colour[13] == 1);
    CHECK(f.label[1] == "expert 1, expert 13");
  }

  TEST_CASE("sample --show_routing: coloured text and page; bad values exit 2") {
    cm::test::TempDir dir("show_routing");
    std::string ck = train_tiny(dir, {});
    std::string page = dir.file("routing.html");
    std::vector<std::string> base = {"--ckpt", ck, "--prompt", "the ", "--max_new_tokens", "30", "--seed", "2"};
    auto with = [&](std::vector<std::string> extra) {
      std::vector<std::string> a = base;
      a.insert(a.end(), extra.begin(), extra.end());
      return sample(a);
    };
    Ran plain = with({});
    REQUIRE_MESSAGE(plain.rc == 0, plain.err);
    Ran shown = with({"--show_routing", "--color", "always", "--routing_html", page});
    REQUIRE_MESSAGE(shown.rc == 0, shown.err);
    CHECK(shown.out.find("routing of layer 1") != std::string::npos);  // bare: the last MoE layer
    CHECK(shown.out.find("\x1b[38;5;") != std::string::npos);
    // The same text as without the flag, once the colours are taken out.
    std::string stripped;
    for (auto& [ch, code] : ansi_bytes(shown.out.substr(shown.out.find("(path 1.1)")))) stripped += ch;
    CHECK(stripped.find(plain.out.substr(0, plain.out.size() - 1)) != std::string::npos);
    CHECK(std::filesystem::exists(page));
    CHECK(cm::test::read_bytes(page).find("<h2>layer 1</h2>") != std::string::npos);
    Ran all = with({"--show_routing", "all", "--color", "never", "--routing_html", page});
    CHECK(all.rc == 0);
    CHECK(all.out == plain.out);  // no colours asked: the plain text
    std::string both = cm::test::read_bytes(page);
    CHECK(both.find("<h2>layer 0</h2>") != std::string::npos);
    CHECK(both.find("<h2>layer 1</h2>") != std::string::npos);
    CHECK(with({"--show_routing", "0", "--color", "always", "--routing_html", ""}).out.find("routing of layer 0") !=
          std::string::npos);

    for (std::vector<std::string> bad : {std::vector<std::string>{"--show_routing", "abc"},
                                         std::vector<std::string>{"--show_routing", "2"},
                                         std::vector<std::string>{"--show_routing", "-1"},
                                         std::vector<std::string>{"--show_routing", "last", "--cache", "0"},
                                         std::vector<std::string>{"--show_routing", "--color", "purple"}}) {
      Ran r = with(bad);
      CAPTURE(r.err);
      CHECK(r.rc == 2);
      CHECK(r.err.find(bad[0] == "--show_routing" && bad.size() == 2 ? "--show_routing" : "--") != std::string::npos);
    }
    CHECK(with({"--show_routing", "abc"}).err.find("'abc'") != std::string::npos);
    CHECK(with({"--show_routing", "last", "--cache", "0"}).err.find("--cache 0") != std::string::npos);
    // A dense layer has no routing to show.
    cm::test::TempDir dir2("show_routing_dense");
    std::string ck2 = train_tiny(dir2, {"--moe_every", "2"});
    Ran dense = sample({"--ckpt", ck2, "--show_routing", "1", "--max_new_tokens", "3"});
    CHECK(dense.rc == 2);
    CHECK(dense.err.find("not an MoE layer of this model (MoE layers: 0)") != std::string::npos);
  }
}
