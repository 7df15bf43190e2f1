// CPU code paths compiled for several x86-64 instruction sets in one binary, picked at load time.
//
// A function marked TSCD_CPU_MULTIVERSION is compiled three times by GCC (x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2 + FMA, and the baseline) and an ifunc resolver picks the best one the running CPU
// supports, so the wheel / editable build stays portable (no -march=native) while hot loops still get
// wide vectors. The inline per-pixel math of csrc/*.h is inlined into each clone. Elsewhere (other
// compilers or architectures, or -DTSCD_NO_MULTIVERSION) the macro is empty and the baseline is built.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(TSCD_NO_MULTIVERSION)
#define TSCD_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TSCD_CPU_MULTIVERSION
#endif

// Small helpers of the multiversioned loops: always inlined, so that each clone compiles them for its own ISA.
#if defined(__GNUC__)
#define TSCD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TSCD_ALWAYS_INLINE inline
#endif
