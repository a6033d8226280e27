"""Pretext patch loader: region size from the task, augmentations (mirror / none / nnssl), determinism."""
import numpy as np
import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import get_pretext
from nnpre_trainers.pretext_data import PretextPatchLoader, make_augmentation


class FakeDataset:
    """load_case -> (C, X, Y, Z) float32 volume (the nnU-Net dataset interface the loader uses)."""

    def __init__(self, shape=(1, 40, 40, 24), seed=0):
        self.vol = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def load_case(self, key):
        return self.vol, None, None, None


def test_region_size_comes_from_the_task():
    voco = get_pretext("voco", region_size=(32, 32, 16), base_crops=(2, 2, 1), num_target_crops=2)
    dl = PretextPatchLoader(FakeDataset(), ["a"], 2, (16, 16, 16), voco, seed=0)
    assert dl.patch_size == [32, 32, 16] and dl.augmentation == "none"
    b = dl.generate_train_batch()
    assert b["data"].shape == (2 * 6, 1, 16, 16, 16) and b["target"].shape == (2, 2, 4)


def test_mirror_and_none_kinds_keep_values():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    crop, aug = make_augmentation("mirror", [2, 3, 4])
    assert crop == [2, 3, 4]
    outs = {aug(x, np.random.default_rng(s)).tobytes() for s in range(40)}
    assert len(outs) == 8  # all 2^3 flip combinations occur
    crop, aug = make_augmentation("none", [2, 3, 4])
    assert aug(x, np.random.default_rng(0)) is x
    with pytest.raises(NnPreError, match="unknown loader augmentation"):
        make_augmentation("elastic", [2, 3, 4])


def test_nnssl_augmentation_rates_shape_determinism_and_global_rng():
    patch = [16, 16, 16]
    crop, aug = make_augmentation("nnssl", patch)
    assert all(c > p for c, p in zip(crop, patch))  # enlarged initial patch for rotation/scaling
    vol = np.random.default_rng(0).standard_normal((1, *crop)).astype(np.float32)
    lo = [(c - p) // 2 for c, p in zip(crop, patch)]
    centre = vol[:, lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 16]
    flips = []
    for axes in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]:
        flips.append(np.flip(centre, axes) if axes else centre)
    np.random.seed(123)
    torch.manual_seed(123)
    before = (np.random.random(), float(torch.rand(1)))
    np.random.seed(123)
    torch.manual_seed(123)
    rng = np.random.default_rng(7)
    changed = 0
    n = 150
    for _ in range(n):
        out = aug(vol, rng)
        assert out.shape == (1, 16, 16, 16)
        if not any(np.allclose(out, f, atol=1e-4) for f in flips):
            changed += 1
    after = (np.random.random(), float(torch.rand(1)))
    assert before == after  # global generators untouched
    # rotation p 0.2, scaling p 0.2: resampled with probability 1 - 0.8 * 0.8 = 0.36
    assert 0.22 < changed / n < 0.50, changed / n
    a = aug(vol, np.random.default_rng(3))
    b = aug(vol, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_loader_uses_the_task_augmentation():
    mae = get_pretext("mae", block_size=4)
    dl = PretextPatchLoader(FakeDataset(), ["a"], 1, (16, 16, 16), mae, seed=0)
    assert dl.augmentation == "nnssl" and dl.crop_size != dl.patch_size
    b = dl.generate_train_batch()
    assert b["data"].shape == (1, 1, 16, 16, 16)
    val = PretextPatchLoader(FakeDataset(), ["a"], 1, (16, 16, 16), mae, seed=0, mirror=False)
    assert val.augmentation == "none" and val.crop_size == [16, 16, 16]
    mg = PretextPatchLoader(FakeDataset(), ["a"], 1, (16, 16, 16), get_pretext("model_genesis"), seed=0)
    assert mg.augmentation == "none"  # flips happen inside the Model Genesis corruption
    diff = PretextPatchLoader(FakeDataset(), ["a"], 1, (16, 16, 16), get_pretext("diffusion"), seed=0)
    assert diff.augmentation == "mirror"
    coords = PretextPatchLoader(FakeDataset(), ["a"], 1, (16, 16, 16),
                                get_pretext("diffusion", coord_channels=True), seed=0)
    assert coords.augmentation == "none"
