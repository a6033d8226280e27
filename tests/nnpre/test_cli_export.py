"""nnPre_export: encoder checkpoint + plan, and a full checkpoint stock nnU-Net's loader accepts."""
import copy

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnpre.adaptation_plan import RESENC_L_ARCH_KWARGS, AdaptationPlan, resenc_l_default
from nnpre.checkpoints import read_pretrained, save_checkpoint_atomic
from nnpre.cli.export import main
from nnpre.weight_transfer import transfer_encoder

torch.set_num_threads(1)


def tiny_plan():
    kw = copy.deepcopy(RESENC_L_ARCH_KWARGS)
    kw.update(n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=[[3, 3, 3]] * 4,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_blocks_per_stage=[1, 2, 1, 1],
              n_conv_per_stage_decoder=[1, 1, 1])
    d = resenc_l_default().to_dict()
    d["architecture_plans"] = {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": kw,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    d["nnpre"] = {"pretext": "diffusion", "pretext_config": {"timesteps": 1000}, "channel_names": {"0": "CT"}}
    return AdaptationPlan.from_dict(d)


@pytest.fixture()
def pretrained(tmp_path):
    """An nnpre pretraining checkpoint: trainer keys, full network + a pretext-only module, plan."""
    plan = tiny_plan()
    torch.manual_seed(0)
    net = plan.build_network(1, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    weights = dict(net.state_dict())
    weights["nnpre_conditioning.time_embed.0.weight"] = torch.randn(8, 4)
    weights["nnpre_conditioning.time_embed.0.bias"] = torch.randn(8)
    f = tmp_path / "checkpoint_final.pth"
    save_checkpoint_atomic({"network_weights": weights, "optimizer_state": None, "grad_scaler_state": None,
                            "current_epoch": 10, "trainer_name": "nnPreDiffusionTrainer",
                            "nnssl_adaptation_plan": plan.to_dict()}, f)
    return f, plan, {k: v.clone() for k, v in weights.items()}


def test_encoder_export_has_encoder_and_stem_only_and_loads_weights_only(tmp_path, pretrained, capsys):
    f, plan, src = pretrained
    out = tmp_path / "export" / "encoder.pth"
    assert main([str(f), "-o", str(out)]) == 0  # --encoder-only is the default
    assert "encoder + stem" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)  # plain torch, no allow-list
    keys = set(ck["network_weights"])
    assert keys == {k for k in src if k.startswith(("encoder.stages.", "encoder.stem."))}
    assert ck["nnssl_adaptation_plan"]["nnpre"]["pretext"] == "diffusion"
    assert ck["nnssl_adaptation_plan"]["key_to_encoder"] == "encoder.stages"
    # and it is a valid source for the transfer
    net = plan.build_network(1, 2)
    rep = transfer_encoder(read_pretrained(out), net)
    assert rep.source_format == "nnpre" and rep.skipped == []
    assert torch.equal(net.state_dict()["decoder.encoder.stages.2.blocks.0.conv1.conv.weight"],
                       src["encoder.stages.2.blocks.0.conv1.conv.weight"])
    # the stock nnU-Net loader does not accept an encoder-only file (why --full exists)
    with pytest.raises(AssertionError, match="missing"):
        load_pretrained_weights(plan.build_network(1, 2), str(out))


def test_full_export_is_accepted_by_stock_load_pretrained_weights(tmp_path, pretrained, capsys):
    f, plan, src = pretrained
    out = tmp_path / "full.pth"
    assert main([str(f), "-o", str(out), "--full"]) == 0
    assert "-pretrained_weights" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    keys = set(ck["network_weights"])
    assert not any(k.startswith("nnpre_conditioning.") or ".seg_layers." in k for k in keys)
    assert any(k.startswith("decoder.encoder.") for k in keys) and any(".all_modules." in k for k in keys)
    torch.manual_seed(5)
    target = plan.build_network(1, 3)  # a downstream net with 3 classes
    seg_before = {k: v.clone() for k, v in target.state_dict().items() if ".seg_layers." in k}
    load_pretrained_weights(target, str(out))
    sd = target.state_dict()
    for k, v in sd.items():
        if ".seg_layers." in k:
            assert torch.equal(v, seg_before[k])
        else:
            assert torch.equal(v, src[k[len("decoder."):]] if k.startswith("decoder.encoder.") else src[k]), k


def test_full_export_with_stem_remap_for_more_channels(tmp_path, pretrained):
    f, plan, src = pretrained
    out = tmp_path / "full3.pth"
    assert main([str(f), "-o", str(out), "--full", "--input-channels", "3"]) == 0
    target = plan.build_network(3, 2)
    load_pretrained_weights(target, str(out))
    w0 = src["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(target.state_dict()["encoder.stem.convs.0.all_modules.0.weight"],
                       w0.repeat(1, 3, 1, 1, 1) / 3)
    info = torch.load(out, weights_only=True)["nnpre_export"]
    assert info["input_channels"] == 3 and len(info["remapped"]) == 2


def test_exports_drop_pretext_only_input_channels(tmp_path):
    plan = tiny_plan()
    torch.manual_seed(0)
    net = plan.build_network(2, 1)  # 1 image channel + 1 appended by the pretext task
    plan.extra_input_channels = 1
    f = tmp_path / "diffusion.pth"
    save_checkpoint_atomic({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan.to_dict()}, f)
    w0 = net.state_dict()["encoder.stem.convs.0.conv.weight"]
    enc, full = tmp_path / "enc.pth", tmp_path / "full.pth"
    assert main([str(f), "-o", str(enc)]) == 0 and main([str(f), "-o", str(full), "--full"]) == 0
    e = torch.load(enc, weights_only=True)
    assert torch.equal(e["network_weights"]["encoder.stem.convs.0.conv.weight"], w0[:, :1])
    assert e["nnssl_adaptation_plan"]["nnpre"]["extra_input_channels"] == 0
    target = plan.build_network(1, 2)
    load_pretrained_weights(target, str(full))
    assert torch.equal(target.state_dict()["encoder.stem.convs.0.all_modules.0.weight"], w0[:, :1])


def test_full_export_of_an_encoder_only_file_fails_cleanly(tmp_path, pretrained, capsys):
    f, _, _ = pretrained
    enc = tmp_path / "enc.pth"
    main([str(f), "-o", str(enc), "--encoder-only"])
    out = tmp_path / "full.pth"
    with pytest.raises(SystemExit) as e:
        main([str(enc), "-o", str(out), "--full"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--full needs a full network checkpoint" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pth", "enc.pth"]


def test_cli_argument_errors(tmp_path, pretrained, capsys):
    f, _, _ = pretrained
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.pth"), "-o", str(tmp_path / "x.pth")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(f), "-o", str(tmp_path / "x.pth"), "--input-channels", "2"])
    assert e.value.code == 2 and "only apply to --full" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(f), "-o", str(tmp_path / "x.pth"), "--full", "--encoder-only"])  # argparse: exclusive


