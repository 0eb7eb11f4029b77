// The trainer end to end: tokenizer, data, run report, short trainings on real text (val loss falls, one batch
// is memorised), bit-exact resume, checkpoint round trip, seeded sampling, and the programs' bad-input paths
// (exit 2, a message, out_dir untouched). Tiny models: each training here takes a second or two on 2 cores.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>

#include "tests/corpus.h"
#include "tests/files.h"
#include "engine/host_sync.h"
#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/data.h"
#include "model/optim.h"
#include "model/report.h"
#include "model/tokenizer.h"
#include "model/trainer.h"

using namespace cm;
namespace fs = std::filesystem;
using cm::test::read_bytes;
using cm::test::TempDir;
using cm::test::write_bytes;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The first `n` bytes of the test text (tinyshakespeare, or the generated play offline; tests/corpus.h) in a
// temp file: the whole file is not needed for a few steps.
std::string shakespeare_excerpt(const TempDir& dir, size_t n) {
  std::string path = dir.file("shakespeare.txt");
  write_bytes(path, cm::test::test_text().bytes.substr(0, n));
  return path;
}

// A tiny ClusterMoE that trains in a second: 2 layers, 2 clusters of 2 experts, width 32, context 32.
// out_dir "" leaves --out_dir to the caller.
std::vector<std::string> tiny_args(const std::string& data, const std::string& out_dir) {
  std::vector<std::string> a = {"--data", data, "--device", "cpu"};  // the CUDA suite has its own runs
  if (!out_dir.empty()) a.insert(a.end(), {"--out_dir", out_dir});
  std::vector<std::string> rest = {"--d_model",
                                   "32",
                                   "--n_layers",
                                   "2",
                                   "--n_heads",
                                   "2",
                                   "--d_ff",
                                   "64",
                                   "--num_clusters",
                                   "2",
                                   "--experts_per_cluster",
                                   "2",
                                   "--top_k_clusters",
                                   "1",
                                   "--top_k_experts",
                                   "1",
                                   "--seq_len",
                                   "32",
                                   "--batch_size",
                                   "8",
                                   "--eval_iters",
                                   "4",
                                   "--sample_every",
                                   "0",
                                   "--log_every",
                                   "0",
                                   "--warmup_steps",
                                   "5",
                                   "--lr",
                                   "3e-3"};
  a.insert(a.end(), rest.begin(), rest.end());
  return a;
}
std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TrainOptions options(const std::vector<std::string>& args) {
  bool help = false;
  std::string usage;
  return resolve_train_args(args, &help, &usage);
}

struct Ran {
  int rc;
  std::string out, err;
};
Ran train_lm(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  int rc = run_train_lm(args, out, err);
  return {rc, out.str(), err.str()};
}
Ran sample(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  int rc = run_sample(args, out, err);
  return {rc, out.str(), err.str()};
}

// Every file in a directory with its bytes: to prove that a failed command changed nothing.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> m;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return m;
  for (const auto& e : fs::directory_iterator(dir)) m[e.path().filename().string()] = read_bytes(e.path().string());
  return m;
}

}  // namespace

