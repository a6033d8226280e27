"""Tests for the synthetic CT lesion generator and its dataset writers (small 48-64 mm FOVs for speed)."""
import dataclasses
import json
import os

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnpre.errors import NnPreError
from nnpre.synthetic import (
    STREAM_POOL,
    STREAM_TEST,
    STREAM_TRAIN,
    SYNTH_CALIBRATION,
    SYNTH_PRESETS,
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


def test_same_seed_same_case_and_streams_differ():
    a = synthesize_case(case_rng(7, STREAM_TRAIN, 1), SMALL)
    b = synthesize_case(case_rng(7, STREAM_TRAIN, 1), SMALL)
    for f in ("image", "semantic", "instances"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert (a.spacing, a.origin, a.direction, a.instance_classes) == (b.spacing, b.origin, b.direction,
                                                                      b.instance_classes)
    c = synthesize_case(case_rng(7, STREAM_POOL, 1), SMALL)
    d = synthesize_case(case_rng(8, STREAM_TRAIN, 1), SMALL)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert d.image.shape != a.image.shape or not np.array_equal(d.image, a.image)


def test_case_k_independent_of_number_of_cases(tmp_path):
    small = write_nnunet_dataset(str(tmp_path / "a"), 11, "A", n_train=2, n_test=1, seed=5, config=SMALL)
    large = write_nnunet_dataset(str(tmp_path / "b"), 11, "A", n_train=3, n_test=2, seed=5, config=SMALL)
    for rel in ("imagesTr/train_0001_0000.nii.gz", "labelsTr/train_0001.nii.gz", "imagesTs/test_0000_0000.nii.gz"):
        np.testing.assert_array_equal(_read(os.path.join(small, rel))[1], _read(os.path.join(large, rel))[1])
    # the file is exactly the in-memory case, rounded to int16 HU
    case = synthesize_case(case_rng(5, STREAM_TEST, 1), SMALL)
    on_disk = _read(os.path.join(large, "imagesTs/test_0001_0000.nii.gz"))[1]
    np.testing.assert_array_equal(on_disk, np.rint(case.image[0]).astype(np.int16))


def test_spacing_ranges_shapes_and_variation():
    cfg = SMALL
    cases = [synthesize_case(case_rng(0, STREAM_TRAIN, k), cfg) for k in range(6)]
    for c in cases:
        sx, sy, sz = c.spacing
        assert sx == sy and 0.6 <= sx <= 0.9 and 1.25 <= sz <= 3.0
        assert c.image.shape[1:] == tuple(int(round(48.0 / s)) for s in (sz, sy, sx))
        assert c.image.dtype == np.float32 and c.semantic.dtype == np.uint8 and c.instances.dtype == np.int16
        assert c.semantic.shape == c.instances.shape == c.image.shape[1:]
    assert len({c.spacing for c in cases}) == len(cases)
    assert np.ptp([c.spacing[2] for c in cases]) > 0.3
    assert len({c.origin for c in cases}) == len(cases)


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


def test_easy_preset_is_high_contrast():
    cfg = get_synth_config("easy", fov_mm=64.0)
    stats = [s for k in range(3) for s in _ring_stats(synthesize_case(case_rng(0, STREAM_TRAIN, k), cfg))]
    assert stats and all(d > 3.0 * n for d, n, _, _ in stats)


def test_cpu_level_is_medium_with_lesions_scaled_to_the_2mm_grid():
    medium, cpu = get_synth_config("medium"), get_synth_config("cpu")
    changed = {k for k, v in medium.to_dict().items() if cpu.to_dict()[k] != v}
    assert changed == {"lesion_radius_mm", "n_lesions"}
    radii = [les["radius_mm"] for k in range(6)
             for les in synthesize_case(case_rng(0, STREAM_TRAIN, k), cpu).info["lesions"]]
    assert radii and min(radii) >= 6.0 and max(radii) <= 16.0
    # design intent: the median radius (log-uniform) in 2 mm voxels is within 20 % of the default's in 1 mm voxels
    vox_cpu = np.sqrt(np.prod(cpu.lesion_radius_mm)) / 2.0
    vox_default = np.sqrt(np.prod(get_synth_config("default").lesion_radius_mm)) / 1.0
    assert abs(vox_cpu / vox_default - 1.0) < 0.2


def test_every_difficulty_states_its_calibration():
    assert set(SYNTH_CALIBRATION) == set(SYNTH_PRESETS)


def _ring_stats(case):
    """(lesion mean - surrounding shell mean, noise std, site) for every lesion of ``case``."""
    img, inst = case.image[0], case.instances
    out = []
    sx, sy, sz = case.spacing
    struct = np.ones((3, 3, 3), bool)
    for les in case.info["lesions"]:
        m = inst == les["instance"]
        shell = ndimage.binary_dilation(m, struct, iterations=3) & ~ndimage.binary_dilation(m, struct) & (inst == 0)
        out.append((float(img[m].mean() - np.median(img[shell])), case.info["noise_std_hu"], les["site"], les["kind"]))
    return out


def test_lesion_contrast_includes_low_contrast_and_task_is_not_threshold_separable():
    cfg = SynthConfig(fov_mm=64.0, n_lesions=(3, 5))
    cases = [synthesize_case(case_rng(11, STREAM_TRAIN, k), cfg) for k in range(8)]
    stats = [s for c in cases for s in _ring_stats(c)]
    diffs = np.array([abs(d) for d, _, _, _ in stats])
    noise = np.array([n for _, n, _, _ in stats])
    assert len(stats) >= 15
    assert np.sum(diffs < 1.0 * noise) >= 2  # lesions barely above the per-voxel noise
    assert np.sum(diffs > 5.0 * noise) >= 2  # and clearly visible ones (lung nodules, enhancing)
    assert {k for _, _, _, k in stats} >= {"hypodense", "solid"}
    # No global intensity window separates lesions from the rest: the best "lo < HU < hi" window
    # (chosen with knowledge of the labels) gives a low Dice, so a model must use shape and context.
    img = np.concatenate([c.image[0].ravel() for c in cases])
    les = np.concatenate([(c.instances > 0).ravel() for c in cases])
    edges = np.arange(-1030.0, 1000.0, 20.0)
    h_les = np.histogram(img[les], edges)[0]
    h_all = np.histogram(img, edges)[0]
    c_les = np.concatenate([[0], np.cumsum(h_les)])
    c_all = np.concatenate([[0], np.cumsum(h_all)])
    tp = c_les[None, :] - c_les[:, None]  # [i, j]: voxels in bins i..j-1
    pred = c_all[None, :] - c_all[:, None]
    best = float(np.max(np.where(pred > 0, 2 * tp / np.maximum(pred + les.sum(), 1), 0.0)))
    assert best < 0.3, best


def test_cli_smoke_and_missing_output(tmp_path, monkeypatch, capsys):
    from nnpre.cli.synth import main

    out, det = str(tmp_path / "raw"), str(tmp_path / "det")
    main(["--out", out, "-d", "41", "--n-train", "2", "--n-test", "1", "--n-pool", "1", "--pool-channels", "2",
          "--fov", "48", "--seed", "4", "--lung-label", "--nndet-out", det])
    printed = capsys.readouterr().out.split()
    assert printed == [os.path.join(out, "Dataset041_SynthLesions"), os.path.join(det, "Task041_SynthLesions"),
                       os.path.join(out, "Dataset042_SynthPool")]
    assert json.load(open(os.path.join(printed[0], "dataset.json")))["labels"]["lung"] == 2
    assert len(os.listdir(os.path.join(printed[2], "imagesTr"))) == 2
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--n-train", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nnUNet_raw" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # a different seed into the same folder is refused
        main(["--out", out, "-d", "41", "--n-train", "2", "--n-test", "1", "--n-pool", "0", "--fov", "48"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
