"""Layers point down: the label logic (tscd.method) is below training and evaluation, which do not import each
other for it; docs/differences.md names only switches that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('tscd.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    return set(out.stdout.split())


@pytest.mark.parametrize("module,forbidden", [
    ("tscd.method", ("tscd.train", "tscd.eval")),
    ("tscd.eval.evaluator", ("tscd.train",)),
    ("tscd.eval.export", ("tscd.train",)),
])
def test_layers_point_down(module, forbidden):
    loaded = _imported_after(module)
    assert not [m for m in loaded if m.startswith(forbidden)], sorted(loaded)


def test_differences_doc_names_real_config_keys():
    from tscd.config import Config

    cfg = Config()
    text = (ROOT / "docs" / "differences.md").read_text()
    keys = set(re.findall(r"`(data|model|pseudo|loss|optim|train)\.([a-z_]+)", text))
    assert {("data", "pad_value"), ("train", "accum_steps"), ("pseudo", "cam_decoder"), ("loss", "crf_gain"),
            ("train", "amp"), ("train", "reference_style")} <= keys
    for section, key in keys:
        assert hasattr(getattr(cfg, section), key), f"docs/differences.md names `{section}.{key}`: no such key"
