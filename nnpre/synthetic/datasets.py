"""Whole datasets: per-case seeds, the labelled set (nnU-Net and nnDetection copies), the pool, the demo study.

Each case gets its own generator from ``SeedSequence(seed, spawn_key=(stream, k))`` with separate streams for
training, test and pool cases, so case ``k`` is identical no matter how many cases are generated, and the
unlabelled pool never repeats a labelled case.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnpre.atomic import write_json
from nnpre.errors import fail
from nnpre.synthetic.config import SynthConfig
from nnpre.synthetic.render import synthesize_case
from nnpre.synthetic.study_folders import (
    check_counts,
    check_id,
    check_id_free,
    check_name,
    finish_folder,
    folder_spec,
    prepare_folder,
)
from nnpre.synthetic.writers import CaseLayout, nndet_dataset_json, nnunet_dataset_json, pool_dataset_json

__all__ = ["STREAM_TRAIN", "STREAM_TEST", "STREAM_POOL", "case_rng", "write_nnunet_dataset",
           "write_nndet_dataset", "write_unlabeled_pool", "make_study"]

#: Seed streams: labelled training cases, labelled test cases and unlabelled pool cases.
STREAM_TRAIN, STREAM_TEST, STREAM_POOL = 0, 1, 2

#: (split "Tr"/"Ts", case id, seed stream, index in the stream)
Job = Tuple[str, str, int, int]


def case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Generator of case ``index`` in ``stream`` (train/test/pool); independent of how many cases exist."""
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index))))


def _case_ids(prefix: str, n: int) -> List[str]:
    return [f"{prefix}_{k:04d}" for k in range(n)]


def _generate(layouts: List[CaseLayout], jobs: List[Job], seed: int, cfg: SynthConfig, channels: int,
              progress: bool, desc: str) -> None:
    """Synthesize each job's case once and write it to every layout that lacks it."""
    from tqdm import tqdm

    for split, case_id, stream, index in tqdm(jobs, desc=desc, disable=not progress, unit="case"):
        todo = [lay for lay in layouts if not lay.complete(split, case_id, channels)]
        if not todo:
            continue
        case = synthesize_case(case_rng(seed, stream, index), cfg, channels)
        for lay in todo:
            lay.write(split, case_id, case)


def _labelled_jobs(n_train: int, n_test: int) -> List[Job]:
    return ([("Tr", cid, STREAM_TRAIN, k) for k, cid in enumerate(_case_ids("train", n_train))]
            + [("Ts", cid, STREAM_TEST, k) for k, cid in enumerate(_case_ids("test", n_test))])


def _resolve_cfg(config: Optional[SynthConfig], lung_label: bool) -> SynthConfig:
    cfg = config or SynthConfig()
    if lung_label and not cfg.lung_label:
        cfg = dataclasses.replace(cfg, lung_label=True)
    return cfg


def _labelled(out_raw: Optional[str], nndet_root: Optional[str], dataset_id: int, name: str, n_train: int,
              n_test: int, seed: int, cfg: SynthConfig, channels: int, overwrite: bool,
              progress: bool) -> Dict[str, str]:
    """Write the labelled cases into the nnU-Net and/or nnDetection layout; {"nnunet"/"nndet": folder}."""
    check_id(dataset_id)
    check_name(name)
    check_counts(n_train=n_train, n_test=n_test)
    if n_train < 1:
        fail("n_train must be >= 1 for a labelled dataset")
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    targets = []
    if out_raw is not None:
        folder = os.path.join(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}_{name}")
        check_id_free(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}", os.path.basename(folder))
        targets.append((folder, "nnunet"))
    if nndet_root is not None:
        task = f"Task{int(dataset_id):03d}_{name}"
        folder = os.path.join(os.fspath(nndet_root), task)
        check_id_free(os.fspath(nndet_root), f"Task{int(dataset_id):03d}", task)
        targets.append((folder, "nndet"))
    done, todo = {}, []
    for folder, kind in targets:
        spec = folder_spec(kind, dataset_id, name, seed, cfg, channels, n_train=n_train, n_test=n_test)
        done[kind] = folder
        if not prepare_folder(folder, spec, overwrite):
            todo.append((CaseLayout(folder, kind, cfg.compression_level, cfg.file_dtype), spec))
    if todo:
        _generate([lay for lay, _ in todo], _labelled_jobs(n_train, n_test), seed, cfg, channels, progress,
                  f"Dataset{int(dataset_id):03d}_{name}")
        for lay, spec in todo:
            if lay.kind == "nnunet":
                ds = nnunet_dataset_json(cfg, channels, n_train, name)
            else:
                ds = nndet_dataset_json(os.path.basename(lay.folder), name, channels)
            write_json(ds, os.path.join(lay.folder, "dataset.json"))
            finish_folder(lay.folder, spec)
    return done


