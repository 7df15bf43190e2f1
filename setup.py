"""Build tscd and its extension tscd._C (C++ with OpenMP always; CUDA when a toolkit and a CUDA torch exist).

Supported: torch 2.11 to 2.14 with triton 3.6 to 3.8 (tested: 2.14.1 + 3.8, and 2.11.0 + 3.6 by bench/compat.sh).

Install into an environment that already has PyTorch (the extension is compiled against that torch):

    pip install -e .                 # or `pip install .`; `--no-build-isolation` works too
    pip wheel --no-deps -w dist .    # a wheel for this torch (`python -m build --wheel` works as well)

Why plain `pip install` works although setup.py imports torch: pyproject.toml names an in-tree build
backend, _build/tscd_backend.py, that wraps setuptools.build_meta. pip's isolated build environment
holds only the build requirements; the backend finds the torch of the environment being installed into
(by asking the installer's own Python interpreter where torch is, see its docstring) and makes it
importable inside the isolated build, so the extension is compiled against exactly that torch, with no
second torch downloaded. The alternatives were worse: `requires = ["torch"]` in pyproject.toml
downloads a fresh torch (gigabytes) into every isolated build, and it need not be the installed one
(another CUDA build, another ABI: the extension would then fail to import); requiring
`--no-build-isolation` made plain `pip install -e .` silently install a package without kernels. Without
torch in the environment, the install stops at once with one sentence that says which torch to install.
The wheel's metadata pins the torch release it was compiled against (`torch==X.Y.Z`), because the
compiled extension only loads with that torch.

What was built is written to build/tscd-build.json and, beside the extension, tscd/_build_info.json
(read by `tscd info`); the compiler output of the extension build goes to build/tscd-build.log, which
is kept (and named in the report) when an optional part fails. The frontend shows a short summary at
the end of the install (a build-backend warning, which pip >= 26 prints without `-v`).

Environment switches:
    TSCD_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when nvcc is found and torch is a
                               CUDA build (no GPU is needed to compile); 0: CPU only; 1: CUDA or fail.
    TSCD_BUILD_STRICT=1        fail the install when the extension does not build (default: warn, and
                               leave a package that runs with the torch/triton backends).
    TORCH_CUDA_ARCH_LIST       GPU architectures (default without a visible GPU: "8.0;9.0+PTX").
    CUDA_HOME                  the CUDA toolkit (default: the one that holds `nvcc` on PATH).
    MAX_JOBS                   parallel compile jobs (ninja).
    TSCD_TORCH_PYTHON          the interpreter whose torch an isolated build uses (default: found, see above).
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
sys.path.insert(0, os.path.join(ROOT, "_build"))
from tscd_backend import build_summary  # noqa: E402  (the in-tree build backend; also run directly)


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


LOG = os.path.join(ROOT, "build", "tscd-build.log")
REPORT = os.path.join(ROOT, "build", "tscd-build.json")
NO_TORCH = ("torch is not installed: install PyTorch first (the tested release: `pip install torch==2.14.1 "
            "torchvision==0.29.1`), then `pip install -e .`")


class _TeeToLog:
    """Copies everything written to fds 1 and 2 (compiler and ninja output included) into the build log.

    The output still reaches the original stderr as it is produced (seen with `pip -v` or a direct
    `python setup.py ...`); the log keeps it, so a failed optional part can be read after the install.
    """

    def __enter__(self):
        import threading

        sys.stdout.flush()
        sys.stderr.flush()
        self._log = open(LOG, "ab")
        self._saved = (os.dup(1), os.dup(2))
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)

        def pump():
            while True:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                self._log.write(chunk)
                self._log.flush()
                try:
                    os.write(self._saved[1], chunk)
                except OSError:
                    pass
            os.close(read_end)

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)  # closes the pipe's last write ends: the pump sees EOF
        os.dup2(self._saved[1], 2)
        self._thread.join(timeout=30)
        for fd in self._saved:
            os.close(fd)
        self._log.close()
        return False


def _cuda_archs() -> str:
    """The GPU architectures nvcc compiles for, as torch's cpp_extension will pass them (e.g. "sm_80, sm_90")."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = " ".join(_get_cuda_arch_flags())
        sm = sorted(set(re.findall(r"code=sm_(\d+a?)", flags)), key=lambda a: int(a.rstrip("a")))
        ptx = sorted(set(re.findall(r"code=compute_(\d+a?)", flags)), key=lambda a: int(a.rstrip("a")))
        return ", ".join([f"sm_{a}" for a in sm] + [f"PTX compute_{a}" for a in ptx])
    except Exception:
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "those of the visible GPU")


