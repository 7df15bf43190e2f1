// Compiles the loops of one kernel family once per instruction-set level of isa.h and defines with_isa(f), which
// calls f with the copy cpu::isa_level() names.
//
// The including source includes isa.h, defines TSCD_ISA_LOOPS (the quoted name of a header in csrc/cpu) and then
// includes this file once, inside its own namespace (within tscd). The loops header is then included three times,
// inside `namespace TSCD_ISA` = isa_default, isa_avx2, isa_avx512, under the matching `#pragma GCC target` (none,
// x86-64-v3, x86-64-v4), with TSCD_ISA_FLOATS = the floats per vector register (4, 8, 16). It defines the loops and
// their always-inline helpers (so each copy compiles them for its own instruction set; the inline math of csrc/*.h
// is inlined into each copy) and ends with a tag type `struct Isa` whose static members call them. with_isa(f)
// returns f(isa_<level>::Isa{}). Off x86-64 GCC only isa_default is compiled (isa_avx2 and isa_avx512 are aliases
// of it).
#ifndef TSCD_ISA_LOOPS
#error "define TSCD_ISA_LOOPS, the loops header to compile per instruction set, before including isa_each.h"
#endif

#define TSCD_ISA isa_default
#define TSCD_ISA_FLOATS 4
#include TSCD_ISA_LOOPS
#undef TSCD_ISA_FLOATS
#undef TSCD_ISA

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define TSCD_ISA isa_avx2
#define TSCD_ISA_FLOATS 8
#include TSCD_ISA_LOOPS
#undef TSCD_ISA_FLOATS
#undef TSCD_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define TSCD_ISA isa_avx512
#define TSCD_ISA_FLOATS 16
#include TSCD_ISA_LOOPS
#undef TSCD_ISA_FLOATS
#undef TSCD_ISA
#pragma GCC pop_options
#else
namespace isa_avx2 = isa_default;
namespace isa_avx512 = isa_default;
#endif

#undef TSCD_ISA_LOOPS

template <typename F>
decltype(auto) with_isa(F&& f) {
  switch (cpu::isa_level()) {
    case cpu::kIsaAvx512: return f(isa_avx512::Isa{});
    case cpu::kIsaAvx2: return f(isa_avx2::Isa{});
    default: return f(isa_default::Isa{});
  }
}
