"""Loss terms, pseudo labels and metrics on hand-made cases."""
import torch
import torch.nn.functional as F

from tests._utils import assert_close
from tscd.eval.metrics import ConfusionMatrix
from tscd.method.labels import affinity_label, cam_to_label, refine_cams_with_bkg, refine_cams_with_bkg_sequential
from tscd.train.losses import affinity_loss, seg_loss


def test_seg_loss_no_foreground_is_finite():
    logits = torch.randn(2, 4, 5, 6)
    label = torch.zeros(2, 5, 6, dtype=torch.long)
    label[0, 0, 0] = 255
    loss = seg_loss(logits, label)
    bg = F.cross_entropy(logits, label, ignore_index=255)
    assert torch.isfinite(loss) and abs(loss.item() - 0.5 * bg.item()) < 1e-6
    label[:] = 255  # nothing labelled at all
    assert seg_loss(logits, label).item() == 0.0


def test_seg_loss_matches_two_cross_entropies():
    logits = torch.randn(2, 4, 5, 6)
    label = torch.randint(0, 4, (2, 5, 6))
    label[0, :2] = 255
    bg = F.cross_entropy(logits, label.masked_fill(label != 0, 255), ignore_index=255)
    fg = F.cross_entropy(logits, label.masked_fill(label == 0, 255), ignore_index=255)
    assert abs(seg_loss(logits, label).item() - 0.5 * (bg + fg).item()) < 1e-6


def test_affinity_label_hand_computed():
    # 2x3 label grid (already at the target size): [[1, 1, 0], [255, 0, 0]], radius 1
    label = torch.tensor([[[1, 1, 0], [255, 0, 0]]])
    aff = affinity_label(label, (2, 3), radius=1)[0]
    assert aff.shape == (6, 6)
    assert aff[0, 1] == 1 and aff[0, 2] == 255  # (0,0)-(0,2): Chebyshev distance 2 > radius
    assert aff[1, 2] == 0 and aff[2, 5] == 1 and aff[2, 4] == 1
    assert (aff[3] == 255).all() and (aff[:, 3] == 255).all()  # ignore row / column
    assert aff[0, 0] == 1 and torch.equal(aff, aff.T)


def test_affinity_loss_formula():
    pred = torch.tensor([[[0.9, 0.2], [0.3, 0.6]]])
    target = torch.tensor([[[1, 0], [255, 1]]], dtype=torch.uint8)
    expected = 0.5 * ((1 - 0.9) + (1 - 0.6)) / (2 + 1) + 0.5 * 0.2 / (1 + 1)
    assert abs(affinity_loss(pred, target).item() - expected) < 1e-7


def test_cam_to_label():
    cams = torch.zeros(1, 3, 1, 4)
    cams[0, 0, 0] = torch.tensor([0.9, 0.2, 0.5, 0.1])
    cams[0, 2, 0] = torch.tensor([0.1, 0.8, 0.6, 0.3])
    lab = cam_to_label(cams, torch.tensor([[1.0, 0.0, 1.0]]), bkg=0.45)
    assert lab.tolist() == [[[1, 3, 3, 0]]]


def test_batched_pseudo_labels_match_per_image_calls():
    torch.manual_seed(1)
    B, C, H, W = 3, 6, 24, 30
    img01 = torch.rand(B, 3, H, W)
    cams = torch.rand(B, C, H, W) ** 2
    cls_label = torch.zeros(B, C)
    cls_label[0, [1, 4]] = 1
    cls_label[1, [0]] = 1
    cls_label[2, [0, 2, 5]] = 1
    img_box = torch.tensor([[0, H, 0, W], [2, 20, 3, 30], [0, 15, 0, 17]])
    batched = refine_cams_with_bkg(img01, cams, cls_label, img_box, backend="torch")
    ref = refine_cams_with_bkg_sequential(img01, cams, cls_label, img_box, backend="torch")
    assert torch.equal(batched, ref)
    assert (batched[2, 15:] == 255).all() and (batched[1, :, :3] == 255).all()
    fast = refine_cams_with_bkg(img01, cams, cls_label, img_box, backend="auto")
    assert (fast != batched).float().mean() < 1e-3  # float rounding may flip a tie, nothing more


def test_confusion_matrix_hand_computed():
    m = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 2]])
    m.update(pred, target)
    assert m.mat.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    s = m.scores(["bg", "a", "b"])
    # IoU bg = 1 / (2 + 1 - 1) = 0.5 ; IoU a = 2 / (2 + 3 - 2) = 2/3 ; class b absent everywhere: excluded
    assert abs(s["miou"] - 100 * (0.5 + 2 / 3) / 2) < 1e-9
    assert s["iou"]["b"] is None and abs(s["pixel_acc"] - 75.0) < 1e-9


def test_confusion_matrix_rejects_bad_predictions():
    m = ConfusionMatrix(3)
    import pytest

    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\]"):
        m.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.tensor([1, 2]), torch.tensor([0]))
    assert_close(m.mat.float(), torch.zeros(3, 3), rtol=0, atol=0, name="unchanged")