TEST_SUITE("trainer") {
  // ---------------------------------------------------------------- tokenizer and data
  TEST_CASE("tokenizer: sorted distinct bytes, round trips, clear errors") {
    ByteTokenizer t = ByteTokenizer::from_corpus("hello\nworld\x01\xff");
    CHECK(t.vocab() == std::string("\x01\n"
                                   "dehlorw\xff"));
    CHECK(t.vocab_size() == 10);
    std::vector<int32_t> ids = t.encode("world\n");
    CHECK(ids == std::vector<int32_t>{8, 6, 7, 5, 2, 1});
    CHECK(t.decode(ids) == "world\n");
    CHECK(ByteTokenizer::from_hex(t.to_hex()).vocab() == t.vocab());
    CHECK(t.to_hex() == "010a6465686c6f7277ff");
    CHECK_THROWS_AS(t.encode("z"), Error);
    try {
      t.encode("hel!o");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "'!' at position 3"));
    }
    CHECK_THROWS_AS(t.decode({10}), Error);
    CHECK_THROWS_AS(t.decode({-1}), Error);
    CHECK_THROWS_AS(ByteTokenizer::from_corpus(""), Error);
    // std::string elements: a c_str() of a temporary in the list would dangle before the loop body runs.
    for (const std::string& bad : std::vector<std::string>{"", "0", "zz", "0a0a", "0b0a", std::string(514, 'a')})
      CHECK_THROWS_AS(ByteTokenizer::from_hex(bad), Error);
  }

  TEST_CASE("data: 90/10 split by position; windows are (x, x shifted by one), seeded and resumable") {
    std::string text;
    for (int i = 0; i < 1000; ++i) text += (char)('a' + (i * 7 + i / 26) % 26);
    ByteTokenizer tok = ByteTokenizer::from_corpus(text);
    TextDataset ds(text, tok, 16);
    CHECK(ds.size(Split::Train) == 900);
    CHECK(ds.size(Split::Val) == 100);
    std::vector<int32_t> all = tok.encode(text);

    Generator g(42, 0);
    auto b1 = ds.batch(Split::Val, 5, g);
    CHECK(g.offset == 5);
    CHECK(b1.first.shape() == Shape{5, 16});
    CHECK(b1.first.dtype() == DType::I32);
    std::vector<int32_t> x = b1.first.to_i32_vector(), y = b1.second.to_i32_vector();
    for (int b = 0; b < 5; ++b) {
      // The window must occur inside the validation tenth, and y must be x shifted by one.
      bool found = false;
      for (int s = 900; s + 17 <= 1000 && !found; ++s)
        found = std::equal(x.begin() + b * 16, x.begin() + b * 16 + 16, all.begin() + s) &&
                std::equal(y.begin() + b * 16, y.begin() + b * 16 + 16, all.begin() + s + 1);
      CHECK_MESSAGE(found, "window ", b, " is not a validation window");
    }
    // Same (seed, offset) -> same windows; continuing from a stored offset continues the same stream.
    Generator g1(7, 0), g2(7, 0);
    auto a = ds.batch(Split::Train, 3, g1);
    auto a2 = ds.batch(Split::Train, 3, g1);
    auto c = ds.batch(Split::Train, 3, g2);
    Generator g3(7, 3);
    auto c2 = ds.batch(Split::Train, 3, g3);
    CHECK(a.first.to_i32_vector() == c.first.to_i32_vector());
    CHECK(a2.first.to_i32_vector() == c2.first.to_i32_vector());
    CHECK(a.first.to_i32_vector() != a2.first.to_i32_vector());
  }

  TEST_CASE("data: missing, empty and too-short files say what is wrong") {
    TempDir dir("data_bad");
    CHECK_THROWS_AS(read_corpus(dir.file("nope.txt")), Error);
    CHECK_THROWS_AS(read_corpus(dir.path.string()), Error);
    write_bytes(dir.file("empty.txt"), "");
    try {
      read_corpus(dir.file("empty.txt"));
      FAIL("no error for an empty file");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "empty"));
    }
    std::string shortText(200, 'a');
    ByteTokenizer tok = ByteTokenizer::from_corpus(shortText);
    try {
      TextDataset ds(shortText, tok, 64);
      FAIL("no error for a too-short file");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "data too short: 200 bytes"));
      CHECK(contains(e.what(), "at least 641 bytes"));  // 576 + 65: the validation tenth needs 65
    }
    // Exactly the minimum works.
    CHECK_NOTHROW(TextDataset(std::string(641, 'a'), tok, 64));
    CHECK_THROWS_AS(TextDataset(std::string(640, 'a'), tok, 64), Error);
  }

  TEST_CASE("data: the default corpus falls back to the fortunes, then to a message saying what to run") {
    TempDir dir("data_default");
    // tinyshakespeare present: it is used.
    write_bytes(dir.file("ts.txt"), "First Citizen:\n");
    Corpus c = default_corpus(dir.file("ts.txt"), dir.file("fortunes"));
    CHECK(c.source == dir.file("ts.txt"));
    CHECK(c.note.empty());
    // Missing: the fortunes (the '%' separators dropped, *.dat and *.u8 skipped).
    fs::create_directories(dir.file("fortunes"));
    write_bytes(dir.file("fortunes/b"), "second\n%\nthird\n");
    write_bytes(dir.file("fortunes/a"), "first\n%\n");
    write_bytes(dir.file("fortunes/a.dat"), "\x01\x02 index");
    fs::create_symlink("a", dir.file("fortunes/a.u8"));
    c = default_corpus(dir.file("missing.txt"), dir.file("fortunes"));
    CHECK(c.bytes == "first\n\nsecond\n\nthird\n");
    CHECK(contains(c.note, "make data"));
    CHECK(contains(c.source, "2 files"));
    // Neither: the message tells the user what to run.
    try {
      default_corpus(dir.file("missing.txt"), dir.file("no_fortunes"));
      FAIL("no error without any corpus");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "make data"));
      CHECK(contains(e.what(), "apt-get install fortunes"));
      CHECK(contains(e.what(), "--data"));
    }
  }

  // ---------------------------------------------------------------- report
  TEST_CASE("report: log.csv and routing.csv rows, resume drops rows after the checkpoint, svg written") {
    TempDir dir("report");
    std::string d = dir.file("out");
    LayerRouting l;
    l.layer = 0;
    l.experts_per_cluster = 2;
    l.tokens = {30, 10, 0, 60};
    l.share = {0.3, 0.1, 0.0, 0.6};
    l.reliability = {1, 1, 0.5, 1};
    l.dropped_fraction = 0.02;
    CHECK(l.max_share() == 0.6);
    CHECK(l.dead_experts() == 1);
    {
      RunReport r(d, -1);
      for (int64_t s = 1; s <= 4; ++s) r.add_step({s, 3.0 - 0.1 * s, 0.01, 1e-3, 0.5, 10, 1000});
      r.add_eval({2, 2.8, 2.9}, {l});
      r.add_eval({4, 2.6, 2.7}, {l});
      r.write_svg();
    }
    std::string log = read_bytes(d + "/log.csv");
    CHECK(log.rfind("step,kind,loss,val_loss,aux,lr,grad_norm,ms,tok_per_s\n", 0) == 0);
    CHECK(contains(log, "\n4,eval,2.6,2.7,,,,,\n"));
    std::string routing = read_bytes(d + "/routing.csv");
    CHECK(contains(routing, "\n4,0,3,1,60,0.6,1,0.02\n"));
    std::string svg = read_bytes(d + "/curves.svg");
    CHECK(svg.rfind("<svg", 0) == 0);
    CHECK(contains(svg, "</svg>"));
    CHECK(contains(svg, "expert utilisation at step 4"));
    // Titles, axis labels and the legend, with the last val loss.
    for (const char* t : {">loss<", ">step<", ">cross-entropy (nats)<", ">busiest expert's share of routed slots<",
                          ">share<", ">val (eval) (2.7000)<", ">layer 0<", ">balanced 1/N<"})
      CHECK_MESSAGE(contains(svg, t), t);
    // The curves are the data: every polyline of the loss panel maps (step, loss) by one affine map per axis,
    // x increasing with the step and y (pixels, downwards) decreasing with the loss.
    auto points = [&](const std::string& color) {  // the points of the first polyline drawn in `color`
      std::vector<std::pair<double, double>> pts;
      size_t at = svg.find("<polyline clip-path=\"url(#clip1)\" fill=\"none\" stroke=\"" + color + "\"");
      REQUIRE_MESSAGE(at != std::string::npos, color);
      size_t p = svg.find("points=\"", at) + 8, e = svg.find('"', p);
      std::istringstream in(svg.substr(p, e - p));
      double x, y;
      char comma;
      while (in >> x >> comma >> y) pts.push_back({x, y});
      return pts;
    };
    auto steps = points("#9ecae1"), ev_train = points("#1f77b4"), ev_val = points("#d62728");
    REQUIRE(steps.size() == 4);  // steps 1..4, loss 2.9 .. 2.6
    REQUIRE(ev_train.size() == 2);
    REQUIRE(ev_val.size() == 2);
    const double sx = (steps[3].first - steps[0].first) / 3.0, sy = (steps[3].second - steps[0].second) / (2.6 - 2.9);
    CHECK(sx > 10);
    CHECK(sy < -10);
    auto at = [&](double step, double loss) {  // the pixel the map sends (step, loss) to
      return std::make_pair(steps[0].first + sx * (step - 1), steps[0].second + sy * (loss - 2.9));
    };
    auto near = [](std::pair<double, double> a, std::pair<double, double> b) {
      return std::fabs(a.first - b.first) <= 0.11 && std::fabs(a.second - b.second) <= 0.11;  // %.1f pixels
    };
    for (int i = 0; i < 4; ++i) CHECK(near(steps[i], at(i + 1, 2.9 - 0.1 * i)));
    CHECK(near(ev_train[0], at(2, 2.8)));
    CHECK(near(ev_train[1], at(4, 2.6)));
    CHECK(near(ev_val[0], at(2, 2.9)));
    CHECK(near(ev_val[1], at(4, 2.7)));
    // Routing panel: layer 0's busiest share (0.6) at both evaluations, the balanced share 1/4 dashed; the share
    // axis starts at 0 at the panel's bottom edge, so the heights above it are in the ratio 0.6 : 0.25.
    size_t p2 = svg.find("<polyline clip-path=\"url(#clip2)\"");
    REQUIRE(p2 != std::string::npos);
    std::string panel2 = svg.substr(p2);
    auto first_y = [](const std::string& s, const std::string& key) {
      size_t k = s.find(key);
      REQUIRE(k != std::string::npos);
      size_t p = s.find("points=\"", k) + 8;
      std::istringstream in(s.substr(p, s.find('"', p) - p));
      double x, y;
      char comma;
      in >> x >> comma >> y;
      return y;
    };
    const double y_busy = first_y(panel2, "stroke=\"#1f77b4\""), y_bal = first_y(panel2, "stroke=\"#555\"");
    size_t r2 = svg.find("<rect x=\"490.0\"");  // the routing panel's frame
    REQUIRE(r2 != std::string::npos);
    double rx, ry, rw, rh;
    REQUIRE(std::sscanf(svg.c_str() + r2, "<rect x=\"%lf\" y=\"%lf\" width=\"%lf\" height=\"%lf\"", &rx, &ry, &rw,
                        &rh) == 4);
    CHECK((ry + rh - y_busy) / (ry + rh - y_bal) == doctest::Approx(0.6 / 0.25).epsilon(0.01));
    // Heat map: one cell per expert, its opacity the share over the busiest share, its title the share.
    for (const char* cell : {"fill-opacity=\"0.500\" stroke=\"#ccc\"><title>layer 0 expert 0: 30.0%</title>",
                             "fill-opacity=\"0.167\" stroke=\"#ccc\"><title>layer 0 expert 1: 10.0%</title>",
                             "fill-opacity=\"0.000\" stroke=\"#ccc\"><title>layer 0 expert 2: 0.0%</title>",
                             "fill-opacity=\"1.000\" stroke=\"#ccc\"><title>layer 0 expert 3: 60.0%</title>"})
      CHECK_MESSAGE(contains(svg, cell), cell);
    // Resumed from step 2: rows of steps 3 and 4 are gone from both files and from the history.
    RunReport r(d, 2);
    CHECK(r.steps().size() == 2);
    CHECK(r.evals().size() == 1);
    CHECK_FALSE(contains(read_bytes(d + "/log.csv"), "\n3,train"));
    CHECK_FALSE(contains(read_bytes(d + "/routing.csv"), "\n4,0"));
    CHECK(contains(read_bytes(d + "/routing.csv"), "\n2,0,3,1,60,0.6,1,0.02\n"));
  }

  TEST_CASE("report: console helpers") {
    CHECK(with_commas(1115394) == "1,115,394");
    CHECK(with_commas(-1000) == "-1,000");
    CHECK(with_commas(12) == "12");
    CHECK(format_duration(5.25) == "5.2s");
    CHECK(format_duration(245) == "4m05s");
    CHECK(format_duration(3720) == "1h02m");
    std::ostringstream os;
    print_table(os, "t", {{"a", "1"}, {"long name", "v"}});
    CHECK(contains(os.str(), "| long name | v |"));
  }

  // ---------------------------------------------------------------- training
  TEST_CASE("trainer: a short run on real text lowers the val loss") {
    TempDir dir("learn");
    std::string data = shakespeare_excerpt(dir, 200000);
    TrainOptions o = options(tiny_args(data, dir.file("out")) +
                             std::vector<std::string>{"--max_steps", "120", "--eval_every", "60"});
    std::ostringstream out;
    TrainResult r = train(o, out);
    REQUIRE(r.evals.size() == 3);  // steps 0, 60, 120
    double v0 = r.evals.front().val_loss, v1 = r.evals.back().val_loss;
    MESSAGE("val loss ", v0, " -> ", v1, " on ", cm::test::test_text().name);
    CHECK(v0 > 3.5);       // about ln(vocab): nothing learned yet
    CHECK(v1 < v0 - 0.8);  // character frequencies and common pairs are learned within a hundred steps
    CHECK(r.final_step == 120);
    // What a run leaves in out_dir.
    CHECK(fs::exists(dir.file("out/log.csv")));
    CHECK(fs::exists(dir.file("out/routing.csv")));
    CHECK(fs::exists(dir.file("out/curves.svg")));
    CHECK(r.last_checkpoint == checkpoint_path(dir.file("out"), 120));
    CHECK(contains(out.str(), "eval step 120"));
    CHECK(contains(out.str(), "routing layer 0 | max share"));
  }

  TEST_CASE("trainer: a quiet step waits only for the model's own bookkeeping; done: prints host syncs/step") {
    // engine/host_sync.h counts read-outs on the CPU too. The loop itself (loss, aux, clipping, AdamW, the update
    // skip) must add none to a step that neither logs nor reaches a boundary: its values are read when a step logs.
    TempDir dir("syncs");
    std::string data = shakespeare_excerpt(dir, 20000);
    // Each router kind's count for this model (2 MoE layers), measured: a ceiling and a floor, so that removing a
    // wait shows here (update the number) and adding one fails. A dropless MoE step waits for nothing: its plan,
    // fault guard, health update, routing bias, AC labels and statistics all stay on the device (model/moe.cpp,
    // model/health.h), and so do group_limited's selection (kernels/route.h route_group_select) and capacity (its
    // filter and the kept slots' plan, autograd/ops_moe.h).
    // Before: 2 for group_limited (it selected on the host) and capacity (the router's read-out for the keep list);
    // before that 2 for every MoE kind (the router's read-out), and before that 5 (the fault guard's row norms per
    // layer and after_step's weight norms of all layers in one copy).
    // Before that: 13 (flat, cluster, tree), 14 (ac), 17 (group_limited): the layers' aux terms were read for their
    // statistics (3 per layer), group_limited read its probabilities, logits and gates in three copies, the token
    // ids were read for the specialization counters (now counted on the device), and ac read the second layer's
    // input for its batch scales (now made on the device, kernels/route.h ac_scales_forward).
    struct Kind {
      const char* name;
      std::vector<std::string> args;
      int64_t syncs;
    };
    const std::vector<Kind> kinds = {
        {"dense", {"--router", "dense"}, 0},
        {"flat", {"--router", "flat"}, 0},
        {"cluster", {"--router", "cluster"}, 0},
        {"tree", {"--router", "tree", "--tree", "2x2x2"}, 0},
        {"ac", {"--router", "ac"}, 0},
        {"group_limited", {"--router", "cluster", "--gate_mode", "group_limited"}, 0},
        // Capacity 1.0 with 2 experts per token: some expert overflows in every step (before: 2, the router's
        // read-out for the keep list; before that one more per layer and overflowing step).
        {"capacity", {"--router", "cluster", "--top_k_experts", "2", "--capacity_factor", "1.0"}, 0},
        // The aux-free bias: the loads summed and the bias moved on the device (before: 2, the router's read-out).
        {"aux_free", {"--router", "cluster", "--aux_free_bias", "1"}, 0},
        // Pruning: the loads summed, the decision made and the flags kept on the device (before: 2).
        {"pruning", {"--router", "cluster", "--enable_expert_pruning", "1"}, 0},
    };
    for (const Kind& kind : kinds) {
      const std::string name = kind.name;
      CAPTURE(name);
      std::vector<std::string> args = tiny_args(data, dir.file("out_" + name)) + kind.args +
                                      std::vector<std::string>{"--max_steps", "6", "--eval_every", "6",
                                                               "--save_every", "0", "--eval_iters", "1"};
      std::ostringstream out;
      TrainResult r = train(options(args), out);
      CHECK(r.quiet_steps == 5);  // steps 1..5; step 6 is the last (evaluation)

      // The model's own read-outs in one training step, outside the loop: forward, backward, after_step.
      TrainOptions o = options(args);
      Corpus corpus = read_corpus(data);
      ByteTokenizer tok = ByteTokenizer::from_corpus(corpus.bytes);
      TextDataset ds(corpus.bytes, tok, o.seq_len);
      ClusterMoELM model(o.model_config(tok.vocab_size()));
      model.train();
      Generator g(7);
      auto xy = ds.batch(Split::Train, o.batch_size, g);
      reset_host_sync_stats();
      model.forward(xy.first, xy.second).total_loss.backward();
      model.after_step();
      const int64_t own = host_sync_stats().stream_syncs;
      MESSAGE(name, ": ", own, " host syncs per step, all in the model's bookkeeping");
      CHECK(own == kind.syncs);
      CHECK(r.quiet_step_syncs == 5 * own);

      Ran ran = train_lm(args);
      REQUIRE(ran.rc == 0);
      CHECK(contains(ran.out, "| host syncs/step " + std::to_string(own) + "\n"));
    }
  }

  TEST_CASE("trainer: routing.csv counts every training forward's slots and capacity's drops, read at evaluation") {
    // The tally adds each training forward's counts where the model computes and reads them at evaluation only. A
    // 3-step interval's row is then the sum of the same run's three 1-step intervals (evaluating does not change
    // training: the losses are the same bits), each step's slots are all counted, and capacity drops some.
    TempDir dir("tally");
    std::string data = shakespeare_excerpt(dir, 20000);
    const std::vector<std::string> args =
        tiny_args(data, "") + std::vector<std::string>{"--top_k_experts", "2", "--capacity_factor", "1.0", "--max_steps",
                                                       "3", "--save_every", "0", "--eval_iters", "1", "--grad_accum",
                                                       "2"};
    struct Row {
      double tokens = 0, dropped = 0;
    };
    std::ostringstream sink;
    auto run = [&](const std::string& out, const char* every, std::vector<double>& losses) {
      TrainResult r = train(options(args + std::vector<std::string>{"--out_dir", out, "--eval_every", every}), sink);
      losses = r.step_losses;
      std::map<std::tuple<int64_t, int64_t, int64_t>, Row> rows;  // (step, layer, expert)
      std::istringstream in(read_bytes(out + "/routing.csv"));
      std::string line;
      std::getline(in, line);  // header
      while (std::getline(in, line)) {
        std::vector<double> c;
        std::istringstream ls(line);
        for (std::string f; std::getline(ls, f, ',');) c.push_back(std::stod(f));
        REQUIRE(c.size() == 8);
        rows[{(int64_t)c[0], (int64_t)c[1], (int64_t)c[2]}] = {c[4], c[7]};
      }
      return rows;
    };
    std::vector<double> l1, l3;
    auto each = run(dir.file("each"), "1", l1), three = run(dir.file("three"), "3", l3);
    REQUIRE(l1 == l3);
    REQUIRE(!three.empty());
    const TrainOptions o = options(args);
    const int64_t K = 2, slots = o.batch_size * o.seq_len * o.grad_accum * K;  // per step and MoE layer
    std::map<int64_t, double> dropped_mean;
    for (const auto& [key, row] : three) {
      const int64_t step = std::get<0>(key), layer = std::get<1>(key), e = std::get<2>(key);
      CHECK(step == 3);
      double sum = 0;
      for (int64_t s = 1; s <= 3; ++s) sum += each.at({s, layer, e}).tokens;
      CHECK(row.tokens == sum);
      if (e == 0) {
        double d = 0;
        for (int64_t s = 1; s <= 3; ++s) d += each.at({s, layer, 0}).dropped / 3;
        CHECK(row.dropped == doctest::Approx(d).epsilon(1e-5));
        dropped_mean[layer] = row.dropped;
      }
    }
    for (int64_t s = 1; s <= 3; ++s)
      for (const auto& [layer, d] : dropped_mean) {
        double sum = 0;
        for (int64_t e = 0; e < 4; ++e) sum += each.at({s, layer, e}).tokens;
        CHECK(sum == (double)slots);  // every slot routed, once
      }
    REQUIRE(!dropped_mean.empty());
    for (const auto& [layer, d] : dropped_mean) {
      CAPTURE(layer);
      CHECK(d > 0.0);  // capacity 1.0 with 2 experts per token: someone overflows
      CHECK(d < 0.5);
    }
  }

  TEST_CASE("trainer: a dense step never waits for the host, with micro-batches, dropout and reliability on") {
    // engine/host_sync.h's bookkeeping count: forward (ids, dropout, the fault guard), backward, clipping, AdamW and
    // after_step (the dense layers' health update) add no read-out; evaluation and logging still read.
    TempDir dir("dense_syncs");
    std::string data = shakespeare_excerpt(dir, 20000);
    std::vector<std::string> args = tiny_args(data, dir.file("out")) +
                                    std::vector<std::string>{"--router", "dense", "--max_steps", "8", "--eval_every",
                                                             "8", "--log_every", "4", "--save_every", "4",
                                                             "--eval_iters", "1", "--grad_accum", "2", "--dropout",
                                                             "0.1"};
    std::ostringstream out;
    TrainResult r = train(options(args), out);
    CHECK(r.quiet_steps == 6);  // steps 4 and 8 log
    CHECK(r.quiet_step_syncs == 0);
    // A step's time is its share of its logging interval (a device step that waits for nothing returns before its
    // work is done): log.csv gives steps 1-4 one value and 5-8 another.
    std::map<int64_t, std::string> ms;  // step -> the ms field of its train row
    std::istringstream csv(read_bytes(dir.file("out") + "/log.csv"));
    for (std::string line; std::getline(csv, line);) {
      std::vector<std::string> f;
      std::istringstream row(line);
      for (std::string x; std::getline(row, x, ',');) f.push_back(x);
      if (f.size() == 9 && f[1] == "train") ms[std::stoll(f[0])] = f[7];
    }
    REQUIRE(ms.size() == 8);
    for (int64_t s : {2, 3, 4}) CHECK(ms[s] == ms[1]);
    for (int64_t s : {6, 7, 8}) CHECK(ms[s] == ms[5]);
    CHECK(std::stod(ms[1]) > 0.0);
    Ran ran = train_lm(args + std::vector<std::string>{"--out_dir", dir.file("out2")});
    REQUIRE(ran.rc == 0);
    CHECK(contains(ran.out, "| host syncs/step 0\n"));
  }

  TEST_CASE("trainer: overfitting one batch drives its loss near zero") {
    // A fixed batch of 4 sequences of 16 bytes, memorised by the model and AdamW that train_lm uses.
    std::string text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer";
    ByteTokenizer tok = ByteTokenizer::from_corpus(text);
    std::vector<int32_t> ids = tok.encode(text);
    std::vector<int32_t> x, y;
    for (int b = 0; b < 4; ++b)
      for (int t = 0; t < 16; ++t) {
        x.push_back(ids[b * 17 + t]);
        y.push_back(ids[b * 17 + t + 1]);
      }
    CoEConfig cfg = options({"--device", "cpu", "--d_model", "32", "--n_layers", "2", "--n_heads", "2", "--d_ff", "64",
                             "--seq_len", "16", "--max_steps", "300", "--warmup_steps", "10"})
                        .model_config(tok.vocab_size());
    ClusterMoELM model(cfg);
    NamedTensors params = model.named_parameters();
    AdamW opt(params);
    Tensor tx = Tensor::from_vector(x, {4, 16}), ty = Tensor::from_vector(y, {4, 16});
    float first = 0, last = 0;
    for (int step = 0; step < 300; ++step) {
      CoEOutput out = model.forward(tx, ty);
      if (step == 0) first = out.loss.item();
      last = out.loss.item();
      out.total_loss.backward();
      clip_grad_norm(params, 1.0f);
      opt.step(lr_at(step, {3e-3f, 3e-4f, 10, 300}));
      model.after_step();
      opt.zero_grad();
    }
    MESSAGE("one-batch loss ", first, " -> ", last);
    CHECK(first > 2.5f);
    CHECK(last < 0.1f);
  }

  TEST_CASE("trainer: an interrupted and resumed run gives the same losses, bit for bit") {
    TempDir dir("resume");
    std::string data = shakespeare_excerpt(dir, 100000);
    // grad_accum 2 and dropout on: the data and dropout streams both have to be restored exactly. The aux-free
    // bias and pruning on: their working copies live where the layer computes (model/mirror.h), and the checkpoint
    // must hold their values (a threshold that prunes an expert of each cluster within the first 8 steps).
    auto args = tiny_args(data, "") + std::vector<std::string>{"--max_steps",  "24",  "--eval_every",    "8",
                                                               "--save_every", "8",   "--grad_accum",    "2",
                                                               "--dropout",    "0.1", "--keep_last",     "0",
                                                               "--aux_free_bias", "1", "--enable_expert_pruning", "1",
                                                               "--pruning_threshold", "0.45", "--pruning_window",
                                                               "3"};
    std::ostringstream sink;
    TrainOptions whole = options(args + std::vector<std::string>{"--out_dir", dir.file("whole")});
    TrainResult rw = train(whole, sink);
    REQUIRE(rw.step_losses.size() == 24);

    TrainOptions first = options(args + std::vector<std::string>{"--out_dir", dir.file("split")});
    first.stop_at = 13;  // "interrupted" after step 13: the newest checkpoint is step 8
    TrainResult r1 = train(first, sink);
    CHECK(r1.final_step == 13);
    // Two runs of one seed (no --deterministic needed: there is no other mode), the same losses bit for bit.
    REQUIRE(r1.step_losses.size() == 13);
    for (size_t i = 0; i < 13; ++i) CHECK_MESSAGE(r1.step_losses[i] == rw.step_losses[i], "step ", i + 1);
    CHECK(r1.last_checkpoint == checkpoint_path(dir.file("split"), 8));
    // The resumed run is configured from the checkpoint alone (plus --out_dir to find it).
    TrainOptions second = options({"--out_dir", dir.file("split"), "--resume"});
    CHECK(second.resume == checkpoint_path(dir.file("split"), 8));
    TrainResult r2 = train(second, sink);
    CHECK(r2.start_step == 8);
    REQUIRE(r2.step_losses.size() == 16);
    for (size_t i = 0; i < 16; ++i) CHECK_MESSAGE(r2.step_losses[i] == rw.step_losses[8 + i], "step ", 9 + i);
    REQUIRE(r2.evals.size() == 2);
    CHECK(r2.evals.back().val_loss == rw.evals.back().val_loss);
    CHECK(r2.evals.back().train_loss == rw.evals.back().train_loss);
    // The logs read like an uninterrupted run's: the interrupted run's steps 9..13 were dropped on resume.
    CHECK(read_bytes(dir.file("split/routing.csv")) == read_bytes(dir.file("whole/routing.csv")));
    auto loss_cols = [&](const std::string& path) {  // step, kind, loss, val_loss (timings differ)
      std::istringstream in(read_bytes(path));
      std::string line, out;
      while (std::getline(in, line)) {
        size_t p = 0;
        for (int c = 0; c < 4 && p != std::string::npos; ++c) p = line.find(',', p + 1);
        out += line.substr(0, p) + "\n";
      }
      return out;
    };
    CHECK(loss_cols(dir.file("split/log.csv")) == loss_cols(dir.file("whole/log.csv")));
    // And the final checkpoints hold the same state: every tensor (weights, buffers, AdamW moments) and stream.
    SafeTensors cs = load_safetensors(checkpoint_path(dir.file("split"), 24));
    SafeTensors cw = load_safetensors(checkpoint_path(dir.file("whole"), 24));
    REQUIRE(cs.tensors.size() == cw.tensors.size());
    for (size_t i = 0; i < cs.tensors.size(); ++i) {
      CHECK(cs.tensors[i].first == cw.tensors[i].first);
      const Tensor &a = cs.tensors[i].second, &b = cw.tensors[i].second;
      if (a.dtype() == DType::F32)
        CHECK_MESSAGE(a.to_f32_vector() == b.to_f32_vector(), cs.tensors[i].first);
      else
        CHECK_MESSAGE(a.to_i32_vector() == b.to_i32_vector(), cs.tensors[i].first);
    }
    for (const char* k : {"step", "adamw_step", "config", "tokenizer", "data_rng", "dropout_rng", "schedule"})
      CHECK_MESSAGE(cs.require_meta(k) == cw.require_meta(k), k);
  }

  TEST_CASE("trainer: checkpoint round trip restores the model exactly; sampling is seeded") {
    TempDir dir("roundtrip");
    std::string data = shakespeare_excerpt(dir, 50000);
    std::string out_dir = dir.file("out");
    // A gate design other than the default: the checkpoint must carry it (sample builds its model from it).
    const std::vector<std::string> gate = {"--gate_mode", "group_limited"};
    Ran r = train_lm(tiny_args(data, out_dir) + gate +
                     std::vector<std::string>{"--max_steps", "10", "--eval_every", "0"});
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    std::string ck = checkpoint_path(out_dir, 10);
    REQUIRE(fs::exists(ck));

    // Two models built from the checkpoint give identical logits, and differ from a fresh initialisation.
    SafeTensors st = load_safetensors(ck);
    CoEConfig cfg = options(tiny_args(data, out_dir) + gate)
                        .model_config(ByteTokenizer::from_hex(st.require_meta("tokenizer")).vocab_size());
    CHECK(cfg.gate_mode == GateMode::GroupLimited);
    CHECK(contains(st.require_meta("config"), "group_limited"));
    ClusterMoELM a(cfg), b(cfg), fresh(cfg);
    for (ClusterMoELM* m : {&a, &b}) {
      NamedTensors state = m->named_parameters();
      for (auto& kv : m->named_buffers()) state.push_back(kv);
      restore_tensors(st, state, "adamw.");
    }
    CHECK(a.step() == 10);
    a.eval();
    b.eval();
    fresh.eval();
    Tensor ids = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, {1, 8});
    NoGrad ng;
    std::vector<float> la = a.forward(ids).logits.to_f32_vector(), lb = b.forward(ids).logits.to_f32_vector();
    CHECK(la == lb);
    CHECK(la != fresh.forward(ids).logits.to_f32_vector());
    // The saved parameters are the trained ones (the checkpoint written at the end, not before the last step).
    for (const auto& kv : a.named_parameters()) CHECK(kv.second.to_f32_vector() == st.find(kv.first)->to_f32_vector());

    // sample: same seed, same text; another seed, another text; the tokens/s line on stderr.
    auto args = std::vector<std::string>{"--ckpt",        ck,    "--prompt", "ROMEO:", "--max_new_tokens", "40",
                                         "--temperature", "1.0", "--top_k",  "10"};
    Ran s1 = sample(args + std::vector<std::string>{"--seed", "5"});
    Ran s2 = sample(args + std::vector<std::string>{"--seed", "5"});
    Ran s3 = sample(args + std::vector<std::string>{"--seed", "6"});
    REQUIRE_MESSAGE(s1.rc == 0, s1.err);
    CHECK(s1.out == s2.out);
    CHECK(s1.out != s3.out);
    CHECK(s1.out.rfind("ROMEO:", 0) == 0);
    CHECK(s1.out.size() == 6 + 40 + 1);  // prompt, 40 bytes, newline
    CHECK(contains(s1.err, "tokens/s"));
    // Without the cache the tokens are the same (DESIGN.md 4.6).
    Ran s4 = sample(args + std::vector<std::string>{"--seed", "5", "--cache", "0"});
    CHECK(s4.out == s1.out);
    // --out_dir finds the newest checkpoint.
    Ran s5 = sample({"--out_dir", out_dir, "--prompt", "ROMEO:", "--max_new_tokens", "40", "--temperature", "1.0",
                     "--top_k", "10", "--seed", "5"});
    CHECK(s5.out == s1.out);
  }

  TEST_CASE("train_lm and sample: a seed train_lm accepts, sample accepts from the checkpoint") {
    // Seeds from 2^63 up once failed in sample: the checkpoint's config was read back with a signed parse.
    TempDir dir("bigseed");
    std::string text;
    for (int i = 0; i < 400; ++i) text += "To be, or not to be, that is the question. ";
    std::string data = dir.file("text.txt");
    write_bytes(data, text);
    for (const char* seed : {"9223372036854775808", "18446744073709551615"}) {
      std::string out_dir = dir.file(std::string("out") + seed);
      Ran r = train_lm(tiny_args(data, out_dir) +
                       std::vector<std::string>{"--max_steps", "2", "--eval_every", "0", "--seed", seed});
      REQUIRE_MESSAGE(r.rc == 0, r.err);
      // Settings print as written in the start-up table and in the checkpoint's metadata (and read back exactly).
      CHECK(contains(r.out, "| router_z_loss_weight "));
      CHECK(contains(r.out, " 0.001 "));
      CHECK(contains(r.out, " 0.003 "));  // --lr 3e-3
      CHECK_FALSE(contains(r.out, "0.00100000005"));
      CHECK_FALSE(contains(r.out, "0.899999976"));
      for (const auto& kv : read_safetensors_metadata(checkpoint_path(out_dir, 2))) {
        CHECK_FALSE(contains(kv.second, "00000005"));
        CHECK_FALSE(contains(kv.second, "99999976"));
        if (kv.first == "config") CHECK(contains(kv.second, "\"router_z_loss_weight\":\"0.001\""));
        if (kv.first == "train_options") CHECK(contains(kv.second, std::string("\"seed\":\"") + seed + "\""));
      }
      Ran s = sample({"--out_dir", out_dir, "--prompt", "To", "--max_new_tokens", "8", "--seed", seed});
      CHECK_MESSAGE(s.rc == 0, s.err);
      CHECK(s.out.size() == 2 + 8 + 1);
      // And --resume reads the stored seed back too.
      Ran again = train_lm({"--resume", "--out_dir", out_dir, "--max_steps", "3", "--eval_every", "0"});
      CHECK_MESSAGE(again.rc == 0, again.err);
    }
  }

  // ---------------------------------------------------------------- bad input
  TEST_CASE("train_lm: bad flags, data and settings exit 2 with a message, and write nothing") {
    TempDir dir("bad_train");
    std::string data = shakespeare_excerpt(dir, 20000);
    std::string out_dir = dir.file("out");
    write_bytes(dir.file("empty.txt"), "");
    write_bytes(dir.file("short.txt"), "just a few bytes");
    struct Case {
      std::vector<std::string> extra;
      const char* message;
    };
    std::vector<Case> cases = {
        {{"--bogus", "1"}, "unknown flag --bogus"},
        {{"--lr", "fast"}, "--lr: expected a number, got 'fast'"},
        {{"--max_steps", "-3"}, "--max_steps must be in"},
        {{"--batch_size", "2x"}, "--batch_size: expected an integer"},
        {{"--data", dir.file("missing.txt")}, "data file not found"},
        {{"--data", dir.file("empty.txt")}, "data file is empty"},
        {{"--data", dir.file("short.txt")}, "data too short"},
        {{"--n_heads", "5"}, "n_heads"},
        {{"--top_k_experts", "3"}, "top_k"},
        {{"--resume"}, "no checkpoint"},
        {{"--resume", dir.file("nope.safetensors")}, "not found"},
    };
    for (const auto& c : cases) {
      Ran r = train_lm(tiny_args(data, out_dir) + c.extra);
      CHECK_MESSAGE(r.rc == 2, c.message);
      CHECK_MESSAGE(contains(r.err, c.message), "expected '", c.message, "' in: ", r.err);
      CHECK_MESSAGE(!fs::exists(out_dir), c.message, ": out_dir was created");
    }
    // --device cuda where no GPU can be used: the reason, exit 2, nothing written (last flag wins).
    if (!cuda_available()) {
      Ran r = train_lm(tiny_args(data, out_dir) + std::vector<std::string>{"--device", "cuda"});
      CHECK(r.rc == 2);
      CHECK_MESSAGE(contains(r.err, "CUDA"), r.err);
      CHECK_MESSAGE(contains(r.err, "use --device cpu"), r.err);
      CHECK(!fs::exists(out_dir));
    }
    // Flag errors print the usage too; --help prints it and succeeds.
    CHECK(contains(train_lm({"--bogus"}).err, "usage: train_lm"));
    Ran h = train_lm({"--help"});
    CHECK(h.rc == 0);
    CHECK(contains(h.out, "--max_steps"));
    // A non-finite loss stops the run and names the step (weights initialised absurdly large overflow).
    Ran nan = train_lm(tiny_args(data, out_dir) +
                       std::vector<std::string>{"--init_std", "1e30", "--max_steps", "5", "--eval_every", "0"});
    CHECK(nan.rc == 2);
    CHECK_MESSAGE(contains(nan.err, "at step "), nan.err);
    CHECK_MESSAGE(contains(nan.err, ": training stopped"), nan.err);
  }

  TEST_CASE("train_lm and sample: corrupt, truncated and mismatched checkpoints exit 2 and change nothing") {
    TempDir dir("bad_ckpt");
    std::string data = shakespeare_excerpt(dir, 20000);
    std::string out_dir = dir.file("out");
    Ran ok = train_lm(tiny_args(data, out_dir) +
                      std::vector<std::string>{"--max_steps", "4", "--eval_every", "2", "--save_every", "2"});
    REQUIRE_MESSAGE(ok.rc == 0, ok.err);
    std::string ck = checkpoint_path(out_dir, 4);
    std::string good = read_bytes(ck);

    // A fresh run into an out_dir with checkpoints would mix two runs: refused.
    auto before = snapshot(out_dir);
    Ran again = train_lm(tiny_args(data, out_dir) + std::vector<std::string>{"--max_steps", "4"});
    CHECK(again.rc == 2);
    CHECK(contains(again.err, "--resume"));
    CHECK(snapshot(out_dir) == before);

    // Mismatched: resuming with a different width finds every shape wrong and says which.
    Ran mm = train_lm({"--out_dir", out_dir, "--resume", "--d_model", "64", "--max_steps", "6"});
    CHECK(mm.rc == 2);
    CHECK_MESSAGE(contains(mm.err, "has shape"), mm.err);
    CHECK(snapshot(out_dir) == before);

    // Truncated and corrupt copies of the newest checkpoint.
    for (const auto& bad : {good.substr(0, good.size() / 2), good.substr(0, 6), std::string("garbage bytes here"),
                            std::string(good).replace(8, 1, "#")}) {
      write_bytes(ck, bad);
      auto snap = snapshot(out_dir);
      Ran r = train_lm({"--out_dir", out_dir, "--resume", "--max_steps", "6"});
      CHECK(r.rc == 2);
      CHECK_MESSAGE(contains(r.err, ck), r.err);
      CHECK(snapshot(out_dir) == snap);
      Ran s = sample({"--ckpt", ck, "--max_new_tokens", "5"});
      CHECK(s.rc == 2);
      CHECK(contains(s.err, ck));
    }
    write_bytes(ck, good);

    // Intact tensors with damaged metadata: each bad record is named.
    struct Damage {
      const char* key;
      const char* value;
      const char* message;
    };
    for (const Damage& d :
         {Damage{"data_rng", "{\"seed\":\"1\"}", "data_rng: missing 'offset'"},
          Damage{"dropout_rng", "not json", "dropout_rng: JSON"},
          Damage{"data_rng", "{\"seed\":\"99999999999999999999\",\"offset\":\"0\"}", "64-bit"},
          Damage{"step", "four", "metadata 'step' is not a non-negative integer"},
          Damage{"tokenizer", "0a0a", "tokenizer"}, Damage{"format", "other/9", "unknown checkpoint format"}}) {
      SafeTensors st = load_safetensors(ck);
      Metadata md = st.metadata;
      for (auto& kv : md)
        if (kv.first == d.key) kv.second = d.value;
      std::string bad_dir = dir.file("damaged");
      fs::remove_all(bad_dir);
      fs::create_directories(bad_dir);
      save_safetensors(checkpoint_path(bad_dir, 4), st.tensors, md);
      auto snap = snapshot(bad_dir);
      Ran r = train_lm({"--out_dir", bad_dir, "--resume", "--max_steps", "6"});
      CHECK(r.rc == 2);
      CHECK_MESSAGE(contains(r.err, d.message), r.err);
      CHECK(snapshot(bad_dir) == snap);
    }

    // A valid safetensors file that is not a train_lm checkpoint.
    save_safetensors(dir.file("other.safetensors"), {{"w", Tensor::ones({2})}}, {});
    Ran o1 = train_lm({"--resume", dir.file("other.safetensors")});
    CHECK(o1.rc == 2);
    CHECK(contains(o1.err, "not a train_lm checkpoint"));
    Ran o2 = sample({"--ckpt", dir.file("other.safetensors")});
    CHECK(o2.rc == 2);
    CHECK(contains(o2.err, "metadata 'config' is missing"));

    // sample: bad flags, a prompt byte the model never saw, no checkpoint at all.
    CHECK(sample({"--ckpt", ck, "--temperature", "hot"}).rc == 2);
    Ran p = sample({"--ckpt", ck, "--prompt", "\x01"});
    CHECK(p.rc == 2);
    CHECK(contains(p.err, "not in the vocabulary"));
    Ran none = sample({"--out_dir", dir.file("empty_dir")});
    CHECK(none.rc == 2);
    CHECK(contains(none.err, "no checkpoint"));

    // After all that, the run still resumes.
    Ran res = train_lm({"--out_dir", out_dir, "--resume", "--max_steps", "6"});
    CHECK_MESSAGE(res.rc == 0, res.err);
    CHECK(fs::exists(checkpoint_path(out_dir, 6)));
  }

}  // TEST_SUITE
