// exp in float for the kernels' softmaxes, in plain arithmetic so that a SIMD loop over pixels vectorises it
// (no libm call): Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2 (n rounded by adding 1.5 * 2^23), exp(r)
// by Cephes' expf polynomial (about 1 ulp), and 2^n built from its exponent bits. Underflow flushes to 0 (below
// e^-87.3), overflow gives +inf, NaN stays NaN. Shared by the CPU and CUDA sources of refine and permutohedral.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace tscd {

// 2^n exp(r) for xc in [-87.33654, 88.72283] (or NaN): the reduction and polynomial shared by the two below.
C10_HOST_DEVICE inline float fast_expf_in_range(float xc) {
  const float n = (xc * 1.44269504089f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(float));
#endif
  return q * scale;
}

C10_HOST_DEVICE inline float fast_expf(float x) {
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);  // NaN passes through
  const float e = fast_expf_in_range(xc);
  return x < -87.33654f ? 0.f : (x > 88.72283f ? INFINITY : e);
}

// fast_expf for x <= 0 (a softmax's argument after subtracting the max), the same values with one clamp and one
// select fewer (a positive x below 88.7 still gives exp(x); NaN stays NaN).
C10_HOST_DEVICE inline float fast_expf_nonpositive(float x) {
  const float e = fast_expf_in_range(x < -87.33654f ? -87.33654f : x);
  return x < -87.33654f ? 0.f : e;
}

}  // namespace tscd
