"""Adaptation plan: nnssl layout, plain serialisation, nnU-Net plans conversion, ResEnc-L defaults."""
import copy
import json

import pytest
import torch

from nnpre.adaptation_plan import (
    RESENC_L_ARCH_KWARGS,
    AdaptationPlan,
    from_nnunet_plans,
    ordered_channel_names,
    plain,
    resenc_l_default,
    stage_description,
)
from nnpre.errors import NnPreError


def tiny_arch_kwargs(n_blocks=(1, 2, 1, 1)):
    kw = copy.deepcopy(RESENC_L_ARCH_KWARGS)
    kw.update(n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=[[3, 3, 3]] * 4,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_blocks_per_stage=list(n_blocks),
              n_conv_per_stage_decoder=[1, 1, 1])
    return kw


def tiny_plans():
    """An nnU-Net plans dict as nnPre_plan / nnUNetv2_plan_experiment write it (tiny ResEnc)."""
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnPreResEncLPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "nnUNetPlannerResEncL",
        "label_manager": "LabelManager",
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnPreResEncLPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 16, 16],
                "spacing": [2.0, 2.0, 2.0],
                "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"],
                "use_mask_for_norm": [False, False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": tiny_arch_kwargs(),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            },
            "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [4.0, 4.0, 4.0], "patch_size": [8, 8, 8]},
        },
    }


def only_plain(obj):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, list):
        return all(only_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_plain(v) for k, v in obj.items())
    return False


def test_resenc_l_default_matches_nnssl_values():
    p = resenc_l_default()
    kw = p.arch_kwargs
    assert p.network_class_name == "ResidualEncoderUNet"
    assert kw["n_stages"] == 6 and kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kw["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and kw["kernel_sizes"] == [[3, 3, 3]] * 6
    assert (p.key_to_encoder, p.key_to_stem, p.key_to_lpe) == ("encoder.stages", "encoder.stem", None)
    assert p.keys_to_in_proj == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert p.spacing == [1.0, 1.0, 1.0] and p.patch_size == [160, 160, 160]
    assert p.normalization_schemes == ["ZScoreNormalization"]
    assert p.pretrain_num_input_channels == 1 and p.recommended_downstream_patchsize == [160, 160, 160]
    assert not p.is_nnpre


def test_resenc_l_default_builds_the_reference_network_shapes():
    # shapes only (meta device): 956 state-dict keys, ~102.3M params, ~90.3M encoder, stem 960 (nnssl ResEnc-L)
    with torch.device("meta"):
        net = resenc_l_default().build_network(1, 1)
    assert len(net.state_dict()) == 956
    assert sum(p.numel() for p in net.parameters()) == 102_348_965
    assert sum(p.numel() for p in net.encoder.parameters()) == 90_296_576
    assert sum(p.numel() for p in net.encoder.stem.parameters()) == 960


def test_to_dict_is_plain_and_round_trips_through_json_and_weights_only_torch_load(tmp_path):
    p = from_nnunet_plans(tiny_plans(), "3d_fullres", 2, pretext="mae",
                          pretext_config={"mask_ratio": 0.75, "block": (4, 4, 4)},
                          channel_names={"0": "T1", "1": "FLAIR"})
    d = p.to_dict()
    assert only_plain(d)
    # nnssl readers find their keys at the top level; nnpre's extras sit under "nnpre"
    for k in ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
              "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"):
        assert k in d
    assert d["nnpre"]["pretext"] == "mae" and d["nnpre"]["pretext_config"]["block"] == [4, 4, 4]
    assert AdaptationPlan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    d["nnpre"]["extra_input_channels"] = 1  # written by the pretraining trainer
    d["nnpre"]["future_key"] = {"a": 1}  # unknown extras survive a round trip
    p2 = AdaptationPlan.from_dict(d)
    assert p2.extra_input_channels == 1 and p2.to_dict()["nnpre"]["future_key"] == {"a": 1}
    f = tmp_path / "plan.pth"
    torch.save({"nnssl_adaptation_plan": d}, f)
    back = torch.load(f, weights_only=True)["nnssl_adaptation_plan"]  # no allow-list needed
    assert AdaptationPlan.from_dict(back) == AdaptationPlan.from_dict(d)


