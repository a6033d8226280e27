"""Convert an nnDetection raw task (e.g. LUNA16 prepared for nnDetection) into an nnU-Net raw dataset.

nnDetection layout (input)::

    TaskXXX_Name/
        dataset.json | dataset.yaml     labels {"0": "nodule", ...}, modalities {"0": "CT", ...}
        raw_splitted/
            imagesTr/<case>_0000.nii.gz  (one file per modality)
            labelsTr/<case>.nii.gz       instance map: 0 background, 1..N objects
            labelsTr/<case>.json         {"instances": {"1": 0, "2": 0}}: instance id -> class index (from 0)
            imagesTs/, labelsTs/         optional test split, same layout

nnU-Net layout (output): ``DatasetXXX_Name/{imagesTr, labelsTr, imagesTs, labelsTs, dataset.json}`` with
*semantic* labels: voxel value = class index + 1 (0 stays background), ``labels`` =
``{"background": 0, "<class 0 name>": 1, ...}``, ``channel_names`` from ``modalities``. Images are
symlinked (or copied with ``link=False``); the test labels are converted too.

Instances do not survive as ids: the detection trainer (and the evaluation of nnU-Net labels) re-derives
objects as connected components per class, so two *touching* instances of the same class become one
object. Evaluate against the original nnDetection labels (``raw_splitted/labelsTs``) to score every
instance as nnDetection does.

Problems (missing JSON, an instance without a class, a class outside ``labels``, image/label size
mismatch, ...) raise :class:`nnpre.errors.NnPreError` naming the file. Importing the same task again under
the same dataset id returns the existing folder (recorded in ``dataset.json["nnpre_nndet_import"]``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import numpy as np

from nnpre.atomic import write_json
from nnpre.errors import fail
from nnpre.import_folder import check_dataset_id_and_name, existing_dataset, place_file, read_header, staging_folder

#: nnDetection's image naming: ``<case>_<modality:04d>.nii.gz``.
NNDET_IMAGE_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})\.nii\.gz$")
FILE_ENDING = ".nii.gz"
TASK_RE = re.compile(r"^Task(?P<id>\d+)_(?P<name>.+)$")


def load_nndet_dataset_file(task_dir: str) -> dict:
    """``{"labels": {int: name}, "modalities": {int: name}, "path": file}`` from the task's dataset.json/yaml."""
    path = None
    for n in ("dataset.json", "dataset.yaml", "dataset.yml"):
        if os.path.isfile(os.path.join(task_dir, n)):
            path = os.path.join(task_dir, n)
            break
    if path is None:
        fail(f"{os.path.join(task_dir, 'dataset.json')} (or dataset.yaml) is missing; nnDetection tasks need one "
             f"with \"labels\" (e.g. {{\"0\": \"nodule\"}}) and \"modalities\" (e.g. {{\"0\": \"CT\"}})")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                meta = json.load(f)
            else:
                import yaml

                meta = yaml.safe_load(f)
    except ImportError:
        fail(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or convert the file to dataset.json")
    except Exception as e:  # JSON / YAML syntax errors of either parser
        first = str(e).splitlines()[0] if str(e) else ""
        fail(f"{path} cannot be parsed ({type(e).__name__}: {first}); fix the syntax")
    out = {"path": path}
    for key, example in (("labels", '{"0": "nodule"}'), ("modalities", '{"0": "CT"}')):
        v = meta.get(key) if isinstance(meta, dict) else None
        try:
            d = {int(k): str(n) for k, n in v.items()}
        except (AttributeError, TypeError, ValueError):
            fail(f"{path}: \"{key}\" must map 0, 1, ... to names, e.g. {example}; got {v!r}")
        if not d or sorted(d) != list(range(len(d))):
            fail(f"{path}: \"{key}\" must be numbered 0..N-1, e.g. {example}; got {v!r}")
        out[key] = d
    return out


def _cases(images_dir: str, num_channels: int) -> Dict[str, List[str]]:
    cases: Dict[str, Dict[int, str]] = {}
    for fn in sorted(os.listdir(images_dir)):
        m = NNDET_IMAGE_RE.match(fn)
        if m:
            cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = os.path.join(images_dir, fn)
    out = {}
    for case, chans in cases.items():
        for c in range(num_channels):
            if c not in chans:
                fail(f"{os.path.join(images_dir, f'{case}_{c:04d}{FILE_ENDING}')} is missing (dataset file declares "
                     f"{num_channels} modalities); add it or remove the case")
        extra = sorted(set(chans) - set(range(num_channels)))
        if extra:
            fail(f"{chans[extra[0]]}: modality {extra[0]} is not declared in the dataset file "
                 f"({num_channels} modalities); remove the file or add the modality")
        out[case] = [chans[c] for c in range(num_channels)]
    return out


def convert_label(label_file: str, image_file: str, out_file: str, num_classes: int) -> Dict[str, int]:
    """Write the semantic label (class + 1) of one nnDetection instance map; returns ``{"objects", "voxels"}``."""
    import SimpleITK as sitk

    from nnpre_detection.instances import load_nndet_label

    instances, mapping, image = load_nndet_label(label_file)
    json_file = label_file[: -len(FILE_ENDING)] + ".json"
    if instances.size and instances.min() < 0:
        fail(f"{label_file}: instance map holds negative values; instance ids must be 0 (background) or positive")
    present = [int(i) for i in np.unique(instances) if i != 0]
    missing = [i for i in present if i not in mapping]
    if missing:
        fail(f"{label_file}: instance id(s) {missing} have no class in {json_file}; add them to \"instances\"")
    bad = sorted({c for i, c in mapping.items() if i in present and c >= num_classes})
    if bad:
        fail(f"{json_file}: class index(es) {bad} not in the dataset file's labels (0..{num_classes - 1}); fix the "
             f"class or add the label")
    img_size, _ = read_header(image_file)
    if tuple(image.GetSize()) != tuple(img_size):
        fail(f"{label_file} has size {tuple(image.GetSize())} but its image {image_file} has {tuple(img_size)}; "
             f"labels must be on the image grid")
    lut = np.zeros(int(instances.max()) + 1 if instances.size else 1, dtype=np.uint16)
    for i in present:
        lut[i] = mapping[i] + 1
    semantic = lut[instances]
    semantic = semantic.astype(np.uint8 if num_classes < 255 else np.uint16)
    out = sitk.GetImageFromArray(semantic)
    out.CopyInformation(image)
    sitk.WriteImage(out, out_file, True)
    return {"objects": len(present), "voxels": int((semantic > 0).sum())}


def import_nndet_task(task_dir: str, raw_root: str, dataset_id: Optional[int] = None, name: Optional[str] = None,
                      link: bool = True) -> str:
    """Convert the nnDetection task ``task_dir`` into ``raw_root/DatasetXXX_<name>`` (see the module doc).

    Args:
        task_dir: the ``TaskXXX_Name`` folder (containing ``raw_splitted``).
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset id (default: the task number XXX).
        name: dataset name (default: the task name).
        link: symlink the images (default) instead of copying them.

    Returns:
        The dataset folder.
    """
    task_dir = os.path.abspath(os.fspath(task_dir))
    raw_root = os.path.abspath(os.fspath(raw_root))
    if not os.path.isdir(task_dir):
        fail(f"nnDetection task folder {task_dir} does not exist")
    m = TASK_RE.match(os.path.basename(task_dir.rstrip(os.sep)))
    if dataset_id is None:
        if not m:
            fail(f"{task_dir} is not named TaskXXX_Name; pass the dataset id explicitly")
        dataset_id = int(m.group("id"))
    if name is None:
        name = m.group("name") if m else os.path.basename(task_dir)
    folder_name = check_dataset_id_and_name(dataset_id, name)
    meta = load_nndet_dataset_file(task_dir)
    classes, modalities = meta["labels"], meta["modalities"]
    splitted = os.path.join(task_dir, "raw_splitted")
    splits = {}
    for split in ("Tr", "Ts"):
        images_dir, labels_dir = os.path.join(splitted, f"images{split}"), os.path.join(splitted, f"labels{split}")
        if not os.path.isdir(images_dir):
            if split == "Tr":
                fail(f"{images_dir} is missing; nnDetection tasks keep training images in raw_splitted/imagesTr")
            continue
        cases = _cases(images_dir, len(modalities))
        if split == "Tr" and not cases:
            fail(f"{images_dir} holds no images named CASE_0000{FILE_ENDING}")
        labels = {}
        label_files = (sorted(f for f in os.listdir(labels_dir) if f.endswith(FILE_ENDING))
                       if os.path.isdir(labels_dir) else [])
        if split == "Tr" or label_files:
            for case in cases:
                lab = os.path.join(labels_dir, case + FILE_ENDING)
                if not os.path.isfile(lab):
                    fail(f"label {lab} is missing for image {cases[case][0]}; add it (instance map + {case}.json) or "
                         f"remove the case")
                labels[case] = lab
            orphans = [f for f in label_files if f[: -len(FILE_ENDING)] not in cases]
            if orphans:
                fail(f"{os.path.join(labels_dir, orphans[0])} has no image {orphans[0][: -len(FILE_ENDING)]}_0000"
                     f"{FILE_ENDING} in {images_dir}; add the image or remove the label")
        splits[split] = (cases, labels)

    label_names: Dict[str, int] = {"background": 0}
    for k in sorted(classes):
        n = classes[k] if classes[k] not in label_names else f"{classes[k]}_{k}"
        label_names[n] = k + 1
    channel_names = {str(k): v for k, v in sorted(modalities.items())}
    manifest = {"source": task_dir, "classes": {str(k): v for k, v in sorted(classes.items())},
                "channel_names": channel_names,
                "cases": {s: sorted(c) for s, (c, _) in splits.items()},
                "test_labels": bool(splits.get("Ts", ({}, {}))[1])}
    done = existing_dataset(raw_root, dataset_id, folder_name, manifest, key="nnpre_nndet_import")
    if done:
        return done
    final = os.path.join(raw_root, folder_name)
    with staging_folder(final) as tmp:
        for split, (cases, labels) in splits.items():
            os.makedirs(os.path.join(tmp, f"images{split}"))
            for case, files in cases.items():
                for c, f in enumerate(files):
                    place_file(f, os.path.join(tmp, f"images{split}", f"{case}_{c:04d}{FILE_ENDING}"), link)
            if labels:
                os.makedirs(os.path.join(tmp, f"labels{split}"))
                for case, lab in labels.items():
                    convert_label(lab, cases[case][0], os.path.join(tmp, f"labels{split}", case + FILE_ENDING),
                                  len(classes))
        write_json({"name": name,
                    "description": f"converted from the nnDetection task {task_dir} (semantic label = class + 1)",
                    "channel_names": channel_names, "labels": label_names,
                    "numTraining": len(splits["Tr"][0]), "file_ending": FILE_ENDING,
                    "nnpre_nndet_import": manifest}, os.path.join(tmp, "dataset.json"))
    return final
