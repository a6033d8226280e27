"""Safe checkpoint loading (weights_only + exact allow-list), format detection, atomic saving."""
import builtins
import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch

from nnpre.adaptation_plan import RESENC_L_ARCH_KWARGS, from_nnunet_plans
from nnpre.checkpoints import (
    read_pretrained,
    safe_load,
    save_checkpoint_atomic,
    strip_prefixes,
)
from nnpre.errors import NnPreError

torch.set_num_threads(1)


def tiny_plans():
    kw = copy.deepcopy(RESENC_L_ARCH_KWARGS)
    kw.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_blocks_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetResEncUNetLPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "nnUNetPlannerResEncL", "label_manager": "LabelManager",
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 16, 16], "spacing": [2.0, 2.0, 2.0],
            "normalization_schemes": ["CTNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, False],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


def nnunet_checkpoint(network_weights=None):
    """A dict laid out like nnUNetTrainer.save_checkpoint (v2.8.1) writes it."""
    plans = tiny_plans()
    dataset_json = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "tumor": 1},
                    "numTraining": 2, "file_ending": ".nii.gz"}
    if network_weights is None:
        net = from_nnunet_plans(plans, "3d_fullres", 2).build_network(2, 2)
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        net(torch.randn(1, 2, 16, 16, 16)).mean().backward()
        opt.step()
        network_weights, optimizer_state = net.state_dict(), opt.state_dict()
    else:
        optimizer_state = {"state": {}, "param_groups": []}
    f64 = np.float64
    return {
        "network_weights": network_weights,
        "optimizer_state": optimizer_state,
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [f64(0.5), f64(0.6)], "ema_fg_dice": [f64(0.5), f64(0.51)],
                    "dice_per_class_or_region": [[f64(0.5)], [f64(0.6)]], "train_losses": [f64(-0.2), f64(-0.3)],
                    "val_losses": [f64(-0.1), f64(-0.2)], "lrs": [0.01, 0.0099],
                    "epoch_start_timestamps": [1.0, 2.0], "epoch_end_timestamps": [1.5, 2.5]},
        "_best_ema": f64(0.51),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


