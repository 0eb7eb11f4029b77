// Errors. Two kinds, both exceptions so that tests can assert them and programs can catch them:
//   cm::Error          - bad user input (shapes, indices, flags, files). Message names the value and what was expected.
//   CM_CHECK(cond,...) - an always-on internal invariant; throws cm::Error with file and line.
// Programs catch cm::Error at top level, print it and exit 2. Nothing here aborts.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace cm {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void cat(std::ostringstream&) {}
template <class T, class... R>
void cat(std::ostringstream& os, const T& v, const R&... r) {
  os << v;
  cat(os, r...);
}
}  // namespace detail

// str("shape ", a, " vs ", b): builds a message from streamable pieces.
template <class... A>
std::string str(const A&... a) {
  std::ostringstream os;
  detail::cat(os, a...);
  return os.str();
}

template <class... A>
[[noreturn]] void fail(const A&... a) {
  throw Error(str(a...));
}

}  // namespace cm

// CM_CHECK(cond, "message", value, ...): throws cm::Error("file:line: check `cond` failed: message value ...").
#define CM_CHECK(cond, ...)                                                                              \
  do {                                                                                                  \
    if (!(cond))                                                                                        \
      ::cm::fail(__FILE__, ":", __LINE__, ": check `" #cond "` failed: ", ##__VA_ARGS__);            \
  } while (0)

// CM_REQUIRE(cond, "message", ...): a user-input check; throws cm::Error with just the message.
#define CM_REQUIRE(cond, ...)                     \
  do {                                            \
    if (!(cond)) ::cm::fail(__VA_ARGS__);         \
  } while (0)