def _extensions():
    try:
        import torch  # noqa: F401
    except ImportError:
        # wheel and editable builds through pip never get here (the build backend stops first);
        # an sdist or `setup.py egg_info` needs no torch
        if any(cmd.startswith(("build", "bdist", "develop", "install", "editable")) for cmd in sys.argv[1:]):
            raise SystemExit(f"tscd: {NO_TORCH}")
        return [], {}
    with_cuda, why = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    strict = os.environ.get("TSCD_BUILD_STRICT", "0") not in ("", "0")

    class BuildExt(BuildExtension):
        """Builds tscd._C; an optional part that fails is dropped with a loud message (unless strict).

        Writes the build report (build/tscd-build.json, and _build_info.json beside the extension, which
        `tscd info` reads) and keeps the compiler output in build/tscd-build.log.
        """

        def run(self):
            os.makedirs(os.path.dirname(LOG), exist_ok=True)
            open(LOG, "wb").close()  # the log of this build only
            self._report = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpp": False,
                            "cuda": False, "cuda_archs": None, "cuda_why": None if with_cuda else why,
                            "cuda_failed": None, "cpp_failed": None, "log": LOG,
                            "torch_from": os.environ.get("TSCD_BUILD_TORCH_FROM", sys.executable)}
            with _TeeToLog():
                super().run()
            self._write_report()

        def build_extension(self, ext):
            has_cu = any(s.endswith(".cu") for s in ext.sources)
            try:
                super().build_extension(ext)
                self._report.update(cpp=True, cuda=has_cu, cuda_archs=_cuda_archs() if has_cu else None)
                return
            except Exception as err:  # compiler errors arrive as distutils/setuptools errors
                if strict:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if not has_cu:
                    self._report["cpp_failed"] = first
                    self._drop_stale(ext)
                    _log(f"WARNING: the C++ extension tscd._C failed to build ({err}); tscd will run with the "
                         "torch and triton backends only. Fix the build (see the log above) or set "
                         "TSCD_BUILD_STRICT=1 to make this an error.")
                    return
                self._report["cuda_failed"] = first[:200]
                _log(f"WARNING: the CUDA kernels failed to build ({err}); retrying with the CPU kernels only")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.define_macros = [m for m in ext.define_macros if m[0] != "TSCD_WITH_CUDA"]
            self.build_extension(ext)

        def _drop_stale(self, ext):
            """Removes the binary of an earlier build (the build folder's, and the source tree's copy of an
            editable or --inplace build): setuptools would otherwise install or keep it, and the failed build
            would silently run old kernels."""
            ext.optional = True  # so that setuptools copies no (missing) binary into the source tree
            name = self.get_ext_filename(ext.name)
            for path in {self.get_ext_fullpath(ext.name), os.path.join(self.build_lib, name),
                         os.path.join(ROOT, name)}:
                if os.path.exists(path):
                    os.remove(path)
                    _log(f"removed the binary of an earlier build: {path}")

        def _write_report(self):
            import json

            report = dict(self._report, summary=build_summary(self._report))
            with open(REPORT, "w") as f:
                json.dump(report, f, indent=1)
            if self.extensions:  # beside the extension: in the wheel, or in the source tree when in place
                pkg_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
                os.makedirs(pkg_dir, exist_ok=True)
                with open(os.path.join(pkg_dir, "_build_info.json"), "w") as f:
                    json.dump(report, f, indent=1)
            for line in report["summary"]:
                _log(line)

    # the C++ standard is the one torch asks for. -fno-trapping-math: no kernel reads the FP exception flags, and
    # without it GCC will not if-convert a floating-point compare (it might trap), so on AVX2 (no vector masks)
    # every loop with a clamp or a select stayed scalar (the correlation backward ran 4-5x slower than on AVX-512).
    # Results are unchanged: it allows no reassociation and no finite-math assumption (NaN and inf propagate).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
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


def _torch_requirement() -> str:
    """`torch==X.Y.Z` (the release the extension is compiled against: it loads with no other), or a floor."""
    try:
        import torch
    except ImportError:
        return "torch>=2.4"
    return "torch==" + torch.__version__.split("+")[0]


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
        _torch_requirement(),
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
        "safetensors",
    ],
    extras_require={
        "triton": ["triton"],
        # transformers: optional weight-format tests; pytest-xdist: `make test-fast` runs its tests in 2 processes
        "test": ["pytest", "pytest-xdist", "transformers"],
        "dev": ["ruff", "build"],
    },
    entry_points={"console_scripts": ["tscd=tscd.cli:main"]},
)