def test_from_nnunet_plans_reads_geometry_architecture_and_extras():
    p = from_nnunet_plans(tiny_plans(), "3d_fullres", 2, pretext="model_genesis", pretext_config={"flip_rate": 0.4},
                          channel_names={"1": "FLAIR", "0": "T1"})
    assert p.network_class_name == "ResidualEncoderUNet"
    assert p.arch_kwargs["features_per_stage"] == [4, 8, 16, 32]
    assert p.spacing == [2.0, 2.0, 2.0] and p.patch_size == [16, 16, 16]
    assert p.recommended_downstream_patchsize == [16, 16, 16]
    assert p.normalization_schemes == ["ZScoreNormalization"] * 2
    assert p.pretrain_num_input_channels == 2 and p.is_nnpre
    assert ordered_channel_names(p.channel_names) == ["T1", "FLAIR"]
    assert p.pretrain_configuration_name == "3d_fullres"
    net = p.build_network()
    assert net.encoder.stem.convs[0].conv.weight.shape == (4, 2, 3, 3, 3)


def test_from_nnunet_plans_resolves_inheritance_and_rejects_unknown_configuration():
    p = from_nnunet_plans(tiny_plans(), "3d_lowres", 1)
    assert p.spacing == [4.0, 4.0, 4.0] and p.patch_size == [8, 8, 8]
    assert p.arch_kwargs["n_stages"] == 4  # inherited architecture
    with pytest.raises(NnPreError, match="no configuration '2d'.*3d_fullres"):
        from_nnunet_plans(tiny_plans(), "2d", 1)


def test_nnssl_serialised_plan_with_preset_and_without_new_keys_gets_defaults():
    nnssl = {
        "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                          "configurations": {"onemmiso": {"spacing": [1, 1, 1], "patch_size": [160, 160, 160],
                                                          "normalization_schemes": ["ZScoreNormalization"]}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": (160, 160, 160),
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
    }
    p = AdaptationPlan.from_dict(nnssl)
    assert p.network_class_name == "ResidualEncoderUNet" and p.arch_kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert p.keys_to_in_proj == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert p.key_to_lpe is None and not p.is_nnpre
    assert p.spacing == [1.0, 1.0, 1.0] and p.patch_size == [160, 160, 160]


def test_unnamed_flat_pretrain_configuration_is_read():
    d = resenc_l_default().to_dict()
    d["pretrain_plan"]["configurations"] = {"spacing_style": "onemmiso", "spacing": [1.5, 1.5, 1.5],
                                            "patch_size": [96, 96, 96],
                                            "normalization_schemes": ["ZScoreNormalization"]}
    p = AdaptationPlan.from_dict(d)
    assert p.pretrain_configuration_name == "onemmiso"
    assert p.spacing == [1.5, 1.5, 1.5] and p.patch_size == [96, 96, 96]
    d["pretrain_plan"] = {}
    assert AdaptationPlan.from_dict(d).spacing is None and AdaptationPlan.from_dict(d).patch_size is None


def test_plain_conv_plan_uses_the_stage0_stem_keys():
    plans = tiny_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    kw = arch["arch_kwargs"]
    kw["n_conv_per_stage"] = [2, 2, 2, 2]
    del kw["n_blocks_per_stage"]
    p = from_nnunet_plans(plans, "3d_fullres", 1)
    assert p.network_class_name == "PlainConvUNet"
    assert (p.key_to_encoder, p.key_to_stem) == ("encoder.stages", "encoder.stages.0")
    # the order dynamic-network-architectures' PlainConvUNet declares (both names alias one tensor)
    assert p.keys_to_in_proj == ["encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv"]
    assert stage_description(p.arch_kwargs, "PlainConvUNet")["blocks_per_stage"] == [2, 2, 2, 2]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(NnPreError, match="architecture_plans"):
        AdaptationPlan.from_dict({"pretrain_plan": {}}, source="x.pth")
    with pytest.raises(NnPreError, match="pretext_config.fn holds a type"):
        plain({"fn": torch.nn.Conv3d}, "pretext_config")
    p = resenc_l_default()
    p.architecture_plans = {"arch_class_name": "PrimusM", "arch_kwargs": None}
    with pytest.raises(NnPreError, match="PrimusM.*not supported"):
        p.build_network()
    with pytest.raises(NnPreError, match="channel indices"):
        ordered_channel_names({"a": "T1"})


def test_stage_description_normalises_ints_and_lists():
    a = stage_description({"n_stages": 2, "features_per_stage": 8, "kernel_sizes": 3, "strides": [1, 2],
                           "n_blocks_per_stage": 1, "conv_op": "torch.nn.modules.conv.Conv3d"}, "ResEncL")
    assert a == {"network": "ResidualEncoderUNet", "conv_dim": 3, "n_stages": 2, "features_per_stage": [8, 8],
                 "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "blocks_per_stage": [1, 1]}
