"""Seeded use of third-party code that draws from the global random generators."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Run a block with Python's, numpy's and torch's CPU *global* generators seeded from ``seed``, restored after.

    For third-party augmentations (batchgenerators, batchgeneratorsv2) that draw from the global generators
    (batchgenerators' Gaussian noise uses Python's ``random``):
    the result is a pure function of ``seed`` and nothing outside the block sees a changed global state. CUDA
    generators are never touched (``torch.random.fork_rng(devices=[])``).
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        np.random.seed(int(seed) % 2 ** 32)
        random.seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
