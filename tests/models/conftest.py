"""Shared tiny models for tests/models (random init; built once per module where tests do not mutate them)."""
import logging

import pytest
import torch

from tscd.models import create_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tscd_b0():
    """TSCDNet-B0, 5 classes, eval mode (module-scoped: tests must not change its weights or mode)."""
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = create_model("tscd_mit_b0", num_classes=5).eval()
    logging.getLogger("tscd.models.mit").setLevel(logging.NOTSET)
    return model
