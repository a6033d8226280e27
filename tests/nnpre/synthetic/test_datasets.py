"""Tests for whole synthetic datasets: seeds, nnU-Net / nnDetection / pool layouts, folder reuse (48 mm FOVs)."""
import dataclasses
import json
import os

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre.synthetic import (
    STREAM_TEST,
    STREAM_TRAIN,
    SynthConfig,
    case_rng,
    get_synth_config,
    make_study,
    synthesize_case,
    write_nndet_dataset,
    write_nnunet_dataset,
    write_unlabeled_pool,
)

SMALL = SynthConfig(fov_mm=48.0)


def _read(path):
    img = sitk.ReadImage(path)
    return img, sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = dataclasses.replace(SMALL, lung_label=True, n_lesions=(1, 4))
    return make_study(str(root), seed=3, n_train=3, n_test=2, n_pool=2, pool_channels=2, config=cfg), cfg


def test_case_k_independent_of_number_of_cases(tmp_path):
    small = write_nnunet_dataset(str(tmp_path / "a"), 11, "A", n_train=2, n_test=1, seed=5, config=SMALL)
    large = write_nnunet_dataset(str(tmp_path / "b"), 11, "A", n_train=3, n_test=2, seed=5, config=SMALL)
    for rel in ("imagesTr/train_0001_0000.nii.gz", "labelsTr/train_0001.nii.gz", "imagesTs/test_0000_0000.nii.gz"):
        np.testing.assert_array_equal(_read(os.path.join(small, rel))[1], _read(os.path.join(large, rel))[1])
    # the file is exactly the in-memory case, rounded to int16 HU
    case = synthesize_case(case_rng(5, STREAM_TEST, 1), SMALL)
    on_disk = _read(os.path.join(large, "imagesTs/test_0001_0000.nii.gz"))[1]
    np.testing.assert_array_equal(on_disk, np.rint(case.image[0]).astype(np.int16))


def test_image_label_geometry_identical(study):
    paths, _ = study
    for split in ("Tr", "Ts"):
        for f in sorted(os.listdir(os.path.join(paths["labelled"], f"labels{split}"))):
            cid = f[: -len(".nii.gz")]
            lab = sitk.ReadImage(os.path.join(paths["labelled"], f"labels{split}", f))
            for ch in (0,):
                img = sitk.ReadImage(os.path.join(paths["labelled"], f"images{split}", f"{cid}_{ch:04d}.nii.gz"))
                assert img.GetSize() == lab.GetSize()
                assert img.GetSpacing() == lab.GetSpacing()
                assert img.GetOrigin() == lab.GetOrigin()
                assert img.GetDirection() == lab.GetDirection()
                assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8


def test_flipped_direction_shared_by_labels(tmp_path):
    cfg = dataclasses.replace(SMALL, flip_direction_prob=1.0, n_lesions=(1, 2))
    folder = write_nnunet_dataset(str(tmp_path), 12, "Flip", n_train=1, n_test=0, seed=1, config=cfg)
    img = sitk.ReadImage(os.path.join(folder, "imagesTr", "train_0000_0000.nii.gz"))
    lab = sitk.ReadImage(os.path.join(folder, "labelsTr", "train_0000.nii.gz"))
    assert np.allclose(img.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert img.GetDirection() == lab.GetDirection() and img.GetOrigin() == lab.GetOrigin()


def test_stock_verify_dataset_integrity_passes(study):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    paths, _ = study
    verify_dataset_integrity(paths["labelled"], num_processes=1)  # raises on any problem
    ds = json.load(open(os.path.join(paths["labelled"], "dataset.json")))
    assert ds["labels"] == {"background": 0, "lesion": 1, "lung": 2}
    assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    labels = set()
    for f in os.listdir(os.path.join(paths["labelled"], "labelsTr")):
        labels |= set(np.unique(_read(os.path.join(paths["labelled"], "labelsTr", f))[1]).tolist())
    assert labels == {0, 1, 2}


def test_nndet_copy_matches_instances_and_nnunet(study):
    paths, _ = study
    raw = os.path.join(paths["nndet"], "raw_splitted")
    ds = json.load(open(os.path.join(paths["nndet"], "dataset.json")))
    assert ds["task"] == "Task501_SynthLesions" and ds["dim"] == 3 and ds["labels"] == {"0": "lesion"}
    assert ds["modalities"] == {"0": "CT"}
    n_instances = 0
    for split in ("Tr", "Ts"):
        ids = sorted(f[: -len(".json")] for f in os.listdir(os.path.join(raw, f"labels{split}")) if f.endswith(".json"))
        nnu_ids = sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(paths["labelled"], f"labels{split}")))
        assert ids == nnu_ids and len(ids) == (3 if split == "Tr" else 2)
        for cid in ids:
            inst = _read(os.path.join(raw, f"labels{split}", f"{cid}.nii.gz"))[1]
            meta = json.load(open(os.path.join(raw, f"labels{split}", f"{cid}.json")))
            n = int(inst.max())
            n_instances += n
            assert sorted(np.unique(inst).tolist()) == list(range(n + 1))  # consecutive, each non-empty
            assert meta == {"instances": {str(i): 0 for i in range(1, n + 1)}}
            # every instance is exactly one 26-connected component of the lesion mask
            cc, n_cc = cc3d.connected_components(inst > 0, connectivity=26, return_N=True)
            assert n_cc == n
            for i in range(1, n + 1):
                assert len(np.unique(cc[inst == i])) == 1
            sem = _read(os.path.join(paths["labelled"], f"labels{split}", f"{cid}.nii.gz"))[1]
            np.testing.assert_array_equal(sem == 1, inst > 0)  # instances are exactly the lesion label
            a = _read(os.path.join(raw, f"images{split}", f"{cid}_0000.nii.gz"))[1]
            b = _read(os.path.join(paths["labelled"], f"images{split}", f"{cid}_0000.nii.gz"))[1]
            np.testing.assert_array_equal(a, b)
    assert n_instances >= 5


