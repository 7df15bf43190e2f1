"""ConfusionMatrix / segmentation_scores on hand-computed cases (docs/method.md 6)."""
import math

import pytest
import torch

from tscd.eval.metrics import ConfusionMatrix, segmentation_scores

# 3 classes; 255 = ignore. Valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0)
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def test_hand_computed_scores():
    m = ConfusionMatrix(3)
    m.update(PRED, TARGET)
    assert m.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = m.scores(["bg", "a", "b"])
    # IoU: bg 1/(2+2-1) = 1/3, a 2/(2+3-2) = 2/3, b 0/(1+0-0) = 0 -> mIoU 1/3
    assert s["iou"] == pytest.approx({"bg": 100 / 3, "a": 200 / 3, "b": 0.0})
    assert s["miou"] == pytest.approx(100 / 3)
    assert s["pixel_acc"] == pytest.approx(60.0)  # 3 of 5 valid pixels
    assert s["mean_acc"] == pytest.approx(50.0)  # (1/2 + 2/2 + 0/1) / 3


def test_absent_classes_are_excluded_from_the_mean():
    m = ConfusionMatrix(4)  # class 3 in neither ground truth nor prediction
    m.update(PRED, TARGET)
    s = m.scores()
    assert s["iou"]["3"] is None
    assert s["miou"] == pytest.approx(100 / 3)
    # a class only predicted (false positives) is included with IoU 0
    m2 = ConfusionMatrix(4)
    m2.update(torch.tensor([3, 1]), torch.tensor([0, 1]))
    assert m2.scores()["iou"] == {"0": 0.0, "1": 100.0, "2": None, "3": 0.0}
    assert m2.scores()["miou"] == pytest.approx(100 / 3)


def test_accumulates_over_updates_and_batches():
    a = ConfusionMatrix(3)
    a.update(PRED[None], TARGET[None])
    a.update(PRED[None], TARGET[None])
    b = ConfusionMatrix(3)
    b.update(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]))
    assert torch.equal(a.mat, b.mat)
    assert a.scores()["miou"] == pytest.approx(100 / 3)


def test_all_ignored_gives_nan():
    m = ConfusionMatrix(3)
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(m.scores()["miou"])


def test_rejects_predictions_out_of_range():
    m = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions must lie in"):
        m.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        m.update(torch.tensor([0.0]), torch.tensor([0]))


def test_prediction_at_ignored_pixel_may_be_anything_valid():
    m = ConfusionMatrix(3)
    m.update(torch.tensor([2, 1]), torch.tensor([255, 1]))
    assert m.mat.sum() == 1


def test_segmentation_scores_from_matrix():
    s = segmentation_scores(torch.tensor([[5, 0], [0, 5]]))
    assert s["miou"] == 100.0 and s["pixel_acc"] == 100.0
