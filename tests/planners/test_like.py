"""``nnPre_plan --like``: the checkpoint's network exactly, for topologies nnU-Net would not derive.

Checkpoints are built here in the formats other tools write: nnssl (``network_weights`` +
``nnssl_adaptation_plan``), stock nnU-Net (``init_args`` plans) and a raw state dict without any plan.
"""
import json
import os

import pytest
import torch

from nnpre.architecture import DYNAMIC_CLASSES, KWARGS_REQUIRING_IMPORT, unet_arch_kwargs
from nnpre.errors import NnPreError
from planners.pipeline import plan_dataset

# 3 stages at a 16x32x32 patch (nnU-Net derives 4 for 32³), anisotropic strides, [1,3,3] and 5³ kernels,
# 2/1/2 residual blocks, 2+1 decoder convs, no conv bias: nothing nnU-Net's planner would produce.
RESENC_ODD = unet_arch_kwargs([4, 8, 16], [[1, 3, 3], [3, 3, 3], [5, 5, 5]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                              [2, 1, 2], [2, 1], blocks_key="n_blocks_per_stage", conv_bias=False)
# plain conv U-Net, one conv per stage, 4 stages, 1x3x3 first kernel, BatchNorm
PLAIN_ONE_CONV = unet_arch_kwargs([4, 8, 8, 16], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                                  [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [1, 1, 1, 1], [1, 1, 1],
                                  blocks_key="n_conv_per_stage", norm_op="torch.nn.modules.batchnorm.BatchNorm3d",
                                  norm_op_kwargs={"eps": 1e-05, "momentum": 0.1})


def build(family, kw, c_in, n_out=2, seed=0):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    return get_network_from_plans(DYNAMIC_CLASSES[family], kw, KWARGS_REQUIRING_IMPORT, c_in, n_out,
                                  allow_init=True, deep_supervision=False)


def nnssl_checkpoint(path, family, kw, c_in, spacing=(2.0, 2.0, 2.0), patch=(16, 32, 32), seed=0, plan=True):
    """nnssl layout: network_weights (+ nnssl_adaptation_plan unless ``plan=False``) and a citations list."""
    net = build(family, kw, c_in, seed=seed)
    ck = {"network_weights": net.state_dict(),
          "citations": [{"type": "pretraining", "name": "test", "apa_citations": ["A. Author (2026)."]}]}
    if plan:
        ck["nnssl_adaptation_plan"] = {
            "architecture_plans": {"arch_class_name": family, "arch_kwargs": kw,
                                   "arch_kwargs_requiring_import": KWARGS_REQUIRING_IMPORT},
            "pretrain_plan": {"dataset_name": "pool", "plans_name": "nnsslPlans", "configurations": {"onemmiso": {
                "spacing": list(spacing), "patch_size": list(patch),
                "normalization_schemes": ["ZScoreNormalization"] * c_in, "spacing_style": "onemmiso"}}},
            "pretrain_num_input_channels": c_in,
            "recommended_downstream_patchsize": list(patch),
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem" if family == "ResidualEncoderUNet"
            else "encoder.stages.0",
            "keys_to_in_proj": list(net.keys_to_in_proj), "key_to_lpe": None,
        }
    torch.save(ck, path)
    return net


def nnunet_checkpoint(path, kw, c_in, spacing=(2.0, 2.0, 2.0), patch=(32, 32, 32)):
    """Stock nnU-Net layout: network_weights + init_args (plans, configuration, dataset_json)."""
    net = build("PlainConvUNet", kw, c_in)
    plans = {"dataset_name": "Dataset900_Src", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": {
                 "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                 "batch_size": 2, "patch_size": list(patch), "spacing": list(spacing),
                 "normalization_schemes": ["CTNormalization"] * c_in, "use_mask_for_norm": [False] * c_in,
                 "architecture": {"network_class_name": DYNAMIC_CLASSES["PlainConvUNet"], "arch_kwargs": kw,
                                  "_kw_requires_import": KWARGS_REQUIRING_IMPORT}}}}
    dj = {"channel_names": {str(i): "CT" for i in range(c_in)}, "labels": {"background": 0, "a": 1},
          "numTraining": 2, "file_ending": ".nii.gz"}
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "init_args": {
        "plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dj}}, path)
    return net


def assert_same_network(result, family, kw, src_net, c_in):
    """The planned configuration builds the checkpoint's network: same class, kwargs and tensor shapes."""
    arch = result.configuration["architecture"]
    assert arch["network_class_name"] == DYNAMIC_CLASSES[family]
    assert arch["arch_kwargs"] == kw
    planned = build(family, arch["arch_kwargs"], c_in)
    a = {k: tuple(v.shape) for k, v in planned.state_dict().items() if ".seg_layers." not in k}
    b = {k: tuple(v.shape) for k, v in src_net.state_dict().items() if ".seg_layers." not in k}
    assert a == b


def test_like_reproduces_odd_topologies_exactly(nnunet_root, tmp_path, capsys):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=61, n_cases=2, channels=1)
    # nnssl checkpoint, 2 input channels (-> 1-channel dataset), topology nnU-Net would not derive
    ck1 = str(tmp_path / "nnssl_resenc.pth")
    net1 = nnssl_checkpoint(ck1, "ResidualEncoderUNet", RESENC_ODD, c_in=2)
    r1 = plan_dataset(61, like=ck1, preset="cpu-tiny", preprocess=False, num_processes=1)
    assert r1.plans_identifier == "nnPrePlans__nnssl_resenc"
    assert_same_network(r1, "ResidualEncoderUNet", RESENC_ODD, net1, 2)
    c = r1.configuration
    assert c["spacing"] == [2.0, 2.0, 2.0] and c["patch_size"] == [16, 32, 32]
    assert c["normalization_schemes"] == ["ZScoreNormalization"]  # one scheme for every target channel
    info = r1.plans["pretrain_info"]
    assert info["checkpoint_path"] == ck1 and info["pt_num_in_channels"] == 2 and info["citations"][0]["name"] == "test"
    assert "copied verbatim" in capsys.readouterr().out

    # stock nnU-Net checkpoint: one conv per stage, BatchNorm, CT normalisation from its init_args plans
    ck2 = str(tmp_path / "Dataset900_Src" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0" /
              "checkpoint_final.pth")
    os.makedirs(os.path.dirname(ck2))
    net2 = nnunet_checkpoint(ck2, PLAIN_ONE_CONV, c_in=1)
    r2 = plan_dataset(61, like=ck2, preset="cpu-tiny", preprocess=False, num_processes=1)
    assert r2.plans_identifier == "nnPrePlans__nnUNetTrainer"
    assert_same_network(r2, "PlainConvUNet", PLAIN_ONE_CONV, net2, 1)
    assert r2.configuration["normalization_schemes"] == ["CTNormalization"]
    assert r2.configuration["patch_size"] == [32, 32, 32]
    # both checkpoints' plans coexist, each names its checkpoint
    pre = os.path.join(os.environ["nnUNet_preprocessed"], r1.dataset_name)
    assert {"nnPrePlans__nnssl_resenc.json", "nnPrePlans__nnUNetTrainer.json"} <= set(os.listdir(pre))
    # explicit options still win; a patch the strides cannot divide is refused in one line
    r3 = plan_dataset(61, like=ck1, preset="cpu-tiny", patch_size=(32, 32, 32), preprocess=False, num_processes=1)
    assert r3.configuration["patch_size"] == [32, 32, 32] and r3.plans_identifier == r1.plans_identifier
    with pytest.raises(NnPreError, match=r"not a multiple of the checkpoint network's total stride \[2, 4, 4\]"):
        plan_dataset(61, like=ck1, preset="cpu-tiny", patch_size=(16, 30, 32), preprocess=False, num_processes=1)
    with pytest.raises(NnPreError, match="-pl plain contradicts --like"):
        plan_dataset(61, like=ck1, planner="plain", preprocess=False, num_processes=1)


