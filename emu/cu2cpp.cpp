// cu2cpp IN OUT: copies a .cu/.cuh file for a g++ build against the CUDA emulator (emu/cuda_emu.h), line for line,
// so that diagnostics, __LINE__ and the emulator's reports name the original lines. Three rewrites, in code only
// (comments and string literals are left alone):
//   K<<<g, b, s, st>>>(args)   ->  ::cm_emu::launch(g, b, s, st, [](auto... cm_a) { K(cm_a...); })(args)
//       K is the kernel expression before <<< (names, ::, template arguments); the generic lambda lets template
//       kernels deduce their arguments at the launch as they do under nvcc.
//   extern __shared__ T x[];   ->  T* x = ::cm_emu::dynamic_smem<T>();
//   __shared__ T x...;         ->  the same declaration, then CM_EMU_SHARED_EPOCH(x) (poisoned for each block)
// The first line of OUT is a #line directive naming IN. Exit status 1 with a message on a launch it cannot parse.
#include <cctype>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string src;
std::vector<bool> code;  // code[i]: character i is code (not inside a comment or a literal)
std::string in_name;

void classify() {
  code.assign(src.size(), true);
  size_t i = 0;
  while (i < src.size()) {
    if (src.compare(i, 2, "//") == 0) {
      while (i < src.size() && src[i] != '\n') code[i++] = false;
    } else if (src.compare(i, 2, "/*") == 0) {
      size_t e = src.find("*/", i + 2);
      e = e == std::string::npos ? src.size() : e + 2;
      while (i < e) code[i++] = false;
    } else if (src[i] == '"' || src[i] == '\'') {
      const char q = src[i];
      code[i++] = false;
      while (i < src.size() && src[i] != q) {
        if (src[i] == '\\') code[i++] = false;
        if (i < src.size()) code[i++] = false;
      }
      if (i < src.size()) code[i++] = false;
    } else {
      ++i;
    }
  }
}

int line_of(size_t pos) {
  int l = 1;
  for (size_t i = 0; i < pos && i < src.size(); ++i) l += src[i] == '\n';
  return l;
}

[[noreturn]] void die(size_t pos, const std::string& what) {
  std::cerr << in_name << ":" << line_of(pos) << ": cu2cpp: " << what << "\n";
  std::exit(1);
}

bool ident(char c) { return std::isalnum((unsigned char)c) || c == '_'; }

size_t find_code(const std::string& s, size_t from) {
  for (size_t p = src.find(s, from); p != std::string::npos; p = src.find(s, p + 1))
    if (code[p]) return p;
  return std::string::npos;
}

// Start of the kernel expression ending just before `end` (exclusive): identifiers, ::, balanced <...>.
size_t kernel_start(size_t end) {
  size_t i = end;
  while (i > 0 && std::isspace((unsigned char)src[i - 1])) --i;
  const size_t stop = i;
  for (;;) {
    if (i > 0 && src[i - 1] == '>') {  // template arguments
      int depth = 0;
      size_t j = i;
      do {
        --j;
        if (src[j] == '>') ++depth;
        if (src[j] == '<') --depth;
      } while (j > 0 && depth > 0);
      if (depth != 0) die(end, "unbalanced template arguments before <<<");
      i = j;
    }
    const size_t id_end = i;
    while (i > 0 && ident(src[i - 1])) --i;
    if (i == id_end) die(end, "no kernel name before <<<");
    if (i >= 2 && src[i - 1] == ':' && src[i - 2] == ':') {
      i -= 2;
      if (i > 0 && ident(src[i - 1])) continue;
      break;  // leading ::
    }
    break;
  }
  if (i == stop) die(end, "no kernel name before <<<");
  return i;
}

std::string rewrite_launches() {
  std::string out;
  size_t done = 0;
  for (size_t p = find_code("<<<", 0); p != std::string::npos; p = find_code("<<<", p + 3)) {
    const size_t ks = kernel_start(p);
    size_t ke = p;
    while (ke > ks && std::isspace((unsigned char)src[ke - 1])) --ke;
    const std::string kernel = src.substr(ks, ke - ks);
    const size_t q = find_code(">>>", p + 3);
    if (q == std::string::npos) die(p, "<<< without >>>");
    out += src.substr(done, ks - done);
    out += src.substr(ke, p - ke);  // whitespace (and newlines) between the kernel and <<<
    out += "::cm_emu::launch(";
    out += src.substr(p + 3, q - p - 3);
    out += ", [](auto... cm_a) { " + kernel + "(cm_a...); })";
    done = q + 3;
    p = q;
  }
  out += src.substr(done);
  return out;
}

// Rewrites __shared__ declarations, statement by statement (a statement ends at its ';').
std::string rewrite_shared() {
  std::string out;
  size_t done = 0;
  const std::string kw = "__shared__";
  for (size_t p = find_code(kw, 0); p != std::string::npos; p = find_code(kw, p + kw.size())) {
    if ((p > 0 && ident(src[p - 1])) || ident(src[p + kw.size()])) continue;
    if (src.compare(p, kw.size() + 2, "__shared__ ") != 0 && src[p + kw.size()] != ' ') continue;
    // Skip macro definitions such as `#define __shared__` (none expected, but be safe).
    const size_t bol = src.rfind('\n', p) == std::string::npos ? 0 : src.rfind('\n', p) + 1;
    if (src.find('#', bol) < p) continue;
    const size_t semi = find_code(";", p);
    if (semi == std::string::npos) die(p, "__shared__ declaration without ';'");
    const std::string decl = src.substr(p + kw.size(), semi - p - kw.size());  // " T x[N]"
    // The declared name: the last identifier before '[' (array) or the end.
    size_t e = decl.find('[');
    if (e == std::string::npos) e = decl.size();
    while (e > 0 && std::isspace((unsigned char)decl[e - 1])) --e;
    size_t b = e;
    while (b > 0 && ident(decl[b - 1])) --b;
    if (b == e) die(p, "cannot find the name of a __shared__ declaration");
    const std::string name = decl.substr(b, e - b);
    // extern __shared__ T x[];
    size_t s = p;
    while (s > bol && std::isspace((unsigned char)src[s - 1])) --s;
    const bool is_extern = s >= 6 && src.compare(s - 6, 6, "extern") == 0;
    if (is_extern) {
      const std::string type = decl.substr(0, b);
      out += src.substr(done, s - 6 - done);
      out += type + "* " + name + " = ::cm_emu::dynamic_smem<" + type + ">()";
      done = semi;
    } else {
      out += src.substr(done, semi + 1 - done);
      out += " CM_EMU_SHARED_EPOCH(" + name + ")";
      done = semi + 1;
    }
    p = semi;
  }
  out += src.substr(done);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: cu2cpp IN.cu OUT.cpp\n";
    return 2;
  }
  in_name = argv[1];
  std::ifstream in(argv[1], std::ios::binary);
  if (!in) {
    std::cerr << "cu2cpp: cannot read " << argv[1] << "\n";
    return 2;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  src = ss.str();
  classify();
  src = rewrite_shared();
  classify();
  src = rewrite_launches();
  std::ofstream out(argv[2], std::ios::binary);
  out << "#line 1 \"" << argv[1] << "\"\n" << src;
  if (!out) {
    std::cerr << "cu2cpp: cannot write " << argv[2] << "\n";
    return 2;
  }
  return 0;
}
