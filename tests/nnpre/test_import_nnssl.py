"""An nnssl ``pretrain_data.json`` becomes an image-only raw dataset that nnPre_plan accepts."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnpre.errors import NnPreError
from nnpre.import_nnssl import collect_images, import_nnssl_collection


def _img(path, value=0.0):
    im = sitk.GetImageFromArray(np.full((8, 9, 10), value, np.float32))
    im.SetSpacing((1.0, 1.0, 2.0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(im, str(path))


def _collection(root, images):
    """images: list of (dataset, subject, session, name, modality, image_path as written in the JSON)."""
    ds = {}
    for d, sub, ses, name, mod, path in images:
        sessions = ds.setdefault(d, {"dataset_index": d, "subjects": {}})["subjects"].setdefault(
            sub, {"subject_id": sub, "sessions": {}})["sessions"]
        sessions.setdefault(ses, {"session_id": ses, "images": []})["images"].append(
            {"name": name, "modality": mod, "image_path": path, "associated_masks": {}})
    p = root / "pretrain_data.json"
    p.write_text(json.dumps({"collection_index": 745, "collection_name": "Dataset745__TinyPool", "datasets": ds}))
    return str(p)


def test_collection_with_env_and_relative_paths_imports_one_case_per_image(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("nnssl_raw", str(store))
    _img(store / "ds1/sub-01/ses-1/sub-01_T1w.nii.gz", 1.0)
    _img(store / "ds1/sub-01/ses-1/sub-01_FLAIR.nii.gz", 2.0)
    _img(tmp_path / "rel/sub-02_T1w.nii.gz", 3.0)
    js = _collection(tmp_path, [
        ("ds1", "sub-01", "ses-1", "sub-01_T1w.nii.gz", "T1w", "$nnssl_raw/ds1/sub-01/ses-1/sub-01_T1w.nii.gz"),
        ("ds1", "sub-01", "ses-1", "sub-01_FLAIR.nii.gz", "FLAIR", "$nnssl_raw/ds1/sub-01/ses-1/sub-01_FLAIR.nii.gz"),
        ("ds2", "sub-02", "ses-DEFAULT", "sub-02_T1w.nii.gz", "T1w", "rel/sub-02_T1w.nii.gz"),
    ])
    raw = tmp_path / "raw"
    folder = import_nnssl_collection(js, str(raw), 33, modalities=["T1w"])
    assert os.path.basename(folder) == "Dataset033_TinyPool"
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "T1w"} and dj["numTraining"] == 2 and dj["nnpre_unlabeled"]
    files = sorted(os.listdir(os.path.join(folder, "imagesTr")))
    assert files == ["ds1__sub-01__ses-1__sub-01_T1w_0000.nii.gz", "ds2__sub-02__ses-DEFAULT__sub-02_T1w_0000.nii.gz"]
    got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "imagesTr", files[1])))
    assert np.all(got == 3.0)  # the relative path resolved against the JSON's folder
    assert import_nnssl_collection(js, str(raw), 33, modalities=["T1w"]) == folder  # same import again: reused
    assert len(collect_images(js)) == 3


def test_bad_collections_fail_with_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("nnssl_raw", raising=False)
    js = _collection(tmp_path, [("d", "s", "1", "a.nii.gz", "CT", "$nnssl_raw/a.nii.gz")])
    with pytest.raises(NnPreError, match="needs the environment variable nnssl_raw"):
        collect_images(js)
    js = _collection(tmp_path, [("d", "s", "1", "a.nii.gz", "CT", "missing/a.nii.gz")])
    with pytest.raises(NnPreError, match="does not exist"):
        import_nnssl_collection(js, str(tmp_path / "raw"), 34)
    assert not (tmp_path / "raw" / "Dataset034_TinyPool").exists()
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(NnPreError, match="not an nnssl pretrain_data.json"):
        collect_images(str(tmp_path / "x.json"))
