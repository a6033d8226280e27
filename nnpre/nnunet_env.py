"""nnU-Net's environment variables and dataset ids, with one-line errors instead of tracebacks.

nnU-Net 2.8 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` lazily from
``os.environ`` on every use (``nnunetv2/paths.py`` reads them at import; nnU-Net 2.8.1), so setting them here before
calling nnU-Net works.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from nnpre.errors import fail

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_env(*names: str) -> dict:
    """Return ``{name: path}`` for the given nnU-Net variables; fail with the fix if one is unset."""
    out = {}
    for n in names:
        v = os.environ.get(n)
        if not v:
            fail(f"environment variable {n} is not set; export {n}=/path/to/{n} "
                 f"(or pass --root DIR to use DIR/{n}), see nnU-Net's documentation/set_environment_variables.md")
        out[n] = v
    return out


def use_root(root: str) -> dict:
    """Point all three nnU-Net variables at ``root/<name>`` (creating the folders); returns them."""
    out = {}
    for n in ENV_VARS:
        p = os.path.join(os.path.abspath(root), n)
        os.makedirs(p, exist_ok=True)
        os.environ[n] = p
        out[n] = p
    return out


def dataset_name(dataset: str | int, must_exist_in: str = "nnUNet_raw") -> str:
    """Resolve ``501`` / ``"501"`` / ``"Dataset501_Name"`` to the folder name ``Dataset501_Name``.

    Looks in the folder of the ``must_exist_in`` variable and fails with a clear message when the id is
    unknown, ambiguous, or malformed.
    """
    root = require_env(must_exist_in)[must_exist_in]
    s = str(dataset).strip()
    m = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_.*)?", s)
    if not m:
        fail(f"'{s}' is not a dataset id; pass a number like 501 or a name like Dataset501_Synthetic")
    if s.startswith("Dataset") and "_" in s:
        if not os.path.isdir(os.path.join(root, s)):
            fail(f"dataset folder {os.path.join(root, s)} does not exist; check the name or {must_exist_in}")
        return s
    prefix = f"Dataset{int(m.group(1)):03d}_"
    hits = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.startswith(prefix)
                  and os.path.isdir(os.path.join(root, d)))
    if not hits:
        fail(f"no dataset with id {int(m.group(1))} in {root} ({must_exist_in}); expected a folder {prefix}<Name>")
    if len(hits) > 1:
        fail(f"dataset id {int(m.group(1))} is ambiguous in {root}: {', '.join(hits)}; rename one of them")
    return hits[0]


def dataset_id(name: str) -> Optional[int]:
    m = re.match(r"Dataset(\d+)_", name)
    return int(m.group(1)) if m else None
