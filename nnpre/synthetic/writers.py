"""On-disk formats of a synthetic case: nnU-Net v2 raw layout, nnDetection layout, unlabelled pool.

* nnU-Net: ``Dataset/images{Tr,Ts}/{case}_{channel:04d}.nii.gz`` and ``labels{Tr,Ts}/{case}.nii.gz``
  (uint8 semantic map), ``dataset.json`` per nnU-Net v2's dataset format
  (``nnunetv2/dataset_conversion/generate_dataset_json.py``).
* nnDetection: ``Task/raw_splitted/images{Tr,Ts}/...`` with int16 instance maps ``{case}.nii.gz`` and
  ``{case}.json`` = ``{"instances": {"1": 0, ...}}``, and ``Task/dataset.json`` (task, name, dim, labels,
  modalities, test_labels), as nnDetection's README describes its raw data.
* pool: ``images{Tr}`` only.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from nnpre.atomic import write_json, write_with
from nnpre.synthetic.config import SynthConfig
from nnpre.synthetic.render import SyntheticCase

__all__ = ["FILE_ENDING", "case_to_sitk", "CaseLayout", "nnunet_dataset_json", "nndet_dataset_json",
           "pool_dataset_json"]

FILE_ENDING = ".nii.gz"


def _to_sitk(array: np.ndarray, case: SyntheticCase):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(case.spacing)
    img.SetOrigin(case.origin)
    img.SetDirection(case.direction)
    return img


def case_to_sitk(case: SyntheticCase, file_dtype: str = "float32"):
    """(list of per-channel images, semantic label image, instance label image) as SimpleITK images.

    ``file_dtype="int16"`` rounds the intensities (clipped to the int16 range), as scanners store HU.
    """
    dtype = np.int16 if file_dtype == "int16" else np.float32
    chans = []
    for c in case.image:
        arr = np.rint(np.clip(c, -32768, 32767)).astype(np.int16) if dtype == np.int16 else c.astype(np.float32)
        chans.append(_to_sitk(arr, case))
    return chans, _to_sitk(case.semantic.astype(np.uint8), case), _to_sitk(case.instances.astype(np.int16), case)


def _write_image(img, path: str, level: int) -> None:
    import SimpleITK as sitk

    def writer(tmp: str) -> None:
        w = sitk.ImageFileWriter()
        w.SetFileName(tmp)
        w.SetUseCompression(True)
        w.SetCompressionLevel(int(level))
        w.Execute(img)

    write_with(writer, path)


class CaseLayout:
    """Where the files of one case go in one dataset format (``kind``: "nnunet", "nndet" or "pool")."""

    def __init__(self, folder: str, kind: str, level: int, file_dtype: str):
        self.folder, self.kind, self.level, self.file_dtype = folder, kind, level, file_dtype
        self.base = os.path.join(folder, "raw_splitted") if kind == "nndet" else folder

    def files(self, split: str, case_id: str, channels: int) -> List[str]:
        """Image files, then (not for pools) the label file and (nnDetection) the instance JSON."""
        imgs = [os.path.join(self.base, f"images{split}", f"{case_id}_{c:04d}{FILE_ENDING}") for c in range(channels)]
        if self.kind == "pool":
            return imgs
        lab = os.path.join(self.base, f"labels{split}", f"{case_id}{FILE_ENDING}")
        extra = [os.path.join(self.base, f"labels{split}", f"{case_id}.json")] if self.kind == "nndet" else []
        return imgs + [lab] + extra

    def complete(self, split: str, case_id: str, channels: int) -> bool:
        return all(os.path.isfile(p) for p in self.files(split, case_id, channels))

    def write(self, split: str, case_id: str, case: SyntheticCase) -> None:
        """Write the files of ``case`` that are missing (atomically, one by one)."""
        paths = self.files(split, case_id, case.image.shape[0])
        chans, sem, inst = case_to_sitk(case, self.file_dtype)
        for img, p in zip(chans, paths):
            if not os.path.isfile(p):
                _write_image(img, p, self.level)
        if self.kind == "nnunet":
            if not os.path.isfile(paths[-1]):
                _write_image(sem, paths[-1], self.level)
        elif self.kind == "nndet":
            lab, js = paths[-2], paths[-1]
            if not os.path.isfile(lab):
                _write_image(inst, lab, self.level)
            write_json({"instances": {str(k): int(v) for k, v in case.instance_classes.items()}}, js)


def _channel_names(channels: int) -> Dict[str, str]:
    return {"0": "CT"} if channels == 1 else {"0": "CT", "1": "CT2"}


def nnunet_dataset_json(cfg: SynthConfig, channels: int, n_train: int, name: str) -> dict:
    """nnU-Net v2 ``dataset.json`` of a labelled synthetic dataset (lesion = 1, lung = 2 if labelled)."""
    labels = {"background": 0, "lesion": 1}
    if cfg.lung_label:
        labels["lung"] = 2
    return {"name": name, "description": "nnpre synthetic CT-like lesion data (nnpre.synthetic)",
            "channel_names": _channel_names(channels), "labels": labels, "numTraining": int(n_train),
            "file_ending": FILE_ENDING}


def nndet_dataset_json(task: str, name: str, channels: int) -> dict:
    """nnDetection ``dataset.json``: one class "lesion", CT modalities, labelled test set."""
    return {"task": task, "name": name, "dim": 3, "labels": {"0": "lesion"}, "modalities": _channel_names(channels),
            "test_labels": True}


def pool_dataset_json(name: str, channels: int, n_cases: int) -> dict:
    """nnU-Net-style ``dataset.json`` of an unlabelled pool (``labels = {"background": 0}``, ``nnpre_unlabeled``)."""
    return {"name": name, "description": "nnpre synthetic unlabelled pretraining pool (nnpre.synthetic)",
            "channel_names": _channel_names(channels), "labels": {"background": 0},
            "numTraining": int(n_cases), "file_ending": FILE_ENDING, "nnpre_unlabeled": True}
