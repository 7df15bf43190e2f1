"""dense_crf (cpp) gives pydensecrf's labels (its DenseCRF2D with the same settings) on every pixel.

The committed fixture tests/kernels/data/dense_crf_100x75.npz holds a generated 100 x 75 image (uint8) and the
labels pydensecrf2 gave on it with the unary of ``crf_scene`` (regenerated here from its seed): checked on every
run, without pydensecrf. When pydensecrf is importable, a second test compares the labels on a 500 x 375 (VOC-size)
generated image, 21 classes, 10 iterations. Regenerate the fixture (needs pydensecrf2):

    python tests/kernels/test_dense_crf_pydensecrf.py --write-fixture
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.bench_permutohedral import voc_scene  # noqa: E402
from tscd.eval.crf import CRFParams  # noqa: E402
from tscd.kernels import dense_crf  # noqa: E402
from tscd.kernels._ext import has_cpp  # noqa: E402

needs_cpp = pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
FIXTURE = Path(__file__).parent / "data" / "dense_crf_100x75.npz"


def crf_scene(W: int, H: int, K: int = 21, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """The benchmark's generated scene (``bench.bench_permutohedral.voc_scene``): uint8 image (3, H, W) as numpy
    and noisy softmax probabilities (1, K, H, W)."""
    img, probs = voc_scene(W, H, K, seed)
    return img.numpy(), probs


def pydensecrf_labels(img: np.ndarray, probs: torch.Tensor, p: CRFParams = CRFParams()) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    _, K, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(np.ascontiguousarray((-torch.log(probs[0].clamp_min(1e-5))).reshape(K, -1).numpy()))
    d.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb,
                           rgbim=np.ascontiguousarray(img.transpose(1, 2, 0)), compat=p.bilateral_compat)
    return np.array(d.inference(p.num_iter)).reshape(K, H, W).argmax(0)


def ours(img: np.ndarray, probs: torch.Tensor, p: CRFParams = CRFParams()) -> np.ndarray:
    q = dense_crf(torch.from_numpy(img), probs, backend="cpp", num_iter=p.num_iter, gauss_sxy=p.gauss_sxy,
                  gauss_compat=p.gauss_compat, bilateral_sxy=p.bilateral_sxy, bilateral_srgb=p.bilateral_srgb,
                  bilateral_compat=p.bilateral_compat)
    return q[0].argmax(0).numpy()


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_fixture_labels_equal_pydensecrf(threads):
    data = np.load(FIXTURE)
    img, probs = crf_scene(100, 75, seed=int(data["seed"]))
    np.testing.assert_array_equal(img, data["image"], err_msg="the generated scene changed: regenerate the fixture")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        labels = ours(img, probs)
    finally:
        torch.set_num_threads(old)
    # the CRF changes many labels here, so this fails if the op's result moves
    assert (data["labels"] != probs[0].argmax(0).numpy()).mean() > 0.05
    assert (labels != data["labels"]).sum() == 0, f"{(labels != data['labels']).sum()} pixels differ"


@needs_cpp
def test_voc_size_labels_equal_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (an optional benchmark peer) is not installed")
    img, probs = crf_scene(500, 375, seed=1)
    theirs = pydensecrf_labels(img, probs)
    assert (theirs != probs[0].argmax(0).numpy()).mean() > 0.05
    assert (ours(img, probs) != theirs).sum() == 0


def _write_fixture(seed: int = 0) -> None:
    img, probs = crf_scene(100, 75, seed=seed)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, image=img, labels=pydensecrf_labels(img, probs).astype(np.uint8), seed=seed)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__" and "--write-fixture" in sys.argv:
    _write_fixture()
