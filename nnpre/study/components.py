"""A segmentation scored as detection: its connected components as boxes, scored by class probability.

This is nnDetection's "simple" import of nnU-Net predictions (``scripts/nnunet/nnunet_import.py --simple``:
argmax segmentation, one detection per connected component, score = the *maximum* probability of the
component's class inside it; ``nndet/utils/clustering.py``, ``instance_results_from_seg``), so that an nnU-Net
segmentation model can be ranked with the same box metrics (AP, FROC) as a detector.

* :func:`segmentation_components` converts one case in memory (what the study does after each
  sliding-window prediction);
* :func:`evaluate_segmentation_components` evaluates folders: predicted label maps (+ nnU-Net's
  ``<case>.npz`` probabilities from ``nnUNetv2_predict --save_probabilities``) against ground truth; it
  backs ``nnPre_evaluate seg-det``.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from nnpre.errors import fail


def segmentation_components(seg: np.ndarray, probabilities: Optional[np.ndarray] = None,
                            labels: Optional[Sequence[int]] = None, min_size: int = 0) -> Dict[str, np.ndarray]:
    """Connected components (26-connectivity, per label) of a label map as scored boxes.

    Args:
        seg: (X, Y, Z) integer label map (array axes as read; 0 = background, label ``v`` = class ``v - 1``).
        probabilities: (C, X, Y, Z) class probabilities in [0, 1] on the same grid (C = number of labels
            including background, nnU-Net's layout), or None: every component then scores 1.0.
        labels: label values to convert (default: every nonzero value present in ``seg``).
        min_size: drop components with fewer voxels (nnDetection's ``min_num_voxel``; default 0 = keep all).

    Returns:
        ``{"boxes": (N, 6) float32 nnDetection layout, "scores": (N,) float32 in [0, 1], "labels": (N,) int64
        class indices}``, components ordered by label then raster order.
    """
    from scipy import ndimage

    from nnpre_detection.instances import boxes_from_instances, semantic_to_instances

    seg = np.asarray(seg)
    if probabilities is not None:
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 4 or probabilities.shape[1:] != seg.shape:
            fail(f"probabilities of shape {probabilities.shape} do not match the label map {seg.shape}; "
                 f"expected (C, {', '.join(map(str, seg.shape))})")
    inst, mapping = semantic_to_instances(seg, classes=labels, min_size=min_size)
    boxes, ids = boxes_from_instances(inst)
    classes = np.asarray([mapping[int(i)] for i in ids], dtype=np.int64)
    scores = np.ones(len(ids), dtype=np.float32)
    if probabilities is not None and len(ids):
        for c in np.unique(classes):
            if c + 1 >= probabilities.shape[0]:
                fail(f"label {c + 1} has no probability channel (probabilities hold {probabilities.shape[0]})")
            sel = classes == c
            scores[sel] = np.asarray(ndimage.maximum(probabilities[c + 1], inst, ids[sel]), dtype=np.float32)
    return {"boxes": boxes, "scores": np.clip(scores, 0, 1), "labels": classes}


def _read_label_map(path: str) -> np.ndarray:
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as e:
        fail(f"{path}: cannot read the label map ({str(e).strip().splitlines()[-1]})")


def _read_probabilities(path: str) -> np.ndarray:
    try:
        with np.load(path) as z:
            key = "probabilities" if "probabilities" in z.files else ("softmax" if "softmax" in z.files else None)
            if key is None:
                fail(f"{path}: no 'probabilities' array (write it with nnUNetv2_predict --save_probabilities)")
            return z[key]
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read probabilities ({type(e).__name__}: {e})")


def evaluate_segmentation_components(pred_folder: str, gt_folder: str, output_file: Optional[str] = None,
                                     probabilities_folder: Optional[str] = None,
                                     labels: Optional[Sequence[int]] = None, min_size: int = 0,
                                     missing_predictions: str = "error", plots: bool = True,
                                     boxes_folder: Optional[str] = None, dataset_json: Optional[str] = None) -> dict:
    """Detection metrics (AP/mAP at IoU 0.1-0.5, FROC; nnDetection's definitions) of predicted label maps.

    Args:
        pred_folder: predicted label maps ``<case><ending>`` (any ending SimpleITK reads, e.g. ``.nii.gz``).
        gt_folder: ground truth, as for ``nnPre_evaluate det`` (nnDetection labels, ``*_boxes_gt.npz`` or
            nnU-Net semantic labels split into components).
        output_file: JSON report (atomic); plots go next to it. None = only return the report.
        probabilities_folder: folder with nnU-Net's ``<case>.npz`` (key ``probabilities``); default
            ``pred_folder`` if it holds any ``.npz``, else every component scores 1.0 (AP then measures
            only the hit/miss pattern, without ranking).
        labels: label values scored as objects (default: every nonzero label present), class = label - 1.
        min_size: drop predicted components with fewer voxels.
        missing_predictions: ``"error"`` or ``"empty"`` for ground-truth cases without a label map.
        plots: write FROC / precision-recall PNGs (needs ``output_file``).
        boxes_folder: also write the boxes as ``<case>.json`` prediction files (``nnPre_evaluate det`` input).
        dataset_json: dataset.json naming the labels when ``labels`` is None (default: found next to
            ``gt_folder``); without either, the classes are inferred from the ground truth.

    Returns:
        The report of :func:`nnpre_detection.metrics.evaluate.evaluate_boxes` (JSON-ready) plus the folders used.
    """
    from nnpre.atomic import write_json
    from nnpre_detection.instances import load_ground_truth
    from nnpre_detection.metrics.classes import resolve_classes
    from nnpre_detection.metrics.evaluate import SEG_ENDINGS, evaluate_boxes, to_json_ready

    if not os.path.isdir(pred_folder):
        fail(f"prediction folder {pred_folder} does not exist")
    names = sorted(n for n in os.listdir(pred_folder) if not n.startswith("."))
    ending = next((e for e in SEG_ENDINGS if any(n.endswith(e) for n in names)), None)
    if ending is None:
        fail(f"{pred_folder}: no label maps with a known ending {SEG_ENDINGS}")
    cases = {n[: -len(ending)]: os.path.join(pred_folder, n) for n in names if n.endswith(ending)}
    if probabilities_folder is None and any(n.endswith(".npz") for n in names):
        probabilities_folder = pred_folder
    if probabilities_folder is not None and not os.path.isdir(probabilities_folder):
        fail(f"probabilities folder {probabilities_folder} does not exist")
    if labels is not None:
        semantic = [int(v) for v in labels]
        classes = resolve_classes(max(semantic))
    else:  # as nnPre_evaluate det: classes from the dataset.json next to the ground truth, else inferred
        classes = resolve_classes(None, dataset_json, gt_folder)
        semantic = None if classes is None or classes.semantic_labels is None else list(classes.semantic_labels)
    gts = load_ground_truth(gt_folder, semantic_classes=semantic)
    preds = {}
    for case, path in cases.items():
        seg = _read_label_map(path)
        prob = None
        if probabilities_folder is not None:
            p = os.path.join(probabilities_folder, case + ".npz")
            if not os.path.isfile(p):
                fail(f"{p} is missing; every label map needs its probabilities (or pass none at all)")
            prob = _read_probabilities(p)
        preds[case] = segmentation_components(seg, prob, labels=semantic, min_size=min_size)
        if boxes_folder is not None:
            write_prediction_json(preds[case], case, boxes_folder)
    report = evaluate_boxes(preds, gts, classes=classes, missing_predictions=missing_predictions,
                            pred_source=pred_folder, gt_source=gt_folder)
    report = {"task": "segmentation components as detection", "prediction_folder": os.path.abspath(pred_folder),
              "probabilities_folder": None if probabilities_folder is None else os.path.abspath(probabilities_folder),
              "ground_truth_folder": os.path.abspath(gt_folder), **report}
    if output_file is not None and plots:
        from nnpre_detection.metrics.evaluate import FPI_THRESHOLDS
        from nnpre_detection.metrics.plots import plot_froc

        stem = output_file[:-5] if output_file.endswith(".json") else output_file
        plot_froc(report["froc"], report["info"]["iou_list"][:2], FPI_THRESHOLDS, stem + "_froc.png",
                  title=f"FROC of segmentation components ({report['info']['num_cases']} scans)")
        report["plots"] = [stem + "_froc.png"]
    report = to_json_ready(report)
    if output_file is not None:
        write_json(report, output_file)
    return report


def write_prediction_json(pred: Dict[str, np.ndarray], case: str, folder: str) -> str:
    """Write ``{"boxes", "scores", "labels"}`` as ``folder/<case>.json`` (the detector's prediction format,
    :mod:`nnpre_detection.metrics.io`); float32 values round-trip exactly. Returns the path."""
    from nnpre.atomic import write_json

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{case}.json")
    write_json({"case": case, "boxes": np.asarray(pred["boxes"], np.float32).tolist(),
                "scores": np.asarray(pred["scores"], np.float32).tolist(),
                "labels": np.asarray(pred["labels"], np.int64).tolist()}, path)
    return path
