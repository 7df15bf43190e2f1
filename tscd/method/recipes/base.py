"""The recipe interface: a training method as an object the trainer calls, and the registry of recipes.

A recipe makes the pseudo labels and the loss terms of a (micro-)batch from the network's outputs. The trainer
(:class:`tscd.train.Trainer`) keeps the loop: data, micro-batches and gradient accumulation, DDP, optimizer and
schedule, checkpoints and resume, logging, validation. ``recipe: <name>`` in the config picks the class
registered under that name; its own keys live in the config section of the same name.

Adding a recipe (no file of ``tscd/train/`` changes)::

    @dataclass
    class MineConfig:                        # the section `mine:` of the YAML (optional)
        switch_iters: int = option(1000, range=Range(0))

    @register_recipe
    class Mine(Recipe):
        name = "mine"
        config_class = MineConfig
        count_terms = ("seg",)               # normalised by counts over the whole batch (see count_norms)
        defaults = {"pseudo.refine_mode": "par"}   # for keys the user did not set
        unused = {"loss.scd": 0.0}           # shared keys this recipe ignores, and the value that says so

        def __init__(self, cfg, ctx):
            super().__init__(cfg, ctx)
            self.loss_weights = {"cls": cfg.loss.cls, "seg": cfg.loss.seg}
            self.head = nn.Linear(8, 8)      # a module of the recipe: trained (param_groups), checkpointed

        def labels(self, batch, iteration):  # no gradient; None while the recipe needs no labels
            if self.warmup(iteration):
                return None
            return {"seg": ...}

        def counts(self, labels):            # this micro-batch's normalisers of each count term
            return {"seg": seg_counts(labels["seg"])}

        def terms(self, batch, iteration, labels=None, norms=None):
            out = self.ctx.model(batch.img)  # the trained forward (DDP / torch.compile aware)
            ...
            return {"cls": ..., "seg": ...}  # 0-d tensors; the trainer weights them with loss_weights

What the trainer calls, per iteration t (1-based):

1. ``labels(batch, t)`` for every micro-batch first, when there are several (``train.accum_steps`` > 1), and
   ``count_norms`` of those labels: the count terms' normalisers of the whole batch. With one micro-batch,
   ``terms`` makes its labels itself (``labels=None``), after the trained forward if the recipe wants that
   order (the official codes run the trained forward first: BatchNorm statistics follow the order).
2. ``terms(batch, t, labels, norms)`` for each micro-batch, under DDP in one DDP forward (so DDP sees every
   parameter a term used); each term is scaled by the micro-batch's share of the batch, except the count terms,
   which ``norms`` normalise over the whole batch; the weighted sum is back-propagated.
3. ``after_step(t)`` after the optimizer step (e.g. an EMA teacher's update).

A recipe is an ``nn.Module``: modules it owns (projection heads, a teacher) are trained (:meth:`param_groups`),
moved to the device and checkpointed with it; its random generators go into the checkpoint through
:meth:`rng_state`. The network is built by :meth:`build_network` (default: the ``model`` section's TSCDNet) before
the recipe, which finds it in ``ctx.net``; a recipe on another backbone overrides that and :meth:`param_groups`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from tscd.models import StaticCompiled, create_model, param_groups

if TYPE_CHECKING:
    from tscd.config import Config


class Batch(NamedTuple):
    """One (micro-)batch on the device.

    Attributes:
        img: (B, 3, H, W) float, ImageNet-normalised training crops.
        cls_label: (B, C) float multi-hot image labels.
        img_box: (B, 4) int64 [top, bottom, left, right) of the real image inside each (padded) crop.
        views: the extra views of the recipe's data transform (:attr:`Recipe.views`; ToCo's ``view2`` and
            ``local``), (B, 3, H, W) each, or None.
    """

    img: torch.Tensor
    cls_label: torch.Tensor
    img_box: torch.Tensor
    views: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass
class RecipeContext:
    """What a recipe gets from the trainer.

    Attributes:
        net: the bare network (multi-scale CAM passes, extra views, pictures).
        model: the network's trained forward: ``net`` itself, or its ``torch.compile`` (``train.compile``:
            ``forward`` or ``all``).
        device: where the batch and the network are.
        amp: run the network under bf16 autocast (the resolved ``train.amp``).
        rank, world_size: this process and the number of processes (seeds of per-process generators).
        compile_cams: compile the no-grad CAM passes (``train.compile``: ``cams`` or ``all``): see
            :meth:`compiled`.
    """

    net: nn.Module
    model: Callable
    device: torch.device
    amp: bool = False
    rank: int = 0
    world_size: int = 1
    compile_cams: bool = False

    def compiled(self, fn: Callable, what: str) -> Callable:
        """``fn`` (a CAM pass's network work) compiled with static shapes when :attr:`compile_cams`, else ``fn``
        (:class:`tscd.models._compile.StaticCompiled`)."""
        return StaticCompiled(fn, what) if self.compile_cams else fn

    def autocast(self):
        """bf16 autocast when ``amp``, else a no-op context."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class Recipe(nn.Module):
    """Base class of recipes: see the module docstring for how to write one.

    Class attributes:
        name: the ``recipe:`` value that selects it.
        config_class: dataclass of its own config section (named ``name``), or None.
        count_terms: names of the terms normalised by counts over the batch (pixels, pairs) rather than averaged
            over images; :meth:`counts` gives their normalisers.
        views: the extra views of each training image the recipe needs: a view set of
            :func:`tscd.data.base.make_transform` (``"toco"``: ``view2`` and ``local``), or None; the trainer builds
            the training set with it and puts the views in :attr:`Batch.views`.
        defaults: ``"section.key": value`` applied by :func:`tscd.config.resolve_config` to keys that no file or
            override set.
        unused: ``"section.key": value`` for shared keys the recipe ignores: resolution sets them to ``value``
            (logged), so the saved config says what ran.

    Attributes:
        loss_weights: weight of each term ``terms`` returns (a term whose weight is 0 should not be computed).
        last: tensors of the last micro-batch for TensorBoard pictures (:meth:`images`); copies of one image.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    count_terms: ClassVar[tuple[str, ...]] = ()
    views: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    unused: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Config, ctx: RecipeContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.loss_weights: dict[str, float] = {}
        self.last: dict[str, torch.Tensor] = {}

    @classmethod
    def build_network(cls, cfg: Config, num_classes: int) -> nn.Module:
        """The network this recipe trains, on the CPU (default: :func:`tscd.models.create_model` of the ``model``
        section: a TSCDNet)."""
        m = cfg.model
        return create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, pooling=m.pooling,
                            symmetric_affinity=m.symmetric_affinity, drop_path_rate=m.drop_path_rate,
                            decoder_dim=m.decoder_dim)

    # -- schedule ------------------------------------------------------------------------------
    def warmup(self, iteration: int) -> bool:
        """Classification-only iterations: the official loops count n = t - 1 from 0 and train cls only while
        n <= ``train.cam_iters``, i.e. t <= cam_iters + 1."""
        return iteration <= self.cfg.train.cam_iters + 1

    # -- per micro-batch -----------------------------------------------------------------------
    def labels(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor] | None:
        """The pseudo labels of a micro-batch (no gradient), or None when the iteration needs none."""
        return None

    def counts(self, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """The normalisers of each count term on one micro-batch's labels (e.g. background and foreground
        pixels); summed over micro-batches by :meth:`count_norms`."""
        return {}

    def count_norms(self, labels: list[dict[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, ...]]:
        """The count terms' normalisers of the whole batch: :meth:`counts` of each micro-batch, summed."""
        per_batch = [self.counts(lab) for lab in labels]
        return {k: tuple(sum(c[k][i] for c in per_batch) for i in range(len(per_batch[0][k])))
                for k in per_batch[0]}

    def terms(self, batch: Batch, iteration: int, labels: dict[str, torch.Tensor] | None = None,
              norms: dict[str, tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
        """The loss terms (0-d tensors, unweighted) of a micro-batch.

        Args:
            batch: the micro-batch.
            iteration: the 1-based iteration.
            labels: this micro-batch's :meth:`labels` when the trainer made them first (several micro-batches),
                else None: make them here.
            norms: :meth:`count_norms` of the whole batch, or None: normalise the count terms by this
                micro-batch's own counts.
        """
        raise NotImplementedError

    def after_step(self, iteration: int) -> None:
        """Called after each optimizer step (e.g. to update an EMA teacher)."""

    # -- optimisation and state ----------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the network's (:func:`tscd.models.param_groups`: encoder, its norms frozen, classifier and
        affinity head, decoder at 10x) and, if the recipe has trainable parameters of its own, one group ``recipe``
        at 10x ``lr`` (a recipe without them leaves the optimizer's layout, hence old checkpoints, as they were)."""
        groups = param_groups(self.ctx.net, lr, weight_decay)
        own = [p for p in self.parameters() if p.requires_grad]
        if own:
            groups.append({"name": "recipe", "params": own, "lr": 10.0 * lr, "lr_mult": 10.0,
                           "weight_decay": weight_decay})
        return groups

    def rng_state(self) -> dict[str, torch.Tensor]:
        """States of the recipe's own random generators, for checkpoints (names must not clash with the
        trainer's ``torch``/``numpy``/``python``/``cuda``)."""
        return {}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`rng_state`."""

    def images(self) -> dict[str, torch.Tensor]:
        """Pictures of the last micro-batch for TensorBoard (:func:`tscd.visualize.tensorboard_images`):
        ``img01`` (1, 3, H, W) in [0, 1], ``cam`` (1, C, H, W), ``pseudo`` and ``pred`` (1, H, W) class ids; any
        subset. Default: :attr:`last`."""
        return self.last


#: Registered recipes by name (:func:`register_recipe`).
RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make ``cls`` selectable as ``recipe: <cls.name>``.

    Raises:
        ValueError: no name, or the name is taken by another class.
    """
    if not cls.name:
        raise ValueError(f"register_recipe: {cls.__name__} has no `name`")
    other = RECIPES.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"register_recipe: recipe name {cls.name!r} is taken by {other.__module__}.{other.__name__}")
    RECIPES[cls.name] = cls
    return cls


def recipe_names() -> tuple[str, ...]:
    """The registered recipe names, sorted."""
    return tuple(sorted(RECIPES))


def find_recipe(name: str) -> type[Recipe] | None:
    """The recipe class registered as ``name``, or None."""
    return RECIPES.get(name)


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``.

    Raises:
        ValueError: unknown name (lists the registered ones).
    """
    cls = RECIPES.get(name)
    if cls is None:
        raise ValueError(f"recipe: unknown recipe {name!r}; registered: {', '.join(recipe_names())}")
    return cls
