"""PEP 517 build backend of tscd: setuptools' ``build_meta`` that builds against the environment's torch.

``tscd._C`` must be compiled against the torch it will run with. An isolated build (pip's default, and
``python -m build``) runs in a fresh environment that holds only the build requirements, so ``import
torch`` fails there; declaring torch as a build requirement would download a second torch (gigabytes)
that need not match the installed one (wrong CUDA build, wrong ABI). This backend instead makes the
*target* environment's torch importable inside the isolated build, and adds no torch requirement.

Finding the target environment: PEP 517 tells a backend nothing about it, so the backend asks the
Python interpreters that can know, in this order, and takes the first one whose ``import torch`` would
succeed (the probe looks the module up with ``importlib.util.find_spec``; it does not import torch):

1. ``TSCD_TORCH_PYTHON``, when set: an explicit interpreter (for frontends that fit none of 2-4).
2. The frontend process (Linux): the process that runs this hook is started by the frontend (pip,
   ``python -m build``), and the frontend runs in the environment being installed into (pip installs
   into the environment of the interpreter that runs it). Its interpreter is its ``argv[0]``, resolved
   in its working directory and ``PATH``; it is probed with the frontend's own initial environment
   (``/proc/<ppid>/environ``: ``PYTHONPATH`` and user site included, as the user set them), and only
   when argv[0] is the binary the frontend runs and that is a Python (the one running this hook, or
   named python*/pypy*), so nothing that is not a Python is ever run.
3. Only when the frontend is no Python program (uv): the activated environment, ``$VIRTUAL_ENV`` or
   ``$CONDA_PREFIX``. (When the frontend is a Python, its environment alone decides: an install into an
   environment without torch stops, even if another activated environment has one.)
4. ``sys.executable`` with the isolation variables removed (``PYTHONPATH``, ``PYTHONNOUSERSITE``): in
   pip's default isolation it *is* the target interpreter (pip hides its site-packages with a
   ``sitecustomize`` placed on ``PYTHONPATH``); in a venv-based isolation it holds no torch and is skipped.

The first interpreter that finds torch gives its ``sys.path``; the entries this process lacks are
appended to ``sys.path`` (after the isolated environment's, so its setuptools still wins; no ``.pth``
file is executed), and torch is imported from there. Without isolation (``--no-build-isolation``) torch
is importable already and nothing is changed. When no torch is found, the wheel and editable hooks stop
at once with one sentence that says which torch to install (no traceback, nothing compiled); an sdist
needs no torch.

The end of a wheel or editable build reports what was compiled (kernels, CUDA architectures, log of a
failed optional part) as a build-backend warning: pip >= 26 prints those for local directories
(``pip install .``, ``pip install -e .``, ``pip wheel .``) without ``-v``; older pips show it with
``-v``; ``tscd info`` shows the same report at any time.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

from setuptools import build_meta as _setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "build", "tscd-build.json")  # written by setup.py's build_ext
TESTED_TORCH = "torch==2.14.1 torchvision==0.29.1"

NO_TORCH = ("tscd compiles its C++/CUDA kernels against the PyTorch of the environment it is installed into, "
            "and {where} has no torch: install PyTorch first (the tested release: `pip install "
            + TESTED_TORCH + "`, or the PyTorch build for your CUDA version), then run this command again.")

_PROBE = ("import importlib.util, json, sys\n"
          "spec = importlib.util.find_spec('torch')\n"
          "print(json.dumps({'torch': spec.origin if spec else None, 'path': sys.path, 'exe': sys.executable}))\n")


class TorchNotFound(Exception):
    pass


def _clean_env(env: dict) -> dict:
    env = dict(env)
    for name in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "_PYPROJECT_HOOKS_BUILD_BACKEND",
                 "_PYPROJECT_HOOKS_BACKEND_PATH_JSON"):
        env.pop(name, None)
    return env


def _frontend() -> tuple[str, dict, str] | None:
    """(interpreter, initial environment, working directory) of the parent process, when it is a Python."""
    proc = f"/proc/{os.getppid()}"
    try:
        with open(f"{proc}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode()
        with open(f"{proc}/environ", "rb") as f:
            env = dict(item.decode(errors="replace").split("=", 1) for item in f.read().split(b"\0") if b"=" in item)
        cwd = os.readlink(f"{proc}/cwd")
        parent_exe = os.path.realpath(f"{proc}/exe")
    except (OSError, ValueError):
        return None
    if not argv0:
        return None
    if os.sep in argv0:
        exe = os.path.join(cwd, argv0)  # absolute, or relative to the frontend's working directory
    else:  # found on the frontend's PATH, as its shell did
        dirs = [os.path.join(cwd, d or ".") for d in env.get("PATH", "").split(os.pathsep)]
        exe = next((os.path.join(d, argv0) for d in dirs
                    if os.path.isfile(os.path.join(d, argv0)) and os.access(os.path.join(d, argv0), os.X_OK)), None)
    if exe is None or not os.path.exists(exe):
        return None
    me = os.path.realpath("/proc/self/exe") if os.path.exists("/proc/self/exe") else os.path.realpath(sys.executable)
    is_python = parent_exe == me or re.fullmatch(r"(python|pypy)[0-9.]*", os.path.basename(parent_exe))
    if os.path.realpath(exe) != parent_exe or not is_python:
        return None  # argv[0] is not the binary the frontend runs, or that is not a Python: never run it
    return exe, env, cwd


def _candidates():
    explicit = os.environ.get("TSCD_TORCH_PYTHON")
    if explicit:
        yield explicit, _clean_env(os.environ), None, "TSCD_TORCH_PYTHON"
        return
    front = _frontend()
    if front is not None:
        yield front[0], front[1], front[2], "the interpreter that runs the installer"
    else:  # a frontend that is no Python (uv) installs into the activated environment
        for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
            python = os.path.join(os.environ.get(var) or "/nonexistent", "bin", "python")
            if os.path.isfile(python) and os.path.realpath(python) != os.path.realpath(sys.executable):
                yield python, _clean_env(os.environ), None, f"${var}"
    yield sys.executable, _clean_env(os.environ), None, "this interpreter without build isolation"


def _probe(python: str, env: dict, cwd: str | None) -> dict | None:
    try:
        out = subprocess.run([python, "-c", _PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def locate_torch() -> dict:
    """Make the target environment's torch importable here; returns how it was found.

    Raises TorchNotFound when no interpreter that can be asked has torch.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return {"how": "importable in the build environment (no isolation)", "python": sys.executable}
    tried = []
    for python, env, cwd, how in _candidates():
        found = _probe(python, env, cwd)
        tried.append(python)
        if not found or not found.get("torch"):
            continue
        have = {os.path.realpath(p) for p in sys.path if p}
        for entry in found["path"]:
            if entry and os.path.exists(entry) and os.path.realpath(entry) not in have:
                sys.path.append(entry)
                have.add(os.path.realpath(entry))
        importlib.invalidate_caches()
        os.environ["TSCD_BUILD_TORCH_FROM"] = found["exe"]  # for setup.py's report
        return {"how": how, "python": found["exe"], "torch": found["torch"]}
    raise TorchNotFound(", ".join(dict.fromkeys(tried)))