def write_nnunet_dataset(out_raw: str, dataset_id: int, name: str, n_train: int, n_test: int, seed: int,
                         config: Optional[SynthConfig] = None, channels: int = 1, lung_label: bool = False,
                         *, overwrite: bool = False, progress: bool = False) -> str:
    """Write a labelled nnU-Net v2 raw dataset of synthetic cases.

    Layout: ``out_raw/DatasetXXX_name/{imagesTr, labelsTr, imagesTs, labelsTs, dataset.json}``; images
    ``{case}_{channel:04d}.nii.gz``, semantic labels ``{case}.nii.gz`` (uint8: 0 background, 1 lesion,
    2 lung if ``lung_label``). Training cases are ``train_0000..``, test cases ``test_0000..``.

    Args:
        out_raw: the ``nnUNet_raw`` folder.
        dataset_id / name: nnU-Net dataset id (1..999) and name (letters, digits, ``_``, ``-``).
        n_train / n_test: number of labelled training and test cases.
        seed: dataset seed; case k of a split is the same for any n_train/n_test.
        config: generator knobs (default ``SynthConfig()``); ``lung_label=True`` switches on the lung label.
        channels: 1 (``{"0": "CT"}``) or 2 (``{"0": "CT", "1": "CT2"}``).
        overwrite: replace an existing folder generated with other settings (otherwise an error).
        progress: show a tqdm progress bar.

    Returns:
        The dataset folder. An existing folder generated with identical settings is reused as is.
    """
    cfg = _resolve_cfg(config, lung_label)
    return _labelled(out_raw, None, dataset_id, name, n_train, n_test, seed, cfg, channels, overwrite,
                     progress)["nnunet"]


def write_nndet_dataset(out_root: str, task_id: int, name: str, n_train: int, n_test: int, seed: int,
                        config: Optional[SynthConfig] = None, channels: int = 1, *, overwrite: bool = False,
                        progress: bool = False) -> str:
    """Write the same labelled cases (same ids and images as :func:`write_nnunet_dataset`) for nnDetection.

    Layout: ``out_root/TaskXXX_name/raw_splitted/{imagesTr, labelsTr, imagesTs, labelsTs}`` with instance
    maps ``{case}.nii.gz`` (int16, 0 background, 1..N consecutive) and ``{case}.json`` =
    ``{"instances": {"1": 0, ...}}`` (class 0 = lesion), plus ``TaskXXX_name/dataset.json`` (task, name,
    dim 3, labels ``{"0": "lesion"}``, modalities, test_labels).

    Returns:
        The task folder ``out_root/TaskXXX_name``.
    """
    cfg = _resolve_cfg(config, False)
    return _labelled(None, out_root, task_id, name, n_train, n_test, seed, cfg, channels, overwrite,
                     progress)["nndet"]


def write_unlabeled_pool(out_raw: str, dataset_id: int, name: str, n_cases: int, seed: int,
                         config: Optional[SynthConfig] = None, channels: int = 1, *, overwrite: bool = False,
                         progress: bool = False) -> str:
    """Write an unlabelled pretraining pool as an nnU-Net raw folder with ``imagesTr`` only (no labels).

    ``dataset.json`` has ``channel_names``, ``labels = {"background": 0}``, ``numTraining``, ``file_ending``
    and ``"nnpre_unlabeled": true``. Cases ``pool_0000..`` come from their own seed stream, so they never
    repeat a labelled case of the same seed. ``channels=2`` adds the second contrast (channel "CT2").

    Returns:
        The dataset folder.
    """
    check_id(dataset_id)
    check_name(name)
    check_counts(n_cases=n_cases)
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    cfg = config or SynthConfig()
    folder = os.path.join(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}_{name}")
    check_id_free(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}", os.path.basename(folder))
    spec = folder_spec("pool", dataset_id, name, seed, cfg, channels, n_cases=n_cases)
    if prepare_folder(folder, spec, overwrite):
        return folder
    lay = CaseLayout(folder, "pool", cfg.compression_level, cfg.file_dtype)
    jobs = [("Tr", cid, STREAM_POOL, k) for k, cid in enumerate(_case_ids("pool", n_cases))]
    _generate([lay], jobs, seed, cfg, channels, progress, f"Dataset{int(dataset_id):03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    write_json(pool_dataset_json(name, channels, n_cases), os.path.join(folder, "dataset.json"))
    finish_folder(folder, spec)
    return folder


def make_study(root: str, seed: int = 0, n_train: int = 10, n_test: int = 6, n_pool: int = 16,
               labelled_id: int = 501, pool_id: int = 502, pool_channels: int = 1,
               config: Optional[SynthConfig] = None, *, labelled_name: str = "SynthLesions",
               pool_name: str = "SynthPool", overwrite: bool = False, progress: bool = False) -> dict:
    """Write the demo study: labelled nnU-Net dataset, its nnDetection copy and the unlabelled pool.

    Each labelled case is synthesised once and written in both formats.

    Returns:
        ``{"root", "nnUNet_raw", "nndet_raw", "labelled", "nndet", "pool" (None if n_pool == 0),
        "labelled_id", "pool_id", "seed"}``.
    """
    cfg = config or SynthConfig()
    if n_pool > 0 and pool_id == labelled_id:
        fail(f"pool_id and labelled_id must differ (both {pool_id})")
    raw = os.path.join(os.fspath(root), "nnUNet_raw")
    det = os.path.join(os.fspath(root), "nndet_raw")
    done = _labelled(raw, det, labelled_id, labelled_name, n_train, n_test, seed, cfg, 1, overwrite, progress)
    pool = None
    if n_pool > 0:
        pool = write_unlabeled_pool(raw, pool_id, pool_name, n_pool, seed, cfg, pool_channels,
                                    overwrite=overwrite, progress=progress)
    return {"root": os.fspath(root), "nnUNet_raw": raw, "nndet_raw": det, "labelled": done["nnunet"],
            "nndet": done["nndet"], "pool": pool, "labelled_id": int(labelled_id), "pool_id": int(pool_id),
            "seed": int(seed)}
