"""Detection targets from nnU-Net segmentation patches, in the data-loader workers.

nnDetection derives boxes per training patch on the fly (``Instances2Boxes`` in ``nndet/io/transforms``), in
its augmentation workers. Here the same per-sample CPU work -- 26-connected components of each label
(:func:`~nnpre_detection.instances.semantic_to_instances`) and their nnDetection boxes (``min - 1`` /
``max + 1``, :func:`~nnpre_detection.instances.boxes_from_instances`) -- runs as the last transform of nnU-Net's
training pipeline (:class:`BoxTargetsTransform`), so it happens in nnU-Net's background workers and not in the
training step.

nnU-Net's data loader keeps only ``image`` and ``segmentation`` of each transformed sample and stacks
``segmentation`` per list entry, so the transform returns ``segmentation`` as a list
``[seg (1, X, Y, Z), boxes (max_instances, 7)]``: rows ``(x1, y1, x2, y2, z1, z2, class)``, padded with class -1.
:func:`targets_from_batch` turns a collated batch target (that list, or a plain seg tensor when the transform is
absent) into the detector's target dicts.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from nnpre.errors import fail
from nnpre_detection.instances import boxes_from_instances, semantic_to_instances

#: Default rows of the padded box tensor (instances per patch).
MAX_INSTANCES = 64


def _boxes_labels(seg: np.ndarray):
    s = np.clip(np.rint(seg), 0, None).astype(np.int64)
    inst, mapping = semantic_to_instances(s)
    boxes, ids = boxes_from_instances(inst)
    labels = np.array([mapping[int(i)] for i in ids], dtype=np.int64)
    return boxes.reshape(-1, 6).astype(np.float32), labels, s


def targets_from_seg(seg: torch.Tensor) -> List[dict]:
    """Detection targets of a batch of semantic seg patches (in the training process).

    Args:
        seg: (B, 1, X, Y, Z) or (B, X, Y, Z) semantic labels (0 = background, ``v > 0`` = class ``v - 1``;
            negative values, nnU-Net's padding marker, count as background).

    Returns:
        list of B dicts ``{"boxes": (N, 6) float32 (nnDetection layout, patch voxel coords), "labels": (N,)
        long, "seg": (X, Y, Z) long}``.
    """
    seg = torch.as_tensor(seg).detach().cpu()
    if seg.ndim == 5:
        seg = seg[:, 0]
    if seg.ndim != 4:
        fail(f"targets_from_seg expects (B, 1, X, Y, Z) or (B, X, Y, Z) labels, got shape {tuple(seg.shape)}")
    out = []
    for s in seg:
        boxes, labels, s_np = _boxes_labels(s.numpy())
        out.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                    "seg": torch.from_numpy(s_np)})
    return out


def encode_boxes(boxes: np.ndarray, labels: np.ndarray, max_instances: int = MAX_INSTANCES) -> torch.Tensor:
    """(max_instances, 7) float32: rows ``(box, class)``, unused rows class -1."""
    n = boxes.shape[0]
    if n > max_instances:
        fail(f"a training patch holds {n} objects but BoxTargetsTransform keeps at most {max_instances}; raise "
             f"max_instances")
    out = torch.zeros((max_instances, 7), dtype=torch.float32)
    out[:, 6] = -1
    out[:n, :6] = torch.from_numpy(boxes)
    out[:n, 6] = torch.from_numpy(labels.astype(np.float32))
    return out


try:  # batchgeneratorsv2 is nnU-Net 2.8's augmentation library
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform as _Base
except ImportError:  # pragma: no cover - nnU-Net always brings it
    _Base = object


class BoxTargetsTransform(_Base):
    """batchgeneratorsv2 transform: segmentation patch -> ``[seg, padded boxes]`` (see module doc).

    Append it after nnU-Net's training transforms (after spatial augmentation and the ``-1 -> 0`` label
    removal, so boxes describe the final patch); deep supervision must be off (the detector has none).

    Args:
        max_instances: rows of the padded box tensor (objects per patch; more raise an error).
    """

    def __init__(self, max_instances: int = MAX_INSTANCES):
        if _Base is not object:
            super().__init__()
        self.max_instances = int(max_instances)

    def __call__(self, **data_dict):
        seg = data_dict.get("segmentation")
        if seg is None:
            fail("BoxTargetsTransform needs a 'segmentation' entry (append it to the training transforms)")
        if isinstance(seg, (list, tuple)):
            fail("BoxTargetsTransform got a deep-supervision list; turn deep supervision off for detection")
        seg_t = torch.as_tensor(seg)
        boxes, labels, _ = _boxes_labels(seg_t[0].numpy() if seg_t.ndim == 4 else seg_t.numpy())
        data_dict["segmentation"] = [seg_t, encode_boxes(boxes, labels, self.max_instances)]
        return data_dict

    def apply(self, data_dict, **params):  # BasicTransform interface
        return self(**data_dict)


def targets_from_batch(target) -> List[dict]:
    """Target dicts of a collated batch target.

    Args:
        target: ``[seg (B, 1, X, Y, Z), boxes (B, M, 7)]`` from :class:`BoxTargetsTransform`, or a plain seg
            tensor (then boxes are computed here with :func:`targets_from_seg`).
    """
    if isinstance(target, (list, tuple)):
        if len(target) == 2 and torch.as_tensor(target[1]).ndim == 3 and torch.as_tensor(target[1]).shape[-1] == 7:
            seg, enc = torch.as_tensor(target[0]), torch.as_tensor(target[1])
            seg = seg[:, 0] if seg.ndim == 5 else seg
            out = []
            for s, e in zip(seg, enc):
                keep = e[:, 6] >= 0
                out.append({"boxes": e[keep, :6].float(), "labels": e[keep, 6].long(), "seg": s.long().clamp(min=0)})
            return out
        target = target[0]
    return targets_from_seg(target)


def split_encoded(enc: torch.Tensor) -> Sequence[torch.Tensor]:
    """(M, 7) encoded rows -> (boxes (N, 6), labels (N,)) without padding."""
    keep = enc[:, 6] >= 0
    return enc[keep, :6], enc[keep, 6].long()