def test_pool_has_no_labels_and_two_channels(study):
    paths, _ = study
    pool = paths["pool"]
    assert not os.path.exists(os.path.join(pool, "labelsTr"))
    ds = json.load(open(os.path.join(pool, "dataset.json")))
    assert ds["nnpre_unlabeled"] is True and ds["labels"] == {"background": 0}
    assert ds["channel_names"] == {"0": "CT", "1": "CT2"} and ds["numTraining"] == 2
    files = sorted(os.listdir(os.path.join(pool, "imagesTr")))
    assert files == ["pool_0000_0000.nii.gz", "pool_0000_0001.nii.gz", "pool_0001_0000.nii.gz",
                     "pool_0001_0001.nii.gz"]
    c0, a0 = _read(os.path.join(pool, "imagesTr", files[0]))
    c1, a1 = _read(os.path.join(pool, "imagesTr", files[1]))
    assert c0.GetSize() == c1.GetSize() and c0.GetOrigin() == c1.GetOrigin()
    assert abs(np.corrcoef(a0.ravel(), a1.ravel())[0, 1]) > 0.8  # same anatomy ...
    assert not np.array_equal(a0, a1)  # ... different contrast
    train0 = _read(os.path.join(paths["labelled"], "imagesTr", "train_0000_0000.nii.gz"))[1]
    assert train0.shape != a0.shape or not np.array_equal(train0, a0)  # separate seed stream


def test_existing_folder_reused_refused_or_overwritten(tmp_path):
    out = str(tmp_path)
    folder = write_nnunet_dataset(out, 21, "R", n_train=2, n_test=0, seed=1, config=SMALL)
    f = os.path.join(folder, "imagesTr", "train_0001_0000.nii.gz")
    before = _read(f)[1]
    mtime = os.path.getmtime(f)
    assert write_nnunet_dataset(out, 21, "R", n_train=2, n_test=0, seed=1, config=SMALL) == folder
    assert os.path.getmtime(f) == mtime  # identical settings: reused, nothing rewritten
    with pytest.raises(NnPreError, match="--overwrite"):
        write_nnunet_dataset(out, 21, "R", n_train=2, n_test=0, seed=2, config=SMALL)
    with pytest.raises(NnPreError, match="already used"):
        write_nnunet_dataset(out, 21, "Other", n_train=2, n_test=0, seed=1, config=SMALL)
    # an interrupted run (a file missing, marker not complete) is completed identically
    os.remove(f)
    marker = os.path.join(folder, "nnpre_synth.json")
    m = json.load(open(marker))
    m["complete"] = False
    json.dump(m, open(marker, "w"))
    write_nnunet_dataset(out, 21, "R", n_train=2, n_test=0, seed=1, config=SMALL)
    np.testing.assert_array_equal(_read(f)[1], before)
    write_nnunet_dataset(out, 21, "R", n_train=2, n_test=0, seed=2, config=SMALL, overwrite=True)
    assert not np.array_equal(_read(f)[1], before) or _read(f)[1].shape != before.shape
    # a folder not made by the generator is never touched
    os.makedirs(os.path.join(out, "Dataset022_Foreign"))
    open(os.path.join(out, "Dataset022_Foreign", "keep.txt"), "w").close()
    with pytest.raises(NnPreError, match="not generated"):
        write_unlabeled_pool(out, 22, "Foreign", 1, seed=0, config=SMALL)
    assert os.path.isfile(os.path.join(out, "Dataset022_Foreign", "keep.txt"))


def test_zero_lesion_cases_and_bad_config(tmp_path):
    cfg = dataclasses.replace(SMALL, n_lesions=(0, 0))
    c = synthesize_case(case_rng(0, STREAM_TRAIN, 0), cfg)
    assert c.instance_classes == {} and not c.instances.any() and not (c.semantic == 1).any()
    task = write_nndet_dataset(str(tmp_path), 31, "Empty", n_train=1, n_test=0, seed=0, config=cfg)
    assert json.load(open(os.path.join(task, "raw_splitted", "labelsTr", "train_0000.json"))) == {"instances": {}}
    with pytest.raises(NnPreError, match="n_lesions"):
        SynthConfig(n_lesions=(3, 1))
    with pytest.raises(NnPreError, match="name"):
        write_nnunet_dataset(str(tmp_path), 32, "bad.name", 1, 0, seed=0, config=SMALL)
    with pytest.raises(NnPreError, match="difficulty"):
        get_synth_config("impossible")
