"""Builds (or finds in its cache) cudasim's library: csrc/cuda/*.cu and tests/cudasim/selftest.cu rewritten by
rewrite.py, compiled with g++ against cudasim.h and the c10/cuda stand-ins, linked with runtime.cpp.

    python -m tests.cudasim.build [--tsan] [--verbose]     # prints the library's path

Objects and the library are cached by a hash of their inputs (sources, headers, flags, compiler, torch), in
``build/cudasim/`` of the checkout (``TSCD_CUDASIM_CACHE`` to move it; the four newest libraries of each variant are
kept), so only the first test run after a change compiles, and only what the change touched. Compilation is one
job (one translation unit at a time), some tens of seconds per file.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cudasim.rewrite import rewrite_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
LIB_NAME = "libtscd_cudasim.so"

#: permutohedral's chunk bound and hash-table size (csrc/cuda/permutohedral_cuda.cu) become run-time knobs of the
#: library, so the tests can make small inputs span several chunks and fill the table more
#: (tscd_cudasim::set_knob("perm_max_chunk_values", n), set_knob("perm_table_factor", 1)).
KNOB_DEFINES = ['-DTSCD_PERM_MAX_CHUNK_VALUES=(::cudasim::knob("perm_max_chunk_values", int64_t(1) << 25))',
                '-DTSCD_PERM_TABLE_FACTOR=(::cudasim::knob("perm_table_factor", 2))']


class BuildError(RuntimeError):
    """The library did not compile; the message holds the compiler's output."""


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]


def _headers() -> list[Path]:
    """What every translation unit may include: csrc's headers, cudasim.h and the stand-ins, the rewriter."""
    files = [p for p in CSRC.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh"}]
    files += [p for p in HERE.rglob("*") if p.is_file() and p.suffix == ".h"]
    return sorted(files) + [HERE / "rewrite.py"]


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"cudasim needs a C++ compiler: '{cxx}' is not on PATH (set CXX)")
    return cxx


def _flags(tsan: bool) -> tuple[list[str], list[str], list[str]]:
    """(kernel flags, runtime flags, link flags)."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = ["-std=c++20", "-fPIC", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-fvisibility=hidden",
              "-fvisibility-inlines-hidden", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", str(HERE / "include"),
              "-I", str(CSRC / "cuda"), "-I", str(CSRC)]
    for p in include_paths():
        common += ["-isystem", p]
    kernel = common + ["-include", str(HERE / "cudasim.h")] + KNOB_DEFINES
    kernel += ["-O1", "-g", "-fsanitize=thread"] if tsan else ["-O2"]
    runtime = common + ["-O2"] + (["-DCUDASIM_TSAN"] if tsan else [])
    link = ["-shared", "-Wl,-Bsymbolic"]
    for p in library_paths():
        link += ["-L", p, f"-Wl,-rpath,{p}"]
    link += ["-lc10", "-ltorch_cpu", "-ltorch"]
    if tsan:
        link.append("-fsanitize=thread")
    return kernel, runtime, link


def _cache_root() -> Path:
    return Path(os.environ.get("TSCD_CUDASIM_CACHE", ROOT / "build" / "cudasim"))


def _key(parts: list[str], files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update("\0".join(parts).encode())
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _toolchain_cached() -> tuple[str, ...]:
    import torch

    cxx = _compiler()
    return (cxx, subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout, torch.__version__)


def _toolchain() -> list[str]:
    return list(_toolchain_cached())


def _units(tsan: bool) -> list[tuple[Path, list[str], str]]:
    """(source, flags, cache key) of every translation unit."""
    kernel, runtime, _ = _flags(tsan)
    tool, headers = _toolchain(), _headers()
    units = [(src, kernel, _key(tool + kernel, [src] + headers)) for src in cuda_sources()]
    units.append((HERE / "runtime.cpp", runtime, _key(tool + runtime, [HERE / "runtime.cpp"] + headers)))
    return units


def cache_dir(tsan: bool) -> Path:
    """The folder of the library built from the present inputs."""
    _, _, link = _flags(tsan)
    key = _key(_toolchain() + link + [k for _, _, k in _units(tsan)], [])
    return _cache_root() / f"{'tsan' if tsan else 'plain'}-{key}"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: list[str]) -> None:
    log.append(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.append(r.stdout + r.stderr)
    if r.returncode != 0:
        raise BuildError("cudasim: the build failed:\n" + "\n".join(log[-2:])[-20000:])


def _prune(root: Path, keep: int = 4) -> None:
    """Removes all but the ``keep`` newest libraries of each variant, and the objects no kept library was built
    from (an object's name ends in its key; each library's build.log names its objects)."""
    libs = sorted((p for p in root.glob("*-*") if p.is_dir() and (p / LIB_NAME).exists()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    kept = [p for v in ("plain", "tsan") for p in [q for q in libs if q.name.startswith(v + "-")][:keep]]
    for p in libs:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    for lock in root.glob("*.lock"):
        if not lock.with_suffix("").exists():
            lock.unlink(missing_ok=True)
    used = "".join((p / "objects.txt").read_text() for p in kept if (p / "objects.txt").exists())
    for obj in (root / "objects").glob("*.o"):
        if obj.name not in used:
            obj.unlink(missing_ok=True)
            obj.with_suffix(".cu.cpp").unlink(missing_ok=True)


def build(tsan: bool = False, verbose: bool = False) -> Path:
    """The path of the library (built now if the cache has none for these inputs)."""
    out = cache_dir(tsan)
    lib = out / LIB_NAME
    if lib.exists():
        return lib
    with _locked(out.with_name(out.name + ".lock")):
        if lib.exists():
            return lib
        _, _, link = _flags(tsan)
        cxx = _compiler()
        objects = _cache_root() / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        log: list[str] = []
        t0 = time.time()
        objs = []
        for src, flags, key in _units(tsan):
            obj = objects / f"{src.stem}-{key}.o"
            objs.append(obj)
            if obj.exists():
                continue
            if verbose:
                print(f"cudasim: compiling {src.relative_to(ROOT)}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=objects) as tmp:
                unit = src
                if src.suffix == ".cu":
                    unit = Path(tmp) / (src.stem + ".cu.cpp")
                    rewrite_file(src, unit, str(src.relative_to(ROOT)))
                _run([cxx, *flags, "-c", str(unit), "-o", str(Path(tmp) / "unit.o")], log)
                if unit != src:  # the rewritten source, for reading compiler messages
                    os.replace(unit, objects / f"{src.stem}-{key}.cu.cpp")
                os.replace(Path(tmp) / "unit.o", obj)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            _run([cxx, *map(str, objs), *link, "-o", str(Path(tmp) / LIB_NAME)], log)
            (Path(tmp) / "build.log").write_text("\n".join(log) + f"\n# {time.time() - t0:.1f} s\n")
            (Path(tmp) / "objects.txt").write_text("\n".join(o.name for o in objs) + "\n")
            out.mkdir(parents=True, exist_ok=True)
            for name in ("objects.txt", "build.log", LIB_NAME):
                os.replace(Path(tmp) / name, out / name)
        _prune(_cache_root())
        return lib


def load(tsan: bool = False, verbose: bool = False):
    """Builds if needed, loads the library into this process and returns ``torch.ops.tscd_cudasim``."""
    import torch

    lib = build(tsan=tsan, verbose=verbose)
    torch.ops.load_library(str(lib))
    return torch.ops.tscd_cudasim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsan", action="store_true", help="the ThreadSanitizer variant")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    print(build(tsan=args.tsan, verbose=args.verbose))
    if args.verbose:
        print(f"cudasim: {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
