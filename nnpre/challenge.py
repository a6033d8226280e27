"""Grand Challenge algorithm container: read ``/input``, detect, write ``/output`` (``nnPre_challenge``).

Grand Challenge runs an algorithm container once per job with the job's inputs mounted under ``/input`` and
collects what the container writes under ``/output`` (grand-challenge.org documentation, "Setting up an
algorithm submission challenge"): an image input arrives as ``/input/images/<interface-slug>/<uuid>.mha``
(also ``.tif``/``.tiff``; other formats are converted to ``.mha`` by the platform), a JSON output is written
to ``/output/<name>.json`` and an image output to ``/output/images/<interface-slug>/<name>.mha``.

This module turns one job into one nnpre prediction:

* the input images are found under ``INPUT/images/<slug>/`` (one image per slug; several slugs = several
  channels, ordered as ``--channels`` lists them, else by slug name) or, for convenience, directly in
  ``INPUT`` (one image = one channel);
* they are staged as an nnU-Net case (``case_0000<ending>``, ...) in the model's file ending and predicted
  with :func:`nnpre_detection.inference.predict_folder` — the same code as ``nnPre_predict``;
* the boxes are written as Grand Challenge's "Multiple 3D bounding boxes" JSON: ``{"type": "Multiple 3D
  bounding boxes", "boxes": [{"name", "corners", "probability"}], "version": {"major": 1, "minor": 0}}``
  where ``corners`` are the 8 box corners in world coordinates (mm, the input image's physical space, exact
  for oblique direction matrices) and ``probability`` the detector's score in [0, 1];
* optionally an instance map of the kept boxes as ``OUTPUT/images/<slug>/output.mha``.

Every file is written atomically; a missing or unreadable input stops with one ``error:`` line.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnpre.errors import fail

#: image endings Grand Challenge delivers (and the local convenience layouts we also accept)
INPUT_ENDINGS = (".mha", ".tif", ".tiff", ".nii.gz", ".nii", ".nrrd", ".mhd")


def _image_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if not f.startswith(".") and f.lower().endswith(INPUT_ENDINGS)
                  and os.path.isfile(os.path.join(folder, f)))


def find_input_images(input_dir: str, channels: Optional[Sequence[str]] = None) -> List[str]:
    """The job's image per channel.

    Args:
        input_dir: the mounted input folder (``/input`` in the container).
        channels: interface slugs in channel order (``INPUT/images/<slug>/``); ``None`` = every slug folder,
            sorted by name.

    Returns:
        one image path per model input channel.
    """
    if not os.path.isdir(input_dir):
        fail(f"input folder {input_dir} does not exist; mount the job's inputs there (docker run -v ...:/input)")
    images_dir = os.path.join(input_dir, "images")
    if os.path.isdir(images_dir):
        slugs = list(channels) if channels else sorted(d for d in os.listdir(images_dir)
                                                       if os.path.isdir(os.path.join(images_dir, d)))
        if not slugs:
            fail(f"{images_dir} holds no interface folders (expected {images_dir}/<slug>/<uuid>.mha)")
        out = []
        for slug in slugs:
            folder = os.path.join(images_dir, slug)
            files = _image_files(folder) if os.path.isdir(folder) else []
            if len(files) != 1:
                fail(f"{folder}: expected exactly one image for input '{slug}', found {len(files)}; Grand Challenge "
                     f"delivers one image per interface and job")
            out.append(files[0])
        return out
    if channels:
        fail(f"--channels needs {images_dir}/<slug>/ folders, but {images_dir} does not exist")
    files = _image_files(input_dir)
    if len(files) != 1:
        fail(f"{input_dir}: expected {images_dir}/<slug>/<uuid>.mha or exactly one image, found {len(files)} images")
    return files


def box_corners_world(box: Sequence[float], reference) -> List[List[float]]:
    """The 8 corners of an index-space box in world coordinates.

    Args:
        box: (6,) nnDetection layout ``(x1, y1, x2, y2, z1, z2)`` in array index space of ``reference``
            (array axis 0 = SimpleITK index 2), as ``nnPre_predict`` writes ``boxes``.
        reference: the ``SimpleITK.Image`` the boxes refer to (origin, spacing, direction).

    Returns:
        8 ``[x, y, z]`` points in mm, the product of the box's low/high edge along each array axis.
    """
    b = [float(v) for v in box]
    return [list(reference.TransformContinuousIndexToPhysicalPoint((a2, a1, a0)))
            for a0, a1, a2 in itertools.product((b[0], b[2]), (b[1], b[3]), (b[4], b[5]))]


def grand_challenge_boxes(prediction: dict, reference, min_score: float = 0.0) -> Dict:
    """A prediction dict of ``nnPre_predict`` → Grand Challenge "Multiple 3D bounding boxes" JSON object.

    Boxes scoring below ``min_score`` are dropped; the rest are listed by decreasing probability.
    """
    boxes = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(prediction.get("labels", [0] * len(scores))).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    out = []
    for rank, i in enumerate(order):
        if scores[i] < min_score:
            continue
        out.append({"name": f"lesion {rank + 1} (class {int(labels[i])})",
                    "corners": box_corners_world(boxes[i], reference),
                    "probability": float(scores[i])})
    return {"type": "Multiple 3D bounding boxes", "boxes": out, "version": {"major": 1, "minor": 0}}


def run_job(model_dir: str, input_dir: str = "/input", output_dir: str = "/output",
            output_name: str = "lesion-bounding-boxes.json", channels: Optional[Sequence[str]] = None,
            segmentation_slug: Optional[str] = None, min_score: float = 0.0,
            instance_min_score: float = 0.5, checkpoint: str = "checkpoint_final.pth", mirror: bool = True,
            overlap: float = 0.5, device=None) -> str:
    """Run one Grand Challenge job (see the module doc); returns the path of the boxes JSON.

    Args:
        model_dir: fold folder of a ``nnPre_train detect`` run (baked into the container image).
        segmentation_slug: also write the boxes scoring at least ``instance_min_score`` as an instance map to
            ``OUTPUT/images/<slug>/output.mha`` (``None``: boxes only).
        min_score: drop boxes below this score from the JSON (default 0: keep all, as FROC needs).
    """
    import json

    import SimpleITK as sitk
    import torch

    from nnpre.atomic import write_json, write_with
    from nnpre.checkpoints import safe_load
    from nnpre_detection.inference import find_checkpoint, predict_folder

    images = find_input_images(input_dir, channels)
    info = safe_load(find_checkpoint(model_dir, checkpoint)).get("nnpre_detection") or {}
    if not info:
        fail(f"{model_dir} holds no detection checkpoint; bake the fold folder of a nnPre_train detect run into "
             f"the image")
    n_ch = int(info.get("num_input_channels", 1))
    if len(images) != n_ch:
        fail(f"the model expects {n_ch} input channel(s) but the job has {len(images)} image(s) "
             f"({', '.join(images)}); pass --channels SLUG1,SLUG2,... in the model's channel order")
    ending = (info.get("dataset_json") or {}).get("file_ending", ".nii.gz")
    os.makedirs(output_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".nnpre_job_", dir=output_dir)
    try:
        staged = os.path.join(work, "in")
        os.makedirs(staged)
        reference = None
        for c, src in enumerate(images):
            try:
                im = sitk.ReadImage(src)
            except RuntimeError:
                fail(f"cannot read {src}: not a readable image (corrupt or truncated file)")
            reference = reference or im
            sitk.WriteImage(im, os.path.join(staged, f"case_{c:04d}{ending}"), True)
        pred_dir = os.path.join(work, "out")
        written = predict_folder(model_dir, staged, pred_dir, checkpoint=checkpoint, mirror=mirror,
                                 overlap=overlap, device=device if device is not None else torch.device("cpu"),
                                 progress=False, save_instances=segmentation_slug is not None,
                                 instance_min_score=instance_min_score)
        with open(written[0], encoding="utf-8") as f:
            prediction = json.load(f)
        out_json = os.path.join(output_dir, output_name)
        write_json(grand_challenge_boxes(prediction, reference, min_score), out_json)
        if segmentation_slug is not None:
            seg = sitk.ReadImage(os.path.join(pred_dir, "case_instances.nii.gz"))
            dst = os.path.join(output_dir, "images", segmentation_slug, "output.mha")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            write_with(lambda p: sitk.WriteImage(seg, p, True), dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_json
