import numpy as np
import pytest
import torch

from tscd.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from tscd.data.transforms import EvalTransform, TrainTransform, denormalize, normalize, resolve_pad_value


def _inputs(h=20, w=30, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 4, size=(h, w), dtype=np.uint8)
    return img, label


def test_normalize_denormalize_roundtrip():
    img, _ = _inputs()
    t = normalize(img)
    assert t.shape == (3, 20, 30) and t.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(t, (torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std, atol=1e-5)
    back = denormalize(t)
    assert torch.allclose(back * 255, torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3)
    batched = denormalize(t[None].repeat(2, 1, 1, 1))
    assert batched.shape == (2, 3, 20, 30) and batched.min() >= 0 and batched.max() <= 1
    with pytest.raises(ValueError, match="img"):
        denormalize(torch.zeros(4, 5, 5))


def test_eval_transform_native_size():
    img, label = _inputs()
    out_img, out_label, box = EvalTransform()(img, label)
    assert out_img.shape == (3, 20, 30) and out_label.dtype == torch.int64
    assert torch.equal(out_label, torch.from_numpy(label).long())
    assert box.tolist() == [0, 20, 0, 30] and box.dtype == torch.int64


@pytest.mark.parametrize("h,w,crop", [(20, 30, 32), (60, 50, 24), (10, 80, 16), (16, 16, 16)])
def test_train_transform_box_and_padding(h, w, crop):
    img, label = _inputs(h, w)
    tf = TrainTransform(crop)
    for seed in range(20):
        out_img, out_label, box = tf(img, label, np.random.default_rng(seed))
        assert out_img.shape == (3, crop, crop) and out_img.dtype == torch.float32
        assert out_label.shape == (crop, crop) and out_label.dtype == torch.int64
        top, bottom, left, right = box.tolist()
        assert box.dtype == torch.int64
        assert 0 <= top < bottom <= crop and 0 <= left < right <= crop
        inside = torch.zeros(crop, crop, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        # Padding: raw 0 (black, the official canvas) before normalisation, label ignore.
        black = ((0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1)
        assert torch.allclose(out_img[:, ~inside], black.expand(3, int((~inside).sum())))
        assert torch.all(out_label[~inside] == IGNORE_INDEX)
        # Inside: real labels only (the source has no 255).
        assert torch.all(out_label[inside] < 4)


def test_train_transform_identity_settings_reproduce_the_image():
    """scale 1, no flip, crop = image size: the output is the normalised input, box = everything."""
    img, label = _inputs(24, 24)
    out_img, out_label, box = TrainTransform(24, scale_range=(1.0, 1.0), flip_prob=0.0)(
        img, label, np.random.default_rng(0))
    assert torch.allclose(out_img, normalize(img))
    assert torch.equal(out_label, torch.from_numpy(label).long())
    assert box.tolist() == [0, 24, 0, 24]


def test_train_transform_flip_and_content_alignment():
    """With flip_prob=1 and no rescale, the box content is the flipped image at the right place."""
    img, label = _inputs(12, 14)
    out_img, out_label, box = TrainTransform(20, scale_range=(1.0, 1.0), flip_prob=1.0)(
        img, label, np.random.default_rng(3))
    top, bottom, left, right = box.tolist()
    assert (bottom - top, right - left) == (12, 14)
    assert torch.equal(out_label[top:bottom, left:right], torch.from_numpy(label[:, ::-1].copy()).long())
    assert torch.allclose(out_img[:, top:bottom, left:right], normalize(img[:, ::-1]))


def test_train_transform_scale_range_and_determinism():
    img, label = _inputs(40, 40)
    tf = TrainTransform(200, scale_range=(0.5, 2.0), flip_prob=0.5)
    sizes = set()
    for seed in range(30):
        _, _, box = tf(img, label, np.random.default_rng(seed))
        t, b, left, r = box.tolist()
        sizes.add(b - t)
        assert 20 <= b - t <= 80 and b - t == r - left
    assert len(sizes) > 10
    a = tf(img, label, np.random.default_rng(7))
    b = tf(img, label, np.random.default_rng(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_train_transform_custom_pad_value_and_no_label():
    img, _ = _inputs(8, 8)
    out_img, out_label, box = TrainTransform(16, scale_range=(1.0, 1.0), img_pad_value=0.0)(
        img, None, np.random.default_rng(0))
    assert out_label is None
    top, bottom, left, right = box.tolist()
    expected = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    corner = (0, 0) if top > 0 or left > 0 else (15, 15)
    assert torch.allclose(out_img[:, corner[0], corner[1]], expected)


def test_train_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(16, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="flip_prob"):
        TrainTransform(16, flip_prob=1.5)


#: The official crop canvas after normalisation: raw 0 -> (-2.118, -2.036, -1.804).
OFFICIAL_BLACK = (-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375)


def test_default_pad_is_official_black_on_a_real_crop():
    """A training item of a dataset (default settings) whose image is smaller than the crop: every padded pixel
    is the official (-2.118, -2.036, -1.804)."""
    from tscd.data import build_dataset

    ds = build_dataset("demo", "train", None, True, crop_size=64, scale_range=(0.5, 0.6), num_images=2, size=48)
    item = ds[(0, 0, 0)]
    out_img, box = item["img"], item["img_box"]
    top, bottom, left, right = box.tolist()
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert (~inside).sum() > 0
    pad = out_img[:, ~inside]
    want = torch.tensor(OFFICIAL_BLACK).view(3, 1)
    assert torch.allclose(pad, want.expand_as(pad), atol=1e-5)
    assert abs(float(pad[0, 0]) + 2.118) < 1e-3 and abs(float(pad[2, 0]) + 1.804) < 1e-3


def test_pad_value_mean_and_rgb():
    img, _ = _inputs(8, 8)
    for value, want in (("mean", torch.zeros(3)), ([255, 0, 10], (torch.tensor([255.0, 0, 10]) - torch.tensor(
            IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))):
        out_img, _, box = TrainTransform(16, scale_range=(1.0, 1.0), img_pad_value=value)(
            img, None, np.random.default_rng(0))
        top, bottom, left, right = box.tolist()
        corner = (0, 0) if top > 0 or left > 0 else (15, 15)
        assert torch.allclose(out_img[:, corner[0], corner[1]], want, atol=1e-6), value
    assert resolve_pad_value(None) == (0.0, 0.0, 0.0) and resolve_pad_value(7) == (7.0, 7.0, 7.0)
    for bad in ("grey", [1, 2], [0, 0, 300]):
        with pytest.raises(ValueError, match="pad_value"):
            resolve_pad_value(bad)


def test_rescale_size_is_floor_as_the_official_int():
    """int(r * h), not round: a draw with fractional part >= 0.5 must floor."""
    img, label = _inputs(41, 37)
    tf = TrainTransform(200, scale_range=(0.5, 2.0), flip_prob=0.0)
    seen_round_up = False
    for seed in range(40):
        r = float(np.random.default_rng(seed).uniform(0.5, 2.0))  # the transform's first draw
        _, _, box = tf(img, label, np.random.default_rng(seed))
        t, b, left, right = box.tolist()
        assert (b - t, right - left) == (int(41 * r), int(37 * r)), (seed, r)
        seen_round_up |= round(41 * r) != int(41 * r)
    assert seen_round_up  # the case where round() and int() differ was exercised
