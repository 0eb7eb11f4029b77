// The text the tests train on. tinyshakespeare when this machine has it (data/ from `make data`, the shared copy
// beside the checkout, or $CM_DATA_DIR); otherwise a corpus generated here, so that `make test` passes offline
// and without ../shared. CM_TEST_CORPUS=generated forces the generated one (to check the fallback where the file
// is present).
//
// The generated corpus is a play in tinyshakespeare's layout ("NAME:" then a few lines, blank line between
// speeches), about 400 kB: its words come from a fixed list, by Zipf's law and through a first-order Markov
// chain (each word has a few likely successors), so a byte-level model has the same kinds of structure to learn
// (letter frequencies, spelling of words, which words follow which, speaker lines) and a vocabulary of the same
// order (56 bytes against 65). The same bytes on every machine: std::mt19937's raw outputs are fixed by the standard, and no
// <random> distribution is used.
#pragma once
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace cm::test {

inline std::string generated_play(size_t bytes = 400000) {
  static const char* words[] = {
      "the",    "and",    "to",     "of",     "my",     "you",    "that",   "in",     "is",     "not",   "with",
      "me",     "it",     "for",    "be",     "his",    "your",   "this",   "but",    "he",     "have",  "as",
      "thou",   "so",     "will",   "what",   "thy",    "her",    "no",     "all",    "by",     "do",    "shall",
      "if",     "are",    "we",     "our",    "lord",   "good",   "now",    "king",   "sir",    "come",  "more",
      "let",    "they",   "here",   "well",   "how",    "then",   "love",   "there",  "make",   "know",  "man",
      "did",    "say",    "him",    "hath",   "yet",    "upon",   "speak",  "heart",  "must",   "give",  "may",
      "death",  "time",   "night",  "blood",  "great",  "life",   "father", "noble",  "world",  "sweet", "hand",
      "eyes",   "tell",   "fair",   "honour", "grace",  "queen",  "heaven", "never",  "gentle", "true",  "away",
      "house",  "crown",  "brother","friends","words",  "fear",   "hear",   "think",  "stay",   "night", "old",
      "young",  "poor",   "dead",   "live",   "soul",   "night",  "mother", "son",    "blood",  "peace", "war",
      "field",  "rome",   "city",   "cousin", "madam",  "duke",   "lady",   "master", "gods",   "earth", "sun",
      "moon",   "tears",  "woe",    "joy",    "shame",  "name",   "tongue", "head",   "body",   "sword", "hope"};
  static const char* names[] = {"ROMEO",   "JULIET",    "MENENIUS", "CORIOLANUS", "KING HENRY VI", "QUEEN MARGARET",
                                "GLOUCESTER", "LUCIO",   "ISABELLA", "PETRUCHIO",  "KATHARINA",     "First Citizen",
                                "DUKE VINCENTIO", "BUCKINGHAM", "NURSE", "Second Servant"};
  const uint32_t W = sizeof(words) / sizeof(words[0]), S = sizeof(names) / sizeof(names[0]);
  std::mt19937 rng(20261205u);
  auto pick = [&](uint32_t n) { return (uint32_t)(rng() % n); };
  std::string out;
  out.reserve(bytes + 256);
  uint32_t w = 0;
  while (out.size() < bytes) {
    out += names[pick(S)];
    out += ":\n";
    const uint32_t lines = 1 + pick(4);
    for (uint32_t line = 0; line < lines; ++line) {
      std::string text;
      bool start = true;
      while (text.size() < 40 + pick(20)) {
        // 3 likely successors per word, fixed by the word, 3 times in 4; else a word drawn by Zipf's law
        // (rank r with probability about 1/r: the list starts with the most common words), as in English.
        const double u = (double)(rng() >> 8) / 16777216.0;
        w = pick(4) != 0 ? (w * 7 + 3 + 11 * pick(3)) % W : (uint32_t)std::pow((double)W + 1, u) - 1;
        std::string word = words[w];
        if (start) word[0] = (char)(word[0] - 'a' + 'A');
        start = false;
        text += word;
        const uint32_t p = pick(40);
        if (p < 3) text += ",";
        else if (p == 3) text += ".", start = true;
        else if (p == 4) text += "?", start = true;
        else if (p == 5) text += "!", start = true;
        text += " ";
      }
      text.pop_back();  // the space, then any punctuation: the line ends the speech or goes on
      while (text.back() == ',' || text.back() == '.' || text.back() == '?' || text.back() == '!') text.pop_back();
      text += line + 1 == lines ? '.' : ',';
      out += text + "\n";
    }
    out += "\n";
  }
  return out;
}

struct TestText {
  std::string name;   // where it came from, for messages
  std::string bytes;
  bool shakespeare = false;
};

inline const TestText& test_text() {
  static TestText t = [] {
    TestText r;
    const char* force = std::getenv("CM_TEST_CORPUS");
    if (!(force && std::string(force) == "generated")) {
      std::vector<std::string> paths = {"data/tinyshakespeare.txt", "../shared/data/tinyshakespeare.txt"};
      if (const char* dir = std::getenv("CM_DATA_DIR"))
        paths.insert(paths.begin(), std::string(dir) + "/tinyshakespeare.txt");
      for (const std::string& p : paths) {
        std::ifstream f(p, std::ios::binary);
        if (!f) continue;
        std::ostringstream ss;
        ss << f.rdbuf();
        if (ss.str().size() < 500000) continue;  // not the real file (e.g. a truncated download)
        r.name = p;
        r.bytes = ss.str();
        r.shakespeare = true;
        return r;
      }
    }
    r.name = "the generated play (tests/corpus.h; tinyshakespeare not found)";
    r.bytes = generated_play();
    return r;
  }();
  return t;
}

}  // namespace cm::test
