"""Initialisation as the official code: decoder fuse conv like mmcv's ConvModule (Kaiming normal, fan_out, ReLU),
BN weight 1 / bias 0, affinity conv with PyTorch's default bias init."""
import math

import torch

from tscd.models import create_model
from tscd.models.segformer_head import SegFormerHead


def test_decoder_fuse_conv_is_kaiming_normal_fan_out():
    torch.manual_seed(0)
    head = SegFormerHead((64, 128, 320, 512), 21, embed_dim=256)
    w = head.fuse.conv.weight  # (256, 1024, 1, 1): fan_out = 256, fan_in = 1024
    want = math.sqrt(2.0 / 256)  # 0.088; PyTorch's default init would give 1 / sqrt(3 * 1024) = 0.018
    assert abs(w.std().item() / want - 1) < 0.02 and abs(w.mean().item()) < 3e-3
    # normal, not uniform: a uniform of that std would be bounded by sqrt(3) * std
    assert w.abs().max().item() > 2.5 * want
    assert torch.equal(head.fuse.bn.weight, torch.ones(256)) and torch.equal(head.fuse.bn.bias, torch.zeros(256))


def test_affinity_conv_keeps_default_bias_init():
    biases = []
    for seed in range(8):
        torch.manual_seed(seed)
        net = create_model("tscd_mit_tiny", num_classes=4, decoder_dim=16)
        proj = net.affinity_head.proj  # maps -> 1, 1x1: default bias ~ U(-1/sqrt(maps), 1/sqrt(maps))
        biases.append(proj.bias.item())
        bound = 1 / math.sqrt(proj.in_channels)
    assert all(b != 0 for b in biases) and max(abs(b) for b in biases) <= bound
    assert len({round(b, 6) for b in biases}) == len(biases)


def test_affinity_conv_weight_statistics():
    torch.manual_seed(0)
    ws = torch.cat([create_model("tscd_mit_tiny", num_classes=4, decoder_dim=16).affinity_head.proj.weight.flatten()
                    for _ in range(20)])
    assert abs(ws.std().item() / math.sqrt(2 / 6) - 1) < 0.15
