"""Tiny raw nnU-Net datasets written on the fly for tests (a few seconds each)."""
import json
import os

import numpy as np
import SimpleITK as sitk


def write_raw_dataset(root, did=1, n_cases=3, channels=1, labelled=True, shape=(20, 48, 48),
                      spacing=(0.8, 0.8, 2.5), name="T"):
    """Write Dataset{did}_{name} with ellipsoid 'lesions'; shape is (Z, Y, X), spacing (x, y, z) in mm."""
    d = os.path.join(root, "nnUNet_raw", f"Dataset{did:03d}_{name}")
    os.makedirs(os.path.join(d, "imagesTr"), exist_ok=True)
    if labelled:
        os.makedirs(os.path.join(d, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(did)
    for i in range(n_cases):
        sz = (shape[0] + i if shape[0] > 1 else 1, shape[1], shape[2])
        zz, yy, xx = np.ogrid[: sz[0], : sz[1], : sz[2]]
        lab = (((zz - sz[0] / 2) ** 2 / max(1, (sz[0] / 4) ** 2) + (yy - sz[1] / 2) ** 2 / 64
                + (xx - sz[2] / 2) ** 2 / 64) < 1).astype(np.uint8)
        img = rng.normal(0, 1, sz).astype(np.float32) + 3 * lab
        for c in range(channels):
            im = sitk.GetImageFromArray(img * (1 + c))
            im.SetSpacing(spacing)
            sitk.WriteImage(im, os.path.join(d, "imagesTr", f"c{i:03d}_{c:04d}.nii.gz"))
        if labelled:
            lb = sitk.GetImageFromArray(lab)
            lb.SetSpacing(spacing)
            sitk.WriteImage(lb, os.path.join(d, "labelsTr", f"c{i:03d}.nii.gz"))
    dj = {"channel_names": {str(c): ("CT" if c == 0 else f"CT{c}") for c in range(channels)},
          "labels": {"background": 0, "lesion": 1} if labelled else {"background": 0},
          "numTraining": n_cases, "file_ending": ".nii.gz"}
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump(dj, f)
    return d


def write_pretrained_checkpoint(plans, path, num_input_channels=1):
    """A checkpoint in nnpre format standing in for a pretraining run: the plans' U-Net (1 output channel,
    seed 1) + adaptation plan. Returns clones of its ``encoder.*`` tensors."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnpre.adaptation_plan import from_nnunet_plans

    a = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(1)
    net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"],
                                 num_input_channels, 1, allow_init=True, deep_supervision=False)
    plan = from_nnunet_plans(plans, "3d_fullres", num_input_channels, pretext="mae", pretext_config={})
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan.to_dict()}, path)
    return {k: v.clone() for k, v in net.state_dict().items() if k.startswith("encoder.")}
