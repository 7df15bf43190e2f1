// The extension tscd._C: every op schema of the `tscd` namespace, declared once, here.
// Device implementations live in csrc/cpu/*_cpu.cpp (TORCH_LIBRARY_IMPL(tscd, CPU, ...)) and
// csrc/cuda/*_cuda.cu (TORCH_LIBRARY_IMPL(tscd, CUDA, ...)); fake (meta) kernels and autograd are
// registered from Python (tscd/kernels/<op>.py) so torch.compile can trace every op.
#include <Python.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/isa.h"

extern "C" {
// Importing tscd._C loads this library, which runs the registrations below. No Python bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tscd kernels (torch.ops.tscd)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace tscd {

// 0 when the extension was compiled without OpenMP (proves -fopenmp was compiled and linked otherwise).
int64_t openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

// The instruction set the CPU kernels run (2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline; cpu/isa.h), and the widest
// this CPU supports, for tests and `tscd info`.
int64_t cpu_isa_level() { return cpu::isa_level(); }
int64_t cpu_isa_supported() { return cpu::isa_supported(); }

TORCH_LIBRARY(tscd, m) {
  m.def("openmp_max_threads() -> int", &openmp_max_threads);
  m.def("cpu_isa_level() -> int", &cpu_isa_level);
  m.def("cpu_isa_supported() -> int", &cpu_isa_supported);
  m.def("correlation_isa_level() -> int", &cpu_isa_level);  // the older name of cpu_isa_level

  // refine: VARM / PAR (docs/method.md 4.1); mode 0 = varm, 1 = par. See csrc/refine.h for the math.
  m.def("refine_weights(Tensor image, int[] dilations, int mode, float rgb_scale, float aux_weight, "
        "Tensor? prior) -> Tensor");
  m.def("refine_fwd(Tensor image, Tensor cam, Tensor? num_channels, int[] dilations, int num_iter, int mode, "
        "float rgb_scale, float aux_weight, Tensor? prior) -> Tensor");
  m.def("refine_bwd(Tensor grad_out, Tensor image, Tensor? num_channels, int[] dilations, int num_iter, int mode, "
        "float rgb_scale, float aux_weight, Tensor? prior) -> Tensor");

  // correlation: the fused core of the SCD loss (docs/method.md 4.2) on sampled, normalised features
  // t1 (B,N1,Ct), t2 (B,N2,Ct), s1 (B,N1,Cs), s2 (B,N2,Cs), offset (B,N1). fwd: per-image
  // sum_ij P(s1_i.s2_j) * (t1_i.t2_j + offset_i) -> (B,); bwd: [ds1, ds2, dt1, dt2, doffset] (the teacher
  // grads are zeros unless teacher_grad). See csrc/correlation.h for the math.
  m.def("correlation_fwd(Tensor t1, Tensor t2, Tensor s1, Tensor s2, Tensor offset, bool clamp_student) -> Tensor");
  m.def("correlation_bwd(Tensor grad, Tensor t1, Tensor t2, Tensor s1, Tensor s2, Tensor offset, bool clamp_student, "
        "bool teacher_grad) -> Tensor[]");
  // fwd_grad (CPU): fwd and the gradients of its output itself (grad = 1) from one sweep over the tiles, for a
  // training step: (out, ds1, ds2, dt1, dt2, doffset), the teacher grads empty (shape (0,)) unless teacher_grad.
  m.def("correlation_fwd_grad(Tensor t1, Tensor t2, Tensor s1, Tensor s2, Tensor offset, bool clamp_student, "
        "bool teacher_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // permutohedral: Gaussian filtering on a permutohedral lattice (docs/method.md 4.5, 6); values (B, K, N), features
  // (B, D, N) in std-1 units. bwd: the gradient w.r.t. values (the transposed lattice). See csrc/permutohedral.h.
  m.def("permutohedral_fwd(Tensor values, Tensor features, bool normalize, bool include_self) -> Tensor");
  m.def("permutohedral_bwd(Tensor grad_out, Tensor features, bool normalize, bool include_self) -> Tensor");
  // dense_crf: mean-field inference (docs/method.md 6) of unary energies (B, K, N) with one lattice per kernel
  // (features (B, D_k, N), Potts weight w_k), built once for all iterations; returns the marginals Q (B, K, N).
  m.def("dense_crf_fwd(Tensor unary, Tensor[] features, float[] weights, int num_iter) -> Tensor");
}

}  // namespace tscd
