"""The recipe interface: a recipe defined here, in a test, trains with the unchanged trainer (its own config section,
module, generator, count term and after-step hook), checkpoints and resumes; the registry's errors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._utils import tiny_overrides
from tscd.config import ConfigError, Range, load_config, option
from tscd.method.labels import cam_to_label
from tscd.method.losses import cls_loss, seg_counts, seg_loss
from tscd.method.recipes import RECIPES, Recipe, get_recipe, register_recipe
from tscd.models import multi_scale_cam
from tscd.train import Trainer
from tscd.train.checkpoint import list_checkpoints, load_checkpoint


@dataclass
class ProbeConfig:
    """The ``probe:`` section."""

    scale: float = option(1.0, range=Range(0, lo_open=True))


class ProbeRecipe(Recipe):
    """A minimal method: CAM labels (no refinement), a 1x1 head of its own on the segmentation logits, a count term,
    a random term from its own generator, an after-step counter."""

    name = "probe"
    config_class = ProbeConfig
    count_terms = ("seg",)
    defaults = {"pseudo.refine_mode": "par"}
    unused = {"loss.scd": 0.0}

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.loss_weights = {"cls": 1.0, "seg": 0.5, "noise": 0.01}
        classes = ctx.net.num_classes + 1
        self.head = nn.Conv2d(classes, classes, 1)
        self.gen = torch.Generator().manual_seed(5)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def labels(self, batch, iteration):
        if self.warmup(iteration):
            return None
        cams = multi_scale_cam(self.ctx.net, batch.img, (1.0,))
        return {"seg": cam_to_label(cams, batch.cls_label, 0.3)}

    def counts(self, labels):
        return {"seg": seg_counts(labels["seg"])}

    def terms(self, batch, iteration, labels=None, norms=None):
        warm = self.warmup(iteration)
        out = self.ctx.model(batch.img, cls_only=warm)
        terms = {"cls": cls_loss(out.cls_logits, batch.cls_label)}
        if warm:
            return terms
        labels = labels if labels is not None else self.labels(batch, iteration)
        logits = self.head(out.seg_logits) * self.cfg.recipe_cfg.scale
        up = F.interpolate(logits, size=batch.img.shape[-2:], mode="bilinear", align_corners=False)
        terms["seg"] = seg_loss(up, labels["seg"], counts=(norms or {}).get("seg"))
        terms["noise"] = torch.rand((), generator=self.gen) * self.head.bias.sum()
        return terms

    def after_step(self, iteration):
        self.steps += 1

    def rng_state(self):
        return {"probe_gen": self.gen.get_state()}

    def set_rng_state(self, state):
        self.gen.set_state(state["probe_gen"])


@pytest.fixture()
def probe():
    register_recipe(ProbeRecipe)
    yield ProbeRecipe
    RECIPES.pop("probe", None)


def _cfg(tmp_path, *extra):
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    return load_config(None, [*tiny_overrides(tmp_path / "run"), "recipe=probe", "probe.scale=2.0",
                              "train.cam_iters=0", "train.max_iters=4", "train.ckpt_iters=2", "train.val_iters=0",
                              *extra])


def _train(cfg, **kwargs) -> Trainer:
    trainer = Trainer(cfg, **kwargs)
    trainer.validate = lambda: {}
    trainer.train()
    trainer.close()
    return trainer


@pytest.mark.slow
def test_a_recipe_defined_outside_tscd_trains_checkpoints_and_resumes(probe, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tscd.config"):
        straight = _train(_cfg(tmp_path / "a"), resume="never")
    assert isinstance(straight.recipe, ProbeRecipe) and int(straight.recipe.steps) == 4
    hist = straight.history
    assert set(hist[0]) == {"iteration", "cls", "total", "lr"} and {"cls", "seg", "noise"} <= set(hist[1])
    # its module is trained at the heads' rate, its defaults and unused keys are resolved, logged and saved
    group = next(g for g in straight.optimizer.param_groups if g.get("name") == "recipe")
    assert group["lr_mult"] == 10.0 and any(p is straight.recipe.head.weight for p in group["params"])
    assert straight.cfg.pseudo.refine_mode == "par" and straight.cfg.loss.scd == 0.0
    assert "pseudo.refine_mode: 'varm' -> 'par' (recipe probe's default)" in caplog.text
    saved = load_config(tmp_path / "a" / "run" / "config.yaml")
    assert saved.recipe == "probe" and saved.recipe_cfg.scale == 2.0 and saved.pseudo.refine_mode == "par"
    state = load_checkpoint(list_checkpoints(tmp_path / "a" / "run")[-1][1])
    assert "head.weight" in state["recipe"] and "probe_gen" in state["rng"] and state["config"]["recipe"] == "probe"
    # resume the same run from its checkpoint at iteration 2: the same losses, weights, head and generator
    ckpts = dict(list_checkpoints(tmp_path / "a" / "run"))
    assert sorted(ckpts) == [2, 4]
    mid = ckpts[2]
    resumed = _train(_cfg(tmp_path / "b"), resume=str(mid))  # another run dir: its own checkpoints
    assert resumed.history == hist
    assert torch.equal(resumed.recipe.head.weight, straight.recipe.head.weight)
    assert int(resumed.recipe.steps) == 4
    assert torch.equal(resumed.recipe.gen.get_state(), straight.recipe.gen.get_state())


def test_accumulated_count_term_uses_the_whole_batch(probe, tmp_path):
    """With two micro-batches the recipe's labels come first and its count term is normalised over both."""
    seen = []
    trainer = Trainer(_cfg(tmp_path, "train.accum_steps=2"), resume="never")
    orig = trainer.recipe.terms

    def spy(batch, iteration, labels=None, norms=None):
        seen.append((labels is not None, None if norms is None else sorted(norms)))
        return orig(batch, iteration, labels, norms)

    trainer.recipe.terms = spy
    trainer.step_terms = spy
    batches = trainer._batches()
    for t in (1, 2):
        trainer.iteration = t
        trainer.train_step(next(batches))
    assert seen == [(False, None)] * 2 + [(True, ["seg"])] * 2