def _need_torch() -> None:
    try:
        locate_torch()
    except TorchNotFound as err:
        # SystemExit prints one sentence (no traceback); the frontend shows it as the hook's output
        raise SystemExit(NO_TORCH.format(where=f"the Python environment of {err}")) from None
    try:
        import torch  # noqa: F401
    except Exception as err:  # found, but broken: say so in one line
        raise SystemExit(f"tscd: the installed torch cannot be imported ({type(err).__name__}: {err}); "
                         "fix or reinstall PyTorch, then run this command again.") from None


def build_summary(report: dict) -> list[str]:
    """The lines the install shows at its end, from setup.py's build report (see _report)."""
    torch_ = f"torch {report['torch']}"
    if not report["cpp"]:
        return [f"tscd._C FAILED to build for {torch_}: tscd runs with the torch and triton backends only "
                f"(no fused C++/CUDA kernels). Compiler output: {report['log']}"]
    if report["cuda"]:
        kernels = f"C++ (OpenMP) and CUDA kernels for {report['cuda_archs']} (CUDA {report['torch_cuda']})"
    else:
        kernels = "C++ kernels (OpenMP) only"
    lines = [f"tscd._C compiled for {torch_}: {kernels}."]
    if report["cuda_failed"]:
        lines.append(f"The optional CUDA kernels FAILED to build and were left out ({report['cuda_failed']}); "
                     f"the compiler output is in {report['log']} (TSCD_BUILD_STRICT=1 makes this an error).")
    elif not report["cuda"]:
        lines.append(f"CUDA kernels not built: {report['cuda_why']}.")
    else:
        lines.append(f"Compiler output: {report['log']}.")
    lines.append("`tscd info` shows which kernel backends are usable.")
    return lines


def _report() -> None:
    """Show setup.py's build report through the frontend (a warning: pip >= 26 prints them)."""
    try:
        with open(REPORT) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return
    lines = report.get("summary") or []
    if lines:
        warnings.warn_explicit("\n".join(lines), UserWarning, report.get("log") or "tscd", 0)


def _fresh_report() -> None:
    try:
        os.remove(REPORT)
    except OSError:
        pass


# --- PEP 517 / 660 hooks ---------------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
    _need_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _need_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    try:
        locate_torch()
    except TorchNotFound:
        pass  # an sdist holds sources only
    return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _need_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _need_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _need_torch()
    _fresh_report()
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    _report()
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _need_torch()
    _fresh_report()
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _report()
    return name


def build_sdist(sdist_directory, config_settings=None):
    try:
        locate_torch()
    except TorchNotFound:
        pass
    return _setuptools.build_sdist(sdist_directory, config_settings)
