// The instruction set the CPU kernels run, one for all of them: the widest x86-64 level the CPU supports
// (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, or the baseline), capped by the environment variable
// TSCD_CPU_ISA=avx512|avx2|baseline so that the narrower paths can be tested and timed on a wider CPU.
// TSCD_CORRELATION_ISA (same values) is an older name of the cap; when both are set, the narrower one wins.
// Both are read once, at the first call; a bad value is an error (then, and at every later call).
//
// Each kernel family compiles its hot loops once per level (isa_each.h) and picks the copy with
// with_isa(f) at the start of each op call.
#pragma once

#include <cstdint>

// The small helpers of the per-level loops: always inlined, so that each copy compiles them for its own level.
// The loops' entry functions (one row, one range of points): never inlined into their callers, so that each is
// compiled on its own, its code and speed independent of the dispatch around it.
#if defined(__GNUC__)
#define TSCD_ALWAYS_INLINE inline __attribute__((always_inline))
#define TSCD_NOINLINE __attribute__((noinline))
#else
#define TSCD_ALWAYS_INLINE inline
#define TSCD_NOINLINE
#endif

namespace tscd {
namespace cpu {

constexpr int kIsaBaseline = 0;
constexpr int kIsaAvx2 = 1;    // x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
constexpr int kIsaAvx512 = 2;  // x86-64-v4: the above and AVX-512 F, BW, CD, DQ, VL

// The widest level this CPU supports (0 off x86-64 or without GCC's target pragmas).
int isa_supported();
// The level the kernels run: isa_supported() capped by TSCD_CPU_ISA / TSCD_CORRELATION_ISA.
int isa_level();

}  // namespace cpu
}  // namespace tscd