class MarkerPayload:
    """Unpickling this object opens (creates) a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_realistic_nnunet_checkpoint_loads_with_weights_only_and_the_allow_list(tmp_path):
    f = tmp_path / "checkpoint_final.pth"
    ck = nnunet_checkpoint()
    ck["logging"]["extra_array"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save(ck, f)
    with pytest.raises(pickle.UnpicklingError):  # the allow-list is really needed for nnU-Net files
        torch.load(f, weights_only=True)
    d = safe_load(f)
    assert d["init_args"]["device"] == torch.device("cpu")
    assert d["_best_ema"] == pytest.approx(0.51) and isinstance(d["_best_ema"], np.float64)
    assert np.array_equal(d["logging"]["extra_array"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert d["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert all(torch.equal(d["network_weights"][k], v) for k, v in ck["network_weights"].items())


@pytest.mark.parametrize("payload_cls", [MarkerPayload, ShellPayload])
def test_code_payload_is_refused_without_running(tmp_path, payload_cls):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "x": payload_cls(marker)}, f)
    with pytest.raises(NnPreError, match="evil.pth: refused to load") as e:
        safe_load(f)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(NnPreError):
        read_pretrained(f)
    assert not marker.exists()


def test_payload_control_really_executes_with_unsafe_loading(tmp_path):
    # proves the payload above is live: only weights_only keeps the marker from appearing
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    torch.save({"x": MarkerPayload(marker)}, f)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_legacy_raw_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pkl"
    with open(f, "wb") as fh:
        pickle.dump({"network_weights": MarkerPayload(marker)}, fh, protocol=2)
    with pytest.raises(NnPreError, match="refused to load"):
        safe_load(f)
    assert not marker.exists()


def test_object_arrays_are_outside_the_allow_list(tmp_path):
    f = tmp_path / "obj.pth"
    torch.save({"a": np.array([{"k": 1}], dtype=object)}, f)
    with pytest.raises(NnPreError, match="refused to load"):
        safe_load(f)


def test_missing_corrupt_and_non_checkpoint_files(tmp_path):
    with pytest.raises(NnPreError, match="not found"):
        safe_load(tmp_path / "nope.pth")
    bad = tmp_path / "truncated.pth"
    good = tmp_path / "good.pth"
    torch.save({"network_weights": {"w": torch.zeros(100)}}, good)
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(NnPreError, match="truncated.pth: cannot read"):
        safe_load(bad)
    lst = tmp_path / "list.pth"
    torch.save([1, 2], lst)
    with pytest.raises(NnPreError, match="expected a checkpoint dict"):
        safe_load(lst)
    torch.save({"state_dict": {}}, lst)
    with pytest.raises(NnPreError, match="no 'network_weights'"):
        read_pretrained(lst)


def test_strip_prefixes():
    sd = {"module._orig_mod.encoder.stem.w": 1, "_orig_mod.decoder.x": 2, "encoder.module.y": 3}
    assert list(strip_prefixes(sd)) == ["encoder.stem.w", "decoder.x", "encoder.module.y"]


def test_read_nnunet_format_with_wrapper_prefixes(tmp_path):
    ck = nnunet_checkpoint()
    ref = ck["network_weights"]
    ck["network_weights"] = {("module._orig_mod." if i % 2 else "module.") + k: v
                             for i, (k, v) in enumerate(ref.items())}
    f = tmp_path / "checkpoint_final.pth"
    torch.save(ck, f)
    pc = read_pretrained(f)
    assert pc.source_format == "nnunet" and pc.path == str(f)
    assert list(pc.state_dict) == list(ref)
    assert pc.plan.pretrain_num_input_channels == 2 and pc.stem_input_channels == 2
    assert pc.plan.channel_names == {"0": "CT", "1": "PET"}
    assert pc.plan.arch_kwargs["features_per_stage"] == [4, 8, 16]
    assert pc.meta["trainer_name"] == "nnUNetTrainer"
    enc = pc.encoder_state_dict()
    assert enc and all(k.startswith(("encoder.stages.", "encoder.stem.")) for k in enc)


def test_read_nnpre_and_nnssl_formats(tmp_path, capsys):
    plan = from_nnunet_plans(tiny_plans(), "3d_fullres", 1, pretext="mae", pretext_config={"mask_ratio": 0.75})
    sd = plan.build_network(1, 1).state_dict()
    # nnpre: nnU-Net trainer keys + plan with the nnpre record
    f = tmp_path / "nnpre.pth"
    ck = nnunet_checkpoint(network_weights=sd)
    ck["nnssl_adaptation_plan"] = plan.to_dict()
    torch.save(ck, f)
    pc = read_pretrained(f)
    assert pc.source_format == "nnpre" and pc.plan.pretext == "mae"
    # nnssl with plan (no nnpre record), as released: network_weights + plan only
    d = plan.to_dict()
    del d["nnpre"]
    f2 = tmp_path / "nnssl.pth"
    torch.save({"network_weights": sd, "nnssl_adaptation_plan": d}, f2)
    pc2 = read_pretrained(f2)
    assert pc2.source_format == "nnssl" and pc2.plan.pretext is None
    assert pc2.plan.arch_kwargs == plan.arch_kwargs
    assert capsys.readouterr().err == ""
    # nnssl without plan: the architecture is inferred from the state dict (every kwarg), one note line
    f3 = tmp_path / "raw_nnssl.pth"
    torch.save({"network_weights": sd}, f3)
    pc3 = read_pretrained(f3)
    assert pc3.source_format == "nnssl" and pc3.meta["plan"].startswith("inferred")
    assert pc3.plan.arch_kwargs == plan.arch_kwargs and pc3.plan.network_class_name == plan.network_class_name
    assert pc3.meta["strides_known"] and pc3.plan.pretrain_num_input_channels == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note:") and "raw_nnssl.pth" in err[0] and "3 stages" in err[0]


def test_save_checkpoint_atomic_writes_and_never_leaves_partial_files(tmp_path):
    f = tmp_path / "sub" / "ck.pth"
    save_checkpoint_atomic({"network_weights": {"w": torch.ones(3)}}, f)
    assert torch.equal(safe_load(f)["network_weights"]["w"], torch.ones(3))
    with pytest.raises(Exception):
        save_checkpoint_atomic({"network_weights": {"w": torch.zeros(3)}, "bad": lambda: 0}, f)
    assert torch.equal(safe_load(f)["network_weights"]["w"], torch.ones(3))  # old file intact
    assert sorted(os.listdir(f.parent)) == ["ck.pth"]  # no temporaries left


def test_numpy1_pickled_names_load(tmp_path):
    # numpy 1.x pickles name numpy.core.multiarray.*; protocol-2 legacy files are newline-framed, so renaming works
    buf = io.BytesIO()
    torch.save({"_best_ema": np.float64(0.5), "arr": np.arange(3.0), "network_weights": {"w": torch.ones(2)}}, buf,
               _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    assert raw.count(b"numpy._core.multiarray") == 2
    f = tmp_path / "numpy1.pth"
    f.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    d = safe_load(f)
    assert d["_best_ema"] == 0.5 and d["arr"].tolist() == [0.0, 1.0, 2.0]
