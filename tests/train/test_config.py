from pathlib import Path

import pytest

from tscd.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["voc.yaml", "coco.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.max_iters >= cfg.train.cam_iters


def test_coco_inherits_voc():
    cfg = load_config(ROOT / "configs" / "coco.yaml")
    assert cfg.data.batch_size == 4 and cfg.train.amp == "off" and cfg.data.pad_value == "black"
    assert cfg.data.dataset == "coco" and cfg.train.max_iters == 80000 and cfg.train.cam_iters == 5000
    assert cfg.model.name == "tscd_mit_b1" and cfg.data.crop_size == 512  # from voc.yaml


def test_voc_matches_spec():
    cfg = load_config(ROOT / "configs" / "voc.yaml")
    assert (cfg.data.crop_size, cfg.data.batch_size, cfg.train.max_iters, cfg.train.cam_iters) == (512, 4, 20000, 2000)
    # the official numerics (docs/differences.md)
    assert (cfg.train.amp, cfg.data.pad_value, cfg.pseudo.cam_decoder, cfg.loss.crf_gain) == ("off", "black", True,
                                                                                               "field")
    assert cfg.train.accum_steps == 1 and not cfg.train.reference_style
    assert (cfg.loss.seg, cfg.loss.reg, cfg.loss.aff, cfg.loss.scd) == (0.1, 0.01, 0.1, 0.1)
    assert cfg.optim.lr == 6e-5 and cfg.pseudo.bkg_high == 0.55 and cfg.pseudo.bkg_low == 0.35


def test_unknown_key_names_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_iter: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key `train.max_iter`.*Did you mean 'max_iters'\?"):
        load_config(p)
    p.write_text("trian:\n  max_iters: 10\n")
    with pytest.raises(ConfigError, match=r"unknown section `trian`.*Did you mean 'train'\?"):
        load_config(p)


def test_wrong_types_and_values(tmp_path):
    with pytest.raises(ConfigError, match=r"`train.max_iters` must be an integer; got 'ten'"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.max_iters=ten"])
    with pytest.raises(ConfigError, match=r"`data.dataset` must be one of voc, coco, custom, demo"):
        load_config(ROOT / "configs" / "demo.yaml", ["data.dataset=imagenet"])
    with pytest.raises(ConfigError, match=r"`data.root` is required"):
        load_config(None, ["data.dataset=voc"])
    with pytest.raises(ConfigError, match=r"`train.cam_iters` must be in"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.cam_iters=100000"])
    with pytest.raises(FileNotFoundError, match="config: file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides():
    assert parse_override("loss.scd_samples=80") == ("loss", "scd_samples", 80)
    assert parse_override("pseudo.cam_scales=[1.0, 0.5]") == ("pseudo", "cam_scales", [1.0, 0.5])
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["pseudo.cam_scales=[1.0, 0.5]", "optim.lr=1e-3"])
    assert cfg.pseudo.cam_scales == (1.0, 0.5) and cfg.optim.lr == 1e-3
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("lr")


def test_bare_off_means_off(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  dataset: demo\ntrain:\n  amp: off\nloss:\n  er_mode: off\n")
    cfg = load_config(p, ["train.amp=off"])
    assert cfg.train.amp == "off" and cfg.loss.er_mode == "off"


def test_new_fidelity_keys_from_yaml_and_command_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  dataset: demo\n  pad_value: [10, 20, 30]\ntrain:\n  accum_steps: 2\n")
    cfg = load_config(p, ["loss.crf_gain=exact", "pseudo.cam_decoder=false"])
    assert cfg.data.pad_value == (10.0, 20.0, 30.0) and cfg.train.accum_steps == 2
    assert cfg.loss.crf_gain == "exact" and cfg.pseudo.cam_decoder is False
    assert load_config(p, ["data.pad_value=mean"]).data.pad_value == "mean"
    assert load_config(p, ["data.pad_value=[0, 0, 0]"]).data.pad_value == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="pad_value"):
        load_config(p, ["data.pad_value=grey"])
    with pytest.raises(ConfigError, match="crf_gain"):
        load_config(p, ["loss.crf_gain=exactly"])
    with pytest.raises(ConfigError, match="accum_steps"):
        load_config(p, ["train.accum_steps=0"])
