"""ToCoTrainTransform (tscd.data.views): the main image, ``view2`` and ``local``, drawn from the item's generator."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tscd.constants import IMAGENET_MEAN, IMAGENET_STD
from tscd.data import TOCO_VIEW_NAMES, build_dataset, build_loader
from tscd.data.base import make_transform
from tscd.data.transforms import TrainTransform, normalize
from tscd.data.views import (
    ToCoTrainTransform,
    apply_jitter,
    jitter_ranges,
    sample_jitter,
    sample_resized_crop,
    solarize,
)

pytest.importorskip("torchvision")

#: every photometric operation off: the views are plain crops
OFF = dict(view_flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, main_blur_prob=0.0, local_blur_prob=0.0,
           view2_blur_prob=0.0, solarize_prob=0.0)


def _img(h=24, w=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), rng.integers(0, 4, size=(h, w), dtype=np.uint8)


def _raw(t: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, H, W) -> float (H, W, 3) on the 0..255 scale."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t * std + mean).permute(1, 2, 0).numpy()


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_outputs_shapes_dtypes_and_determinism():
    img, label = _img()
    tf = ToCoTrainTransform(20)
    main, lab, box, views = tf(img, label, np.random.default_rng(5))
    assert main.shape == (3, 20, 20) and main.dtype == torch.float32
    assert lab.shape == (20, 20) and lab.dtype == torch.int64
    assert box.shape == (4,) and box.dtype == torch.int64
    assert tuple(views) == TOCO_VIEW_NAMES
    for v in views.values():
        assert v.shape == (3, 20, 20) and v.dtype == torch.float32 and torch.isfinite(v).all()
    again = tf(img, label, np.random.default_rng(5))
    assert _equal((main, lab, box), again[:3]) and all(torch.equal(views[k], again[3][k]) for k in views)
    other = tf(img, label, np.random.default_rng(6))
    assert not torch.equal(main, other[0]) and not torch.equal(views["view2"], other[3]["view2"])
    assert tf(img, None, np.random.default_rng(5))[1] is None


def test_dataset_items_and_collate_with_views():
    ds = build_dataset("demo", "train", None, True, views="toco", num_images=4, size=32)
    assert isinstance(ds.transform, ToCoTrainTransform)
    a, b = ds[(1, 0, 7)], ds[(1, 0, 7)]
    assert set(a["views"]) == set(TOCO_VIEW_NAMES)
    assert torch.equal(a["img"], b["img"]) and all(torch.equal(a["views"][k], b["views"][k]) for k in a["views"])
    c = ds[(1, 1, 7)]  # another epoch: another augmentation
    assert not torch.equal(a["views"]["view2"], c["views"]["view2"])
    batch = next(iter(build_loader(ds, 2, shuffle=True, seed=3, pin_memory=False)))
    for k in TOCO_VIEW_NAMES:
        assert batch["views"][k].shape == (2, 3, 32, 32) and batch["views"][k].dtype == torch.float32
    assert batch["img"].shape == (2, 3, 32, 32)
    plain = build_dataset("demo", "train", None, True, num_images=4, size=32)
    assert "views" not in plain[(1, 0, 7)] and isinstance(plain.transform, TrainTransform)
    assert "views" not in build_dataset("demo", "val", None, False, views="toco", num_images=2, size=32)[0]


def test_box_and_label_are_train_transforms():
    """The crop's draws come first and equal TrainTransform's, so the box and label match for the same generator."""
    img, label = _img(40, 28)
    for kw in ({}, dict(scale_range=(1.0, 1.0), flip_prob=1.0)):
        ref, tf = TrainTransform(32, **kw), ToCoTrainTransform(32, **kw)
        for seed in range(10):
            _, ref_label, ref_box = ref(img, label, np.random.default_rng(seed))
            _, lab, box, _ = tf(img, label, np.random.default_rng(seed))
            assert torch.equal(box, ref_box) and torch.equal(lab, ref_label)


def test_all_operations_off_give_the_plain_crops():
    img, label = _img(30, 30)
    ref, tf = TrainTransform(24), ToCoTrainTransform(24, view2_scale=(1.0, 1.0), **OFF)
    for seed in range(4):
        ref_img = ref(img, label, np.random.default_rng(seed))[0]
        main, _, _, views = tf(img, label, np.random.default_rng(seed))
        assert torch.allclose(main, ref_img) and torch.allclose(views["local"], ref_img)
        # view2: the whole (square) original image, bicubic-resized to the crop
        whole = np.asarray(Image.fromarray(img).resize((24, 24), Image.BICUBIC))
        assert torch.allclose(views["view2"], normalize(whole), atol=1e-5)


def test_flip_is_applied_after_the_box_which_is_not_flipped():
    """The official quirk: the main image is mirrored after img_box was computed; the box is kept as it was."""
    img, label = _img(12, 14)
    kw = dict(scale_range=(1.0, 1.0), flip_prob=0.0)
    ref = TrainTransform(20, **kw)
    tf = ToCoTrainTransform(20, **kw, **{**OFF, "view_flip_prob": 1.0})
    ref_img, _, ref_box = ref(img, label, np.random.default_rng(3))
    main, _, box, views = tf(img, label, np.random.default_rng(3))
    assert torch.equal(box, ref_box)
    assert torch.allclose(main, ref_img.flip(-1)) and torch.allclose(views["local"], ref_img.flip(-1))
    top, bottom, left, right = box.tolist()
    if (left, right) != (20 - right, 20 - left):  # the real image is no longer where the box says
        assert not torch.allclose(main[:, top:bottom, left:right], ref_img[:, top:bottom, left:right])


def test_grayscale_gives_equal_channels():
    img, _ = _img()
    main, _, _, views = ToCoTrainTransform(16, **{**OFF, "grayscale_prob": 1.0})(img, None, np.random.default_rng(0))
    for t in (main, views["local"], views["view2"]):
        raw = _raw(t)
        assert np.allclose(raw[..., 0], raw[..., 1], atol=1e-3) and np.allclose(raw[..., 0], raw[..., 2], atol=1e-3)


def test_blur_is_pils_gaussian_blur_and_reduces_variance():
    img, _ = _img(30, 30)
    kw = dict(scale_range=(1.0, 1.0), flip_prob=0.0, view2_scale=(1.0, 1.0), blur_radius=(1.5, 1.5))
    sharp = ToCoTrainTransform(30, **kw, **OFF)(img, None, np.random.default_rng(1))
    blurred = ToCoTrainTransform(30, **kw, **{**OFF, "main_blur_prob": 1.0, "local_blur_prob": 1.0,
                                              "view2_blur_prob": 1.0})(img, None, np.random.default_rng(1))
    expected = normalize(np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5))))
    assert torch.allclose(blurred[0], expected) and torch.allclose(blurred[3]["local"], expected)
    assert torch.allclose(blurred[3]["view2"], expected)
    assert blurred[0].var() < 0.5 * sharp[0].var()


def test_solarize_inverts_bright_pixels_of_view2_only():
    img, _ = _img(20, 20)
    kw = dict(scale_range=(1.0, 1.0), flip_prob=0.0, view2_scale=(1.0, 1.0))
    main, _, _, views = ToCoTrainTransform(20, **kw, **{**OFF, "solarize_prob": 1.0})(img, None,
                                                                                     np.random.default_rng(0))
    expected = np.where(img >= 128, 255 - img, img)
    assert np.allclose(_raw(views["view2"]), expected, atol=1e-3)
    assert np.allclose(_raw(main), img, atol=1e-3) and np.allclose(_raw(views["local"]), img, atol=1e-3)
    assert np.array_equal(np.asarray(solarize(Image.fromarray(img))), expected)


def test_jitter_ranges_and_sampled_factors():
    assert jitter_ranges(0.4, 0.4, 0.2, 0.1) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert jitter_ranges(1.5, 0.0, 0.2, 0.0) == ((0.0, 2.5), None, (0.8, 1.2), None)
    ranges = jitter_ranges(0.4, 0.4, 0.2, 0.1)
    rng = np.random.default_rng(0)
    draws = [sample_jitter(rng, ranges) for _ in range(2000)]
    for order, _ in draws:
        assert sorted(order) == [0, 1, 2, 3]
    assert len({tuple(o) for o, _ in draws}) == 24  # every order occurs
    factors = np.array([f for _, f in draws])
    for k, (lo, hi) in enumerate(ranges):
        assert lo <= factors[:, k].min() < lo + 0.01 and hi - 0.01 < factors[:, k].max() <= hi
        assert abs(factors[:, k].mean() - (lo + hi) / 2) < 0.02 * (hi - lo) + 0.01
    order, factors = sample_jitter(np.random.default_rng(0), jitter_ranges(0.0, 0.4, 0.0, 0.0))
    assert factors[0] is None and factors[2] is None and factors[3] is None and 0.6 <= factors[1] <= 1.4


def test_apply_jitter_matches_torchvision_color_jitter(monkeypatch):
    from torchvision import transforms as T

    img, _ = _img(16, 16)
    pil = Image.fromarray(img)
    order, factors = [2, 0, 3, 1], [1.3, 0.7, 0.9, 0.05]
    cj = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *a: (torch.tensor(order), *factors)))
    assert np.array_equal(np.asarray(apply_jitter(pil, order, factors)), np.asarray(cj(pil)))
    # the order matters
    assert not np.array_equal(np.asarray(apply_jitter(pil, [3, 1, 0, 2], factors)), np.asarray(cj(pil)))


def _central(h, w, ratio):
    """The fallback window of torchvision's RandomResizedCrop: central, the whole image clamped to the ratio range."""
    if w / h < ratio[0]:
        ch, cw = int(round(w / ratio[0])), w
    elif w / h > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


