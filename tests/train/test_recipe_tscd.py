"""``recipe: tscd`` is the pre-recipe trainer to the bit: the same loss terms, gradients, BatchNorm buffers, weights
and optimizer state over a warm-up iteration and two full ones, with and without accumulation, in the official-code
mode and in the low-memory mode (the old iteration is kept in ``_pre_recipe.py``)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests._utils import tiny_overrides
from tests.train._pre_recipe import PreRecipeStep
from tscd.config import load_config
from tscd.train import Trainer

#: batch 4 of 48 px crops (padded: scale_range < 1 keeps the boxes in play); no warm-up beyond the first iteration
TINY = {"data": {"crop_size": 48, "demo_size": 40, "batch_size": 4, "demo_num_train": 12, "demo_num_val": 2},
        "model": {"decoder_dim": 16}, "pseudo": {"refine_iters": 2}, "loss": {"scd_samples": 5},
        "train": {"max_iters": 50, "cam_iters": 0, "seed": 1, "device": "cpu"}}

CASES = {
    "default": [],
    "accum2": ["train.accum_steps=2"],
    "official_code": ["train.reference_style=true", "train.amp=bf16", "pseudo.cam_decoder=false"],
    "low_memory_er": ["train.memory=low", "loss.er_mode=grad", "data.batch_size=2"],
}
#: CPU bf16 autocast and the torch reference ops take a minute or more each: `make test` (CI) only
SLOW = {"official_code", "low_memory_er"}


def _scd_gen(tr: Trainer) -> torch.Generator:
    return tr.recipe.scd_gen if hasattr(tr, "recipe") else tr.scd_gen


def _state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights, buffers and the AdamW state of every parameter, by name."""
    out = {f"param/{k}": v.detach() for k, v in net.named_parameters()}
    out.update({f"buffer/{k}": v for k, v in net.named_buffers()})
    for name, p in net.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"adamw/{name}/{key}"] = value
    return out


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(set(got) ^ set(want))}"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:5]}"


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_tscd_recipe_is_the_pre_recipe_iteration(tmp_path, case):
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    overrides = [*tiny_overrides(tmp_path / "run", TINY), *CASES[case]]
    torch.manual_seed(0)
    tr = Trainer(load_config(None, overrides), resume="never")
    old = PreRecipeStep(load_config(None, overrides), copy.deepcopy(tr.net), tr.device)
    assert torch.equal(_scd_gen(tr).get_state(), old.scd_gen.get_state())
    assert (tr.amp, tr.cfg.train.accum_steps, tr.net.checkpointing) == (old.amp, old.cfg.train.accum_steps,
                                                                       old.net.checkpointing)
    grads: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in tr.net.named_parameters()})
        return step(*args, **kwargs)

    tr.optimizer.step = capture
    batches = tr._batches()
    for t in (1, 2, 3):  # t = 1 is the cls-only warm-up (cam_iters = 0), then two full iterations
        batch = next(batches)
        torch.manual_seed(100 + t)  # drop-path and dropout draw from the global stream: the same for both
        tr.iteration = t
        got = tr.train_step(batch)
        torch.manual_seed(100 + t)
        old.iteration = t
        want = old.train_step(batch)
        assert got == want, f"iteration {t}: loss terms {got} != {want}"
        assert (t == 1) == (set(got) == {"cls", "total"})
        _assert_equal(grads, old.grads, f"iteration {t}: gradients")
        _assert_equal(_state(tr.net, tr.optimizer), _state(old.net, old.optimizer), f"iteration {t}: state")
        assert tr.scheduler.state_dict() == old.scheduler.state_dict()
    assert torch.equal(_scd_gen(tr).get_state(), old.scd_gen.get_state())
