"""Streaming patch sampler for pretraining on preprocessed (blosc2) image-only or labelled datasets.

Each batch: draw ``batch_size`` case ids uniformly (with replacement), open each case lazily
(nnU-Net's ``nnUNetDatasetBlosc2.load_case`` memory-maps the ``.b2nd`` file), crop a random region —
only the chunks under it are decompressed — pad with 0 where the case is smaller than the region,
augment it as the task asks (:meth:`PretextTask.loader_augmentation`), and run the pretext task's
``corrupt`` on the batch. The region is ``pretext.loader_patch_size(patch_size)`` (the patch itself,
or e.g. VoCo's larger region that it splits into crops). All of this happens in the background
workers of batchgenerators' ``MultiThreadedAugmenter`` so the training loop only runs the network.
The index is the list of case ids (a few MB for ~100k cases); nothing else is held in memory.

Augmentations (per sample, before the corruption):

* ``"mirror"``: flip each axis with p 0.5 (nnpre's default for tasks without a reference augmentation);
* ``"none"``: nothing (Model Genesis flips inside its own corruption, VoCo augments its crops);
* ``"nnssl"``: nnssl's MAE augmentation (``BaseMAETrainer.get_training_transforms`` with
  ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``): the loader crops nnU-Net's enlarged
  initial patch (``get_patch_size`` for ±30° rotations and scales 0.85-1.25), then batchgeneratorsv2's
  ``SpatialTransform`` rotates (p 0.2, ±30° about every axis), scales (p 0.2, 0.7-1.4, one factor for all
  axes), pads with 0 and takes the centre patch, and ``MirrorTransform`` flips axes 0, 1, 2 (p 0.5 each).
  nnssl uses batchgenerators v1 with cubic interpolation; batchgeneratorsv2 interpolates linearly.
  batchgeneratorsv2 draws from the global numpy/torch generators, so each call runs with those seeded from
  the worker's own generator and restored afterwards: batches stay a pure function of the seed.

Randomness: each worker gets its own ``np.random.Generator``/``torch.Generator`` seeded from
``(seed, worker id)``; the augmenter returns batches round-robin, so a run is reproducible for a
fixed seed and worker count.
"""
from __future__ import annotations

import math
import multiprocessing
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader

from nnpre.errors import fail
from nnpre_trainers.pretext.rng import seeded_global_rngs


