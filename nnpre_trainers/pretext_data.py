"""Streaming patch sampler for pretraining on preprocessed (blosc2) image-only or labelled datasets.

Each batch: draw ``batch_size`` case ids uniformly (with replacement), open each case lazily
(nnU-Net's ``nnUNetDatasetBlosc2.load_case`` memory-maps the ``.b2nd`` file), crop a random patch —
only the chunks under the patch are decompressed — pad with 0 where the case is smaller than the
patch, mirror randomly, and run the pretext task's ``corrupt`` on the batch. All of this happens in
the background workers of batchgenerators' ``MultiThreadedAugmenter`` so the training loop only
runs the network. The index is the list of case ids (a few MB for ~100k cases); nothing else is held
in memory.

Randomness: each worker gets its own ``np.random.Generator``/``torch.Generator`` seeded from
``(seed, worker id)``; the augmenter returns batches round-robin, so a run is reproducible for a
fixed seed and worker count.
"""
from __future__ import annotations

import multiprocessing
from typing import List, Optional, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader

from nnpre.errors import fail


class PretextPatchLoader(DataLoader):
    """Random patches + pretext corruption, as a batchgenerators ``DataLoader``.

    Args:
        dataset: an nnU-Net dataset (``nnUNetDatasetBlosc2``) over the preprocessed folder.
        identifiers: case ids to sample from.
        batch_size: patches per batch.
        patch_size: (X, Y, Z) patch in voxels (array order of the preprocessed data).
        pretext: a :class:`nnpre_trainers.pretext.PretextTask`.
        seed: base seed; worker ``i`` uses ``(seed, i)``.
        mirror: random flips along all three axes (p=0.5 each); nnssl additionally rotates and scales.

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
        self.patch_size = [int(p) for p in patch_size]
        self.pretext = pretext
        self.seed = int(seed)
        # Coordinate conditioning encodes each voxel's position from the patch bbox; a flipped patch would
        # contradict it, so tasks with extra (coordinate) input channels are not mirrored.
        self.mirror = mirror and pretext.num_extra_input_channels() == 0
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
        for s, p in zip(shape, self.patch_size):
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
            if self.mirror:
                for ax in range(3):
                    if rng.random() < 0.5:
                        patch = np.flip(patch, axis=ax + 1)
            patches.append(np.ascontiguousarray(patch))
            bboxes.append(bbox)
            shapes.append(list(data.shape[1:]))
        x = torch.from_numpy(np.stack(patches))
        context = {"patch_bbox": torch.tensor(bboxes, dtype=torch.long),
                   "volume_shape": torch.tensor(shapes, dtype=torch.long)}
        sample = self.pretext.corrupt(x, gen, context)
        return {"data": sample.input, "target": sample.target, "loss_mask": sample.loss_mask,
                "extras": dict(sample.extras or {}), "keys": keys}
