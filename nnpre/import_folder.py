"""Turn a plain folder of images into an image-only nnU-Net raw dataset (a pretraining pool).

Input: one file per case (``scan_a.nii.gz``, ``scan_b.nii.gz``, ...) or, with ``channel_suffixes``, one file
per case and channel (``scan_a_t1.nii.gz`` + ``scan_a_t2.nii.gz`` for suffixes ``("_t1", "_t2")``).
Output: ``raw_root/DatasetXXX_Name/imagesTr/<case>_<channel:04d><ending>`` and a ``dataset.json`` with
``channel_names``, ``labels = {"background": 0}``, ``numTraining``, ``file_ending`` and
``"nnpre_unlabeled": true``, which :func:`planners.pipeline.plan_dataset` plans and preprocesses from the
images alone.

Rules:

* recognised images: ``.nii.gz``, ``.mha``, ``.nrrd`` (symlinked, or copied with ``link=False``) and ``.nii``,
  ``.mhd`` (converted to ``.nii.gz`` with SimpleITK: nnU-Net reads ``.nii`` with nibabel and cannot read
  ``.mhd``); other files (``.raw`` data of ``.mhd`` headers, notes, hidden files) and subfolders are ignored;
* all images must share one ending, be readable 3D single-component images, and the channels of a case must
  have the same size;
* the dataset is assembled in a hidden staging folder and renamed into place, so an interrupted import
  leaves nothing half-written; ``dataset.json`` records the sources (``"nnpre_import"``), and importing the
  same folder again under the same id returns the existing dataset, while any other dataset with that id is
  an error.

Every problem raises :class:`nnpre.errors.NnPreError` with one line naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from nnpre.atomic import write_json
from nnpre.errors import fail

#: Endings nnU-Net reads with SimpleITK directly: linked or copied as they are.
NATIVE_ENDINGS = (".nii.gz", ".mha", ".nrrd")
#: Endings converted to ``.nii.gz`` on import.
CONVERTED_ENDINGS = (".nii", ".mhd")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")  # ".nii.gz" before ".nii"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def image_ending(filename: str) -> Optional[str]:
    """The recognised image ending of ``filename`` (``.nii.gz`` wins over ``.nii``), or None."""
    low = filename.lower()
    for e in IMAGE_ENDINGS:
        if low.endswith(e):
            return e
    return None


def check_dataset_id_and_name(dataset_id: int, name: str) -> str:
    """Validate an nnU-Net dataset id (1..999) and name; return the folder name ``DatasetXXX_Name``."""
    try:
        did = int(dataset_id)
    except (TypeError, ValueError):
        fail(f"dataset id must be a number between 1 and 999, got {dataset_id!r}")
    if not 1 <= did <= 999:
        fail(f"dataset id must be between 1 and 999, got {did}")
    if not NAME_RE.match(str(name)):
        fail(f"dataset name {name!r} may only contain letters, digits, '_' and '-' (and must start with a letter "
             f"or digit); pass another name")
    return f"Dataset{did:03d}_{name}"


def existing_dataset(raw_root: str, dataset_id: int, folder_name: str, manifest: dict,
                     key: str = "nnpre_import") -> Optional[str]:
    """Look for a dataset with ``dataset_id`` in ``raw_root``.

    Returns its folder when it is the same import (same folder name and ``dataset.json[key] == manifest``),
    None when the id is free, and fails when the id is taken by anything else.
    """
    prefix = f"Dataset{int(dataset_id):03d}_"
    hits = sorted(d for d in (os.listdir(raw_root) if os.path.isdir(raw_root) else [])
                  if d.startswith(prefix) and os.path.isdir(os.path.join(raw_root, d)))
    if not hits:
        return None
    for h in hits:
        if h != folder_name:
            continue
        try:
            with open(os.path.join(raw_root, h, "dataset.json"), encoding="utf-8") as f:
                recorded = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == json.loads(json.dumps(manifest)):
            return os.path.join(raw_root, h)
    fail(f"dataset id {int(dataset_id)} already exists as {os.path.join(raw_root, hits[0])} with different "
         f"content; pass another dataset id or delete that folder")


@contextlib.contextmanager
def staging_folder(final: str) -> Iterator[str]:
    """Yield a hidden folder next to ``final``; on success rename it to ``final``, on error remove it."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_" + os.path.basename(final) + "_", dir=parent)
    try:
        yield tmp
        if os.path.exists(final):  # appeared while we were working
            fail(f"{final} appeared during the import; delete it and run again")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def place_file(src: str, dst: str, link: bool = True) -> None:
    """Symlink ``dst`` -> absolute ``src`` (falls back to a copy where symlinks are not allowed) or copy."""
    src = os.path.abspath(src)
    if link:
        try:
            os.symlink(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def read_header(path: str) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    """(size, spacing) of a 3D single-component image; fails naming the file otherwise."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        fail(f"cannot read {path}: not a readable image (corrupt file or unsupported format); fix or remove it")
    if r.GetDimension() != 3:
        fail(f"{path} has {r.GetDimension()} dimensions; only 3D images can be imported, remove it")
    if r.GetNumberOfComponents() != 1:
        fail(f"{path} has {r.GetNumberOfComponents()} components per voxel; save each channel as its own file "
             f"and use channel suffixes")
    return tuple(r.GetSize()), tuple(r.GetSpacing())


def _convert(src: str, dst: str) -> None:
    """Convert with SimpleITK after :func:`nnpre.image_io.read_image`'s checks: a truncated ``.nii`` would
    otherwise be written out as a complete ``.nii.gz`` whose missing part is zeros."""
    import SimpleITK as sitk

    from nnpre.image_io import read_image

    sitk.WriteImage(read_image(src, kind="image", ndim=3), dst, True)


def collect_cases(src: str, channel_suffixes: Optional[Sequence[str]] = None) -> Tuple[Dict[str, List[str]], str]:
    """``({case: [file per channel]}, ending)`` of the images directly inside ``src``."""
    if not os.path.isdir(src):
        fail(f"input folder {src} does not exist")
    files = sorted(f for f in os.listdir(src) if not f.startswith(".") and os.path.isfile(os.path.join(src, f))
                   and image_ending(f))
    if not files:
        fail(f"{src} holds no images ({', '.join('*' + e for e in IMAGE_ENDINGS)}); put one file per case there")
    endings = sorted({image_ending(f) for f in files})
    if len(endings) > 1:
        example = next(f for f in files if image_ending(f) == endings[1])
        fail(f"{src} mixes image types ({', '.join(endings)}, e.g. {example}); convert all images to one format "
             f"or import them as separate datasets")
    ending = endings[0]
    suffixes = list(channel_suffixes or [""])
    if len(set(suffixes)) != len(suffixes):
        fail(f"channel suffixes must be distinct, got {suffixes}")
    cases: Dict[str, Dict[int, str]] = {}
    for f in files:
        stem = f[: -len(ending)]
        # longest matching suffix wins ("_t1ce" before "_t1")
        match = [(len(s), c) for c, s in enumerate(suffixes) if stem.endswith(s) and len(stem) > len(s)]
        if not match:
            fail(f"{os.path.join(src, f)} does not end with any channel suffix ({', '.join(suffixes)}); rename it "
                 f"or move it out of the folder")
        _, c = max(match)
        case = stem[: len(stem) - len(suffixes[c])] if suffixes[c] else stem
        cases.setdefault(case, {})[c] = os.path.join(src, f)
    out = {}
    for case, chans in sorted(cases.items()):
        for c, s in enumerate(suffixes):
            if c not in chans:
                fail(f"case '{case}' lacks channel {c}: {os.path.join(src, case + s + ending)} is missing; add it or "
                     f"remove the case's other files")
        out[case] = [chans[c] for c in range(len(suffixes))]
    return out, ending


def import_image_folder(src: str, raw_root: str, dataset_id: int, name: Optional[str] = None,
                        channel_name: str | Sequence[str] = "CT", channel_suffixes: Optional[Sequence[str]] = None,
                        link: bool = True, check_images: bool = True) -> str:
    """Import the images in ``src`` as the image-only raw dataset ``raw_root/DatasetXXX_<name>``.

    Args:
        src: folder with one image per case (or one per case and channel, see ``channel_suffixes``).
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net dataset id (1..999).
        name: dataset name (default: the folder name with other characters replaced by ``_``).
        channel_name: channel name (``"CT"``, ``"T1"``, ...) or one name per channel; nnpre's fine-tuning
            matches stems by these names.
        channel_suffixes: file-name suffixes (before the ending) of the channels, e.g. ``("_t1", "_t2")``;
            default: one channel, the whole stem is the case id.
        link: symlink the native formats (default) instead of copying them.
        check_images: read every header (3D, single component, same size across channels).

    Returns:
        The dataset folder.
    """
    src = os.path.abspath(os.fspath(src))
    raw_root = os.path.abspath(os.fspath(raw_root))
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(src.rstrip(os.sep))).strip("_-") or "Images"
    folder_name = check_dataset_id_and_name(dataset_id, name)
    names = [channel_name] if isinstance(channel_name, str) else list(channel_name)
    n_ch = len(channel_suffixes) if channel_suffixes else 1
    if len(names) != n_ch:
        fail(f"{len(names)} channel name(s) {names} for {n_ch} channel(s); give one name per channel suffix")
    cases, ending = collect_cases(src, channel_suffixes)
    if check_images:
        for case, files in cases.items():
            sizes = {f: read_header(f)[0] for f in files}
            if len(set(sizes.values())) > 1:
                listing = ", ".join(f"{os.path.basename(f)} {s}" for f, s in sizes.items())
                fail(f"case '{case}': channel images differ in size ({listing}); "
                     f"resample them to one grid")
    out_ending = ending if ending in NATIVE_ENDINGS else ".nii.gz"
    channel_names = {str(i): str(n) for i, n in enumerate(names)}
    manifest = {"source": src, "channel_names": channel_names,
                "cases": {k: [os.path.basename(f) for f in v] for k, v in cases.items()}}
    return write_image_pool(raw_root, dataset_id, folder_name, name, f"image-only pretraining pool imported from {src}",
                            cases, out_ending, channel_names, manifest, link)


def write_image_pool(raw_root: str, dataset_id: int, folder_name: str, name: str, description: str,
                     cases: Dict[str, List[str]], out_ending: str, channel_names: Dict[str, str], manifest: dict,
                     link: bool = True) -> str:
    """Write the image-only raw dataset ``raw_root/folder_name`` (staged, then renamed into place).

    ``cases`` maps each case id to its image files, one per channel; files already in ``out_ending`` are linked
    (or copied, ``link=False``), others converted. When a dataset with ``dataset_id`` recorded the same
    ``manifest`` it is returned as it is (:func:`existing_dataset`). Returns the dataset folder.
    """
    done = existing_dataset(raw_root, dataset_id, folder_name, manifest)
    if done:
        return done
    final = os.path.join(raw_root, folder_name)
    with staging_folder(final) as tmp:
        images = os.path.join(tmp, "imagesTr")
        os.makedirs(images)
        for case, files in cases.items():
            for c, f in enumerate(files):
                dst = os.path.join(images, f"{case}_{c:04d}{out_ending}")
                if image_ending(f) == out_ending:
                    place_file(f, dst, link)
                else:
                    _convert(f, dst)
        write_json({"name": name, "description": description, "channel_names": channel_names,
                    "labels": {"background": 0}, "numTraining": len(cases), "file_ending": out_ending,
                    "nnpre_unlabeled": True, "nnpre_import": manifest}, os.path.join(tmp, "dataset.json"))
    return final
