"""One checked way to read an image or label file: used by ``nnPre_plan`` (dataset checks), ``nnPre_predict``
and ``nnPre_evaluate``.

What SimpleITK does not catch, and what is checked here instead (each problem stops with one
:class:`~nnpre.errors.NnPreError` line naming the file and the fix):

* **Truncated or corrupt NIfTI.** ITK's NIfTI reader fills the missing part of a truncated ``.nii.gz`` /
  ``.nii`` with zeros and returns without an error (measured with SimpleITK 2.x: a ``.nii.gz`` cut in half
  reads as an image whose second half is 0). :func:`scan_nifti` therefore reads the whole data block
  (through Python's ``gzip``, which checks the end-of-stream marker and the CRC) and compares its length with
  what the header promises (``vox_offset + prod(dim) * bitpix / 8``). MetaImage and NRRD readers already
  fail on short files; their multi-line ITK messages become one line.
* **NaN / Inf voxels.** ITK's NIfTI reader silently turns NaN and ±Inf into 0, so they are counted in the raw
  data block during the same scan; other formats keep them and the array is checked.
* **Dimension.** nnpre models are 3-D; a 2-D file (which nnU-Net would read as a 1-slice volume with a
  999 mm slice spacing) is refused.
* **Label values** (``kind="label"``): integers only, no negative values (nnU-Net uses -1 internally for
  "outside the image"), and only the values declared in ``dataset.json`` ``labels`` when those are given.

Geometry comparison (:func:`same_geometry`) uses ``numpy.allclose`` with its default tolerances for spacing,
origin and direction and exact equality for the shape, as nnU-Net's ``verify_dataset_integrity`` does
(nnunetv2/experiment_planning/verify_dataset_integrity.py).
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from nnpre.errors import fail

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: Read size for the NIfTI scan: a multiple of every voxel size (1, 2, 4, 8, 16 bytes).
_CHUNK = 1 << 22


@dataclass(frozen=True)
class NiftiScan:
    """Result of :func:`scan_nifti`."""

    data_bytes: int  # bytes of voxel data the header promises
    voxels: int  # voxels (times components) in the data block
    nonfinite: int  # NaN / ±Inf values in the raw data block (0 for integer types)
    scaled: bool = False  # scl_slope / scl_inter or a compound type: raw values are not what ITK returns
    values: Optional[np.ndarray] = None  # distinct raw values (``values=True``, integer-valued data only)
    fractional: Optional[float] = None  # a non-integer raw value, if any (``values=True``)


class _ValueSet:
    """Distinct values of integer-valued chunks: a presence table for 0..65535, a set for the rest."""

    def __init__(self):
        self.present = np.zeros(1 << 16, bool)
        self.other: set = set()
        self.fractional: Optional[float] = None

    def add(self, v: np.ndarray) -> None:
        if v.size == 0 or self.fractional is not None:
            return
        if not np.issubdtype(v.dtype, np.integer):
            v = v[np.isfinite(v)]
            vi = v.astype(np.int64)
            frac = v != vi
            if frac.any():
                self.fractional = float(v[frac][0])
                return
            v = vi
        lo, hi = int(v.min()), int(v.max())
        if lo >= 0 and hi < (1 << 16):
            self.present[np.flatnonzero(np.bincount(v.astype(np.intp, copy=False)))] = True
        else:
            self.other.update(int(x) for x in np.unique(v))

    def result(self) -> np.ndarray:
        return np.union1d(np.flatnonzero(self.present), np.asarray(sorted(self.other), np.int64)).astype(np.int64)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK messages end with the interesting part ("Reason: ..." / "data not read completely")
    return (lines[-1] if lines else type(e).__name__)[:300]


def scan_nifti(path: str, values: bool = False) -> NiftiScan:
    """Read the complete data block of a NIfTI file; fail when it is truncated or its gzip stream is corrupt.

    Args:
        path: ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2).
        values: also collect the distinct raw values (for label files; one pass, no image in memory).

    Returns:
        :class:`NiftiScan` with the expected data size and the number of NaN/Inf values (float types only).
    """
    import nibabel as nib

    try:
        img = nib.load(path)
        hdr = img.header
        # the offset nibabel reads from: vox_offset, raised to header + extensions when a writer left it 0
        # (ITK writes vox_offset 0 in single-file NIfTI)
        offset = int(img.dataobj.offset)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        # nibabel moves scl_slope / scl_inter from the header into the array proxy when loading
        slope, inter = float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))
    except Exception as e:  # nibabel raises many types for a broken header
        fail(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {_one_line(e)}); the file is corrupt or "
             f"truncated, copy it again from the source")
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    nbytes = voxels * dtype.itemsize
    is_float = dtype.fields is None and np.issubdtype(dtype, np.floating)
    scaled = (dtype.fields is not None or not np.issubdtype(dtype, np.number)
              or slope != 1.0 or inter != 0.0)
    seen = _ValueSet() if values and not scaled else None
    nonfinite = 0
    opener = gzip.open if path.endswith(".gz") else open
    got = 0
    try:
        with opener(path, "rb") as f:
            skip = offset
            while skip > 0:
                b = f.read(min(skip, _CHUNK))
                if not b:
                    break
                skip -= len(b)
            if skip > 0:
                got = -1
            else:
                while got < nbytes:
                    b = f.read(min(_CHUNK, nbytes - got))
                    if not b:
                        break
                    got += len(b)
                    if is_float or seen is not None:
                        usable = len(b) - len(b) % dtype.itemsize
                        v = np.frombuffer(b[:usable], dtype=dtype)
                        if is_float:
                            nonfinite += int(v.size - np.count_nonzero(np.isfinite(v)))
                        if seen is not None:
                            seen.add(v)
                if path.endswith(".gz"):
                    while f.read(_CHUNK):  # to the end: gzip checks the end-of-stream marker and the CRC here
                        pass
    except (EOFError, OSError, zlib.error) as e:
        fail(f"{path}: the gzip stream is truncated or corrupt ({_one_line(e)}); SimpleITK would read the missing "
             f"part as zeros. Copy the file again from the source (check it with 'gzip -t')")
    if got < nbytes:
        have = max(got, 0)
        fail(f"{path}: truncated NIfTI file: the header promises {nbytes} bytes of voxel data, the file holds "
             f"{have} ({100.0 * have / max(nbytes, 1):.1f} %); SimpleITK would read the rest as zeros. Copy the file "
             f"again from the source")
    return NiftiScan(data_bytes=nbytes, voxels=voxels, nonfinite=nonfinite, scaled=scaled,
                     values=seen.result() if seen is not None else None,
                     fractional=seen.fractional if seen is not None else None)


def read_header(path: str):
    """(size (x, y, z), spacing, origin, direction) of an image file, SimpleITK index order; one-line errors."""
    import SimpleITK as sitk

    if not os.path.isfile(path):
        fail(f"{path} does not exist")
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        fail(f"cannot read image header of {path} ({_one_line(e)}); the file is corrupt or not a supported image "
             f"format")
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def allowed_label_values(labels: dict) -> set[int]:
    """Every integer value a label file may hold under ``dataset.json['labels']`` (regions: the union of their
    lists; the ``ignore`` label included)."""
    out: set[int] = set()
    for v in labels.values():
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            try:
                out.add(int(x))
            except (TypeError, ValueError):
                fail(f"dataset.json labels: value {x!r} is not an integer; labels map names to 0, 1, 2, ...")
    return out


def _fractional(path: str, example: float) -> None:
    fail(f"{path}: label map holds fractional values (e.g. {example}); labels must be integers 0, 1, 2, ... (was it "
         f"resampled with linear interpolation? use nearest neighbour)")


def label_values(arr: np.ndarray, path: str) -> np.ndarray:
    """Sorted distinct values of a label array (integers >= 0), with one-line errors for fractional or
    negative values."""
    a = np.asarray(arr)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            fail(f"{path}: label maps must hold integer class values, got dtype {a.dtype}")
        finite = np.isfinite(a)
        if not finite.all():
            fail(f"{path}: label map holds NaN/Inf values; labels must be integers 0, 1, 2, ...")
        frac = np.mod(a, 1) != 0
        if frac.any():
            _fractional(path, float(a[frac].flat[0]))
        a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        fail(f"{path}: label map holds the negative value {lo}; labels must be 0 (background), 1, 2, ... (nnU-Net "
             f"reserves -1 for 'outside the image')")
    if hi < (1 << 16):
        counts = np.bincount(a.ravel().astype(np.intp, copy=False), minlength=1)
        return np.flatnonzero(counts).astype(np.int64)
    return np.unique(a).astype(np.int64)


def check_label_values(arr: np.ndarray, path: str, allowed: Optional[Iterable[int]] = None,
                       source: str = "dataset.json") -> np.ndarray:
    """:func:`label_values` plus: every value must be in ``allowed`` (when given). Returns the values."""
    vals = label_values(arr, path)
    if allowed is not None:
        allowed = set(int(x) for x in allowed)
        extra = [int(v) for v in vals if int(v) not in allowed]
        if extra:
            fail(f"{path}: label value(s) {extra} are not declared in {source} (labels {sorted(allowed)}); add them to "
                 f"'labels' in {source} or fix the label file")
    return vals


def _nonfinite_message(path: str, bad: int, total: int) -> str:
    what = "every voxel is" if bad >= total else f"{bad} of {total} voxels are"
    return (f"{path}: {what} NaN or infinite; replace them (e.g. numpy.nan_to_num, or the scanner's padding "
            f"value) or remove the case")


def read_image(path: str, kind: str = "image", allowed_labels: Optional[Iterable[int]] = None,
               ndim: Optional[int] = 3, label_source: str = "dataset.json"):
    """Read ``path`` with SimpleITK after the integrity checks above.

    Args:
        path: image file (any format SimpleITK reads; ``.nii``/``.nii.gz`` get the full data scan).
        kind: ``"image"`` (values must be finite) or ``"label"`` (integers >= 0, in ``allowed_labels``).
        allowed_labels: label values declared in dataset.json (labels only); None = any integer >= 0.
        ndim: required number of dimensions (3 for every nnpre model; None = any).
        label_source: what ``allowed_labels`` came from, for the message.

    Returns:
        the ``SimpleITK.Image`` (array via ``GetArrayFromImage``: axes (Z, Y, X)).
    """
    import SimpleITK as sitk

    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    if not os.path.isfile(path):
        fail(f"{path} does not exist" + (" (it is a folder)" if os.path.isdir(path) else ""))
    scan = scan_nifti(path) if path.endswith(NIFTI_ENDINGS) else None
    try:
        im = sitk.ReadImage(path)
    except RuntimeError as e:
        fail(f"cannot read {path} ({_one_line(e)}); the file is truncated, corrupt or not a supported image format")
    if ndim is not None and im.GetDimension() != ndim:
        fail(f"{path} is a {im.GetDimension()}-D image (size {list(im.GetSize())}); nnpre works on {ndim}-D volumes. "
             f"Stack 2-D slices into one 3-D file with its real slice spacing")
    if im.GetNumberOfComponentsPerPixel() != 1:
        fail(f"{path} has {im.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector image); save each "
             f"channel as its own file (CASE_0000, CASE_0001, ...)")
    arr = sitk.GetArrayViewFromImage(im)
    if kind == "image":
        if scan is not None and scan.nonfinite:
            fail(_nonfinite_message(path, scan.nonfinite, scan.voxels))
        if np.issubdtype(arr.dtype, np.floating):
            n_ok = int(np.count_nonzero(np.isfinite(arr)))
            if n_ok != arr.size:
                fail(_nonfinite_message(path, arr.size - n_ok, arr.size))
    else:
        if scan is not None and scan.nonfinite:
            fail(f"{path}: label map holds NaN/Inf values; labels must be integers 0, 1, 2, ...")
        check_label_values(arr, path, allowed_labels, label_source)
    return im


def check_file(path: str, kind: str = "image", allowed_labels: Optional[Iterable[int]] = None,
               label_source: str = "dataset.json") -> None:
    """The content checks of :func:`read_image` without keeping the image (dimensions are the caller's header
    check). An unscaled NIfTI file is checked in the one pass of :func:`scan_nifti` (one decompression); other
    formats and scaled NIfTI go through :func:`read_image`."""
    if path.endswith(NIFTI_ENDINGS):
        scan = scan_nifti(path, values=(kind == "label"))
        if not scan.scaled:
            if kind == "image":
                if scan.nonfinite:
                    fail(_nonfinite_message(path, scan.nonfinite, scan.voxels))
                return
            if scan.nonfinite:
                fail(f"{path}: label map holds NaN/Inf values; labels must be integers 0, 1, 2, ...")
            if scan.fractional is not None:
                _fractional(path, scan.fractional)
            check_label_values(scan.values, path, allowed_labels, label_source)
            return
    read_image(path, kind=kind, allowed_labels=allowed_labels, ndim=None, label_source=label_source)


def geometry(im) -> tuple:
    """(shape (x, y, z) SimpleITK size, spacing, origin, direction) of a SimpleITK image or image reader."""
    return tuple(im.GetSize()), tuple(im.GetSpacing()), tuple(im.GetOrigin()), tuple(im.GetDirection())


def geometry_difference(a: Sequence, b: Sequence) -> Optional[str]:
    """None when two :func:`geometry` tuples agree (shape exactly; spacing, origin and direction with
    ``numpy.allclose`` defaults, as nnU-Net's verify_dataset_integrity), else what differs, in words."""
    names = ("shape", "spacing", "origin", "direction")
    for name, x, y in zip(names, a, b):
        if x is None or y is None:
            continue
        if name == "shape":
            if tuple(int(v) for v in x) != tuple(int(v) for v in y):
                return f"shape {list(x)} vs {list(y)}"
        else:
            x, y = np.asarray(x, float), np.asarray(y, float)
            if x.shape != y.shape or not np.allclose(x, y):
                return f"{name} {np.round(x, 6).tolist()} vs {np.round(y, 6).tolist()}"
    return None