# (h, w, whether random windows occur, whether the fallback occurs) in 300 draws; for 100 x 20 no window of area
# fraction >= 0.4 fits with a ratio in [3/4, 4/3] (its width would be > 20), so every draw falls back.
@pytest.mark.parametrize("h,w,randoms,fallbacks", [(40, 40, True, False), (30, 90, True, True),
                                                   (100, 20, False, True), (7, 9, True, None)])
def test_resized_crop_windows_inside_the_image_and_in_bounds(h, w, randoms, fallbacks):
    rng = np.random.default_rng(0)
    scale, ratio = (0.4, 1.0), (3 / 4, 4 / 3)
    central, seen_central, seen_random = _central(h, w, ratio), False, False
    for _ in range(300):
        top, left, ch, cw = window = sample_resized_crop(rng, h, w, scale, ratio)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        # rounding the sides moves the ratio by at most half a pixel per side
        assert ratio[0] * (1 - 1 / min(ch, cw)) - 1e-9 <= cw / ch <= ratio[1] * (1 + 1 / min(ch, cw)) + 1e-9
        if window == central:  # the fallback may be smaller than scale[0] (here for the 100 x 20 image)
            seen_central = True
            continue
        seen_random = True
        area_tol = (ch + cw + 2) / (2 * h * w)
        assert scale[0] - area_tol <= ch * cw / (h * w) <= scale[1] + area_tol
    assert seen_random == randoms
    assert fallbacks is None or seen_central == fallbacks


