"""Ignore regions for detection evaluation: LUNA16's excluded findings, or boxes given per case.

LUNA16 (Setio et al., "Validation, comparison, and combination of algorithms for automatic detection of pulmonary
nodules in computed tomography images: the LUNA16 challenge", MedIA 2017) ships ``annotations_excluded.csv``
(``seriesuid,coordX,coordY,coordZ,diameter_mm``, world coordinates in mm as SimpleITK reports them for the
``.mhd`` scans): findings that are not counted as nodules (smaller than 3 mm, seen by fewer than 3 of the 4
readers, non-nodules). The official script ``noduleCADEvaluationLUNA16.py`` (``bOtherNodulesAsIrrelevant =
True``) neither rewards nor penalises a candidate on such a finding; a finding without a size (``diameter_mm``
< 0, written ``-1``) gets a 10 mm diameter there, and here too.

In box-based evaluation these findings become *ignored ground truth* (``gt_ignore``, COCO semantics; see
:mod:`nnpre_detection.metrics.matching`): each finding is a sphere of its diameter around its centre, turned
into the axis-aligned box that holds it in the array index space of the case's image, in nnDetection's box
layout ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)`` where array axis 0 is SimpleITK index 2 (z).

Box convention: SimpleITK continuous indices put voxel centres on integers, and nnDetection's ground-truth boxes
(``get_bbox_np``) run from the outermost voxel index - 1 to + 1. A sphere whose voxel centres reach ``c - h`` ..
``c + h`` along an axis therefore gets ``[c - h - margin, c + h + margin]`` with ``margin = 1`` voxel by default,
so an ignore box has the size a ground-truth box of the same object would have (``margin=0`` gives the bare
sphere extent). ``h`` is the radius divided by the voxel size along that index axis, exact for any direction
matrix: ``h_k = r * ||row_k(diag(1/spacing) @ inv(direction))||``.

Ignore boxes can also be given directly, one ``<case>_ignore.json`` per case in a folder::

    {"boxes": [[a0_1, a1_1, a0_2, a1_2, a2_1, a2_2], ...], "classes": [0, ...]}   # "classes" optional, default 0
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from nnpre.atomic import read_json
from nnpre.errors import fail
from nnpre_detection.metrics.validate import check_ground_truth

#: Columns of LUNA16's ``annotations_excluded.csv`` (and ``annotations.csv``).
LUNA_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: Diameter (mm) noduleCADEvaluationLUNA16.py uses for a finding without a size (diameter_mm < 0).
LUNA_DEFAULT_DIAMETER_MM = 10.0
#: File name suffix of per-case ignore box files.
IGNORE_SUFFIX = "_ignore.json"
#: Voxels added on each side of a sphere's extent (nnDetection ground-truth boxes: outermost index -1 / +1).
DEFAULT_MARGIN = 1.0


def read_excluded_csv(path: str) -> dict[str, np.ndarray]:
    """Read LUNA16's ``annotations_excluded.csv``.

    Args:
        path: CSV with header ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (column order free; more columns
            allowed).

    Returns:
        ``{seriesuid: (N, 4) float64 [x, y, z, diameter_mm]}`` in world mm (SimpleITK physical points); a
        diameter < 0 is replaced by :data:`LUNA_DEFAULT_DIAMETER_MM` (as the LUNA16 script does).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read the excluded-findings CSV ({type(e).__name__}: {e})")
    if not rows:
        fail(f"{path}: empty CSV; expected the header {','.join(LUNA_COLUMNS)}")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in LUNA_COLUMNS if c not in header]
    if missing:
        fail(f"{path}: header {header} lacks {missing}; expected LUNA16's {','.join(LUNA_COLUMNS)}")
    col = [header.index(c) for c in LUNA_COLUMNS]
    out: dict[str, list] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        if len(row) < len(header):
            fail(f"{path}, line {line}: {len(row)} values for {len(header)} columns")
        try:
            vals = [float(row[i]) for i in col[1:]]
        except ValueError:
            fail(f"{path}, line {line}: coordX, coordY, coordZ and diameter_mm must be numbers, got "
                 f"{[row[i] for i in col[1:]]}")
        if not np.all(np.isfinite(vals)):
            fail(f"{path}, line {line}: non-finite value in {vals}")
        if vals[3] < 0:
            vals[3] = LUNA_DEFAULT_DIAMETER_MM
        elif vals[3] == 0:
            fail(f"{path}, line {line}: diameter_mm 0 describes no region; use -1 for a finding without a size "
                 f"(LUNA16 then takes {LUNA_DEFAULT_DIAMETER_MM:g} mm)")
        out.setdefault(row[col[0]].strip(), []).append(vals)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def sphere_boxes(findings: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float], margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Index-space boxes of spheres given in world coordinates.

    Args:
        findings: (N, 4) ``[x, y, z, diameter]`` in mm (SimpleITK physical points).
        spacing, origin: 3 values each, SimpleITK order (x, y, z).
        direction: 9 values, SimpleITK's row-major 3x3 direction matrix.
        margin: voxels added on each side (default 1, nnDetection's ground-truth box convention).

    Returns:
        (N, 6) float64 boxes ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)``; array axis 0 = SimpleITK index 2.
        Index ``i`` of a point ``p`` solves ``p = origin + direction @ (spacing * i)`` (SimpleITK's
        ``TransformPhysicalPointToContinuousIndex``).
    """
    findings = np.asarray(findings, dtype=np.float64).reshape(-1, 4)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    to_index = np.linalg.inv(direction) / spacing[:, None]  # (3, 3): world offset -> continuous index (x, y, z)
    centre = (findings[:, :3] - origin) @ to_index.T  # (N, 3) SimpleITK index order
    half = 0.5 * findings[:, 3:4] * np.linalg.norm(to_index, axis=1)[None, :] + float(margin)  # (N, 3)
    lo, hi = centre - half, centre + half
    # nnDetection layout over array axes (0, 1, 2) = SimpleITK indices (2, 1, 0)
    return np.stack([lo[:, 2], lo[:, 1], hi[:, 2], hi[:, 1], lo[:, 0], hi[:, 0]], axis=1)


def _geometry_ok(geo) -> bool:
    return geo is not None and all(geo.get(k) is not None for k in ("spacing", "origin", "direction"))


def ignore_from_csv(path: str, case_ids: Sequence[str],
                    geometry_of: Callable[[str], Optional[Mapping]], margin: float = DEFAULT_MARGIN,
                    ignore_class: int = 0) -> tuple[dict[str, dict], dict]:
    """Ignore boxes of the evaluated cases from LUNA16's ``annotations_excluded.csv``.

    Args:
        path: the CSV (world mm).
        case_ids: evaluated cases; a ``seriesuid`` names a case (rows of other series are counted, not used).
        geometry_of: case -> ``{"spacing", "origin", "direction"}`` (SimpleITK order) of the image the boxes
            refer to, or None when unknown.
        margin: see :func:`sphere_boxes`.
        ignore_class: class id of the ignore boxes (LUNA16 has one class, 0).

    Returns:
        ``({case: {"boxes": (K, 6) float64, "classes": (K,) int64}}, info)``; info counts the rows used and
        those of series outside ``case_ids``.
    """
    findings = read_excluded_csv(path)
    cases = set(case_ids)
    used = sorted(s for s in findings if s in cases)
    if findings and not used:
        example = next(iter(findings))
        fail(f"{path}: no seriesuid matches an evaluated case (e.g. {example!r} vs case {sorted(cases)[0]!r}); "
             f"name the cases by their seriesuid, or pass the ignore boxes per case with --ignore-dir")
    out = {}
    for case in used:
        geo = geometry_of(case)
        if not _geometry_ok(geo):
            fail(f"{path}: case {case} has excluded findings but no image geometry to place them (its prediction "
                 f"JSON lacks spacing/origin/direction and the ground truth has no image header); predict with "
                 f"nnPre_predict, or pass index-space boxes with --ignore-dir")
        boxes = sphere_boxes(findings[case], geo["spacing"], geo["origin"], geo["direction"], margin)
        out[case] = {"boxes": boxes, "classes": np.full(len(boxes), int(ignore_class), dtype=np.int64)}
    info = {"source": os.path.abspath(path), "kind": "LUNA16 excluded findings (world mm spheres)",
            "rows_used": int(sum(len(findings[c]) for c in used)),
            "rows_other_series": int(sum(len(v) for s, v in findings.items() if s not in cases)),
            "margin_voxels": float(margin), "default_diameter_mm": LUNA_DEFAULT_DIAMETER_MM}
    return out, info


def read_ignore_dir(folder: str, case_ids: Sequence[str] | None = None) -> tuple[dict[str, dict], dict]:
    """Ignore boxes from ``<case>_ignore.json`` files (index space, nnDetection layout).

    Args:
        folder: folder with ``<case>_ignore.json`` files (``{"boxes": [[6 values], ...], "classes": [...]}``,
            ``classes`` optional, default 0).
        case_ids: evaluated cases; files of other cases are counted, not used. At least one file must match.

    Returns:
        ``({case: {"boxes": (K, 6) float64, "classes": (K,) int64}}, info)``.
    """
    if not os.path.isdir(folder):
        fail(f"ignore folder {folder} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.endswith(IGNORE_SUFFIX) and not n.startswith("."))
    if not names:
        fail(f"{folder}: no <case>{IGNORE_SUFFIX} files (each {{\"boxes\": [[a0_1, a1_1, a0_2, a1_2, a2_1, a2_2], "
             f"...]}})")
    cases = None if case_ids is None else set(case_ids)
    out, other = {}, 0
    for name in names:
        case = name[: -len(IGNORE_SUFFIX)]
        if cases is not None and case not in cases:
            other += 1
            continue
        path = os.path.join(folder, name)
        data = read_json(path, "ignore JSON")
        if not isinstance(data, dict) or "boxes" not in data:
            fail(f"{path}: expected a JSON object {{\"boxes\": [[a0_1, a1_1, a0_2, a1_2, a2_1, a2_2], ...]}}")
        try:
            boxes = np.asarray(data["boxes"], dtype=np.float64)
            classes = np.asarray(data.get("classes", [0] * len(data["boxes"])))
        except (TypeError, ValueError) as e:
            fail(f"{path}: boxes/classes must be numeric lists ({e})")
        boxes, classes = check_ground_truth(boxes.reshape(-1, 6) if boxes.size == 0 else boxes, classes, None,
                                            f"{path} (ignore boxes)")
        out[case] = {"boxes": np.asarray(boxes, dtype=np.float64), "classes": classes}
    if cases is not None and not out:
        fail(f"{folder}: no {IGNORE_SUFFIX} file names an evaluated case (e.g. {names[0]!r} vs case "
             f"{sorted(cases)[0]!r}); name them <case>{IGNORE_SUFFIX}")
    info = {"source": os.path.abspath(folder), "kind": "ignore boxes per case (index space)",
            "files_used": len(out), "files_other_cases": other}
    return out, info


def load_ignore(source: str, case_ids: Sequence[str], geometry_of: Callable[[str], Optional[Mapping]],
                margin: float = DEFAULT_MARGIN) -> tuple[dict[str, dict], dict]:
    """Ignore boxes from a LUNA16-style CSV (a file) or a folder of ``<case>_ignore.json`` files.

    See :func:`ignore_from_csv` and :func:`read_ignore_dir`; ``geometry_of`` and ``margin`` are used for the CSV.
    """
    if os.path.isdir(source):
        return read_ignore_dir(source, case_ids)
    if os.path.isfile(source):
        return ignore_from_csv(source, case_ids, geometry_of, margin)
    fail(f"ignore source {source} does not exist (expected annotations_excluded.csv or a folder of "
         f"<case>{IGNORE_SUFFIX} files)")
