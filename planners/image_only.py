"""Fingerprint and preprocessing for image-only (unlabeled) datasets, for pretraining.

Stock nnU-Net hard-requires labels: the fingerprint extractor reads a segmentation per case and
collects intensities where it is > 0, and the preprocessor passes a label path for every case
(nnU-Net 2.8.1 ``DatasetFingerprintExtractor`` and ``preprocess_dataset``). For a pool of unlabeled volumes we instead

* fingerprint each case from its images alone, using the nonzero (body) region that nnU-Net's own
  ``crop_to_nonzero`` finds as the "foreground" for the intensity statistics, and
* preprocess with nnU-Net's ``DefaultPreprocessor.run_case_save(..., seg_file=None, ...)``, which
  already supports images without labels (it stores the nonzero mask as the seg and no
  ``class_locations``).

The output is the same blosc2 layout as for labelled data (``<case>.b2nd``, ``<case>_seg.b2nd``,
``<case>.pkl``), so the pretraining loader can stream it. Work is per case in a process pool with a
bounded ``imap`` so memory stays flat for ~100k cases.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from typing import Dict, List, Tuple

import numpy as np
from tqdm import tqdm

from nnpre.atomic import write_json
from nnpre.errors import fail

#: Voxels sampled for the intensity statistics over the whole dataset (nnU-Net uses 10e7 too).
NUM_INTENSITY_SAMPLES = int(10e7)


def _analyze_case(args: Tuple[List[str], int]):
    image_files, num_samples = args
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    images, props = SimpleITKIO().read_images(image_files)
    if not np.all(np.isfinite(images)):
        return ("error", f"{image_files[0]} contains NaN or infinite values; fix or remove the case")
    shape_before = images.shape[1:]
    data, mask, _ = crop_to_nonzero(images, None)
    fg = mask[0] >= 0  # crop_to_nonzero marks outside-body voxels with -1
    rs = np.random.RandomState(1234)
    samples = []
    for c in range(len(data)):
        v = data[c][fg] if fg.any() else data[c].ravel()
        samples.append(rs.choice(v, min(num_samples, v.size), replace=v.size < num_samples) if v.size else v)
    if all(np.ptp(d) == 0 for d in data):
        return ("error", f"{image_files[0]} is constant (every voxel {float(data.flat[0])}); remove it from the pool")
    return ("ok", data.shape[1:], props["spacing"], samples, np.prod(data.shape[1:]) / np.prod(shape_before))


def extract_fingerprint_image_only(dataset_name: str, cases: Dict[str, dict], num_channels: int,
                                   num_processes: int = 2, overwrite: bool = True) -> dict:
    """Write ``nnUNet_preprocessed/<dataset>/dataset_fingerprint.json`` for an image-only dataset.

    Keys and meaning are those of nnU-Net's fingerprint (spacings, shapes_after_crop,
    foreground_intensity_properties_per_channel, median_relative_size_after_cropping) so the stock
    planners consume it unchanged.
    """
    from nnunetv2.paths import nnUNet_preprocessed

    out = os.path.join(nnUNet_preprocessed, dataset_name, "dataset_fingerprint.json")
    if os.path.isfile(out) and not overwrite:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        return load_json(out)
    per_case = max(1, NUM_INTENSITY_SAMPLES // max(1, len(cases)))
    jobs = [(c["images"], per_case) for c in cases.values()]
    results = _map(_analyze_case, jobs, num_processes, "Fingerprint (image-only)")
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        fail(errors[0] + (f" (and {len(errors) - 1} more problem case(s))" if len(errors) > 1 else ""))
    intens = [np.concatenate([r[3][c] for r in results]) for c in range(num_channels)]
    stats = {}
    for c in range(num_channels):
        p005, med, p995 = np.percentile(intens[c], (0.5, 50.0, 99.5))
        stats[c] = {"mean": float(np.mean(intens[c])), "median": float(med), "std": float(np.std(intens[c])),
                    "min": float(np.min(intens[c])), "max": float(np.max(intens[c])),
                    "percentile_99_5": float(p995), "percentile_00_5": float(p005)}
    fp = {"spacings": [[float(s) for s in r[2]] for r in results],
          "shapes_after_crop": [[int(s) for s in r[1]] for r in results],
          "foreground_intensity_properties_per_channel": stats,
          "median_relative_size_after_cropping": float(np.median([r[4] for r in results]))}
    write_json(fp, out)
    return fp


def _preprocess_case(args):
    out_trunc, image_files, seg_file, plans, configuration, dataset_json = args
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    # the plans' preprocessor (nnU-Net's DefaultPreprocessor for nnPre plans); seg_file None = image-only
    cm.preprocessor_class(verbose=False).run_case_save(out_trunc, image_files, seg_file, pm, cm, dataset_json)
    return out_trunc


def preprocess_all_or_nothing(dataset_name: str, cases: Dict[str, dict], plans: dict, configuration: str,
                              dataset_json: dict, num_processes: int = 2, plans_identifier: str = "") -> str:
    """Preprocess every case (labelled or image-only) into ``<preprocessed>/<dataset>/<data_identifier>``.

    What nnU-Net's ``preprocess_dataset`` does (``run_case_save`` per case with the plans' preprocessor, labels
    copied to ``gt_segmentations``), but all-or-nothing: the folders are built under ``*.partial`` names, the
    completion record (:func:`nnpre.dataset_checks.write_completion_marker`, a file next to the folder) is written
    last, and only then are they renamed onto the real names. A run killed at any point leaves either the
    previous complete folder or none (the trainer then says to re-run ``nnPre_plan``), never a partial case set
    behind the real name.

    Args:
        cases: ``{case_id: {"images": [paths], "label": path | None}}``.
    """
    from nnunetv2.paths import nnUNet_preprocessed

    from nnpre.dataset_checks import marker_path, write_completion_marker

    ident = plans["configurations"][configuration]["data_identifier"]
    final = os.path.join(nnUNet_preprocessed, dataset_name, ident)
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    labelled = any(c.get("label") for c in cases.values())
    jobs = [(os.path.join(tmp, k), c["images"], c.get("label"), plans, configuration, dataset_json)
            for k, c in cases.items()]
    _map(_preprocess_case, jobs, num_processes,
         f"Preprocess {configuration}{'' if labelled else ' (image-only)'}")
    gt_final = os.path.join(nnUNet_preprocessed, dataset_name, "gt_segmentations")
    if labelled:  # nnU-Net keeps a copy of the labels for validation without the raw folder
        gt_tmp = gt_final + ".partial"
        shutil.rmtree(gt_tmp, ignore_errors=True)
        os.makedirs(gt_tmp)
        ending = dataset_json["file_ending"]
        for k, c in cases.items():
            shutil.copyfile(c["label"], os.path.join(gt_tmp, k + ending))  # copyfile: new file, umask applies
    # the record goes next to the folder (stock nnU-Net refuses unknown files inside it); it is renamed into
    # place after the folder, so a kill in between leaves the old record, which the new folder fails to match
    pending = write_completion_marker(final, cases, plans_identifier or plans.get("plans_name", ""), configuration,
                                      plans=plans, path=marker_path(final) + ".partial")
    if labelled:
        shutil.rmtree(gt_final, ignore_errors=True)
        os.replace(gt_tmp, gt_final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    os.replace(pending, marker_path(final))
    return final


def preprocess_image_only(dataset_name: str, cases: Dict[str, dict], plans: dict, configuration: str,
                          dataset_json: dict, num_processes: int = 2) -> str:
    """Preprocess an image-only dataset (labels ignored); see :func:`preprocess_all_or_nothing`."""
    cases = {k: {"images": c["images"], "label": None} for k, c in cases.items()}
    return preprocess_all_or_nothing(dataset_name, cases, plans, configuration, dataset_json, num_processes)


def _map(fn, jobs, num_processes: int, desc: str):
    if num_processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=4), total=len(jobs), desc=desc))