def test_a_checkpoint_of_another_recipe_is_refused(probe, tmp_path):
    Trainer(_cfg(tmp_path), resume="never").save()  # the state at iteration 0
    from tscd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="trained with recipe 'probe'"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path / "run"), "train.max_iters=4"]), resume="auto")


def test_registry_and_config_errors(probe):
    class Other(Recipe):
        name = "probe"

    with pytest.raises(ValueError, match="recipe name 'probe' is taken"):
        register_recipe(Other)
    with pytest.raises(ValueError, match="unknown recipe 'prob'; registered: afa, probe, toco, tscd"):
        get_recipe("prob")
    with pytest.raises(ConfigError, match=r"`recipe` must be one of afa, probe, toco, tscd; got 'prob'. Did you mean"):
        load_config(None, ["data.dataset=demo", "recipe=prob"])
    with pytest.raises(ConfigError, match=r"section `probe` configures recipe 'probe', but `recipe` is 'tscd'"):
        load_config(None, ["data.dataset=demo", "probe.scale=2.0"])
    with pytest.raises(ConfigError, match=r"unknown key `probe.scal`.*Did you mean 'scale'"):
        load_config(None, ["data.dataset=demo", "recipe=probe", "probe.scal=2.0"])
    with pytest.raises(ConfigError, match=r"`probe.scale` must be > 0; got 0.0"):
        load_config(None, ["data.dataset=demo", "recipe=probe", "probe.scale=0"])
    with pytest.raises(ConfigError, match=r"unknown section `afaa`.*Did you mean 'afa'"):
        load_config(None, ["data.dataset=demo", "afaa.switch_iters=1"])
