"""Layers point down: the methods (tscd.method: labels, losses, recipes) are below training and evaluation, which do
not import each other for them; no import circles, lazy imports included; docs/differences.md names only switches
that exist."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: module -> the tscd packages that must not be loaded after importing it (and every module above it), in a
#: fresh interpreter: lower layers first, so one interpreter checks them all
LAYERS: dict[str, tuple[str, ...]] = {
    "tscd.method": ("tscd.train", "tscd.eval"),
    "tscd.method.recipes": ("tscd.train", "tscd.eval"),
    "tscd.eval.evaluator": ("tscd.train",),
    "tscd.eval.export": ("tscd.train",),
}


@pytest.fixture(scope="module")
def imported_after() -> dict[str, set[str]]:
    """The tscd modules loaded after importing each module of :data:`LAYERS` in turn, in one fresh interpreter."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "    out[m] = [n for n in sys.modules if n.startswith('tscd.')]\nprint(json.dumps(out))")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, *LAYERS], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return {m: set(names) for m, names in json.loads(res.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("module", list(LAYERS))
def test_layers_point_down(module, imported_after):
    loaded = imported_after[module]
    assert not [m for m in loaded if m.startswith(LAYERS[module])], sorted(loaded)


def test_differences_doc_names_real_config_keys():
    from tscd.config import Config

    cfg = Config()
    text = (ROOT / "docs" / "differences.md").read_text()
    keys = set(re.findall(r"`(data|model|pseudo|loss|optim|train)\.([a-z_][a-z0-9_]*)", text))
    assert {("data", "pad_value"), ("train", "accum_steps"), ("pseudo", "cam_decoder"), ("loss", "crf_gain"),
            ("train", "amp"), ("train", "reference_style"), ("pseudo", "cam_scale1")} <= keys
    for section, key in keys:
        assert hasattr(getattr(cfg, section), key), f"docs/differences.md names `{section}.{key}`: no such key"
    from tscd.method.recipes import get_recipe

    recipe_keys = set(re.findall(r"`(afa|toco)\.([a-z_][a-z0-9_]*)", text))
    assert {("toco", "contrast_iters"), ("afa", "switch_iters")} <= recipe_keys
    for section, key in recipe_keys:
        assert hasattr(get_recipe(section).config_class(), key), f"docs/differences.md names `{section}.{key}`"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included), except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    import ast

    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("path, forbidden", [
    ("tscd/models/weights.py", "tscd.models.mit"),       # mit.py reads weights with weights.py
    ("tscd/train/trainer.py", "tscd.train.memory"),      # the dry run (memory.py) drives a trainer
    ("tscd/train/memory.py", "tscd.cli"),
    ("tscd/commands/eval.py", "tscd.train"),             # eval and infer draw with tscd.visualize, below training
    ("tscd/commands/infer.py", "tscd.train"),
    ("tscd/commands/pseudo_labels.py", "tscd.train"),
    ("tscd/visualize.py", "tscd.train"),
])
def test_no_import_circles(path, forbidden):
    """Function-level imports count too: a lazy import is still a circle in the layers."""
    bad = sorted(m for m in _imports(ROOT / path) if m == forbidden or m.startswith(forbidden + "."))
    assert not bad, f"{path} imports {bad}"


def test_nothing_below_training_imports_it():
    """tscd.method (labels, losses, recipes), tscd.eval and tscd.models never import tscd.train, at any depth."""
    for folder in ("tscd/method", "tscd/eval", "tscd/models", "tscd/data", "tscd/kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = sorted(m for m in _imports(path) if m == "tscd.train" or m.startswith("tscd.train."))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