def _load_as_nnunet_master(path, c_down, n_classes=2):
    """Read an export through the fields nnU-Net master reads (commit 887c02ee, ``like_nnssl.py``
    ``preprocess_like_nnssl`` and ``PretrainedTrainer.load_pretrained_weights``) and load it the same way:
    strict ``load_state_dict`` on ``get_submodule(key_to_encoder)`` / ``get_submodule(key_to_stem)``, the stem's
    first in-projection repeated over the downstream channels / C_down. Returns (network, fields)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    ck = torch.load(path, weights_only=True, map_location="cpu")
    ap = ck["nnssl_adaptation_plan"]
    citations = ck["citations"] if "citations" in ck else []
    config = list(ap["pretrain_plan"]["configurations"].keys())[0]
    arch = dict(ap["architecture_plans"])
    fields = {
        "network_class_name": arch.pop("arch_class_name"),
        "_kw_requires_import": arch.pop("arch_kwargs_requiring_import"),
        "arch_kwargs": arch["arch_kwargs"],
        "spacing": ap["pretrain_plan"]["configurations"][config]["spacing"],
        "pt_used_patchsize": ap["pretrain_plan"]["configurations"][config]["patch_size"],
        "key_to_encoder": ap["key_to_encoder"], "key_to_stem": ap["key_to_stem"],
        "keys_to_in_proj": ap["keys_to_in_proj"], "key_to_lpe": ap["key_to_lpe"],
        "pt_num_in_channels": ap["pretrain_num_input_channels"],
        "pt_recommended_downstream_patchsize": ap["recommended_downstream_patchsize"],
        "citations": citations,
    }
    # nnU-Net 2.8.1 resolves the short class name by searching dynamic_network_architectures
    net = get_network_from_plans(fields["network_class_name"], fields["arch_kwargs"], fields["_kw_requires_import"],
                                 c_down, n_classes, allow_init=True, deep_supervision=False)
    sd = ck["network_weights"]
    enc_key, stem_key = fields["key_to_encoder"], fields["key_to_stem"]
    enc = {k[len(enc_key) + 1:]: v for k, v in sd.items() if k.startswith(enc_key)}
    stem = {k[len(stem_key) + 1:]: v for k, v in sd.items() if k.startswith(stem_key)}
    if c_down > fields["pt_num_in_channels"]:
        w = sd[fields["keys_to_in_proj"][0] + ".weight"].repeat(1, c_down, 1, 1, 1) / c_down
        for k in fields["keys_to_in_proj"]:
            stem[k[len(stem_key) + 1:] + ".weight"] = w
    net.get_submodule(net.key_to_encoder).load_state_dict(enc)
    net.get_submodule(net.key_to_stem).load_state_dict(stem)
    return net, fields


@pytest.mark.parametrize("c_down", [1, 3])
def test_encoder_export_loads_through_nnunet_master_fields(tmp_path, pretrained, c_down):
    f, plan, src = pretrained
    out = tmp_path / "enc.pth"
    assert main([str(f), "-o", str(out)]) == 0
    net, fields = _load_as_nnunet_master(out, c_down)
    assert fields["network_class_name"] == "ResidualEncoderUNet" and fields["arch_kwargs"] == plan.arch_kwargs
    assert fields["key_to_encoder"] == net.key_to_encoder and fields["key_to_stem"] == net.key_to_stem
    assert list(fields["keys_to_in_proj"]) == list(net.keys_to_in_proj) and fields["key_to_lpe"] is None
    assert fields["pt_num_in_channels"] == 1 and fields["spacing"] == plan.spacing
    assert fields["pt_recommended_downstream_patchsize"] == plan.recommended_downstream_patchsize
    # every encoder tensor bit-identical (the stem's in-projection remapped by master's rule for c_down > 1)
    got = net.state_dict()
    enc_keys = [k for k in src if k.startswith("encoder.")]
    same = [k for k in enc_keys if torch.equal(got[k], src[k])]
    assert len(same) == len(enc_keys) - (2 if c_down > 1 else 0)
    # citations as nnU-Net master prints them: type, name, apa_citations
    cits = fields["citations"]
    assert cits and all({"type", "name", "apa_citations"} <= set(c) for c in cits)
    assert any(c["type"] == "pretraining method" and "Ho, J." in c["apa_citations"][0] for c in cits)  # diffusion
    assert any(c["name"] == "nnU-Net" for c in cits)


SHORT_TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_nnpreLr0(nnUNetTrainer):
    """Stock trainer, one iteration at learning rate 0 (weights stay as loaded), no final validation."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 1, 1
        self.initial_lr = 0.0

    def perform_actual_validation(self, *args, **kwargs):
        pass
