"""Read nnDetection's ``<case>_boxes.pkl`` predictions without running code from the file.

nnDetection's predictor pickles one dict per case (``nndet/inference/ensembler/detection.py``
``get_case_result``, saved through ``to_numpy`` + ``save_pickle`` in ``nndet/inference/ensembler/base.py``):
``pred_boxes`` (N, 6) in nnDetection's ``(x1, y1, x2, y2, z1, z2)`` layout, ``pred_scores`` (N,), ``pred_labels``
(N,), ``restore`` (bool: boxes in original image voxel space), ``original_size_of_raw_data`` and the ITK
geometry (``itk_origin``, ``itk_spacing``, ``itk_direction``). ``nndet/evaluator/registry.py``
(``evaluate_box_dir``) reads exactly the first three.

A pickle can name any importable callable, so :class:`RestrictedUnpickler` resolves only the handful of numpy
reconstructors these files need (arrays, dtypes, scalars) and ``collections.OrderedDict``; any other global
(``os.system``, ``builtins.eval``, torch storages, ...) stops with a one-line error before anything is called.
"""
from __future__ import annotations

import io
import os
import pickle

from nnpre.errors import fail

#: (module, name) pairs a nnDetection box pickle may reference; numpy 1.x and 2.x spell the core module apart.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
})
_NUMPY_CORE = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy._core.multiarray": "numpy.core.multiarray"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (``path`` names the file in errors)."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            fail(f"{self.path}: refusing to unpickle {module}.{name} (only numpy arrays and plain values are "
                 f"allowed in nnDetection box predictions); regenerate the file with nnDetection")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):  # numpy 1 pickle under numpy 2 or vice versa
            return super().find_class(_NUMPY_CORE.get(module, module), name)


def read_nndet_boxes(path: str) -> dict:
    """Read one ``<case>_boxes.pkl``.

    Returns:
        ``{"boxes": (N, 6), "scores": (N,), "labels": (N,), "restore": bool}`` (arrays as stored; the caller
        converts dtypes as for our JSON predictions).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        fail(f"{path}: cannot read ({type(e).__name__}: {e})")
    try:
        data = RestrictedUnpickler(io.BytesIO(raw), path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        fail(f"{path}: not a readable pickle ({type(e).__name__}: {e}); is the file complete?")
    if not isinstance(data, dict) or not all(k in data for k in ("pred_boxes", "pred_scores", "pred_labels")):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        fail(f"{path}: expected nnDetection's dict with pred_boxes/pred_scores/pred_labels, got {keys}")
    return {"boxes": data["pred_boxes"], "scores": data["pred_scores"], "labels": data["pred_labels"],
            "restore": bool(data.get("restore", False))}


def nndet_case_id(filename: str) -> str | None:
    """``case_007_boxes.pkl`` → ``case_007``; ``None`` for other files."""
    name = os.path.basename(filename)
    return name[: -len("_boxes.pkl")] if name.endswith("_boxes.pkl") and not name.startswith(".") else None
