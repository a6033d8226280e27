"""Shared fixtures; also puts tests/ on sys.path for the ``nnpre_testdata`` helpers."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nnunet_root(tmp_path, monkeypatch):
    """An empty nnU-Net folder triple with the environment variables pointing at it."""
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(tmp_path / n)
        monkeypatch.setenv(n, str(tmp_path / n))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return tmp_path
