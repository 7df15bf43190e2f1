import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from tscd.data import DemoDataset, build_loader
from tscd.data.loader import EpochSampler


class SameImageDemo(DemoDataset):
    """Every index shows the same image: any difference between items comes from augmentation only."""

    def load_raw(self, index):
        return super().load_raw(0)


def _collect(loader):
    return [(b["name"], b["img"], b["img_box"]) for b in loader]


def _equal(run_a, run_b):
    return all(na == nb and torch.equal(ia, ib) and torch.equal(ba, bb)
               for (na, ia, ba), (nb, ib, bb) in zip(run_a, run_b)) and len(run_a) == len(run_b)


def test_augmentation_does_not_repeat_across_workers():
    ds = SameImageDemo("train", num_images=8, size=32, crop_size=48)
    batches = _collect(build_loader(ds, batch_size=2, shuffle=False, num_workers=2, seed=0))
    boxes = torch.cat([b for _, _, b in batches])
    imgs = torch.cat([i for _, i, _ in batches])
    # worker 0 loads batches 0, 2; worker 1 loads 1, 3: their first items must differ (the reference's bug)
    assert not torch.equal(imgs[0], imgs[2]) and not torch.equal(boxes[0], boxes[2])
    assert all(not torch.equal(imgs[i], imgs[j]) for i in range(8) for j in range(i))  # no two alike


def test_same_seed_same_batches_any_worker_count():
    ds = DemoDataset("train", num_images=6, size=32, crop_size=32)
    run0 = _collect(build_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=5))
    run2 = _collect(build_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=5))
    assert _equal(run0, run2)
    other = _collect(build_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=6))
    assert not _equal(run0, other)


def test_epochs_differ_and_set_epoch_replays():
    ds = SameImageDemo("train", num_images=4, size=32, crop_size=40)
    loader = build_loader(ds, batch_size=4, shuffle=False, num_workers=0, seed=1)
    assert isinstance(loader.sampler, EpochSampler)
    e0, e1 = _collect(loader), _collect(loader)
    assert not torch.equal(e0[0][1], e1[0][1])
    loader.sampler.set_epoch(0)
    assert _equal(_collect(loader), e0)
    loader.sampler.set_epoch(1)
    assert _equal(_collect(loader), e1)


class NumpyDraw(Dataset):
    """Draws from the global numpy RNG, as third-party augmentation code might."""

    def __len__(self):
        return 4

    def __getitem__(self, key):
        info = torch.utils.data.get_worker_info()
        return {"v": torch.tensor(np.random.rand()), "worker": torch.tensor(info.id if info else -1)}


def test_worker_init_seeds_numpy_differently_per_worker():
    batches = list(build_loader(NumpyDraw(), batch_size=1, shuffle=False, num_workers=2, seed=0))
    firsts = {int(b["worker"]): float(b["v"]) for b in batches[:2]}
    assert set(firsts) == {0, 1} and firsts[0] != firsts[1]


def test_distributed_sampler_and_drop_last(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = DemoDataset("train", num_images=5, size=32)
        loader = build_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=0, drop_last=True, distributed=True)
        assert isinstance(loader.sampler.sampler, DistributedSampler)
        names0 = [n for b in loader for n in b["name"]]
        names1 = [n for b in loader for n in b["name"]]
        assert len(names0) == 4 and len(loader) == 2
        assert loader.sampler.sampler.epoch == 1 and names0 != names1  # epoch forwarded: reshuffled
    finally:
        dist.destroy_process_group()
