// The CPU kernels' instruction-set level (isa.h).
#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace tscd {
namespace cpu {
namespace {

// min(level, the cap named by environment variable `var`); an unset or empty variable caps nothing.
int capped(int level, const char* var) {
  const char* cap = std::getenv(var);
  if (cap == nullptr) return level;
  const std::string c(cap);
  TORCH_CHECK(c == "avx512" || c == "avx2" || c == "baseline" || c.empty(), var,
              " must be avx512, avx2 or baseline; got '", c, "'");
  if (c == "avx2") return std::min(level, kIsaAvx2);
  if (c == "baseline") return kIsaBaseline;
  return level;
}

}  // namespace

int isa_supported() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int level = __builtin_cpu_supports("x86-64-v4")   ? kIsaAvx512
                           : __builtin_cpu_supports("x86-64-v3") ? kIsaAvx2
                                                                 : kIsaBaseline;
  return level;
#else
  return kIsaBaseline;
#endif
}

int isa_level() {
  static const int level = capped(capped(isa_supported(), "TSCD_CPU_ISA"), "TSCD_CORRELATION_ISA");
  return level;
}

}  // namespace cpu
}  // namespace tscd
