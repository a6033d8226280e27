"""Planner output: spacing, patch and topology for anisotropic, multi-channel, tiny and thin data."""
import json
import os

import numpy as np
import pytest

from planners.fixed_geometry import FixedGeometry
from planners.pipeline import plan_dataset


def _cfg(result):
    return result.plans["configurations"]["3d_fullres"]


def test_default_geometry_is_resenc_l_layout(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=11, spacing=(0.7, 0.7, 3.0))  # strongly anisotropic input
    r = plan_dataset(11, preprocess=False, num_processes=1)
    c = _cfg(r)
    a = c["architecture"]["arch_kwargs"]
    assert r.plans_identifier == "nnPreResEncLPlans"
    assert c["spacing"] == [1.0, 1.0, 1.0] and c["patch_size"] == [128, 128, 128]
    assert a["n_stages"] == 6
    assert a["kernel_sizes"] == [[3, 3, 3]] * 6
    assert a["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert a["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert a["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert c["batch_size"] == 2 and c["normalization_schemes"] == ["ZScoreNormalization"]
    assert r.plans["transpose_forward"] == [0, 1, 2]
    assert c["data_identifier"] == "nnPreResEncLPlans_3d_fullres"
    assert "3d_lowres" not in r.plans["configurations"]
    assert r.plans["nnpre"]["preset"] == "gpu"


def test_plain_planner_options_and_multichannel(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=12, channels=2)
    r = plan_dataset(12, planner="plain", spacing=(1.5, 1.5, 1.5), patch_size=(48, 64, 64), batch_size=3,
                     normalization="nnunet", preprocess=False, num_processes=1)
    c = _cfg(r)
    a = c["architecture"]["arch_kwargs"]
    assert r.plans_identifier == "nnPrePlans"
    assert c["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert c["spacing"] == [1.5, 1.5, 1.5] and c["patch_size"] == [48, 64, 64] and c["batch_size"] == 3
    assert len(c["normalization_schemes"]) == 2 and c["normalization_schemes"][0] == "CTNormalization"
    assert "n_conv_per_stage" in a and a["n_stages"] == len(a["strides"])
    # nnU-Net's topology: every axis divisible by the product of its strides
    prod = np.prod(np.array(a["strides"]), axis=0)
    assert all(p % s == 0 for p, s in zip(c["patch_size"], prod))


def test_undivisible_patch_is_padded_by_nnunet_topology(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=13)
    r = plan_dataset(13, preset="cpu-tiny", patch_size=(30, 30, 30), preprocess=False, num_processes=1)
    assert _cfg(r)["patch_size"] == [32, 32, 32]


@pytest.mark.parametrize("shape,spacing", [((8, 16, 16), (1.0, 1.0, 2.0)),  # smaller than the 32³ patch
                                           ((1, 40, 40), (0.8, 0.8, 3.0))])  # a single slice
def test_small_and_single_slice_images_are_padded_to_the_patch(nnunet_root, shape, spacing):
    from nnpre_testdata import write_raw_dataset
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    write_raw_dataset(nnunet_root, did=14, shape=shape, spacing=spacing)
    r = plan_dataset(14, preset="cpu-tiny", num_processes=1)
    c = _cfg(r)
    assert c["patch_size"] == [32, 32, 32] and c["spacing"] == [2.0, 2.0, 2.0]
    ds = nnUNetDatasetBlosc2(r.preprocessed_folder)
    pm = PlansManager(r.plans)
    lm = pm.get_label_manager(json.load(open(os.path.join(os.environ["nnUNet_raw"], r.dataset_name,
                                                          "dataset.json"))))
    dl = nnUNetDataLoader(ds, 2, c["patch_size"], c["patch_size"], lm, oversample_foreground_percent=0.5)
    batch = next(dl)
    assert tuple(batch["data"].shape) == (2, 1, 32, 32, 32)
    assert tuple(batch["target"].shape) == (2, 1, 32, 32, 32)


def test_geometry_validation():
    from nnpre.errors import NnPreError

    with pytest.raises(NnPreError, match="spacing"):
        FixedGeometry(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(NnPreError, match="patch"):
        FixedGeometry(patch_size=(2, 64, 64))
    with pytest.raises(NnPreError, match="preset"):
        FixedGeometry.from_preset("huge")