def test_resized_crop_falls_back_to_the_central_crop():
    # a 10 x 100 image cannot hold any window of area >= 0.9 with ratio <= 4/3: the central crop, ratio clamped
    assert sample_resized_crop(np.random.default_rng(0), 10, 100, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)
    assert sample_resized_crop(np.random.default_rng(0), 100, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (43, 0, 13, 10)
    # an image whose ratio is in range (an area above the image's forces the fallback): all of it
    assert sample_resized_crop(np.random.default_rng(0), 10, 12, (1.5, 2.0), (3 / 4, 4 / 3)) == (0, 0, 10, 12)
    # the whole image clamped to the ratio range
    assert sample_resized_crop(np.random.default_rng(0), 10, 12, (1.5, 2.0), (0.5, 0.5)) == (0, 3, 10, 5)


def test_draws_are_independent_between_views():
    """The local view and the main image are separate draws of the photometric chain on the same crop."""
    img, _ = _img(30, 30)
    tf = ToCoTrainTransform(24, main_blur_prob=0.0, local_blur_prob=0.0)
    differ = [not torch.equal(m, v["local"]) for m, _, _, v in (tf(img, None, np.random.default_rng(s))
                                                                 for s in range(8))]
    assert any(differ)


@pytest.mark.parametrize("kwargs,match", [
    (dict(jitter_prob=1.2), "jitter_prob"), (dict(view_flip_prob=-0.1), "view_flip_prob"),
    (dict(solarize_prob=2), "solarize_prob"), (dict(main_blur_prob=math.nan), "main_blur_prob"),
    (dict(brightness=-0.1), "brightness"), (dict(hue=0.6), "hue"), (dict(saturation=math.inf), "saturation"),
    (dict(view2_scale=(0.0, 1.0)), "view2_scale"), (dict(view2_scale=(0.5, 1.5)), "view2_scale"),
    (dict(view2_scale=(0.8, 0.4)), "view2_scale"), (dict(view2_ratio=(0.0, 1.0)), "view2_ratio"),
    (dict(blur_radius=(2.0, 1.0)), "blur_radius"), (dict(blur_radius=3.0), "blur_radius"),
    (dict(flip_prob=1.5), "flip_prob"), (dict(crop_size=0), "crop_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToCoTrainTransform(**{"crop_size": 16, **kwargs})


def test_unknown_views():
    with pytest.raises(ValueError, match="views"):
        make_transform(True, 16, views="dino")
    with pytest.raises(ValueError, match="views"):
        build_dataset("demo", "train", None, True, views="dino", num_images=2, size=32)
