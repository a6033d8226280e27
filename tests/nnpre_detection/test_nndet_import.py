"""nnpre_detection.nndet_import: nnDetection raw task -> nnU-Net raw dataset with semantic labels."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre_detection.nndet_import import import_nndet_task

SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-10.0, 5.0, 30.0)


def _write(arr, path):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(SPACING)
    im.SetOrigin(ORIGIN)
    sitk.WriteImage(im, str(path))


def _task(root, name="Task042_Nodules", dataset_file="json", classes=("nodule", "mass")):
    """Two training cases and one test case; instances 1 (class 0) and 2 (class 1); case tr1 has two touching
    class-0 instances (ids 1 and 3)."""
    task = root / name
    rs = task / "raw_splitted"
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (rs / d).mkdir(parents=True)
    labels = {str(i): n for i, n in enumerate(classes)}
    if dataset_file == "json":
        (task / "dataset.json").write_text(json.dumps({"task": name, "labels": labels, "modalities": {"0": "CT"},
                                                       "dim": 3}))
    else:
        (task / "dataset.yaml").write_text("task: " + name + "\nlabels:\n" + "".join(
            f"  \"{k}\": {v}\n" for k, v in labels.items()) + "modalities:\n  \"0\": CT\n")
    rng = np.random.default_rng(0)
    for split, case in (("Tr", "tr0"), ("Tr", "tr1"), ("Ts", "ts0")):
        inst = np.zeros((6, 10, 12), np.int16)
        inst[1:3, 1:4, 1:4] = 1
        inst[3:5, 5:9, 6:11] = 2
        mapping = {"1": 0, "2": 1}
        if case == "tr1":
            inst[1:3, 1:4, 4:6] = 3  # touches instance 1
            mapping["3"] = 0
        _write(rng.normal(0, 1, inst.shape).astype(np.float32), rs / f"images{split}" / f"{case}_0000.nii.gz")
        _write(inst, rs / f"labels{split}" / f"{case}.nii.gz")
        (rs / f"labels{split}" / f"{case}.json").write_text(json.dumps({"instances": mapping}))
    return task


def test_convert_semantic_labels_and_reimport(tmp_path):
    task = _task(tmp_path)
    raw = tmp_path / "raw"
    folder = import_nndet_task(str(task), str(raw))
    assert os.path.basename(folder) == "Dataset042_Nodules"  # id and name from the task folder
    dj = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dj["labels"] == {"background": 0, "nodule": 1, "mass": 2}
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == ["tr0_0000.nii.gz", "tr1_0000.nii.gz"]
    assert os.listdir(os.path.join(folder, "imagesTs")) == ["ts0_0000.nii.gz"]
    assert os.path.islink(os.path.join(folder, "imagesTs", "ts0_0000.nii.gz"))
    for split, case in (("Tr", "tr0"), ("Tr", "tr1"), ("Ts", "ts0")):
        inst_img = sitk.ReadImage(str(task / "raw_splitted" / f"labels{split}" / f"{case}.nii.gz"))
        inst = sitk.GetArrayFromImage(inst_img)
        mapping = {int(k): v for k, v in json.loads(
            (task / "raw_splitted" / f"labels{split}" / f"{case}.json").read_text())["instances"].items()}
        sem_img = sitk.ReadImage(os.path.join(folder, f"labels{split}", f"{case}.nii.gz"))
        sem = sitk.GetArrayFromImage(sem_img)
        expected = np.zeros_like(sem)
        for i, c in mapping.items():
            expected[inst == i] = c + 1  # label = class + 1
        assert np.array_equal(sem, expected) and sem.dtype == np.uint8
        assert np.allclose(sem_img.GetSpacing(), SPACING) and np.allclose(sem_img.GetOrigin(), ORIGIN)
    # the two touching class-0 instances of tr1 are one region of label 1 now (documented merge)
    sem = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "tr1.nii.gz")))
    assert set(np.unique(sem[1:3, 1:4, 1:6])) == {1}

    from nnpre.dataset_checks import check_raw_dataset

    assert check_raw_dataset(folder).labelled  # nnpre's planner validation accepts the result
    assert import_nndet_task(str(task), str(raw)) == folder  # same task again: reused
    with pytest.raises(NnPreError, match="dataset id 42 already exists"):
        import_nndet_task(str(_task(tmp_path / "other", "Task042_Other")), str(raw))


def test_yaml_dataset_file_explicit_id_and_copy(tmp_path):
    task = _task(tmp_path, "Luna16", dataset_file="yaml", classes=("nodule",))
    # only class 0 exists in this task: make every instance class 0
    for p in (task / "raw_splitted").glob("labels*/*.json"):
        p.write_text(json.dumps({"instances": {k: 0 for k in json.loads(p.read_text())["instances"]}}))
    folder = import_nndet_task(str(task), str(tmp_path / "raw"), 16, link=False)
    assert os.path.basename(folder) == "Dataset016_Luna16"
    assert not os.path.islink(os.path.join(folder, "imagesTr", "tr0_0000.nii.gz"))
    dj = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dj["labels"] == {"background": 0, "nodule": 1}
    sem = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTs", "ts0.nii.gz")))
    assert set(np.unique(sem)) == {0, 1}


def test_errors_name_the_file(tmp_path):
    raw = str(tmp_path / "raw")

    def fresh(name):
        return _task(tmp_path / name, f"Task001_{name}")

    t = fresh("nojson")
    os.remove(t / "raw_splitted" / "labelsTr" / "tr1.json")
    with pytest.raises(NnPreError, match=r"tr1\.nii\.gz: missing instance->class file .*tr1\.json"):
        import_nndet_task(str(t), raw)

    t = fresh("unmapped")
    (t / "raw_splitted" / "labelsTr" / "tr1.json").write_text(json.dumps({"instances": {"1": 0, "2": 1}}))
    with pytest.raises(NnPreError, match=r"tr1\.nii\.gz: instance id\(s\) \[3\] have no class in .*tr1\.json"):
        import_nndet_task(str(t), raw)

    t = fresh("badclass")
    (t / "raw_splitted" / "labelsTr" / "tr0.json").write_text(json.dumps({"instances": {"1": 0, "2": 5}}))
    with pytest.raises(NnPreError, match=r"tr0\.json: class index\(es\) \[5\] not in the dataset file"):
        import_nndet_task(str(t), raw)

    t = fresh("shape")
    _write(np.zeros((6, 10, 11), np.int16), t / "raw_splitted" / "labelsTs" / "ts0.nii.gz")
    with pytest.raises(NnPreError, match=r"labelsTs.ts0\.nii\.gz has size \(11, 10, 6\) but its image .*ts0_0000"):
        import_nndet_task(str(t), raw)

    t = fresh("nolabel")
    os.remove(t / "raw_splitted" / "labelsTr" / "tr0.nii.gz")
    with pytest.raises(NnPreError, match=r"label .*labelsTr.tr0\.nii\.gz is missing"):
        import_nndet_task(str(t), raw)

    t = fresh("nodataset")
    os.remove(t / "dataset.json")
    with pytest.raises(NnPreError, match=r"dataset\.json \(or dataset\.yaml\) is missing"):
        import_nndet_task(str(t), raw)

    t = fresh("badlabels")
    (t / "dataset.json").write_text(json.dumps({"labels": {"1": "nodule"}, "modalities": {"0": "CT"}}))
    with pytest.raises(NnPreError, match=r"\"labels\" must be numbered 0\.\.N-1"):
        import_nndet_task(str(t), raw)

    t = fresh("channels")
    (t / "dataset.json").write_text(json.dumps({"labels": {"0": "a", "1": "b"}, "modalities": {"0": "CT", "1": "PET"}}))
    with pytest.raises(NnPreError, match=r"tr0_0001\.nii\.gz is missing"):
        import_nndet_task(str(t), raw)

    with pytest.raises(NnPreError, match="not named TaskXXX_Name"):
        import_nndet_task(str(_task(tmp_path / "x", "Luna")), raw)
    assert not os.path.isdir(raw) or not os.listdir(raw)  # failed imports leave nothing behind
