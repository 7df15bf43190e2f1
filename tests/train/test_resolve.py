"""One resolution: every value a mode changes is changed by resolve_config, logged with its reason, saved as the
run's config.yaml, and that file reproduces the run; tscd eval resolves the same way."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests._utils import tiny_overrides
from tscd.config import ConfigError, load_config, resolve_config
from tscd.train import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("overrides, device", [
    (["train.memory=low", "train.amp=auto"], "cpu"),
    (["train.reference_style=true", "train.amp=bf16", "data.pad_value=mean", "pseudo.cam_decoder=false",
      "loss.crf_gain=exact"], "cpu"),
    (["train.amp=auto"], "cuda"),
    (["recipe=afa", "train.memory=low"], "cuda"),
    (["recipe=afa", "pseudo.refine_mode=varm", "train.reference_style=true"], "cpu"),
])
def test_every_change_is_logged_and_resolution_is_idempotent(overrides, device, caplog):
    cfg = load_config(ROOT / "configs" / "voc.yaml", ["data.root=/data/voc", *overrides])
    with caplog.at_level(logging.INFO, logger="tscd.config"):
        out, changes = resolve_config(cfg, device, world_size=2, max_iters=100)
    before, after = _flat(cfg.to_dict()), _flat(out.to_dict())
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {c.key for c in changes} - {k for k in changed if k not in after}
    assert changed, "nothing resolved"
    for c in changes:
        assert f"config: {c}" in caplog.text
    assert {"train.max_iters", "train.cam_iters", "optim.warmup_iters", "train.device"} <= changed
    assert out.train.amp in ("off", "bf16") and out.train.device == device
    again, more = resolve_config(out, device, world_size=2, max_iters=100)
    assert more == [] and again.to_dict() == out.to_dict()
    assert cfg.train.max_iters == 20000  # the input is not modified


def test_modes_and_their_precedence():
    base = ["data.dataset=demo"]
    low, _ = resolve_config(load_config(None, [*base, "train.memory=low", "data.batch_size=4"]), "cpu", world_size=2)
    assert (low.train.amp, low.train.checkpointing, low.train.accum_steps) == ("bf16", "all", 2)
    # the official-code mode wins over the low-memory mode's bf16, as the official numerics are fp32
    both, _ = resolve_config(load_config(None, [*base, "train.memory=low", "train.reference_style=true"]), "cuda")
    assert both.train.amp == "off" and both.pseudo.cam_decoder and both.loss.crf_gain == "field"
    assert resolve_config(load_config(None, [*base, "train.amp=auto"]), "cuda")[0].train.amp == "bf16"
    assert resolve_config(load_config(None, [*base, "train.amp=auto"]), "cpu")[0].train.amp == "off"
    # a recipe's defaults fill what no file or override set; explicit values win
    afa, _ = resolve_config(load_config(None, [*base, "recipe=afa"]), "cpu")
    assert (afa.model.symmetric_affinity, afa.pseudo.refine_mode, afa.loss.reg, afa.loss.scd) == (True, "par", 0.0,
                                                                                                   0.0)
    mine, _ = resolve_config(load_config(None, [*base, "recipe=afa", "pseudo.refine_mode=varm", "loss.reg=0.01"]),
                             "cpu")
    assert (mine.pseudo.refine_mode, mine.loss.reg, mine.model.symmetric_affinity) == ("varm", 0.01, True)
    tscd, changes = resolve_config(load_config(None, base), "cpu")
    assert [c.key for c in changes] == ["train.device"]  # the default recipe changes nothing
    # the result is validated: a warm-up longer than the run fails unless --max-iters scaled it
    late = load_config(None, [*base, "train.max_iters=10", "train.cam_iters=20"], check=False)
    with pytest.raises(ConfigError, match="train.cam_iters"):
        resolve_config(late, "cpu")
    assert resolve_config(late, "cpu", max_iters=5)[0].train.cam_iters == 5


@pytest.mark.parametrize("value, resolved", [("true", "all"), ("on", "all"), ("false", "off"), ("cams", "cams"),
                                             ("forward", "forward"), ("all", "all")])
def test_compile_modes(value, resolved):
    """train.compile: a boolean (old configs) means everything or nothing; the modes name what is compiled."""
    out, changes = resolve_config(load_config(None, ["data.dataset=demo", f"train.compile={value}"]), "cpu")
    assert out.train.compile == resolved
    assert ("train.compile" in {c.key for c in changes}) == (value in ("true", "on"))


def test_compile_mode_errors():
    with pytest.raises(ConfigError, match=r"train.compile.*cams"):
        load_config(None, ["train.compile=encoder"])


def test_saved_config_is_the_one_that_ran_and_reproduces_it(tmp_path):
    """amp auto, --max-iters, the afa recipe's defaults: all resolved in <run>/config.yaml (with the changes as
    comments); training again from that file gives the same run, bit for bit, and resolves nothing."""
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    cfg = load_config(None, [*tiny_overrides(tmp_path / "a"), "recipe=afa", "train.amp=auto", "train.max_iters=40",
                             "train.cam_iters=20", "afa.switch_iters=2"])
    first = Trainer(cfg, resume="never", max_iters=4)  # cam_iters 20 -> 2: 1 warm-up... then the switch at t = 4
    first.validate = lambda: {}
    first.train()
    saved_path = tmp_path / "a" / "config.yaml"
    text = saved_path.read_text()
    assert "# resolved: train.max_iters: 40 -> 4" in text and "recipe afa's default" in text
    saved = load_config(saved_path)
    assert saved.to_dict() == first.cfg.to_dict()
    assert (saved.train.amp, saved.train.max_iters, saved.train.cam_iters) == ("off", 4, 2)
    assert saved.model.symmetric_affinity and saved.pseudo.refine_mode == "par"
    again_cfg, changes = resolve_config(saved, "cpu")
    assert changes == []
    again = Trainer(load_config(saved_path, [f"train.run_dir={tmp_path / 'b'}"]), resume="never")
    again.validate = lambda: {}
    again.train()
    assert again.history == first.history
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), first.net.state_dict().values()))


def test_eval_resolves_as_training_did(tmp_path):
    from tscd.eval.evaluator import protocol_settings
    from tscd.eval.inference import load_model
    from tscd.models import create_model

    cfg = load_config(None, ["data.dataset=demo", "model.name=tscd_mit_tiny", "model.decoder_dim=16",
                             "train.amp=auto", "train.memory=low"])
    net = create_model("tscd_mit_tiny", num_classes=5, decoder_dim=16)
    torch.save({"model": net.state_dict(), "config": cfg.to_dict(), "num_classes": 5, "iteration": 1},
               tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", "cpu")
    assert loaded.config.train.amp == "bf16"  # train.memory: low, as the run trained (was the amp rule's 'off')
    assert protocol_settings("native", loaded.config, "cpu").amp
    with pytest.raises(ValueError, match="not resolved"):
        protocol_settings("native", cfg, "cpu")
