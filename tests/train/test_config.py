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


# -- ranges of numeric keys (issue 14, item 3) ---------------------------------------------------------------------

#: interval keys: is 0 legal (it means "only at the end" / "none"), while negative values never are
INTERVAL_KEYS = {"train.max_iters": False, "train.cam_iters": True, "train.log_iters": False,
                 "train.val_iters": True, "train.ckpt_iters": True, "train.keep_ckpts": False,
                 "train.image_iters": True, "optim.warmup_iters": True, "pseudo.refine_iters": True}


@pytest.mark.parametrize("key", sorted(INTERVAL_KEYS))
@pytest.mark.parametrize("value", [0, -1, -1000])
def test_interval_keys_zero_and_negative(key, value):
    text = f"{key}={value}"
    if value == 0 and INTERVAL_KEYS[key]:
        section, name = key.split(".")
        assert getattr(getattr(load_config(ROOT / "configs" / "demo.yaml", [text]), section), name) == 0
    else:
        with pytest.raises(ConfigError, match=rf"`{key}` must be >= [01]( \(.*\))?; got {value}$"):
            load_config(ROOT / "configs" / "demo.yaml", [text])


@pytest.mark.parametrize("text, message", [
    ("optim.lr=0", r"`optim.lr` must be > 0; got 0.0"),
    ("optim.lr=.nan", r"`optim.lr` must be > 0; got nan"),
    ("loss.seg=-0.1", r"`loss.seg` must be >= 0; got -0.1"),
    ("loss.scd_scale=1.5", r"`loss.scd_scale` must be in \(0, 1\]; got 1.5"),
    ("pseudo.bkg_high=1.2", r"`pseudo.bkg_high` must be in \[0, 1\]"),
    ("pseudo.cam_scales=[1.0, 0]", r"every value of `pseudo.cam_scales` must be > 0; got \(1.0, 0.0\)"),
    ("pseudo.cam_scales=[]", r"`pseudo.cam_scales` must not be empty"),
    ("pseudo.dilations=[1, 0]", r"every value of `pseudo.dilations` must be >= 1"),
    ("optim.betas=[0.9, 1.0]", r"every value of `optim.betas` must be in \[0, 1\)"),
    ("data.num_workers=-1", r"`data.num_workers` must be >= 0"),
    ("data.val_num=0", r"`data.val_num` must be >= 1 \(null validates on every image\); got 0"),
    ("data.scale_range=[2.0, 0.5]", r"low <= high"),
    ("pseudo.bkg_low=0.6", r"`pseudo.bkg_low` \(0.6\) must be <= `pseudo.bkg_high` \(0.55\)"),
    ("model.drop_path_rate=1.0", r"`model.drop_path_rate` must be in \[0, 1\)"),
])
def test_numeric_ranges(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "demo.yaml", [text])


def test_every_numeric_key_has_a_range_and_every_name_its_choices():
    """A numeric key without a range, or a string key with a fixed set of names without its choices, would skip
    validation; the choices come from where the names are defined (no copies of other modules' lists)."""
    import dataclasses
    import typing

    from tscd.config import SECTIONS, Config, choices_of
    from tscd.method.recipes import RECIPES

    def numeric(tp) -> bool:
        args = typing.get_args(tp)
        return tp in (int, float) or any(numeric(a) for a in args if a is not type(None) and a is not Ellipsis)

    sections = {name: typing.get_type_hints(type(getattr(Config(), name))) for name in SECTIONS}
    sections.update({name: typing.get_type_hints(r.config_class) for name, r in RECIPES.items() if r.config_class})
    classes = {name: type(getattr(Config(), name)) for name in SECTIONS}
    classes.update({name: r.config_class for name, r in RECIPES.items() if r.config_class})
    missing = []
    for sec, hints in sections.items():
        meta = {f.name: f.metadata for f in dataclasses.fields(classes[sec])}
        missing += [f"{sec}.{name}" for name, tp in hints.items() if numeric(tp) and "range" not in meta[name]]
    assert not missing, f"numeric config keys without a range (tscd.config.option): {missing}"
    named = {"data.dataset": "tscd.data.factory", "model.pooling": "tscd.models.tscd_net",
             "pseudo.refine_mode": "tscd.kernels.refine", "loss.crf_gain": "tscd.kernels.permutohedral",
             "train.backend": "tscd.kernels._backend", "train.checkpointing": "tscd.models.tscd_net"}
    for key, module in named.items():
        sec, name = key.split(".")
        spec = next(f for f in dataclasses.fields(classes[sec]) if f.name == name).metadata["choices"]
        assert spec.startswith(module + ":"), (key, spec)
    assert choices_of("tscd.kernels._backend:BACKENDS") == ("auto", "triton", "cuda", "cpp", "torch")
    assert choices_of("tscd.kernels.refine:MODES") == ("varm", "par")


def test_fit_max_iters_scales_the_warm_up():
    from tscd.config import fit_max_iters, validate

    cfg = load_config(ROOT / "configs" / "voc.yaml", check=False)
    notes = fit_max_iters(cfg, 100)
    validate(cfg)
    assert (cfg.train.max_iters, cfg.train.cam_iters, cfg.optim.warmup_iters) == (100, 10, 7)
    assert len(notes) == 2 and "`train.cam_iters` 2000 > 100" in notes[0] and "to 10" in notes[0]
    cfg = load_config(ROOT / "configs" / "voc.yaml", check=False)
    assert fit_max_iters(cfg, 5000) == [] and cfg.train.cam_iters == 2000  # fits: unchanged
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