def test_like_without_adaptation_plan_infers_or_asks_for_strides(nnunet_root, tmp_path, capsys):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=62, n_cases=2)
    # raw state dict with decoder: everything, strides included, is read from the tensors
    ck = str(tmp_path / "raw_full.pth")
    net = nnssl_checkpoint(ck, "ResidualEncoderUNet", RESENC_ODD, c_in=1, plan=False)
    r = plan_dataset(62, like=ck, preset="cpu-tiny", patch_size=(16, 32, 32), preprocess=False, num_processes=1)
    assert_same_network(r, "ResidualEncoderUNet", RESENC_ODD, net, 1)
    err = [e for e in capsys.readouterr().err.splitlines() if "nnssl_adaptation_plan" in e]  # (not progress bars)
    assert len(err) == 1 and err[0].startswith("note:") and "inferred from the state dict" in err[0]
    assert "strides [[1, 1, 1], [1, 2, 2], [2, 2, 2]]" in err[0]

    # encoder only: the strides are not stored -> refused until --strides is given
    enc = str(tmp_path / "raw_encoder.pth")
    torch.save({"network_weights": {k: v for k, v in net.state_dict().items() if k.startswith("encoder.")}}, enc)
    with pytest.raises(NnPreError, match=r"not stored .* pass them, e.g. --strides 1 2 2"):
        plan_dataset(62, like=enc, preprocess=False, num_processes=1)
    r2 = plan_dataset(62, like=enc, strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)], patch_size=(16, 32, 32),
                      preset="cpu-tiny", preprocess=False, num_processes=1)
    kw = r2.configuration["architecture"]["arch_kwargs"]
    assert {k: v for k, v in kw.items() if k != "n_conv_per_stage_decoder"} == \
        {k: v for k, v in RESENC_ODD.items() if k != "n_conv_per_stage_decoder"}
    assert kw["n_conv_per_stage_decoder"] == [1, 1]  # no decoder in the file: nnssl's one conv, said in the note
    with pytest.raises(NnPreError, match="--strides gives 2 stage"):
        plan_dataset(62, like=enc, strides=[(1, 1, 1), (2, 2, 2)], preprocess=False, num_processes=1)
    # a file without any U-Net encoder: one clear refusal
    bad = str(tmp_path / "vit.pth")
    torch.save({"network_weights": {"eva.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(NnPreError, match="holds no nnU-Net U-Net encoder"):
        plan_dataset(62, like=bad, preprocess=False, num_processes=1)


def _train(argv):
    from nnpre.cli.train import main

    return main(argv)


@pytest.mark.parametrize("ck_channels,data_channels", [(2, 1), (1, 3)])
def test_like_then_finetune_finds_its_plans(nnunet_root, tmp_path, capsys, ck_channels, data_channels):
    """The whole command path: nnPre_plan --like, then nnPre_train finetune --pretrained without -pl (N -> M)."""
    from nnpre_testdata import write_raw_dataset

    from nnpre.cli.plan import main as plan_main

    did = 63 + data_channels
    write_raw_dataset(nnunet_root, did=did, n_cases=3, channels=data_channels)
    ck = str(tmp_path / f"pt{ck_channels}ch.pth")
    nnssl_checkpoint(ck, "ResidualEncoderUNet", RESENC_ODD, c_in=ck_channels)
    assert plan_main(["-d", str(did), "--like", ck, "--preset", "cpu-tiny", "-np", "1"]) == 0
    ident = f"nnPrePlans__pt{ck_channels}ch"
    assert f"plans '{ident}'" in capsys.readouterr().out
    assert _train(["finetune", "-d", str(did), "-f", "all", "--pretrained", ck, "--preset", "cpu-tiny",
                   "--epochs", "1", "--iterations", "2", "--device", "cpu", "--no-validation"]) == 0
    out = capsys.readouterr().out
    assert f"plans: {ident} (written for {ck})" in out
    runs = os.listdir(os.path.join(os.environ["nnUNet_results"], os.listdir(os.environ["nnUNet_results"])[0]))
    # the run's plans variant joins the --like plans name with one '_' (nnU-Net 2.8.1 splits folders on '__')
    run = [r for r in runs if r.startswith(f"nnPreFineTuneTrainer__{ident.replace('__', '_')}_pt_")
           and r.endswith("__3d_fullres")]
    assert len(run) == 1
    rep = json.load(open(os.path.join(os.environ["nnUNet_results"], os.listdir(os.environ["nnUNet_results"])[0],
                                      run[0], "fold_all", "pretrained_transfer.json")))
    assert rep["stem_remapped"] and rep["loaded"] and all(k.startswith("encoder.") for k in rep["loaded"])


def test_plans_from_nnunet_master_like_nnssl_are_found_and_build(nnunet_root, tmp_path):
    """Plans as nnU-Net master's nnUNetv2_preprocess_like_nnssl writes them (ptPlans__NAME____<data id>, the
    adaptation plan's arch_class_name copied as network_class_name, pretrain_info) are found by --pretrained."""
    from nnpre_testdata import write_raw_dataset
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpre.plans_lookup import canonical_architecture
    from nnpre.weight_transfer import transfer_encoder
    from nnpre_trainers.run import resolve_plans_name

    write_raw_dataset(nnunet_root, did=66, n_cases=2)
    ck = str(tmp_path / "openmind_like.pth")
    net = nnssl_checkpoint(ck, "ResidualEncoderUNet", RESENC_ODD, c_in=1)
    r = plan_dataset(66, preset="cpu-tiny", patch_size=(16, 32, 32), num_processes=1)  # a normal plan + data
    pre = os.path.join(os.environ["nnUNet_preprocessed"], r.dataset_name)
    plans = json.load(open(os.path.join(pre, r.plans_identifier + ".json")))
    ad = torch.load(ck, weights_only=True)["nnssl_adaptation_plan"]
    data_id = "Spacing__2.00_2.00_2.00___Norm__Z"
    os.rename(os.path.join(pre, r.configuration["data_identifier"]), os.path.join(pre, data_id))
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(data_identifier=data_id, patch_size=ad["recommended_downstream_patchsize"], batch_size=2,
               architecture={"network_class_name": ad["architecture_plans"]["arch_class_name"],
                             "arch_kwargs": ad["architecture_plans"]["arch_kwargs"],
                             "_kw_requires_import": ad["architecture_plans"]["arch_kwargs_requiring_import"]})
    name = f"ptPlans__openmind____{data_id}"
    plans.update(plans_name=name, pretrain_info={
        "checkpoint_path": ck, "checkpoint_name": "openmind", "key_to_encoder": ad["key_to_encoder"],
        "key_to_stem": ad["key_to_stem"], "keys_to_in_proj": ad["keys_to_in_proj"], "key_to_lpe": None,
        "pt_num_in_channels": 1, "pt_used_patchsize": [16, 32, 32], "pt_recommended_downstream_patchsize": [16, 32, 32],
        "citations": []})
    json.dump(plans, open(os.path.join(pre, name + ".json"), "w"))
    assert resolve_plans_name(None, 66, ck) == name
    assert resolve_plans_name(None, 66, None) == "nnPreResEncLPlans"  # no checkpoint: the default
    # what make_trainer loads: buildable by nnU-Net 2.8.1, and the checkpoint's encoder transfers into it
    cm = PlansManager(canonical_architecture(json.load(open(os.path.join(pre, name + ".json"))))).get_configuration(
        "3d_fullres")
    tgt = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=True, deep_supervision=False)
    rep = transfer_encoder(ck, tgt)
    assert rep.loaded and not rep.remapped
    got = {k: v for k, v in tgt.state_dict().items() if k.startswith("encoder.stages.")}
    assert got and all(torch.equal(v, net.state_dict()[k]) for k, v in got.items())


def test_canonical_architecture_resolves_nnssl_presets():
    from nnpre.architecture import RESENC_L_ARCH_KWARGS
    from nnpre.plans_lookup import canonical_architecture

    plans = {"configurations": {"3d_fullres": {"architecture": {"network_class_name": "ResEncL", "arch_kwargs": None,
                                                                "_kw_requires_import": None}}}}
    out = canonical_architecture(plans)["configurations"]["3d_fullres"]["architecture"]
    assert out["network_class_name"] == DYNAMIC_CLASSES["ResidualEncoderUNet"]
    assert out["arch_kwargs"] == RESENC_L_ARCH_KWARGS and out["_kw_requires_import"] == KWARGS_REQUIRING_IMPORT
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == "ResEncL"  # not mutated