'''


def test_full_export_trains_with_stock_nnunetv2_train_pretrained_weights(nnunet_root, tmp_path):
    """nnPre_plan --like CKPT, nnPre_export CKPT --full, then the stock command
    ``nnUNetv2_train D 3d_fullres all -p PLANS -tr T -pretrained_weights FILE``: every non-seg tensor arrives."""
    import os
    import subprocess
    import sys

    from nnpre_testdata import write_raw_dataset

    from nnpre.adaptation_plan import from_nnunet_plans
    from nnpre.cli.plan import main as plan_main

    write_raw_dataset(nnunet_root, did=68, n_cases=2)
    src_plan = from_nnunet_plans({"plans_name": "p", "configurations": {"3d_fullres": {
        "spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32], "normalization_schemes": ["ZScoreNormalization"],
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                         "arch_kwargs": tiny_plan().arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}, "3d_fullres", 1,
        pretext="mae", pretext_config={})
    torch.manual_seed(3)
    net = src_plan.build_network(1, 1)
    ck = tmp_path / "mae.pth"
    save_checkpoint_atomic({"network_weights": net.state_dict(), "nnssl_adaptation_plan": src_plan.to_dict()}, ck)
    assert plan_main(["-d", "68", "--like", str(ck), "--preset", "cpu-tiny", "-np", "1"]) == 0
    full = tmp_path / "mae_full.pth"
    assert main([str(ck), "-o", str(full), "--full"]) == 0
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "short_trainer.py").write_text(SHORT_TRAINER)
    env = dict(os.environ, nnUNet_extTrainer=str(ext), nnUNet_n_proc_DA="0", nnUNet_compile="false")
    cmd = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), "68", "3d_fullres", "all",
           "-p", "nnPrePlans__mae", "-tr", "nnUNetTrainer_nnpreLr0", "-pretrained_weights", str(full),
           "-device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    run = os.path.join(os.environ["nnUNet_results"], "Dataset068_T",
                       "nnUNetTrainer_nnpreLr0__nnPrePlans__mae__3d_fullres", "fold_all", "checkpoint_final.pth")
    trained = torch.load(run, weights_only=False, map_location="cpu")["network_weights"]
    exported = torch.load(full, weights_only=True)["network_weights"]
    assert set(exported) == {k for k in trained if ".seg_layers." not in k}
    assert all(torch.equal(trained[k], v) for k, v in exported.items())  # lr 0: exactly what was loaded