class PretextPatchLoader(DataLoader):
    """Random patches + pretext corruption, as a batchgenerators ``DataLoader``.

    Args:
        dataset: an nnU-Net dataset (``nnUNetDatasetBlosc2``) over the preprocessed folder.
        identifiers: case ids to sample from.
        batch_size: patches per batch.
        patch_size: (X, Y, Z) patch in voxels (array order of the preprocessed data).
        pretext: a :class:`nnpre_trainers.pretext.PretextTask`.
        seed: base seed; worker ``i`` uses ``(seed, i)``.
        mirror: False disables all augmentation (validation); True applies the task's
            ``loader_augmentation()``.

    Yields dicts with ``data`` (B, C_in, X, Y, Z) float32, ``target`` (B, C_out, X, Y, Z),
    ``loss_mask`` (B, 1, X, Y, Z) or None, ``extras`` (dict of tensors), ``keys`` (case ids).
    """

    def __init__(self, dataset, identifiers: Sequence[str], batch_size: int, patch_size: Sequence[int], pretext,
                 seed: int = 0, mirror: bool = True):
        if len(identifiers) == 0:
            fail("the preprocessed dataset holds no cases; run nnPre_plan on a dataset with images first")
        super().__init__(None, batch_size, 1, None, True, False, True)
        self.dataset = dataset
        self.indices = list(identifiers)
        self.patch_size = [int(p) for p in pretext.loader_patch_size(patch_size)]
        self.pretext = pretext
        self.seed = int(seed)
        # Coordinate conditioning encodes each voxel's position from the patch bbox; a flipped/rotated patch
        # would contradict it, so tasks with extra (coordinate) input channels are not augmented.
        kind = pretext.loader_augmentation() if mirror and pretext.num_extra_input_channels() == 0 else "none"
        self.augmentation = kind
        self.crop_size, self._augment = make_augmentation(kind, self.patch_size)
        self.mirror = kind == "mirror"
        self._rng: Optional[np.random.Generator] = None
        self._gen: Optional[torch.Generator] = None

    def _generators(self):
        if self._rng is None:  # created lazily inside each worker, after set_thread_id
            if multiprocessing.parent_process() is not None:
                torch.set_num_threads(1)  # one thread per background worker: no oversubscription, no fork deadlock
            tid = int(getattr(self, "thread_id", 0))
            self._rng = np.random.default_rng([self.seed, tid])
            self._gen = torch.Generator().manual_seed(int(self._rng.integers(2 ** 62)))
        return self._rng, self._gen

    def _crop(self, data, rng) -> tuple[np.ndarray, List[List[int]]]:
        shape = data.shape[1:]
        bbox = []
        for s, p in zip(shape, self.crop_size):
            lo, hi = min(0, s - p), max(0, s - p)  # negative start = centred padding when the case is small
            if s < p:
                lo = hi = -((p - s) // 2)
            start = int(rng.integers(lo, hi + 1))
            bbox.append([start, start + p])
        patch = crop_and_pad_nd(data, [[0, data.shape[0]]] + bbox, pad_value=0)
        return np.asarray(patch, dtype=np.float32), bbox

    def generate_train_batch(self) -> dict:
        rng, gen = self._generators()
        keys = [self.indices[i] for i in rng.integers(0, len(self.indices), self.batch_size)]
        patches, bboxes, shapes = [], [], []
        for k in keys:
            data, _, _, _ = self.dataset.load_case(k)
            patch, bbox = self._crop(data, rng)
            if not np.all(np.isfinite(patch)):
                fail(f"preprocessed case '{k}' contains NaN/inf values; fix the raw image and re-run nnPre_plan")
            patch = self._augment(patch, rng)
            if self.crop_size != self.patch_size:  # report the centre patch the augmentation returned
                bbox = [[b0 + (c - p) // 2, b0 + (c - p) // 2 + p]
                        for (b0, _), c, p in zip(bbox, self.crop_size, self.patch_size)]
            patches.append(np.ascontiguousarray(patch))
            bboxes.append(bbox)
            shapes.append(list(data.shape[1:]))
        x = torch.from_numpy(np.stack(patches))
        context = {"patch_bbox": torch.tensor(bboxes, dtype=torch.long),
                   "volume_shape": torch.tensor(shapes, dtype=torch.long)}
        sample = self.pretext.corrupt(x, gen, context)
        return {"data": sample.input, "target": sample.target, "loss_mask": sample.loss_mask,
                "extras": dict(sample.extras or {}), "keys": keys}


# ----------------------------------------------------------------------------------------------------------
# augmentations
# ----------------------------------------------------------------------------------------------------------
AUGMENTATIONS = ("mirror", "none", "nnssl")
#: nnssl ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` / ``BaseMAETrainer``
NNSSL_ROTATION = (-30.0 / 360 * 2.0 * math.pi, 30.0 / 360 * 2.0 * math.pi)
NNSSL_SCALING = (0.7, 1.4)
NNSSL_P_ROTATION = 0.2
NNSSL_P_SCALING = 0.2
NNSSL_INITIAL_SCALE_RANGE = (0.85, 1.25)


def mirror_axes(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip each spatial axis of (C, X, Y, Z) ``patch`` with probability 0.5."""
    for ax in range(3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis=ax + 1)
    return patch


def make_augmentation(kind: str, patch_size: Sequence[int]
                      ) -> Tuple[List[int], Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    """(crop size the loader must cut, augmentation function (C, X, Y, Z) array + rng -> (C, *patch_size)).

    See the module docstring for the kinds.
    """
    patch_size = [int(p) for p in patch_size]
    if kind == "none":
        return patch_size, lambda patch, rng: patch
    if kind == "mirror":
        return patch_size, mirror_axes
    if kind != "nnssl":
        fail(f"unknown loader augmentation '{kind}'; choose one of {AUGMENTATIONS}")
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    crop = [int(c) for c in get_patch_size(patch_size, NNSSL_ROTATION, NNSSL_ROTATION, NNSSL_ROTATION,
                                           NNSSL_INITIAL_SCALE_RANGE)]
    spatial = SpatialTransform(patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                               p_rotation=NNSSL_P_ROTATION, rotation=NNSSL_ROTATION, p_rot_per_axis=1,
                               p_scaling=NNSSL_P_SCALING, scaling=NNSSL_SCALING,
                               p_synchronize_scaling_across_axes=1, padding_mode_image="zeros")
    mirror = MirrorTransform(allowed_axes=(0, 1, 2))

    def augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        with seeded_global_rngs(int(rng.integers(2 ** 62))), torch.no_grad():
            out = spatial(image=torch.from_numpy(np.ascontiguousarray(patch)))
            out = mirror(**out)
        return out["image"].numpy()

    return crop, augment
