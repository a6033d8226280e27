"""Use an nnssl ``pretrain_data.json`` as a pretraining pool (an image-only nnU-Net raw dataset).

nnssl describes a pretraining collection as one JSON file that mirrors BIDS (nnssl ``readme.md``, "Understanding
and creating the pretrain_data.json file"; dataclasses in ``src/nnssl/data/raw_dataset.py``)::

    {"collection_index": 745, "collection_name": "Dataset745__OpenNeuro",
     "datasets": {"<dataset_index>": {"subjects": {"<subject_id>": {"sessions": {"<session_id>": {
         "images": [{"name": "sub-01_T1w.nii.gz", "modality": "T1w", "image_path": "$nnssl_raw/...",
                     "associated_masks": {...}, "image_info": {...}}, ...]}}}}}}}

Image paths may start with ``$VARIABLE`` (nnssl writes ``$nnssl_raw`` / ``$nnssl_preprocessed``), which is
replaced by that environment variable, as nnssl's ``resolve_relative_paths`` does; relative paths are taken
relative to the JSON file's folder. Every image becomes one single-channel case
``<dataset>__<subject>__<session>__<image stem>`` of ``raw_root/DatasetXXX_<name>`` (symlinked, or converted to
``.nii.gz`` when the collection mixes formats or uses ``.nii``/``.mhd``), with a ``dataset.json`` marked
``nnpre_unlabeled`` so :func:`planners.pipeline.plan_dataset` plans it from the images alone. Associated masks
are not used. The import is staged and renamed into place, like :func:`nnpre.import_folder.import_image_folder`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence

from nnpre.atomic import read_json
from nnpre.errors import fail
from nnpre.import_folder import NATIVE_ENDINGS, check_dataset_id_and_name, image_ending, read_header, write_image_pool

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def resolve_image_path(path: str, json_path: str) -> str:
    """``$VAR/rest`` → ``os.environ[VAR]/rest``; a relative path → relative to the JSON file's folder."""
    if path.startswith("$"):
        var, _, rest = path[1:].partition("/")
        if var not in os.environ:
            fail(f"{json_path}: image path {path} needs the environment variable {var}; export {var}=<folder> "
                 f"(nnssl resolves '$' paths the same way)")
        return os.path.join(os.environ[var], rest)
    if not os.path.isabs(path):
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(json_path)), path))
    return path


def collect_images(json_path: str, modalities: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """``{case_id: {"path", "modality"}}`` of every image in an nnssl ``pretrain_data.json`` (sorted by id).

    Args:
        json_path: the ``pretrain_data.json``.
        modalities: keep only images of these modalities (``None``: all).
    """
    data = read_json(json_path, "nnssl pretrain_data.json")
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        fail(f"{json_path}: not an nnssl pretrain_data.json (expected a 'datasets' object; see nnssl's "
             f"documentation/dataset_format.md)")
    cases: Dict[str, dict] = {}
    for ds_id, ds in data["datasets"].items():
        for sub_id, sub in ((ds or {}).get("subjects") or {}).items():
            for ses_id, ses in ((sub or {}).get("sessions") or {}).items():
                for im in (ses or {}).get("images") or []:
                    if not isinstance(im, dict) or "image_path" not in im:
                        fail(f"{json_path}: an image of {ds_id}/{sub_id}/{ses_id} has no 'image_path'")
                    if modalities and im.get("modality") not in modalities:
                        continue
                    path = resolve_image_path(str(im["image_path"]), json_path)
                    ending = image_ending(path)
                    if ending is None:
                        fail(f"{json_path}: {path} is not a .nii.gz/.nii/.mha/.mhd/.nrrd image")
                    stem = os.path.basename(str(im.get("name") or path))
                    stem = stem[: -len(image_ending(stem) or "")] if image_ending(stem) else stem
                    case = _UNSAFE.sub("_", f"{ds_id}__{sub_id}__{ses_id}__{stem}")
                    if case in cases:
                        fail(f"{json_path}: two images map to case id {case}; give them distinct names")
                    cases[case] = {"path": path, "modality": str(im.get("modality") or "image")}
    if not cases:
        fail(f"{json_path}: no images{' of modality ' + ', '.join(modalities) if modalities else ''} listed")
    return dict(sorted(cases.items()))


def import_nnssl_collection(json_path: str, raw_root: str, dataset_id: int, name: Optional[str] = None,
                            modalities: Optional[Sequence[str]] = None, link: bool = True,
                            check_images: bool = True) -> str:
    """Import an nnssl ``pretrain_data.json`` as ``raw_root/DatasetXXX_<name>`` (see the module doc).

    Args:
        name: dataset name (default: the collection name after nnssl's ``DatasetXXX__`` prefix).
        modalities: only these modalities (e.g. ``["T1w"]``); the channel is named after the modality when
            all kept images share one, else ``"image"``.
        check_images: read every header (3D, single component) before writing anything.

    Returns:
        The dataset folder (an identical earlier import is returned as it is).
    """
    json_path = os.path.abspath(os.fspath(json_path))
    raw_root = os.path.abspath(os.fspath(raw_root))
    cases = collect_images(json_path, modalities)
    if name is None:
        with open(json_path, encoding="utf-8") as f:
            coll = str(json.load(f).get("collection_name") or "nnssl")
        name = re.sub(r"[^A-Za-z0-9_-]", "_", coll.split("__", 1)[-1]).strip("_-") or "nnssl"
    folder_name = check_dataset_id_and_name(dataset_id, name)
    for case, c in cases.items():
        if not os.path.isfile(c["path"]):
            fail(f"{json_path}: image {c['path']} of case {case} does not exist; fix the path or the "
                 f"environment variable it starts with")
        if check_images:
            read_header(c["path"])
    endings = {image_ending(c["path"]) for c in cases.values()}
    out_ending = endings.pop() if len(endings) == 1 and next(iter(endings)) in NATIVE_ENDINGS else ".nii.gz"
    mods: List[str] = sorted({c["modality"] for c in cases.values()})
    channel_names = {"0": mods[0] if len(mods) == 1 else "image"}
    manifest = {"source": json_path, "channel_names": channel_names,
                "cases": {k: os.path.basename(v["path"]) for k, v in cases.items()}}
    return write_image_pool(raw_root, dataset_id, folder_name, name,
                            f"image-only pretraining pool from the nnssl collection {json_path}",
                            {k: [v["path"]] for k, v in cases.items()}, out_ending, channel_names, manifest, link)
