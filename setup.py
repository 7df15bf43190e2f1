"""Build tscd and its extension tscd._C (C++ with OpenMP always; CUDA when a toolkit and a CUDA torch exist).

Supported: torch 2.11 to 2.14 with triton 3.6 to 3.8 (tested: 2.14.1 + 3.8, and 2.11.0 + 3.6 by bench/compat.sh).

Install (torch must already be installed, hence no build isolation):

    pip install --no-build-isolation -e .

Environment switches:
    TSCD_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when nvcc is found and torch is a
                               CUDA build (no GPU is needed to compile); 0: CPU only; 1: CUDA or fail.
    TSCD_BUILD_STRICT=1        fail the install when the extension does not build (default: warn, and
                               leave a package that runs with the torch/triton backends).
    TORCH_CUDA_ARCH_LIST       GPU architectures (default without a visible GPU: "8.0;9.0+PTX").
    CUDA_HOME                  the CUDA toolkit (default: the one that holds `nvcc` on PATH).
    MAX_JOBS                   parallel compile jobs (ninja).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[tscd setup] {msg}", file=sys.stderr, flush=True)


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
        os.path.join(home, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else the toolkit of the `nvcc` on PATH, else /usr/local/cuda(-*).

    `nvcc` on PATH may be a wrapper script (it is on our machines), so each candidate must hold both
    bin/nvcc and include/cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # `nvcc --dryrun` names the real toolkit: "#$ TOP=/usr/local/cuda-13.0/bin/.."
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
            m = re.search(r"TOP=(\S+)", out)
            if m:
                candidates.append(os.path.realpath(os.path.join(m.group(1), "..") if m.group(1).endswith("bin")
                                                   else m.group(1)))
        except Exception:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if _is_toolkit(home):
            return os.path.realpath(home)
    return None


def _nvcc_major(cuda_home: str) -> int | None:
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except Exception:
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _want_cuda() -> tuple[bool, str]:
    """Decide whether to compile the CUDA kernels; set CUDA_HOME before torch's cpp_extension reads it."""
    flag = os.environ.get("TSCD_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "TSCD_BUILD_CUDA=0"
    import torch

    cuda_home = _find_cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset)"
    else:
        major = _nvcc_major(cuda_home)
        if major is not None and major != int(torch.version.cuda.split(".")[0]):
            reason = f"nvcc is CUDA {major} but torch was built with CUDA {torch.version.cuda}"
    if reason is not None:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError(f"TSCD_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # +PTX: newer GPUs JIT-compile the sm_90 PTX
    return True, f"CUDA toolkit {cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')}"


def _extensions():
    try:
        import torch  # noqa: F401
    except ImportError:
        _log("torch is not installed: install it first, then `pip install --no-build-isolation -e .`; "
             "building without the extension")
        return [], {}
    with_cuda, why = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    strict = os.environ.get("TSCD_BUILD_STRICT", "0") not in ("", "0")

    class BuildExt(BuildExtension):
        """Builds tscd._C; an optional part that fails is dropped with a loud message (unless strict)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # compiler errors arrive as distutils/setuptools errors
                if strict:
                    raise
                cu = [s for s in ext.sources if s.endswith(".cu")]
                if not cu:
                    _log(f"WARNING: the C++ extension tscd._C failed to build ({err}); tscd will run with the "
                         "torch and triton backends only. Fix the build (see the log above) or set "
                         "TSCD_BUILD_STRICT=1 to make this an error.")
                    return
                _log(f"WARNING: the CUDA kernels failed to build ({err}); retrying with the CPU kernels only")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.define_macros = [m for m in ext.define_macros if m[0] != "TSCD_WITH_CUDA"]
            self.build_extension(ext)

    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="tscd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        _log(f"building CPU + CUDA kernels ({why})")
        kwargs["sources"] = sources + sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["define_macros"] = [("TSCD_WITH_CUDA", None)]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += os.environ.get("NVCC_FLAGS", "").split()
        ext = CUDAExtension(**kwargs, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        _log(f"building CPU kernels only ({why})")
        ext = CppExtension(**kwargs, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="tscd",
    version="0.1.0",
    description="End-to-end weakly-supervised semantic segmentation (TSCD) with fused Triton and C++/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tscd", "tscd.*"]),
    package_data={"tscd": ["**/*.txt", "**/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "timm>=1.0",
        "pyyaml",
        "pillow",
        "tqdm",
        "pycocotools",
        "tensorboard",
        "matplotlib",
        "ninja",
        "pybind11",
        "pytest",
    ],
    extras_require={"triton": ["triton"], "dev": ["ruff"]},
    entry_points={"console_scripts": ["tscd=tscd.cli:main"]},
)
