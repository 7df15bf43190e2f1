"""The install as a user types it: pip's isolated build uses the environment's torch, or stops at once.

These run pip (the isolated build environment gets setuptools, wheel and ninja from the package index)
on small projects that use the repository's build backend, _build/tscd_backend.py, so no extension is
compiled; the real build is exercised by CI's `make test` (README, "Two commands"), which installs
with plain `pip install -e .` and then requires the compiled backends.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_build"))
import tscd_backend  # noqa: E402

sys.path.remove(str(ROOT / "_build"))


def _pip(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _project(tmp_path: Path) -> Path:
    """A project with tscd's backend and a setup.py that records the torch it imports into its wheel."""
    proj = tmp_path / "proj"
    (proj / "probe_pkg").mkdir(parents=True)
    shutil.copytree(ROOT / "_build", proj / "_build", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=64", "wheel"]
        build-backend = "tscd_backend"
        backend-path = ["_build"]
    """))
    (proj / "probe_pkg" / "__init__.py").write_text("")
    (proj / "setup.py").write_text(textwrap.dedent("""\
        import json, os
        import torch
        from setuptools import setup

        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "probe_pkg", "seen.json"), "w") as f:
            json.dump({"torch_file": torch.__file__, "torch_version": torch.__version__}, f)
        os.makedirs(os.path.join(here, "build"), exist_ok=True)
        with open(os.path.join(here, "build", "tscd-build.json"), "w") as f:
            json.dump({"summary": ["tscd._C compiled for probe: C++ kernels (OpenMP) only."],
                       "log": os.path.join(here, "build", "tscd-build.log")}, f)
        setup(name="probe-pkg", version="0.1", packages=["probe_pkg"], package_data={"probe_pkg": ["*.json"]})
    """))
    return proj


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["default", "venv-isolation", "off"])
def test_isolated_wheel_build_uses_the_environments_torch(tmp_path, isolation):
    """`pip wheel .` (isolated, or not) imports THIS environment's torch in setup.py; no torch is downloaded."""
    proj = _project(tmp_path)
    extra = {"default": [], "off": ["--no-build-isolation"],
             "venv-isolation": ["--use-feature", isolation]}[isolation]  # pip >= 26: a venv per build
    out = _pip("wheel", "--no-deps", "-w", str(tmp_path / "dist"), *extra, ".", cwd=proj)
    if out.returncode != 0 and "invalid choice" in out.stderr:
        pytest.skip(f"this pip has no --use-feature {isolation}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Collecting torch" not in out.stdout and "Downloading torch" not in out.stdout
    (wheel,) = (tmp_path / "dist").glob("probe_pkg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        seen = json.loads(zf.read("probe_pkg/seen.json"))
    assert os.path.realpath(seen["torch_file"]) == os.path.realpath(torch.__file__)
    assert seen["torch_version"] == torch.__version__
    # the build report reaches the user without -v (a build-backend warning; pip >= 26 prints them)
    pip_major = int(subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                                   text=True).stdout.split()[1].split(".")[0])
    if pip_major >= 26:
        assert "tscd._C compiled for probe" in out.stdout + out.stderr


def test_failed_cpp_build_leaves_no_stale_binary(tmp_path):
    """A C++ build that fails (the lenient default) removes the binary of an earlier build, from the build folder
    and from the source tree, so that tscd really runs without it (as the warning says) instead of loading old
    kernels; the build itself still succeeds."""
    proj = tmp_path / "src"
    shutil.copytree(ROOT / "_build", proj / "_build", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", proj / "setup.py")
    (proj / "csrc").mkdir()
    (proj / "csrc" / "ops.cpp").write_text("#error deliberately broken\n")
    (proj / "tscd").mkdir()
    (proj / "tscd" / "__init__.py").write_text("")
    env = dict(os.environ, TSCD_BUILD_CUDA="0", TSCD_BUILD_STRICT="0")
    probe = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    stale_src = proj / "tscd" / f"_C{probe}"
    stale_src.write_text("an old build")
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=proj, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "failed to build" in out.stdout + out.stderr
    assert "removed the binary of an earlier build" in out.stdout + out.stderr
    assert not stale_src.exists()


@pytest.mark.slow
def test_install_without_torch_stops_at_once_with_one_sentence(tmp_path):
    """`pip install .` into an environment without torch fails fast, naming the torch to install."""
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # pip runs from here, into that environment (--python)
    t0 = time.monotonic()
    out = _pip("--python", str(bare / "bin" / "python"), "install", "--no-deps", str(ROOT), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "install PyTorch first" in text and "pip install torch==" in text, text
    assert "Traceback" not in text, text
    assert "Building wheel" not in text, text  # nothing was compiled
    assert elapsed < 300


def test_backend_reads_the_torch_of_this_environment(tmp_path, monkeypatch):
    """The probe that the backend runs finds this interpreter's torch even with pip's isolation variables."""
    site = tmp_path / "isolation-site"
    site.mkdir()
    # pip's default isolation: a sitecustomize on PYTHONPATH that hides the environment's site-packages
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    hidden = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                            env=env, capture_output=True, text=True)
    assert hidden.stdout.strip() == "None"  # the simulated isolation does hide torch
    found = tscd_backend._probe(sys.executable, tscd_backend._clean_env(env), None)
    assert found is not None and found["torch"] is not None
    assert os.path.dirname(os.path.realpath(found["torch"])) == os.path.dirname(os.path.realpath(torch.__file__))


def test_backend_never_runs_a_parent_that_is_not_this_python(monkeypatch):
    """The frontend route runs the parent's argv[0] only when it is the same Python binary."""
    if not os.path.exists("/proc/self/exe"):
        pytest.skip("no /proc on this platform (the frontend route is Linux-only)")
    # the parent of this test process is whatever started pytest; pretend it is a shell
    monkeypatch.setattr(os, "getppid", lambda: os.getpid())
    me = tscd_backend._frontend()  # our own process: the same binary, so it is accepted...
    assert me is None or os.path.realpath(me[0]) == os.path.realpath("/proc/self/exe")
    sh = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(os, "getppid", lambda: sh.pid)
        assert tscd_backend._frontend() is None  # ...a `sleep` never is
    finally:
        sh.kill()
        sh.wait()


def test_no_torch_message_names_the_tested_torch():
    msg = tscd_backend.NO_TORCH.format(where="the Python environment of /x/bin/python")
    assert "pip install torch==2.14.1 torchvision==0.29.1" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence


def test_installed_build_report_matches_the_loaded_extension():
    """`pip install` leaves a report beside tscd._C, and it says what actually loaded."""
    from tscd.kernels import _ext

    required = "cpp" in os.environ.get("TSCD_REQUIRE_BACKENDS", "")
    report = _ext.build_report()
    if not _ext.has_cpp() or report is None:
        if required:
            pytest.fail(f"tscd._C or its build report is missing: {_ext.load_error() or 'no _build_info.json'}")
        pytest.skip("tscd._C was not installed by setup.py here")
    assert report["cpp"] is True
    assert report["cuda"] == _ext.has_cuda_kernels()
    assert report["torch"] == torch.__version__
    assert report["summary"] and report["summary"][0].startswith("tscd._C compiled for torch")


def _report(**kw) -> dict:
    base = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cpp": True, "cuda": True, "cuda_archs": "sm_80, sm_90",
            "cuda_why": None, "cuda_failed": None, "cpp_failed": None, "log": "/src/build/tscd-build.log"}
    return {**base, **kw}


def test_build_summary_names_kernels_archs_and_failed_log():
    ok = tscd_backend.build_summary(_report())
    assert ok[0] == ("tscd._C compiled for torch 2.14.1+cu130: "
                     "C++ (OpenMP) and CUDA kernels for sm_80, sm_90 (CUDA 13.0).")
    failed = tscd_backend.build_summary(_report(cuda=False, cuda_archs=None, cuda_failed="error: nvcc died"))
    assert failed[0].endswith("C++ kernels (OpenMP) only.")
    assert "CUDA kernels FAILED" in failed[1] and "/src/build/tscd-build.log" in failed[1]
    skipped = tscd_backend.build_summary(_report(cuda=False, cuda_archs=None, cuda_why="torch is a CPU-only build"))
    assert skipped[1] == "CUDA kernels not built: torch is a CPU-only build."
    broken = tscd_backend.build_summary(_report(cpp=False, cuda=False, cpp_failed="x"))
    assert len(broken) == 1 and "FAILED" in broken[0] and "/src/build/tscd-build.log" in broken[0]


def test_tscd_info_shows_the_build_report(monkeypatch, capsys):
    import argparse

    from tscd.commands import info
    from tscd.kernels import _ext

    report = dict(_report(), summary=tscd_backend.build_summary(_report()))
    monkeypatch.setattr(_ext, "build_report", lambda: report)
    info.run(argparse.Namespace(json=False))
    assert "build     tscd._C compiled for torch 2.14.1+cu130" in capsys.readouterr().out
    info.run(argparse.Namespace(json=True))
    assert json.loads(capsys.readouterr().out)["extension"]["build_report"]["cuda_archs"] == "sm_80, sm_90"
